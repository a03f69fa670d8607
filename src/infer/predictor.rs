//! A trained model with its preprocessing, rebuilt from a checkpoint alone, predicting label maps
//! on the exact grid of the scan they came from.

use std::path::Path;

use ndarray::{Array3, Array4, ArrayView4, Axis, CowArray, Ix4};

use peakmem_alloc::PeakMemAllocTrait;

use super::attention::{attention_map, AttentionMap};
use super::calibration::Calibration;
use super::memory::{
    release_freed_memory, reset_resident_peak, resident_bytes, resident_peak, CaseArrays,
    MemoryBudget, WindowCost,
};
use super::operating_point::OperatingPoint;
use super::postprocess::{extract_lesions, Extracted, LesionFilter, Probe};
use super::sliding_window::SlidingWindow;
use super::uncertainty::{binary_entropy, MemberSpread, MemberStats};
use crate::config::{
    class_values, EnsembleThreshold, MinConfidence, MinConfidenceChoice, NonFinite, RunConfig,
    Temperature, TemperatureChoice,
};
use crate::error::{Error, Result};
use crate::geometry::Geometry;
use crate::io::layout::{CaseMemory, Checkpoint, CheckpointKind, CvRun, RunDir};
use crate::io::read_json;
use crate::model::HybridSegNet;
use crate::transforms::post::{decide_classes, ClassRule};
use crate::transforms::preprocessing::Preprocessing;
use crate::transforms::spatial::{
    apply_affine, nearest_voxel, resample_labels_onto, resample_linear_onto, voxel_map,
};
use crate::volume::Volume;

/// A model and everything needed to apply it to a scan.
pub struct Predictor {
    /// The run config saved with the checkpoint, with the `segment` overrides applied.
    pub config: RunConfig,
    /// The trained network.
    pub model: HybridSegNet,
    /// The device the model runs on.
    pub device: burn::prelude::Device,
    /// The training run's preprocessing, applied to every scan.
    pub preprocessing: Preprocessing,
    /// Sliding-window settings: the training patch size, overlap, batch size, mirroring, 2.5D context.
    pub window: SlidingWindow,
    /// Class names, background first.
    pub labels: Vec<String>,
    /// Channels the first layer reads (image channels × 2.5D slices).
    pub input_channels: usize,
    /// `--max-memory`: windows per pass chosen per case to stay within it.
    pub memory: Option<MemoryBudget>,
    /// The temperature the logits are divided by, and where it came from.
    pub temperature: TemperatureSource,
    /// With `segment.min_confidence = "fitted"`: the checkpoint's operating point, when it has
    /// one (a fold ensemble has none of its own).
    pub operating_point: Option<OperatingPoint>,
    /// `--uncertainty`: every mirrored pass is an ensemble member ([`MemberStats`]).
    pub uncertainty: bool,
    /// `--attention`: the attention map to compute for windows that hold findings.
    pub attention: Option<AttentionMap>,
    /// A fold ensemble's other members (the first is `model`); empty for one model.
    pub ensemble: Vec<EnsembleMember>,
    /// The members' names (`fold_0`, …), `model`'s first; empty for one model.
    pub member_names: Vec<String>,
}

/// One more model of a fold ensemble, with the temperature fitted on its own fold.
pub struct EnsembleMember {
    /// The fold's network.
    pub model: HybridSegNet,
    /// Its logits are divided by this.
    pub temperature: f32,
}

/// Where the temperature came from.
#[derive(Debug, Clone, PartialEq)]
pub enum TemperatureSource {
    /// Fitted at the end of training (`calibration.json`).
    Fitted(Calibration),
    /// `segment.temperature` asked for this value.
    Given(f64),
    /// `fitted` was asked for, but the checkpoint has no fit (a run without validation cases, or
    /// one trained before calibration existed): 1.
    Missing,
}

impl TemperatureSource {
    /// The temperature itself.
    pub fn value(&self) -> f64 {
        match self {
            TemperatureSource::Fitted(c) => c.temperature,
            TemperatureSource::Given(t) => *t,
            TemperatureSource::Missing => 1.0,
        }
    }
}

