//! `medseg plan`: a training config derived from a dataset's [`Fingerprint`] and fitted to a
//! compute budget measured on the user's own device. The spacing, patch and normalisation rules
//! follow nnU-Net v2's `ExperimentPlanner` (`nnunetv2/experiment_planning/experiment_planners/
//! default_experiment_planner.py`); the model size, batch and epochs are chosen from measured
//! step times instead of a fixed GPU memory target. Every decision carries its reason.

use serde::Serialize;

use super::fingerprint::{ClassFingerprint, Fingerprint, Modality};
use crate::config::{
    FoldBy, IntensityConfig, IntensityScheme, LabelCode, MinConfidence, MinConfidenceChoice,
    ModelPreset, RoiConfig, RunConfig,
};
use crate::error::{Error, Result};
use crate::geometry::PatchSize;

/// nnU-Net v2's `ANISO_THRESHOLD`: an axis this many times coarser than the finest is anisotropic.
pub const ANISO_THRESHOLD: f64 = 3.0;
/// nnU-Net's foreground oversampling (`oversample_foreground_percent = 0.33`).
pub const NNUNET_FOREGROUND_SHARE: f64 = 0.33;
/// Fewest optimisation steps per fold a plan aims for. nnU-Net runs 250,000 patch steps on a GPU;
/// on a CPU budget the model is step-limited: in five folds of the brain quickstart recipe (8 x
/// 64² at 2 mm) validation Dice still rose from 3,000 to 4,000 steps in four, and a plan of
/// 1,686 steps of 128² at 1.5 mm ended lower on the same folds in four of five (mean 0.577
/// against 0.608).
pub const MIN_STEPS: f64 = 3000.0;
/// Most of a fold's time its whole-volume passes (validation, calibration, out-of-fold) may take;
/// a grid too fine for that is coarsened.
pub const INFERENCE_SHARE: f64 = 0.4;
/// The coarsest grid keeps the median lesion this many voxels across: coarser, small lesions
/// shrink to a voxel or two (measured: a plan on the brain data coarsened to 3 mm, where the
/// median 8.7 mm lesion spans under 3 voxels, and one of its folds learnt no lesion at all).
pub const LESION_VOXELS: f64 = 4.0;
/// A whole-volume forward pass's share of a training step's time per voxel. The textbook
/// backward is twice the forward (1/3), but inference needs no graph: measured here, a validation
/// pass over 13 brain cases at 2 mm took 6-7 s against 0.046 s steps of 8 x 64² (about 1/5.5).
pub const FORWARD_SHARE: f64 = 5.0;
/// Mirrored copies of each pass with test-time mirroring: the in-plane axes of a 2.5D model (a
/// 3D model's third axis doubles it; the estimate, like the pass cost, is taken from 2.5D).
pub const MIRRORS: f64 = 4.0;
/// Time for validations during training, beyond the final one, as a share of a fold's.
pub const VALIDATION_SHARE: f64 = 0.15;
/// Window overlap of validation in a plan: a quarter (nnU-Net segments at a half; validation only
/// selects a checkpoint).
pub const VALIDATE_OVERLAP: f64 = 0.25;
/// Steps per epoch in a plan: validation and checkpoints come at a fixed cadence in steps.
pub const STEPS_PER_EPOCH: usize = 50;
/// Patch sides tried, voxels (multiples of 16: the model's stem stride times its token patch).
const SIDES: [usize; 9] = [32, 48, 64, 80, 96, 128, 160, 192, 256];

/// How the network sees the scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Dimensionality {
    /// Axial slices with one neighbour on each side as extra channels.
    TwoAndHalfD,
    /// Volumes.
    ThreeD,
}

/// A model, patch and batch whose training step is measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Network size.
    pub preset: ModelPreset,
    /// `[H, W]` or `[D, H, W]`.
    pub patch: Vec<usize>,
    /// Patches per step.
    pub batch: usize,
    /// 2.5D neighbours on each side.
    pub context_slices: usize,
}

/// A measured training step (forward, loss, backward, AdamW).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepCost {
    /// Seconds per step.
    pub seconds: f64,
    /// Bytes the step's process held at its peak beyond what it held before.
    pub peak_bytes: u64,
}

/// What the plan must fit.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanRequest {
    /// Time of one training, seconds: a single run, or each fold of a cross-validation (nnU-Net
    /// plans one training and its folds repeat it; a shared budget would make every member of an
    /// ensemble a K-times shorter run than the single model it is weighed against).
    pub budget_seconds: f64,
    /// Cross-validation folds, what they are made of and why ([`fold_scheme`]).
    pub folds: FoldScheme,
    /// Memory a training step may hold, bytes.
    pub max_memory: u64,
}

/// Cross-validation folds as planned.
#[derive(Debug, Clone, PartialEq)]
pub struct FoldScheme {
    /// How many (1: one run with a validation share).
    pub count: usize,
    /// Of whole groups or of single cases.
    pub by: FoldBy,
    /// Why.
    pub why: String,
}

/// One choice and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    /// The setting (`section.key`).
    pub setting: String,
    /// Its value as written.
    pub value: String,
    /// Why.
    pub why: String,
}

/// The planned config and its decisions.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Reads as a run config.
    pub config: RunConfig,
    /// In the order made.
    pub decisions: Vec<Decision>,
}

/// Step time (and memory) as a line in the voxels a step processes, fitted to two measurements.
#[derive(Debug, Clone, Copy)]
struct CostLine {
    fixed: (f64, f64),
    per_voxel: (f64, f64),
}

