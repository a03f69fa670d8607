//! Evaluation outputs: `per_case.csv`, `per_lesion.csv`, `summary.json`, `report.md` and PNG plots
//! (Dice per class as box plots, the FROC curve, an overlay montage of the worst cases).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde_json::{json, Value};

use super::lesions::{detection_scores, froc, LesionRecord, FROC_FP_RATES};
use super::{CaseResult, EvalConfig};
use crate::error::{Error, Result};
use crate::io::nifti::write_atomically;
use crate::train::curves::plot_err;

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

/// Mean, standard deviation, median over the finite values, and how many were NaN.
fn stats(values: &[f64]) -> Value {
    let mut finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    let n = finite.len();
    let nan = values.len() - n;
    if n == 0 {
        return json!({ "mean": null, "std": null, "median": null, "n": 0, "nan": nan });
    }
    let mean = finite.iter().sum::<f64>() / n as f64;
    let std = (finite.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
    let median = super::metrics::percentile(&mut finite, 50.0);
    json!({ "mean": mean, "std": std, "median": median, "n": n, "nan": nan })
}

/// Everything `write_report` needs besides the per-case results.
pub struct ReportInputs<'a> {
    pub config: &'a EvalConfig,
    pub results: &'a [CaseResult],
    /// Cases that could not be evaluated, with the reason.
    pub failed: &'a [(String, String)],
    pub unmatched_predictions: &'a [std::path::PathBuf],
    /// Overlay tiles of the worst cases, already rendered (see [`overlay_tile`]).
    pub worst_tiles: Vec<(String, image::RgbImage)>,
}

