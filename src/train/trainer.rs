//! The training loop: dataset → patches → model → Dice + cross-entropy → AdamW, with validation on
//! whole volumes, checkpoints after every epoch and exact resume.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::checkpoint::{self, EpochRecord, TrainState};
use super::curves::{plot_training_curve, write_metrics_csv};
use super::loss::dice_ce_loss;
use super::schedule::learning_rate;
use crate::config::RunConfig;
use crate::data::batcher::{batch_seed, Batch, EpochPlan, Loader};
use crate::data::dataset::{self, PreparedCase};
use crate::data::sampler::PatchSampler;
use crate::error::{Error, Result};
use crate::infer::sliding_window::SlidingWindow;
use crate::model::{HybridSegNet, HybridSegNetConfig, NormKind, PositionEmbedding};

/// Files in a run directory.
pub const RUN_CONFIG: &str = crate::config::CONFIG_FILE;
pub const METRICS_CSV: &str = "metrics.csv";
pub const CURVE_PNG: &str = "training_curve.png";
pub const LOG_FILE: &str = "train.log";
pub const SPLIT_JSON: &str = "split.json";
pub const CHECKPOINTS: &str = "checkpoints";

/// How to run, beside the config.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Continue the run in `output.dir` from its last checkpoint (from the start if it has none).
    pub resume: bool,
    /// No progress bars; one line per epoch on stderr.
    pub quiet: bool,
}

/// What a finished (or early-stopped) run left.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub run_dir: PathBuf,
    pub state: TrainState,
    /// Epochs already done when this invocation started (non-zero when resumed).
    pub resumed_at: usize,
}

/// The network a run config asks for: its preset, overridden field by field, sized by the data.
pub fn model_config(config: &RunConfig) -> Result<HybridSegNetConfig> {
    let m = &config.model;
    let dims = config.sampling.patch_size.len();
    let mut c = HybridSegNetConfig::preset(
        &m.preset,
        dims,
        config.data.channels.len().max(1),
        config.data.labels.len().max(2),
    )?;
    c.patch_size = config.sampling.patch_size.clone();
    c.context_slices = m.context_slices;
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
    if let Some(p) = &m.position {
        c.position = match p.as_str() {
            "learned" => PositionEmbedding::Learned,
            "sinusoidal" => PositionEmbedding::Sinusoidal,
            other => {
                return Err(Error::Config {
                    reason: format!(
                        "[model] position must be learned or sinusoidal, not {other:?}"
                    ),
                })
            }
        };
    }
    if let Some(n) = &m.norm {
        c.norm = match n.as_str() {
            "instance" => NormKind::Instance,
            "group" => NormKind::Group,
            other => {
                return Err(Error::Config {
                    reason: format!("[model] norm must be instance or group, not {other:?}"),
                })
            }
        };
    }
    c.validate()?;
    Ok(c)
}

/// Logs to the run's `train.log` and to the terminal (above the bars, or plain when quiet).
struct RunLog {
    file: std::fs::File,
    bars: MultiProgress,
    quiet: bool,
}

impl RunLog {
    fn line(&mut self, text: &str) {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let _ = writeln!(self.file, "[{secs}] {text}");
        let _ = self.file.flush();
        // Hidden bars (--quiet, or stderr not a terminal) would swallow println.
        if self.quiet || self.bars.is_hidden() {
            eprintln!("{text}");
        } else {
            let _ = self.bars.println(text);
        }
    }
}