impl CostLine {
    fn fit(a: (f64, StepCost), b: (f64, StepCost)) -> CostLine {
        let slope = |ya: f64, yb: f64| ((yb - ya) / (b.0 - a.0).max(1.0)).max(0.0);
        let (st, sm) = (
            slope(a.1.seconds, b.1.seconds),
            slope(a.1.peak_bytes as f64, b.1.peak_bytes as f64),
        );
        CostLine {
            fixed: (
                (a.1.seconds - st * a.0).max(0.0),
                (a.1.peak_bytes as f64 - sm * a.0).max(0.0),
            ),
            per_voxel: (st, sm),
        }
    }
    fn seconds(&self, voxels: f64) -> f64 {
        self.fixed.0 + self.per_voxel.0 * voxels
    }
    fn bytes(&self, voxels: f64) -> f64 {
        self.fixed.1 + self.per_voxel.1 * voxels
    }
}

/// The target spacing `[x, y, z]` mm and why: the per-axis median, except that an axis both
/// [`ANISO_THRESHOLD`]× coarser than the finest and with 3× fewer voxels takes its 10th
/// percentile (never finer than the other axes), so thick-slice outliers do not set the grid
/// (nnU-Net v2's `determine_fullres_target_spacing`). `fp` holds at least one case ([`plan`]
/// checks).
pub(crate) fn target_spacing(fp: &Fingerprint) -> ([f64; 3], String) {
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let axis = |a: usize| fp.cases.iter().map(|c| c.spacing[a]).collect::<Vec<f64>>();
    let mut target = [0, 1, 2].map(|a| median(&mut axis(a)));
    let sizes = [0, 1, 2].map(|a| {
        let mut v: Vec<f64> = fp
            .cases
            .iter()
            .map(|c| c.shape[a] as f64 * c.spacing[a] / target[a])
            .collect();
        median(&mut v)
    });
    let worst = (0..3)
        .max_by(|&a, &b| target[a].total_cmp(&target[b]))
        .unwrap_or(2);
    let others: Vec<usize> = (0..3).filter(|&a| a != worst).collect();
    let finest = others.iter().map(|&a| target[a]).fold(f64::MAX, f64::min);
    let coarsest_other = others.iter().map(|&a| target[a]).fold(0.0, f64::max);
    let fewest_other = others.iter().map(|&a| sizes[a]).fold(f64::MAX, f64::min);
    let aniso_spacing = target[worst] > ANISO_THRESHOLD * finest;
    let aniso_voxels = sizes[worst] * ANISO_THRESHOLD < fewest_other;
    let round = |s: f64| (s * 1e4).round() / 1e4;
    if aniso_spacing && aniso_voxels {
        let p10 = crate::transforms::intensity::percentile(&mut axis(worst), 10.0);
        let chosen = if p10 < coarsest_other {
            coarsest_other.max(p10) + 1e-5
        } else {
            p10
        };
        target[worst] = chosen;
        let why = format!(
            "median spacing, but axis {worst} is over {ANISO_THRESHOLD}x coarser than the finest with {ANISO_THRESHOLD}x fewer voxels (anisotropic): its 10th percentile {:.3} mm instead of the median (nnU-Net v2 anisotropy rule)",
            chosen
        );
        (target.map(round), why)
    } else {
        (
            target.map(round),
            format!(
                "per-axis median of {} cases' spacings (nnU-Net v2); no axis is anisotropic by its rule (>{ANISO_THRESHOLD}x coarser and {ANISO_THRESHOLD}x fewer voxels)",
                fp.cases.len()
            ),
        )
    }
}

/// Plans a run from `fp`, starting from `base` (its `[data]` and anything the plan does not
/// decide): `measure` times a candidate's training step on the device.
pub fn plan(
    fp: &Fingerprint,
    base: RunConfig,
    request: &PlanRequest,
    measure: &mut dyn FnMut(&Candidate) -> Result<StepCost>,
) -> Result<Plan> {
    if request.budget_seconds.is_nan()
        || request.budget_seconds <= 0.0
        || request.folds.count == 0
        || fp.cases.is_empty()
    {
        return Err(Error::Config {
            reason:
                "plan: the budget must be positive, folds at least 1, and the dataset non-empty"
                    .into(),
        });
    }
    let (median_spacing, why) = target_spacing(fp);
    let mut planner = Planner {
        fp,
        request,
        median_spacing,
        lines: Default::default(),
        measure,
        decisions: Decisions::default(),
    };
    let mut config = base;
    let grid = planner.grid(&mut config, why)?;
    let dims = planner.dims(&grid)?;
    let chosen = planner.model(&grid, dims, &mut config)?;
    let mut decisions = planner.decisions;
    let folds = &request.folds;
    config.data.folds = folds.count;
    if folds.count > 1 {
        config.data.fold_by = folds.by;
        let value = format!("{:?}", folds.by).to_lowercase();
        decisions.say("data.fold_by", value, folds.why.clone());
    }
    plan_intensity(fp, &mut config, &mut decisions);
    plan_classes(fp, &mut config, &grid.spacing, &chosen, &mut decisions);
    Ok(Plan {
        config,
        decisions: decisions.0,
    })
}

