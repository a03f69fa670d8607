//! The on-disk contract: every file medseg writes beside a scan, in a run directory or in a
//! dataset, and reads back. Names and path builders live here and nowhere else; each JSON file
//! has one typed record that both its writer and its reader use.
//!
//! - case names: [`case_name`] (NIfTI and other files), [`dicom_case_name`] (series);
//! - a run directory ([`RunDir`]) and its checkpoints ([`Checkpoint`], with the `.previous`
//!   fallback a crash between two renames leaves);
//! - a case's outputs ([`CaseOutputs`]) with its lesion table ([`LesionTable`]) and label sidecar
//!   ([`LabelsSidecar`]);
//! - a batch's `batch_summary.json` ([`BatchSummary`]);
//! - a synthetic dataset's `dataset.json` ([`DatasetJson`]) and `lesions.json` ([`SynthLesions`]).
//!
//! Voxel boxes are inclusive `[[i, j, k] min, [i, j, k] max]` in the scan's storage order.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

// ---------------------------------------------------------------------------------------------
// Case names

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

/// The case name of a file, used everywhere a case is named from a path (segment outputs,
/// evaluation pairing, dataset manifests): the file name without `.nii` / `.nii.gz`, without
/// nnU-Net's first-channel suffix `_0000` (so `CASE_0000.nii.gz` and its label map `CASE.nii.gz`
/// agree), made safe by [`sanitize_name`].
pub fn case_name(path: &Path) -> String {
    case_name_with(path, ".nii.gz")
}

/// [`case_name`] for a dataset whose files end in `ending` (nnU-Net's `file_ending`).
pub fn case_name_with(path: &Path, ending: &str) -> String {
    sanitize_name(&file_stem(path, ending))
}

/// The file name without `ending` (or `.nii.gz` / `.nii`) and without `_0000`, unsanitised: the
/// stem other files of the same case are named from.
pub fn file_stem(path: &Path, ending: &str) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let stem = name
        .strip_suffix(ending)
        .filter(|_| !ending.is_empty())
        .or_else(|| name.strip_suffix(".nii.gz"))
        .or_else(|| name.strip_suffix(".nii"))
        .unwrap_or(&name);
    stem.strip_suffix("_0000")
        .filter(|s| !s.is_empty())
        .unwrap_or(stem)
        .to_string()
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

// ---------------------------------------------------------------------------------------------
// Run directory and checkpoints

/// The effective run config, in run directories and checkpoints.
pub const RUN_CONFIG_FILE: &str = "config.toml";

/// A training run's directory: effective config, split, log, metrics, curve and checkpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct RunDir {
    /// The directory itself.
    pub root: PathBuf,
}

impl RunDir {
    /// The run directory at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        RunDir { root: root.into() }
    }
    /// `config.toml`: the effective config (what `--resume` and inference read back).
    pub fn config(&self) -> PathBuf {
        self.root.join(RUN_CONFIG_FILE)
    }
    /// `metrics.csv`: one row per epoch.
    pub fn metrics_csv(&self) -> PathBuf {
        self.root.join("metrics.csv")
    }
    /// `training_curve.png`.
    pub fn training_curve(&self) -> PathBuf {
        self.root.join("training_curve.png")
    }
    /// `train.log`.
    pub fn log(&self) -> PathBuf {
        self.root.join("train.log")
    }
    /// `split.json`: the training, validation and test case ids.
    pub fn split(&self) -> PathBuf {
        self.root.join("split.json")
    }
    /// `checkpoints/`.
    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }
    /// Where checkpoint `kind` is written (it may not exist yet).
    pub fn checkpoint(&self, kind: CheckpointKind) -> Checkpoint {
        Checkpoint::new(self.checkpoints().join(kind.name()))
    }
    /// The finished checkpoint `kind`, or its previous version when a crash interrupted the swap
    /// (see [`Checkpoint::swap_paths`]); `None` when neither is complete.
    pub fn resolve(&self, kind: CheckpointKind) -> Option<Checkpoint> {
        let c = self.checkpoint(kind);
        let previous = Checkpoint::new(c.swap_paths().1);
        [c, previous].into_iter().find(Checkpoint::is_complete)
    }
}

/// A cross-validation run (`medseg train --folds K`): `config.toml` (the plan every fold shares,
/// with the postprocessing chosen on the out-of-fold predictions), one run directory per fold
/// (`fold_K/`), the out-of-fold predictions (`oof/`) and `postprocessing.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct CvRun {
    /// The parent directory.
    pub root: PathBuf,
}

