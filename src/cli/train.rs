//! `medseg train --config FILE [--set section.key=value ...] [--resume RUN_DIR] [--folds K [--fold 0,2]]
//! [--init-from CHECKPOINT] [--dump-config] [--quiet]`

use std::path::PathBuf;

use anyhow::Context;

use medseg::config::RunConfig;
use medseg::eval::search::{Objective, Postprocessing};
use medseg::export::cv::{choose_postprocessing, segment_out_of_fold};
use medseg::io::layout::{CheckpointKind, CvRun, RunDir, RUN_CONFIG_FILE};
use medseg::io::write_atomically;
use medseg::train::trainer::{TrainEvent, TrainOutcome};
use medseg::train::{train, TrainOptions};

use super::progress;

#[derive(clap::Args)]
pub struct Args {
    /// Run config (TOML); see configs/ for documented examples. Not needed with --resume.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override one setting, e.g. `--set train.epochs=5 --set sampling.patch_size=[96,96]`.
    /// Applied after the file; repeatable.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// Continue the run in RUN_DIR from its last checkpoint, with the config saved there
    /// (plus any --set).
    #[arg(long, value_name = "RUN_DIR")]
    resume: Option<PathBuf>,
    /// Cross-validation: train K folds (`data.folds = K`, groups kept whole), each in
    /// OUTPUT/fold_K, segment each fold's validation cases into OUTPUT/oof, and once every fold
    /// is trained choose the postprocessing on them (OUTPUT/postprocessing.json). Finished folds
    /// are skipped and an interrupted one resumes. `segment --model OUTPUT` ensembles the folds.
    #[arg(long, value_name = "K")]
    folds: Option<usize>,
    /// With --folds: train only these folds (comma-separated, 0-based).
    #[arg(long, value_delimiter = ',', requires = "folds")]
    fold: Vec<usize>,
    /// Fine-tune: start from this checkpoint's (or run directory's best) weights wherever a
    /// parameter's name and shape match; the rest (e.g. the class head when the classes differ)
    /// are initialised afresh. Its preprocessing is used where the config gives none. See
    /// `train.freeze_encoder_epochs` and `train.encoder_lr_scale`.
    #[arg(long, value_name = "CHECKPOINT")]
    init_from: Option<PathBuf>,
    /// Print the effective config (defaults ← file ← --set) as TOML and exit.
    #[arg(long)]
    dump_config: bool,
    /// No progress bars; one line per epoch (for CI logs).
    #[arg(long)]
    quiet: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let config = match (&args.resume, &args.config) {
        (Some(dir), _) => {
            let saved = RunDir::new(dir).config();
            if !saved.is_file() {
                anyhow::bail!(
                    "{}: no {} here; is this a run directory written by `medseg train`?",
                    dir.display(),
                    RUN_CONFIG_FILE
                );
            }
            let mut set = args.set.clone();
            // The run lives where it was found, even if it was moved.
            set.push(format!("output.dir={:?}", dir.display().to_string()));
            RunConfig::load(Some(&saved), &set)?
        }
        (None, Some(file)) => RunConfig::load(Some(file), &args.set)?,
        (None, None) if args.dump_config => RunConfig::load(None, &args.set)?,
        (None, None) => super::usage!("give --config FILE (or --resume RUN_DIR)"),
    };
    if args.dump_config {
        print!("{}", config.to_toml()?);
        return Ok(());
    }
    // A cross-validation parent resumes as one.
    let cv_parent = args
        .resume
        .as_ref()
        .is_some_and(|d| CvRun::new(d).is_parent());
    if let Some(k) = args.folds.or(cv_parent.then_some(config.data.folds)) {
        return cross_validate(config, k, &args);
    }
    let bars = TrainBars::new(config.train.epochs, args.quiet);
    let outcome = train(
        config,
        &TrainOptions {
            resume: args.resume.is_some(),
            init_from: args.init_from.clone(),
        },
        &mut |event| bars.draw(event),
    )
    .context("training failed")?;
    bars.finish();
    say_outcome(&outcome);
    Ok(())
}