/// The folds for `asked` folds over `cases` cases in `groups` groups (a case without a group is
/// its own): whole groups when every fold still trains on at least two of them, so the
/// out-of-fold score measures groups never trained on; otherwise single cases, because a model
/// that sees one host of two learns that host's look (measured on the brain data: each host-fold
/// model alone reached test lesion F1 0.37, against 0.52 for one model trained on both).
pub fn fold_scheme(asked: usize, groups: usize, cases: usize) -> FoldScheme {
    let count = asked.min(cases).max(1);
    let (by, why) = if count == 1 {
        (FoldBy::Group, "one run with a validation share".into())
    } else if groups >= count && groups - groups.div_ceil(count) >= 2 {
        (FoldBy::Group, format!("{groups} groups: folds of whole groups, so each fold validates on groups it never trained on"))
    } else {
        (FoldBy::Case, format!(
            "{groups} group(s) for {count} folds: whole groups would leave a fold training on fewer than two, so folds of single cases; the out-of-fold score is then optimistic by what a group's cases share"
        ))
    };
    FoldScheme { count, by, why }
}

/// Decisions as they are made.
#[derive(Default)]
struct Decisions(Vec<Decision>);

impl Decisions {
    fn say(&mut self, setting: &str, value: String, why: String) {
        self.0.push(Decision {
            setting: setting.into(),
            value,
            why,
        });
    }
}

/// The grid and the time a fold has.
struct Grid {
    /// Target spacing `[x, y, z]`, mm.
    spacing: [f64; 3],
    /// Median grid at it, voxels.
    median_shape: [f64; 3],
    /// A fold's whole time, seconds.
    per_fold_total: f64,
    /// A fold's time for optimisation steps, seconds.
    per_fold: f64,
    /// One whole-volume pass over a fold's validation cases, seconds.
    pass: f64,
    /// Passes a fold makes.
    passes: f64,
    /// Validations among them.
    validations: usize,
}

/// The planner's state: measured cost lines and the decisions so far.
struct Planner<'a> {
    fp: &'a Fingerprint,
    request: &'a PlanRequest,
    median_spacing: [f64; 3],
    lines: std::collections::BTreeMap<(u8, &'static str), CostLine>,
    measure: &'a mut dyn FnMut(&Candidate) -> Result<StepCost>,
    decisions: Decisions,
}

