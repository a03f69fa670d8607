//! `medseg segment --model RUN_OR_CHECKPOINT INPUT... --output DIR [--tta] [--save-probabilities]
//! [--overlay] [--uncertainty] [--attention] [--review] [--format nifti,dicom-seg,rtstruct] [--reference-series DIR] [--skip-existing]
//! [--shard I/N] [--max-memory SIZE] [--device NAME] [--set segment.key=value] [--list]
//! `medseg segment --merge-summaries DIR``

use std::path::PathBuf;

use std::path::Path;

use medseg::config::MinConfidence;
use medseg::eval::review::segmentation_cases;
use medseg::export::dicom::DicomExport;
use medseg::export::segment_case;
use medseg::infer::batch::{
    expand, merge_summaries, run_batch, select_shard, BatchEvent, BatchInput, BatchOptions, Shard,
};
use medseg::infer::memory::human;
use medseg::infer::predictor::{Predictor, TemperatureSource};
use medseg::io::derived::SourceSeries;
use medseg::io::layout::{BatchCase, BatchSummary, CaseOutputs, CaseStatus, OutputFormat};
use medseg::io::{discover, ScanSource};

use super::{progress, Reported};

#[derive(clap::Args)]
pub struct Args {
    /// A run directory (its best, else last, checkpoint) or a checkpoint directory.
    #[arg(long, required_unless_present = "merge_summaries")]
    model: Option<PathBuf>,
    /// NIfTI files, DICOM files, DICOM series directories, directories searched recursively, or
    /// CSV manifests (`case,image[,image2...]`, paths relative to the manifest).
    #[arg(required_unless_present = "merge_summaries")]
    inputs: Vec<PathBuf>,
    /// Where masks, lesion tables and the batch summary go.
    #[arg(long, required_unless_present = "merge_summaries")]
    output: Option<PathBuf>,
    /// Merge the shard summaries (`batch_summary_shard-I-of-N.json`) of a sharded batch in DIR
    /// into `DIR/batch_summary.json`, then exit: status 1 when a case failed or a shard is missing.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["model", "inputs", "list"])]
    merge_summaries: Option<PathBuf>,
    /// Mirror test-time augmentation over the spatial axes (4 passes in 2D, 8 in 3D).
    #[arg(long)]
    tta: bool,
    /// Also write the foreground probability map (float32) on each scan's grid.
    #[arg(long)]
    save_probabilities: bool,
    /// Also write a PNG montage of the mask on the scan, with a legend of the lesions (most
    /// confident first).
    #[arg(long)]
    overlay: bool,
    /// Also write NAME_uncertainty.nii.gz (entropy of the mean foreground probability, then the
    /// variance across members, float32 on the scan's grid) and per-lesion uncertainty columns.
    /// The members are the mirrored passes, so this turns --tta on.
    #[arg(long)]
    uncertainty: bool,
    /// Also write NAME_attention.nii.gz: the Transformer's attention for the windows that hold
    /// findings (`segment.attention`: `lesion`, the default, or `rollout`), tinted yellow in the
    /// overlay.
    #[arg(long)]
    attention: bool,
    /// Also write a review page, OUTPUT/review/index.html: every segmented case in a browser
    /// viewer (NiiVue) with its mask, maps and lesion table; it opens from the file system. Not
    /// with --shard (the shards share the folder): run one unsharded `--skip-existing --review`
    /// over the same inputs once they are done.
    #[arg(long, conflicts_with = "shard")]
    review: bool,
    /// How the segmentation is written, any of `nifti` (NAME.nii.gz), `dicom-seg` (NAME_seg.dcm, a
    /// DICOM Segmentation) and `rtstruct` (NAME_rtstruct.dcm, an RT Structure Set), comma-separated.
    /// The DICOM objects reference the scan's series; a NIfTI scan gets its label map instead.
    #[arg(long, value_delimiter = ',', default_value = "nifti")]
    format: Vec<OutputFormat>,
    /// A DICOM series on the grid of the NIfTI scans, for their DICOM-SEG/RTSTRUCT outputs.
    #[arg(long, value_name = "DIR")]
    reference_series: Option<std::path::PathBuf>,
    /// Skip cases whose outputs all exist (resume an interrupted batch).
    #[arg(long)]
    skip_existing: bool,
    /// A budget for this process's resident memory, e.g. `6GiB` or `4000MB`: the windows per
    /// forward pass are chosen per case to stay within it (at most `segment.batch_size`), scans
    /// are read one at a time, and a case that cannot fit one window fails before any work,
    /// naming what it needs. Host memory: on a GPU the activations are in device memory.
    #[arg(long, value_name = "SIZE")]
    max_memory: Option<bytesize::ByteSize>,
    /// Stop at the first case that fails (exit status 1) instead of going on.
    #[arg(long)]
    fail_fast: bool,
    /// Do only shard I of N (0-based, I < N): every case belongs to exactly one shard, by a hash of
    /// its output name, so N machines given the same inputs split them with no coordinator.
    /// `auto` (or `auto/N`) reads it from a Slurm, Kubernetes or AWS Batch array job.
    #[arg(long, value_name = "I/N|auto[/N]")]
    shard: Option<Shard>,
    /// With a cross-validation run as --model: ensemble only these folds (comma-separated);
    /// default: every trained fold.
    #[arg(long, value_delimiter = ',', value_name = "K,...")]
    folds: Vec<usize>,
    /// cpu, wgpu or cuda; default: the device the model was trained on.
    #[arg(long)]
    device: Option<String>,
    /// Change an inference setting saved with the model, e.g. `--set segment.min_lesion_mm3=30`.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// Print the cases this invocation (and shard) would segment, then exit.
    #[arg(long)]
    list: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if let Some(dir) = &args.merge_summaries {
        return merge(dir);
    }
    let (Some(model), Some(output)) = (args.model.clone(), args.output.clone()) else {
        super::usage!("--model and --output are needed to segment");
    };
    let cases = expand(&args.inputs);
    let total = cases.len();
    let cases = select_shard(cases, args.shard);
    if args.list {
        for c in &cases {
            println!("{}\t{}", c.name, c.origin);
        }
        return Ok(());
    }
    let viewer = super::find_viewer(args.review)?;
    let mut overrides = args.set.clone();
    if args.tta {
        overrides.push("segment.tta=true".into());
    }
    let predictor = load_predictor(&args, &model, &overrides)?;
    let filter = predictor.lesion_filter()?;
    let dicom = dicom_export(&args, &model, &predictor)?;
    let outputs = |name: &str| {
        CaseOutputs::with_formats(
            &output,
            name,
            args.save_probabilities,
            args.overlay,
            &args.format,
        )
        .with_maps(&output, name, args.uncertainty, args.attention)
    };

