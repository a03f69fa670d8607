//! `medseg synth --config FILE --output DIR`

use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use medseg::synth::dataset::{build_dataset, SynthConfig};

#[derive(clap::Args)]
pub struct Args {
    /// A TOML file with a `[synth]` table (see configs/synth-lung-ct.toml).
    #[arg(long)]
    config: PathBuf,
    /// Where the Decathlon-layout dataset goes (dataset.json, imagesTr/, labelsTr/, imagesTs/,
    /// labelsTs/, lesions.json).
    #[arg(long)]
    output: PathBuf,
    /// Rebuild even when DIR already holds the dataset of this exact config.
    #[arg(long)]
    force: bool,
}

/// The config a finished dataset was built from, written last: its presence marks it complete.
const STAMP: &str = "synth.toml";

pub fn run(args: Args) -> anyhow::Result<()> {
    let config = SynthConfig::from_file(&args.config)?;
    let stamp = args.output.join(STAMP);
    let wanted = config.to_toml()?;
    if !args.force && std::fs::read_to_string(&stamp).is_ok_and(|done| done == wanted) {
        println!(
            "synth: {} already holds the dataset of this config (--force rebuilds it)",
            args.output.display()
        );
        return Ok(());
    }
    // A rebuild invalidates the stamp first, so an interrupted one is never taken as done.
    if stamp.exists() {
        std::fs::remove_file(&stamp).with_context(|| stamp.display().to_string())?;
    }
    let bar = ProgressBar::new(config.total_cases() as u64);
    bar.set_style(
        ProgressStyle::with_template("synth [{bar:30}] {pos}/{len} {msg} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let summary = build_dataset(&config, &args.output, &|case| {
        bar.set_message(case.to_string());
        bar.inc(1);
    })?;
    bar.finish_and_clear();
    medseg::io::nifti::write_atomically(&stamp, wanted.as_bytes())?;
    println!(
        "synth: {} training and {} test cases, {} lesions, {} lesion-free controls — {}",
        summary.train_cases,
        summary.test_cases,
        summary.lesions,
        summary.control_cases,
        args.output.display()
    );
    Ok(())
}
