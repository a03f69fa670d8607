//! Evaluation of predicted label maps against truth: overlap and surface metrics in mm per case and
//! class ([`metrics`]), lesion-wise detection with FROC ([`lesions`]), and the report ([`report`]).
//!
//! Metrics accumulate per case, then aggregate (MONAI's cumulative-metric pattern).

pub mod lesions;
pub mod metrics;
pub mod report;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::io::read_nifti;
use crate::volume::Volume;
use lesions::{match_lesions, LesionGrid, LesionMatch, VoxelBox};
use metrics::{class_metrics, ClassMetrics};

/// Evaluation settings (`[evaluate]` in a run config, or a file of its own).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Class names by label value (`labels[0]` is the background), as in a Decathlon dataset.json.
    pub labels: Vec<String>,
    /// Classes to evaluate; default: every non-zero label in the truth or the prediction.
    pub classes: Option<Vec<u32>>,
    /// Classes that also get lesion-wise (connected-component) evaluation; default: all evaluated.
    pub lesion_classes: Option<Vec<u32>>,
    /// Tolerance τ of the normalised surface Dice, mm.
    pub nsd_tolerance_mm: f64,
    /// A truth and a predicted lesion match when their IoU exceeds this (0 = any overlap).
    pub lesion_iou_threshold: f64,
    /// Lower edges of the lesion-volume bins, mm³; the last bin is open-ended.
    pub volume_bins_mm3: Vec<f64>,
    /// Largest affine difference (mm) for a prediction to count as on the truth's grid.
    pub grid_tolerance_mm: f64,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            labels: Vec::new(),
            classes: None,
            lesion_classes: None,
            nsd_tolerance_mm: 2.0,
            lesion_iou_threshold: 0.0,
            // Spheres of 5, 10, 20 and 30 mm diameter: the size classes of nodule and metastasis
            // reporting (e.g. Fleischner 6/8 mm thresholds fall in the second bin).
            volume_bins_mm3: vec![0.0, 65.4, 523.6, 4188.8, 14137.2],
            grid_tolerance_mm: 1e-3,
        }
    }
}

impl EvalConfig {
    /// Reads the `[evaluate]` table of a TOML file (or the whole file when it has none).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value: toml::Value = toml::from_str(&text).map_err(|e| Error::Config {
            reason: format!("{}: {e}", path.display()),
        })?;
        let table = value.get("evaluate").cloned().unwrap_or(value);
        table
            .try_into()
            .map_err(|e: toml::de::Error| Error::Config {
                reason: format!("{}: {e}", path.display()),
            })
    }

    pub fn label_name(&self, class: u32) -> String {
        self.labels
            .get(class as usize)
            .cloned()
            .unwrap_or_else(|| format!("class {class}"))
    }

    /// The bin a volume falls in, as a label like `"65-524 mm³"`.
    pub fn volume_bin(&self, mm3: f64) -> String {
        let b = &self.volume_bins_mm3;
        let i = b.iter().rposition(|&lo| mm3 >= lo).unwrap_or(0);
        match b.get(i + 1) {
            Some(hi) => format!("{:.0}-{:.0} mm3", b[i], hi),
            None => format!(">={:.0} mm3", b.get(i).copied().unwrap_or(0.0)),
        }
    }
}

/// A truth / prediction pair found by case name.
#[derive(Debug, Clone)]
pub struct CasePair {
    pub case: String,
    pub truth: PathBuf,
    /// `None` when the prediction is missing (it counts as empty).
    pub pred: Option<PathBuf>,
}

/// Case name of a NIfTI path: the file name without `.nii` / `.nii.gz`.
pub fn case_name(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_string_lossy().to_string();
    let stem = name
        .strip_suffix(".nii.gz")
        .or_else(|| name.strip_suffix(".nii"))?;
    Some(stem.to_string())
}

fn nifti_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && case_name(p).is_some())
        .collect();
    files.sort();
    Ok(files)
}