/// A prediction: class labels on the source grid, probabilities on the preprocessed grid.
pub struct Prediction {
    /// `[k, j, i]` on `geometry`, the scan's own grid.
    pub labels: Array3<u8>,
    /// The scan's own grid.
    pub geometry: Geometry,
    /// `[K, D, H, W]` softmax probabilities on `grid`.
    pub probabilities: Array4<f32>,
    /// The preprocessed grid (resampled, reoriented, possibly cropped) the model saw.
    pub grid: Geometry,
    /// What was done to the scan that the user should know (e.g. non-finite voxels filled).
    pub warnings: Vec<String>,
    /// How the case was fitted to the memory budget, when there is one.
    pub memory: Option<CaseMemory>,
    /// With `--uncertainty`: the members' spread on `grid`.
    pub members: Option<MemberSpread>,
    /// With `--attention`: the attention map on the scan's grid.
    pub attention: Option<Array3<f32>>,
    /// A fold ensemble's finding threshold matched on this scan
    /// (`segment.ensemble_threshold = "matched"`).
    pub threshold: Option<f32>,
}

impl Predictor {
    /// Loads the model and its preprocessing from `path` (see [`Checkpoint::find`]) onto `device`
    /// (`cpu`, `wgpu`, `cuda`; default: the one it was trained on). `overrides`
    /// (`segment.key=value`) change the saved config's inference settings. A cross-validation
    /// run ([`CvRun`]) loads every trained fold as an ensemble.
    pub fn load(path: &Path, device: Option<&str>, overrides: &[String]) -> Result<Self> {
        Self::load_folds(path, device, overrides, None)
    }

    /// As [`Self::load`]; of a cross-validation run, only the folds in `wanted` (all when `None`).
    pub fn load_folds(
        path: &Path,
        device: Option<&str>,
        overrides: &[String],
        wanted: Option<&[usize]>,
    ) -> Result<Self> {
        let cv = CvRun::new(path);
        let mut folds = cv.trained_folds();
        if folds.is_empty() || RunDir::new(path).resolve(CheckpointKind::Last).is_some() {
            if wanted.is_some() {
                return Err(Error::Checkpoint {
                    path: path.to_path_buf(),
                    reason: "folds were asked for, but this is no cross-validation run (no fold_K/ with a checkpoint)".into(),
                });
            }
            let checkpoint = Checkpoint::find(path)?;
            let config = RunConfig::load(Some(&checkpoint.run_config()), overrides)?;
            return Self::from_checkpoint(&checkpoint, config, device);
        }
        if let Some(wanted) = wanted {
            if let Some(k) = wanted.iter().find(|k| !folds.iter().any(|f| f.0 == **k)) {
                return Err(Error::Checkpoint {
                    path: path.to_path_buf(),
                    reason: format!(
                        "fold {k} has no finished checkpoint (trained: {:?})",
                        folds.iter().map(|f| f.0).collect::<Vec<_>>()
                    ),
                });
            }
            folds.retain(|f| wanted.contains(&f.0));
        }
        // The parent's config: the plan the folds share and the postprocessing chosen on them.
        let config_path = cv.config();
        let config = RunConfig::load(Some(&config_path), overrides)?;
        let mut predictor = Self::from_checkpoint(&folds[0].1, config, device)?;
        for (k, checkpoint) in &folds {
            let saved = RunConfig::load(Some(&checkpoint.run_config()), &[])?;
            if saved.preprocess != predictor.config.preprocess {
                return Err(Error::Checkpoint {
                    path: checkpoint.run_config(),
                    reason: format!(
                        "fold {k} was trained with other preprocessing than {} gives; an ensemble needs one",
                        config_path.display()
                    ),
                });
            }
            predictor.member_names.push(format!("fold_{k}"));
        }
        // Each fold chose its cut-off on its own validation cases, none on the ensemble's output.
        predictor.operating_point = None;
        for (k, checkpoint) in &folds[1..] {
            let (model_config, model) = crate::model::load(&checkpoint.dir, &predictor.device)?;
            if model_config.patch_size.window() != predictor.window.window
                || model_config.context_slices != predictor.window.context
                || model_config.num_classes != predictor.labels.len()
            {
                return Err(Error::Checkpoint {
                    path: checkpoint.model_config(),
                    reason: format!(
                        "fold {k}'s patch, context or classes differ from fold {}'s",
                        folds[0].0
                    ),
                });
            }
            let temperature = temperature(&predictor.config, checkpoint)?.value() as f32;
            predictor
                .ensemble
                .push(EnsembleMember { model, temperature });
        }
        Ok(predictor)
    }

