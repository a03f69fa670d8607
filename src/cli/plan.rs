//! `medseg plan --data DATASET_DIR_OR_CSV [--budget 2h] [--device cpu] [--folds 5]
//! [--max-memory SIZE] [--set data.key=value] [--explain] --output plan.toml`

use std::path::PathBuf;

use anyhow::Context;

use medseg::config::{DataFormat, RunConfig};
use medseg::data::fingerprint::{fingerprint, Fingerprint};
use medseg::data::plan::{plan, to_commented_toml, Candidate, Plan, PlanRequest, StepCost};
use medseg::io::write_atomically;
use medseg::train::trainer::measure_step;

use super::progress;

#[derive(clap::Args)]
pub struct Args {
    /// A dataset: a directory with `dataset.json` (Decathlon / nnU-Net) or a CSV manifest
    /// (`case,image[,image2...],label`, optionally a `group` column).
    #[arg(long)]
    data: PathBuf,
    /// Time of one training, e.g. `2h`, `45m`, `1h30m`, `900s`: a single run, or each fold
    /// (nnU-Net plans one training; `--folds K` repeats it K times).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    budget: f64,
    /// The device the plan is measured on and trains on: cpu, wgpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Cross-validation folds planned for (nnU-Net: 5), each trained within the budget: of whole
    /// groups when each fold still trains on two or more, else of single cases.
    #[arg(long, default_value_t = 5)]
    folds: usize,
    /// Memory a training step may hold, e.g. `8GiB`; default: half of this machine's memory.
    #[arg(long, value_name = "SIZE")]
    max_memory: Option<bytesize::ByteSize>,
    /// Settings the plan starts from, e.g. `--set data.label_values=[0,5]` (dataset settings
    /// beside `--data`) or `--set model.kernels="burn"`; what the plan decides overrides them.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// Print the fingerprint and every decision with its reason.
    #[arg(long)]
    explain: bool,
    /// Where the plan (a commented run config) is written.
    #[arg(long)]
    output: PathBuf,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// `2h`, `45m`, `1h30m`, `90s` or plain seconds.
fn parse_duration(text: &str) -> Result<f64, String> {
    let mut total = 0.0;
    let mut number = String::new();
    for c in text.trim().chars() {
        match c {
            '0'..='9' | '.' => number.push(c),
            'h' | 'm' | 's' => {
                let v: f64 = number
                    .parse()
                    .map_err(|_| format!("{text:?}: a number must come before {c}"))?;
                total += v * match c {
                    'h' => 3600.0,
                    'm' => 60.0,
                    _ => 1.0,
                };
                number.clear();
            }
            _ => {
                return Err(format!(
                    "{text:?}: write a duration such as 2h, 45m, 1h30m or 900s"
                ))
            }
        }
    }
    if !number.is_empty() {
        total += number
            .parse::<f64>()
            .map_err(|_| format!("{text:?} is not a duration"))?;
    }
    if total > 0.0 {
        Ok(total)
    } else {
        Err(format!("{text:?}: the budget must be positive"))
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut set = args.set.clone();
    set.push(format!("train.device={:?}", args.device));
    let mut base = RunConfig::load(None, &set)?;
    let csv = args.data.is_file();
    base.data.format = if csv {
        DataFormat::Csv
    } else {
        DataFormat::Decathlon
    };
    if csv {
        base.data.root = args.data.parent().map(PathBuf::from).unwrap_or_default();
        base.data.manifest = args.data.file_name().map(PathBuf::from).unwrap_or_default();
    } else {
        base.data.root = args.data.clone();
    }
    let bars = progress::multi(args.quiet);
    let bar = bars.add(progress::bar(
        0,
        "fingerprint [{bar:30}] {pos}/{len} {elapsed}",
        args.quiet,
    ));
    let fp = fingerprint(&base.data, &|done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })
    .with_context(|| format!("fingerprinting {} failed", args.data.display()))?;
    bar.finish_and_clear();
    let folds = fold_count(&base, args.folds)?;
    let request = PlanRequest {
        budget_seconds: args.budget,
        folds,
        max_memory: args.max_memory.map_or_else(half_of_memory, |b| b.as_u64()),
    };
    let mut measured = Vec::new();
    let plan = plan(&fp, base.clone(), &request, &mut |c| {
        let cost = measure(&base, &fp, c)?;
        let line = format!(
            "measured {} {:?} x{}: {:.3} s per step, {} MiB",
            c.preset.name(),
            c.patch,
            c.batch,
            cost.seconds,
            cost.peak_bytes >> 20
        );
        if !args.quiet {
            eprintln!("{line}");
        }
        measured.push(line);
        Ok(cost)
    })?;
    let mut plan = plan;
    plan.config.train.device = base.train.device;
    plan.config.output.dir =
        PathBuf::from("runs").join(format!("{}-plan", dataset_name(&args.data)));
    let header = header(&fp, &args, &request, &measured);
    write_atomically(&args.output, to_commented_toml(&plan, &header)?.as_bytes())?;
    if args.explain {
        explain(&fp, &plan);
    }
    println!(
        "plan written to {}: {} {} model, patch {}, {} epochs of {} steps; train it with `medseg train --config {} --folds {}` (about {:.0} s per fold; then the postprocessing search)",
        args.output.display(),
        if plan.config.is_3d() { "3D" } else { "2.5D" },
        plan.config.model.preset.name(),
        plan.config.sampling.patch_size,
        plan.config.train.epochs,
        plan.config.train.steps_per_epoch,
        args.output.display(),
        request.folds.count,
        request.budget_seconds
    );
    Ok(())
}

/// Folds as asked (no more than the cases), of whole groups or of single cases
/// ([`medseg::data::plan::fold_scheme`]).
fn fold_count(base: &RunConfig, asked: usize) -> anyhow::Result<medseg::data::plan::FoldScheme> {
    let (_, m) = medseg::data::fingerprint::read_manifest(&base.data)?;
    let groups: std::collections::BTreeSet<String> = m
        .cases
        .iter()
        .map(|c| c.group.clone().unwrap_or_else(|| c.id.clone()))
        .collect();
    if asked == 0 {
        super::usage!("--folds must be at least 1");
    }
    let scheme = medseg::data::plan::fold_scheme(asked, groups.len(), m.cases.len());
    if scheme.by == medseg::config::FoldBy::Case {
        eprintln!("note: {}", scheme.why);
    }
    Ok(scheme)
}

/// The step of candidate `c` on the plan's device, the median of five steps after a warm-up.
fn measure(base: &RunConfig, fp: &Fingerprint, c: &Candidate) -> medseg::Result<StepCost> {
    let mut config = base.clone();
    config.data.channels = fp.channels.iter().map(|c| c.name.clone()).collect();
    config.data.labels = std::iter::once("background".to_string())
        .chain(fp.classes.iter().map(|c| c.name.clone()))
        .collect();
    config.model.preset = c.preset;
    config.model.context_slices = c.context_slices;
    config.model.deep_supervision = Some(true);
    config.train.batch_size = c.batch;
    config.sampling.patch_size =
        medseg::geometry::PatchSize::new(&c.patch).ok_or_else(|| medseg::Error::Config {
            reason: format!("plan: {:?} is not a patch size", c.patch),
        })?;
    measure_step(&config, 5, crate::ALLOCATOR)
}

fn half_of_memory() -> u64 {
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| {
        t.lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
    });
    total.map_or(8 << 30, |kib| kib * 1024 / 2)
}

