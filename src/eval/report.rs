//! Evaluation outputs: `per_case.csv`, `per_lesion.csv`, `summary.json`, `report.md` and PNG plots
//! (Dice per class as box plots, the FROC curve, the reliability diagram, an overlay montage of the
//! worst cases).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use super::calibration::{
    lesion_reliability, CalibrationSummary, VoxelCalibration, BOUNDARY_BAND_MM,
};
use super::lesions::{detection_scores, froc, LesionRecord, Polarity, FROC_FP_RATES};
use super::{CaseResult, EvalConfig};
use crate::error::{Error, Result};
use crate::io::plot::{plot_err, register_font, save_montage};
use crate::io::{write_atomically, write_json_atomically};

/// Lower edges of the contrast-to-noise bins for synthetic lesions (medseg synth labels none below 1).
const CNR_BINS: [f64; 4] = [1.0, 3.0, 10.0, 30.0];

const METRICS: [&str; 11] = [
    "dice",
    "iou",
    "precision",
    "recall",
    "truth_mm3",
    "pred_mm3",
    "volume_difference_mm3",
    "relative_volume_difference",
    "hd95_mm",
    "assd_mm",
    "nsd",
];

fn metric_values(m: &super::ClassMetrics) -> [f64; 11] {
    [
        m.dice,
        m.iou,
        m.precision,
        m.recall,
        m.truth_mm3,
        m.pred_mm3,
        m.volume_difference_mm3,
        m.relative_volume_difference,
        m.hd95_mm,
        m.assd_mm,
        m.nsd,
    ]
}

fn num(v: f64) -> String {
    if v.is_nan() {
        "nan".into()
    } else {
        format!("{v:.6}")
    }
}

/// Mean, standard deviation and median over the finite values of a metric, and how many were NaN.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// `None` when no value was finite.
    pub mean: Option<f64>,
    /// Population standard deviation.
    pub std: Option<f64>,
    /// Median.
    pub median: Option<f64>,
    /// Finite values.
    pub n: usize,
    /// NaN values (e.g. HD95 with an empty mask).
    pub nan: usize,
}

impl Stats {
    fn of(values: &[f64]) -> Stats {
        let mut finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        let n = finite.len();
        let nan = values.len() - n;
        if n == 0 {
            return Stats {
                mean: None,
                std: None,
                median: None,
                n,
                nan,
            };
        }
        let mean = finite.iter().sum::<f64>() / n as f64;
        let std = (finite.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
        let median = crate::transforms::intensity::percentile(&mut finite, 50.0);
        Stats {
            mean: Some(mean),
            std: Some(std),
            median: Some(median),
            n,
            nan,
        }
    }
}

/// `summary.json`: everything `medseg evaluate` concluded, by class. Maps are keyed by label
/// value (written as JSON strings, read back as numbers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalSummary {
    /// Cases evaluated.
    pub cases: usize,
    /// Cases that could not be evaluated.
    pub failed_cases: Vec<FailedCase>,
    /// Truth cases without a prediction (counted as empty).
    pub missing_predictions: Vec<String>,
    /// Predictions without truth.
    pub unmatched_predictions: Vec<std::path::PathBuf>,
    /// The settings used.
    pub settings: EvalConfig,
    /// How empty masks are scored.
    pub conventions: String,
    /// Overlap and surface metrics per class.
    pub classes: BTreeMap<u32, ClassSummary>,
    /// Lesion-wise detection per class.
    pub lesions: BTreeMap<u32, LesionSummary>,
    /// Calibration of the probability maps beside the predictions, when there are any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<CalibrationSummary>,
}

/// A case that could not be evaluated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailedCase {
    /// The case name.
    pub case: String,
    /// Why.
    pub error: String,
}

/// One class's metrics over cases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassSummary {
    /// The class name.
    pub label: String,
    /// Metric statistics by metric name (`dice`, `iou`, …, `hd95_mm`, `assd_mm`, `nsd`).
    #[serde(flatten)]
    pub metrics: BTreeMap<String, Stats>,
}

impl ClassSummary {
    /// The mean of metric `name`, if any value was finite.
    pub fn mean(&self, name: &str) -> Option<f64> {
        self.metrics.get(name).and_then(|s| s.mean)
    }
}