impl CvRun {
    /// The cross-validation run at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        CvRun { root: root.into() }
    }
    /// `config.toml`: the shared config (preprocessing fixed by the first fold trained).
    pub fn config(&self) -> PathBuf {
        self.root.join(RUN_CONFIG_FILE)
    }
    /// `fold_K/`: fold K's run directory.
    pub fn fold(&self, k: usize) -> RunDir {
        RunDir::new(self.root.join(format!("fold_{k}")))
    }
    /// `oof/`: every training case segmented by the fold that did not train on it, on its own
    /// grid, with its probability map.
    pub fn oof(&self) -> PathBuf {
        self.root.join("oof")
    }
    /// `postprocessing.json`: the settings searched on `oof/` and their cross-validated scores.
    pub fn postprocessing(&self) -> PathBuf {
        self.root.join("postprocessing.json")
    }
    /// Whether `root` is a cross-validation parent: a config, no checkpoints of its own, and a
    /// fold directory.
    pub fn is_parent(&self) -> bool {
        self.config().is_file()
            && !RunDir::new(&self.root).checkpoints().exists()
            && std::fs::read_dir(&self.root).is_ok_and(|mut entries| {
                entries.any(|e| {
                    e.is_ok_and(|e| {
                        e.file_name().to_string_lossy().starts_with("fold_") && e.path().is_dir()
                    })
                })
            })
    }
    /// The folds with a finished checkpoint, by fold number; empty when `root` is no
    /// cross-validation run.
    pub fn trained_folds(&self) -> Vec<(usize, Checkpoint)> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut folds: Vec<(usize, Checkpoint)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let k = name.strip_prefix("fold_")?.parse().ok()?;
                Some((k, Checkpoint::find(&e.path()).ok()?))
            })
            .collect();
        folds.sort_by_key(|f| f.0);
        folds
    }
}

/// The two checkpoints a run keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointKind {
    /// The one selected on validation.
    Best,
    /// The newest, for `--resume`.
    Last,
}

impl CheckpointKind {
    /// The directory name.
    pub fn name(self) -> &'static str {
        match self {
            CheckpointKind::Best => "best",
            CheckpointKind::Last => "last",
        }
    }
}

/// A checkpoint directory: the model (`model.json` + `weights.bpk`, enough for inference), the
/// optimizer state, the training state and the run config.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// The directory itself.
    pub dir: PathBuf,
}

impl Checkpoint {
    /// The checkpoint at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Checkpoint { dir: dir.into() }
    }
    /// `model.json`: the architecture, as the model's config tree.
    pub fn model_config(&self) -> PathBuf {
        self.dir.join("model.json")
    }
    /// `weights.bpk`.
    pub fn weights(&self) -> PathBuf {
        self.dir.join("weights.bpk")
    }
    /// `training_weights.bpk`: the weights the optimiser steps, written only when they differ
    /// from `weights.bpk` (with `train.ema_decay`, the latter holds their moving average); a
    /// resumed run continues from them.
    pub fn training_weights(&self) -> PathBuf {
        self.dir.join("training_weights.bpk")
    }
    /// `optimizer.bpk`.
    pub fn optimizer(&self) -> PathBuf {
        self.dir.join("optimizer.bpk")
    }
    /// `state.json`: epoch, step, best metric, history.
    pub fn state(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    /// `config.toml`: the run's effective config, so inference rebuilds preprocessing from the
    /// checkpoint alone.
    pub fn run_config(&self) -> PathBuf {
        self.dir.join(RUN_CONFIG_FILE)
    }
    /// `calibration.json`: the temperature fitted on validation at the end of training
    /// ([`Calibration`]); absent in a checkpoint of a run without validation cases.
    pub fn calibration(&self) -> PathBuf {
        self.dir.join("calibration.json")
    }
    /// `operating_point.json`: the findings' lowest confidence chosen on validation at the end
    /// of training (`infer::operating_point::OperatingPoint`); `segment.min_confidence =
    /// "fitted"` reads it.
    pub fn operating_point(&self) -> PathBuf {
        self.dir.join("operating_point.json")
    }
    /// A checkpoint is written whole into `NAME.partial/`, then the old one is moved to
    /// `NAME.previous/` and the new one into place: `(partial, previous)`.
    pub fn swap_paths(&self) -> (PathBuf, PathBuf) {
        let name = self
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let parent = self.dir.parent().unwrap_or(Path::new("."));
        (
            parent.join(format!("{name}.partial")),
            parent.join(format!("{name}.previous")),
        )
    }
    /// Whether every file of a training checkpoint is present.
    pub fn is_complete(&self) -> bool {
        [
            self.model_config(),
            self.weights(),
            self.state(),
            self.run_config(),
        ]
        .iter()
        .all(|p| p.is_file())
    }
    /// The checkpoint a user names for inference: a checkpoint directory itself, or a run
    /// directory's best, else last, checkpoint (each with its `.previous` fallback, so a crash
    /// during a swap never silently turns `best` into `last`).
    pub fn find(path: &Path) -> Result<Checkpoint> {
        let direct = Checkpoint::new(path);
        if direct.model_config().is_file() && direct.run_config().is_file() {
            return Ok(direct);
        }
        let run = RunDir::new(path);
        [CheckpointKind::Best, CheckpointKind::Last]
            .into_iter()
            .find_map(|kind| run.resolve(kind))
            .ok_or_else(|| Error::Checkpoint {
                path: path.to_path_buf(),
                reason: "neither a checkpoint (model.json, config.toml) nor a run directory with checkpoints/best or checkpoints/last".into(),
            })
    }
}

