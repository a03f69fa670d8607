//! The training loop: dataset → patches → model → Dice + cross-entropy → AdamW, with validation on
//! whole volumes, checkpoints after every epoch and exact resume.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;

use super::calibrate::{calibrate_checkpoints, fit_operating_point};
use super::checkpoint::{self, EpochRecord, TrainState};
use super::curves::{plot_training_curve, write_metrics_csv};
use super::ema::Ema;
use super::loss::{lesion_weights, weighted_dice_ce_loss, LossTerms};
use super::schedule::learning_rate;
use crate::config::{RunConfig, SelectionMetric, Temperature, TemperatureChoice};
use crate::data::batcher::{Batch, EpochPlan, Loader};
use crate::data::dataset::{self, Dataset, PreparedCase};
use crate::data::sampler::PatchSampler;
use crate::error::{Error, Result};
use crate::infer::postprocess::LesionFilter;
use crate::infer::sliding_window::SlidingWindow;
use crate::io::layout::{Checkpoint, CheckpointKind, RunDir};
use crate::io::{write_atomically, write_json_atomically};
use crate::model::transfer::{transfer_parameters, Transfer};
use crate::model::{load_weights, HybridSegNet, HybridSegNetConfig};
use crate::transforms::augment::derive_seed;
use crate::transforms::post::{decide_classes, ClassRule};

/// How to run, beside the config.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Continue the run in `output.dir` from its last checkpoint (from the start if it has none).
    pub resume: bool,
    /// Fine-tune: start from this checkpoint's (or run's) weights wherever name and shape match.
    pub init_from: Option<PathBuf>,
}

/// What training reports as it goes; drawing it is the caller's business.
#[derive(Debug, Clone)]
pub enum TrainEvent {
    /// Cases prepared so far.
    Preparing {
        /// Prepared.
        done: usize,
        /// To prepare.
        total: usize,
    },
    /// A line for the log (also written to the run's `train.log`).
    Log(String),
    /// An epoch starts.
    EpochStarted {
        /// 0-based.
        epoch: usize,
        /// Epochs in the run.
        epochs: usize,
        /// Steps in this epoch.
        steps: usize,
    },
    /// A training step finished.
    Step {
        /// The epoch's mean loss so far.
        mean_loss: f64,
    },
    /// Validation of the epoch's model started.
    Validating,
    /// An epoch finished (and was checkpointed).
    EpochFinished {
        /// Epochs done.
        epochs_done: usize,
        /// Its validation mean Dice, when it validated.
        mean_dice: Option<f64>,
    },
}

/// What a finished (or early-stopped) run left.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// The run directory (config, checkpoints, metrics, curves, log).
    pub run_dir: PathBuf,
    /// Training state at the end.
    pub state: TrainState,
    /// Epochs already done when this invocation started (non-zero when resumed).
    pub resumed_at: usize,
}

/// The network a run config asks for: its preset, overridden field by field, sized by the data.
pub fn model_config(config: &RunConfig) -> Result<HybridSegNetConfig> {
    let m = &config.model;
    let mut c = HybridSegNetConfig::preset(
        m.preset,
        config.sampling.patch_size,
        config.data.labels.len().max(2),
    )
    .with_in_channels(config.data.channels.len().max(1))
    .with_context_slices(m.context_slices);
    if let Some(v) = &m.stem_widths {
        c.stem_widths = v.clone();
    }
    macro_rules! over {
        ($($f:ident),*) => { $( if let Some(v) = m.$f { c.$f = v; } )* };
    }
    over!(
        blocks_per_stage,
        token_patch,
        embed_dim,
        depth,
        heads,
        mlp_ratio,
        dropout,
        transformer_skips,
        deep_supervision
    );
    if let Some(p) = m.position {
        c.position = p;
    }
    if let Some(n) = m.norm {
        c.norm = n;
    }
    c.kernels = Some(m.kernels);
    c.validate()?;
    Ok(c)
}

/// The run's `train.log`; every line is also reported as a [`TrainEvent::Log`].
struct RunLog {
    file: std::fs::File,
}

impl RunLog {
    fn line(&mut self, text: &str, on_event: &mut dyn FnMut(TrainEvent)) {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let _ = writeln!(self.file, "[{secs}] {text}");
        let _ = self.file.flush();
        on_event(TrainEvent::Log(text.to_string()));
    }
}

/// Best-checkpoint selection and early stopping on the validation metric.
#[derive(Debug, Clone, Copy)]
pub struct EarlyStopping {
    /// `None`: mean Dice; else the index of the class whose Dice selects.
    pub class: Option<usize>,
    /// Validations without improvement before stopping; 0 never stops.
    pub patience: usize,
    /// Whether validation happens at all (else the newest model is the best).
    pub validates: bool,
}

