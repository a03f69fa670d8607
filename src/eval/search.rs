//! Postprocessing chosen on the out-of-fold predictions of a cross-validation (nnU-Net v2's
//! `determine_postprocessing` idea, widened): the foreground threshold of a two-class model (of
//! a model of more classes, the finding classes' threshold below 0.5), the smallest component
//! kept, the lowest confidence a finding must reach (the operating point a single run fits on its
//! validation cases, here for the fold ensemble), and keep-largest per organ class. Each
//! candidate runs the same component filter `medseg segment` runs ([`extract_lesions`]); lesion
//! classes are judged by lesion F1 over all cases, organ classes by mean Dice. Among the settings
//! whose score the noise cannot tell apart, the lesion classes' mean Dice decides when its lead is
//! clear of its own noise: lesion F1 barely moves with the threshold, which is what sets the
//! lesions' extent (a fold ensemble's averaged probabilities fall below one half at the borders
//! its members disagree on, and its argmax masks come out small).

use std::path::{Path, PathBuf};

use ndarray::Array3;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::lesions::{detection_scores, match_lesions, LesionGrid};
use crate::data::dataset::{label_onto_image, LabelMap};
use crate::error::{Error, Result};
use crate::geometry::Geometry;
use crate::infer::operating_point::{case_resamples, standard_deviation};
use crate::infer::postprocess::{extract_lesions, LesionFilter, Probe};
use crate::io::layout::{CaseOutputs, LesionTable};
use crate::io::{read_json, read_nifti};
use crate::transforms::post::connected_components;
use crate::transforms::spatial::{cropped_geometry, nonzero_box};

/// How a class is scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// Findings: lesion F1 over all cases (true and false positives summed).
    LesionF1,
    /// Organs: Dice, averaged over cases.
    Dice,
}

/// One training case as the fold that did not train on it segmented it.
pub struct OofCase {
    /// Case name.
    pub case: String,
    /// Truth classes `[k, j, i]`.
    pub truth: Array3<u8>,
    /// Predicted classes before any component filtering, on the truth's grid.
    pub pred: Array3<u8>,
    /// Foreground probability on the same grid, when it was saved (two-class models).
    pub foreground: Option<Array3<f32>>,
    /// A model of more classes: its finding classes' probabilities, when they were saved.
    pub findings: Option<FindingMap>,
    /// Each predicted finding's confidence from the case's lesion table, on its component's
    /// voxels (0 elsewhere), when the table was written.
    pub confidence: Option<Array3<f32>>,
    /// The case's grid.
    pub geometry: Geometry,
}

/// The most probable finding class at each voxel and its probability (of a model of more than
/// two classes), on an [`OofCase`]'s grid.
pub struct FindingMap {
    /// The class.
    pub class: Array3<u8>,
    /// Its probability.
    pub probability: Array3<f32>,
}

impl FindingMap {
    /// From `[F, k, j, i]` probabilities of the finding classes `classes` (in that order).
    pub fn from_channels(channels: ndarray::ArrayView4<f32>, classes: &[u32]) -> Self {
        let (_, nk, nj, ni) = channels.dim();
        let mut class = Array3::<u8>::zeros([nk, nj, ni]);
        let mut probability = Array3::<f32>::zeros(class.raw_dim());
        for (f, channel) in channels.outer_iter().enumerate() {
            let c = classes.get(f).copied().unwrap_or(0) as u8;
            ndarray::Zip::from(&mut class)
                .and(&mut probability)
                .and(&channel)
                .for_each(|k, p, &v| {
                    if v > *p {
                        (*k, *p) = (c, v);
                    }
                });
        }
        FindingMap { class, probability }
    }

    /// The sub-box `bbox`.
    fn crop(&self, bbox: &[std::ops::Range<usize>; 3]) -> Self {
        FindingMap {
            class: crop3(&self.class, bbox),
            probability: crop3(&self.probability, bbox),
        }
    }
}

/// The candidates tried.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchSpace {
    /// Foreground thresholds (two-class models; for more classes, those below 0.5).
    pub thresholds: Vec<f64>,
    /// Smallest component kept, mm³.
    pub min_lesion_mm3: Vec<f64>,
    /// Lowest confidence a finding must reach.
    pub min_confidence: Vec<f64>,
}

impl Default for SearchSpace {
    fn default() -> Self {
        SearchSpace {
            thresholds: vec![0.3, 0.4, 0.5, 0.6, 0.7],
            // Spheres of about 0, 2.1, 2.7, 3.4, 4.6, 5.8, 7.3 and 9.8 mm diameter.
            min_lesion_mm3: vec![0.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0],
            // The single run's operating-point grid: none, then 0.50 to 0.95 in steps of 0.05.
            min_confidence: std::iter::once(0.0)
                .chain((10..20).map(|i| i as f64 / 20.0))
                .collect(),
        }
    }
}

/// One setting of the searched knobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Setting {
    /// `segment.threshold`.
    pub threshold: f64,
    /// `segment.min_lesion_mm3`.
    pub min_lesion_mm3: f64,
    /// `segment.keep_largest`, by class name.
    pub keep_largest: Vec<String>,
    /// `segment.min_confidence` (0 in a `postprocessing.json` written before it was searched).
    #[serde(default)]
    pub min_confidence: f64,
}

/// A class's cross-validated score under the chosen and the starting setting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassScore {
    /// Class name.
    pub class: String,
    /// How it is scored.
    pub objective: Objective,
    /// Under the chosen setting.
    pub chosen: f64,
    /// Under the run config's own setting.
    pub before: f64,
    /// The class's mean Dice under the chosen setting (for an organ class, `chosen`); absent in
    /// a `postprocessing.json` written before it was recorded.
    #[serde(default)]
    pub dice_chosen: Option<f64>,
    /// See `dice_chosen`, under the run config's own setting.
    #[serde(default)]
    pub dice_before: Option<f64>,
}

