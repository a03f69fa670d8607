//! Evaluation of predicted label maps against truth: overlap and surface metrics in mm per case and
//! class ([`metrics`]), lesion-wise detection with FROC ([`lesions`]), and the report ([`report`]).
//!
//! Metrics accumulate per case, then aggregate (MONAI's cumulative-metric pattern).

pub mod calibration;
pub mod compare;
pub mod lesions;
pub mod metrics;
pub mod report;
pub mod review;
pub mod search;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{load_layered, section, ConfigFile};
use crate::error::{Error, Result};
use crate::io::layout::{case_name, CaseOutputs, Lesion, LesionTable, SynthLesion, SynthLesions};
use crate::io::nifti::is_nifti_path;
use crate::io::plot::overlay_tile;
use crate::io::{read_json, read_nifti};
use crate::transforms::intensity::display_window;
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

/// An evaluation config file: an `[evaluate]` table, layered like every config.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalFile {
    /// The settings.
    #[serde(default)]
    pub evaluate: EvalConfig,
}

impl ConfigFile for EvalFile {
    const SECTIONS: &'static [&'static str] = &["evaluate"];

    fn from_sections(table: &mut toml::Table, origin: &str) -> Result<Self> {
        Ok(EvalFile {
            evaluate: section(table, "evaluate", origin)?,
        })
    }

    fn validate(&self, origin: &str) -> Result<()> {
        let e = &self.evaluate;
        let sorted = e.volume_bins_mm3.windows(2).all(|w| w[0] < w[1]);
        if !(e.nsd_tolerance_mm >= 0.0
            && (0.0..1.0).contains(&e.lesion_iou_threshold)
            && e.grid_tolerance_mm >= 0.0
            && sorted)
        {
            return Err(Error::Config {
                reason: format!("{origin}: [evaluate] nsd_tolerance_mm and grid_tolerance_mm must be >= 0, lesion_iou_threshold in [0, 1) and volume_bins_mm3 increasing"),
            });
        }
        Ok(())
    }
}

impl EvalConfig {
    /// Reads the `[evaluate]` table of a TOML file (see [`EvalFile`]).
    pub fn from_file(path: &Path) -> Result<Self> {
        load_layered::<EvalFile>(Some(path), &[]).map(|f| f.evaluate)
    }

    /// The name of class `class`.
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
    /// Case name, from the truth file's name (see `io::layout::case_name`).
    pub case: String,
    /// The truth label map.
    pub truth: PathBuf,
    /// `None` when the prediction is missing (it counts as empty).
    pub pred: Option<PathBuf>,
}

fn nifti_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && is_nifti_path(p))
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
    let truth_names: BTreeSet<String> = truth.iter().map(|p| case_name(p)).collect();
    let pairs = truth
        .iter()
        .map(|t| {
            let case = case_name(t);
            let pred = preds.iter().find(|p| case_name(p) == case).cloned();
            CasePair {
                case,
                truth: t.clone(),
                pred,
            }
        })
        .collect();
    // Sidecars of medseg segment (probabilities) are not cases of their own.
    let unmatched = preds
        .into_iter()
        .filter(|p| {
            let name = case_name(p);
            !truth_names.contains(&name) && !CaseOutputs::is_sidecar(&name)
        })
        .collect();
    Ok((pairs, unmatched))
}

/// Results of one case.
#[derive(Debug, Clone)]
pub struct CaseResult {
    /// Case name.
    pub case: String,
    /// No prediction file was found; it was scored as empty.
    pub missing_prediction: bool,
    /// Overlap and surface metrics per evaluated class (label value).
    pub classes: Vec<(u32, ClassMetrics)>,
    /// Matched lesions per lesion-evaluated class (label value).
    pub lesions: Vec<(u32, LesionMatch)>,
    /// Truth grid `[nk, nj, ni]` (array order), for the overlay montage.
    pub dims: [usize; 3],
    /// The simulated slice thickness of a synthetic case (mm), from `lesions.json`.
    pub slice_thickness_mm: Option<f64>,
}