/// Trains the model `config` describes; see [`TrainOptions`].
pub fn train(mut config: RunConfig, options: &TrainOptions) -> Result<TrainOutcome> {
    let run_dir = config.output.dir.clone();
    let ckpt_dir = run_dir.join(CHECKPOINTS);
    let previous = checkpoint::resolve(&ckpt_dir, "last");
    if previous.is_some() && !options.resume {
        return Err(Error::Config {
            reason: format!(
                "{} already holds a run; continue it with --resume {} or set [output] dir to a new directory",
                run_dir.display(),
                run_dir.display()
            ),
        });
    }
    std::fs::create_dir_all(&ckpt_dir).map_err(|e| Error::io(&ckpt_dir, e))?;
    let log_path = run_dir.join(LOG_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| Error::io(&log_path, e))?;
    let bars = MultiProgress::with_draw_target(if options.quiet {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    });
    let mut log = RunLog {
        file,
        bars: bars.clone(),
        quiet: options.quiet,
    };

    // Data: checks every case, fills in what the config left to the dataset.
    let prep = bars.add(ProgressBar::new(0));
    prep.set_style(bar_style("{msg:18} [{bar:30}] {pos}/{len} cases {elapsed}"));
    let data = dataset::build(&mut config, &prep)?;
    let metric_class = metric_class(&config.validate.metric, &config.data.labels[1..])?;
    prep.finish_and_clear();
    let run_config = config.to_toml()?;
    crate::io::nifti::write_atomically(&run_dir.join(RUN_CONFIG), run_config.as_bytes())?;
    let split_json = serde_json::to_vec_pretty(&data.split).map_err(|e| Error::Write {
        path: run_dir.join(SPLIT_JSON),
        reason: e.to_string(),
    })?;
    crate::io::nifti::write_atomically(&run_dir.join(SPLIT_JSON), &split_json)?;
    let classes: Vec<String> = config.data.labels[1..].to_vec();
    log.line(&format!(
        "data: {} training, {} validation, {} test cases; spacing {:?} mm; patch {:?}",
        data.train.len(),
        data.validation.len(),
        data.split.test.len(),
        config.preprocess.spacing,
        config.sampling.patch_size
    ));

    // Model and optimizer, seeded; restored from the last checkpoint when resuming.
    let t = config.train.clone();
    let device = crate::model::device(&t.device)?;
    let ad = device.clone().autodiff();
    ad.seed(t.seed);
    let model_config = model_config(&config)?;
    let mut model = model_config.init(&ad)?;
    let mut adamw = AdamWConfig::new().with_weight_decay(t.weight_decay as f32);
    if t.grad_clip > 0.0 {
        adamw = adamw.with_grad_clipping(Some(
            burn::optim::grad_clipping::GradientClippingConfig::Norm(t.grad_clip as f32),
        ));
    }
    let mut optimizer = adamw.init();
    let mut state = TrainState {
        seed: t.seed,
        ..TrainState::default()
    };
    if let Some(ckpt) = previous.filter(|_| options.resume) {
        state = checkpoint::load_state(&ckpt)?;
        if state.seed != t.seed {
            return Err(Error::Checkpoint {
                path: ckpt.clone(),
                reason: format!(
                    "was trained with seed {}, the config says {}",
                    state.seed, t.seed
                ),
            });
        }
        let weights = ckpt.join("weights.bpk");
        model = model
            .try_load_file(&weights)
            .map_err(|e| Error::Checkpoint {
                path: weights.clone(),
                reason: e.to_string(),
            })?;
        optimizer = checkpoint::load_optimizer(&ckpt, optimizer)?;
        log.line(&format!(
            "resumed from {} after epoch {}",
            ckpt.display(),
            state.epoch
        ));
    }
    let resumed_at = state.epoch;
    write_reports(&run_dir, &state, &classes)?;

    let sampler = PatchSampler::new(
        &config.sampling,
        &config.augment,
        config.model.context_slices,
    );
    let train_cases = Arc::new(data.train.clone());
    let plan_for = |epoch| {
        EpochPlan::new(
            train_cases.len(),
            config.sampling.patches_per_volume,
            t.batch_size,
            t.steps_per_epoch,
            t.seed,
            epoch,
        )
    };
    let steps = plan_for(0).steps;
    let total_steps = steps * t.epochs;
    let window = SlidingWindow {
        window: sampler.size,
        overlap: config.validate.overlap,
        batch_size: config.validate.batch_size,
        mirror: false,
        context: config.model.context_slices,
    };
    let ds_weights = deep_supervision_weights(
        &t.deep_supervision_weights,
        model_config.deep_supervision,
        model_config.stem_widths.len(),
    );

    let epoch_bar = bars.add(ProgressBar::new(t.epochs as u64));
    epoch_bar.set_style(bar_style("epoch {pos}/{len} [{bar:30}] {msg} eta {eta}"));
    epoch_bar.set_position(state.epoch as u64);
    let step_bar = bars.add(ProgressBar::new(steps as u64));
    step_bar.set_style(bar_style(
        "step  {pos}/{len} [{bar:30}] {msg} {per_sec} eta {eta}",
    ));

    while state.epoch < t.epochs && !state.stopped_early {
        let epoch = state.epoch;
        let started = Instant::now();
        // Dropout and any other device randomness: a function of seed and epoch.
        ad.seed(batch_seed(t.seed, epoch, usize::MAX - 1));
        let mut loader = Loader::spawn(
            train_cases.clone(),
            sampler.clone(),
            plan_for(epoch),
            t.seed,
            epoch,
            config.data.workers,
            config.data.prefetch,
        );
        step_bar.reset();
        step_bar.set_length(steps as u64);
        let mut loss_sum = 0.0;
        let mut lr = 0.0;
        let mut done = 0;
        for batch in loader.by_ref() {
            lr = learning_rate(
                &t.schedule,
                t.lr,
                state.global_step,
                total_steps,
                t.warmup_steps,
                t.poly_exponent,
            );
            let loss = step_loss(&model, batch, &ad, &ds_weights, t.dice_weight, t.ce_weight);
            let value: f64 = loss
                .clone()
                .try_to_vec_as::<f32>()
                .map_err(|e| Error::Config {
                    reason: format!("reading the loss: {e:?}"),
                })?[0] as f64;
            if !value.is_finite() {
                return Err(Error::Config {
                    reason: format!(
                        "the loss became {value} at epoch {} step {}; lower [train] lr (now {})",
                        epoch + 1,
                        done + 1,
                        t.lr
                    ),
                });
            }
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optimizer.step(lr, model, grads);
            state.global_step += 1;
            done += 1;
            loss_sum += value;
            step_bar.set_message(format!("loss {:.4}", loss_sum / done as f64));
            step_bar.inc(1);
        }
        let wait = loader.wait_seconds;
        drop(loader);
        let train_seconds = started.elapsed().as_secs_f64();

        let validate_now = config.validate.every > 0
            && !data.validation.is_empty()
            && ((epoch + 1) % config.validate.every == 0 || epoch + 1 == t.epochs);
        let validation_dice = if validate_now {
            step_bar.set_message("validating");
            validation_dice(
                &model.valid(),
                &data.validation,
                &window,
                &device,
                classes.len(),
            )?
        } else {
            Vec::new()
        };
        let record = EpochRecord {
            epoch: epoch + 1,
            train_loss: loss_sum / done.max(1) as f64,
            learning_rate: lr,
            validation_dice,
            seconds: started.elapsed().as_secs_f64(),
            data_wait_seconds: wait,
            patches_per_second: (done * t.batch_size) as f64 / train_seconds.max(1e-9),
        };
        state.epoch = epoch + 1;
        let metric = selection_metric(metric_class, &record);
        let mut improved = false;
        if let Some(m) = metric {
            if state.best_metric.is_none_or(|b| m > b) {
                state.best_metric = Some(m);
                state.best_epoch = Some(epoch + 1);
                state.validations_without_improvement = 0;
                improved = true;
            } else {
                state.validations_without_improvement += 1;
                if config.validate.patience > 0
                    && state.validations_without_improvement >= config.validate.patience
                {
                    state.stopped_early = true;
                }
            }
        } else if data.validation.is_empty() || config.validate.every == 0 {
            // Nothing to select on: the newest model is the best one.
            state.best_epoch = Some(epoch + 1);
            improved = true;
        }
        let line = format!(
            "epoch {}/{}: loss {:.4}, lr {:.2e}, {:.1} s ({:.2} patches/s, {:.0}% waiting for data){}{}",
            epoch + 1,
            t.epochs,
            record.train_loss,
            lr,
            record.seconds,
            record.patches_per_second,
            100.0 * wait / train_seconds.max(1e-9),
            record
                .mean_dice()
                .map(|d| format!(", validation Dice {d:.4}"))
                .unwrap_or_default(),
            if improved && metric.is_some() { " (best)" } else { "" }
        );
        state.history.push(record);
        if improved {
            checkpoint::save(
                &ckpt_dir,
                "best",
                &model_config,
                &model,
                &optimizer,
                &state,
                &run_config,
            )?;
        }
        checkpoint::save(
            &ckpt_dir,
            "last",
            &model_config,
            &model,
            &optimizer,
            &state,
            &run_config,
        )?;
        write_reports(&run_dir, &state, &classes)?;
        log.line(&line);
        epoch_bar.set_position(state.epoch as u64);
        if let Some(d) = state.history.last().and_then(EpochRecord::mean_dice) {
            epoch_bar.set_message(format!("Dice {d:.3}"));
        }
        if state.stopped_early {
            log.line(&format!(
                "stopping early: no improvement in {} validations (best {:.4} at epoch {})",
                state.validations_without_improvement,
                state.best_metric.unwrap_or(0.0),
                state.best_epoch.unwrap_or(0)
            ));
        }
    }
    step_bar.finish_and_clear();
    epoch_bar.finish_and_clear();
    log.line(&format!(
        "done: {} epochs; best checkpoint {} (epoch {})",
        state.epoch,
        ckpt_dir.join("best").display(),
        state.best_epoch.unwrap_or(state.epoch)
    ));
    Ok(TrainOutcome {
        run_dir,
        state,
        resumed_at,
    })
}