// ---------------------------------------------------------------------------------------------
// A case's outputs

/// Suffixes of per-case files that sit beside the masks and are not cases of their own.
const SIDECAR_SUFFIXES: [&str; 3] = ["_probabilities", "_uncertainty", "_attention"];

/// What `medseg segment --format` writes as the segmentation itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutputFormat {
    /// `NAME.nii.gz`, the label map.
    Nifti,
    /// `NAME_seg.dcm`, a DICOM Segmentation of the source series.
    DicomSeg,
    /// `NAME_rtstruct.dcm`, an RT Structure Set on the source series.
    Rtstruct,
}

impl std::str::FromStr for OutputFormat {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        match text.trim() {
            "nifti" => Ok(OutputFormat::Nifti),
            "dicom-seg" | "seg" => Ok(OutputFormat::DicomSeg),
            "rtstruct" => Ok(OutputFormat::Rtstruct),
            other => Err(Error::Config {
                reason: format!(
                    "unknown output format {other:?}: choose nifti, dicom-seg or rtstruct"
                ),
            }),
        }
    }
}

/// The files of one case in a segmentation output directory. The label map (or, when it is not
/// asked for, the last DICOM object) is written last, so its presence marks a finished case.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseOutputs {
    /// `NAME.nii.gz`: the label map on the scan's grid.
    pub mask: PathBuf,
    /// Whether the label map is asked for (it is also written when a DICOM output cannot be).
    pub nifti: bool,
    /// `NAME_labels.json`: class names by label value ([`LabelsSidecar`]).
    pub labels: PathBuf,
    /// `NAME_lesions.csv`.
    pub lesions_csv: PathBuf,
    /// `NAME_lesions.json` ([`LesionTable`]).
    pub lesions_json: PathBuf,
    /// `NAME_probabilities.nii.gz`: the foreground probability (float32), when asked for.
    pub probabilities: Option<PathBuf>,
    /// `NAME_finding_probabilities.nii.gz`: with the probabilities, for a model of more than two
    /// classes with finding classes, one float32 volume per finding class (in class order), the
    /// class's probability (what `segment.threshold` compares).
    pub finding_probabilities: Option<PathBuf>,
    /// `NAME_overlay.png`, when asked for.
    pub overlay: Option<PathBuf>,
    /// `NAME_uncertainty.nii.gz` (`--uncertainty`): two float32 volumes on the scan's grid, the
    /// normalised entropy of the mean foreground probability, then the variance of the foreground
    /// probability across members.
    pub uncertainty: Option<PathBuf>,
    /// `NAME_attention.nii.gz` (`--attention`): the attention map (float32, `[0, 1]`).
    pub attention: Option<PathBuf>,
    /// `NAME_seg.dcm`: the DICOM Segmentation, when asked for (DICOM sources only).
    pub seg: Option<PathBuf>,
    /// `NAME_rtstruct.dcm`: the RT Structure Set, when asked for (DICOM sources only).
    pub rtstruct: Option<PathBuf>,
}

impl CaseOutputs {
    /// The outputs of case `name` in `dir`: the NIfTI label map and tables; the optional files only
    /// when asked for.
    pub fn new(dir: &Path, name: &str, probabilities: bool, overlay: bool) -> Self {
        CaseOutputs {
            mask: dir.join(format!("{name}.nii.gz")),
            nifti: true,
            labels: dir.join(format!("{name}_labels.json")),
            lesions_csv: dir.join(format!("{name}_lesions.csv")),
            lesions_json: dir.join(format!("{name}_lesions.json")),
            probabilities: probabilities.then(|| dir.join(format!("{name}_probabilities.nii.gz"))),
            finding_probabilities: probabilities
                .then(|| dir.join(format!("{name}_finding_probabilities.nii.gz"))),
            overlay: overlay.then(|| dir.join(format!("{name}_overlay.png"))),
            uncertainty: None,
            attention: None,
            seg: None,
            rtstruct: None,
        }
    }

    /// [`CaseOutputs::new`] with the segmentation written in `formats` (at least one).
    pub fn with_formats(
        dir: &Path,
        name: &str,
        probabilities: bool,
        overlay: bool,
        formats: &[OutputFormat],
    ) -> Self {
        let asked = |f: OutputFormat, suffix: &str| {
            formats
                .contains(&f)
                .then(|| dir.join(format!("{name}_{suffix}.dcm")))
        };
        CaseOutputs {
            nifti: formats.contains(&OutputFormat::Nifti),
            seg: asked(OutputFormat::DicomSeg, "seg"),
            rtstruct: asked(OutputFormat::Rtstruct, "rtstruct"),
            ..Self::new(dir, name, probabilities, overlay)
        }
    }

