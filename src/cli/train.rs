//! `medseg train --config FILE [--set section.key=value ...] [--resume RUN_DIR] [--dump-config] [--quiet]`

use std::path::PathBuf;

use anyhow::Context;

use medseg::config::RunConfig;
use medseg::io::layout::{RunDir, RUN_CONFIG_FILE};
use medseg::train::trainer::TrainEvent;
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
    let bars = TrainBars::new(config.train.epochs, args.quiet);
    let outcome = train(
        config,
        &TrainOptions {
            resume: args.resume.is_some(),
        },
        &mut |event| bars.draw(event),
    )
    .context("training failed")?;
    bars.finish();
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
    Ok(())
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
