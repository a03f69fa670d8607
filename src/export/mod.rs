//! What `medseg segment` writes per case, all on the scan's own grid and all atomically: the label
//! map (NIfTI), its label names (JSON sidecar), the lesion table (CSV and JSON), optionally the
//! foreground probability map and an overlay montage. The label map is written last, so its
//! presence marks a finished case (`--skip-existing`).

use std::path::{Path, PathBuf};

use ndarray::{Array3, Axis};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::infer::postprocess::Lesion;
use crate::io::nifti::{write_atomically, write_label_map, write_nifti};
use crate::transforms::spatial::Orientation;
use crate::volume::{DataType, Volume};

/// A file-name-safe case name: ASCII letters, digits, `.`, `_` and `-` kept, anything else `_`,
/// no leading dot (so no `..`, no hidden files, no path separators), at most 100 characters.
pub fn sanitize_name(raw: &str) -> String {
    let mut s: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    while s.starts_with('.') {
        s.remove(0);
    }
    s.truncate(100);
    if s.is_empty() {
        "case".into()
    } else {
        s
    }
}

/// The output name of a NIfTI file: its file name without `.nii` / `.nii.gz`, and without
/// nnU-Net's first-channel suffix `_0000`, so `CASE_0000.nii.gz` gives `CASE` as its label map does.
pub fn nifti_case_name(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let stem = name
        .strip_suffix(".nii.gz")
        .or_else(|| name.strip_suffix(".nii"))
        .unwrap_or(&name);
    let stem = stem
        .strip_suffix("_0000")
        .filter(|s| !s.is_empty())
        .unwrap_or(stem);
    sanitize_name(stem)
}