    /// With the uncertainty and attention maps when asked for.
    pub fn with_maps(self, dir: &Path, name: &str, uncertainty: bool, attention: bool) -> Self {
        CaseOutputs {
            uncertainty: uncertainty.then(|| dir.join(format!("{name}_uncertainty.nii.gz"))),
            attention: attention.then(|| dir.join(format!("{name}_attention.nii.gz"))),
            ..self
        }
    }

    /// Every file exists for a case whose source is DICOM (`dicom`) or not: the DICOM objects
    /// are only written for DICOM sources, and the label map stands in for them otherwise (the
    /// finding probabilities only for some models, so never required).
    pub fn complete(&self, dicom: bool) -> bool {
        let wants_dicom = dicom && (self.seg.is_some() || self.rtstruct.is_some());
        let mask = (self.nifti || !wants_dicom).then_some(&self.mask);
        let dicom_files = [&self.seg, &self.rtstruct]
            .into_iter()
            .filter(|_| dicom)
            .flatten();
        [&self.labels, &self.lesions_csv, &self.lesions_json]
            .into_iter()
            .chain(mask)
            .chain(self.probabilities.iter())
            .chain(self.overlay.iter())
            .chain(self.uncertainty.iter())
            .chain(self.attention.iter())
            .chain(dicom_files)
            .all(|p| p.is_file())
    }

    /// Whether a NIfTI case name is a per-case sidecar (a probability map), not a mask.
    pub fn is_sidecar(case: &str) -> bool {
        SIDECAR_SUFFIXES.iter().any(|s| case.ends_with(s))
    }
}

/// One lesion of a label map (a connected component of a class), measured on the map's grid: a
/// row of `NAME_lesions.csv` / `NAME_lesions.json`. Tables written by other tools need only
/// `class` and `bbox_voxel` (and `confidence` for FROC); the rest defaults.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Lesion {
    /// 1-based, in raster order of the lesions' first voxels, class by class.
    #[serde(default)]
    pub id: usize,
    /// The label value.
    pub class: u32,
    /// The class name.
    #[serde(default)]
    pub label: String,
    /// Voxel count.
    #[serde(default)]
    pub voxels: usize,
    /// Volume, mm³.
    #[serde(default)]
    pub volume_mm3: f64,
    /// Mean voxel-centre position, RAS mm.
    #[serde(default)]
    pub centroid_mm: [f64; 3],
    /// Inclusive voxel bounding box `[[i, j, k] min, [i, j, k] max]`.
    pub bbox_voxel: [[usize; 3]; 2],
    /// World bounding box (RAS mm) of the voxel-box corners' centres.
    #[serde(default)]
    pub bbox_mm: [[f64; 3]; 2],
    /// Longest distance between two voxel centres of the lesion's surface, mm (3D Feret diameter).
    #[serde(default)]
    pub diameter_mm: f64,
    /// Mean of the class probability over the lesion.
    #[serde(default)]
    pub mean_probability: f64,
    /// Maximum of the class probability over the lesion.
    #[serde(default)]
    pub max_probability: f64,
    /// The detection confidence (medseg: the lesion's maximum probability, after the model's
    /// temperature); absent in another tool's table, `max_probability` stands in. medseg numbers
    /// and orders its rows by it, most confident first.
    #[serde(default)]
    pub confidence: Option<f64>,
    /// With `--uncertainty`: mean over the lesion's voxels of the normalised entropy of the mean
    /// foreground probability (0 = every member certain, 1 = a coin toss).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_entropy: Option<f64>,
    /// With `--uncertainty`: the share of ensemble members (mirrored passes) whose own label map
    /// has this class on at least one of the lesion's voxels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detection_agreement: Option<f64>,
    /// With `--uncertainty`: mean over the lesion's voxels of the standard deviation of the
    /// class probability across members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probability_std: Option<f64>,
    /// With a region-of-interest stage: whether the lesion reaches the dilated region of
    /// interest (an organ class itself has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inside_roi: Option<bool>,
}

/// `NAME_lesions.json`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct LesionTable {
    /// The case name.
    #[serde(default)]
    pub case: String,
    /// One row per lesion.
    pub lesions: Vec<Lesion>,
    /// What the region-of-interest stage did, when one ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roi: Option<RoiSummary>,
    /// The temperature the probabilities were divided by (1 = none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
}

/// `calibration.json` in a checkpoint: the temperature fitted on validation voxels, and how the
/// fit changed their negative log-likelihood and expected calibration error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// The fitted temperature `T`: `segment` divides the logits by it.
    pub temperature: f64,
    /// Validation voxels sampled (foreground and background stratified, weighted back).
    pub samples: usize,
    /// Mean negative log-likelihood at `T = 1`.
    pub nll_before: f64,
    /// Mean negative log-likelihood at the fitted `T`.
    pub nll_after: f64,
    /// Expected calibration error of the foreground probability at `T = 1`.
    pub ece_before: f64,
    /// Expected calibration error at the fitted `T`.
    pub ece_after: f64,
}