fn say_outcome(outcome: &TrainOutcome) {
    let s = &outcome.state;
    println!(
        "trained {} epochs{}; best {} at epoch {}; run directory {}",
        s.epoch,
        if outcome.resumed_at > 0 {
            format!(" (resumed after epoch {})", outcome.resumed_at)
        } else {
            String::new()
        },
        s.best_metric
            .map(|m| format!("validation metric {m:.4}"))
            .unwrap_or_else(|| "checkpoint".into()),
        s.best_epoch.unwrap_or(s.epoch),
        outcome.run_dir.display()
    );
}

/// `--folds K`: each asked-for fold trained (or resumed) and its out-of-fold cases segmented;
/// the first fold trained fixes the preprocessing that later folds and the ensemble share.
fn cross_validate(config: RunConfig, k: usize, args: &Args) -> anyhow::Result<()> {
    if k < 2 {
        super::usage!("--folds needs at least 2 folds, not {k}");
    }
    if let Some(f) = args.fold.iter().find(|f| **f >= k) {
        super::usage!("--fold {f}: folds are numbered 0 to {}", k - 1);
    }
    let cv = CvRun::new(&config.output.dir);
    let mut shared = shared_config(&cv, config, k, &args.set)?;
    let folds: Vec<usize> = if args.fold.is_empty() {
        (0..k).collect()
    } else {
        args.fold.clone()
    };
    for fold in folds {
        let run = cv.fold(fold);
        let mut config = shared.clone();
        config.data.fold = fold;
        config.output.dir = run.root.clone();
        eprintln!("== fold {fold} of 0..{k}: {}", run.root.display());
        let bars = TrainBars::new(config.train.epochs, args.quiet);
        let options = TrainOptions {
            resume: run.resolve(CheckpointKind::Last).is_some(),
            init_from: args.init_from.clone(),
        };
        let outcome = train(config, &options, &mut |event| bars.draw(event))
            .with_context(|| format!("training fold {fold} failed"))?;
        bars.finish();
        say_outcome(&outcome);
        let trained = RunConfig::load(Some(&run.config()), &[])?;
        if trained.preprocess != shared.preprocess || trained.data.labels != shared.data.labels {
            shared.preprocess = trained.preprocess;
            shared.data.channels = trained.data.channels;
            shared.data.labels = trained.data.labels;
            write_atomically(&cv.config(), shared.to_toml()?.as_bytes())?;
        }
        let summary = segment_out_of_fold(&cv, fold, &mut |_| {})
            .with_context(|| format!("segmenting fold {fold}'s validation cases failed"))?;
        println!(
            "fold {fold}: {} out-of-fold case(s) segmented, {} already done, {} failed — {}",
            summary.segmented,
            summary.skipped,
            summary.failed,
            cv.oof().display()
        );
    }
    let trained = cv.trained_folds().len();
    if trained < k {
        println!("{trained} of {k} folds trained; the postprocessing is chosen once all are");
        return Ok(());
    }
    let chosen = choose_postprocessing(&cv).context("choosing the postprocessing failed")?;
    say_postprocessing(&chosen, &cv);
    Ok(())
}

/// The parent's config: the saved one when the run exists (a K-fold run stays K-fold), else the
/// given one with `data.folds = K`, written.
fn shared_config(
    cv: &CvRun,
    config: RunConfig,
    k: usize,
    set: &[String],
) -> anyhow::Result<RunConfig> {
    if cv.config().is_file() {
        let mut set = set.to_vec();
        set.push(format!("output.dir={:?}", cv.root.display().to_string()));
        let saved = RunConfig::load(Some(&cv.config()), &set)?;
        if saved.data.folds != k {
            super::usage!(
                "{} is a {}-fold run; give --folds {} or another [output] dir",
                cv.root.display(),
                saved.data.folds,
                saved.data.folds
            );
        }
        return Ok(saved);
    }
    let mut config = config;
    config.data.folds = k;
    if !config.data.validation_cases.is_empty() {
        eprintln!(
            "warning: [data] validation_cases {:?} are not used with --folds: every fold validates on its own share",
            config.data.validation_cases
        );
        config.data.validation_cases.clear();
    }
    std::fs::create_dir_all(&cv.root)
        .with_context(|| format!("cannot create {}", cv.root.display()))?;
    write_atomically(&cv.config(), config.to_toml()?.as_bytes())?;
    Ok(config)
}