/// The output name of a DICOM series: its description (never a patient tag) and a short hash of
/// its SeriesInstanceUID, which keeps series apart without writing the UID itself.
pub fn dicom_case_name(description: &str, uid: &str) -> String {
    let hash: String = Sha256::digest(uid.as_bytes())[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let description = description.trim();
    let base = if description.is_empty() {
        "series"
    } else {
        description
    };
    sanitize_name(&format!("{base}-{hash}"))
}

/// The files of one case in the output directory.
#[derive(Debug, Clone)]
pub struct CaseOutputs {
    pub mask: PathBuf,
    pub labels: PathBuf,
    pub lesions_csv: PathBuf,
    pub lesions_json: PathBuf,
    pub probabilities: Option<PathBuf>,
    pub overlay: Option<PathBuf>,
}

impl CaseOutputs {
    pub fn new(dir: &Path, name: &str, probabilities: bool, overlay: bool) -> Self {
        CaseOutputs {
            mask: dir.join(format!("{name}.nii.gz")),
            labels: dir.join(format!("{name}_labels.json")),
            lesions_csv: dir.join(format!("{name}_lesions.csv")),
            lesions_json: dir.join(format!("{name}_lesions.json")),
            probabilities: probabilities.then(|| dir.join(format!("{name}_probabilities.nii.gz"))),
            overlay: overlay.then(|| dir.join(format!("{name}_overlay.png"))),
        }
    }

    /// Every file exists (the mask is written last, but a rerun may have asked for more).
    pub fn complete(&self) -> bool {
        [
            &self.mask,
            &self.labels,
            &self.lesions_csv,
            &self.lesions_json,
        ]
        .into_iter()
        .chain(self.probabilities.iter())
        .chain(self.overlay.iter())
        .all(|p| p.is_file())
    }
}

fn json_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Write {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Writes a case's outputs; `probabilities` is the foreground map on the scan's grid when asked.
pub fn write_case(
    outputs: &CaseOutputs,
    case: &str,
    scan: &Volume,
    labels: &Array3<u8>,
    probabilities: Option<&Array3<f32>>,
    lesions: &[Lesion],
    names: &[String],
) -> Result<()> {
    let table = serde_json::json!({ "case": case, "lesions": lesions });
    let json = serde_json::to_vec_pretty(&table).map_err(|e| json_err(&outputs.lesions_json, e))?;
    write_atomically(&outputs.lesions_json, &json)?;
    write_atomically(&outputs.lesions_csv, lesion_csv(case, lesions).as_bytes())?;
    let sidecar = serde_json::json!({
        "labels": names.iter().enumerate().map(|(v, n)| (v.to_string(), serde_json::Value::from(n.clone()))).collect::<serde_json::Map<String, serde_json::Value>>(),
    });
    let sidecar = serde_json::to_vec_pretty(&sidecar).map_err(|e| json_err(&outputs.labels, e))?;
    write_atomically(&outputs.labels, &sidecar)?;
    if let (Some(path), Some(p)) = (&outputs.probabilities, probabilities) {
        let v = Volume::new(
            p.clone().insert_axis(Axis(0)),
            scan.geometry.clone(),
            scan.info.clone(),
        )?;
        write_nifti(&v, path, DataType::Float32)?;
    }
    if let Some(path) = &outputs.overlay {
        write_overlay(path, scan, labels)?;
    }
    // Labels are u8 (at most 256 classes), written as uint8 straight from their bytes.
    write_label_map(labels, &scan.geometry, &outputs.mask)
}

/// The lesion table as CSV, one row per lesion.
pub fn lesion_csv(case: &str, lesions: &[Lesion]) -> String {
    let mut out = String::from(
        "case,id,class,label,voxels,volume_mm3,centroid_x_mm,centroid_y_mm,centroid_z_mm,\
         bbox_i_min,bbox_j_min,bbox_k_min,bbox_i_max,bbox_j_max,bbox_k_max,\
         bbox_x_min_mm,bbox_y_min_mm,bbox_z_min_mm,bbox_x_max_mm,bbox_y_max_mm,bbox_z_max_mm,\
         diameter_mm,mean_probability,max_probability\n",
    );
    for l in lesions {
        let [c0, c1, c2] = l.centroid_mm;
        let [lo, hi] = l.bbox_voxel;
        let [wlo, whi] = l.bbox_mm;
        out.push_str(&format!(
            "{case},{},{},{},{},{:.3},{c0:.3},{c1:.3},{c2:.3},{},{},{},{},{},{},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.4},{:.4}\n",
            l.id, l.class, l.label.replace(',', " "), l.voxels, l.volume_mm3,
            lo[0], lo[1], lo[2], hi[0], hi[1], hi[2],
            wlo[0], wlo[1], wlo[2], whi[0], whi[1], whi[2],
            l.diameter_mm, l.mean_probability, l.max_probability
        ));
    }
    out
}

/// A montage of up to three slices with the most foreground, the mask outlined in red on the
/// scan's first channel.
pub fn write_overlay(path: &Path, scan: &Volume, labels: &Array3<u8>) -> Result<()> {
    // Drawn on the RAS-reoriented grid so every montage shows anterior up, whatever the storage
    // order of the scan.
    let orientation = Orientation::of(&scan.geometry);
    let labels = orientation
        .apply(labels.view().insert_axis(Axis(0)))
        .index_axis_move(Axis(0), 0);
    let voxels = orientation.apply(scan.voxels.view());
    let (nk, nj, ni) = labels.dim();
    let plane = nj * ni;
    let flat: Vec<bool> = labels.iter().map(|l| *l > 0).collect();
    let mut by_area: Vec<(usize, usize)> = (0..nk)
        .map(|k| {
            (
                flat[k * plane..(k + 1) * plane]
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
    let none = vec![false; flat.len()];
    let tiles: Vec<(String, image::RgbImage)> = slices
        .into_iter()
        .map(|k| {
            (
                format!("slice {k}"),
                crate::eval::report::overlay_tile(
                    Some(&scan_values),
                    &none,
                    &flat,
                    [nk, nj, ni],
                    k,
                ),
            )
        })
        .collect();
    crate::eval::report::save_montage(&tiles, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_safe_and_carry_no_uid() {
        assert_eq!(sanitize_name("../../etc/passwd"), "_.._etc_passwd");
        assert_eq!(sanitize_name("Müller, Hans"), "M_ller__Hans");
        assert_eq!(sanitize_name(""), "case");
        assert_eq!(nifti_case_name(Path::new("/x/ct_001.nii.gz")), "ct_001");
        assert_eq!(
            nifti_case_name(Path::new("/x/lung_007_0000.nii.gz")),
            "lung_007"
        );
        let n = dicom_case_name("ABDOMEN 3.0 B30f", "1.2.840.1");
        assert!(
            n.starts_with("ABDOMEN_3.0_B30f-") && !n.contains("1.2.840"),
            "{n}"
        );
        assert_ne!(n, dicom_case_name("ABDOMEN 3.0 B30f", "1.2.840.2"));
    }
}