/// What the search chose (`postprocessing.json` of a cross-validation run).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Postprocessing {
    /// The chosen setting.
    pub chosen: Setting,
    /// The run config's own setting, the starting point.
    pub before: Setting,
    /// The mean of the class scores, chosen and before.
    pub score: f64,
    /// See `score`.
    pub score_before: f64,
    /// Per class.
    pub classes: Vec<ClassScore>,
    /// Out-of-fold cases scored.
    pub cases: usize,
    /// Settings tried.
    pub candidates: usize,
    /// The highest-scoring setting, which `chosen` is when it beats the nearer ones by more than
    /// the noise, and its score.
    pub best: Setting,
    /// See `best`.
    pub best_score: f64,
    /// Bootstrap standard error of the best's lead over the chosen (0 when they are one).
    pub noise: f64,
    /// Every setting tried with its mean class score, in the order tried.
    pub tried: Vec<(Setting, f64)>,
}

/// Reads the out-of-fold predictions in `oof` (`NAME.nii.gz` with, for a two-class model,
/// `NAME_probabilities.nii.gz`, else `NAME_lesions.json`'s confidences, as `medseg segment` writes
/// them, and `NAME_finding_probabilities.nii.gz` of the classes `findings` when a model of more
/// classes wrote it) of each `(case, truth file)`, mapping truth values to classes
/// through `labels`. A prediction off its truth's grid, or missing, is an error naming the file.
/// Each case is cropped to the box of its truth, its prediction and its foreground (or finding)
/// probability from `threshold_floor` up, the lowest threshold searched: no setting's score
/// depends on the voxels outside it, and the search scores every setting on every voxel kept.
pub fn read_oof_cases(
    oof: &Path,
    truth: &[(String, PathBuf)],
    labels: &LabelMap,
    findings: &[u32],
    threshold_floor: f64,
) -> Result<Vec<OofCase>> {
    truth
        .par_iter()
        .map(|(case, truth_path)| {
            let outputs = CaseOutputs::new(oof, case, true, false);
            let t = read_nifti(truth_path)?;
            let p = read_nifti(&outputs.mask)?;
            let mut truth = Array3::zeros(t.geometry.shape());
            for (out, v) in truth.iter_mut().zip(t.voxels.iter()) {
                *out = labels.class_of(*v).map_err(|reason| Error::Unsupported {
                    path: truth_path.clone(),
                    reason,
                })?;
            }
            // The prediction lies on the scan's grid; a truth stored in another axis order is
            // reordered onto it, as training does.
            let truth = label_onto_image(truth, &t.geometry, &p.geometry).map_err(|reason| {
                Error::Unsupported {
                    path: truth_path.clone(),
                    reason: format!("{reason} (the prediction {})", outputs.mask.display()),
                }
            })?;
            let pred = p.voxels.index_axis(ndarray::Axis(0), 0).mapv(|v| v as u8);
            // One float map per case: a two-class model's foreground probability (thresholds
            // and confidences come from it), else each finding's confidence.
            let two_class = labels.classes() == 2;
            let foreground = match &outputs.probabilities {
                Some(path) if two_class && path.is_file() => Some(
                    read_nifti(path)?
                        .voxels
                        .index_axis(ndarray::Axis(0), 0)
                        .to_owned(),
                ),
                _ => None,
            };
            let finding_map = match &outputs.finding_probabilities {
                Some(path) if !two_class && !findings.is_empty() && path.is_file() => {
                    let v = read_nifti(path)?;
                    if v.geometry.shape() != p.geometry.shape() || v.channels() != findings.len() {
                        return Err(Error::Unsupported {
                            path: path.clone(),
                            reason: format!(
                                "{} volume(s) of shape {:?}, not one per finding class ({}) on the prediction's grid {:?}",
                                v.channels(),
                                v.geometry.shape(),
                                findings.len(),
                                p.geometry.shape()
                            ),
                        });
                    }
                    Some(FindingMap::from_channels(v.voxels.view(), findings))
                }
                _ => None,
            };
            let confidence = if !two_class && outputs.lesions_json.is_file() {
                let table: LesionTable = read_json(&outputs.lesions_json)?;
                Some(finding_confidence(&pred, &table))
            } else {
                None
            };
            let relevant = ndarray::Zip::from(&truth)
                .and(&pred)
                .map_collect(|&t, &p| f32::from(u8::from(t > 0 || p > 0)));
            let probability = foreground
                .as_ref()
                .or(finding_map.as_ref().map(|f| &f.probability));
            let relevant = match probability {
                Some(f) => ndarray::Zip::from(&relevant)
                    .and(f)
                    .map_collect(|&r, &f| r.max(f32::from(u8::from(f as f64 >= threshold_floor)))),
                None => relevant,
            };
            // An empty case keeps one voxel: both masks empty still scores (Dice 1, no lesion).
            let bbox = nonzero_box(relevant.view().insert_axis(ndarray::Axis(0))).unwrap_or([
                0..1,
                0..1,
                0..1,
            ]);
            Ok(OofCase {
                case: case.clone(),
                truth: crop3(&truth, &bbox),
                pred: crop3(&pred, &bbox),
                foreground: foreground.map(|f| crop3(&f, &bbox)),
                findings: finding_map.map(|f| f.crop(&bbox)),
                confidence: confidence.map(|c| crop3(&c, &bbox)),
                geometry: cropped_geometry(&p.geometry, &bbox),
            })
        })
        .collect()
}

/// The `[k, j, i]` sub-box `bbox` of `a`.
fn crop3<T: Clone>(a: &Array3<T>, bbox: &[std::ops::Range<usize>; 3]) -> Array3<T> {
    a.slice(ndarray::s![
        bbox[0].clone(),
        bbox[1].clone(),
        bbox[2].clone()
    ])
    .to_owned()
}