/// Pairs every truth file with the prediction of the same case name; predictions without truth are
/// returned apart.
pub fn pair_cases(pred_dir: &Path, truth_dir: &Path) -> Result<(Vec<CasePair>, Vec<PathBuf>)> {
    let truth = nifti_files(truth_dir)?;
    if truth.is_empty() {
        return Err(Error::NothingFound {
            path: truth_dir.to_path_buf(),
            detail: " (no .nii or .nii.gz truth files)".into(),
        });
    }
    let preds = nifti_files(pred_dir)?;
    let truth_names: BTreeSet<String> = truth.iter().filter_map(|p| case_name(p)).collect();
    let pairs = truth
        .iter()
        .filter_map(|t| {
            let case = case_name(t)?;
            let pred = preds
                .iter()
                .find(|p| case_name(p).as_deref() == Some(case.as_str()))
                .cloned();
            Some(CasePair {
                case,
                truth: t.clone(),
                pred,
            })
        })
        .collect();
    // Sidecars of medseg segment (probabilities) are not cases of their own.
    let unmatched = preds
        .into_iter()
        .filter(|p| {
            let name = case_name(p).unwrap_or_default();
            !truth_names.contains(&name) && !name.ends_with("_probabilities")
        })
        .collect();
    Ok((pairs, unmatched))
}

/// Results of one case.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub case: String,
    pub missing_prediction: bool,
    pub classes: Vec<(u32, ClassMetrics)>,
    pub lesions: Vec<(u32, LesionMatch)>,
    /// Spacing `[sk, sj, si]` and grid `[nk, nj, ni]`, for the overlay montage.
    pub dims: [usize; 3],
}

fn labels_of(v: &Volume) -> Vec<u32> {
    v.voxels
        .iter()
        .map(|&x| if x > 0.0 { x.round() as u32 } else { 0 })
        .collect()
}

/// One row of a lesion table beside a prediction (`CASE_lesions.json`, as `medseg segment` writes
/// it): `{"lesions": [{"class": 1, "bbox_voxel": [[i0, j0, k0], [i1, j1, k1]], "confidence": 0.9}]}`
/// with an inclusive voxel bounding box; `max_probability` stands in when `confidence` is absent.
#[derive(Debug, Clone, Deserialize)]
pub struct LesionTableRow {
    pub class: u32,
    pub bbox_voxel: [[usize; 3]; 2],
    #[serde(default)]
    pub confidence: Option<f64>,
    #[serde(default)]
    pub max_probability: Option<f64>,
}

#[derive(Deserialize)]
struct LesionTable {
    lesions: Vec<LesionTableRow>,
}

fn lesion_table(pair: &CasePair) -> Result<Option<Vec<LesionTableRow>>> {
    let Some(dir) = pair.pred.as_ref().and_then(|p| p.parent()) else {
        return Ok(None);
    };
    let path = dir.join(format!("{}_lesions.json", pair.case));
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let table: LesionTable = serde_json::from_str(&text).map_err(|e| Error::Config {
        reason: format!("{}: not a lesion table: {e}", path.display()),
    })?;
    Ok(Some(table.lesions))
}

/// A lesion as `medseg synth` records it in `lesions.json` (other fields are ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct SynthLesion {
    pub case: String,
    pub bbox_voxel: VoxelBox,
    pub contrast_to_noise: f64,
}

#[derive(Deserialize)]
struct SynthLesions {
    lesions: Vec<SynthLesion>,
}

/// The synthetic lesions of a dataset whose label maps are in `truth_dir`: `lesions.json` beside
/// `labelsTs/` (or `labelsTr/`), as `medseg synth` writes it. `None` when there is none or it is
/// another kind of file.
pub fn synth_lesions(truth_dir: &Path) -> Option<Vec<SynthLesion>> {
    let path = truth_dir.parent()?.join("lesions.json");
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str::<SynthLesions>(&text)
        .ok()
        .map(|l| l.lesions)
}

/// Gives each truth lesion of `m` the contrast-to-noise ratio of the synthetic lesion whose label
/// box holds it (a lesion's label may split into several components).
pub fn attach_contrast_to_noise(m: &mut LesionMatch, synth: &[SynthLesion]) {
    for t in &mut m.truth {
        let [lo, hi] = t.bbox_voxel;
        t.contrast_to_noise = synth
            .iter()
            .find(|s| {
                s.case == t.case
                    && (0..3).all(|a| s.bbox_voxel[0][a] <= lo[a] && hi[a] <= s.bbox_voxel[1][a])
            })
            .map(|s| s.contrast_to_noise);
    }
}