/// One class's lesion detection, pooled over cases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LesionSummary {
    /// The class name.
    pub label: String,
    /// Truth lesions.
    pub truth_lesions: usize,
    /// Predicted lesions.
    pub pred_lesions: usize,
    /// Detected truth lesions.
    pub tp: usize,
    /// Unmatched predicted lesions.
    pub fp: usize,
    /// Missed truth lesions.
    #[serde(rename = "fn")]
    pub fn_: usize,
    /// TP / (TP + FN); NaN (null) without truth lesions.
    pub sensitivity: f64,
    /// TP / (TP + FP).
    pub precision: f64,
    /// Harmonic mean of the two.
    pub f1: f64,
    /// Dice of the detected lesions.
    pub lesion_dice: Stats,
    /// The FROC curve.
    pub froc: FrocSummary,
    /// Detection by lesion volume.
    pub by_volume: Vec<VolumeBin>,
    /// Detection by contrast-to-noise ratio (synthetic lesions).
    pub by_contrast_to_noise: Vec<ContrastBin>,
    /// Detection by polarity (domain-randomised synthetic lesions).
    #[serde(default)]
    pub by_polarity: Vec<PolarityBin>,
    /// Detection and false positives per scan by the scans' simulated slice thickness.
    #[serde(default)]
    pub by_slice_thickness: Vec<ThicknessBin>,
    /// The operating point on lesions of contrast-to-noise ratio at least [`HIGH_CNR`]
    /// (synthetic lesions).
    #[serde(default)]
    pub high_contrast: Option<OperatingPoint>,
}

/// Lesions from this contrast-to-noise ratio on count as clearly visible (the generalisation
/// goal: sensitivity at 1 false positive per scan on these).
pub const HIGH_CNR: f64 = 3.0;

/// Detection of one lesion polarity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolarityBin {
    /// `hyper`, `hypo`, `ring` or `iso_oedema`.
    pub polarity: String,
    /// Truth lesions of that polarity.
    pub truth_lesions: usize,
    /// Of which detected.
    pub detected: usize,
    /// Their share.
    pub sensitivity: f64,
}

/// Detection on the scans of one slice-thickness bin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThicknessBin {
    /// e.g. `5-7 mm`, or `native` for scans at the host's own resolution.
    pub bin: String,
    /// Scans in the bin.
    pub scans: usize,
    /// Their truth lesions.
    pub truth_lesions: usize,
    /// Of which detected.
    pub detected: usize,
    /// Their share.
    pub sensitivity: f64,
    /// Unmatched predicted lesions on these scans.
    pub false_positives: usize,
    /// Per scan.
    pub fp_per_scan: f64,
}

/// Sensitivity and false positives on a subset of truth lesions, all predictions counted except
/// those matched to lesions outside the subset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperatingPoint {
    /// The subset: contrast-to-noise ratio at least this.
    pub min_contrast_to_noise: f64,
    /// Truth lesions in the subset.
    pub truth_lesions: usize,
    /// Detected share at the default threshold.
    pub sensitivity: f64,
    /// False positives per scan at the default threshold.
    pub fp_per_scan: f64,
    /// Sensitivity at 1 false positive per scan (FROC, by confidence).
    pub sensitivity_at_1_fp_per_scan: f64,
}

/// FROC: sensitivity at fixed false positives per scan, their average, and the whole curve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrocSummary {
    /// The operating points, FP per scan.
    pub fp_per_scan: Vec<f64>,
    /// Sensitivity at each.
    pub sensitivity: Vec<f64>,
    /// Their mean.
    pub average: f64,
    /// `[fp_per_scan, sensitivity]` over confidence thresholds.
    pub curve: Vec<[f64; 2]>,
}

/// Detection within one lesion-volume bin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeBin {
    /// e.g. `65-524 mm3`.
    pub bin: String,
    /// Truth lesions in the bin.
    pub truth_lesions: usize,
    /// Of which detected.
    pub detected: usize,
    /// Their share.
    pub sensitivity: f64,
    /// Predicted lesions in the bin.
    pub pred_lesions: usize,
    /// Of which unmatched.
    pub false_positives: usize,
    /// Matched share.
    pub precision: f64,
}

/// Detection within one contrast-to-noise bin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContrastBin {
    /// e.g. `3-10`.
    pub bin: String,
    /// Truth lesions in the bin.
    pub truth_lesions: usize,
    /// Of which detected.
    pub detected: usize,
    /// Their share.
    pub sensitivity: f64,
}

/// Everything `write_report` needs besides the per-case results.
pub struct ReportInputs<'a> {
    /// The evaluation settings (class names, volume bins, …).
    pub config: &'a EvalConfig,
    /// Per-case results.
    pub results: &'a [CaseResult],
    /// Cases that could not be evaluated, with the reason.
    pub failed: &'a [(String, String)],
    /// Prediction files with no truth of the same case name.
    pub unmatched_predictions: &'a [std::path::PathBuf],
    /// Overlay tiles of the worst cases, already rendered (see [`crate::io::plot::overlay_tile`]).
    pub worst_tiles: Vec<(String, image::RgbImage)>,
    /// Voxel-wise calibration of the predictions' probability maps, when they have any.
    pub calibration: Option<VoxelCalibration>,
    /// The same of other predictions of the cases, for comparison (e.g. before temperature
    /// scaling).
    pub baseline_calibration: Option<VoxelCalibration>,
}