    let bars = progress::multi(args.quiet);
    let bar = bars.add(progress::bar(
        0,
        "segment [{bar:30}] {pos}/{len} {msg} eta {eta}",
        args.quiet,
    ));
    let inputs = args.review.then(|| cases.clone());
    let summary = run_batch(
        cases,
        total,
        &output,
        &BatchOptions {
            skip_existing: args.skip_existing,
            fail_fast: args.fail_fast,
            shard: args.shard,
            max_read_bytes: predictor.memory.as_ref().map(|b| b.read_room()),
        },
        &|case| outputs(&case.name).complete(case.is_dicom()),
        &mut |case, scan, stages| {
            segment_case(
                &predictor,
                &filter,
                &outputs(&case.name),
                case,
                &scan,
                &dicom,
                stages,
            )
        },
        &mut |event| match event {
            BatchEvent::Started { todo } => bar.set_length(todo as u64),
            BatchEvent::CaseStarted { name } => bar.set_message(name.to_string()),
            BatchEvent::CaseFinished(c) => {
                progress::say(&bars, &case_line(c));
                bar.inc(1);
            }
        },
    )?;
    bar.finish_and_clear();
    let review = inputs.map(|inputs| Review {
        inputs,
        viewer,
        labels: predictor.labels.clone(),
        max_read_bytes: predictor.memory.as_ref().map(|b| b.read_room()),
        quiet: args.quiet,
    });
    finish(&output, &summary, review)
}

/// What `--review` needs once the batch is done.
struct Review {
    inputs: Vec<BatchInput>,
    viewer: Option<PathBuf>,
    labels: Vec<String>,
    max_read_bytes: Option<u64>,
    quiet: bool,
}

