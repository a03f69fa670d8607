//! Calibration of predicted probabilities against truth: voxel-wise, from the foreground
//! probability maps `medseg segment --save-probabilities` writes (`CASE_probabilities.nii.gz`),
//! overall and within a band around the truth's boundary (where calibration matters), and
//! lesion-wise, from the detection confidences of the lesion matching.
//!
//! Binning, ECE and Brier score are those of [`crate::infer::calibration`].

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::lesions::LesionRecord;
use super::CasePair;
use crate::error::Result;
use crate::infer::calibration::{Reliability, ReliabilityBin};
use crate::io::layout::{CaseOutputs, LesionTable};
use crate::io::{read_json, read_nifti};
use crate::transforms::post::dilate_mm;

/// Half-width of the band around the truth's boundary, mm.
pub const BOUNDARY_BAND_MM: f64 = 10.0;

/// Voxel-wise reliability of the probability maps of a set of cases.
#[derive(Debug, Clone, Default)]
pub struct VoxelCalibration {
    /// Every voxel.
    pub overall: Reliability,
    /// Voxels within [`BOUNDARY_BAND_MM`] of the truth's foreground boundary (inside or out).
    pub boundary: Reliability,
    /// Cases whose probability map was used.
    pub cases: usize,
    /// Cases without a usable map, with the reason.
    pub skipped: Vec<String>,
    /// The temperature the maps were made with, when their lesion tables say (and agree).
    pub temperature: Option<f64>,
}

/// `summary.json`'s `calibration`: of the foreground probability, 15 equal-width bins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationSummary {
    /// Expected calibration error over every voxel.
    pub ece: Option<f64>,
    /// ECE within 10 mm of the truth's boundary.
    pub ece_boundary: Option<f64>,
    /// Brier score over every voxel.
    pub brier: Option<f64>,
    /// Brier score within the band.
    pub brier_boundary: Option<f64>,
    /// ECE of the predicted lesions' confidences against whether they matched a truth lesion.
    pub lesion_ece: Option<f64>,
    /// Cases with a probability map.
    pub cases: usize,
    /// Cases without one (or on another grid), with the reason.
    pub skipped: Vec<String>,
    /// The temperature of the maps, when known.
    pub temperature: Option<f64>,
    /// Reliability diagram over every voxel.
    pub bins: Vec<ReliabilityBin>,
    /// Within the band.
    pub boundary_bins: Vec<ReliabilityBin>,
    /// Of the lesion confidences.
    pub lesion_bins: Vec<ReliabilityBin>,
    /// The same figures for the predictions given with `--compare-calibration` (e.g. made at
    /// temperature 1), when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Box<CalibrationSummary>>,
}

/// Reliability of one case's foreground probability `prob` against its truth labels (both
/// `[nk, nj, ni]` flattened, spacing in array order).
pub fn case_reliability(
    truth: &[u32],
    prob: &[f32],
    dims: [usize; 3],
    spacing: [f64; 3],
) -> (Reliability, Reliability) {
    let fg: Vec<bool> = truth.iter().map(|&t| t > 0).collect();
    let grown = dilate_mm(&fg, dims, spacing, BOUNDARY_BAND_MM);
    let outside: Vec<bool> = fg.iter().map(|f| !f).collect();
    let shrunk_out = dilate_mm(&outside, dims, spacing, BOUNDARY_BAND_MM);
    let mut overall = Reliability::default();
    let mut boundary = Reliability::default();
    for (n, (&y, &p)) in fg.iter().zip(prob).enumerate() {
        overall.add(p as f64, y, 1.0);
        // Within the band: reached by the grown truth and by the grown background.
        if grown[n] && shrunk_out[n] {
            boundary.add(p as f64, y, 1.0);
        }
    }
    (overall, boundary)
}