/// Per-class overlap metrics, aggregated over cases.
fn class_summaries(inp: &ReportInputs) -> BTreeMap<u32, ClassSummary> {
    let mut per_class: BTreeMap<u32, Vec<[f64; 11]>> = BTreeMap::new();
    for r in inp.results {
        for (c, m) in &r.classes {
            per_class.entry(*c).or_default().push(metric_values(m));
        }
    }
    per_class
        .iter()
        .map(|(c, rows)| {
            let metrics = METRICS
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    let values: Vec<f64> = rows.iter().map(|r| r[i]).collect();
                    (name.to_string(), Stats::of(&values))
                })
                .collect();
            let label = inp.config.label_name(*c);
            (*c, ClassSummary { label, metrics })
        })
        .collect()
}

/// Detection by lesion-volume bin.
fn volume_bins(
    cfg: &EvalConfig,
    truth: &[&LesionRecord],
    pred: &[&LesionRecord],
) -> Vec<VolumeBin> {
    let mut bin_names: Vec<String> = cfg
        .volume_bins_mm3
        .iter()
        .map(|&lo| cfg.volume_bin(lo))
        .collect();
    bin_names.dedup();
    bin_names
        .into_iter()
        .map(|bin| {
            let in_bin = |l: &&&LesionRecord| cfg.volume_bin(l.volume_mm3) == bin;
            let t: Vec<_> = truth.iter().filter(in_bin).collect();
            let p: Vec<_> = pred.iter().filter(in_bin).collect();
            let detected = t.iter().filter(|l| l.matched.is_some()).count();
            let false_positives = p.iter().filter(|l| l.matched.is_none()).count();
            let (sensitivity, _, _) = detection_scores(detected, 0, t.len() - detected);
            let (_, precision, _) = detection_scores(p.len() - false_positives, false_positives, 0);
            VolumeBin {
                bin,
                truth_lesions: t.len(),
                detected,
                sensitivity,
                pred_lesions: p.len(),
                false_positives,
                precision,
            }
        })
        .collect()
}

/// Sensitivity by contrast-to-noise bin, for synthetic truth lesions (`lesions.json` beside the
/// labels); empty when no truth lesion has a known contrast.
fn contrast_bins(truth: &[&LesionRecord]) -> Vec<ContrastBin> {
    if !truth.iter().any(|l| l.contrast_to_noise.is_some()) {
        return Vec::new();
    }
    CNR_BINS
        .iter()
        .enumerate()
        .map(|(i, &lo)| {
            let hi = CNR_BINS.get(i + 1).copied().unwrap_or(f64::INFINITY);
            let t: Vec<_> = truth
                .iter()
                .filter(|l| l.contrast_to_noise.is_some_and(|v| v >= lo && v < hi))
                .collect();
            let detected = t.iter().filter(|l| l.matched.is_some()).count();
            let (sensitivity, _, _) = detection_scores(detected, 0, t.len() - detected);
            ContrastBin {
                bin: if hi.is_finite() {
                    format!("{lo}-{hi}")
                } else {
                    format!(">={lo}")
                },
                truth_lesions: t.len(),
                detected,
                sensitivity,
            }
        })
        .collect()
}

/// One lesion class's detection summary over `scans` scans.
fn lesion_summary(
    cfg: &EvalConfig,
    class: u32,
    truth: &[&LesionRecord],
    pred: &[&LesionRecord],
    results: &[CaseResult],
) -> LesionSummary {
    let scans = results.len();
    let tp = truth.iter().filter(|l| l.matched.is_some()).count();
    let fn_ = truth.len() - tp;
    let fp = pred.iter().filter(|l| l.matched.is_none()).count();
    let (sensitivity, precision, f1) = detection_scores(tp, fp, fn_);
    let dices: Vec<f64> = truth
        .iter()
        .filter(|l| l.matched.is_some())
        .map(|l| l.dice)
        .collect();
    let predictions: Vec<(f64, bool)> = pred
        .iter()
        .map(|l| (l.confidence, l.matched.is_some()))
        .collect();
    let (curve, at, average) = froc(&predictions, truth.len(), scans);
    LesionSummary {
        label: cfg.label_name(class),
        truth_lesions: truth.len(),
        pred_lesions: pred.len(),
        tp,
        fp,
        fn_,
        sensitivity,
        precision,
        f1,
        lesion_dice: Stats::of(&dices),
        froc: FrocSummary {
            fp_per_scan: FROC_FP_RATES.to_vec(),
            sensitivity: at.to_vec(),
            average,
            curve: curve.iter().map(|(f, s)| [*f, *s]).collect(),
        },
        by_volume: volume_bins(cfg, truth, pred),
        by_contrast_to_noise: contrast_bins(truth),
        by_polarity: polarity_bins(truth),
        by_slice_thickness: thickness_bins(class, results),
        high_contrast: high_contrast(truth, pred, scans),
    }
}

/// Sensitivity by polarity; empty when no truth lesion has one.
fn polarity_bins(truth: &[&LesionRecord]) -> Vec<PolarityBin> {
    Polarity::ALL
        .into_iter()
        .filter_map(|p| {
            let t: Vec<_> = truth.iter().filter(|l| l.polarity == Some(p)).collect();
            let detected = t.iter().filter(|l| l.matched.is_some()).count();
            let (sensitivity, _, _) = detection_scores(detected, 0, t.len() - detected);
            (!t.is_empty()).then(|| PolarityBin {
                polarity: p.name().into(),
                truth_lesions: t.len(),
                detected,
                sensitivity,
            })
        })
        .collect()
}