    /// The model of `checkpoint` with `config`'s preprocessing and inference settings.
    fn from_checkpoint(
        checkpoint: &Checkpoint,
        config: RunConfig,
        device: Option<&str>,
    ) -> Result<Self> {
        let dir = checkpoint.dir.clone();
        let config_path = checkpoint.run_config();
        let device = crate::model::device(device.unwrap_or(config.train.device.name()))?;
        let (model_config, model) = crate::model::load(&dir, &device)?;
        let preprocessing =
            Preprocessing::from_config(&config.preprocess).map_err(|e| Error::Checkpoint {
                path: config_path.clone(),
                reason: e.to_string(),
            })?;
        let temperature = temperature(&config, checkpoint)?;
        let operating_point = operating_point(&config, checkpoint)?;
        let window = SlidingWindow {
            window: model_config.patch_size.window(),
            overlap: config.segment.overlap,
            batch_size: config.segment.batch_size,
            concurrent: SlidingWindow::concurrency_for(&device),
            mirror: config.segment.tta,
            context: model_config.context_slices,
            temperature: temperature.value() as f32,
        };
        let mut labels = config.data.labels.clone();
        labels.resize(model_config.num_classes.max(labels.len()), String::new());
        Ok(Predictor {
            preprocessing,
            config,
            model,
            device,
            window,
            labels,
            input_channels: model_config.input_channels(),
            memory: None,
            temperature,
            operating_point,
            uncertainty: false,
            attention: None,
            ensemble: Vec::new(),
            member_names: Vec::new(),
        })
    }

    /// With `--uncertainty` (the mirrored passes become ensemble members, so mirroring is on)
    /// and `--attention`.
    pub fn with_maps(mut self, uncertainty: bool, attention: bool) -> Self {
        self.uncertainty = uncertainty;
        if uncertainty {
            self.window.mirror = true;
        }
        self.attention = attention.then_some(self.config.segment.attention);
        self
    }

    /// Fits every case to `limit` bytes of resident memory (see [`super::memory`]): measures a
    /// forward pass of one and of two windows with `meter`, which must be the process's global
    /// allocator, and refuses a budget the model alone does not fit. Host memory only: on a GPU
    /// the activations live in device memory.
    pub fn with_memory_budget(mut self, limit: u64, meter: &dyn PeakMemAllocTrait) -> Result<Self> {
        let baseline = resident_bytes().ok_or_else(|| Error::Config {
            reason: "--max-memory reads this process's resident memory from /proc/self/status, which this system does not have".into(),
        })?;
        let measure = |batch| {
            self.window
                .forward_bytes(&self.model, &self.device, meter, self.input_channels, batch)
        };
        let mut budget = MemoryBudget {
            limit,
            baseline,
            cost: WindowCost {
                fixed: 0,
                per_window: 0,
            },
        };
        // A budget below what is resident already is refused before any pass runs.
        let refuse = |budget: &MemoryBudget| {
            budget
                .check_model()
                .map_err(|reason| Error::Config { reason })
        };
        refuse(&budget)?;
        // The first pass sets up what every later one reuses; it is not what a window costs.
        // Resident memory grows by more than what is allocated (each thread's heap keeps its own
        // freed pages), so the passes are also measured by it, and the larger figure is kept.
        let resident = || resident_bytes().unwrap_or(baseline);
        measure(1)?;
        let after_one = resident().saturating_sub(baseline);
        let one = measure(1)?.max(after_one);
        // Two windows cost at most twice one: they are measured only when that fits.
        budget.cost = if baseline + 2 * one <= budget.usable() {
            let by_allocation = WindowCost::from_peaks(measure(1)?, measure(2)?);
            let by_residence =
                WindowCost::from_peaks(after_one, resident().saturating_sub(baseline));
            by_allocation.max(by_residence)
        } else {
            WindowCost {
                fixed: 0,
                per_window: one,
            }
        };
        refuse(&budget)?;
        self.memory = Some(budget);
        Ok(self)
    }

    /// Under a budget, the peak resident memory since [`Self::predict`] began.
    pub fn measured_peak(&self) -> Option<u64> {
        self.memory.as_ref().and_then(|_| resident_peak())
    }

    /// The sliding window for a scan: under a memory budget, as many windows per pass as fit,
    /// or the reason none does.
    fn window_for(
        &self,
        volume: &Volume,
        filled: bool,
    ) -> Result<(SlidingWindow, Option<CaseMemory>)> {
        let Some(budget) = &self.memory else {
            return Ok((self.window.clone(), None));
        };
        // Windows tile the reoriented grid: pad its axes, not the source's.
        let spatial = &self.preprocessing.spatial;
        let grid = spatial.oriented(&spatial.resampled_grid(&volume.geometry));
        let [wd, wh, ww] = self.window.window;
        let [ni, nj, nk] = grid.dims;
        let arrays = CaseArrays {
            source_voxels: volume.geometry.voxel_count() as u64,
            grid_voxels: grid.voxel_count() as u64,
            padded_voxels: (nk.max(wd) * nj.max(wh) * ni.max(ww)) as u64,
            channels: volume.voxels.dim().0 as u64,
            classes: self.labels.len() as u64,
            filled_copy: filled,
            // Every mirrored pass of every fold.
            members: if self.uncertainty {
                (self.window.member_flips().len() * (1 + self.ensemble.len())) as u64
            } else {
                0
            },
            attention: self.attention.is_some(),
            fold_mean: !self.ensemble.is_empty(),
            matched: self.matches_threshold(),
        };
        let plan = budget
            .plan(&arrays, self.window.batch_size, self.window.concurrent)
            .map_err(|reason| Error::Unsupported {
                path: volume.info.path.clone(),
                reason,
            })?;
        let mut window = self.window.clone();
        window.batch_size = plan.windows_per_pass;
        window.concurrent = plan.passes_in_flight;
        Ok((window, Some(plan)))
    }