/// The chosen postprocessing, class by class, with the cross-validated scores.
fn say_postprocessing(p: &Postprocessing, cv: &CvRun) {
    println!(
        "postprocessing chosen on {} out-of-fold cases ({} settings tried): threshold {} -> {}, min_lesion_mm3 {} -> {}, min_confidence {} -> {}, keep_largest {:?} -> {:?}",
        p.cases,
        p.candidates,
        p.before.threshold,
        p.chosen.threshold,
        p.before.min_lesion_mm3,
        p.chosen.min_lesion_mm3,
        p.before.min_confidence,
        p.chosen.min_confidence,
        p.before.keep_largest,
        p.chosen.keep_largest
    );
    if p.best != p.chosen {
        println!(
            "  the best on these cases, min_lesion_mm3 {} at threshold {} (score {:.4} against {:.4}), leads by less than its noise ({:.4}): the setting nearer the start is kept, or one of clearly higher lesion Dice",
            p.best.min_lesion_mm3, p.best.threshold, p.best_score, p.score, p.noise
        );
    }
    for c in &p.classes {
        let what = match c.objective {
            Objective::LesionF1 => "lesion F1",
            Objective::Dice => "Dice",
        };
        let dice = match (c.objective, c.dice_before, c.dice_chosen) {
            (Objective::LesionF1, Some(b), Some(a)) => format!(", Dice {b:.4} -> {a:.4}"),
            _ => String::new(),
        };
        println!(
            "  {}: cross-validated {what} {:.4} -> {:.4}{dice}",
            c.class, c.before, c.chosen
        );
    }
    println!(
        "stored in {} [segment]; details in {}",
        cv.config().display(),
        cv.postprocessing().display()
    );
}

/// Case preparation, epochs and steps, drawn from the trainer's events.
struct TrainBars {
    bars: indicatif::MultiProgress,
    prep: indicatif::ProgressBar,
    epoch: indicatif::ProgressBar,
    step: indicatif::ProgressBar,
}

impl TrainBars {
    fn new(epochs: usize, quiet: bool) -> Self {
        let bars = progress::multi(quiet);
        let add = |len, template| bars.add(progress::bar(len, template, quiet));
        TrainBars {
            prep: add(0, "preparing cases [{bar:30}] {pos}/{len} {elapsed}"),
            epoch: add(
                epochs as u64,
                "epoch {pos}/{len} [{bar:30}] {msg} eta {eta}",
            ),
            step: add(0, "step  {pos}/{len} [{bar:30}] {msg} {per_sec} eta {eta}"),
            bars,
        }
    }

    fn draw(&self, event: TrainEvent) {
        match event {
            TrainEvent::Preparing { done, total } => {
                self.prep.set_length(total as u64);
                self.prep.set_position(done as u64);
            }
            TrainEvent::Log(line) => progress::say(&self.bars, &line),
            TrainEvent::EpochStarted { epoch, steps, .. } => {
                self.prep.finish_and_clear();
                self.epoch.set_position(epoch as u64);
                self.step.reset();
                self.step.set_length(steps as u64);
            }
            TrainEvent::Step { mean_loss } => {
                self.step.set_message(format!("loss {mean_loss:.4}"));
                self.step.inc(1);
            }
            TrainEvent::Validating => self.step.set_message("validating"),
            TrainEvent::EpochFinished {
                epochs_done,
                mean_dice,
            } => {
                self.epoch.set_position(epochs_done as u64);
                if let Some(d) = mean_dice {
                    self.epoch.set_message(format!("Dice {d:.3}"));
                }
            }
        }
    }

    fn finish(&self) {
        for bar in [&self.prep, &self.step, &self.epoch] {
            bar.finish_and_clear();
        }
    }
}