fn bar_style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

fn write_reports(run_dir: &Path, state: &TrainState, classes: &[String]) -> Result<()> {
    write_metrics_csv(&run_dir.join(METRICS_CSV), &state.history, classes)?;
    if !state.history.is_empty() {
        plot_training_curve(&run_dir.join(CURVE_PNG), &state.history, classes)?;
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
    dice_weight: f64,
    ce_weight: f64,
) -> Tensor<1> {
    let x = Tensor::<5>::from_data(TensorData::new(batch.image, batch.image_shape), device);
    let out = model.forward(x);
    let target = |shape: [usize; 4]| {
        let labels = downsample_labels(&batch.label, batch.label_shape, shape);
        Tensor::<4, Int>::from_data(TensorData::new(labels, shape), device)
    };
    let mut loss = dice_ce_loss(
        out.logits,
        target(batch.label_shape),
        dice_weight,
        ce_weight,
    ) * weights[0];
    for (logits, w) in out.deep.into_iter().zip(weights.iter().skip(1)) {
        let [b, _, d, h, wd] = logits.dims();
        loss = loss + dice_ce_loss(logits, target([b, d, h, wd]), dice_weight, ce_weight) * *w;
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
        let (k, nd, nh, nw) = probs.dim();
        for z in 0..nd {
            for y in 0..nh {
                for x in 0..nw {
                    let mut best = (0usize, f32::NEG_INFINITY);
                    for c in 0..k {
                        let p = probs[[c, z, y, x]];
                        if p > best.1 {
                            best = (c, p);
                        }
                    }
                    let (pred, truth) = (best.0, case.label[[z, y, x]] as usize);
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
fn metric_class(metric: &str, classes: &[String]) -> Result<Option<usize>> {
    if metric == "mean_dice" {
        return Ok(None);
    }
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
}