/// One bin of a reliability diagram.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReliabilityBin {
    /// Lower edge of the probability bin.
    pub lower: f64,
    /// Upper edge.
    pub upper: f64,
    /// Pairs in the bin.
    pub count: u64,
    /// Their mean probability; `None` when empty.
    pub mean_probability: Option<f64>,
    /// The share of them that are foreground; `None` when empty.
    pub observed: Option<f64>,
}

/// The region-of-interest stage of one case.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RoiSummary {
    /// The classes that make the region.
    pub classes: Vec<String>,
    /// Dilation of the region, mm.
    pub margin_mm: f64,
    /// Region voxels found; when none, no lesion is dropped (a missed organ must not silently
    /// erase every finding).
    pub voxels: usize,
    /// Lesions outside the dilated region that were removed from the mask and the table.
    pub removed_outside: usize,
}

impl LesionTable {
    /// The CSV form, one row per lesion (`NAME_lesions.csv`).
    pub fn to_csv(&self) -> String {
        let mut out = String::from(
            "case,id,class,label,voxels,volume_mm3,centroid_x_mm,centroid_y_mm,centroid_z_mm,\
             bbox_i_min,bbox_j_min,bbox_k_min,bbox_i_max,bbox_j_max,bbox_k_max,\
             bbox_x_min_mm,bbox_y_min_mm,bbox_z_min_mm,bbox_x_max_mm,bbox_y_max_mm,bbox_z_max_mm,\
             diameter_mm,mean_probability,max_probability,inside_roi,\
             mean_entropy,detection_agreement,probability_std\n",
        );
        let case = &self.case;
        let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.4}"));
        for l in &self.lesions {
            let [c0, c1, c2] = l.centroid_mm;
            let [lo, hi] = l.bbox_voxel;
            let [wlo, whi] = l.bbox_mm;
            out.push_str(&format!(
                "{case},{},{},{},{},{:.3},{c0:.3},{c1:.3},{c2:.3},{},{},{},{},{},{},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.4},{:.4},{},{},{},{}\n",
                l.id, l.class, l.label.replace(',', " "), l.voxels, l.volume_mm3,
                lo[0], lo[1], lo[2], hi[0], hi[1], hi[2],
                wlo[0], wlo[1], wlo[2], whi[0], whi[1], whi[2],
                l.diameter_mm, l.mean_probability, l.max_probability,
                l.inside_roi.map_or("", |inside| if inside { "yes" } else { "no" }),
                opt(l.mean_entropy), opt(l.detection_agreement), opt(l.probability_std)
            ));
        }
        out
    }
}

/// `NAME_labels.json`: class names by label value, as strings (`{"labels": {"0": "background"}}`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct LabelsSidecar {
    /// Name by label value.
    pub labels: BTreeMap<u32, String>,
}

impl LabelsSidecar {
    /// Names in label-value order, background first.
    pub fn from_names(names: &[String]) -> Self {
        LabelsSidecar {
            labels: names
                .iter()
                .enumerate()
                .map(|(v, n)| (v as u32, n.clone()))
                .collect(),
        }
    }

    /// The inverse of [`LabelsSidecar::from_names`]: names in label-value order, a value without
    /// one named by its number. Label maps are 8-bit, so no value above 255 is listed.
    pub fn names(&self) -> Vec<String> {
        let n = self.labels.keys().max().map_or(0, |&m| m.min(255) + 1);
        (0..n)
            .map(|v| {
                self.labels
                    .get(&v)
                    .cloned()
                    .unwrap_or_else(|| v.to_string())
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Batch summary

/// What became of one case of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaseStatus {
    /// Segmented by this invocation.
    Segmented,
    /// Its outputs already existed (`--skip-existing`).
    Skipped,
    /// It could not be segmented; the reason is recorded.
    Failed,
}

/// One case of `batch_summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchCase {
    /// The output name.
    pub case: String,
    /// Where it came from (a path, or a manifest and its row).
    pub input: String,
    /// What happened to it.
    pub status: CaseStatus,
    /// Lesions found (segmented cases).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lesions: Option<usize>,
    /// Wall time, s (segmented cases).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    /// Seconds per stage, by stage name (segmented cases).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub stages: BTreeMap<String, f64>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What was done to the scan that the user should know (e.g. non-finite voxels filled).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// How the case met `--max-memory`, when one was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<CaseMemory>,
    /// A fold ensemble's finding threshold, matched on this scan
    /// (`segment.ensemble_threshold = "matched"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
}

/// How a case was fitted to `medseg segment --max-memory`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaseMemory {
    /// The budget, bytes.
    pub limit_bytes: u64,
    /// The peak resident memory predicted for the case, bytes.
    pub predicted_peak_bytes: u64,
    /// Windows per forward pass chosen to stay within it (at most `segment.batch_size`).
    pub windows_per_pass: usize,
    /// Forward passes run at once (two on a multi-threaded CPU when they fit; absent in older
    /// runs: 1).
    #[serde(default = "one")]
    pub passes_in_flight: usize,
    /// What each pass costs besides its windows, bytes (measured on the model).
    #[serde(default)]
    pub bytes_per_pass: u64,
    /// What each window of a pass costs, bytes (measured on the model).
    pub bytes_per_window: u64,
    /// What the scan and its resampled grid hold besides the passes, bytes.
    pub case_bytes: u64,
    /// The peak resident memory measured while the case was segmented (Linux: `VmHWM`, reset
    /// when the case began).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured_peak_bytes: Option<u64>,
}

fn one() -> usize {
    1
}

/// `batch_summary.json` (or `batch_summary_shard-I-of-N.json`) of a `medseg segment` run.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct BatchSummary {
    /// Cases the inputs expanded to, before sharding.
    pub inputs: usize,
    /// Cases segmented by this invocation.
    pub segmented: usize,
    /// Cases skipped because their outputs existed.
    pub skipped: usize,
    /// Cases that failed.
    pub failed: usize,
    /// Every case of this shard, in order.
    pub cases: Vec<BatchCase>,
    /// A merged summary (`--merge-summaries`): how many shards the batch was split into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shards: Option<u64>,
    /// A merged summary: shards whose summary was not found (not run, or still running).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing_shards: Vec<u64>,
}