/// The voxel-wise calibration of the probability maps in `dir` for the cases of `pairs`, or
/// `None` when no case has a map there.
pub fn voxel_calibration(
    pairs: &[CasePair],
    dir: &Path,
    grid_tolerance_mm: f64,
) -> Result<Option<VoxelCalibration>> {
    let mut out = VoxelCalibration::default();
    let mut temperatures = Vec::new();
    let mut any = false;
    for pair in pairs {
        let outputs = CaseOutputs::new(dir, &pair.case, true, false);
        let Some(path) = outputs.probabilities.filter(|p| p.is_file()) else {
            out.skipped.push(format!(
                "{}: no probability map in {}",
                pair.case,
                dir.display()
            ));
            continue;
        };
        any = true;
        if let Ok(table) = read_json::<LesionTable>(&outputs.lesions_json) {
            temperatures.extend(table.temperature);
        }
        let truth = read_nifti(&pair.truth)?;
        let prob = match read_nifti(&path) {
            Ok(p) => p,
            Err(e) => {
                out.skipped.push(format!("{}: {e}", pair.case));
                continue;
            }
        };
        let same_grid = matches!(truth.geometry.max_affine_difference(&prob.geometry), Some(d) if d <= grid_tolerance_mm)
            && prob.voxels.dim().0 == 1;
        if !same_grid {
            out.skipped.push(format!(
                "{}: {} is not one map on the truth's grid",
                pair.case,
                path.display()
            ));
            continue;
        }
        let labels: Vec<u32> = truth
            .voxels
            .iter()
            .map(|&x| if x > 0.0 { x.round() as u32 } else { 0 })
            .collect();
        let p: Vec<f32> = prob.voxels.iter().copied().collect();
        let (overall, boundary) = case_reliability(
            &labels,
            &p,
            truth.geometry.shape(),
            truth.geometry.array_spacing(),
        );
        out.overall.merge(&overall);
        out.boundary.merge(&boundary);
        out.cases += 1;
    }
    if let Some(&t) = temperatures.first() {
        if temperatures.iter().all(|&x| (x - t).abs() < 1e-9) {
            out.temperature = Some(t);
        }
    }
    Ok(any.then_some(out))
}

/// Reliability of predicted lesions' confidences: a lesion is a hit when it matched a truth one.
pub fn lesion_reliability<'a>(pred: impl Iterator<Item = &'a LesionRecord>) -> Reliability {
    let mut r = Reliability::default();
    for l in pred {
        r.add(l.confidence, l.matched.is_some(), 1.0);
    }
    r
}

impl CalibrationSummary {
    /// The summary of `voxels` and of the predicted `lesions`' reliability.
    pub fn new(voxels: &VoxelCalibration, lesions: &Reliability) -> Self {
        CalibrationSummary {
            ece: voxels.overall.ece(),
            ece_boundary: voxels.boundary.ece(),
            brier: voxels.overall.brier(),
            brier_boundary: voxels.boundary.brier(),
            lesion_ece: lesions.ece(),
            cases: voxels.cases,
            skipped: voxels.skipped.clone(),
            temperature: voxels.temperature,
            bins: voxels.overall.bins(),
            boundary_bins: voxels.boundary.bins(),
            lesion_bins: lesions.bins(),
            baseline: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row of 60 voxels of 1 mm, truth on voxels 20..30: the band (within 10 mm of the
    /// foreground and of the background) is voxels 10..40.
    #[test]
    fn the_boundary_band_holds_the_voxels_near_the_truth_edge() {
        let dims = [1, 1, 60];
        let truth: Vec<u32> = (0..60).map(|i| (20..30).contains(&i) as u32).collect();
        let prob: Vec<f32> = truth
            .iter()
            .map(|&t| if t > 0 { 0.9 } else { 0.1 })
            .collect();
        let (overall, band) = case_reliability(&truth, &prob, dims, [1.0; 3]);
        assert_eq!(overall.counts.iter().sum::<u64>(), 60);
        // Voxels 10..40 are within 10 mm of the foreground and of the background.
        assert_eq!(band.counts.iter().sum::<u64>(), 30);
        // 0.1 on background (share 0) and 0.9 on foreground (share 1): ECE 0.1 both ways.
        assert!((overall.ece().unwrap() - 0.1).abs() < 1e-6);
        assert!((band.ece().unwrap() - 0.1).abs() < 1e-6);
        // Without truth there is no boundary.
        let (_, none) = case_reliability(&[0; 60], &prob, dims, [1.0; 3]);
        assert_eq!(none.ece(), None);
    }
}
