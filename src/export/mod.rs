//! What `medseg segment` writes per case, all on the scan's own grid and all atomically: the label
//! map (NIfTI), its label names (JSON sidecar), the lesion table (CSV and JSON), optionally the
//! foreground probability map, an overlay montage, and DICOM objects ([`dicom`]). The label map is
//! written last, so its presence marks a finished case (`--skip-existing`).

pub mod dicom;

use std::path::Path;

use ndarray::{Array3, Axis};

use crate::config::class_values;
use crate::error::Result;
use crate::infer::batch::{BatchInput, CaseDone, Stages};
use crate::infer::postprocess::LesionFilter;
use crate::infer::predictor::Predictor;
use crate::io::layout::{CaseMemory, CaseOutputs, LabelsSidecar, LesionTable};
use crate::io::nifti::{write_label_map, write_nifti};
use crate::io::plot::{overlay_tile, save_montage};
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
    let table = LesionTable {
        case: case.name.clone(),
        lesions: extracted.lesions,
        roi: extracted.roi,
    };
    write_case(
        outputs,
        scan,
        &prediction.labels,
        probabilities.as_ref(),
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
    })
}

/// Writes a case's tables, class names and the asked-for maps (everything but the label map and
/// DICOM objects); `probabilities` is the foreground map on the scan's grid when asked.
pub fn write_case(
    outputs: &CaseOutputs,
    scan: &Volume,
    labels: &Array3<u8>,
    probabilities: Option<&Array3<f32>>,
    table: &LesionTable,
    names: &[String],
) -> Result<()> {
    write_json_atomically(&outputs.lesions_json, table)?;
    write_atomically(&outputs.lesions_csv, table.to_csv().as_bytes())?;
    write_json_atomically(&outputs.labels, &LabelsSidecar::from_names(names))?;
    if let (Some(path), Some(p)) = (&outputs.probabilities, probabilities) {
        let v = Volume::new(
            p.clone().insert_axis(Axis(0)),
            scan.geometry.clone(),
            scan.info.clone(),
        )?;
        write_nifti(&v, path, DataType::Float32)?;
    }
    if let Some(path) = &outputs.overlay {
        // The names were resolved against these classes when the stage ran.
        let organs = table
            .roi
            .as_ref()
            .and_then(|roi| class_values(names, "segment.roi.classes", &roi.classes).ok())
            .unwrap_or_default();
        write_overlay(path, scan, labels, &organs)?;
    }
    Ok(())
}

/// A montage of up to three slices with the most lesion voxels (any class not in `organs`), the
/// lesions outlined in red and the organ classes (the region of interest) in green, on the scan's
/// first channel.
pub fn write_overlay(
    path: &Path,
    scan: &Volume,
    labels: &Array3<u8>,
    organs: &[u32],
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
                    [nk, nj, ni],
                    k,
                ),
            )
        })
        .collect();
    save_montage(&tiles, path)
}
