//! `medseg synth --config FILE --output DIR`

use std::path::PathBuf;

use anyhow::Context;
use medseg::config::load_layered;
use medseg::synth::dataset::{build_dataset, SynthFile};

use super::progress;

#[derive(clap::Args)]
pub struct Args {
    /// A TOML file with a `[synth]` table (see configs/synth-lung-ct.toml).
    #[arg(long, required_unless_present = "dump_config")]
    config: Option<PathBuf>,
    /// Override one setting, e.g. `--set synth.seed=7`; repeatable.
    #[arg(long = "set", value_name = "synth.KEY=VALUE")]
    set: Vec<String>,
    /// Print the effective config (defaults ← file ← --set) as TOML and exit.
    #[arg(long)]
    dump_config: bool,
    /// Where the Decathlon-layout dataset goes (dataset.json, imagesTr/, labelsTr/, imagesTs/,
    /// labelsTs/, lesions.json).
    #[arg(long, required_unless_present = "dump_config")]
    output: Option<PathBuf>,
    /// Rebuild even when DIR already holds the dataset of this exact config.
    #[arg(long)]
    force: bool,
}

/// The config a finished dataset was built from, written last: its presence marks it complete.
const STAMP: &str = "synth.toml";

/// The stamp's first line: a dataset built by an earlier recipe is rebuilt, not reused. Recipe 2
/// keeps magnitude MR non-negative, so strong hypo-intense lesions stay dark under Rician noise.
const RECIPE: &str = "# medseg synth recipe 2\n";

pub fn run(args: Args) -> anyhow::Result<()> {
    let file: SynthFile = load_layered(args.config.as_deref(), &args.set)?;
    let config_toml = medseg::config::to_toml(&file)?;
    if args.dump_config {
        print!("{config_toml}");
        return Ok(());
    }
    let wanted = format!("{RECIPE}{config_toml}");
    let Some(output) = args.output else {
        super::usage!("give --output DIR");
    };
    let config = file.synth;
    let stamp = output.join(STAMP);
    if !args.force && std::fs::read_to_string(&stamp).is_ok_and(|done| done == wanted) {
        println!(
            "synth: {} already holds the dataset of this config (--force rebuilds it)",
            output.display()
        );
        return Ok(());
    }
    // A rebuild invalidates the stamp first, so an interrupted one is never taken as done.
    if stamp.exists() {
        std::fs::remove_file(&stamp).with_context(|| stamp.display().to_string())?;
    }
    let bar = progress::bar(
        config.total_cases() as u64,
        "synth [{bar:30}] {pos}/{len} {msg} eta {eta}",
        false,
    );
    let summary = build_dataset(&config, &output, &|case| {
        bar.set_message(case.to_string());
        bar.inc(1);
    })?;
    bar.finish_and_clear();
    medseg::io::write_atomically(&stamp, wanted.as_bytes())?;
    println!(
        "synth: {} training and {} test cases, {} lesions, {} lesion-free controls — {}",
        summary.train_cases,
        summary.test_cases,
        summary.lesions,
        summary.control_cases,
        output.display()
    );
    Ok(())
}
