//! What `medseg segment` writes per case, all on the scan's own grid and all atomically: the label
//! map (NIfTI), its label names (JSON sidecar), the lesion table (CSV and JSON), optionally the
//! foreground probability map, an overlay montage, and DICOM objects ([`dicom`]). The label map is
//! written last, so its presence marks a finished case (`--skip-existing`).

pub mod cv;
pub mod dicom;

use std::path::Path;

use ndarray::{Array3, Array4, Axis};

use crate::config::class_values;
use crate::error::Result;
use crate::infer::batch::{BatchInput, CaseDone, Stages};
use crate::infer::postprocess::LesionFilter;
use crate::infer::predictor::Predictor;
use crate::io::layout::{CaseMemory, CaseOutputs, LabelsSidecar, Lesion, LesionTable};
use crate::io::nifti::{write_label_map, write_nifti};
use crate::io::plot::{overlay_tile, save_montage_with_legend};
use crate::io::{write_atomically, write_json_atomically};
use crate::transforms::intensity::display_window;
use crate::transforms::spatial::Orientation;
use crate::volume::{DataType, Volume};

use self::dicom::DicomExport;

/// Segments one scan with `predictor` (lesions measured after `filter`) and writes its outputs,
/// DICOM objects as `dicom` describes; returns the lesion count and the scan's warnings. Stages
/// are timed into `stages`.
pub fn segment_case(
    predictor: &Predictor,
    filter: &LesionFilter,
    outputs: &CaseOutputs,
    case: &BatchInput,
    scan: &Volume,
    dicom: &DicomExport,
    stages: &mut Stages,
) -> Result<CaseDone> {
    let mut prediction = predictor.predict(scan)?;
    stages.lap("predict");
    let extracted = prediction.lesions(&predictor.labels, filter);
    stages.lap("lesions");
    let count = extracted.lesions.len();
    let probabilities = outputs
        .probabilities
        .is_some()
        .then(|| prediction.foreground_probability());
    let findings = predictor.finding_classes_for_threshold();
    let findings = (outputs.finding_probabilities.is_some() && !findings.is_empty())
        .then(|| prediction.class_probabilities(&findings));
    let table = LesionTable {
        case: case.name.clone(),
        lesions: extracted.lesions,
        roi: extracted.roi,
        temperature: Some(predictor.temperature.value()),
    };
    let maps = CaseMaps {
        probabilities,
        findings,
        uncertainty: outputs
            .uncertainty
            .is_some()
            .then(|| prediction.uncertainty_map())
            .flatten(),
        attention: prediction.attention.take(),
    };
    write_case(
        outputs,
        scan,
        &prediction.labels,
        maps,
        &table,
        &predictor.labels,
    )?;
    let mut warnings = prediction.warnings;
    // DICOM objects before the label map, which marks the case done; when they cannot be written
    // the label map still is, and a refusal fails the case after it.
    let mut refusal = None;
    let mut mask_needed = outputs.nifti;
    if outputs.seg.is_some() || outputs.rtstruct.is_some() {
        match dicom.source_for(case.source(), scan) {
            Ok(Some(series)) => {
                warnings.extend(dicom.write(outputs, &series, &prediction.labels, &table)?);
            }
            Ok(None) => {
                warnings.push(
                    "not a DICOM scan: DICOM-SEG/RTSTRUCT skipped (give --reference-series DIR to place them on a series); the NIfTI mask was written".into(),
                );
                mask_needed = true;
            }
            Err(e) => {
                refusal = Some(e);
                mask_needed = true;
            }
        }
    }
    if mask_needed {
        // Labels are u8 (at most 256 classes), written as uint8 straight from their bytes.
        write_label_map(&prediction.labels, &scan.geometry, &outputs.mask)?;
    }
    stages.lap("write");
    if let Some(e) = refusal {
        return Err(e);
    }
    let memory = prediction.memory.map(|m| CaseMemory {
        measured_peak_bytes: predictor.measured_peak(),
        ..m
    });
    Ok(CaseDone {
        lesions: count,
        warnings,
        memory,
        // Two decimals: the candidates are 0.05 apart.
        threshold: prediction
            .threshold
            .map(|t| (t as f64 * 100.0).round() / 100.0),
    })
}

/// The float maps of a case on the scan's grid, each present when asked for (owned: each moves
/// into its file's volume, so CT-sized maps are not copied).
#[derive(Default)]
pub struct CaseMaps {
    /// The foreground probability `[k, j, i]`.
    pub probabilities: Option<Array3<f32>>,
    /// Each finding class's probability `[F, k, j, i]`.
    pub findings: Option<Array4<f32>>,
    /// Entropy and variance `[2, k, j, i]`.
    pub uncertainty: Option<Array4<f32>>,
    /// The attention map `[k, j, i]`.
    pub attention: Option<Array3<f32>>,
}