    /// Refuses a scan whose preprocessed grid would exceed `segment.max_voxels`, before any work,
    /// naming the spacings and the grid (and a likely unit error).
    fn check_size(&self, volume: &Volume) -> Result<()> {
        let limit = self.config.segment.max_voxels;
        match self
            .preprocessing
            .spatial
            .size_problem(&volume.geometry, limit, "segment.max_voxels")
        {
            None => Ok(()),
            Some(reason) => Err(Error::Unsupported {
                path: volume.info.path.clone(),
                reason,
            }),
        }
    }

    /// Segments one scan: preprocess as in training, sliding window, argmax, and the label map
    /// mapped back onto the scan's grid (nearest neighbour through the voxel→world affines).
    pub fn predict(&self, volume: &Volume) -> Result<Prediction> {
        self.check_size(volume)?;
        let non_finite = volume.non_finite();
        let filling = non_finite != (0, 0) && self.config.segment.non_finite == NonFinite::Fill;
        let (window, memory) = self.window_for(volume, filling)?;
        if memory.is_some() {
            // What earlier cases freed goes back to the system; the case's own peak starts here.
            release_freed_memory();
            reset_resident_peak();
        }
        let mut warnings = Vec::new();
        let filled;
        let volume = match non_finite {
            (0, 0) => volume,
            (nan, inf) => {
                let what = format!("{nan} NaN and {inf} infinite voxel(s)");
                if self.config.segment.non_finite == NonFinite::Error {
                    return Err(Error::Unsupported {
                        path: volume.info.path.clone(),
                        reason: format!(
                            "{what}; set segment.non_finite = \"fill\" to replace them with the scan's finite minimum"
                        ),
                    });
                }
                let lowest = volume.value_range().map_or(0.0, |(lo, _)| lo);
                let mut copy = volume.clone();
                copy.voxels
                    .mapv_inplace(|v| if v.is_finite() { v } else { lowest });
                warnings.push(format!(
                    "{what} replaced by the scan's finite minimum {lowest}"
                ));
                filled = copy;
                &filled
            }
        };
        if let Some((lo, _)) = volume.value_range().filter(|(lo, hi)| lo == hi) {
            warnings.push(format!(
                "the scan is constant (every voxel {lo}): there is nothing to segment, and any finding is an artefact"
            ));
        }
        let context = self.window.context;
        let slices = volume.geometry.dims[2];
        if context > 0 && slices <= context {
            warnings.push(format!(
                "{slices} slice(s): the model reads {context} neighbouring slice(s) on each side, which \
                 the scan does not have (edge slices are repeated)"
            ));
        }
        let spatial = self.preprocessing.apply(volume)?;
        let mut rule = ClassRule::from_config(&self.config.segment, &self.config.data);
        let measure = self.finding_volume(&spatial.geometry)?;
        let (probabilities, members, volumes) =
            self.ensemble_probabilities(&window, spatial.image.view(), &rule, measure.as_ref())?;
        let mut threshold = None;
        if let Some(measure) = &measure {
            let target = volumes.iter().sum::<usize>() as f64 / volumes.len().max(1) as f64;
            let start = measure.start(&rule);
            let matched = match_threshold(start, target, |t| {
                measure.measure(
                    probabilities.view(),
                    &ClassRule {
                        threshold: t,
                        ..rule.clone()
                    },
                )
            });
            rule.threshold = matched;
            threshold = Some(matched);
        }
        let classes = decide_classes(probabilities.view(), Some(&rule));
        let attention = match self.attention {
            Some(kind) => {
                let findings = self.finding_classes()?;
                let map = attention_map(
                    &self.model,
                    &window,
                    spatial.image.view(),
                    &classes,
                    &findings,
                    kind,
                    &self.device,
                )?;
                Some(resample_linear_onto(
                    map.view(),
                    &spatial.geometry,
                    &volume.geometry,
                ))
            }
            None => None,
        };
        let labels = resample_labels_onto(classes.view(), &spatial.geometry, &volume.geometry);
        Ok(Prediction {
            labels,
            geometry: volume.geometry.clone(),
            probabilities,
            grid: spatial.geometry,
            warnings,
            memory,
            members,
            attention,
            threshold,
        })
    }
}