/// Confidence per predicted lesion from a probability map beside the prediction
/// (`CASE_probabilities.nii.gz`: the lesion's maximum), else 1.
fn confidence_source(pair: &CasePair, dims: [usize; 3]) -> Option<Vec<f32>> {
    let pred = pair.pred.as_ref()?;
    let dir = pred.parent()?;
    let path = [".nii.gz", ".nii"]
        .iter()
        .map(|ext| dir.join(format!("{}_probabilities{ext}", pair.case)))
        .find(|p| p.exists())?;
    let prob = read_nifti(&path).ok()?;
    let g = prob.geometry.dims;
    ([g[2], g[1], g[0]] == dims).then(|| prob.voxels.iter().copied().collect())
}

/// Evaluates one case: every class's metrics and, for lesion classes, the lesion matching.
pub fn evaluate_case(
    pair: &CasePair,
    config: &EvalConfig,
    synth: Option<&[SynthLesion]>,
) -> Result<CaseResult> {
    let truth = read_nifti(&pair.truth)?;
    let pred = match &pair.pred {
        Some(p) => Some(read_nifti(p)?),
        None => None,
    };
    let g = truth.geometry.dims;
    let dims = [g[2], g[1], g[0]];
    if let Some(p) = &pred {
        let diff = truth.geometry.max_affine_difference(&p.geometry);
        if !matches!(diff, Some(d) if d <= config.grid_tolerance_mm) {
            return Err(Error::Unsupported {
                path: pair.pred.clone().unwrap_or_default(),
                reason: format!(
                    "case {}: prediction grid {:?} (affine {:?}) differs from truth grid {:?} (affine {:?})",
                    pair.case, p.geometry.dims, p.geometry.affine, truth.geometry.dims, truth.geometry.affine
                ),
            });
        }
    }
    let t = labels_of(&truth);
    let p = pred
        .as_ref()
        .map(labels_of)
        .unwrap_or_else(|| vec![0; t.len()]);
    let classes: Vec<u32> = match &config.classes {
        Some(c) => c.clone(),
        None => t
            .iter()
            .chain(&p)
            .copied()
            .filter(|&c| c > 0)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
    };
    let s = truth.geometry.spacing();
    let spacing = [s[2], s[1], s[0]];
    let voxel_mm3 = s.iter().product::<f64>();
    // Confidence of a predicted lesion: its lesion-table row (matched by class and bounding box),
    // else its maximum probability, else 1.
    let table = lesion_table(pair)?;
    let probabilities = confidence_source(pair, dims);
    let confidence_of = |class: u32, members: &[usize], bbox: VoxelBox| -> f64 {
        if let Some(rows) = &table {
            let row = rows
                .iter()
                .find(|r| r.class == class && r.bbox_voxel == bbox);
            if let Some(c) = row.and_then(|r| r.confidence.or(r.max_probability)) {
                return c;
            }
        }
        match &probabilities {
            Some(prob) => members.iter().map(|&i| prob[i] as f64).fold(0.0, f64::max),
            None => 1.0,
        }
    };
    let mut result = CaseResult {
        case: pair.case.clone(),
        missing_prediction: pred.is_none(),
        classes: Vec::new(),
        lesions: Vec::new(),
        dims,
    };
    for &c in &classes {
        let tm: Vec<bool> = t.iter().map(|&x| x == c).collect();
        let pm: Vec<bool> = p.iter().map(|&x| x == c).collect();
        result.classes.push((
            c,
            class_metrics(&tm, &pm, dims, spacing, config.nsd_tolerance_mm),
        ));
        let lesion_class = config
            .lesion_classes
            .as_ref()
            .is_none_or(|l| l.contains(&c));
        if lesion_class {
            let confidence = |members: &[usize], bbox| confidence_of(c, members, bbox);
            let mut m = match_lesions(
                &pair.case,
                c,
                &tm,
                &pm,
                LesionGrid { dims, voxel_mm3 },
                config.lesion_iou_threshold,
                &confidence,
            );
            if let Some(synth) = synth {
                attach_contrast_to_noise(&mut m, synth);
            }
            result.lesions.push((c, m));
        }
    }
    Ok(result)
}
