//! `medseg evaluate --pred DIR --truth DIR [--config FILE] [--set evaluate.key=value] [--images DIR]
//! [--compare DIR] [--compare-calibration DIR] [--review] --output DIR`

use std::path::{Path, PathBuf};

use anyhow::Context;

use medseg::config::load_layered;
use medseg::eval::calibration::voxel_calibration;
use medseg::eval::compare::compare;
use medseg::eval::report::{write_report, EvalSummary, ReportInputs};
use medseg::eval::review::evaluation_cases;
use medseg::eval::{
    evaluate_cases, pair_cases, synth_lesions, worst_case_tiles, CasePair, CaseResult, EvalConfig,
    EvalFile,
};
use medseg::io::layout::{DatasetJson, SynthLesions};
use medseg::io::read_json;

use super::progress;

#[derive(clap::Args)]
pub struct Args {
    /// Directory of predicted label maps (NIfTI), named like the truth files.
    #[arg(long, required_unless_present = "dump_config")]
    pred: Option<PathBuf>,
    /// Directory of truth label maps (NIfTI).
    #[arg(long, required_unless_present = "dump_config")]
    truth: Option<PathBuf>,
    /// TOML with an `[evaluate]` table (labels, classes, nsd_tolerance_mm, lesion_iou_threshold,
    /// volume_bins_mm3, …); defaults otherwise.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override one setting, e.g. `--set evaluate.nsd_tolerance_mm=1`; repeatable.
    #[arg(long = "set", value_name = "evaluate.KEY=VALUE")]
    set: Vec<String>,
    /// Print the effective settings (defaults ← file ← --set) as TOML and exit.
    #[arg(long)]
    dump_config: bool,
    /// Scans for the overlay montage (`CASE_0000.nii.gz` or `CASE.nii.gz`); without them the
    /// contours are drawn on black.
    #[arg(long)]
    images: Option<PathBuf>,
    /// Where per_case.csv, per_lesion.csv, summary.json, report.md and the plots go.
    #[arg(long, required_unless_present = "dump_config")]
    output: Option<PathBuf>,
    /// Another directory of predictions of the same cases (another model's, or this model's with
    /// other settings), scored the same way and compared case by case: OUTPUT/comparison.md and
    /// comparison.json give each class's Dice and each lesion class's F1, sensitivity, precision
    /// and false positives per scan for both, the difference and its 95 % paired-bootstrap
    /// interval over cases.
    #[arg(long, value_name = "DIR")]
    compare: Option<PathBuf>,
    /// Another directory of predictions of the same cases (e.g. segmented with
    /// `--set segment.temperature=1`), whose probability maps' calibration the report shows beside
    /// these (before and after temperature scaling).
    #[arg(long, value_name = "DIR")]
    compare_calibration: Option<PathBuf>,
    /// Worst cases shown in the overlay montage.
    #[arg(long, default_value_t = 4)]
    worst: usize,
    /// Also write a review page, OUTPUT/review/index.html: every case in a browser viewer
    /// (NiiVue) with its scan (from --images), prediction, truth outline and lesions marked TP, FP
    /// or FN; it opens from the file system.
    #[arg(long)]
    review: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let file: EvalFile = load_layered(args.config.as_deref(), &args.set)?;
    if args.dump_config {
        print!("{}", medseg::config::to_toml(&file)?);
        return Ok(());
    }
    let mut config = file.evaluate;
    let (Some(pred), Some(truth), Some(output)) = (args.pred, args.truth, args.output) else {
        super::usage!("give --pred DIR --truth DIR --output DIR");
    };
    if config.labels.is_empty() {
        // Truth inside a Decathlon layout (`labelsTs/` beside `dataset.json`) names the classes.
        // Read the names only: a test-only synthetic set has no training cases to list.
        if let Some(names) = truth.parent().and_then(|root| {
            let path = DatasetJson::path(root);
            let json: DatasetJson = read_json(&path).ok()?;
            json.label_names(&path).ok()
        }) {
            config.labels = names;
        }
    }
    let viewer = super::find_viewer(args.review)?;
    let (pairs, unmatched) = pair_cases(&pred, &truth)?;
    // The other predictions are paired first, so a wrong directory stops before any work.
    let other_pairs = match &args.compare {
        Some(other) => {
            let (pairs, _) = pair_cases(other, &truth)
                .with_context(|| format!("--compare {}", other.display()))?;
            if pairs.iter().all(|p| p.pred.is_none()) {
                anyhow::bail!(
                    "--compare {}: no prediction of the cases in {}",
                    other.display(),
                    truth.display()
                );
            }
            Some((other, pairs))
        }
        None => None,
    };
    // A synthetic dataset's lesions.json adds results by contrast-to-noise ratio.
    let synth = synth_lesions(&truth);
    let bar = progress::bar(
        pairs.len() as u64,
        "evaluate {bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
        false,
    );
    let (results, failed) = evaluate_cases(&pairs, &config, synth.as_ref(), &mut |case, e| {
        if let Some(e) = e {
            bar.suspend(|| eprintln!("error: {e}"));
        }
        bar.set_message(case.to_string());
        bar.inc(1);
    });
    bar.finish_and_clear();
    let tolerance = config.grid_tolerance_mm;
    let baseline_calibration = match &args.compare_calibration {
        Some(dir) => Some(voxel_calibration(&pairs, dir, tolerance)?.with_context(|| {
            format!(
                "--compare-calibration {}: no CASE_probabilities.nii.gz of these cases",
                dir.display()
            )
        })?),
        None => None,
    };
    let inputs = ReportInputs {
        config: &config,
        results: &results,
        failed: &failed,
        unmatched_predictions: &unmatched,
        worst_tiles: worst_case_tiles(&results, &pairs, args.images.as_deref(), args.worst),
        calibration: voxel_calibration(&pairs, &pred, tolerance)?,
        baseline_calibration,
    };
    let summary =
        write_report(&inputs, &output).with_context(|| format!("{}", output.display()))?;
    println!(
        "{} cases evaluated, report in {}",
        results.len(),
        output.join("report.md").display()
    );
    print_summary(&summary);
    if args.review {
        let cases = evaluation_cases(&pairs, &results, args.images.as_deref(), &config);
        super::write_review_page(
            &output.join("review"),
            &cases,
            viewer,
            "medseg evaluation",
            false,
        )?;
    }
    if let Some((other, pairs)) = &other_pairs {
        compare_with(
            other,
            pairs,
            &pred,
            &results,
            &config,
            synth.as_ref(),
            &output,
        )?;
    }
    let missing = results.iter().filter(|r| r.missing_prediction).count();
    if missing > 0 {
        eprintln!("warning: {missing} cases had no prediction (counted as empty)");
    }
    if failed.is_empty() {
        Ok(())
    } else {
        eprintln!("{} of {} cases failed", failed.len(), pairs.len());
        Err(super::Reported.into())
    }
}