/// Each component of a class the lesion table lists, filled with its row's confidence (matched by
/// class and voxel box, as `medseg evaluate` matches them; the maximum probability stands in for
/// a missing confidence). Components without a row get 1: the search never drops them.
fn finding_confidence(pred: &Array3<u8>, table: &LesionTable) -> Array3<f32> {
    let dims = {
        let (k, j, i) = pred.dim();
        [k, j, i]
    };
    let mut out = Array3::<f32>::zeros(pred.dim());
    let flat = pred.as_standard_layout();
    let flat = flat.as_slice().unwrap_or_default();
    let classes: std::collections::BTreeSet<u32> = table.lesions.iter().map(|l| l.class).collect();
    for class in classes {
        let mask: Vec<bool> = flat.iter().map(|&v| v as u32 == class).collect();
        let cc = connected_components(&mask, dims);
        let confidence: Vec<f32> = cc
            .boxes(dims)
            .iter()
            .map(|b| {
                table
                    .lesions
                    .iter()
                    .find(|l| l.class == class && l.bbox_voxel == *b)
                    .map(|l| l.confidence.unwrap_or(l.max_probability) as f32)
                    .unwrap_or(1.0)
            })
            .collect();
        for (o, &id) in out.iter_mut().zip(&cc.labels) {
            if id > 0 {
                *o = confidence[id as usize - 1];
            }
        }
    }
    out
}

/// Searches `space` from `start`, one stage at a time: the lowest confidence a finding must reach
/// (when there are findings and every case has their confidences), then the threshold
/// (with probability maps: a two-class model's foreground, or a model of more classes' finding
/// classes below 0.5) and the smallest component together, then the
/// confidence again if they moved, then keep-largest for each organ class in turn. A few
/// dozen out-of-fold cases cannot tell close settings apart, so a setting farther from `start`
/// is taken only when it beats the nearer one by more than one bootstrap standard error of the
/// difference (the one-standard-error rule): among the grid's settings within that noise of the
/// best, the one nearest `start`; a keep-largest change when it gains more than its noise.
/// `filter` carries the region-of-interest stage, which is not searched. `objectives[c - 1]`
/// scores class `c` of `names`.
pub fn search_postprocessing(
    cases: &[OofCase],
    names: &[String],
    objectives: &[Objective],
    filter: &LesionFilter,
    start: &Setting,
    space: &SearchSpace,
) -> Result<Postprocessing> {
    let scorer = Scorer {
        cases,
        names,
        objectives,
        filter,
        resamples: case_resamples(cases.len()),
    };
    // A model of more classes: thresholds below 0.5 add finding voxels; from 0.5 up the
    // decision is the argmax, so the start stands for all of them.
    let thresholds = if names.len() == 2 && cases.iter().all(|c| c.foreground.is_some()) {
        space.thresholds.clone()
    } else if names.len() > 2 && cases.iter().all(|c| c.findings.is_some()) {
        let mut t: Vec<f64> = space
            .thresholds
            .iter()
            .copied()
            .filter(|&t| t < 0.5)
            .collect();
        t.push(start.threshold.max(0.5));
        t
    } else {
        vec![start.threshold]
    };
    let mut tried = vec![scorer.score(start)?];
    let confidences_known = cases
        .iter()
        .all(|c| c.confidence.is_some() || (names.len() == 2 && c.foreground.is_some()));
    let search_confidence = objectives.contains(&Objective::LesionF1) && confidences_known;
    // Nearest the start: by threshold steps and halvings of the size, and by the cut-off (with
    // none to start from, the nearest is the lowest, as a single run's operating point is).
    let size_distance = |s: &Setting| {
        (s.threshold - start.threshold).abs() / 0.1
            + ((s.min_lesion_mm3 + 1.0) / (start.min_lesion_mm3 + 1.0))
                .log2()
                .abs()
    };
    let confidence_distance = |s: &Setting| (s.min_confidence - start.min_confidence).abs();
    // One stage: `from` and each other setting of `settings`; the nearest within the noise.
    let stage = |from: &Scored,
                 settings: Vec<Setting>,
                 distance: &dyn Fn(&Setting) -> f64,
                 tried: &mut Vec<Scored>|
     -> Result<Scored> {
        let mut stage = vec![from.clone()];
        for setting in settings {
            if setting != from.setting {
                stage.push(scorer.score(&setting)?);
            }
        }
        tried.extend(stage.iter().skip(1).cloned());
        Ok(scorer.nearest_within_noise(&stage, distance))
    };
    let confidence_stage = |from: &Scored, tried: &mut Vec<Scored>| -> Result<Scored> {
        let settings = space
            .min_confidence
            .iter()
            .map(|&min_confidence| Setting {
                min_confidence,
                ..from.setting.clone()
            })
            .collect();
        stage(from, settings, &confidence_distance, tried)
    };
    let size_stage = |from: &Scored, tried: &mut Vec<Scored>| -> Result<Scored> {
        let settings = thresholds
            .iter()
            .flat_map(|&threshold| {
                space
                    .min_lesion_mm3
                    .iter()
                    .map(move |&min_lesion_mm3| Setting {
                        threshold,
                        min_lesion_mm3,
                        ..from.setting.clone()
                    })
            })
            .collect();
        stage(from, settings, &size_distance, tried)
    };
    // The cut-off first, as a single run's operating point is chosen at its own size: searched
    // before it, the size takes the credit for false positives the cut-off also removes (on the
    // brain data's out-of-fold cases 100 mm³ instead of 14 gained 0.043 with no cut-off, 0.002
    // under the cut-off 0.85). Then the threshold and size given the cut-off, and the cut-off
    // once more if they moved.
    let mut chosen = tried[0].clone();
    if search_confidence {
        chosen = confidence_stage(&chosen, &mut tried)?;
    }
    let sized = size_stage(&chosen, &mut tried)?;
    if search_confidence && sized.setting != chosen.setting {
        chosen = confidence_stage(&sized, &mut tried)?;
    } else {
        chosen = sized;
    }
    for (c, objective) in objectives.iter().enumerate() {
        let name = &names[c + 1];
        if *objective != Objective::Dice {
            continue;
        }
        let mut s = chosen.setting.clone();
        if let Some(at) = s.keep_largest.iter().position(|n| n == name) {
            s.keep_largest.remove(at);
        } else {
            s.keep_largest.push(name.clone());
        }
        let other = scorer.score(&s)?;
        if other.mean - chosen.mean > scorer.noise(&other, &chosen) + 1e-9 {
            chosen = other.clone();
        }
        tried.push(other);
    }
    // The highest score of all tried, for the record of what the noise rule gave up.
    let best = highest(&tried).clone();
    let noise = scorer.noise(&best, &chosen);
    let before = &tried[0];
    let classes = objectives
        .iter()
        .enumerate()
        .map(|(c, o)| ClassScore {
            class: names[c + 1].clone(),
            objective: *o,
            chosen: chosen.scores[c],
            before: before.scores[c],
            dice_chosen: Some(scorer.class_dice(&chosen.per_case, c, 0..cases.len())),
            dice_before: Some(scorer.class_dice(&before.per_case, c, 0..cases.len())),
        })
        .collect();
    Ok(Postprocessing {
        score: chosen.mean,
        score_before: before.mean,
        chosen: chosen.setting,
        before: start.clone(),
        classes,
        cases: cases.len(),
        candidates: tried.len(),
        best: best.setting,
        best_score: best.mean,
        noise,
        tried: tried.into_iter().map(|t| (t.setting, t.mean)).collect(),
    })
}