impl EarlyStopping {
    /// Updates `state` with a finished epoch's record; returns whether it is the new best.
    pub fn update(&self, state: &mut TrainState, record: &EpochRecord) -> bool {
        let epoch = record.epoch;
        match selection_metric(self.class, record) {
            Some(m) if state.best_metric.is_none_or(|b| m > b) => {
                state.best_metric = Some(m);
                state.best_epoch = Some(epoch);
                state.validations_without_improvement = 0;
                true
            }
            Some(_) => {
                state.validations_without_improvement += 1;
                if self.patience > 0 && state.validations_without_improvement >= self.patience {
                    state.stopped_early = true;
                }
                false
            }
            None if !self.validates => {
                // Nothing to select on: the newest model is the best one.
                state.best_epoch = Some(epoch);
                true
            }
            None => false,
        }
    }
}

/// A run directory opened for training: created, or found with a checkpoint to resume.
struct RunSetup {
    run: RunDir,
    log: RunLog,
    resume_from: Option<Checkpoint>,
}

impl RunSetup {
    fn open(config: &RunConfig, options: &TrainOptions) -> Result<Self> {
        let run = RunDir::new(&config.output.dir);
        let previous = run.resolve(CheckpointKind::Last);
        if previous.is_some() && !options.resume {
            return Err(Error::Config {
                reason: format!(
                    "{} already holds a run; continue it with --resume {} or set [output] dir to a new directory",
                    run.root.display(),
                    run.root.display()
                ),
            });
        }
        let ckpt_dir = run.checkpoints();
        std::fs::create_dir_all(&ckpt_dir).map_err(|e| Error::io(&ckpt_dir, e))?;
        let log_path = run.log();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| Error::io(&log_path, e))?;
        Ok(RunSetup {
            run,
            log: RunLog { file },
            resume_from: previous.filter(|_| options.resume),
        })
    }
}

/// The model, optimizer and data of a run, stepped an epoch at a time.
pub struct Trainer {
    config: RunConfig,
    model_config: HybridSegNetConfig,
    model: HybridSegNet,
    optimizer: burn::optim::ModuleOptimizer,
    device: Device,
    autodiff: Device,
    sampler: PatchSampler,
    train_cases: Arc<Vec<Arc<PreparedCase>>>,
    validation: Vec<Arc<PreparedCase>>,
    window: SlidingWindow,
    deep_supervision: Vec<f64>,
    /// The weights' moving average (`train.ema_decay`); started at the first step.
    ema: Option<Ema>,
    /// Epoch, step, best metric and history; what a checkpoint restores.
    pub state: TrainState,
}

/// One epoch's training numbers.
struct EpochStats {
    mean_loss: f64,
    learning_rate: f64,
    steps: usize,
    data_wait_seconds: f64,
    seconds: f64,
}

impl Trainer {
    /// Builds the model (seeded) and optimizer for `config` over the prepared `data`.
    fn new(config: RunConfig, data: &Dataset) -> Result<Self> {
        let t = &config.train;
        let device = crate::model::device(t.device.name())?;
        let autodiff = device.clone().autodiff();
        autodiff.seed(t.seed);
        let model_config = model_config(&config)?;
        let model = model_config.init(&autodiff)?;
        let mut adamw = AdamWConfig::new().with_weight_decay(t.weight_decay as f32);
        if t.grad_clip > 0.0 {
            adamw = adamw.with_grad_clipping(Some(
                burn::optim::grad_clipping::GradientClippingConfig::Norm(t.grad_clip as f32),
            ));
        }
        let preferred = crate::config::class_values(
            &config.data.labels,
            "sampling.foreground_classes",
            &config.sampling.foreground_classes,
        )?
        .into_iter()
        .map(|c| c as usize)
        .collect();
        let sampler = PatchSampler::new(
            &config.sampling,
            &config.augment,
            config.model.context_slices,
        )
        .with_foreground_classes(preferred);
        let window = SlidingWindow {
            window: sampler.size,
            overlap: config.validate.overlap,
            batch_size: config.validate.batch_size,
            concurrent: SlidingWindow::concurrency_for(&device),
            mirror: false,
            temperature: 1.0,
            context: config.model.context_slices,
        };
        let deep_supervision = deep_supervision_weights(
            &t.deep_supervision_weights,
            model_config.deep_supervision,
            model_config.stem_widths.len(),
        );
        Ok(Trainer {
            state: TrainState {
                seed: t.seed,
                ..TrainState::default()
            },
            optimizer: adamw.init(),
            model,
            model_config,
            device,
            autodiff,
            sampler,
            train_cases: Arc::new(data.train.clone()),
            validation: data.validation.clone(),
            window,
            deep_supervision,
            ema: None,
            config,
        })
    }