/// Says what the batch did, writes the review page when asked, and lists the failed cases (exit
/// status 1).
fn finish(output: &Path, summary: &BatchSummary, review: Option<Review>) -> anyhow::Result<()> {
    println!(
        "segmented {}, skipped {} (already done), failed {} — outputs in {}",
        summary.segmented,
        summary.skipped,
        summary.failed,
        output.display()
    );
    if let Some(r) = review {
        let cases = segmentation_cases(output, &r.inputs, summary, &r.labels, r.max_read_bytes);
        super::write_review_page(
            &output.join("review"),
            &cases,
            r.viewer,
            "medseg segmentation",
            r.quiet,
        )?;
    }
    if summary.failed == 0 {
        return Ok(());
    }
    for c in summary
        .cases
        .iter()
        .filter(|c| c.status == CaseStatus::Failed)
    {
        eprintln!("failed: {}: {}", c.case, c.reason.as_deref().unwrap_or(""));
    }
    Err(Reported.into())
}

/// The model with the asked-for maps and memory budget; says which temperature it applies.
fn load_predictor(args: &Args, model: &Path, overrides: &[String]) -> anyhow::Result<Predictor> {
    let folds = (!args.folds.is_empty()).then_some(args.folds.as_slice());
    let predictor = with_budget(
        Predictor::load_folds(model, args.device.as_deref(), overrides, folds)?
            .with_maps(args.uncertainty, args.attention),
        args.max_memory,
    )?;
    if !args.quiet {
        if !predictor.member_names.is_empty() {
            eprintln!(
                "ensemble of {} folds ({}): their probabilities are averaged",
                predictor.member_names.len(),
                predictor.member_names.join(", ")
            );
        }
        eprintln!("{}", temperature_line(&predictor.temperature));
        if let Some(line) = confidence_line(&predictor) {
            eprintln!("{line}");
        }
    }
    Ok(predictor)
}

/// Which findings are dropped for their confidence, and why; `None` when none are.
fn confidence_line(predictor: &Predictor) -> Option<String> {
    match (predictor.config.segment.min_confidence, &predictor.operating_point) {
        (MinConfidence::Value(c), _) if c > 0.0 => Some(format!(
            "findings below confidence {c} dropped (segment.min_confidence)"
        )),
        (MinConfidence::Value(_), _) => None,
        (MinConfidence::Named(_), Some(p)) => Some(match (p.without(), p.chosen()) {
            (Some(without), Some(chosen)) => format!(
                "findings below confidence {:.2} dropped (chosen on {} validation cases: lesion F1 {:.3} -> {:.3})",
                p.min_confidence, p.cases, without.f1, chosen.f1
            ),
            _ => format!("findings below confidence {:.2} dropped", p.min_confidence),
        }),
        (MinConfidence::Named(_), None) if !predictor.member_names.is_empty() => Some(
            "no findings dropped for their confidence (segment.min_confidence = \"fitted\": a fold ensemble has no operating point of its own)".into(),
        ),
        (MinConfidence::Named(_), None) => Some(
            "no findings dropped for their confidence (the checkpoint has no operating point: its run had no validation lesions or predates it)".into(),
        ),
    }
}

/// Which temperature the probabilities are divided by, and why.
fn temperature_line(t: &TemperatureSource) -> String {
    match t {
        TemperatureSource::Fitted(c) => format!(
            "temperature {:.3} (fitted on {} validation voxels: ECE {:.4} -> {:.4})",
            c.temperature, c.samples, c.ece_before, c.ece_after
        ),
        TemperatureSource::Given(v) => format!("temperature {v} (segment.temperature)"),
        TemperatureSource::Missing => {
            "temperature 1 (the checkpoint has no fitted temperature: its run had no validation cases or predates calibration)".into()
        }
    }
}

/// `--max-memory`: the forward pass measured on the model, and what it leaves for cases.
fn with_budget(
    predictor: Predictor,
    max_memory: Option<bytesize::ByteSize>,
) -> anyhow::Result<Predictor> {
    let Some(limit) = max_memory else {
        return Ok(predictor);
    };
    let predictor = predictor.with_memory_budget(limit.as_u64(), crate::ALLOCATOR)?;
    if let Some(b) = &predictor.memory {
        eprintln!(
            "memory budget {} ({} usable): {} resident with the model, {} per window of a forward pass",
            human(b.limit),
            human(b.usable()),
            human(b.baseline),
            human(b.cost.per_window)
        );
    }
    Ok(predictor)
}