/// Slice-thickness bins of the scans, mm (the last open-ended); `native` holds scans at the
/// host's resolution.
const THICKNESS_BINS_MM: [f64; 4] = [2.0, 4.0, 6.0, 8.0];

/// Detection and false positives per scan by slice thickness; empty when no scan has one.
fn thickness_bins(class: u32, results: &[CaseResult]) -> Vec<ThicknessBin> {
    if results.iter().all(|r| r.slice_thickness_mm.is_none()) {
        return Vec::new();
    }
    let bin_of = |t: Option<f64>| match t {
        None => "native".to_string(),
        Some(t) => {
            let lo = THICKNESS_BINS_MM.iter().rev().find(|lo| t >= **lo);
            let hi = THICKNESS_BINS_MM.iter().find(|hi| t < **hi);
            match (lo, hi) {
                (Some(lo), Some(hi)) => format!("{lo}-{hi} mm"),
                (None, _) => format!("<{} mm", THICKNESS_BINS_MM[0]),
                (Some(lo), None) => format!(">={lo} mm"),
            }
        }
    };
    let mut bins: Vec<String> = results
        .iter()
        .map(|r| bin_of(r.slice_thickness_mm))
        .collect();
    bins.sort();
    bins.dedup();
    bins.into_iter()
        .map(|bin| {
            let scans: Vec<&CaseResult> = results
                .iter()
                .filter(|r| bin_of(r.slice_thickness_mm) == bin)
                .collect();
            let matches = scans.iter().flat_map(|r| {
                r.lesions
                    .iter()
                    .filter(|(c, _)| *c == class)
                    .map(|(_, m)| m)
            });
            let (mut truth, mut detected, mut false_positives) = (0, 0, 0);
            for m in matches {
                truth += m.truth.len();
                detected += m.tp();
                false_positives += m.fp();
            }
            let (sensitivity, _, _) = detection_scores(detected, 0, truth - detected);
            ThicknessBin {
                bin,
                scans: scans.len(),
                truth_lesions: truth,
                detected,
                sensitivity,
                false_positives,
                fp_per_scan: false_positives as f64 / scans.len().max(1) as f64,
            }
        })
        .collect()
}

/// The operating point on truth lesions of contrast-to-noise at least [`HIGH_CNR`]; predictions
/// matched to fainter lesions count neither way. `None` without contrast records.
fn high_contrast(
    truth: &[&LesionRecord],
    pred: &[&LesionRecord],
    scans: usize,
) -> Option<OperatingPoint> {
    if !truth.iter().any(|l| l.contrast_to_noise.is_some()) {
        return None;
    }
    let visible = |l: &LesionRecord| l.contrast_to_noise.is_some_and(|c| c >= HIGH_CNR);
    let subset: Vec<&&LesionRecord> = truth.iter().filter(|l| visible(l)).collect();
    let faint: std::collections::HashSet<(&str, u32)> = truth
        .iter()
        .filter(|l| !visible(l))
        .map(|l| (l.case.as_str(), l.id))
        .collect();
    let counted: Vec<(f64, bool)> = pred
        .iter()
        .filter(|p| {
            p.matched
                .is_none_or(|t| !faint.contains(&(p.case.as_str(), t)))
        })
        .map(|p| (p.confidence, p.matched.is_some()))
        .collect();
    let detected = subset.iter().filter(|l| l.matched.is_some()).count();
    let fp = counted.iter().filter(|(_, tp)| !tp).count();
    let (sensitivity, _, _) = detection_scores(detected, 0, subset.len() - detected);
    let (_, at, _) = froc(&counted, subset.len(), scans);
    let one = FROC_FP_RATES.iter().position(|r| *r == 1.0).unwrap_or(0);
    Some(OperatingPoint {
        min_contrast_to_noise: HIGH_CNR,
        truth_lesions: subset.len(),
        sensitivity,
        fp_per_scan: fp as f64 / scans.max(1) as f64,
        sensitivity_at_1_fp_per_scan: at[one],
    })
}

/// Builds `summary.json`'s content.
pub fn summarize(inp: &ReportInputs) -> EvalSummary {
    let mut by_class: BTreeMap<u32, (Vec<&LesionRecord>, Vec<&LesionRecord>)> = BTreeMap::new();
    for r in inp.results {
        for (c, m) in &r.lesions {
            let e = by_class.entry(*c).or_default();
            e.0.extend(m.truth.iter());
            e.1.extend(m.pred.iter());
        }
    }
    let lesions = by_class
        .iter()
        .map(|(c, (truth, pred))| (*c, lesion_summary(inp.config, *c, truth, pred, inp.results)))
        .collect();
    EvalSummary {
        cases: inp.results.len(),
        failed_cases: inp
            .failed
            .iter()
            .map(|(case, error)| FailedCase {
                case: case.clone(),
                error: error.clone(),
            })
            .collect(),
        missing_predictions: inp
            .results
            .iter()
            .filter(|r| r.missing_prediction)
            .map(|r| r.case.clone())
            .collect(),
        unmatched_predictions: inp.unmatched_predictions.to_vec(),
        settings: inp.config.clone(),
        conventions: "overlap metrics: Metrics Reloaded (both empty = 1, one empty = 0); surface metrics: MONAI (NaN if either mask is empty; NSD 0 if exactly one is empty); aggregates skip NaN and count them".into(),
        classes: class_summaries(inp),
        lesions,
        calibration: calibration_summary(inp),
    }
}