/// `checkpoint`'s operating point when `config.segment.min_confidence` is `"fitted"` and it has
/// one.
fn operating_point(config: &RunConfig, checkpoint: &Checkpoint) -> Result<Option<OperatingPoint>> {
    let path = checkpoint.operating_point();
    match config.segment.min_confidence {
        MinConfidence::Named(MinConfidenceChoice::Fitted) if path.is_file() => {
            let p: OperatingPoint = read_json(&path)?;
            if !(0.0..=1.0).contains(&p.min_confidence) {
                return Err(Error::Checkpoint {
                    path,
                    reason: format!("min_confidence {} is not in [0, 1]", p.min_confidence),
                });
            }
            Ok(Some(p))
        }
        _ => Ok(None),
    }
}

/// The temperature `config.segment.temperature` asks for, with `checkpoint`'s fit.
fn temperature(config: &RunConfig, checkpoint: &Checkpoint) -> Result<TemperatureSource> {
    let source = match config.segment.temperature {
        Temperature::Value(t) => TemperatureSource::Given(t),
        Temperature::Named(TemperatureChoice::Fitted) => {
            let path = checkpoint.calibration();
            if path.is_file() {
                TemperatureSource::Fitted(read_json::<Calibration>(&path)?)
            } else {
                TemperatureSource::Missing
            }
        }
    };
    let t = source.value();
    if !(t.is_finite() && t > 0.0) {
        return Err(Error::Checkpoint {
            path: checkpoint.calibration(),
            reason: format!("temperature {t} is not a positive number"),
        });
    }
    Ok(source)
}

/// Adds `p` as the `(n + 1)`-th member to the running `mean`. The first member becomes the mean:
/// moved when owned (one model's map is not copied), copied when a view.
///
/// # Shapes
/// - `p` `[K, D, H, W]`, the same as `mean`
fn add_to_mean<'a>(mean: &mut Option<Array4<f32>>, p: impl Into<CowArray<'a, f32, Ix4>>, n: usize) {
    let p = p.into();
    match mean {
        None => *mean = Some(p.into_owned()),
        Some(m) => {
            let w = 1.0 / (n + 1) as f32;
            m.zip_mut_with(&p, |a, b| *a += (b - *a) * w);
        }
    }
}

/// The voxels of a model's findings on the preprocessed grid, decided by a [`ClassRule`] and
/// filtered as `segment` filters them (size, confidence, region of interest).
struct FindingVolume<'a> {
    grid: &'a Geometry,
    names: &'a [String],
    filter: LesionFilter,
    /// The classes counted.
    findings: Vec<u8>,
    /// A two-class model, whose threshold may exceed 0.5.
    binary: bool,
}

impl FindingVolume<'_> {
    /// Finding voxels left of `probabilities` decided by `rule`.
    ///
    /// # Shapes
    /// - `probabilities` `[K, D, H, W]` on `grid`
    fn measure(&self, probabilities: ArrayView4<f32>, rule: &ClassRule) -> usize {
        let mut labels = decide_classes(probabilities, Some(rule));
        let classes = probabilities.dim().0;
        let probe = |class: u32, [k, j, i]: [usize; 3]| Probe {
            probability: if (class as usize) < classes {
                probabilities[[class as usize, k, j, i]]
            } else {
                0.0
            },
            uncertainty: None,
        };
        extract_lesions(&mut labels, self.grid, self.names, &self.filter, 0, probe);
        labels.iter().filter(|l| self.findings.contains(l)).count()
    }

    /// The threshold the match starts from: `rule`'s, which with more than two classes is the
    /// argmax from 0.5 up.
    fn start(&self, rule: &ClassRule) -> f32 {
        if self.binary {
            rule.threshold
        } else {
            rule.threshold.min(0.5)
        }
    }
}

/// Lowest threshold [`match_threshold`] tries.
const MATCH_FLOOR: f32 = 0.1;
/// Its step.
const MATCH_STEP: f32 = 0.05;