impl BatchSummary {
    /// The shard `(i, n)` a summary file name stands for (`batch_summary_shard-I-of-N.json`).
    pub fn shard_of(file_name: &str) -> Option<(u64, u64)> {
        let rest = file_name
            .strip_prefix("batch_summary_shard-")?
            .strip_suffix(".json")?;
        let (i, n) = rest.split_once("-of-")?;
        Some((i.parse().ok()?, n.parse().ok()?))
    }

    /// The summary's path in `dir`, for shard `(i, n)` when sharded.
    pub fn path(dir: &Path, shard: Option<(u64, u64)>) -> PathBuf {
        dir.join(match shard {
            Some((i, n)) => format!("batch_summary_shard-{i}-of-{n}.json"),
            None => "batch_summary.json".into(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Datasets

/// Directories of a Decathlon-layout dataset.
pub const IMAGES_TRAIN: &str = "imagesTr";
/// Label maps of the training cases.
pub const LABELS_TRAIN: &str = "labelsTr";
/// Images of the test cases.
pub const IMAGES_TEST: &str = "imagesTs";
/// Label maps of the test cases.
pub const LABELS_TEST: &str = "labelsTs";

/// `dataset.json` of a Decathlon / nnU-Net dataset. Both dialects read: v1 (`modality`, labels
/// `{"0": name}`, cases in `training`) and nnU-Net v2 (`channel_names`, labels `{name: value}`,
/// `file_ending`, cases found as `imagesTr/CASE_XXXX{file_ending}`). medseg writes v2 with a
/// `training` list.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DatasetJson {
    /// Dataset name.
    #[serde(default)]
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// v2: channel names by index.
    #[serde(
        default,
        rename = "channel_names",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub channel_names: BTreeMap<String, String>,
    /// v1: channel names by index.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub modality: BTreeMap<String, String>,
    /// v1 `{"0": "background"}` or v2 `{"background": 0}`.
    #[serde(default)]
    pub labels: BTreeMap<String, LabelEntry>,
    /// Listed training cases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_training: Option<usize>,
    /// v2: the image file ending.
    #[serde(
        default,
        rename = "file_ending",
        skip_serializing_if = "Option::is_none"
    )]
    pub file_ending: Option<String>,
    /// Training cases (image and label paths relative to the dataset root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<Vec<DatasetCase>>,
    /// Test cases (paths relative to the dataset root).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub test: Vec<TestCase>,
}

/// A test case of `dataset.json`: v1 lists image paths; medseg lists labels too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TestCase {
    /// Image and label (medseg).
    Labelled(DatasetCase),
    /// An image path (v1).
    Image(String),
}

/// One side of a `labels` entry: a v1 name or a v2 value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LabelEntry {
    /// v2: `"name": value`.
    Value(u64),
    /// v1: `"value": "name"`.
    Name(String),
    /// nnU-Net region labels (`"name": [1, 2]`), which medseg does not train.
    Region(Vec<u64>),
}

/// A training case of `dataset.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetCase {
    /// Image path (one file, possibly multi-channel); nnU-Net v2 may name only the case.
    pub image: String,
    /// Label map path.
    pub label: String,
    /// medseg: the case's group (patient, host, site). Cross-validation keeps a group in one
    /// fold; other readers ignore the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

impl DatasetJson {
    /// `root/dataset.json`.
    pub fn path(root: &Path) -> PathBuf {
        root.join("dataset.json")
    }