/// Builds `summary.json`'s content.
pub fn summarize(inp: &ReportInputs) -> Value {
    let cfg = inp.config;
    let mut classes = BTreeMap::new();
    let mut per_class: BTreeMap<u32, Vec<[f64; 11]>> = BTreeMap::new();
    for r in inp.results {
        for (c, m) in &r.classes {
            per_class.entry(*c).or_default().push(metric_values(m));
        }
    }
    for (c, rows) in &per_class {
        let mut entry = serde_json::Map::new();
        entry.insert("label".into(), json!(cfg.label_name(*c)));
        for (i, name) in METRICS.iter().enumerate() {
            let values: Vec<f64> = rows.iter().map(|r| r[i]).collect();
            entry.insert((*name).into(), stats(&values));
        }
        classes.insert(c.to_string(), Value::Object(entry));
    }
    let mut lesions = BTreeMap::new();
    let scans = inp.results.len();
    let mut by_class: BTreeMap<u32, (Vec<&LesionRecord>, Vec<&LesionRecord>)> = BTreeMap::new();
    for r in inp.results {
        for (c, m) in &r.lesions {
            let e = by_class.entry(*c).or_default();
            e.0.extend(m.truth.iter());
            e.1.extend(m.pred.iter());
        }
    }
    for (c, (truth, pred)) in &by_class {
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
        let mut bins = Vec::new();
        let mut bin_names: Vec<String> = cfg
            .volume_bins_mm3
            .iter()
            .map(|&lo| cfg.volume_bin(lo))
            .collect();
        bin_names.dedup();
        for bin in &bin_names {
            let t: Vec<_> = truth
                .iter()
                .filter(|l| &cfg.volume_bin(l.volume_mm3) == bin)
                .collect();
            let p: Vec<_> = pred
                .iter()
                .filter(|l| &cfg.volume_bin(l.volume_mm3) == bin)
                .collect();
            let detected = t.iter().filter(|l| l.matched.is_some()).count();
            let false_pos = p.iter().filter(|l| l.matched.is_none()).count();
            let (sens, _, _) = detection_scores(detected, 0, t.len() - detected);
            let (_, prec, _) = detection_scores(p.len() - false_pos, false_pos, 0);
            bins.push(json!({
                "bin": bin, "truth_lesions": t.len(), "detected": detected, "sensitivity": sens,
                "pred_lesions": p.len(), "false_positives": false_pos, "precision": prec,
            }));
        }
        // Synthetic truth lesions (lesions.json beside the labels): sensitivity by contrast-to-noise.
        let mut by_cnr = Vec::new();
        if truth.iter().any(|l| l.contrast_to_noise.is_some()) {
            for (i, &lo) in CNR_BINS.iter().enumerate() {
                let hi = CNR_BINS.get(i + 1).copied().unwrap_or(f64::INFINITY);
                let t: Vec<_> = truth
                    .iter()
                    .filter(|l| l.contrast_to_noise.is_some_and(|v| v >= lo && v < hi))
                    .collect();
                let detected = t.iter().filter(|l| l.matched.is_some()).count();
                let (sens, _, _) = detection_scores(detected, 0, t.len() - detected);
                let bin = if hi.is_finite() {
                    format!("{lo}-{hi}")
                } else {
                    format!(">={lo}")
                };
                by_cnr.push(json!({
                    "bin": bin, "truth_lesions": t.len(), "detected": detected, "sensitivity": sens,
                }));
            }
        }
        lesions.insert(
            c.to_string(),
            json!({
                "label": cfg.label_name(*c),
                "truth_lesions": truth.len(), "pred_lesions": pred.len(),
                "tp": tp, "fp": fp, "fn": fn_,
                "sensitivity": sensitivity, "precision": precision, "f1": f1,
                "lesion_dice": stats(&dices),
                "froc": {
                    "fp_per_scan": FROC_FP_RATES, "sensitivity": at, "average": average,
                    "curve": curve.iter().map(|(f, s)| [*f, *s]).collect::<Vec<_>>(),
                },
                "by_volume": bins,
                "by_contrast_to_noise": by_cnr,
            }),
        );
    }
    json!({
        "cases": inp.results.len(),
        "failed_cases": inp.failed.iter().map(|(c, e)| json!({"case": c, "error": e})).collect::<Vec<_>>(),
        "missing_predictions": inp.results.iter().filter(|r| r.missing_prediction).map(|r| &r.case).collect::<Vec<_>>(),
        "unmatched_predictions": inp.unmatched_predictions,
        "settings": inp.config,
        "conventions": "overlap metrics: Metrics Reloaded (both empty = 1, one empty = 0); surface metrics: MONAI (NaN if either mask is empty; NSD 0 if exactly one is empty); aggregates skip NaN and count them",
        "classes": classes,
        "lesions": lesions,
    })
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    write_atomically(path, text.as_bytes())
}

/// Writes every output into `dir`.
pub fn write_report(inp: &ReportInputs, dir: &Path) -> Result<Value> {
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
        "case,class,label,source,id,voxels,volume_mm3,volume_bin,matched_id,iou,dice,confidence,contrast_to_noise\n",
    );
    for r in inp.results {
        for (_, m) in &r.lesions {
            for l in m.truth.iter().chain(&m.pred) {
                let _ = writeln!(
                    csv,
                    "{},{},{},{},{},{},{:.3},{},{},{},{},{},{}",
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
                );
            }
        }
    }
    write_text(&dir.join("per_lesion.csv"), &csv)?;
    let summary = summarize(inp);
    let json = serde_json::to_string_pretty(&summary).unwrap_or_default();
    write_text(&dir.join("summary.json"), &json)?;
    plot_dice(inp, &dir.join("dice_per_class.png"))?;
    plot_froc(&summary, &dir.join("froc.png"))?;
    let montage = !inp.worst_tiles.is_empty();
    if montage {
        save_montage(&inp.worst_tiles, &dir.join("worst_cases.png"))?;
    }
    write_text(&dir.join("report.md"), &markdown(&summary, montage))?;
    Ok(summary)
}

fn f(v: &Value) -> String {
    v.as_f64().map_or("-".into(), |x| format!("{x:.3}"))
}