fn dataset_name(data: &std::path::Path) -> String {
    let path = if data.is_file() {
        data.with_extension("")
    } else {
        data.to_path_buf()
    };
    medseg::io::layout::sanitize_name(
        &path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "dataset".into()),
    )
}

/// The plan file's opening comment.
fn header(
    fp: &Fingerprint,
    args: &Args,
    request: &PlanRequest,
    measured: &[String],
) -> Vec<String> {
    let mut h = vec![
        format!(
            "medseg plan for {} ({} labelled cases), budget {:.0} s per training on {}, {} fold(s)",
            args.data.display(),
            fp.cases.len(),
            request.budget_seconds,
            args.device,
            request.folds.count
        ),
        format!(
            "  medseg train --config {} --folds {}",
            args.output.display(),
            request.folds.count
        ),
        "Step times measured on this device:".into(),
    ];
    h.extend(measured.iter().map(|m| format!("  {m}")));
    h
}

/// `--explain`: the fingerprint, then one row per decision.
fn explain(fp: &Fingerprint, plan: &Plan) {
    println!("fingerprint: {} cases", fp.cases.len());
    // Every case when there are few, else the spread.
    if fp.cases.len() <= 20 {
        for c in &fp.cases {
            println!(
                "  case {:<24} spacing {:?} mm, grid {:?}, labelled {:.0} mm³",
                c.id, c.spacing, c.shape, c.foreground_mm3
            );
        }
    } else {
        for (a, axis) in ["x", "y", "z"].iter().enumerate() {
            let mut s: Vec<f64> = fp.cases.iter().map(|c| c.spacing[a]).collect();
            let mut n: Vec<f64> = fp.cases.iter().map(|c| c.shape[a] as f64).collect();
            s.sort_by(f64::total_cmp);
            n.sort_by(f64::total_cmp);
            println!(
                "  {axis}: spacing {:.3} / {:.3} / {:.3} mm (min / median / max), {:.0} / {:.0} / {:.0} voxels",
                s[0], s[s.len() / 2], s[s.len() - 1], n[0], n[n.len() / 2], n[n.len() - 1]
            );
        }
    }
    for ch in &fp.channels {
        let f = &ch.foreground;
        println!(
            "  channel {} ({:?}): under the labels p0.5 {:.1}, median {:.1}, p99.5 {:.1}, mean {:.1}, std {:.1}",
            ch.name, ch.modality, f.p00_5, f.p50, f.p99_5, f.mean, f.std
        );
    }
    for c in &fp.classes {
        println!(
            "  class {}: in {} cases, {:.1} components per case (median), largest piece {:.0}% of the class (median), component volume p5/p50/p95 {:.0}/{:.0}/{:.0} mm³, diameter p5/p50/p95 {:.1}/{:.1}/{:.1} mm",
            c.name, c.cases, c.components_per_case.p50, c.largest_share.p50 * 100.0, c.component_mm3.p05, c.component_mm3.p50, c.component_mm3.p95,
            c.component_diameter_mm.p05, c.component_diameter_mm.p50, c.component_diameter_mm.p95
        );
    }
    println!("\n{:<30} {:<28} why", "setting", "value");
    for d in &plan.decisions {
        println!("{:<30} {:<28} {}", d.setting, d.value, d.why);
    }
}