/// The threshold, from `start` down by [`MATCH_STEP`] to [`MATCH_FLOOR`] (`start` alone when
/// below it), whose `volume_at` is closest to `target`; the higher on ties. Lowering a threshold
/// grows the findings, so the search stops at the first volume that reaches `target`.
fn match_threshold(start: f32, target: f64, mut volume_at: impl FnMut(f32) -> usize) -> f32 {
    let gap = |v: usize| (v as f64 - target).abs();
    let first = volume_at(start);
    let mut best = (start, gap(first));
    let mut reached = first as f64 >= target;
    let mut n = 1;
    while !reached {
        // From `start` by whole steps, so that no rounding drifts the candidates.
        let t = start - MATCH_STEP * n as f32;
        if t < MATCH_FLOOR - 1e-4 {
            break;
        }
        let v = volume_at(t);
        if gap(v) < best.1 {
            best = (t, gap(v));
        }
        reached = v as f64 >= target;
        n += 1;
    }
    best.0
}

impl Prediction {
    /// Removes small components (and all but the largest of `keep_largest` classes) from the
    /// label map and measures the lesions that remain; each lesion's probabilities are read from
    /// the preprocessed grid at its voxels.
    pub fn lesions(&mut self, names: &[String], filter: &LesionFilter) -> Extracted {
        let to_grid = voxel_map(&self.grid, &self.geometry);
        let probs = &self.probabilities;
        let members = self.members.as_ref();
        let (classes, nd, nh, nw) = probs.dim();
        let probe = |class: u32, [k, j, i]: [usize; 3]| {
            let p = apply_affine(&to_grid, [i as f64, j as f64, k as f64]);
            match nearest_voxel(p, [nd, nh, nw]) {
                Some([z, y, x]) if (class as usize) < classes => Probe {
                    probability: probs[[class as usize, z, y, x]],
                    uncertainty: members.map(|m| m.at(class, [z, y, x], 1.0 - probs[[0, z, y, x]])),
                },
                _ => Probe::default(),
            }
        };
        let members = members.map_or(0, |m| m.members);
        extract_lesions(
            &mut self.labels,
            &self.geometry,
            names,
            filter,
            members,
            probe,
        )
    }

    /// With `--uncertainty`: `[2, k, j, i]` on the scan's grid, the normalised entropy of the
    /// mean foreground probability, then the foreground probability's variance across members
    /// (both resampled linearly, the entropy taken after resampling the mean).
    pub fn uncertainty_map(&self) -> Option<Array4<f32>> {
        let members = self.members.as_ref()?;
        // Filled one channel at a time: one scan-sized temporary at most.
        let [ni, nj, nk] = self.geometry.dims;
        let mut out = Array4::<f32>::zeros([2, nk, nj, ni]);
        let mut entropy = self.foreground_probability();
        entropy.mapv_inplace(binary_entropy);
        out.index_axis_mut(Axis(0), 0).assign(&entropy);
        drop(entropy);
        let variance = resample_linear_onto(members.variance().view(), &self.grid, &self.geometry);
        out.index_axis_mut(Axis(0), 1).assign(&variance);
        Some(out)
    }

    /// The probabilities of `classes`, `[F, k, j, i]`, each resampled linearly onto the scan's
    /// grid.
    pub fn class_probabilities(&self, classes: &[u32]) -> Array4<f32> {
        let [ni, nj, nk] = self.geometry.dims;
        let mut out = Array4::<f32>::zeros([classes.len(), nk, nj, ni]);
        for (f, &c) in classes.iter().enumerate() {
            let p = self.probabilities.index_axis(Axis(0), c as usize);
            out.index_axis_mut(Axis(0), f).assign(&resample_linear_onto(
                p,
                &self.grid,
                &self.geometry,
            ));
        }
        out
    }

    /// Foreground probability (1 − background) resampled linearly onto the scan's grid.
    pub fn foreground_probability(&self) -> Array3<f32> {
        let background = self.probabilities.index_axis(Axis(0), 0);
        let foreground = background.mapv(|p| 1.0 - p);
        resample_linear_onto(foreground.view(), &self.grid, &self.geometry)
    }
}