fn markdown(s: &Value, montage: bool) -> String {
    let mut md = String::from("# Evaluation report\n\n");
    let _ = writeln!(
        md,
        "{} cases. {}\n",
        s["cases"],
        s["conventions"].as_str().unwrap_or_default()
    );
    let missing = s["missing_predictions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !missing.is_empty() {
        let names: Vec<String> = missing
            .iter()
            .map(|m| m.as_str().unwrap_or_default().to_string())
            .collect();
        let _ = writeln!(
            md,
            "**Missing predictions (counted as empty):** {}\n",
            names.join(", ")
        );
    }
    for fc in s["failed_cases"].as_array().cloned().unwrap_or_default() {
        let _ = writeln!(md, "**Failed:** {}: {}\n", fc["case"], fc["error"]);
    }
    md.push_str("## Per class (mean ± std over cases)\n\n| class | Dice | IoU | precision | recall | HD95 mm | ASSD mm | NSD | rel. vol. diff |\n|---|---|---|---|---|---|---|---|---|\n");
    if let Some(classes) = s["classes"].as_object() {
        for (c, e) in classes {
            let ms = |k: &str| format!("{} ± {}", f(&e[k]["mean"]), f(&e[k]["std"]));
            let _ = writeln!(
                md,
                "| {c} {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                e["label"].as_str().unwrap_or_default(),
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
    }
    md.push_str("\n![Dice per class](dice_per_class.png)\n\n## Lesions (pooled over cases)\n\n| class | truth | pred | TP | FP | FN | sensitivity | precision | F1 | lesion Dice | FROC average |\n|---|---|---|---|---|---|---|---|---|---|---|\n");
    if let Some(lesions) = s["lesions"].as_object() {
        for (c, e) in lesions {
            let _ = writeln!(
                md,
                "| {c} {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                e["label"].as_str().unwrap_or_default(),
                e["truth_lesions"],
                e["pred_lesions"],
                e["tp"],
                e["fp"],
                e["fn"],
                f(&e["sensitivity"]),
                f(&e["precision"]),
                f(&e["f1"]),
                f(&e["lesion_dice"]["mean"]),
                f(&e["froc"]["average"]),
            );
        }
        for (c, e) in lesions {
            let cnr = e["by_contrast_to_noise"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if cnr.is_empty() {
                continue;
            }
            let _ = writeln!(md, "\n### Class {c} by contrast-to-noise ratio (synthetic lesions)\n\n| CNR | truth | detected | sensitivity |\n|---|---|---|---|");
            for b in cnr {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} |",
                    b["bin"].as_str().unwrap_or_default(),
                    b["truth_lesions"],
                    b["detected"],
                    f(&b["sensitivity"])
                );
            }
        }
        for (c, e) in lesions {
            let _ = writeln!(md, "\n### Class {c} by lesion volume\n\n| volume | truth | detected | sensitivity | pred | FP | precision |\n|---|---|---|---|---|---|---|");
            for b in e["by_volume"].as_array().cloned().unwrap_or_default() {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} | {} |",
                    b["bin"].as_str().unwrap_or_default(),
                    b["truth_lesions"],
                    b["detected"],
                    f(&b["sensitivity"]),
                    b["pred_lesions"],
                    b["false_positives"],
                    f(&b["precision"])
                );
            }
        }
    }
    md.push_str("\n![FROC](froc.png)\n");
    if montage {
        md.push_str("\n## Worst cases\n\nTruth contours green, prediction red, on the slice with the largest error.\n\n![worst cases](worst_cases.png)\n");
    }
    md
}