/// The first of the highest-scoring `candidates` (the first on a tie); `candidates` is not empty.
fn highest(candidates: &[Scored]) -> &Scored {
    candidates.iter().fold(
        &candidates[0],
        |b, t| if t.mean > b.mean + 1e-9 { t } else { b },
    )
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Standard errors by which a lesion Dice lead must exceed its noise to overrule the setting
/// nearest the start: about a 95 % interval clear of 0. One (the score's own rule) would let a
/// single case decide: a lead from one case of n is always above one standard error of the
/// resampled mean (by a factor of √(n / (n − 1))).
const DICE_LEAD_ERRORS: f64 = 2.0;

/// Scores settings on the out-of-fold cases.
struct Scorer<'a> {
    cases: &'a [OofCase],
    names: &'a [String],
    objectives: &'a [Objective],
    filter: &'a LesionFilter,
    /// The case resamples every noise estimate uses.
    resamples: Vec<Vec<usize>>,
}

/// One case's counts per class: lesion (TP, FP, FN) and Dice.
type CaseCounts = Vec<((usize, usize, usize), f64)>;

/// A setting with its per-case counts and class scores.
#[derive(Clone)]
struct Scored {
    setting: Setting,
    per_case: Vec<CaseCounts>,
    scores: Vec<f64>,
    mean: f64,
}