impl Predictor {
    /// The softmax probabilities of every ensemble member (each fold with its own temperature;
    /// with `--uncertainty`, each mirrored pass of each fold is a member), averaged as a running
    /// mean: one probability map and one member's at a time, never K maps. With `measure`, each
    /// fold's filtered finding volume at `rule` too (the mirrored passes of a fold taken
    /// together, as without `--uncertainty`).
    ///
    /// # Shapes
    /// - `image` `[C, D, H, W]` → probabilities `[K, D, H, W]`
    fn ensemble_probabilities(
        &self,
        window: &SlidingWindow,
        image: ArrayView4<f32>,
        rule: &ClassRule,
        measure: Option<&FindingVolume>,
    ) -> Result<(Array4<f32>, Option<MemberSpread>, Vec<usize>)> {
        let others = self
            .ensemble
            .iter()
            .map(|m| (&m.model, window.with_temperature(m.temperature)));
        let members = std::iter::once((&self.model, window.clone())).chain(others);
        let mut volumes = Vec::new();
        if self.uncertainty {
            let mut stats = MemberStats::new(Some(rule.clone()));
            for (model, window) in members {
                let mut fold = None;
                let mut passes = 0;
                window.predict_members(model, image, &self.device, &mut |p| {
                    if measure.is_some() {
                        add_to_mean(&mut fold, p, passes);
                        passes += 1;
                    }
                    stats.add(p)
                })?;
                if let (Some(measure), Some(fold)) = (measure, &fold) {
                    volumes.push(measure.measure(fold.view(), rule));
                }
            }
            let (mean, spread) = stats.into_parts();
            return Ok((mean, Some(spread), volumes));
        }
        let mut mean: Option<Array4<f32>> = None;
        for (n, (model, window)) in members.enumerate() {
            let p = window.predict(model, image, &self.device)?;
            if let Some(measure) = measure {
                volumes.push(measure.measure(p.view(), rule));
            }
            add_to_mean(&mut mean, p, n);
        }
        // `members` always holds `self.model`.
        Ok((mean.unwrap_or_default(), None, volumes))
    }

    /// Whether a scan's finding threshold is matched: a fold ensemble, `segment.ensemble_threshold
    /// = "matched"`, and a finding class.
    fn matches_threshold(&self) -> bool {
        !self.ensemble.is_empty()
            && self.config.segment.ensemble_threshold == EnsembleThreshold::Matched
            && !self.config.data.finding_classes().is_empty()
    }

    /// What `segment.ensemble_threshold = "matched"` measures on the preprocessed `grid`; `None`
    /// when it does not apply: one model, `same`, or no finding class.
    fn finding_volume<'a>(&'a self, grid: &'a Geometry) -> Result<Option<FindingVolume<'a>>> {
        if !self.matches_threshold() {
            return Ok(None);
        }
        let mut filter = self.lesion_filter()?;
        filter.skip_diameters = true;
        Ok(Some(FindingVolume {
            grid,
            names: &self.labels,
            filter,
            findings: self
                .config
                .data
                .finding_classes()
                .into_iter()
                .map(|c| c as u8)
                .collect(),
            binary: self.labels.len() <= 2,
        }))
    }

    /// The finding classes `segment.threshold` lowers (see [`ClassRule`]): none for a model of
    /// two classes, whose threshold is on its one foreground.
    pub fn finding_classes_for_threshold(&self) -> Vec<u32> {
        if self.labels.len() <= 2 {
            return Vec::new();
        }
        self.config.data.finding_classes()
    }

    /// The classes whose voxels are findings for the attention map: every foreground class but
    /// the region of interest's.
    fn finding_classes(&self) -> Result<Vec<u32>> {
        let roi = match &self.config.segment.roi {
            Some(roi) => class_values(&self.labels, "segment.roi.classes", &roi.classes)?,
            None => Vec::new(),
        };
        Ok((1..self.labels.len() as u32)
            .filter(|c| !roi.contains(c))
            .collect())
    }