impl Planner<'_> {
    /// The cost line of a dimensionality and preset, from two measured patch sizes (3D patches in
    /// the aspect of the spacing, which coarsening keeps).
    fn cost(&mut self, dims: Dimensionality, preset: ModelPreset) -> Result<CostLine> {
        let key = (dims as u8, preset.name());
        if let Some(l) = self.lines.get(&key) {
            return Ok(*l);
        }
        let mut points = Vec::new();
        for side in [32usize, 64] {
            let c = candidate(dims, preset, side, &self.median_spacing);
            points.push((voxels(&c), (self.measure)(&c)?));
        }
        let l = CostLine::fit(points[0], points[1]);
        self.lines.insert(key, l);
        Ok(l)
    }

    /// Median grid at `spacing`, `[x, y, z]`.
    fn median_shape(&self, spacing: &[f64; 3]) -> [f64; 3] {
        [0, 1, 2].map(|a| {
            let mut v: Vec<f64> = self
                .fp
                .cases
                .iter()
                .map(|c| c.shape[a] as f64 * c.spacing[a] / spacing[a])
                .collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        })
    }

    /// The target spacing, coarsened when the whole-volume passes over the validation cases
    /// (validation, the temperature fit on `best` and `last`, the operating point and the
    /// out-of-fold segmentation) would take more than INFERENCE_SHARE of a fold; whether the
    /// last two are mirrored as `segment --tta` predicts; and the validations the rest allows.
    /// Windows overlap by VALIDATE_OVERLAP per axis.
    fn grid(&mut self, config: &mut RunConfig, why: String) -> Result<Grid> {
        let request = self.request;
        let per_fold_total = request.budget_seconds;
        let reference = candidate(
            Dimensionality::TwoAndHalfD,
            ModelPreset::Tiny,
            64,
            &self.median_spacing,
        );
        let per_voxel = self
            .cost(Dimensionality::TwoAndHalfD, ModelPreset::Tiny)?
            .seconds(voxels(&reference))
            / voxels(&reference)
            / FORWARD_SHARE
            / (1.0 - VALIDATE_OVERLAP).powi(2);
        let cases = self.fp.cases.len() as f64;
        let validation_cases = if request.folds.count > 1 {
            cases / request.folds.count as f64
        } else {
            (cases * config.data.validation_fraction).round().max(1.0)
        };
        // The temperature fit on `best` and `last`; the operating point and, in a
        // cross-validation, the out-of-fold segmentation, each mirrored with `tta`.
        let segmented = 1.0 + f64::from(request.folds.count > 1);
        let fixed_at = |mirrors: f64| 2.0 + segmented * mirrors;
        let median_voxels: f64 = self.median_shape(&self.median_spacing).iter().product();
        let pass_at = |f: f64| validation_cases * median_voxels / f.powi(3) * per_voxel;
        // The coarsest factor the lesions allow (never below 1: the plan does not refine).
        let finest_lesion = median_lesion_diameter(&classes_of(self.fp, config, false));
        let coarsest_spacing = self.median_spacing.iter().copied().fold(0.0, f64::max);
        let max_factor = finest_lesion
            .map(|d| (d / LESION_VOXELS / coarsest_spacing).max(1.0))
            .unwrap_or(f64::INFINITY);
        let factors: Vec<f64> = [1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0]
            .into_iter()
            .filter(|f| *f <= max_factor)
            .collect();
        // One validation at least, with the fixed passes.
        let fits = |mirrors: f64| {
            factors.iter().copied().find(|f| {
                (fixed_at(mirrors) + 1.0) * pass_at(*f) <= INFERENCE_SHARE * per_fold_total
            })
        };
        // Mirrored when a grid the lesions allow fits them: the search then sees the findings
        // as `segment --tta` gives them.
        let (mirrored, fitting) = match fits(MIRRORS) {
            Some(f) => (true, Some(f)),
            None => (false, fits(1.0)),
        };
        let fixed_passes = fixed_at(if mirrored { MIRRORS } else { 1.0 });
        let factor = fitting.unwrap_or(factors.last().copied().unwrap_or(1.0));
        // None fits, and the lesions stopped the coarsening before the coarsest factor.
        let capped = fitting.is_none() && factor < 4.0;
        let spacing = self
            .median_spacing
            .map(|s| (s * factor * 1e4).round() / 1e4);
        let mut why = if factor > 1.0 {
            format!(
                "{why}; then coarsened {factor}x: at the median one pass over a fold's {validation_cases:.0} validation cases would take {:.0} s, and the {} passes a fold needs must fit in {:.0}% of its {per_fold_total:.0} s",
                pass_at(1.0),
                fixed_passes + 1.0,
                INFERENCE_SHARE * 100.0
            )
        } else {
            why
        };
        if capped {
            why = format!(
                "{why}; no coarser, so that the median lesion ({:.1} mm) keeps {LESION_VOXELS} voxels across: the passes then take {:.0} s of the fold's {per_fold_total:.0} s, and the steps the rest",
                finest_lesion.unwrap_or(0.0),
                (fixed_passes + 1.0) * pass_at(factor)
            );
        }
        self.decisions
            .say("preprocess.spacing", format!("{spacing:?}"), why);
        config.preprocess.spacing = spacing.to_vec();
        let pass = pass_at(factor);
        config.segment.tta = mirrored;
        let what = if request.folds.count > 1 {
            "the operating point and the out-of-fold predictions the postprocessing is searched on"
        } else {
            "the operating point"
        };
        self.decisions.say(
            "segment.tta",
            mirrored.to_string(),
            if mirrored {
                format!("{MIRRORS} mirrored passes averaged (they remove most false positives), and {what} predicted the same way: each such pass takes {MIRRORS}x, and they fit in {:.0}% of a fold", INFERENCE_SHARE * 100.0)
            } else {
                format!("mirrored passes ({MIRRORS}x each) for {what} do not fit in {:.0}% of a fold at a grid the lesions allow; `segment --tta` still mirrors, but the cut-offs were chosen unmirrored", INFERENCE_SHARE * 100.0)
            },
        );
        let validations = ((VALIDATION_SHARE * per_fold_total / pass).floor() as usize).clamp(1, 5);
        let passes = validations as f64 + fixed_passes;
        Ok(Grid {
            spacing,
            median_shape: self.median_shape(&spacing),
            per_fold_total,
            // A grid the lesions keep fine may leave less than the usual share for steps.
            per_fold: (per_fold_total - passes * pass).max(0.25 * per_fold_total),
            pass,
            passes,
            validations,
        })
    }

    /// 3D when the grid is isotropic enough and the budget gives a 3D model enough steps.
    fn dims(&mut self, grid: &Grid) -> Result<Dimensionality> {
        let spacing = grid.spacing;
        let in_plane = spacing[0].min(spacing[1]);
        if spacing[2] > ANISO_THRESHOLD * in_plane {
            self.decisions.say("model.context_slices", "1".into(), format!(
                "2.5D: slices are {:.2} mm apart against {:.2} mm in plane (over {ANISO_THRESHOLD}x), so 3D convolutions would mix unlike distances; one neighbour on each side gives the through-plane context",
                spacing[2], in_plane));
            return Ok(Dimensionality::TwoAndHalfD);
        }
        let l = self.cost(Dimensionality::ThreeD, ModelPreset::Tiny)?;
        let c = candidate(Dimensionality::ThreeD, ModelPreset::Tiny, 48, &spacing);
        let seconds = l.seconds(voxels(&c));
        let steps = grid.per_fold / seconds;
        if steps >= MIN_STEPS {
            self.decisions.say("sampling.patch_size", "3D".into(), format!(
                "3D: the grid is isotropic enough and a tiny 3D step of 48-voxel sides takes {seconds:.2} s here, which leaves {steps:.0} steps per fold (at least {MIN_STEPS})"));
            Ok(Dimensionality::ThreeD)
        } else {
            self.decisions.say("model.context_slices", "1".into(), format!(
                "2.5D: the grid is isotropic, but a tiny 3D step of 48-voxel sides takes {seconds:.2} s here, leaving only {steps:.0} steps per fold (fewer than {MIN_STEPS})"));
            Ok(Dimensionality::TwoAndHalfD)
        }
    }

    /// The largest patch (up to the median grid) that a tiny model trains for MIN_STEPS within
    /// the memory allowed; then the small model if it gets twice the steps (a larger model needs
    /// more to converge); batch, epochs and validation cadence from its measured step.
    fn model(
        &mut self,
        grid: &Grid,
        dims: Dimensionality,
        config: &mut RunConfig,
    ) -> Result<Candidate> {
        let (spacing, shape, per_fold) = (grid.spacing, grid.median_shape, grid.per_fold);
        let memory = self.request.max_memory as f64;
        let limit = |axis: usize| shape[axis].max(16.0) as usize;
        let largest = match dims {
            Dimensionality::TwoAndHalfD => limit(0).max(limit(1)).max(32),
            Dimensionality::ThreeD => limit(0).max(limit(1)).max(limit(2)).max(32),
        };
        let tiny = self.cost(dims, ModelPreset::Tiny)?;
        let mut side = SIDES[0];
        for &s in SIDES.iter().filter(|s| **s <= largest) {
            let v = voxels(&candidate(dims, ModelPreset::Tiny, s, &spacing));
            if per_fold / tiny.seconds(v) >= MIN_STEPS && tiny.bytes(v) <= memory {
                side = s;
            }
        }
        // The line extrapolates from sides 32 and 64, and larger patches cost more per voxel
        // (measured: a 96² step took 0.09 s against 0.072 s extrapolated): the chosen side is
        // timed itself, and a smaller one taken while it leaves fewer than MIN_STEPS.
        let fits =
            |m: &StepCost| per_fold / m.seconds >= MIN_STEPS && m.peak_bytes as f64 <= memory;
        let mut measured = (self.measure)(&candidate(dims, ModelPreset::Tiny, side, &spacing))?;
        while !fits(&measured) {
            let Some(&smaller) = SIDES.iter().rev().find(|s| **s < side) else {
                break;
            };
            side = smaller;
            measured = (self.measure)(&candidate(dims, ModelPreset::Tiny, side, &spacing))?;
        }
        let small = self.cost(dims, ModelPreset::Small)?;
        let v_small = voxels(&candidate(dims, ModelPreset::Small, side, &spacing));
        let small_steps = per_fold / small.seconds(v_small);
        let preset = if small_steps >= 2.0 * MIN_STEPS && small.bytes(v_small) <= memory {
            ModelPreset::Small
        } else {
            ModelPreset::Tiny
        };
        let chosen = candidate(dims, preset, side, &spacing);
        if preset == ModelPreset::Small {
            measured = (self.measure)(&chosen)?;
        }
        let step = measured.seconds;
        let steps = (per_fold / step).floor().max(STEPS_PER_EPOCH as f64);
        let epochs = ((steps / STEPS_PER_EPOCH as f64).floor() as usize).max(1);
        let d = &mut self.decisions;
        d.say("sampling.patch_size", format!("{:?}", chosen.patch), format!(
            "the largest side (up to the median grid {:.0} x {:.0} x {:.0} voxels) at which a tiny step leaves {MIN_STEPS} steps per fold; aspect 1/spacing (nnU-Net)",
            shape[0], shape[1], shape[2]));
        d.say("model.preset", preset.name().into(), format!(
            "a small step at this patch takes {:.3} s, leaving {small_steps:.0} steps per fold; small needs twice {MIN_STEPS}",
            small.seconds(v_small)));
        d.say(
            "train.batch_size",
            chosen.batch.to_string(),
            format!(
            "measured {step:.3} s per step and about {} MiB at its peak, within the {} MiB allowed",
            measured.peak_bytes / 1048576,
            self.request.max_memory / 1048576),
        );
        d.say("train.epochs", epochs.to_string(), format!(
            "{per_fold:.0} s of steps per fold (the budget's {:.0} s of one training, less {:.0} whole-volume passes of about {:.0} s each) at {step:.3} s per step: {steps:.0} steps, {STEPS_PER_EPOCH} per epoch",
            grid.per_fold_total, grid.passes, grid.pass));
        config.sampling.patch_size =
            PatchSize::new(&chosen.patch).ok_or_else(|| Error::Config {
                reason: format!("plan: patch {:?} is not a patch size", chosen.patch),
            })?;
        config.model.preset = preset;
        config.model.context_slices = chosen.context_slices;
        config.model.deep_supervision = Some(true);
        config.train.batch_size = chosen.batch;
        config.train.epochs = epochs;
        config.train.steps_per_epoch = STEPS_PER_EPOCH;
        config.train.lr = 2e-3;
        config.train.warmup_steps = 30.min(steps as usize / 10);
        config.validate.every = (epochs / grid.validations).max(1);
        config.validate.overlap = VALIDATE_OVERLAP;
        d.say("validate.every", config.validate.every.to_string(), format!(
            "{} validation(s) per fold: each whole-volume pass takes about {:.0} s, and validations get {:.0}% of a fold's time",
            grid.validations, grid.pass, VALIDATION_SHARE * 100.0));
        Ok(chosen)
    }
}