impl Scorer<'_> {
    /// `setting`'s counts on every case, and the score of each foreground class.
    fn score(&self, setting: &Setting) -> Result<Scored> {
        let keep_largest = setting
            .keep_largest
            .iter()
            .map(|n| {
                self.names
                    .iter()
                    .position(|x| x == n)
                    .map(|c| c as u32)
                    .ok_or_else(|| Error::Config {
                        reason: format!("segment.keep_largest names {n:?}, not a class"),
                    })
            })
            .collect::<Result<Vec<u32>>>()?;
        let filter = LesionFilter {
            min_volume_mm3: setting.min_lesion_mm3,
            keep_largest,
            roi: self.filter.roi.clone(),
            min_confidence: setting.min_confidence,
            skip_diameters: true,
        };
        let per_case: Vec<CaseCounts> = self
            .cases
            .par_iter()
            .map(|c| self.case_counts(c, setting.threshold, &filter))
            .collect();
        let scores = self.aggregate(&per_case, 0..per_case.len());
        Ok(Scored {
            setting: setting.clone(),
            mean: mean(&scores),
            per_case,
            scores,
        })
    }

    /// Class scores over the cases `pick` (a case may repeat): lesion F1 of the summed counts,
    /// or the mean Dice.
    fn aggregate(
        &self,
        per_case: &[CaseCounts],
        pick: impl Iterator<Item = usize> + Clone,
    ) -> Vec<f64> {
        self.objectives
            .iter()
            .enumerate()
            .map(|(c, objective)| match objective {
                Objective::LesionF1 => {
                    let (tp, fp, fn_) = pick.clone().fold((0, 0, 0), |a, i| {
                        let (tp, fp, fn_) = per_case[i][c].0;
                        (a.0 + tp, a.1 + fp, a.2 + fn_)
                    });
                    // No lesion anywhere and none predicted is a perfect score, not NaN.
                    let f1 = detection_scores(tp, fp, fn_).2;
                    if f1.is_nan() {
                        1.0
                    } else {
                        f1
                    }
                }
                Objective::Dice => self.class_dice(per_case, c, pick.clone()),
            })
            .collect()
    }

    /// Of the `candidates` within one standard error of the highest-scoring (the first on a tie),
    /// the one nearest the start by `distance` (the higher score on a tie); but the one of them
    /// with the highest lesion Dice (the first on a tie) where it leads the nearest's by more
    /// than [`DICE_LEAD_ERRORS`] standard errors of that lead.
    fn nearest_within_noise(
        &self,
        candidates: &[Scored],
        distance: impl Fn(&Setting) -> f64,
    ) -> Scored {
        let best = highest(candidates);
        let close: Vec<&Scored> = candidates
            .iter()
            .filter(|t| best.mean - t.mean <= self.noise(best, t) + 1e-9)
            .collect();
        let nearest = close
            .iter()
            .copied()
            .min_by(|a, b| {
                (distance(&a.setting), -a.mean)
                    .partial_cmp(&(distance(&b.setting), -b.mean))
                    .unwrap_or(std::cmp::Ordering::Equal)
            })
            .unwrap_or(best);
        let all = || 0..self.cases.len();
        let Some(nearest_dice) = self.lesion_dice(&nearest.per_case, all()) else {
            return nearest.clone();
        };
        let (sharpest, dice) = close.iter().fold((nearest, nearest_dice), |(b, bd), t| {
            let d = self.lesion_dice(&t.per_case, all()).unwrap_or(f64::MIN);
            if d > bd + 1e-9 {
                (*t, d)
            } else {
                (b, bd)
            }
        });
        if dice - nearest_dice > DICE_LEAD_ERRORS * self.dice_noise(sharpest, nearest) + 1e-9 {
            sharpest.clone()
        } else {
            nearest.clone()
        }
    }

    /// Class `c`'s (0 = the first foreground class) mean Dice over the cases `pick`.
    fn class_dice(
        &self,
        per_case: &[CaseCounts],
        c: usize,
        pick: impl Iterator<Item = usize>,
    ) -> f64 {
        mean(&pick.map(|i| per_case[i][c].1).collect::<Vec<_>>())
    }

    /// The mean Dice of the lesion classes over the cases `pick`; `None` without lesion classes.
    fn lesion_dice(
        &self,
        per_case: &[CaseCounts],
        pick: impl Iterator<Item = usize> + Clone,
    ) -> Option<f64> {
        let dice: Vec<f64> = self
            .objectives
            .iter()
            .enumerate()
            .filter(|(_, o)| **o == Objective::LesionF1)
            .map(|(c, _)| self.class_dice(per_case, c, pick.clone()))
            .collect();
        (!dice.is_empty()).then(|| mean(&dice))
    }

    /// Standard error of `a`'s lesion Dice minus `b`'s over the case resamples.
    fn dice_noise(&self, a: &Scored, b: &Scored) -> f64 {
        self.resampled_error(a, b, |per_case, pick| {
            self.lesion_dice(per_case, pick.iter().copied())
                .unwrap_or(0.0)
        })
    }

    /// Standard error of `a`'s mean score minus `b`'s over the case resamples.
    fn noise(&self, a: &Scored, b: &Scored) -> f64 {
        self.resampled_error(a, b, |per_case, pick| {
            mean(&self.aggregate(per_case, pick.iter().copied()))
        })
    }

    /// The standard deviation of `figure(a) - figure(b)` over the case resamples (0 with none).
    fn resampled_error(
        &self,
        a: &Scored,
        b: &Scored,
        figure: impl Fn(&[CaseCounts], &[usize]) -> f64,
    ) -> f64 {
        let diffs: Vec<f64> = self
            .resamples
            .iter()
            .map(|pick| figure(&a.per_case, pick) - figure(&b.per_case, pick))
            .collect();
        standard_deviation(&diffs)
    }

    fn case_counts(&self, case: &OofCase, threshold: f64, filter: &LesionFilter) -> CaseCounts {
        // A finding's confidence is its maximum probe: the foreground probability of a
        // two-class model (its components change with the threshold), else the confidence its
        // out-of-fold lesion table gave it; without either, 1 (never dropped). A threshold below
        // 0.5 of a model of more classes gives the finding class to the voxels where it reaches
        // it; those voxels' probabilities join the confidence of the component they fall in.
        let two_class = self.names.len() == 2;
        let (mut labels, source, added) = match (&case.foreground, &case.findings) {
            (Some(p), _) if two_class => {
                (p.mapv(|v| u8::from(v as f64 >= threshold)), Some(p), None)
            }
            (_, Some(f)) if !two_class && threshold < 0.5 => {
                let mut labels = case.pred.clone();
                ndarray::Zip::from(&mut labels)
                    .and(&f.class)
                    .and(&f.probability)
                    .for_each(|l, &c, &p| {
                        if p as f64 >= threshold {
                            *l = c;
                        }
                    });
                (labels, case.confidence.as_ref(), Some(&f.probability))
            }
            _ => (case.pred.clone(), case.confidence.as_ref(), None),
        };
        extract_lesions(
            &mut labels,
            &case.geometry,
            self.names,
            filter,
            0,
            |_, [k, j, i]| {
                let table = source.map_or(1.0, |m| m[[k, j, i]]);
                Probe {
                    // A voxel of no table finding (0) is one the threshold added.
                    probability: match added {
                        Some(p) if table == 0.0 => p[[k, j, i]],
                        _ => table,
                    },
                    uncertainty: None,
                }
            },
        );
        let dims = case.geometry.shape();
        let grid = LesionGrid {
            dims,
            voxel_mm3: case.geometry.array_spacing().iter().product(),
            affine: case.geometry.affine,
        };
        let truth = case.truth.as_slice_memory_order();
        let pred = labels.as_slice_memory_order();
        (1..self.names.len() as u8)
            .map(|class| {
                let (Some(truth), Some(pred)) = (truth, pred) else {
                    return ((0, 0, 0), 0.0);
                };
                let t: Vec<bool> = truth.iter().map(|&v| v == class).collect();
                let p: Vec<bool> = pred.iter().map(|&v| v == class).collect();
                let both = t.iter().zip(&p).filter(|(a, b)| **a && **b).count();
                let sum = t.iter().filter(|v| **v).count() + p.iter().filter(|v| **v).count();
                let dice = if sum == 0 {
                    1.0
                } else {
                    2.0 * both as f64 / sum as f64
                };
                let counts = if self.objectives[class as usize - 1] == Objective::LesionF1 {
                    let m = match_lesions(&case.case, class as u32, &t, &p, grid, 0.0, &|_, _| 1.0);
                    (m.tp(), m.fp(), m.fn_())
                } else {
                    (0, 0, 0)
                };
                (counts, dice)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 1 mm grid of `[nk, nj, ni]` with cubes of `class` (side `s` at corner `at`) drawn in.
    fn draw(dims: [usize; 3], cubes: &[([usize; 3], usize, u8)]) -> Array3<u8> {
        let mut a = Array3::zeros(dims);
        for &([k, j, i], s, class) in cubes {
            a.slice_mut(ndarray::s![k..k + s, j..j + s, i..i + s])
                .fill(class);
        }
        a
    }

    fn case(truth: Array3<u8>, pred: Array3<u8>, foreground: Option<Array3<f32>>) -> OofCase {
        let [nk, nj, ni] = [truth.dim().0, truth.dim().1, truth.dim().2];
        OofCase {
            case: "c".into(),
            geometry: Geometry::new(
                [ni, nj, nk],
                [
                    [1.0, 0.0, 0.0, 0.0],
                    [0.0, 1.0, 0.0, 0.0],
                    [0.0, 0.0, 1.0, 0.0],
                    [0.0, 0.0, 0.0, 1.0],
                ],
            ),
            truth,
            pred,
            foreground,
            findings: None,
            confidence: None,
        }
    }

    fn lesion_names() -> Vec<String> {
        vec!["background".to_string(), "lesion".to_string()]
    }

    /// No size limit, no keep-largest, no region of interest.
    fn no_filter() -> LesionFilter {
        LesionFilter {
            min_volume_mm3: 0.0,
            keep_largest: Vec::new(),
            roi: None,
            min_confidence: 0.0,
            skip_diameters: false,
        }
    }

    /// The search of a lesion-only model from `start()`, with no filter.
    fn lesion_search(cases: &[OofCase], space: &SearchSpace) -> Postprocessing {
        search_postprocessing(
            cases,
            &lesion_names(),
            &[Objective::LesionF1],
            &no_filter(),
            &start(),
            space,
        )
        .unwrap()
    }

    fn start() -> Setting {
        Setting {
            threshold: 0.5,
            min_lesion_mm3: 0.0,
            keep_largest: Vec::new(),
            min_confidence: 0.0,
        }
    }

    #[test]
    fn finds_the_smallest_size_that_drops_only_false_positives() {
        // True lesions of 4³ = 64 mm³; false positives of 2³ = 8 mm³ beside them.
        let dims = [20, 20, 20];
        let truth = draw(dims, &[([2, 2, 2], 4, 1), ([12, 12, 12], 4, 1)]);
        let pred = draw(
            dims,
            &[
                ([2, 2, 2], 4, 1),
                ([12, 12, 12], 4, 1),
                ([2, 14, 2], 2, 1),
                ([14, 2, 14], 2, 1),
            ],
        );
        let cases = [case(truth, pred, None)];
        let space = SearchSpace {
            thresholds: vec![0.5],
            min_lesion_mm3: vec![0.0, 5.0, 10.0, 100.0],
            min_confidence: Vec::new(),
        };
        let p = lesion_search(&cases, &space);
        // 8 mm³ components go at 10 mm³, the 64 mm³ lesions stay; 100 mm³ would drop them too.
        assert_eq!(p.chosen.min_lesion_mm3, 10.0);
        assert!((p.score_before - 2.0 * 2.0 / (2.0 * 2.0 + 2.0)).abs() < 1e-9);
        assert!((p.score - 1.0).abs() < 1e-9);
    }

    #[test]
    fn picks_the_threshold_and_keep_largest_that_help() {
        // Two-class: the lesion has probability 0.65, a false blob 0.45; threshold 0.5 already
        // separates them, 0.7 would lose the lesion and 0.4 keep the blob.
        let dims = [16, 16, 16];
        let truth = draw(dims, &[([2, 2, 2], 5, 1)]);
        let mut p = Array3::<f32>::zeros(dims);
        p.slice_mut(ndarray::s![2..7, 2..7, 2..7]).fill(0.65);
        p.slice_mut(ndarray::s![10..14, 10..14, 10..14]).fill(0.45);
        let cases = [case(truth.clone(), truth.clone(), Some(p))];
        let (names, filter) = (lesion_names(), no_filter());
        let s = Setting {
            threshold: 0.3,
            ..start()
        };
        let space = SearchSpace {
            thresholds: vec![0.3, 0.4, 0.5, 0.7],
            min_lesion_mm3: vec![0.0],
            min_confidence: Vec::new(),
        };
        let found =
            search_postprocessing(&cases, &names, &[Objective::LesionF1], &filter, &s, &space)
                .unwrap();
        assert_eq!(found.chosen.threshold, 0.5);
        assert!(found.score > found.score_before);

        // An organ with a stray island: keep-largest raises its Dice and is chosen.
        let truth = draw(dims, &[([2, 2, 2], 8, 1)]);
        let pred = draw(dims, &[([2, 2, 2], 8, 1), ([12, 12, 12], 3, 1)]);
        let cases = [case(truth, pred, None)];
        let names = vec!["background".to_string(), "liver".to_string()];
        let found = search_postprocessing(
            &cases,
            &names,
            &[Objective::Dice],
            &filter,
            &start(),
            &SearchSpace {
                thresholds: vec![0.5],
                min_lesion_mm3: vec![0.0],
                min_confidence: Vec::new(),
            },
        )
        .unwrap();
        assert_eq!(found.chosen.keep_largest, vec!["liver".to_string()]);
        assert!((found.score - 1.0).abs() < 1e-9);
    }

    #[test]
    fn a_lead_within_the_noise_keeps_the_setting_nearer_the_start() {
        // Ten cases with a 64 mm³ lesion found. Dropping components under 10 mm³ removes two
        // 8 mm³ false positives (cases 0 and 1) but also a true 8 mm³ lesion (case 2): F1 0.917
        // -> 0.952 over these cases, a lead that resampling them undoes.
        let dims = [20, 20, 20];
        let big = ([2, 2, 2], 4, 1);
        let small = ([14, 14, 14], 2, 1);
        let cases: Vec<OofCase> = (0..10)
            .map(|n| {
                let truth = if n == 2 {
                    draw(dims, &[big, small])
                } else {
                    draw(dims, &[big])
                };
                let pred = if n < 3 {
                    draw(dims, &[big, small])
                } else {
                    draw(dims, &[big])
                };
                case(truth, pred, None)
            })
            .collect();
        let (names, filter) = (lesion_names(), no_filter());
        let space = SearchSpace {
            thresholds: vec![0.5],
            min_lesion_mm3: vec![0.0, 10.0],
            min_confidence: Vec::new(),
        };
        let search = |cases: &[OofCase]| {
            search_postprocessing(
                cases,
                &names,
                &[Objective::LesionF1],
                &filter,
                &start(),
                &space,
            )
            .unwrap()
        };
        let p = search(&cases);
        assert_eq!(p.best.min_lesion_mm3, 10.0);
        assert!(p.best_score > p.score_before + 0.03);
        assert_eq!(p.chosen.min_lesion_mm3, 0.0, "{p:?}");
        assert!(p.noise > p.best_score - p.score, "{p:?}");
        // The start and the one other size.
        assert_eq!(p.tried.len(), 2);
        // A false positive in every case: the same lead in every resample, so it is taken.
        let cases: Vec<OofCase> = (0..10)
            .map(|_| case(draw(dims, &[big]), draw(dims, &[big, small]), None))
            .collect();
        let p = search(&cases);
        assert_eq!(p.chosen.min_lesion_mm3, 10.0, "{p:?}");
        assert!(p.noise < 1e-9);
    }

    #[test]
    fn finds_the_lowest_confidence_that_drops_only_false_positives() {
        // Twelve cases, each with a true lesion the model is sure of (0.9) and a false positive
        // it is not (0.4), both 64 mm³, so no size tells them apart. Every cut-off from 0.5 to
        // 0.9 gives F1 1; the lowest of them is chosen, as a single run's operating point is.
        let dims = [20, 20, 20];
        let (found, stray) = (([2, 2, 2], 4, 1), ([12, 12, 12], 4, 1));
        let cases: Vec<OofCase> = (0..12)
            .map(|_| {
                let pred = draw(dims, &[found, stray]);
                let mut confidence = Array3::<f32>::zeros(dims);
                confidence
                    .slice_mut(ndarray::s![2..6, 2..6, 2..6])
                    .fill(0.9);
                confidence
                    .slice_mut(ndarray::s![12..16, 12..16, 12..16])
                    .fill(0.4);
                OofCase {
                    confidence: Some(confidence),
                    ..case(draw(dims, &[found]), pred, None)
                }
            })
            .collect();
        let space = SearchSpace {
            thresholds: vec![0.5],
            min_lesion_mm3: vec![0.0, 100.0],
            ..SearchSpace::default()
        };
        let p = lesion_search(&cases, &space);
        assert_eq!(p.chosen.min_confidence, 0.5, "{p:?}");
        assert_eq!(p.chosen.min_lesion_mm3, 0.0);
        assert!((p.score_before - 2.0 / 3.0).abs() < 1e-9, "{p:?}");
        assert!((p.score - 1.0).abs() < 1e-9);
        // 0.95 drops the true lesions too.
        let at = |c: f64| {
            p.tried
                .iter()
                .find(|(s, _)| s.min_confidence == c)
                .map(|(_, score)| *score)
                .unwrap()
        };
        assert_eq!(at(0.95), 0.0);

        // Without confidences (no lesion tables) the cut-off is not searched.
        let blind: Vec<OofCase> = (0..12)
            .map(|_| case(draw(dims, &[found]), draw(dims, &[found, stray]), None))
            .collect();
        let p = lesion_search(&blind, &space);
        assert_eq!(p.chosen.min_confidence, 0.0);
        assert!(p.tried.iter().all(|(s, _)| s.min_confidence == 0.0));
    }

    #[test]
    fn the_cut_off_is_chosen_before_the_size_takes_its_credit() {
        // Twelve cases, each with a sure 64 mm³ lesion (0.9) and two unsure 8 mm³ false
        // positives (0.4); six also have a sure 8 mm³ lesion. Chosen first, a size of 10 mm³
        // would win (F1 0.6 -> 0.8) by dropping the false positives with the small lesions; the
        // cut-off 0.5 drops only the false positives (F1 1), and then no size helps.
        let dims = [20, 20, 20];
        let big = ([2, 2, 2], 4, 1);
        let small = ([12, 12, 12], 2, 1);
        let strays = [([2, 14, 2], 2, 1), ([14, 2, 14], 2, 1)];
        let cases: Vec<OofCase> = (0..12)
            .map(|n| {
                let truth: Vec<_> = if n % 2 == 0 {
                    vec![big, small]
                } else {
                    vec![big]
                };
                let mut pred = truth.clone();
                pred.extend(strays);
                let mut confidence = Array3::<f32>::zeros(dims);
                for (origin, side, _) in &pred {
                    let [k, j, i] = *origin;
                    let sure = strays.iter().all(|s| s.0 != *origin);
                    confidence
                        .slice_mut(ndarray::s![k..k + side, j..j + side, i..i + side])
                        .fill(if sure { 0.9 } else { 0.4 });
                }
                OofCase {
                    confidence: Some(confidence),
                    ..case(draw(dims, &truth), draw(dims, &pred), None)
                }
            })
            .collect();
        let space = SearchSpace {
            thresholds: vec![0.5],
            min_lesion_mm3: vec![0.0, 10.0],
            min_confidence: vec![0.5],
        };
        let p = lesion_search(&cases, &space);
        assert!((p.score_before - 0.6).abs() < 1e-9, "{p:?}");
        let at_size = p
            .tried
            .iter()
            .find(|(s, _)| s.min_lesion_mm3 == 10.0 && s.min_confidence == 0.0);
        assert!(
            at_size.is_none(),
            "the size was searched before the cut-off: {p:?}"
        );
        assert_eq!(p.chosen.min_confidence, 0.5, "{p:?}");
        assert_eq!(p.chosen.min_lesion_mm3, 0.0, "{p:?}");
        assert!((p.score - 1.0).abs() < 1e-9, "{p:?}");
    }

    #[test]
    fn a_multi_class_model_takes_a_threshold_below_one_half_that_finds_more() {
        // Background, lesion, brain. Twelve cases: a brain cube holding two true lesions; the
        // model is sure of one (0.9, the argmax) and gives the other 0.4 (the brain is the
        // argmax there), and a stray blob 0.2. Thresholds above 0.5 are the argmax, not tried;
        // 0.4 finds both lesions (F1 2/3 -> 1), and the nearer of 0.4 and 0.3 is chosen.
        let dims = [20, 20, 20];
        let (sure, unsure, brain) = (([2, 2, 2], 4, 1), ([12, 12, 12], 4, 1), ([0, 0, 0], 18, 2));
        // Each blob's finding probability: the sure lesion, the unsure one, the stray.
        let blobs = [
            ([2, 2, 2], 4, 0.9),
            ([12, 12, 12], 4, 0.4),
            ([2, 12, 2], 3, 0.2),
        ];
        let cases: Vec<OofCase> = (0..12)
            .map(|_| {
                let truth = draw(dims, &[brain, sure, unsure]);
                let pred = draw(dims, &[brain, sure]);
                let mut probability = Array3::<f32>::zeros(dims);
                for ([k, j, i], side, p) in blobs {
                    probability
                        .slice_mut(ndarray::s![k..k + side, j..j + side, i..i + side])
                        .fill(p);
                }
                let mut confidence = Array3::<f32>::zeros(dims);
                confidence
                    .slice_mut(ndarray::s![2..6, 2..6, 2..6])
                    .fill(0.9);
                OofCase {
                    findings: Some(FindingMap {
                        class: Array3::from_elem(dims, 1),
                        probability,
                    }),
                    confidence: Some(confidence),
                    ..case(truth, pred, None)
                }
            })
            .collect();
        let names: Vec<String> = ["background", "lesion", "brain"].map(String::from).to_vec();
        let space = SearchSpace {
            thresholds: vec![0.3, 0.4, 0.5, 0.6],
            min_lesion_mm3: vec![0.0],
            min_confidence: vec![0.5],
        };
        let p = search_postprocessing(
            &cases,
            &names,
            &[Objective::LesionF1, Objective::Dice],
            &no_filter(),
            &start(),
            &space,
        )
        .unwrap();
        assert!((p.classes[0].before - 2.0 / 3.0).abs() < 1e-9, "{p:?}");
        assert_eq!(p.chosen.threshold, 0.4, "{p:?}");
        assert_eq!(p.chosen.min_confidence, 0.0, "{p:?}");
        assert!((p.classes[0].chosen - 1.0).abs() < 1e-9, "{p:?}");
        // The added lesion's confidence is its own probability: the cut-off 0.5 drops it again.
        let at = |t: f64, c: f64| {
            p.tried
                .iter()
                .find(|(s, _)| s.threshold == t && s.min_confidence == c)
                .map(|(_, score)| *score)
        };
        assert!(at(0.4, 0.5).unwrap() < at(0.4, 0.0).unwrap() - 0.1, "{p:?}");
        assert!(at(0.6, 0.0).is_none(), "{p:?}");
        // Without the finding probabilities the threshold stays where it started.
        let blind: Vec<OofCase> = cases
            .into_iter()
            .map(|c| OofCase {
                findings: None,
                ..c
            })
            .collect();
        let p = search_postprocessing(
            &blind,
            &names,
            &[Objective::LesionF1, Objective::Dice],
            &no_filter(),
            &start(),
            &space,
        )
        .unwrap();
        assert!(p.tried.iter().all(|(s, _)| s.threshold == 0.5), "{p:?}");
    }

    #[test]
    fn among_settings_of_equal_f1_a_lead_in_lesion_dice_beyond_the_noise_decides() {
        // Background, lesion, brain; twelve cases of one 4³ lesion beside a brain cube (whose
        // Dice no setting changes). The argmax
        // (the start) marks only the lesion's 2³ core (finding probability 0.9), the rest of
        // the lesion has 0.35: every threshold finds the lesion (F1 1), but 0.3 gives it its
        // whole extent (Dice 1 instead of 16/72). In `sharp` cases the extent is found by 0.3;
        // the others are all core.
        let dims = [16, 16, 16];
        let names: Vec<String> = ["background", "lesion", "brain"].map(String::from).to_vec();
        let make = |sharp: bool| {
            let truth = draw(dims, &[([10, 10, 10], 5, 2), ([2, 2, 2], 4, 1)]);
            let pred = draw(dims, &[([10, 10, 10], 5, 2), ([3, 3, 3], 2, 1)]);
            let mut probability = Array3::<f32>::zeros(dims);
            if sharp {
                probability
                    .slice_mut(ndarray::s![2..6, 2..6, 2..6])
                    .fill(0.35);
            }
            probability
                .slice_mut(ndarray::s![3..5, 3..5, 3..5])
                .fill(0.9);
            OofCase {
                findings: Some(FindingMap {
                    class: Array3::from_elem(dims, 1),
                    probability,
                }),
                ..case(truth, pred, None)
            }
        };
        let space = SearchSpace {
            thresholds: vec![0.3, 0.4, 0.5],
            min_lesion_mm3: vec![0.0],
            min_confidence: Vec::new(),
        };
        let search = |cases: &[OofCase]| {
            search_postprocessing(
                cases,
                &names,
                &[Objective::LesionF1, Objective::Dice],
                &no_filter(),
                &start(),
                &space,
            )
            .unwrap()
        };
        let all: Vec<OofCase> = (0..12).map(|_| make(true)).collect();
        let p = search(&all);
        assert_eq!(p.chosen.threshold, 0.3, "{p:?}");
        assert!((p.classes[0].chosen - 1.0).abs() < 1e-9, "{p:?}");
        assert!((p.classes[0].before - 1.0).abs() < 1e-9, "{p:?}");
        assert!(
            (p.classes[0].dice_before.unwrap() - 16.0 / 72.0).abs() < 1e-9,
            "{p:?}"
        );
        assert!(
            (p.classes[0].dice_chosen.unwrap() - 1.0).abs() < 1e-9,
            "{p:?}"
        );
        // One case of twelve gains: not a lead the cases agree on, the start stays.
        let one: Vec<OofCase> = (0..12).map(|n| make(n == 0)).collect();
        let p = search(&one);
        assert_eq!(p.chosen.threshold, 0.5, "{p:?}");
    }

    #[test]
    fn the_finding_map_holds_the_most_probable_finding_class() {
        // Finding classes 1 and 3 over four voxels.
        let channels = ndarray::Array4::from_shape_vec(
            [2, 1, 1, 4],
            vec![0.1, 0.6, 0.0, 0.3, 0.2, 0.1, 0.0, 0.3],
        )
        .unwrap();
        let m = FindingMap::from_channels(channels.view(), &[1, 3]);
        assert_eq!(m.class.into_raw_vec_and_offset().0, vec![3, 1, 0, 1]);
        assert_eq!(
            m.probability.into_raw_vec_and_offset().0,
            vec![0.2, 0.6, 0.0, 0.3]
        );
    }
}