    /// Restores weights, optimizer and state from `checkpoint`.
    fn restore(&mut self, checkpoint: &Checkpoint) -> Result<()> {
        let state = checkpoint::load_state(checkpoint)?;
        if state.seed != self.config.train.seed {
            return Err(Error::Checkpoint {
                path: checkpoint.dir.clone(),
                reason: format!(
                    "was trained with seed {}, the config says {}",
                    state.seed, self.config.train.seed
                ),
            });
        }
        // With a weight average, `weights.bpk` holds the average and the stepped weights are
        // apart; without one they are the same file.
        let weights = checkpoint.weights();
        let training = checkpoint.training_weights();
        let averaged = training.is_file();
        let load = |path: &std::path::Path| load_weights(self.model.clone(), path);
        let stepped = load(if averaged { &training } else { &weights })?;
        let decay = self.config.train.ema_decay;
        self.ema = if averaged && decay > 0.0 {
            Some(Ema::new(decay, load(&weights)?, state.global_step))
        } else {
            None
        };
        self.model = stepped;
        let fresh = AdamWConfig::new().init();
        let optimizer = std::mem::replace(&mut self.optimizer, fresh);
        self.optimizer = checkpoint::load_optimizer(checkpoint, optimizer)?;
        self.state = state;
        Ok(())
    }

    fn epoch_plan(&self, epoch: usize) -> EpochPlan {
        let t = &self.config.train;
        EpochPlan::new(
            self.train_cases.len(),
            self.config.sampling.patches_per_volume,
            t.batch_size,
            t.steps_per_epoch,
            t.seed,
            epoch,
        )
    }