impl CaseResult {
    /// Mean Dice over the evaluated classes; `None` when none was evaluated.
    pub fn mean_dice(&self) -> Option<f64> {
        (!self.classes.is_empty()).then(|| {
            self.classes.iter().map(|(_, m)| m.dice).sum::<f64>() / self.classes.len() as f64
        })
    }
}

fn labels_of(v: &Volume) -> Vec<u32> {
    v.voxels
        .iter()
        .map(|&x| if x > 0.0 { x.round() as u32 } else { 0 })
        .collect()
}

/// The lesion table beside a prediction (`CASE_lesions.json`, as `medseg segment` writes it, or
/// another tool's with only `class`, `bbox_voxel` and `confidence`).
pub(crate) fn lesion_table(pair: &CasePair) -> Result<Option<Vec<Lesion>>> {
    let Some(dir) = pair.pred.as_ref().and_then(|p| p.parent()) else {
        return Ok(None);
    };
    let path = CaseOutputs::new(dir, &pair.case, false, false).lesions_json;
    if !path.exists() {
        return Ok(None);
    }
    Ok(Some(read_json::<LesionTable>(&path)?.lesions))
}

/// The synthetic lesions of a dataset whose label maps are in `truth_dir`: `lesions.json` beside
/// `labelsTs/` (or `labelsTr/`), as `medseg synth` writes it. `None` when there is none or it is
/// another kind of file.
pub fn synth_lesions(truth_dir: &Path) -> Option<SynthLesions> {
    let path = SynthLesions::path(truth_dir.parent()?);
    path.is_file()
        .then(|| read_json::<SynthLesions>(&path).ok())
        .flatten()
}

/// Gives each truth lesion of `m` the contrast-to-noise ratio and polarity of the synthetic lesion
/// whose label box holds it (a lesion's label may split into several components).
pub fn attach_synthetic(m: &mut LesionMatch, synth: &[SynthLesion]) {
    for t in &mut m.truth {
        let [lo, hi] = t.bbox_voxel;
        let source = synth.iter().find(|s| {
            s.case == t.case
                && (0..3).all(|a| {
                    let b = s.lesion.bbox_voxel;
                    b[0][a] <= lo[a] && hi[a] <= b[1][a]
                })
        });
        t.contrast_to_noise = source.map(|s| s.lesion.contrast_to_noise);
        t.polarity = source.and_then(|s| s.polarity);
    }
}

/// Confidence per predicted lesion from a probability map beside the prediction
/// (`CASE_probabilities.nii.gz`: the lesion's maximum), else 1.
fn confidence_source(pair: &CasePair, dims: [usize; 3]) -> Option<Vec<f32>> {
    let pred = pair.pred.as_ref()?;
    let dir = pred.parent()?;
    let path = CaseOutputs::new(dir, &pair.case, true, false).probabilities?;
    let prob = read_nifti(&path).ok()?;
    (prob.geometry.shape() == dims).then(|| prob.voxels.iter().copied().collect())
}

/// Evaluates one case: every class's metrics and, for lesion classes, the lesion matching.
pub fn evaluate_case(
    pair: &CasePair,
    config: &EvalConfig,
    synth: Option<&SynthLesions>,
) -> Result<CaseResult> {
    let truth = read_nifti(&pair.truth)?;
    let pred = match &pair.pred {
        Some(p) => Some(read_nifti(p)?),
        None => None,
    };
    let dims = truth.geometry.shape();
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
    let spacing = truth.geometry.array_spacing();
    let voxel_mm3 = spacing.iter().product::<f64>();
    // Confidence of a predicted lesion: its lesion-table row (matched by class and bounding box),
    // else its maximum probability, else 1.
    let table = lesion_table(pair)?;
    let probabilities = confidence_source(pair, dims);
    let confidence_of = |class: u32, members: &[usize], bbox: VoxelBox| -> f64 {
        if let Some(rows) = &table {
            let row = rows
                .iter()
                .find(|r| r.class == class && r.bbox_voxel == bbox);
            // Another tool's table may carry only a maximum probability.
            let confidence = |r: &Lesion| {
                r.confidence
                    .or((r.max_probability > 0.0).then_some(r.max_probability))
            };
            if let Some(c) = row.and_then(confidence) {
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
        slice_thickness_mm: synth.and_then(|s| {
            s.cases
                .iter()
                .find(|c| c.case == pair.case)
                .and_then(|c| c.slice_thickness_mm)
        }),
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
                LesionGrid {
                    dims,
                    voxel_mm3,
                    affine: truth.geometry.affine,
                },
                config.lesion_iou_threshold,
                &confidence,
            );
            if let Some(synth) = synth {
                attach_synthetic(&mut m, &synth.lesions);
            }
            result.lesions.push((c, m));
        }
    }
    Ok(result)
}