    /// The `[segment]` lesion filter, with `keep_largest` class names resolved and a fitted
    /// `min_confidence` read from the checkpoint.
    pub fn lesion_filter(&self) -> Result<LesionFilter> {
        let mut filter = LesionFilter::from_config(&self.config.segment, &self.labels)?;
        if let Some(p) = &self.operating_point {
            filter.min_confidence = p.min_confidence;
        }
        Ok(filter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::Geometry;

    /// A grid of `dims` `[i, j, k]` with isotropic `spacing` mm at the origin.
    fn grid(dims: [usize; 3], spacing: f64) -> Geometry {
        Geometry::new(
            dims,
            [
                [spacing, 0.0, 0.0, 0.0],
                [0.0, spacing, 0.0, 0.0],
                [0.0, 0.0, spacing, 0.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
        )
    }

    #[test]
    fn class_probabilities_are_the_asked_classes_in_order_on_the_scans_grid() {
        // Background, lesion (0.25 everywhere), brain (0.7) on a 2 mm grid; the scan is 1 mm.
        let mut probabilities = Array4::<f32>::zeros([3, 3, 4, 5]);
        for (c, p) in [(0, 0.05), (1, 0.25), (2, 0.7)] {
            probabilities.index_axis_mut(Axis(0), c).fill(p);
        }
        let scan = grid([10, 8, 6], 1.0);
        let prediction = Prediction {
            labels: Array3::zeros([6, 8, 10]),
            geometry: scan,
            probabilities,
            grid: grid([5, 4, 3], 2.0),
            warnings: Vec::new(),
            memory: None,
            members: None,
            attention: None,
            threshold: None,
        };
        let out = prediction.class_probabilities(&[2, 1]);
        assert_eq!(out.dim(), (2, 6, 8, 10));
        for (f, want) in [(0, 0.7f32), (1, 0.25)] {
            let channel = out.index_axis(Axis(0), f);
            // Voxels inside the coarse grid's extent interpolate a constant to itself.
            let inner = channel.slice(ndarray::s![..5, ..7, ..9]);
            assert!(
                inner.iter().all(|&v| (v - want).abs() < 1e-6),
                "{f}: {inner:?}"
            );
        }
    }

    #[test]
    fn the_matched_threshold_is_the_closest_volume_from_the_start_down_to_the_floor() {
        // Volume grows by 10 voxels a 0.05 step below 0.5: 50 at 0.5, 60 at 0.45, ...
        let volume = |t: f32| (50.0 + (0.5 - t) * 200.0).round() as usize;
        let mut asked = Vec::new();
        let t = match_threshold(0.5, 72.0, |t| {
            asked.push(t);
            volume(t)
        });
        assert!((t - 0.4).abs() < 1e-6, "70 is closest to 72: {t}");
        // It stops at the first volume that reaches the target (80 at 0.35).
        assert_eq!(asked.len(), 4, "{asked:?}");
        // Already at the target or above: the start.
        assert_eq!(match_threshold(0.5, 50.0, volume), 0.5);
        assert_eq!(match_threshold(0.5, 10.0, volume), 0.5);
        // Never below the floor, however far the target.
        assert!((match_threshold(0.5, 1e6, volume) - MATCH_FLOOR).abs() < 1e-6);
        // A start below the floor is kept.
        assert_eq!(match_threshold(0.05, 1e6, volume), 0.05);
        // Ties go to the higher threshold: 55 is 5 from both 50 and 60.
        assert_eq!(match_threshold(0.5, 55.0, volume), 0.5);
    }

    #[test]
    fn finding_volume_counts_what_the_filter_leaves_at_the_rules_threshold() {
        // [background, lesion, brain] on a 2 mm grid (8 mm³ voxels); the brain takes 0.95 of
        // what the lesion leaves, so the lesion is the argmax from about 0.49 up.
        let (nk, nj, ni) = (8, 12, 12);
        let mut lesion = Array3::<f32>::zeros([nk, nj, ni]);
        // A core of 2×2×2 at 0.9 in a shell of 4×4×4 at 0.42: 8 voxels, or 64 below 0.42.
        lesion.slice_mut(ndarray::s![1..5, 1..5, 1..5]).fill(0.42);
        lesion.slice_mut(ndarray::s![2..4, 2..4, 2..4]).fill(0.9);
        // One voxel at 0.9: 8 mm³, under the 12 mm³ the filter keeps.
        lesion[[6, 10, 10]] = 0.9;
        // 3×3 at 0.42 with no core: a finding below 0.42 whose confidence is under the cut-off.
        lesion.slice_mut(ndarray::s![6..7, 1..4, 7..10]).fill(0.42);
        let mut probabilities = Array4::<f32>::zeros([3, nk, nj, ni]);
        for ((k, j, i), &p) in lesion.indexed_iter() {
            probabilities[[0, k, j, i]] = 0.05 * (1.0 - p);
            probabilities[[1, k, j, i]] = p;
            probabilities[[2, k, j, i]] = 0.95 * (1.0 - p);
        }
        let geometry = grid([ni, nj, nk], 2.0);
        let names = ["background", "lesion", "brain"].map(String::from);
        let measure = FindingVolume {
            grid: &geometry,
            names: &names,
            filter: LesionFilter {
                min_volume_mm3: 12.0,
                keep_largest: vec![2],
                min_confidence: 0.5,
                skip_diameters: true,
                ..LesionFilter::default()
            },
            findings: vec![1],
            binary: false,
        };
        let at = |threshold: f32| {
            measure.measure(
                probabilities.view(),
                &ClassRule {
                    threshold,
                    findings: vec![1],
                },
            )
        };
        assert_eq!(at(0.5), 8);
        assert_eq!(at(0.45), 8);
        assert_eq!(at(0.4), 64);
        assert_eq!(measure.start(&ClassRule::binary(0.7)), 0.5);
        // The match lowers the threshold to where the shell joins.
        let t = match_threshold(0.5, 60.0, at);
        assert!((t - 0.4).abs() < 1e-6, "{t}");
    }
}