/// How DICOM objects are described: the model's classes and codes, its run, the reference series.
fn dicom_export(args: &Args, model: &Path, predictor: &Predictor) -> anyhow::Result<DicomExport> {
    let reference = match &args.reference_series {
        Some(dir) => Some(reference_series(dir)?),
        None => None,
    };
    Ok(DicomExport::new(
        &predictor.labels,
        &predictor.config.data.label_codes,
        predictor.config.segment.rtstruct_rois,
        &run_name(model),
        reference,
    ))
}

/// `--merge-summaries DIR`: one summary for a sharded batch, and what is missing from it.
fn merge(dir: &Path) -> anyhow::Result<()> {
    let merged = merge_summaries(dir)?;
    println!(
        "merged {} of {} shard summaries: {} inputs, segmented {}, skipped {}, failed {} — {}",
        merged.shards.unwrap_or(0) as usize - merged.missing_shards.len(),
        merged.shards.unwrap_or(0),
        merged.inputs,
        merged.segmented,
        merged.skipped,
        merged.failed,
        dir.join("batch_summary.json").display()
    );
    if !merged.missing_shards.is_empty() {
        eprintln!("missing shards: {:?}", merged.missing_shards);
    }
    for c in merged
        .cases
        .iter()
        .filter(|c| c.status == CaseStatus::Failed)
    {
        eprintln!("failed: {}: {}", c.case, c.reason.as_deref().unwrap_or(""));
    }
    if merged.failed == 0 && merged.missing_shards.is_empty() {
        Ok(())
    } else {
        Err(Reported.into())
    }
}

/// The one DICOM series in `dir`, read for `--reference-series`.
fn reference_series(dir: &Path) -> anyhow::Result<SourceSeries> {
    let found = discover(dir)?;
    let series: Vec<&ScanSource> = found
        .sources
        .iter()
        .filter(|s| !matches!(s, ScanSource::Nifti(_)))
        .collect();
    match series.as_slice() {
        [one] => Ok(SourceSeries::read(one)?),
        _ => super::usage!(
            "--reference-series {}: needs exactly one DICOM series, found {}",
            dir.display(),
            series.len()
        ),
    }
}

/// The model's run name: the run directory, also when a checkpoint inside it is given.
fn run_name(model: &Path) -> String {
    let dir = model.canonicalize().unwrap_or_else(|_| model.to_path_buf());
    let inside_checkpoints = dir
        .parent()
        .and_then(|p| p.file_name())
        .is_some_and(|n| n == "checkpoints");
    let run = if inside_checkpoints {
        dir.parent().and_then(Path::parent).unwrap_or(&dir)
    } else {
        &dir
    };
    run.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

/// The log line of a finished case.
fn case_line(c: &BatchCase) -> String {
    match c.status {
        CaseStatus::Failed => format!("{}: FAILED: {}", c.case, c.reason.as_deref().unwrap_or("")),
        _ => {
            let warnings: String = c
                .warnings
                .iter()
                .map(|w| format!("; warning: {w}"))
                .collect();
            let memory = c
                .memory
                .map(|m| {
                    let measured = m
                        .measured_peak_bytes
                        .map(|b| format!(" (measured {})", human(b)))
                        .unwrap_or_default();
                    format!(
                        ", {} window(s) per pass, {} at once, for a predicted peak of {}{measured}",
                        m.windows_per_pass,
                        m.passes_in_flight,
                        human(m.predicted_peak_bytes)
                    )
                })
                .unwrap_or_default();
            let threshold = c
                .threshold
                .map(|t| format!(" at the matched threshold {t:.2}"))
                .unwrap_or_default();
            format!(
                "{}: {} lesion(s){threshold}, {:.1} s{memory}{warnings}",
                c.case,
                c.lesions.unwrap_or(0),
                c.seconds.unwrap_or(0.0)
            )
        }
    }
}