fn candidate(
    dims: Dimensionality,
    preset: ModelPreset,
    side: usize,
    spacing: &[f64; 3],
) -> Candidate {
    match dims {
        Dimensionality::TwoAndHalfD => Candidate {
            preset,
            patch: vec![side, side],
            batch: 8,
            context_slices: 1,
        },
        Dimensionality::ThreeD => {
            // Sides in proportion to 1/spacing, `[D, H, W]` = axes z, y, x; multiples of 16.
            let finest = spacing.iter().copied().fold(f64::MAX, f64::min);
            let along = |a: usize| {
                (((side as f64 * finest / spacing[a]) / 16.0).round() as usize).max(1) * 16
            };
            Candidate {
                preset,
                patch: vec![along(2), along(1), along(0)],
                batch: 2,
                context_slices: 0,
            }
        }
    }
}

/// Voxels one step processes.
fn voxels(c: &Candidate) -> f64 {
    c.patch.iter().product::<usize>() as f64 * c.batch as f64
}

/// Per channel: CT clipped to its foreground's 0.5-99.5th percentiles and z-scored with the
/// foreground's mean and spread (nnU-Net's `CTNormalization`); MR z-scored per scan on its
/// tissue, others on the whole scan.
fn plan_intensity(fp: &Fingerprint, config: &mut RunConfig, d: &mut Decisions) {
    config.preprocess.intensity = fp
        .channels
        .iter()
        .map(|ch| match ch.modality {
            Modality::Ct => {
                let f = &ch.foreground;
                d.say("preprocess.intensity", format!("{}: ct [{:.0}, {:.0}]", ch.name, f.p00_5, f.p99_5), format!(
                    "CT keeps its units across scans: clip to the 0.5-99.5th percentiles of the labelled voxels (each class weighted equally, so a large organ does not clip its lesions), then z-score with their mean {:.1} and std {:.1} (nnU-Net CTNormalization)", f.mean, f.std));
                IntensityConfig {
                    scheme: IntensityScheme::Ct,
                    window: vec![f.p00_5, f.p99_5],
                    mean: Some(f.mean),
                    std: Some(f.std.max(1e-6)),
                }
            }
            Modality::Mr => {
                d.say("preprocess.intensity", format!("{}: zscore_foreground", ch.name), "MR has no fixed units: z-score each scan with its tissue's mean and spread (the voxels above the scan's mean), which do not depend on the contrast, the background or the field of view (nnU-Net normalises MR inside its non-zero mask for the same reason)".into());
                IntensityConfig {
                    scheme: IntensityScheme::ZscoreForeground,
                    ..IntensityConfig::default()
                }
            }
            Modality::Other => {
                d.say("preprocess.intensity", format!("{}: zscore", ch.name), "a modality of unknown units: z-score each scan (nnU-Net ZScoreNormalization)".into());
                IntensityConfig {
                    scheme: IntensityScheme::Zscore,
                    ..IntensityConfig::default()
                }
            }
        })
        .collect();
}