/// Scores the predictions in `other` (paired with the truth as `pairs`) as `pred`'s were and
/// writes the paired comparison.
fn compare_with(
    other: &Path,
    pairs: &[CasePair],
    pred: &Path,
    results: &[CaseResult],
    config: &EvalConfig,
    synth: Option<&SynthLesions>,
    output: &Path,
) -> anyhow::Result<()> {
    let (theirs, failed) = evaluate_cases(pairs, config, synth, &mut |_, e| {
        if let Some(e) = e {
            eprintln!("error (--compare): {e}");
        }
    });
    if !failed.is_empty() {
        eprintln!(
            "warning: {} case(s) of --compare {} could not be scored and are left out of the comparison",
            failed.len(),
            other.display()
        );
    }
    let missing = theirs.iter().filter(|r| r.missing_prediction).count();
    if missing > 0 {
        eprintln!(
            "warning: {missing} case(s) have no prediction in --compare {} (counted as empty, as in --pred)",
            other.display()
        );
    }
    let comparison = compare(results, &theirs, |c| config.label_name(c));
    comparison.write(
        output,
        &pred.display().to_string(),
        &other.display().to_string(),
    )?;
    println!(
        "  compared with {} on {} cases (A - B, 95% paired-bootstrap interval):",
        other.display(),
        comparison.cases
    );
    for m in &comparison.metrics {
        let interval = m
            .interval
            .map_or(String::new(), |[lo, hi]| format!(" [{lo:+.3}, {hi:+.3}]"));
        println!(
            "    class {} {} {}: {:.3} vs {:.3}, {:+.3}{interval}, {}",
            m.class,
            m.label,
            m.metric.name(),
            m.pred,
            m.other,
            m.difference,
            m.verdict.describe()
        );
    }
    Ok(())
}

fn print_summary(summary: &EvalSummary) {
    let num = |v: Option<f64>| v.unwrap_or(f64::NAN);
    if let Some(c) = &summary.calibration {
        let before = c
            .baseline
            .as_ref()
            .map(|b| {
                format!(
                    " (comparison{}: ECE {:.4}, near the boundary {:.4})",
                    b.temperature
                        .map(|t| format!(" at temperature {t:.3}"))
                        .unwrap_or_default(),
                    num(b.ece),
                    num(b.ece_boundary)
                )
            })
            .unwrap_or_default();
        println!(
            "  calibration{}: ECE {:.4}, near the boundary {:.4}, Brier {:.4}, lesion ECE {:.3}{before}",
            c.temperature
                .map(|t| format!(" at temperature {t:.3}"))
                .unwrap_or_default(),
            num(c.ece),
            num(c.ece_boundary),
            num(c.brier),
            num(c.lesion_ece)
        );
    }
    for (c, e) in &summary.classes {
        println!(
            "  class {c} {:<12} Dice {:.3}  HD95 {} mm  NSD {:.3}",
            e.label,
            num(e.mean("dice")),
            e.mean("hd95_mm").map_or("-".into(), |v| format!("{v:.2}")),
            num(e.mean("nsd")),
        );
    }
    for (c, e) in &summary.lesions {
        println!(
            "  lesions {c}: sensitivity {:.3} precision {:.3} F1 {:.3} ({} TP, {} FP, {} FN)",
            e.sensitivity, e.precision, e.f1, e.tp, e.fp, e.fn_
        );
        let per_scan = e.fp as f64 / summary.cases.max(1) as f64;
        if let Some(h) = &e.high_contrast {
            println!(
                "    CNR >= {}: sensitivity {:.3} at {:.2} FP per scan ({} lesions); {:.3} at 1 FP per scan",
                h.min_contrast_to_noise,
                h.sensitivity,
                h.fp_per_scan,
                h.truth_lesions,
                h.sensitivity_at_1_fp_per_scan
            );
        } else {
            println!("    {per_scan:.2} FP per scan");
        }
        if !e.by_polarity.is_empty() {
            let parts: Vec<String> = e
                .by_polarity
                .iter()
                .map(|b| format!("{} {}/{}", b.polarity, b.detected, b.truth_lesions))
                .collect();
            println!("    by polarity: {}", parts.join(", "));
        }
        if !e.by_slice_thickness.is_empty() {
            let parts: Vec<String> = e
                .by_slice_thickness
                .iter()
                .map(|b| {
                    format!(
                        "{} {}/{} ({:.2} FP/scan)",
                        b.bin, b.detected, b.truth_lesions, b.fp_per_scan
                    )
                })
                .collect();
            println!("    by slice thickness: {}", parts.join(", "));
        }
    }
}