    /// Trains one epoch (the next one in `state`).
    fn run_epoch(&mut self, on_event: &mut dyn FnMut(TrainEvent)) -> Result<EpochStats> {
        let t = self.config.train.clone();
        let epoch = self.state.epoch;
        let started = Instant::now();
        let steps = self.epoch_plan(0).steps;
        let total_steps = steps * t.epochs;
        on_event(TrainEvent::EpochStarted {
            epoch,
            epochs: t.epochs,
            steps,
        });
        // Dropout and any other device randomness: a function of seed and epoch.
        self.autodiff
            .seed(derive_seed(t.seed, epoch, usize::MAX - 1));
        let mut loader = Loader::spawn(
            self.train_cases.clone(),
            self.sampler.clone(),
            self.epoch_plan(epoch),
            t.seed,
            epoch,
            self.config.data.workers,
            self.config.data.prefetch,
        );
        let mut loss_sum = 0.0;
        let mut lr = 0.0;
        let mut done = 0;
        let terms = LossTerms::of(&t);
        for batch in loader.by_ref() {
            lr = learning_rate(
                t.schedule,
                t.lr,
                self.state.global_step,
                total_steps,
                t.warmup_steps,
                t.poly_exponent,
            );
            let loss = step_loss(
                &self.model,
                batch,
                &self.autodiff,
                &self.deep_supervision,
                terms,
                &self.sampler.foreground_classes,
            );
            let value: f64 = loss
                .clone()
                .try_to_vec_as::<f32>()
                .map_err(|e| Error::Backend {
                    reason: format!("reading the loss: {e:?}"),
                })?[0] as f64;
            if !value.is_finite() {
                return Err(Error::Training {
                    reason: format!(
                        "the loss became {value} at epoch {} step {}; lower [train] lr (now {})",
                        epoch + 1,
                        done + 1,
                        t.lr
                    ),
                });
            }
            self.step(loss, lr, epoch);
            if t.ema_decay > 0.0 {
                let step = self.state.global_step;
                self.ema
                    .get_or_insert_with(|| Ema::new(t.ema_decay, self.model.clone(), step))
                    .update(&self.model)?;
            }
            self.state.global_step += 1;
            done += 1;
            loss_sum += value;
            on_event(TrainEvent::Step {
                mean_loss: loss_sum / done as f64,
            });
        }
        let data_wait_seconds = loader.wait_seconds;
        drop(loader);
        Ok(EpochStats {
            mean_loss: loss_sum / done.max(1) as f64,
            learning_rate: lr,
            steps: done,
            data_wait_seconds,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// One optimiser step. With `freeze_encoder_epochs` or `encoder_lr_scale` (fine-tuning), the
    /// encoder's gradients are stepped apart: not at all while frozen, else at the scaled rate.
    /// AdamW keeps its moments per parameter, so two steps over disjoint parameters are one.
    fn step(&mut self, loss: Tensor<1>, lr: f64, epoch: usize) {
        let t = &self.config.train;
        let frozen = epoch < t.freeze_encoder_epochs;
        let mut grads = loss.backward();
        if !frozen && t.encoder_lr_scale == 1.0 {
            let grads = GradientsParams::from_grads(grads, &self.model);
            self.model = self.optimizer.step(lr, self.model.clone(), grads);
            return;
        }
        let encoder = self.model.encoder_params();
        let encoder_grads = GradientsParams::from_params(&mut grads, &self.model, &encoder);
        let rest = GradientsParams::from_grads(grads, &self.model);
        self.model = self.optimizer.step(lr, self.model.clone(), rest);
        if !frozen {
            let scaled = lr * t.encoder_lr_scale;
            self.model = self
                .optimizer
                .step(scaled, self.model.clone(), encoder_grads);
        }
    }

    /// Starts the model from `source`'s parameters wherever name and shape match; refuses a
    /// source of which nothing matches.
    fn init_from(&mut self, source: &Checkpoint) -> Result<Transfer> {
        let (source_config, model) = crate::model::load(&source.dir, &self.autodiff)?;
        let (model, report) = transfer_parameters(
            self.model.clone(),
            &self.model_config,
            &model,
            &source_config,
        );
        let values = |list: &[crate::model::transfer::ParamEntry]| -> usize {
            list.iter()
                .filter_map(|p| p.shape.as_ref())
                .map(|s| s.iter().product::<usize>())
                .sum()
        };
        let loaded = values(&report.loaded) + values(&report.adapted);
        let fresh = values(&report.reinitialised);
        // A few class-sized biases match any model: under a tenth taken is nothing to start from.
        if loaded * 10 < loaded + fresh {
            return Err(Error::Checkpoint {
                path: source.dir.clone(),
                reason: format!(
                    "too little of it matches this model by name and shape ({loaded} of {} parameter values, {} tensors); is it a checkpoint of another preset or widths?",
                    loaded + fresh,
                    report.loaded.len() + report.adapted.len()
                ),
            });
        }
        self.model = model;
        Ok(report)
    }

    /// Validation Dice per class after the epoch just trained, when this epoch validates.
    fn validate(&self, on_event: &mut dyn FnMut(TrainEvent)) -> Result<Vec<f64>> {
        let v = &self.config.validate;
        let epoch = self.state.epoch;
        let epochs = self.config.train.epochs;
        if v.every == 0
            || self.validation.is_empty()
            || !((epoch + 1) % v.every == 0 || epoch + 1 == epochs)
        {
            return Ok(Vec::new());
        }
        on_event(TrainEvent::Validating);
        validation_dice(
            &self.inference_model(),
            &self.validation,
            &self.window,
            &self.device,
            self.config.data.labels.len() - 1,
        )
    }

    /// What validation sees and a checkpoint's `weights.bpk` holds: the moving average when
    /// there is one, else the trained weights.
    fn inference_model(&self) -> HybridSegNet {
        match &self.ema {
            Some(ema) => ema.model().clone(),
            None => self.model.valid(),
        }
    }

    fn save(&self, run: &RunDir, kind: CheckpointKind, run_config: &str) -> Result<()> {
        checkpoint::save(
            run,
            kind,
            &self.model_config,
            &self.inference_model(),
            self.ema.is_some().then_some(&self.model),
            &self.optimizer,
            &self.state,
            run_config,
        )
    }
}

/// Trains the model `config` describes; see [`TrainOptions`]. Progress and log lines are
/// reported through `on_event`.
pub fn train(
    mut config: RunConfig,
    options: &TrainOptions,
    on_event: &mut (dyn FnMut(TrainEvent) + Send),
) -> Result<TrainOutcome> {
    let RunSetup {
        run,
        mut log,
        resume_from,
    } = RunSetup::open(&config, options)?;

    let init = (options.init_from.as_deref())
        .map(|path| adopt_preprocessing(&mut config, path, &mut log, on_event))
        .transpose()?;
    // Data: checks every case, fills in what the config left to the dataset.
    let data = {
        let events = std::sync::Mutex::new(&mut *on_event);
        dataset::build(&mut config, &|done, total| {
            if let Ok(mut f) = events.lock() {
                f(TrainEvent::Preparing { done, total });
            }
        })?
    };
    let stopping = EarlyStopping {
        class: metric_class(&config.validate.metric, &config.data.labels[1..])?,
        patience: config.validate.patience,
        validates: config.validate.every > 0 && !data.validation.is_empty(),
    };
    let run_config = config.to_toml()?;
    write_atomically(&run.config(), run_config.as_bytes())?;
    write_json_atomically(&run.split(), &data.split)?;
    let classes: Vec<String> = config.data.labels[1..].to_vec();
    log.line(
        &format!(
            "data: {} training, {} validation, {} test cases; spacing {:?} mm; patch {}",
            data.train.len(),
            data.validation.len(),
            data.split.test.len(),
            config.preprocess.spacing,
            config.sampling.patch_size
        ),
        on_event,
    );

    // Model and optimizer, seeded; restored from the last checkpoint when resuming.
    let epochs = config.train.epochs;
    let batch_size = config.train.batch_size;
    let mut trainer = Trainer::new(config, &data)?;
    start_weights(
        &mut trainer,
        resume_from.as_ref(),
        init.as_ref(),
        &mut log,
        on_event,
    )?;
    let resumed_at = trainer.state.epoch;
    write_reports(&run, &trainer.state, &classes)?;

    while trainer.state.epoch < epochs && !trainer.state.stopped_early {
        let started = Instant::now();
        let stats = trainer.run_epoch(on_event)?;
        let train_seconds = stats.seconds;
        let validation_dice = trainer.validate(on_event)?;
        let epoch = trainer.state.epoch + 1;
        let record = EpochRecord {
            epoch,
            train_loss: stats.mean_loss,
            learning_rate: stats.learning_rate,
            validation_dice,
            seconds: started.elapsed().as_secs_f64(),
            data_wait_seconds: stats.data_wait_seconds,
            patches_per_second: (stats.steps * batch_size) as f64 / train_seconds.max(1e-9),
        };
        trainer.state.epoch = epoch;
        let improved = stopping.update(&mut trainer.state, &record);
        let selected = improved && selection_metric(stopping.class, &record).is_some();
        let line = epoch_line(&record, epochs, train_seconds, selected);
        let mean_dice = record.mean_dice();
        trainer.state.history.push(record);
        if improved {
            trainer.save(&run, CheckpointKind::Best, &run_config)?;
        }
        trainer.save(&run, CheckpointKind::Last, &run_config)?;
        write_reports(&run, &trainer.state, &classes)?;
        log.line(&line, on_event);
        on_event(TrainEvent::EpochFinished {
            epochs_done: epoch,
            mean_dice,
        });
        crate::io::abort_point("train-epoch-saved");
        let s = &trainer.state;
        if s.stopped_early {
            log.line(
                &format!(
                    "stopping early: no improvement in {} validations (best {:.4} at epoch {})",
                    s.validations_without_improvement,
                    s.best_metric.unwrap_or(0.0),
                    s.best_epoch.unwrap_or(0)
                ),
                on_event,
            );
        }
    }
    calibrate_run(&run, &trainer, &mut log, on_event)?;
    let state = trainer.state;
    log.line(
        &format!(
            "done: {} epochs; best checkpoint {} (epoch {})",
            state.epoch,
            run.checkpoint(CheckpointKind::Best).dir.display(),
            state.best_epoch.unwrap_or(state.epoch)
        ),
        on_event,
    );
    Ok(TrainOutcome {
        run_dir: run.root,
        state,
        resumed_at,
    })
}

/// Times a training step (forward, Dice + CE, backward, AdamW) of the model and batch `config`
/// describes, on random data on its device: one warm-up step, then the median of `steps` (a
/// mean of two swung by 30 % between plans of the same data on this 2-core host); with the
/// peak bytes allocated above what was allocated before, by `meter` (the process's global
/// allocator). `medseg plan` calibrates its choices with it.
pub fn measure_step(
    config: &RunConfig,
    steps: usize,
    meter: &dyn peakmem_alloc::PeakMemAllocTrait,
) -> Result<crate::data::plan::StepCost> {
    let model_config = model_config(config)?;
    let device = crate::model::device(config.train.device.name())?;
    let autodiff = device.clone().autodiff();
    autodiff.seed(config.train.seed);
    meter.reset_peak_memory();
    let mut model = model_config.init(&autodiff)?;
    let mut optimizer = AdamWConfig::new().init();
    let [d, h, w] = model_config.patch_size.window();
    let b = config.train.batch_size;
    let c = model_config.input_channels();
    let k = model_config.num_classes;
    let weights = deep_supervision_weights(
        &[],
        model_config.deep_supervision,
        model_config.stem_widths.len(),
    );
    let batch = || {
        // A fixed pattern: the step's cost does not depend on the values.
        let image = (0..b * c * d * h * w)
            .map(|i| ((i % 97) as f32 / 48.5) - 1.0)
            .collect();
        let label = (0..b * d * h * w).map(|i| ((i / 7) % k) as u8).collect();
        Batch {
            image,
            image_shape: [b, c, d, h, w],
            label,
            label_shape: [b, d, h, w],
        }
    };
    // The lesion weights (a component labelling of the batch on the CPU) are left out: the
    // labels here are a fixed pattern, and their cost is small beside the step's.
    let terms = LossTerms::of(&config.train);
    let mut timed = Vec::new();
    for step in 0..=steps.max(1) {
        let started = Instant::now();
        let loss = step_loss(&model, batch(), &autodiff, &weights, terms, &[]);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(1e-4, model, grads);
        if step > 0 {
            timed.push(started.elapsed().as_secs_f64());
        }
    }
    timed.sort_by(f64::total_cmp);
    Ok(crate::data::plan::StepCost {
        seconds: timed[timed.len() / 2],
        peak_bytes: meter.get_peak_memory() as u64,
    })
}

/// Fine-tuning from `path`: its checkpoint, whose preprocessing the run takes for what the config
/// leaves open (spacing, intensity); where the config sets another, a warning says so.
fn adopt_preprocessing(
    config: &mut RunConfig,
    path: &std::path::Path,
    log: &mut RunLog,
    on_event: &mut dyn FnMut(TrainEvent),
) -> Result<Checkpoint> {
    let source = Checkpoint::find(path)?;
    let saved = RunConfig::load(Some(&source.run_config()), &[])?;
    let (mine, theirs) = (&mut config.preprocess, &saved.preprocess);
    let mut taken = Vec::new();
    if mine.spacing.is_empty() {
        mine.spacing = theirs.spacing.clone();
        taken.push("spacing");
    }
    if mine.intensity.is_empty() {
        mine.intensity = theirs.intensity.clone();
        taken.push("intensity");
    }
    if !taken.is_empty() {
        log.line(
            &format!(
                "fine-tuning from {}: its {} taken",
                source.dir.display(),
                taken.join(" and ")
            ),
            on_event,
        );
    }
    // Name only what differs, with both values.
    let mut differs = Vec::new();
    if mine.spacing != theirs.spacing {
        differs.push(format!(
            "spacing {:?} vs {:?}",
            mine.spacing, theirs.spacing
        ));
    }
    let intensity = |v: &[crate::config::IntensityConfig]| -> Vec<String> {
        v.iter()
            .map(|i| {
                format!(
                    "{:?} {:?} mean {:?} std {:?}",
                    i.scheme, i.window, i.mean, i.std
                )
            })
            .collect()
    };
    if mine.intensity != theirs.intensity {
        let (a, b) = (intensity(&mine.intensity), intensity(&theirs.intensity));
        differs.push(format!("intensity {a:?} vs {b:?}"));
    }
    if (mine.reorient, mine.crop_to_nonzero) != (theirs.reorient, theirs.crop_to_nonzero) {
        differs.push(format!(
            "reorient / crop_to_nonzero {:?} vs {:?}",
            (mine.reorient, mine.crop_to_nonzero),
            (theirs.reorient, theirs.crop_to_nonzero)
        ));
    }
    if !differs.is_empty() {
        log.line(
            &format!(
                "warning: the config's preprocessing differs from {}'s ({}); the pre-trained features saw the latter",
                source.dir.display(),
                differs.join("; ")
            ),
            on_event,
        );
    }
    Ok(source)
}

/// The run's first weights: the last checkpoint's when resuming, else `init`'s wherever they
/// match (fine-tuning, with a table of what was loaded), else the seeded initialisation.
fn start_weights(
    trainer: &mut Trainer,
    resume_from: Option<&Checkpoint>,
    init: Option<&Checkpoint>,
    log: &mut RunLog,
    on_event: &mut dyn FnMut(TrainEvent),
) -> Result<()> {
    if let Some(ckpt) = resume_from {
        trainer.restore(ckpt)?;
        let line = format!(
            "resumed from {} after epoch {}",
            ckpt.dir.display(),
            trainer.state.epoch
        );
        log.line(&line, on_event);
        return Ok(());
    }
    if let Some(source) = init {
        let report = trainer.init_from(source)?;
        for line in transfer_table(&report, source) {
            log.line(&line, on_event);
        }
    }
    Ok(())
}

/// What fine-tuning took: counts per module, then every parameter not taken, with its shapes.
fn transfer_table(report: &Transfer, source: &Checkpoint) -> Vec<String> {
    let module = |name: &str| name.split('.').next().unwrap_or(name).to_string();
    let mut rows: std::collections::BTreeMap<String, [usize; 4]> = Default::default();
    for (i, list) in [
        &report.loaded,
        &report.adapted,
        &report.reinitialised,
        &report.ignored,
    ]
    .into_iter()
    .enumerate()
    {
        for p in list {
            rows.entry(module(&p.name)).or_default()[i] += 1;
        }
    }
    let mut lines = vec![
        format!("initialised from {}:", source.dir.display()),
        format!(
            "  {:<10} {:>7} {:>8} {:>15} {:>8}",
            "module", "loaded", "adapted", "re-initialised", "ignored"
        ),
    ];
    for (m, [l, a, r, i]) in &rows {
        lines.push(format!("  {m:<10} {l:>7} {a:>8} {r:>15} {i:>8}"));
    }
    let shape = |s: &Option<Vec<usize>>| s.as_ref().map_or("-".into(), |s| format!("{s:?}"));
    for (what, list) in [
        ("adapted", &report.adapted),
        ("re-initialised", &report.reinitialised),
    ] {
        for p in list {
            lines.push(format!(
                "  {what} {} {} (source: {})",
                p.name,
                shape(&p.shape),
                shape(&p.source_shape)
            ));
        }
    }
    for p in &report.ignored {
        lines.push(format!("  ignored {} {}", p.name, shape(&p.source_shape)));
    }
    lines
}

/// Temperature scaling and the findings' operating point on the validation cases at the end of
/// training (a resumed finished run fits what is missing), with their log lines.
fn calibrate_run(
    run: &RunDir,
    trainer: &Trainer,
    log: &mut RunLog,
    on_event: &mut dyn FnMut(TrainEvent),
) -> Result<()> {
    if trainer.validation.is_empty() {
        return Ok(());
    }
    on_event(TrainEvent::Validating);
    let fit = calibrate_checkpoints(
        run,
        &trainer.validation,
        &trainer.window,
        &trainer.device,
        trainer.state.seed,
    )?;
    if let Some(c) = &fit {
        log.line(
            &format!(
                "calibration: temperature {:.3} fitted on {} validation voxels; ECE {:.4} -> {:.4}, NLL {:.4} -> {:.4}",
                c.temperature, c.samples, c.ece_before, c.ece_after, c.nll_before, c.nll_after
            ),
            on_event,
        );
    }
    // The findings' cut-off, on the validation cases predicted as `segment` predicts them.
    let segment = &trainer.config.segment;
    let temperature = match segment.temperature {
        Temperature::Value(t) => t,
        Temperature::Named(TemperatureChoice::Fitted) => fit.map_or(1.0, |c| c.temperature),
    };
    let window = SlidingWindow {
        overlap: segment.overlap,
        mirror: segment.tta,
        temperature: temperature as f32,
        ..trainer.window.clone()
    };
    let filter = LesionFilter::from_config(segment, &trainer.config.data.labels)?;
    let point = fit_operating_point(
        run,
        &trainer.validation,
        &window,
        &filter,
        &ClassRule::from_config(segment, &trainer.config.data),
        &trainer.config.data.labels,
        &trainer.device,
    )?;
    if let Some(p) = point {
        let (Some(without), Some(chosen)) = (p.without(), p.chosen()) else {
            return Ok(());
        };
        log.line(
            &format!(
                "operating point: findings below confidence {:.2} dropped, chosen on {} validation cases ({} lesions{}): lesion F1 {:.3} -> {:.3}, {} -> {} false positives, {} -> {} found",
                p.min_confidence,
                p.cases,
                p.truth_lesions,
                if segment.tta { ", mirrored" } else { "" },
                without.f1,
                chosen.f1,
                without.false_positives,
                chosen.false_positives,
                without.detected,
                chosen.detected,
            ),
            on_event,
        );
    }
    Ok(())
}

/// The log line of a finished epoch.
fn epoch_line(record: &EpochRecord, epochs: usize, train_seconds: f64, best: bool) -> String {
    format!(
        "epoch {}/{epochs}: loss {:.4}, lr {:.2e}, {:.1} s ({:.2} patches/s, {:.0}% waiting for data){}{}",
        record.epoch,
        record.train_loss,
        record.learning_rate,
        record.seconds,
        record.patches_per_second,
        100.0 * record.data_wait_seconds / train_seconds.max(1e-9),
        record
            .mean_dice()
            .map(|d| format!(", validation Dice {d:.4}"))
            .unwrap_or_default(),
        if best { " (best)" } else { "" }
    )
}

fn write_reports(run: &RunDir, state: &TrainState, classes: &[String]) -> Result<()> {
    write_metrics_csv(&run.metrics_csv(), &state.history, classes)?;
    if !state.history.is_empty() {
        plot_training_curve(&run.training_curve(), &state.history, classes)?;
    }
    Ok(())
}

/// Loss weights of the full-resolution output followed by the deep outputs (deepest first):
/// nnU-Net halves the weight per scale and normalises the sum to 1.
fn deep_supervision_weights(given: &[f64], deep_supervision: bool, stages: usize) -> Vec<f64> {
    if !deep_supervision {
        return vec![1.0];
    }
    let deep = stages.saturating_sub(1).max(1);
    let mut w = vec![1.0];
    if given.len() == deep {
        w.extend_from_slice(given);
    } else {
        // Deepest first: 1/2^deep … 1/2.
        w.extend((0..deep).map(|i| 0.5f64.powi((deep - i) as i32)));
    }
    let sum: f64 = w.iter().sum();
    w.iter().map(|x| x / sum).collect()
}

/// Dice + cross-entropy over the outputs.
///
/// # Shapes
/// - batch image `[B, C, D, H, W]`, labels `[B, D, H, W]` → loss `[1]`
fn step_loss(
    model: &HybridSegNet,
    batch: Batch,
    device: &Device,
    weights: &[f64],
    terms: LossTerms,
    lesion_classes: &[usize],
) -> Tensor<1> {
    let x = Tensor::<5>::from_data(TensorData::new(batch.image, batch.image_shape), device);
    let out = model.forward(x);
    // Each output's target and, where lesions are weighted, its voxel weights at its own scale.
    let loss_at = |logits: Tensor<5>| {
        let [b, _, d, h, wd] = logits.dims();
        let shape = [b, d, h, wd];
        let labels = downsample_labels(&batch.label, batch.label_shape, shape);
        let voxel_weights = lesion_weights(&labels, shape, lesion_classes, terms.lesion_weight_max)
            .map(|w| Tensor::<4>::from_data(TensorData::new(w, shape), device));
        let target = Tensor::<4, Int>::from_data(TensorData::new(labels, shape), device);
        weighted_dice_ce_loss(logits, target, voxel_weights, terms)
    };
    let mut loss = loss_at(out.logits) * weights[0];
    for (logits, w) in out.deep.into_iter().zip(weights.iter().skip(1)) {
        loss = loss + loss_at(logits) * *w;
    }
    loss
}

/// Nearest-neighbour label downsampling (voxel centres) for deep-supervision targets.
fn downsample_labels(labels: &[u8], from: [usize; 4], to: [usize; 4]) -> Vec<i64> {
    let idx = |o: usize, n_out: usize, n_in: usize| {
        (((o as f64 + 0.5) * n_in as f64 / n_out as f64) as usize).min(n_in - 1)
    };
    let [b, d, h, w] = to;
    let [_, fd, fh, fw] = from;
    let mut out = Vec::with_capacity(b * d * h * w);
    for n in 0..b {
        for z in 0..d {
            let sz = idx(z, d, fd);
            for y in 0..h {
                let sy = idx(y, h, fh);
                for x in 0..w {
                    let sx = idx(x, w, fw);
                    out.push(labels[((n * fd + sz) * fh + sy) * fw + sx] as i64);
                }
            }
        }
    }
    out
}

/// Dice per foreground class over all validation voxels together (nnU-Net's online "pseudo Dice":
/// true and false positives summed over cases), from sliding-window predictions on whole volumes.
/// A class absent from both truth and prediction scores 1.
pub fn validation_dice(
    model: &HybridSegNet,
    cases: &[Arc<PreparedCase>],
    window: &SlidingWindow,
    device: &Device,
    classes: usize,
) -> Result<Vec<f64>> {
    let mut tp = vec![0u64; classes];
    let mut fp = vec![0u64; classes];
    let mut fnn = vec![0u64; classes];
    for case in cases {
        let probs = window.predict(model, case.image.view(), device)?;
        let predicted = decide_classes(probs.view(), None);
        for (&pred, &truth) in predicted.iter().zip(case.label.iter()) {
            let (pred, truth) = (pred as usize, truth as usize);
            if pred == truth {
                if pred > 0 {
                    tp[pred - 1] += 1;
                }
            } else {
                if pred > 0 {
                    fp[pred - 1] += 1;
                }
                if truth > 0 {
                    fnn[truth - 1] += 1;
                }
            }
        }
    }
    Ok((0..classes)
        .map(|c| {
            let denom = 2 * tp[c] + fp[c] + fnn[c];
            if denom == 0 {
                1.0
            } else {
                2.0 * tp[c] as f64 / denom as f64
            }
        })
        .collect())
}

/// Which number selects the best checkpoint: `None` for mean Dice, else a class's index. Checked
/// before training so a misspelt class name fails at once, not after the first epoch.
fn metric_class(metric: &SelectionMetric, classes: &[String]) -> Result<Option<usize>> {
    let SelectionMetric::ClassDice(metric) = metric else {
        return Ok(None);
    };
    match classes.iter().position(|c| c == metric) {
        Some(i) => Ok(Some(i)),
        None => Err(Error::Config {
            reason: format!(
                "[validate] metric must be mean_dice or a class name ({}), not {metric:?}",
                classes.join(", ")
            ),
        }),
    }
}

/// The selection number of an epoch, when it validated.
fn selection_metric(class: Option<usize>, record: &EpochRecord) -> Option<f64> {
    match class {
        None => record.mean_dice(),
        Some(i) => record.validation_dice.get(i).copied(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_supervision_weights_halve_and_sum_to_one() {
        let w = deep_supervision_weights(&[], true, 3);
        assert_eq!(w.len(), 3);
        assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!((w[0] / w[2] - 2.0).abs() < 1e-12 && (w[2] / w[1] - 2.0).abs() < 1e-12);
        assert_eq!(deep_supervision_weights(&[], false, 3), vec![1.0]);
    }

    #[test]
    fn label_downsampling_picks_voxel_centres() {
        let labels: Vec<u8> = (0..16).collect();
        assert_eq!(
            downsample_labels(&labels, [1, 1, 4, 4], [1, 1, 2, 2]),
            vec![5, 7, 13, 15]
        );
    }

    /// `[train] dice_classes` and `lesion_weight_max` reach the step's loss: on a batch with a
    /// large and a small lesion, each changes it, and the defaults match the plain loss.
    #[test]
    fn loss_keys_change_the_step_loss() {
        let mut config = RunConfig::default();
        config.data.labels = vec!["background".into(), "lesion".into()];
        config.sampling.patch_size = crate::geometry::PatchSize::new(&[16, 16]).unwrap();
        let model_config = model_config(&config).unwrap();
        let device = crate::model::device("cpu").unwrap().autodiff();
        device.seed(0);
        let model = model_config.init(&device).unwrap();
        let weights = deep_supervision_weights(&[], model_config.deep_supervision, 3);
        let batch = || {
            let mut label = vec![0u8; 256];
            for y in 2..10 {
                label[y * 16 + 2..y * 16 + 10].fill(1);
            }
            label[13 * 16 + 13] = 1;
            Batch {
                image: (0..256).map(|i| (i % 13) as f32 / 6.0 - 1.0).collect(),
                image_shape: [1, 1, 1, 16, 16],
                label,
                label_shape: [1, 1, 16, 16],
            }
        };
        let loss = |terms: LossTerms| {
            step_loss(&model, batch(), &device, &weights, terms, &[1]).into_scalar::<f32>()
        };
        let plain = loss(LossTerms::default());
        assert_eq!(plain, loss(LossTerms::of(&config.train)));
        config.train.dice_classes = crate::config::DiceClasses::Foreground;
        let foreground = loss(LossTerms::of(&config.train));
        config.train.dice_classes = crate::config::DiceClasses::All;
        config.train.lesion_weight_max = 10.0;
        let weighted = loss(LossTerms::of(&config.train));
        assert!((foreground - plain).abs() > 1e-4, "{foreground} vs {plain}");
        assert!((weighted - plain).abs() > 1e-4, "{weighted} vs {plain}");
    }
}