/// The fingerprint's anatomy classes (`organs`) or its finding classes, by their label codes.
fn classes_of<'a>(
    fp: &'a Fingerprint,
    config: &RunConfig,
    organs: bool,
) -> Vec<&'a ClassFingerprint> {
    fp.classes
        .iter()
        .enumerate()
        .filter(|(i, c)| {
            let code = config
                .data
                .label_codes
                .get(&c.name)
                .cloned()
                .unwrap_or_else(|| LabelCode::default_for(&c.name, i + 1));
            code.is_anatomy() == organs
        })
        .map(|p| p.1)
        .collect()
}

/// The smallest of the finding classes' median component diameters, mm (None without findings).
fn median_lesion_diameter(lesions: &[&ClassFingerprint]) -> Option<f64> {
    lesions
        .iter()
        .filter(|c| c.component_diameter_mm.count > 0)
        .map(|c| c.component_diameter_mm.p50)
        .reduce(f64::min)
}

/// Lesion classes: foreground sampling share, smallest component kept, the fitted confidence
/// cut-off; organ classes: keep-largest, and the organ as the lesions' region of interest.
fn plan_classes(
    fp: &Fingerprint,
    config: &mut RunConfig,
    spacing: &[f64; 3],
    chosen: &Candidate,
    d: &mut Decisions,
) {
    let organs = classes_of(fp, config, true);
    let lesions = classes_of(fp, config, false);
    let patch_mm = chosen.patch.last().copied().unwrap_or(64) as f64 * spacing[0];
    let share = match median_lesion_diameter(&lesions) {
        Some(diameter) => {
            // Linear between 0.67 (lesions under 5% of the patch) and nnU-Net's 0.33 (25%).
            let r = diameter / patch_mm;
            let t = ((r - 0.05) / 0.20).clamp(0.0, 1.0);
            let s = 0.67 + (NNUNET_FOREGROUND_SHARE - 0.67) * t;
            d.say("sampling.foreground_fraction", format!("{s:.2}"), format!(
                "the median lesion ({diameter:.1} mm) is {:.0}% of the {patch_mm:.0} mm patch: smaller lesions get more lesion-centred patches, from nnU-Net's 0.33 (25% and up) to 0.67 (5% and below)", r * 100.0));
            s
        }
        None => NNUNET_FOREGROUND_SHARE,
    };
    config.sampling.foreground_fraction = (share * 100.0).round() / 100.0;
    config.sampling.patches_per_volume = 40;
    if !organs.is_empty() && !lesions.is_empty() {
        config.sampling.foreground_classes = lesions.iter().map(|c| c.name.clone()).collect();
        config.segment.roi = Some(RoiConfig {
            classes: organs.iter().map(|c| c.name.clone()).collect(),
            margin_mm: 3.0,
            drop_outside: true,
        });
        d.say("segment.roi", format!("{:?}, 3 mm", config.segment.roi.as_ref().map(|r| r.classes.clone()).unwrap_or_default()),
            "the dataset labels organs and findings: findings that do not reach the organ (dilated 3 mm, so findings at its border stay) are dropped, and patches centre on findings".into());
    }
    let voxel_mm3: f64 = spacing.iter().product();
    let smallest = lesions
        .iter()
        .filter(|c| c.component_mm3.count > 0)
        .map(|c| c.component_mm3.p05)
        .reduce(f64::min);
    if let Some(p05) = smallest {
        let m = (0.5 * p05).max(voxel_mm3);
        config.segment.min_lesion_mm3 = (m * 10.0).round() / 10.0;
        d.say("segment.min_lesion_mm3", format!("{:.1}", config.segment.min_lesion_mm3), format!(
            "half the 5th percentile of training lesion volumes ({p05:.1} mm³), at least one voxel ({voxel_mm3:.1} mm³): 95% of real lesions are twice as large"));
    }
    let whole: Vec<String> = organs
        .iter()
        .filter(|c| c.largest_share.p50 >= 0.9 && c.cases > 0)
        .map(|c| c.name.clone())
        .collect();
    if !whole.is_empty() {
        d.say(
            "segment.keep_largest",
            format!("{whole:?}"),
            "these organs are one piece in most training cases: stray islands are removed".into(),
        );
        config.segment.keep_largest = whole;
    }
    if !lesions.is_empty() {
        config.segment.min_confidence = MinConfidence::Named(MinConfidenceChoice::Fitted);
        d.say("segment.min_confidence", "fitted".into(),
            "findings below the confidence chosen on the run's validation cases (its operating point) are dropped; a fold ensemble uses the cut-off searched on the out-of-fold predictions instead".into());
    }
}