/// Box plot of per-case Dice for each class.
fn plot_dice(inp: &ReportInputs, path: &Path) -> Result<()> {
    crate::train::curves::register_font();
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
fn plot_froc(summary: &Value, path: &Path) -> Result<()> {
    crate::train::curves::register_font();
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
        if let Some(lesions) = summary["lesions"].as_object() {
            // At most the 8 classes with the most truth lesions, so the legend stays readable.
            let mut shown: Vec<(&String, &Value)> = lesions.iter().collect();
            shown.sort_by_key(|(_, e)| std::cmp::Reverse(e["truth_lesions"].as_u64().unwrap_or(0)));
            shown.truncate(8);
            for (n, (c, e)) in shown.into_iter().enumerate() {
                let color = palette[n % palette.len()];
                let points: Vec<(f64, f64)> = e["froc"]["curve"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|p| Some((p[0].as_f64()?.max(0.1), p[1].as_f64()?)))
                            .collect()
                    })
                    .unwrap_or_default();
                let _ = c;
                let label = e["label"].as_str().unwrap_or_default().to_string();
                chart
                    .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                    .map_err(|e| plot_err(path, e))?
                    .label(label)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
                chart
                    .draw_series(points.iter().map(|p| Circle::new(*p, 3, color.filled())))
                    .map_err(|e| plot_err(path, e))?;
            }
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

/// A tile: the slice `k` of a `[nk, nj, ni]` scan (grey, windowed to its 1st–99th percentile) with
/// truth (green) and prediction (red) contours, rows flipped so anterior is up for RAS-like grids.
pub fn overlay_tile(
    scan: Option<&[f32]>,
    truth: &[bool],
    pred: &[bool],
    dims: [usize; 3],
    k: usize,
) -> image::RgbImage {
    let [_, nj, ni] = dims;
    let plane = nj * ni;
    let at = |m: &[bool], j: usize, i: usize| m[k * plane + j * ni + i];
    let (lo, hi) = match scan {
        Some(s) => {
            let mut v: Vec<f64> = s[k * plane..(k + 1) * plane]
                .iter()
                .map(|&x| x as f64)
                .collect();
            let lo = super::metrics::percentile(&mut v, 1.0);
            (lo, super::metrics::percentile(&mut v, 99.0).max(lo + 1e-6))
        }
        None => (0.0, 1.0),
    };
    let edge = |m: &[bool], j: usize, i: usize| {
        at(m, j, i)
            && (j == 0
                || i == 0
                || j + 1 == nj
                || i + 1 == ni
                || !at(m, j - 1, i)
                || !at(m, j + 1, i)
                || !at(m, j, i - 1)
                || !at(m, j, i + 1))
    };
    image::RgbImage::from_fn(ni as u32, nj as u32, |x, y| {
        let (i, j) = (x as usize, nj - 1 - y as usize);
        if edge(truth, j, i) {
            return image::Rgb([0, 220, 0]);
        }
        if edge(pred, j, i) {
            return image::Rgb([230, 0, 0]);
        }
        let g = match scan {
            Some(s) => {
                (((s[k * plane + j * ni + i] as f64 - lo) / (hi - lo)).clamp(0.0, 1.0) * 255.0)
                    as u8
            }
            None => 0,
        };
        image::Rgb([g, g, g])
    })
}

/// Tiles side by side (scaled to a common height), written as PNG.
pub fn save_montage(tiles: &[(String, image::RgbImage)], path: &Path) -> Result<()> {
    let height = 256u32;
    let scaled: Vec<image::RgbImage> = tiles
        .iter()
        .map(|(_, t)| {
            let w = (t.width() as f64 * height as f64 / t.height().max(1) as f64)
                .round()
                .max(1.0) as u32;
            image::imageops::resize(t, w, height, image::imageops::FilterType::Nearest)
        })
        .collect();
    let width = scaled.iter().map(|t| t.width() + 4).sum::<u32>().max(1);
    let mut out = image::RgbImage::from_pixel(width, height, image::Rgb([255, 255, 255]));
    let mut x = 0;
    for t in &scaled {
        image::imageops::overlay(&mut out, t, x as i64, 0);
        x += t.width() + 4;
    }
    let mut bytes = Vec::new();
    out.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| plot_err(path, e))?;
    write_atomically(path, &bytes)
}
