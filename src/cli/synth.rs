//! `medseg synth --config FILE --output DIR`

use std::path::PathBuf;

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
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let config = SynthConfig::from_file(&args.config)?;
    let bar = ProgressBar::new((config.hosts.len() * config.cases_per_host) as u64);
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