/// The plan as a TOML run config: the effective config with each decision's reason as a comment
/// above its key, under a header describing the dataset and the budget.
pub fn to_commented_toml(plan: &Plan, header: &[String]) -> Result<String> {
    let body = plan.config.to_toml()?;
    let mut out: Vec<String> = header.iter().map(|h| format!("# {h}")).collect();
    let mut section = String::new();
    for line in body.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            section = t.trim_matches(|c| c == '[' || c == ']').to_string();
        } else if let Some((key, _)) = t.split_once('=') {
            let setting = format!("{section}.{}", key.trim());
            for d in plan.decisions.iter().filter(|d| d.setting == setting) {
                out.push(format!("# {}: {}", d.value, d.why));
            }
        }
        out.push(line.to_string());
    }
    Ok(out.join("\n") + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::fingerprint::{
        CaseFingerprint, ChannelFingerprint, ClassFingerprint, Distribution,
    };

    fn fingerprint(spacings: &[[f64; 3]], shape: [usize; 3], modality: &str) -> Fingerprint {
        let d = |p50: f64, p05: f64| Distribution {
            count: 100,
            p50,
            p05,
            p00_5: -900.0,
            p99_5: 300.0,
            mean: 40.0,
            std: 120.0,
            ..Distribution::default()
        };
        Fingerprint {
            manifest: "dataset.json".into(),
            key: "k".into(),
            cases: spacings
                .iter()
                .enumerate()
                .map(|(i, s)| CaseFingerprint {
                    id: format!("c{i}"),
                    spacing: *s,
                    shape,
                    foreground_voxels: 1000,
                    foreground_mm3: 1000.0,
                })
                .collect(),
            channels: vec![ChannelFingerprint {
                name: modality.into(),
                modality: Modality::of(modality),
                foreground: d(0.0, 0.0),
                classes: Vec::new(),
            }],
            classes: vec![
                ClassFingerprint {
                    name: "lesion".into(),
                    cases: 10,
                    volume_mm3: d(500.0, 100.0),
                    components_per_case: d(3.0, 1.0),
                    component_mm3: d(300.0, 40.0),
                    component_diameter_mm: d(8.0, 4.0),
                    largest_share: d(0.4, 0.2),
                },
                ClassFingerprint {
                    name: "liver".into(),
                    cases: 10,
                    volume_mm3: d(1.5e6, 1e6),
                    components_per_case: d(1.0, 1.0),
                    component_mm3: d(1.5e6, 1e6),
                    component_diameter_mm: d(140.0, 120.0),
                    largest_share: d(0.98, 0.9),
                },
            ],
        }
    }

    /// Steps that cost 1 µs per voxel (tiny) or 3 µs (small), 1 KiB per voxel.
    fn measure(c: &Candidate) -> Result<StepCost> {
        let per = if c.preset == ModelPreset::Small {
            3e-6
        } else {
            1e-6
        };
        Ok(StepCost {
            seconds: 0.01 + per * voxels(c),
            peak_bytes: (1024.0 * voxels(c)) as u64,
        })
    }

    fn request(budget_seconds: f64) -> PlanRequest {
        PlanRequest {
            budget_seconds,
            folds: fold_scheme(1, 1, 1),
            max_memory: 64 << 30,
        }
    }

    #[test]
    fn isotropic_data_and_a_large_budget_give_3d_at_the_median() {
        let fp = fingerprint(
            &[[1.0, 1.0, 1.0], [1.2, 1.2, 1.2], [0.9, 0.9, 0.9]],
            [200; 3],
            "CT",
        );
        let p = plan(&fp, RunConfig::default(), &request(1e6), &mut measure).unwrap();
        assert_eq!(p.config.preprocess.spacing, vec![1.0, 1.0, 1.0]);
        assert!(p.config.sampling.patch_size.is_3d());
        assert_eq!(p.config.model.context_slices, 0);
        assert_eq!(p.config.model.preset, ModelPreset::Small);
        // CT: clipped to the foreground percentiles, z-scored with its numbers.
        let i = &p.config.preprocess.intensity[0];
        assert_eq!(
            (i.scheme, i.window.clone()),
            (IntensityScheme::Ct, vec![-900.0, 300.0])
        );
        // The liver is one piece; the lesions' smallest kept size is half their 5th percentile.
        assert_eq!(p.config.segment.keep_largest, vec!["liver".to_string()]);
        assert_eq!(p.config.segment.min_lesion_mm3, 20.0);
        // With a lesion class, each run drops findings below its own operating point.
        assert_eq!(
            p.config.segment.min_confidence,
            MinConfidence::Named(MinConfidenceChoice::Fitted)
        );
        assert!(p.decisions.iter().all(|d| !d.why.is_empty()));
    }

    #[test]
    fn thick_slices_take_the_anisotropy_rule_and_2_5d() {
        // 0.7 x 0.7 x 5 mm in most cases, two thinner ones.
        let mut s = vec![[0.7, 0.7, 5.0]; 8];
        s.push([0.7, 0.7, 2.5]);
        s.push([0.7, 0.7, 1.5]);
        let fp = fingerprint(&s, [512, 512, 40], "T1");
        let (spacing, why) = target_spacing(&fp);
        // The 10th percentile of the z spacings (2.4 mm, linear as numpy's), not the median (5 mm).
        assert!((spacing[2] - 2.4).abs() < 1e-9, "{spacing:?}");
        assert!(why.contains("anisotropic"), "{why}");
        let p = plan(&fp, RunConfig::default(), &request(1e6), &mut measure).unwrap();
        assert!(!p.config.sampling.patch_size.is_3d());
        assert_eq!(p.config.model.context_slices, 1);
        // T1 is MR: z-scored on its tissue.
        assert_eq!(
            p.config.preprocess.intensity[0].scheme,
            IntensityScheme::ZscoreForeground
        );
        // A median spacing that is anisotropic but with many slices keeps the median.
        let fp = fingerprint(&[[0.8, 0.8, 5.0]; 5], [100, 100, 300], "T1");
        assert_eq!(target_spacing(&fp).0, [0.8, 0.8, 5.0]);
    }

    #[test]
    fn a_tiny_budget_gives_the_tiny_preset_and_a_small_patch() {
        let fp = fingerprint(&[[1.0, 1.0, 1.0]; 4], [256; 3], "CT");
        let p = plan(&fp, RunConfig::default(), &request(30.0), &mut measure).unwrap();
        assert_eq!(p.config.model.preset, ModelPreset::Tiny);
        assert_eq!(p.config.sampling.patch_size.window()[2], 32);
        let big = plan(&fp, RunConfig::default(), &request(36_000.0), &mut measure).unwrap();
        assert!(big.config.sampling.patch_size.window()[2] > 32);
        // The commented plan reads back as the same config.
        let text = to_commented_toml(&big, &["test".into()]).unwrap();
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), &text).unwrap();
        assert_eq!(RunConfig::load(Some(file.path()), &[]).unwrap(), big.config);
        assert!(
            text.contains("# small") || text.contains("# tiny"),
            "{text}"
        );
    }

    #[test]
    fn the_chosen_patch_is_timed_and_smaller_when_slower_than_the_line() {
        // Thick slices (2.5D); patches over 64² cost three times what the line through 32² and
        // 64² says.
        let fp = fingerprint(&[[0.7, 0.7, 5.0]; 10], [512, 512, 40], "T1");
        let budget = request(2000.0);
        let linear = plan(&fp, RunConfig::default(), &budget, &mut measure).unwrap();
        let side = |p: &Plan| p.config.sampling.patch_size.window()[2];
        assert!(side(&linear) > 64, "{:?}", linear.config.sampling);
        let mut slow = |c: &Candidate| {
            let mut m = measure(c)?;
            if c.patch.iter().any(|s| *s > 64) {
                m.seconds *= 3.0;
            }
            Ok(m)
        };
        let p = plan(&fp, RunConfig::default(), &budget, &mut slow).unwrap();
        assert!(side(&p) < side(&linear), "{:?}", p.config.sampling);
        // Its epochs come from the timed step, and still give MIN_STEPS.
        let steps = p.config.train.epochs * p.config.train.steps_per_epoch;
        assert!(steps as f64 >= MIN_STEPS, "{steps}");
    }

    #[test]
    fn the_grid_coarsens_no_further_than_the_lesions_allow() {
        // 20 cases of 256³ at 1 mm, two folds: at 100 s per fold the whole-volume passes alone
        // would coarsen the grid 2.5x, and 3x with the operating point and the out-of-fold
        // segmentation mirrored.
        let fp = fingerprint(&[[1.0; 3]; 20], [256; 3], "T1");
        let two_folds = |budget_seconds| PlanRequest {
            folds: fold_scheme(2, 20, 20),
            ..request(budget_seconds)
        };
        let big_lesions = {
            let mut f = fp.clone();
            f.classes[0].component_diameter_mm.p50 = 40.0;
            f
        };
        let p = plan(
            &big_lesions,
            RunConfig::default(),
            &two_folds(100.0),
            &mut measure,
        )
        .unwrap();
        assert_eq!(p.config.preprocess.spacing, vec![3.0; 3]);
        assert!(p.config.segment.tta);
        // The median lesion of 8 mm keeps 4 voxels across: 2 mm, and the plan says why; there
        // even the unmirrored passes overrun their share, so none is mirrored.
        let p = plan(&fp, RunConfig::default(), &two_folds(100.0), &mut measure).unwrap();
        assert_eq!(p.config.preprocess.spacing, vec![2.0; 3]);
        assert!(!p.config.segment.tta);
        let why = &p.decisions[0].why;
        assert!(why.contains("median lesion (8.0 mm)"), "{why}");
        // The budget is each fold's, not shared by the two.
        let epochs = p
            .decisions
            .iter()
            .find(|d| d.setting == "train.epochs")
            .unwrap();
        assert!(
            epochs.why.contains("the budget's 100 s of one training"),
            "{}",
            epochs.why
        );
    }

    #[test]
    fn folds_are_of_groups_only_when_each_trains_on_two() {
        // Five hosts, five folds: each fold trains on four.
        assert_eq!(fold_scheme(5, 5, 40).by, FoldBy::Group);
        // Ungrouped cases are groups of one.
        assert_eq!(fold_scheme(5, 30, 30).by, FoldBy::Group);
        // Two hosts: a host fold would train on one, so folds of cases, as many as asked.
        let s = fold_scheme(5, 2, 32);
        assert_eq!((s.count, s.by), (5, FoldBy::Case));
        assert!(s.why.contains("optimistic"), "{}", s.why);
        // Three hosts in three folds: each trains on two.
        assert_eq!(fold_scheme(3, 3, 9).by, FoldBy::Group);
        // Never more folds than cases; one fold is a plain run.
        assert_eq!(fold_scheme(5, 3, 3).count, 3);
        let one = fold_scheme(1, 1, 10);
        assert_eq!((one.count, one.by), (1, FoldBy::Group));
    }
}