/// The calibration object: voxels from the probability maps, lesions from the matching.
fn calibration_summary(inp: &ReportInputs) -> Option<CalibrationSummary> {
    let voxels = inp.calibration.as_ref()?;
    let pred = inp
        .results
        .iter()
        .flat_map(|r| r.lesions.iter().flat_map(|(_, m)| m.pred.iter()));
    let mut summary = CalibrationSummary::new(voxels, &lesion_reliability(pred));
    summary.baseline = inp.baseline_calibration.as_ref().map(|b| {
        Box::new(CalibrationSummary::new(
            b,
            &crate::infer::calibration::Reliability::default(),
        ))
    });
    Some(summary)
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    write_atomically(path, text.as_bytes())
}

/// Writes every output into `dir`.
pub fn write_report(inp: &ReportInputs, dir: &Path) -> Result<EvalSummary> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let cfg = inp.config;
    // per_case.csv
    let mut csv = format!(
        "case,class,label,missing_prediction,{}\n",
        METRICS.join(",")
    );
    for r in inp.results {
        for (c, m) in &r.classes {
            let values: Vec<String> = metric_values(m).iter().map(|v| num(*v)).collect();
            let _ = writeln!(
                csv,
                "{},{},{},{},{}",
                r.case,
                c,
                cfg.label_name(*c),
                r.missing_prediction,
                values.join(",")
            );
        }
    }
    write_text(&dir.join("per_case.csv"), &csv)?;
    // per_lesion.csv
    let mut csv = String::from(
        "case,class,label,source,id,voxels,volume_mm3,volume_bin,matched_id,iou,dice,confidence,contrast_to_noise,polarity,slice_thickness_mm,centroid_x_mm,centroid_y_mm,centroid_z_mm\n",
    );
    for r in inp.results {
        for (_, m) in &r.lesions {
            for l in m.truth.iter().chain(&m.pred) {
                let _ = writeln!(
                    csv,
                    "{},{},{},{},{},{},{:.3},{},{},{},{},{},{},{},{},{:.2},{:.2},{:.2}",
                    l.case,
                    l.class,
                    cfg.label_name(l.class),
                    l.source,
                    l.id,
                    l.voxels,
                    l.volume_mm3,
                    cfg.volume_bin(l.volume_mm3),
                    l.matched.map(|m| m.to_string()).unwrap_or_default(),
                    num(l.iou),
                    num(l.dice),
                    num(l.confidence),
                    l.contrast_to_noise.map(num).unwrap_or_default(),
                    l.polarity.map(Polarity::name).unwrap_or_default(),
                    r.slice_thickness_mm.map(num).unwrap_or_default(),
                    l.centroid_mm[0],
                    l.centroid_mm[1],
                    l.centroid_mm[2],
                );
            }
        }
    }
    write_text(&dir.join("per_lesion.csv"), &csv)?;
    let summary = summarize(inp);
    write_json_atomically(&dir.join("summary.json"), &summary)?;
    plot_dice(inp, &dir.join("dice_per_class.png"))?;
    plot_froc(&summary, &dir.join("froc.png"))?;
    if let Some(c) = &summary.calibration {
        plot_reliability(c, &dir.join("reliability.png"))?;
    }
    let montage = !inp.worst_tiles.is_empty();
    if montage {
        save_montage(&inp.worst_tiles, &dir.join("worst_cases.png"))?;
    }
    write_text(&dir.join("report.md"), &markdown(&summary, montage))?;
    Ok(summary)
}

/// Three decimals, or `-` for a missing or non-finite value.
fn f(v: impl Into<Option<f64>>) -> String {
    v.into()
        .filter(|x| x.is_finite())
        .map_or("-".into(), |x| format!("{x:.3}"))
}