    /// Class names by label value (0, 1, 2, … without gaps).
    pub fn label_names(&self, path: &Path) -> Result<Vec<String>> {
        let mut by_value: BTreeMap<u64, String> = BTreeMap::new();
        for (k, v) in &self.labels {
            match (k.parse::<u64>(), v) {
                (Ok(value), LabelEntry::Name(name)) => {
                    by_value.insert(value, name.clone());
                }
                (_, LabelEntry::Value(value)) => {
                    by_value.insert(*value, k.clone());
                }
                _ => {
                    return Err(Error::Unsupported {
                        path: path.to_path_buf(),
                        reason: format!("labels entry {k:?}: expected \"value\": \"name\" or \"name\": value (region labels are not supported)"),
                    })
                }
            }
        }
        if by_value.keys().copied().ne(0..by_value.len() as u64) {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                reason: "label values must be 0, 1, 2, … without gaps".into(),
            });
        }
        Ok(by_value.into_values().collect())
    }

    /// Channel names in index order (v2's `channel_names`, else v1's `modality`).
    pub fn channel_names(&self) -> Vec<String> {
        let map = if self.channel_names.is_empty() {
            &self.modality
        } else {
            &self.channel_names
        };
        let mut v: Vec<(usize, String)> = map
            .iter()
            .filter_map(|(k, n)| Some((k.parse().ok()?, n.clone())))
            .collect();
        v.sort();
        v.into_iter().map(|p| p.1).collect()
    }
}

/// One lesion `medseg synth` inserted: a row of `lesions.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SynthLesion {
    /// The case (image / label name in the dataset).
    pub case: String,
    /// 1-based within the case.
    pub id: usize,
    /// The lesion kind (`lung_nodule`, `brain_tumour`, …).
    #[serde(rename = "type")]
    pub kind: String,
    /// The host scan's case name.
    pub host: String,
    /// How the lesion looks against its tissue (domain-randomised datasets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub polarity: Option<Polarity>,
    /// The simulated acquisition's slice thickness in mm, when the case was resampled from
    /// thick slices (domain-randomised datasets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slice_thickness_mm: Option<f64>,
    /// What was inserted, measured.
    #[serde(flatten)]
    pub lesion: InsertedLesion,
}

/// How a lesion looks against its tissue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Polarity {
    /// Brighter than the tissue.
    Hyper,
    /// Darker than the tissue.
    Hypo,
    /// A bright rim around a darker (necrotic) core.
    Ring,
    /// Close to the tissue, inside a brighter or darker halo of oedema.
    IsoOedema,
}

impl Polarity {
    /// Every polarity, in a fixed order.
    pub const ALL: [Polarity; 4] = [
        Polarity::Hyper,
        Polarity::Hypo,
        Polarity::Ring,
        Polarity::IsoOedema,
    ];

    /// The name used in `lesions.json` and reports.
    pub fn name(self) -> &'static str {
        match self {
            Polarity::Hyper => "hyper",
            Polarity::Hypo => "hypo",
            Polarity::Ring => "ring",
            Polarity::IsoOedema => "iso_oedema",
        }
    }
}

/// The measurements of one inserted lesion (the flattened tail of a [`SynthLesion`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InsertedLesion {
    /// Volume of the label, mm³.
    pub volume_mm3: f64,
    /// Equivalent-sphere diameter, mm.
    pub diameter_mm: f64,
    /// Added contrast (host units).
    pub delta: f64,
    /// Contrast of the necrotic core, when there is one.
    pub core_delta: Option<f64>,
    /// Mean absolute added contrast inside the label over the host's noise σ there.
    pub contrast_to_noise: f64,
    /// Centre, RAS mm.
    pub centre_mm: [f64; 3],
    /// Inclusive voxel box `[[i, j, k], [i, j, k]]` of the label.
    pub bbox_voxel: [[usize; 3]; 2],
}

/// What `medseg synth` built.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SynthSummary {
    /// Training cases written.
    pub train_cases: usize,
    /// Test cases written.
    pub test_cases: usize,
    /// Lesions inserted.
    pub lesions: usize,
    /// Lesion-free controls.
    pub control_cases: usize,
}

/// `lesions.json` of a synthetic dataset, beside `dataset.json`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SynthLesions {
    /// Every inserted lesion.
    pub lesions: Vec<SynthLesion>,
    /// Counts.
    pub summary: SynthSummary,
    /// Every case with what the simulated scanner did to it (lesion-free controls included).
    #[serde(default)]
    pub cases: Vec<SynthCase>,
}

/// One synthetic case's acquisition, as `lesions.json` records it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SynthCase {
    /// The case (image / label name in the dataset).
    pub case: String,
    /// The host scan's case name.
    pub host: String,
    /// Lesions inserted.
    pub lesions: usize,
    /// Tissue contrast redrawn (domain randomisation).
    #[serde(default)]
    pub contrast_redrawn: bool,
    /// Everything outside the region of interest removed.
    #[serde(default)]
    pub skull_stripped: bool,
    /// Simulated slice thickness, mm; `None` at the host's own resolution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slice_thickness_mm: Option<f64>,
    /// Noise σ added, image units.
    #[serde(default)]
    pub noise_sigma: f64,
}