/// Evaluates every pair in order; a case that fails is recorded with its reason and the others go
/// on. `on_case(case, error)` is called after each.
pub fn evaluate_cases(
    pairs: &[CasePair],
    config: &EvalConfig,
    synth: Option<&SynthLesions>,
    on_case: &mut dyn FnMut(&str, Option<&Error>),
) -> (Vec<CaseResult>, Vec<(String, String)>) {
    let mut results = Vec::new();
    let mut failed = Vec::new();
    for pair in pairs {
        match evaluate_case(pair, config, synth) {
            Ok(r) => {
                on_case(&pair.case, None);
                results.push(r);
            }
            Err(e) => {
                on_case(&pair.case, Some(&e));
                failed.push((pair.case.clone(), e.to_string()));
            }
        }
    }
    (results, failed)
}

/// The scan of a case for its overlay: `CASE_0000` or `CASE` (`.nii.gz`, `.nii`) in `images`.
pub(crate) fn case_scan(images: &Path, case: &str) -> Option<PathBuf> {
    [
        format!("{case}_0000.nii.gz"),
        format!("{case}.nii.gz"),
        format!("{case}_0000.nii"),
        format!("{case}.nii"),
    ]
    .iter()
    .map(|n| images.join(n))
    .find(|p| p.exists())
}

/// The overlay tile of a case: the slice where truth and prediction disagree most, on its scan
/// from `images` when one is there on the same grid, else on black.
fn worst_tile(r: &CaseResult, pair: &CasePair, images: Option<&Path>) -> Option<image::RgbImage> {
    let t = read_nifti(&pair.truth).ok()?;
    let truth_fg: Vec<bool> = t.voxels.iter().map(|&v| v > 0.0).collect();
    let pred_fg: Vec<bool> = match &pair.pred {
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
    let scan: Option<Vec<f32>> = images
        .and_then(|dir| case_scan(dir, &r.case))
        .and_then(|p| read_nifti(&p).ok())
        .filter(|v| v.geometry.dims == t.geometry.dims)
        .map(|v| {
            v.voxels
                .index_axis(ndarray::Axis(0), 0)
                .iter()
                .copied()
                .collect()
        });
    let scan = scan.as_deref().map(|s| {
        let window = display_window(&s[k * plane..(k + 1) * plane]);
        (s, window)
    });
    Some(overlay_tile(scan, &truth_fg, &pred_fg, None, r.dims, k))
}

/// Overlay tiles of the `n` worst cases by mean Dice over classes (see [`report::ReportInputs`]).
pub fn worst_case_tiles(
    results: &[CaseResult],
    pairs: &[CasePair],
    images: Option<&Path>,
    n: usize,
) -> Vec<(String, image::RgbImage)> {
    // Worst first; a case with no class evaluated has nothing wrong to show.
    let mean_dice = |r: &CaseResult| r.mean_dice().unwrap_or(f64::INFINITY);
    let mut order: Vec<&CaseResult> = results.iter().collect();
    order.sort_by(|a, b| mean_dice(a).total_cmp(&mean_dice(b)));
    order
        .into_iter()
        .take(n)
        .filter_map(|r| {
            let pair = pairs.iter().find(|p| p.case == r.case)?;
            Some((r.case.clone(), worst_tile(r, pair, images)?))
        })
        .collect()
}