/// Writes a case's tables, class names and the asked-for maps (everything but the label map and
/// DICOM objects), all on the scan's grid.
pub fn write_case(
    outputs: &CaseOutputs,
    scan: &Volume,
    labels: &Array3<u8>,
    maps: CaseMaps,
    table: &LesionTable,
    names: &[String],
) -> Result<()> {
    write_json_atomically(&outputs.lesions_json, table)?;
    write_atomically(&outputs.lesions_csv, table.to_csv().as_bytes())?;
    write_json_atomically(&outputs.labels, &LabelsSidecar::from_names(names))?;
    if let Some(path) = &outputs.overlay {
        // The names were resolved against these classes when the stage ran.
        let organs = table
            .roi
            .as_ref()
            .and_then(|roi| class_values(names, "segment.roi.classes", &roi.classes).ok())
            .unwrap_or_default();
        let attention = maps.attention.as_ref();
        write_overlay(path, scan, labels, &organs, attention, &table.lesions)?;
    }
    let write_map = |path: &Option<std::path::PathBuf>, map: Option<Array4<f32>>| -> Result<()> {
        if let (Some(path), Some(map)) = (path, map) {
            let v = Volume::new(map, scan.geometry.clone(), scan.info.clone())?;
            write_nifti(&v, path, DataType::Float32)?;
        }
        Ok(())
    };
    let single = |m: Option<Array3<f32>>| m.map(|m| m.insert_axis(Axis(0)));
    write_map(&outputs.probabilities, single(maps.probabilities))?;
    write_map(&outputs.finding_probabilities, maps.findings)?;
    write_map(&outputs.uncertainty, maps.uncertainty)?;
    write_map(&outputs.attention, single(maps.attention))
}

/// Lesions listed under an overlay at most.
const LEGEND_LESIONS: usize = 8;

/// A montage of up to three slices with the most lesion voxels (any class not in `organs`), the
/// lesions outlined in red, the organ classes (the region of interest) in green and the attention
/// map, when given, tinted yellow, on the scan's first channel; below it a legend of the lesions
/// in the table's order (most confident first).
pub fn write_overlay(
    path: &Path,
    scan: &Volume,
    labels: &Array3<u8>,
    organs: &[u32],
    attention: Option<&Array3<f32>>,
    lesions: &[Lesion],
) -> Result<()> {
    // Drawn on the RAS-reoriented grid so every montage shows anterior up, whatever the storage
    // order of the scan.
    let orientation = Orientation::of(&scan.geometry);
    let labels = orientation
        .apply(labels.view().insert_axis(Axis(0)))
        .index_axis_move(Axis(0), 0);
    let voxels = orientation.apply(scan.voxels.view());
    let (nk, nj, ni) = labels.dim();
    let plane = nj * ni;
    let flat: Vec<bool> = labels
        .iter()
        .map(|l| *l > 0 && !organs.contains(&(*l as u32)))
        .collect();
    let organ: Vec<bool> = labels
        .iter()
        .map(|l| organs.contains(&(*l as u32)))
        .collect();
    // Slices with the most lesion voxels; without lesions, the most organ.
    let ranked = if flat.iter().any(|v| *v) {
        &flat
    } else {
        &organ
    };
    let mut by_area: Vec<(usize, usize)> = (0..nk)
        .map(|k| {
            (
                ranked[k * plane..(k + 1) * plane]
                    .iter()
                    .filter(|v| **v)
                    .count(),
                k,
            )
        })
        .collect();
    by_area.sort_by(|a, b| b.cmp(a));
    let mut slices: Vec<usize> = by_area.iter().take(3).map(|(_, k)| *k).collect();
    slices.sort_unstable();
    let channel = voxels.index_axis(Axis(0), 0);
    let scan_values: Vec<f32> = channel.iter().copied().collect();
    // The tint spans the map's own range over the windows that were run (it is 0 elsewhere),
    // so a nearly uniform map does not cover the scan.
    let heat: Option<Vec<f32>> = attention.map(|a| {
        let (lo, hi) = a
            .iter()
            .filter(|v| **v > 0.0)
            .fold((f32::INFINITY, 0.0f32), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
        let span = hi - lo;
        orientation
            .apply(a.view().insert_axis(Axis(0)))
            .iter()
            .map(|&v| {
                if span > 1e-3 && v > 0.0 {
                    (v - lo) / span
                } else {
                    0.0
                }
            })
            .collect()
    });
    let window = |k: usize| display_window(&scan_values[k * plane..(k + 1) * plane]);
    let tiles: Vec<(String, image::RgbImage)> = slices
        .into_iter()
        .map(|k| {
            (
                format!("slice {k}"),
                overlay_tile(
                    Some((&scan_values, window(k))),
                    &organ,
                    &flat,
                    heat.as_deref(),
                    [nk, nj, ni],
                    k,
                ),
            )
        })
        .collect();
    save_montage_with_legend(&tiles, &legend(lesions, organs, attention.is_some()), path)
}

/// The overlay's legend: the colours, then the lesions (not the organ classes) as the table
/// orders them.
fn legend(lesions: &[Lesion], organs: &[u32], attention: bool) -> Vec<String> {
    let mut lines = vec![format!(
        "red: findings{}{}",
        if organs.is_empty() {
            ""
        } else {
            ", green: region of interest"
        },
        if attention { ", yellow: attention" } else { "" }
    )];
    let found: Vec<&Lesion> = lesions
        .iter()
        .filter(|l| !organs.contains(&l.class))
        .collect();
    for l in found.iter().take(LEGEND_LESIONS) {
        let uncertainty = match (l.detection_agreement, l.mean_entropy) {
            (Some(a), Some(h)) => {
                format!(", found by {:.0} % of passes, entropy {h:.2}", 100.0 * a)
            }
            _ => String::new(),
        };
        lines.push(format!(
            "#{} {}: {:.1} mm, confidence {:.2}{uncertainty}",
            l.id,
            l.label,
            l.diameter_mm,
            l.confidence.unwrap_or(l.max_probability)
        ));
    }
    if found.len() > LEGEND_LESIONS {
        lines.push(format!(
            "... {} more in the lesion table",
            found.len() - LEGEND_LESIONS
        ));
    }
    lines
}