impl SynthLesions {
    /// `root/lesions.json`.
    pub fn path(root: &Path) -> PathBuf {
        root.join("lesions.json")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_names_round_trip_and_fill_gaps() {
        let names: Vec<String> = ["background", "lesion", "brain"].map(String::from).to_vec();
        assert_eq!(LabelsSidecar::from_names(&names).names(), names);
        let mut gappy = LabelsSidecar::default();
        gappy.labels.insert(0, "background".into());
        gappy.labels.insert(3, "cyst".into());
        gappy.labels.insert(u32::MAX, "absurd".into());
        let n = gappy.names();
        assert_eq!(n.len(), 256);
        assert_eq!(&n[..4], ["background", "1", "2", "cyst"]);
    }

    #[test]
    fn names_are_safe_carry_no_uid_and_agree_across_writers() {
        assert_eq!(sanitize_name("../../etc/passwd"), "_.._etc_passwd");
        assert_eq!(sanitize_name("Müller, Hans"), "M_ller__Hans");
        assert_eq!(sanitize_name(""), "case");
        assert_eq!(case_name(Path::new("/x/ct_001.nii.gz")), "ct_001");
        assert_eq!(case_name(Path::new("/x/lung_007_0000.nii.gz")), "lung_007");
        // A truth file with a space pairs with the mask segment wrote for its image.
        assert_eq!(
            case_name(Path::new("/t/case 1.nii.gz")),
            case_name(Path::new("/p/case_1.nii.gz"))
        );
        assert_eq!(case_name_with(Path::new("/x/a_0000.mha"), ".mha"), "a");
        let n = dicom_case_name("ABDOMEN 3.0 B30f", "1.2.840.1");
        assert!(
            n.starts_with("ABDOMEN_3.0_B30f-") && !n.contains("1.2.840"),
            "{n}"
        );
        assert_ne!(n, dicom_case_name("ABDOMEN 3.0 B30f", "1.2.840.2"));
    }

    #[test]
    fn interrupted_swap_falls_back_to_previous_best() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::new(tmp.path());
        let fill = |dir: &Path| {
            std::fs::create_dir_all(dir).unwrap();
            let c = Checkpoint::new(dir);
            for p in [c.model_config(), c.weights(), c.state(), c.run_config()] {
                std::fs::write(p, b"x").unwrap();
            }
        };
        fill(&run.checkpoint(CheckpointKind::Last).dir);
        // best was moved to best.previous and the new best not yet renamed into place.
        let (_, previous) = run.checkpoint(CheckpointKind::Best).swap_paths();
        fill(&previous);
        let found = Checkpoint::find(tmp.path()).unwrap();
        assert_eq!(found.dir, previous);
        std::fs::remove_dir_all(&previous).unwrap();
        assert_eq!(
            Checkpoint::find(tmp.path()).unwrap().dir,
            run.checkpoint(CheckpointKind::Last).dir
        );
        assert!(Checkpoint::find(&tmp.path().join("nothing")).is_err());
    }

    #[test]
    fn records_read_back_and_accept_other_tools_tables() {
        let table: LesionTable = serde_json::from_str(
            r#"{"lesions": [{"class": 1, "bbox_voxel": [[1, 2, 3], [4, 5, 6]], "confidence": 0.5}]}"#,
        )
        .unwrap();
        assert_eq!(table.lesions[0].confidence, Some(0.5));
        let again: LesionTable =
            serde_json::from_str(&serde_json::to_string(&table).unwrap()).unwrap();
        assert_eq!(again, table);
        let labels = LabelsSidecar::from_names(&["background".into(), "tumour".into()]);
        let text = serde_json::to_string(&labels).unwrap();
        assert_eq!(text, r#"{"labels":{"0":"background","1":"tumour"}}"#);
        let v1: DatasetJson = serde_json::from_str(
            r#"{"labels": {"0": "bg", "1": "liver"}, "modality": {"0": "CT"}}"#,
        )
        .unwrap();
        assert_eq!(v1.label_names(Path::new("d")).unwrap(), ["bg", "liver"]);
        assert_eq!(v1.channel_names(), ["CT"]);
        let v2: DatasetJson = serde_json::from_str(
            r#"{"labels": {"background": 0, "tumour": 1}, "channel_names": {"0": "T1"}}"#,
        )
        .unwrap();
        assert_eq!(
            v2.label_names(Path::new("d")).unwrap(),
            ["background", "tumour"]
        );
        let gap: DatasetJson =
            serde_json::from_str(r#"{"labels": {"0": "bg", "2": "x"}}"#).unwrap();
        assert!(gap.label_names(Path::new("d")).is_err());
    }
}