/// The report's tables by polarity and slice thickness and the high-contrast operating point of
/// one lesion class (domain-randomised synthetic datasets; nothing otherwise).
fn synthetic_breakdowns(md: &mut String, c: u32, e: &LesionSummary) {
    if !e.by_polarity.is_empty() {
        let _ = writeln!(md, "\n### Class {c} by polarity (synthetic lesions)\n\n| polarity | truth | detected | sensitivity |\n|---|---|---|---|");
        for b in &e.by_polarity {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                b.polarity,
                b.truth_lesions,
                b.detected,
                f(b.sensitivity)
            );
        }
    }
    if !e.by_slice_thickness.is_empty() {
        let _ = writeln!(md, "\n### Class {c} by slice thickness of the scan\n\n| slices | scans | truth | detected | sensitivity | FP | FP per scan |\n|---|---|---|---|---|---|---|");
        for b in &e.by_slice_thickness {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                b.bin,
                b.scans,
                b.truth_lesions,
                b.detected,
                f(b.sensitivity),
                b.false_positives,
                f(b.fp_per_scan)
            );
        }
    }
    if let Some(h) = &e.high_contrast {
        let _ = writeln!(
            md,
            "\nClass {c}, the {} lesions of contrast-to-noise ratio at least {}: sensitivity {} at {} false positives per scan; {} at 1 false positive per scan (FROC).",
            h.truth_lesions,
            h.min_contrast_to_noise,
            f(h.sensitivity),
            f(h.fp_per_scan),
            f(h.sensitivity_at_1_fp_per_scan)
        );
    }
}

fn markdown(s: &EvalSummary, montage: bool) -> String {
    let mut md = String::from("# Evaluation report\n\n");
    let _ = writeln!(md, "{} cases. {}\n", s.cases, s.conventions);
    if !s.missing_predictions.is_empty() {
        let _ = writeln!(
            md,
            "**Missing predictions (counted as empty):** {}\n",
            s.missing_predictions.join(", ")
        );
    }
    for fc in &s.failed_cases {
        let _ = writeln!(md, "**Failed:** {}: {}\n", fc.case, fc.error);
    }
    md.push_str("## Per class (mean ± std over cases)\n\n| class | Dice | IoU | precision | recall | HD95 mm | ASSD mm | NSD | rel. vol. diff |\n|---|---|---|---|---|---|---|---|---|\n");
    for (c, e) in &s.classes {
        let ms = |k: &str| {
            let st = e.metrics.get(k);
            format!(
                "{} ± {}",
                f(st.and_then(|s| s.mean)),
                f(st.and_then(|s| s.std))
            )
        };
        let _ = writeln!(
            md,
            "| {c} {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            e.label,
            ms("dice"),
            ms("iou"),
            ms("precision"),
            ms("recall"),
            ms("hd95_mm"),
            ms("assd_mm"),
            ms("nsd"),
            ms("relative_volume_difference"),
        );
    }
    md.push_str("\n![Dice per class](dice_per_class.png)\n\n## Lesions (pooled over cases)\n\n| class | truth | pred | TP | FP | FN | sensitivity | precision | F1 | lesion Dice | FROC average |\n|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (c, e) in &s.lesions {
        let _ = writeln!(
            md,
            "| {c} {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            e.label,
            e.truth_lesions,
            e.pred_lesions,
            e.tp,
            e.fp,
            e.fn_,
            f(e.sensitivity),
            f(e.precision),
            f(e.f1),
            f(e.lesion_dice.mean),
            f(e.froc.average),
        );
    }
    for (c, e) in &s.lesions {
        if e.by_contrast_to_noise.is_empty() {
            continue;
        }
        let _ = writeln!(md, "\n### Class {c} by contrast-to-noise ratio (synthetic lesions)\n\n| CNR | truth | detected | sensitivity |\n|---|---|---|---|");
        for b in &e.by_contrast_to_noise {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                b.bin,
                b.truth_lesions,
                b.detected,
                f(b.sensitivity)
            );
        }
    }
    for (c, e) in &s.lesions {
        synthetic_breakdowns(&mut md, *c, e);
    }
    for (c, e) in &s.lesions {
        let _ = writeln!(md, "\n### Class {c} by lesion volume\n\n| volume | truth | detected | sensitivity | pred | FP | precision |\n|---|---|---|---|---|---|---|");
        for b in &e.by_volume {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                b.bin,
                b.truth_lesions,
                b.detected,
                f(b.sensitivity),
                b.pred_lesions,
                b.false_positives,
                f(b.precision)
            );
        }
    }
    md.push_str("\n![FROC](froc.png)\n");
    if let Some(c) = &s.calibration {
        calibration_markdown(&mut md, c);
    }
    if montage {
        md.push_str("\n## Worst cases\n\nTruth contours green, prediction red, on the slice with the largest error.\n\n![worst cases](worst_cases.png)\n");
    }
    md
}

