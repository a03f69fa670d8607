//! `medseg evaluate --pred DIR --truth DIR [--config FILE] [--images DIR] --output DIR`

use std::path::{Path, PathBuf};

use anyhow::Context;

use medseg::eval::report::{overlay_tile, write_report, ReportInputs};
use medseg::eval::{evaluate_case, pair_cases, CaseResult, EvalConfig};
use medseg::io::read_nifti;

#[derive(clap::Args)]
pub struct Args {
    /// Directory of predicted label maps (NIfTI), named like the truth files.
    #[arg(long)]
    pred: PathBuf,
    /// Directory of truth label maps (NIfTI).
    #[arg(long)]
    truth: PathBuf,
    /// TOML with an `[evaluate]` table (labels, classes, nsd_tolerance_mm, lesion_iou_threshold,
    /// volume_bins_mm3, …); defaults otherwise.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Scans for the overlay montage (`CASE_0000.nii.gz` or `CASE.nii.gz`); without them the
    /// contours are drawn on black.
    #[arg(long)]
    images: Option<PathBuf>,
    /// Where per_case.csv, per_lesion.csv, summary.json, report.md and the plots go.
    #[arg(long)]
    output: PathBuf,
    /// Worst cases shown in the overlay montage.
    #[arg(long, default_value_t = 4)]
    worst: usize,
}

/// The tile of a case: the slice where truth and prediction disagree most.
fn worst_tile(
    r: &CaseResult,
    args: &Args,
    pred: Option<&PathBuf>,
    truth: &Path,
) -> Option<image::RgbImage> {
    let t = read_nifti(truth).ok()?;
    let truth_fg: Vec<bool> = t.voxels.iter().map(|&v| v > 0.0).collect();
    let pred_fg: Vec<bool> = match pred {
        Some(p) => read_nifti(p)
            .ok()?
            .voxels
            .iter()
            .map(|&v| v > 0.0)
            .collect(),
        None => vec![false; truth_fg.len()],
    };
    let [nk, nj, ni] = r.dims;
    let plane = nj * ni;
    let k = (0..nk).max_by_key(|&k| {
        (k * plane..(k + 1) * plane)
            .filter(|&x| truth_fg[x] != pred_fg[x])
            .count()
    })?;
    let scan = args.images.as_ref().and_then(|dir| {
        [
            format!("{}_0000.nii.gz", r.case),
            format!("{}.nii.gz", r.case),
            format!("{}_0000.nii", r.case),
            format!("{}.nii", r.case),
        ]
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.exists())
        .and_then(|p| read_nifti(&p).ok())
        .filter(|v| v.geometry.dims == t.geometry.dims)
    });
    let scan_data: Option<Vec<f32>> = scan.map(|v| {
        v.voxels
            .index_axis(ndarray::Axis(0), 0)
            .iter()
            .copied()
            .collect()
    });
    Some(overlay_tile(
        scan_data.as_deref(),
        &truth_fg,
        &pred_fg,
        r.dims,
        k,
    ))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(p) => EvalConfig::from_file(p)?,
        None => EvalConfig::default(),
    };
    if config.labels.is_empty() {
        // Truth inside a Decathlon layout (`labelsTs/` beside `dataset.json`) names the classes.
        if let Some(m) = args
            .truth
            .parent()
            .and_then(|root| medseg::data::manifest::read_decathlon(root).ok())
        {
            config.labels = m.labels;
        }
    }
    let (pairs, unmatched) = pair_cases(&args.pred, &args.truth)?;
    // A synthetic dataset's lesions.json adds results by contrast-to-noise ratio.
    let synth = medseg::eval::synth_lesions(&args.truth);
    let bar = indicatif::ProgressBar::new(pairs.len() as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "evaluate {bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut results = Vec::new();
    let mut failed = Vec::new();
    for pair in &pairs {
        bar.set_message(pair.case.clone());
        match evaluate_case(pair, &config, synth.as_deref()) {
            Ok(r) => results.push(r),
            Err(e) => {
                bar.suspend(|| eprintln!("error: {e}"));
                failed.push((pair.case.clone(), e.to_string()));
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    // Worst cases by mean Dice over classes.
    let mut order: Vec<usize> = (0..results.len()).collect();
    let mean_dice = |r: &CaseResult| {
        r.classes.iter().map(|(_, m)| m.dice).sum::<f64>() / r.classes.len().max(1) as f64
    };
    order.sort_by(|&a, &b| mean_dice(&results[a]).total_cmp(&mean_dice(&results[b])));
    let worst_tiles = order
        .iter()
        .take(args.worst)
        .filter_map(|&i| {
            let r = &results[i];
            let pair = pairs.iter().find(|p| p.case == r.case)?;
            Some((
                r.case.clone(),
                worst_tile(r, &args, pair.pred.as_ref(), &pair.truth)?,
            ))
        })
        .collect();
    let inputs = ReportInputs {
        config: &config,
        results: &results,
        failed: &failed,
        unmatched_predictions: &unmatched,
        worst_tiles,
    };
    let summary = write_report(&inputs, &args.output)
        .with_context(|| format!("{}", args.output.display()))?;
    println!(
        "{} cases evaluated, report in {}",
        results.len(),
        args.output.join("report.md").display()
    );
    // JSON maps order keys as strings; print classes in numeric order.
    let numeric = |m: &serde_json::Map<String, serde_json::Value>| {
        let mut v: Vec<(String, serde_json::Value)> =
            m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by_key(|(k, _)| k.parse::<u32>().unwrap_or(u32::MAX));
        v
    };
    if let Some(classes) = summary["classes"].as_object().map(numeric) {
        for (c, e) in classes {
            println!(
                "  class {c} {:<12} Dice {:.3}  HD95 {} mm  NSD {:.3}",
                e["label"].as_str().unwrap_or_default(),
                e["dice"]["mean"].as_f64().unwrap_or(f64::NAN),
                e["hd95_mm"]["mean"]
                    .as_f64()
                    .map_or("-".into(), |v| format!("{v:.2}")),
                e["nsd"]["mean"].as_f64().unwrap_or(f64::NAN),
            );
        }
    }
    if let Some(lesions) = summary["lesions"].as_object().map(numeric) {
        for (c, e) in lesions {
            println!(
                "  lesions {c}: sensitivity {:.3} precision {:.3} F1 {:.3} ({} TP, {} FP, {} FN)",
                e["sensitivity"].as_f64().unwrap_or(f64::NAN),
                e["precision"].as_f64().unwrap_or(f64::NAN),
                e["f1"].as_f64().unwrap_or(f64::NAN),
                e["tp"],
                e["fp"],
                e["fn"]
            );
        }
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
