//! `medseg train --config FILE [--set section.key=value ...] [--resume RUN_DIR] [--dump-config] [--quiet]`

use std::path::PathBuf;

use anyhow::Context;

use medseg::config::RunConfig;
use medseg::train::{train, TrainOptions};

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
            let saved = dir.join(medseg::train::trainer::RUN_CONFIG);
            if !saved.is_file() {
                anyhow::bail!(
                    "{}: no {} here; is this a run directory written by `medseg train`?",
                    dir.display(),
                    medseg::train::trainer::RUN_CONFIG
                );
            }
            let mut set = args.set.clone();
            // The run lives where it was found, even if it was moved.
            set.push(format!("output.dir={:?}", dir.display().to_string()));
            RunConfig::load(Some(&saved), &set)?
        }
        (None, Some(file)) => RunConfig::load(Some(file), &args.set)?,
        (None, None) if args.dump_config => RunConfig::load(None, &args.set)?,
        (None, None) => anyhow::bail!("give --config FILE (or --resume RUN_DIR)"),
    };
    if args.dump_config {
        print!("{}", config.to_toml()?);
        return Ok(());
    }
    let outcome = train(
        config,
        &TrainOptions {
            resume: args.resume.is_some(),
            quiet: args.quiet,
        },
    )
    .context("training failed")?;
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