/// The calibration section: ECE and Brier score of the foreground probability, overall and near
/// the boundary, of the lesion confidences, and of the comparison predictions.
fn calibration_markdown(md: &mut String, c: &CalibrationSummary) {
    let t = |t: Option<f64>| t.map_or("unknown".into(), |t| format!("{t:.3}"));
    let _ = writeln!(
        md,
        "\n## Calibration\n\nForeground probability (1 − background) against truth foreground, {} equal-width bins; {} cases with a probability map.\n\n| predictions | temperature | ECE | ECE within {} mm of the boundary | Brier | Brier near the boundary | lesion ECE |\n|---|---|---|---|---|---|---|",
        crate::infer::calibration::ECE_BINS,
        c.cases,
        BOUNDARY_BAND_MM
    );
    let mut row = |name: &str, s: &CalibrationSummary| {
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {} | {} | {} | {} |",
            t(s.temperature),
            f(s.ece),
            f(s.ece_boundary),
            f(s.brier),
            f(s.brier_boundary),
            f(s.lesion_ece)
        );
    };
    row("these", c);
    if let Some(b) = &c.baseline {
        row("comparison (`--compare-calibration`)", b);
    }
    let _ = writeln!(md, "\n| bin | voxels | mean probability | observed | near-boundary voxels | observed | lesions | observed |\n|---|---|---|---|---|---|---|---|");
    for ((a, b), l) in c.bins.iter().zip(&c.boundary_bins).zip(&c.lesion_bins) {
        let _ = writeln!(
            md,
            "| {:.3}-{:.3} | {} | {} | {} | {} | {} | {} | {} |",
            a.lower,
            a.upper,
            a.count,
            f(a.mean_probability),
            f(a.observed),
            b.count,
            f(b.observed),
            l.count,
            f(l.observed)
        );
    }
    for s in &c.skipped {
        let _ = writeln!(md, "\nskipped: {s}");
    }
    md.push_str("\n![reliability diagram](reliability.png)\n");
}

/// The reliability diagram: observed share against mean probability per bin, for every voxel,
/// the near-boundary voxels and the lesions (and the comparison's voxels), with the diagonal.
fn plot_reliability(c: &CalibrationSummary, path: &Path) -> Result<()> {
    register_font();
    let tmp = path.with_extension("tmp.png");
    {
        let root = BitMapBackend::new(&tmp, (560, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption("Reliability (foreground probability)", ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..1f64, 0f64..1f64)
            .map_err(|e| plot_err(path, e))?;
        chart
            .configure_mesh()
            .x_desc("mean predicted probability")
            .y_desc("observed share")
            .draw()
            .map_err(|e| plot_err(path, e))?;
        chart
            .draw_series(LineSeries::new([(0.0, 0.0), (1.0, 1.0)], &BLACK.mix(0.4)))
            .map_err(|e| plot_err(path, e))?;
        let points = |bins: &[crate::infer::calibration::ReliabilityBin]| -> Vec<(f64, f64)> {
            bins.iter()
                .filter_map(|b| Some((b.mean_probability?, b.observed?)))
                .collect()
        };
        let mut series = vec![
            ("every voxel", points(&c.bins), RED),
            ("near the boundary", points(&c.boundary_bins), BLUE),
            ("lesions", points(&c.lesion_bins), GREEN),
        ];
        if let Some(b) = &c.baseline {
            series.push(("comparison, every voxel", points(&b.bins), MAGENTA));
        }
        for (name, pts, colour) in series {
            chart
                .draw_series(LineSeries::new(pts.clone(), colour.stroke_width(2)))
                .map_err(|e| plot_err(path, e))?
                .label(name)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], colour));
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, colour.filled())))
                .map_err(|e| plot_err(path, e))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| plot_err(path, e))?;
        root.present().map_err(|e| plot_err(path, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Box plot of per-case Dice for each class.
fn plot_dice(inp: &ReportInputs, path: &Path) -> Result<()> {
    register_font();
    let mut per_class: BTreeMap<u32, Vec<f32>> = BTreeMap::new();
    for r in inp.results {
        for (c, m) in &r.classes {
            per_class.entry(*c).or_default().push(m.dice as f32);
        }
    }
    let names: Vec<String> = per_class
        .keys()
        .map(|c| inp.config.label_name(*c))
        .collect();
    let tmp = path.with_extension("tmp.png");
    {
        let root = BitMapBackend::new(&tmp, (160 + 90 * names.len().max(1) as u32, 420))
            .into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption("Dice per class", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(names.as_slice().into_segmented(), 0f32..1f32)
            .map_err(|e| plot_err(path, e))?;
        chart
            .configure_mesh()
            .y_desc("Dice")
            .x_label_formatter(&|v| match v {
                SegmentValue::CenterOf(name) | SegmentValue::Exact(name) => name.to_string(),
                SegmentValue::Last => String::new(),
            })
            .draw()
            .map_err(|e| plot_err(path, e))?;
        for (name, values) in names.iter().zip(per_class.values()) {
            let q = Quartiles::new(values);
            chart
                .draw_series(std::iter::once(
                    Boxplot::new_vertical(SegmentValue::CenterOf(name), &q).width(30),
                ))
                .map_err(|e| plot_err(path, e))?;
        }
        root.present().map_err(|e| plot_err(path, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// FROC curve of each lesion class, with the operating points read at the standard FP rates.
fn plot_froc(summary: &EvalSummary, path: &Path) -> Result<()> {
    register_font();
    let tmp = path.with_extension("tmp.png");
    {
        let root = BitMapBackend::new(&tmp, (640, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption("FROC", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d((0.1f64..10f64).log_scale(), 0f64..1.02f64)
            .map_err(|e| plot_err(path, e))?;
        chart
            .configure_mesh()
            .x_desc("false positives per scan")
            .y_desc("sensitivity")
            .draw()
            .map_err(|e| plot_err(path, e))?;
        let palette = [RED, BLUE, GREEN, MAGENTA, CYAN, BLACK];
        // At most the 8 classes with the most truth lesions, so the legend stays readable.
        let mut shown: Vec<&LesionSummary> = summary.lesions.values().collect();
        shown.sort_by_key(|e| std::cmp::Reverse(e.truth_lesions));
        shown.truncate(8);
        for (n, e) in shown.into_iter().enumerate() {
            let color = palette[n % palette.len()];
            let points: Vec<(f64, f64)> = e
                .froc
                .curve
                .iter()
                .filter(|p| p[0].is_finite() && p[1].is_finite())
                .map(|p| (p[0].max(0.1), p[1]))
                .collect();
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(|e| plot_err(path, e))?
                .label(e.label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
            chart
                .draw_series(points.iter().map(|p| Circle::new(*p, 3, color.filled())))
                .map_err(|e| plot_err(path, e))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| plot_err(path, e))?;
        root.present().map_err(|e| plot_err(path, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::lesions::LesionMatch;

    use crate::eval::lesions::test_record as lesion;

    #[test]
    fn breakdowns_count_subsets_scans_and_polarities() {
        // Scan a (6 mm slices): a visible ring lesion found, a faint hypo one found, one FP.
        // Scan b (native): a visible hyper lesion missed, two FPs.
        let with = |mut l: LesionRecord, cnr: f64, p: Polarity| {
            l.contrast_to_noise = Some(cnr);
            l.polarity = Some(p);
            l
        };
        let a = LesionMatch {
            truth: vec![
                with(lesion("a", "truth", 1, Some(1)), 8.0, Polarity::Ring),
                with(lesion("a", "truth", 2, Some(2)), 1.5, Polarity::Hypo),
            ],
            pred: vec![
                lesion("a", "pred", 1, Some(1)),
                lesion("a", "pred", 2, Some(2)),
                lesion("a", "pred", 3, None),
            ],
        };
        let b = LesionMatch {
            truth: vec![with(lesion("b", "truth", 1, None), 20.0, Polarity::Hyper)],
            pred: vec![lesion("b", "pred", 1, None), lesion("b", "pred", 2, None)],
        };
        let result = |case: &str, m: LesionMatch, t: Option<f64>| CaseResult {
            case: case.into(),
            missing_prediction: false,
            classes: Vec::new(),
            lesions: vec![(1, m)],
            dims: [1, 1, 1],
            slice_thickness_mm: t,
        };
        // Confidences: the true positive first, then the false positives.
        let mut a = a;
        let mut b = b;
        a.pred[0].confidence = 0.9;
        a.pred[2].confidence = 0.8;
        b.pred[0].confidence = 0.5;
        b.pred[1].confidence = 0.3;
        let results = [result("a", a, Some(6.5)), result("b", b, None)];
        let truth: Vec<&LesionRecord> =
            results.iter().flat_map(|r| &r.lesions[0].1.truth).collect();
        let pred: Vec<&LesionRecord> = results.iter().flat_map(|r| &r.lesions[0].1.pred).collect();

        // CNR >= 3: the ring (found) and the hyper (missed); the prediction on the faint lesion
        // counts neither way, the three unmatched ones are false positives over two scans. At 1
        // FP per scan (2 FPs) the found ring is still in.
        let h = high_contrast(&truth, &pred, 2).unwrap();
        assert_eq!(
            (h.truth_lesions, h.sensitivity, h.fp_per_scan),
            (2, 0.5, 1.5)
        );
        assert_eq!(h.sensitivity_at_1_fp_per_scan, 0.5);

        let by_polarity: Vec<(String, usize, usize)> = polarity_bins(&truth)
            .into_iter()
            .map(|b| (b.polarity, b.truth_lesions, b.detected))
            .collect();
        assert_eq!(
            by_polarity,
            [
                ("hyper".into(), 1, 0),
                ("hypo".into(), 1, 1),
                ("ring".into(), 1, 1)
            ]
        );

        let bins = thickness_bins(1, &results);
        let b6 = bins.iter().find(|b| b.bin == "6-8 mm").unwrap();
        assert_eq!(
            (b6.scans, b6.truth_lesions, b6.detected, b6.false_positives),
            (1, 2, 2, 1)
        );
        let native = bins.iter().find(|b| b.bin == "native").unwrap();
        assert_eq!(
            (native.scans, native.fp_per_scan, native.sensitivity),
            (1, 2.0, 0.0)
        );
        // Without synthetic records there is nothing to break down.
        let plain: Vec<LesionRecord> = truth
            .iter()
            .map(|l| lesion(&l.case, "truth", l.id, l.matched))
            .collect();
        let plain: Vec<&LesionRecord> = plain.iter().collect();
        assert!(high_contrast(&plain, &pred, 2).is_none() && polarity_bins(&plain).is_empty());
    }
}
