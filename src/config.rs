//! The run config: one typed tree for data, preprocessing, sampling, augmentation, model, training,
//! validation and output, read from TOML.
//!
//! Layering: built-in defaults ← the config file ← `--set section.key=value` overrides. Unknown keys
//! are refused with their section and name. The effective config (with values resolved from the
//! dataset, such as the target spacing and CT intensity window) is saved in every run directory and
//! is what `--resume` and inference read back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::geometry::PatchSize;

/// How a dataset lists its cases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// `case,image[,image2...],label` rows.
    Csv,
    /// `dataset.json` + `imagesTr/` + `labelsTr/` (Medical Segmentation Decathlon, nnU-Net).
    Decathlon,
}

/// Intensity normalisation scheme of one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IntensityScheme {
    /// Clip to a window, then `(x - mean) / std` with dataset-wide numbers (nnU-Net's CT scheme).
    Ct,
    /// Per scan, over its non-zero voxels (MR).
    Zscore,
    /// Per scan, with the mean and spread of its foreground: the voxels above the scan's mean,
    /// which splits tissue from air whatever the contrast, the field of view or whether the skull
    /// was removed (MR of varying contrast).
    ZscoreForeground,
    /// Unchanged.
    None,
}

/// What cross-validation folds are made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FoldBy {
    /// Whole groups (the `group` of each case: patient, host); a case without one is its own.
    #[default]
    Group,
    /// Single cases, groups ignored: every fold trains on every group, and the out-of-fold score
    /// is optimistic by what a group shares between its cases.
    Case,
}

/// Learning-rate decay after the warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Cosine annealing to 0.
    Cosine,
    /// nnU-Net's `(1 - t)^poly_exponent`.
    Poly,
    /// The peak rate throughout.
    Constant,
}

/// Which classes the soft Dice term of the loss averages over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiceClasses {
    /// Every class, background included.
    All,
    /// Every class but the background (nnU-Net's `do_bg=False`): the background's Dice is near 1
    /// in almost every batch, so averaging it in dilutes the gradient of small classes.
    Foreground,
}

/// Network size presets (see `HybridSegNetConfig::preset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelPreset {
    /// Stem 8-16-32, ViT 64 × 2 × 2: CPU smoke tests and the quickstart.
    Tiny,
    /// Stem 16-32-64, ViT 192 × 4 × 3.
    Small,
    /// TransUNet R50-ViT-B/16 scale.
    Base,
}

impl ModelPreset {
    /// The preset's name.
    pub fn name(self) -> &'static str {
        match self {
            ModelPreset::Tiny => "tiny",
            ModelPreset::Small => "small",
            ModelPreset::Base => "base",
        }
    }
}

impl std::str::FromStr for ModelPreset {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        [ModelPreset::Tiny, ModelPreset::Small, ModelPreset::Base]
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| format!("unknown preset {s:?}; choose tiny, small or base"))
    }
}

/// How tokens learn where they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PositionEmbedding {
    /// Learned for the training token grid (ViT); interpolated when the grid differs.
    Learned,
    /// Fixed sines and cosines per axis (Vaswani et al., 2017), valid for any grid.
    Sinusoidal,
}

/// Normalisation after each convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NormKind {
    /// Instance norm (nnU-Net's choice; one group per channel).
    Instance,
    /// Group norm with up to 8 groups (MONAI's UNETR blocks use groups too).
    Group,
}

/// Which kernels run the model's convolutions on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelPath {
    /// medseg's weight gradient (tiled im2col + matrix product), burn's other ops.
    #[default]
    Medseg,
    /// burn's ops throughout: the reference the medseg path is tested against.
    Burn,
}

impl std::str::FromStr for KernelPath {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "medseg" => Ok(KernelPath::Medseg),
            "burn" => Ok(KernelPath::Burn),
            _ => Err(format!("unknown kernels {s:?}; choose medseg or burn")),
        }
    }
}

/// The compute device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// burn's `flex` CPU backend.
    #[serde(alias = "flex")]
    Cpu,
    /// wgpu (Vulkan, Metal, DX12); needs a build with the `wgpu` feature.
    Wgpu,
    /// CUDA; needs a build with the `cuda` feature.
    Cuda,
}

impl DeviceKind {
    /// The device's name, as `--device` takes it.
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Wgpu => "wgpu",
            DeviceKind::Cuda => "cuda",
        }
    }
}

/// What selects the best checkpoint: the mean Dice over foreground classes, or one class's Dice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum SelectionMetric {
    /// `mean_dice`.
    MeanDice,
    /// A class name: its Dice.
    ClassDice(String),
}

impl From<String> for SelectionMetric {
    fn from(s: String) -> Self {
        if s == "mean_dice" {
            SelectionMetric::MeanDice
        } else {
            SelectionMetric::ClassDice(s)
        }
    }
}

impl From<SelectionMetric> for String {
    fn from(m: SelectionMetric) -> Self {
        match m {
            SelectionMetric::MeanDice => "mean_dice".into(),
            SelectionMetric::ClassDice(c) => c,
        }
    }
}

/// Everything a training run needs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// `[data]`: the dataset, its cases and their split.
    pub data: DataConfig,
    /// `[preprocess]`: resampling, reorientation and intensity normalisation.
    pub preprocess: PreprocessConfig,
    /// `[sampling]`: training patch size and how patches are drawn.
    pub sampling: SamplingConfig,
    /// `[augment]`: random augmentation of training patches.
    pub augment: AugmentConfig,
    /// `[model]`: the network preset and its overrides.
    pub model: ModelConfig,
    /// `[train]`: optimiser, schedule, loss and device.
    pub train: TrainConfig,
    /// `[validate]`: whole-volume validation and best-checkpoint selection.
    pub validate: ValidateConfig,
    /// `[segment]`: inference settings saved with the model.
    pub segment: SegmentConfig,
    /// `[output]`: where the run is written.
    pub output: OutputConfig,
}

/// Where the cases are and how they are split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Dataset root. Relative paths in the manifest are resolved against it; a relative root is
    /// resolved against the config file's directory's parent when it does not exist as given.
    pub root: PathBuf,
    /// `decathlon` (`dataset.json` + `imagesTr/` + `labelsTr/`, as the Medical Segmentation
    /// Decathlon and nnU-Net) or `csv` (`case,image[,image2...],label`).
    pub format: DataFormat,
    /// The CSV manifest (relative to `root`); unused for `decathlon`.
    pub manifest: PathBuf,
    /// Input channel (modality) names in file order, e.g. `["CT"]` or `["T1", "FLAIR"]`.
    /// Empty: taken from `dataset.json`.
    pub channels: Vec<String>,
    /// Class names, background first. Empty: taken from `dataset.json`.
    pub labels: Vec<String>,
    /// The label value in the source files for each class (same length as `labels`). Empty: class
    /// `c` is value `c`. Values not listed become background, so `[0, 5]` trains TotalSegmentator's
    /// liver (5) against everything else.
    pub label_values: Vec<u32>,
    /// How classes are described in DICOM-SEG and RTSTRUCT exports, by class name
    /// (`[data.label_codes.lesion]`); classes not listed get [`LabelCode::default_for`].
    pub label_codes: BTreeMap<String, LabelCode>,
    /// Share of the cases held out for validation (ignored when `folds > 1`).
    pub validation_fraction: f64,
    /// Share of the cases held out for testing; never seen in training or model selection.
    pub test_fraction: f64,
    /// More than 1: k-fold cross-validation over the non-test cases, validating on fold `fold`.
    pub folds: usize,
    /// The fold validated on, 0-based (below `folds`).
    pub fold: usize,
    /// Folds of whole groups (`group`, the default) or of single cases (`case`).
    pub fold_by: FoldBy,
    /// Explicit validation / test case ids; when given they override the fractions.
    pub validation_cases: Vec<String>,
    /// Explicit test case ids; when given they override `test_fraction`.
    pub test_cases: Vec<String>,
    /// Seed of the case shuffle behind the split.
    pub seed: u64,
    /// Preprocessed cases are cached here, keyed by a hash of the source files and the
    /// preprocessing settings.
    pub cache_dir: PathBuf,
    /// Loader threads (patch extraction and augmentation) and batches prepared ahead.
    pub workers: usize,
    /// Batches prepared ahead of the training step (at least 1).
    pub prefetch: usize,
}

impl DataConfig {
    /// Class `c`'s code: `[data.label_codes]`, else the default for its name.
    pub fn label_code(&self, c: usize) -> LabelCode {
        let name = self.labels.get(c).map_or("", String::as_str);
        self.label_codes
            .get(name)
            .cloned()
            .unwrap_or_else(|| LabelCode::default_for(name, c))
    }

    /// The foreground classes that are findings, not anatomy (by their code's category): the
    /// ones scored by lesion F1 and lowered by a threshold below 0.5.
    pub fn finding_classes(&self) -> Vec<u32> {
        (1..self.labels.len())
            .filter(|&c| !self.label_code(c).is_anatomy())
            .map(|c| c as u32)
            .collect()
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            root: PathBuf::from("datasets"),
            format: DataFormat::Csv,
            manifest: PathBuf::from("dataset.csv"),
            channels: Vec::new(),
            labels: Vec::new(),
            label_values: Vec::new(),
            label_codes: BTreeMap::new(),
            validation_fraction: 0.2,
            test_fraction: 0.0,
            folds: 0,
            fold: 0,
            fold_by: FoldBy::Group,
            validation_cases: Vec::new(),
            test_cases: Vec::new(),
            seed: 42,
            cache_dir: PathBuf::from("datasets/cache/preprocessed"),
            workers: 2,
            prefetch: 4,
        }
    }
}

/// A coded concept (DICOM PS3.3 §8.8): coding scheme, code value and meaning, e.g.
/// `{ scheme = "SCT", value = "52988006", meaning = "Lesion" }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Code {
    /// Coding Scheme Designator (`SCT` for SNOMED CT, `DCM`, …).
    pub scheme: String,
    /// Code Value.
    pub value: String,
    /// Code Meaning.
    pub meaning: String,
}

impl Code {
    fn sct(value: &str, meaning: &str) -> Self {
        Code {
            scheme: "SCT".into(),
            value: value.into(),
            meaning: meaning.into(),
        }
    }
}

/// `[data.label_codes.NAME]`: the segmented property category and type of a class, and its
/// display colour, as DICOM-SEG segments and RTSTRUCT ROIs carry them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelCode {
    /// Segmented Property Category, e.g. SCT 49755003 "Morphologically Altered Structure".
    pub category: Code,
    /// Segmented Property Type, e.g. SCT 52988006 "Lesion".
    #[serde(rename = "type")]
    pub property: Code,
    /// Recommended display colour, sRGB.
    #[serde(default)]
    pub color: Option<[u8; 3]>,
}

/// Class-name keywords and their SNOMED CT types (codes as in DICOM PS3.16 CID 7151/7153 and
/// highdicom's examples); the first keyword contained in a name wins, so specific names come first.
const FINDING_CODES: [(&str, &str, &str); 9] = [
    ("metasta", "14799000", "Neoplasm, metastatic"),
    ("nodule", "27925004", "Nodule"),
    ("cyst", "367643001", "Cyst"),
    ("edema", "79654002", "Edema"),
    ("oedema", "79654002", "Edema"),
    ("necro", "6574001", "Necrosis"),
    ("tumo", "108369006", "Neoplasm"),
    ("neoplasm", "108369006", "Neoplasm"),
    ("lesion", "52988006", "Lesion"),
];

/// Organ keywords and their SNOMED CT codes (PS3.16 CID 7153 "Common Anatomic Regions").
const ORGAN_CODES: [(&str, &str, &str); 14] = [
    ("liver", "10200004", "Liver"),
    ("kidney", "64033007", "Kidney"),
    ("lung", "39607008", "Lung"),
    ("spleen", "78961009", "Spleen"),
    ("pancrea", "15776009", "Pancreas"),
    ("brain", "12738006", "Brain"),
    ("heart", "80891009", "Heart"),
    ("prostate", "41216001", "Prostate"),
    ("bladder", "89837001", "Urinary bladder"),
    ("stomach", "69695003", "Stomach"),
    ("colon", "71854001", "Colon"),
    ("aorta", "15825003", "Aorta"),
    ("vertebra", "51282000", "Spine"),
    ("bone", "272673000", "Bone"),
];

/// Distinct display colours for classes without one (sRGB), by class index.
const PALETTE: [[u8; 3]; 8] = [
    [230, 25, 75],
    [60, 180, 75],
    [255, 225, 25],
    [0, 130, 200],
    [245, 130, 48],
    [145, 30, 180],
    [70, 240, 240],
    [240, 50, 230],
];

impl LabelCode {
    /// The description of a class named `name` (class `index`, 1-based) when the config gives none:
    /// a finding (lesion, tumour, nodule, metastasis, cyst, …) under SCT 49755003 "Morphologically
    /// Altered Structure", a common organ under SCT 123037004 "Anatomical Structure", anything else
    /// SCT 85756007 "Tissue"; findings red, other classes from a fixed palette.
    pub fn default_for(name: &str, index: usize) -> Self {
        let lower = name.to_lowercase();
        let find = |table: &[(&str, &str, &str)]| {
            table
                .iter()
                .find(|(key, ..)| lower.contains(key))
                .map(|(_, v, m)| Code::sct(v, m))
        };
        let color = PALETTE[index.saturating_sub(1) % PALETTE.len()];
        if let Some(property) = find(&FINDING_CODES) {
            return LabelCode {
                category: Code::sct("49755003", "Morphologically Altered Structure"),
                property,
                color: Some([255, 0, 0]),
            };
        }
        if let Some(property) = find(&ORGAN_CODES) {
            return LabelCode {
                category: Code::sct("123037004", "Anatomical Structure"),
                property,
                color: Some(color),
            };
        }
        LabelCode {
            category: Code::sct("85756007", "Tissue"),
            property: Code::sct("85756007", "Tissue"),
            color: Some(color),
        }
    }

    /// Whether the class is anatomy (an organ) rather than a finding.
    pub fn is_anatomy(&self) -> bool {
        self.category.scheme == "SCT" && self.category.value == "123037004"
    }
}

/// Spatial and intensity preprocessing, applied identically in training and inference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PreprocessConfig {
    /// Target voxel spacing `[x, y, z]` in mm. Empty: the median spacing of the training cases
    /// (nnU-Net's default), written into the run's effective config.
    pub spacing: Vec<f64>,
    /// Reorient to RAS by axis permutation and flips (exact; no interpolation).
    pub reorient: bool,
    /// Crop to the bounding box of non-zero voxels (skull-stripped MR); CT keeps the whole field.
    pub crop_to_nonzero: bool,
    /// One entry per channel. Empty: `ct` for channels named CT, `zscore` otherwise.
    pub intensity: Vec<IntensityConfig>,
}

impl Default for PreprocessConfig {
    fn default() -> Self {
        PreprocessConfig {
            spacing: Vec::new(),
            reorient: true,
            crop_to_nonzero: false,
            intensity: Vec::new(),
        }
    }
}

/// Intensity normalisation of one channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IntensityConfig {
    /// `ct`: clip to `window`, then `(x - mean) / std`, with numbers shared by the whole dataset
    /// (nnU-Net's CT normalisation). `zscore`: per scan, over its non-zero voxels (MR).
    /// `none`: unchanged.
    pub scheme: IntensityScheme,
    /// CT clip window `[low, high]` in HU. Empty: the 0.5 and 99.5 percentiles of the labelled
    /// foreground of the training cases (nnU-Net).
    pub window: Vec<f64>,
    /// CT mean and standard deviation after clipping. Unset: from the training foreground.
    pub mean: Option<f64>,
    /// CT standard deviation after clipping. Unset: from the training foreground.
    pub std: Option<f64>,
}

impl Default for IntensityConfig {
    fn default() -> Self {
        IntensityConfig {
            scheme: IntensityScheme::Zscore,
            window: Vec::new(),
            mean: None,
            std: None,
        }
    }
}

/// Training patches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingConfig {
    /// Two sizes `[H, W]` train on axial slices (2D; 2.5D with `model.context_slices`); three
    /// `[D, H, W]` on 3D patches. Order: slices (z), rows (y), columns (x) of the RAS grid
    /// (array order; see `geometry`). Any other length or a zero fails at parse time.
    pub patch_size: PatchSize,
    /// Share of patches centred on a foreground voxel of a random class (nnU-Net: 0.33).
    pub foreground_fraction: f64,
    /// Patches drawn from each training case per epoch.
    pub patches_per_volume: usize,
    /// Classes (by name) foreground patches are centred on; empty: any present class (nnU-Net).
    /// With an organ class beside lesions, naming the lesions keeps the organ (seen in almost every
    /// patch anyway) from taking half the foreground patches; a case without them falls back to
    /// any present class.
    pub foreground_classes: Vec<String>,
    /// How a foreground patch's centre is drawn within its class: `voxel` (any of its voxels, so
    /// large lesions take most patches; nnU-Net) or `component` (a connected component first,
    /// each equally likely, then one of its voxels, so small lesions are seen as often).
    pub foreground_by: ForegroundBy,
}

/// `sampling.foreground_by`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ForegroundBy {
    /// A voxel of the class, uniformly.
    #[default]
    Voxel,
    /// A component of the class uniformly, then a voxel of it.
    Component,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            patch_size: PatchSize::new(&[128, 128]).expect("positive"),
            foreground_fraction: 0.33,
            patches_per_volume: 8,
            foreground_classes: Vec::new(),
            foreground_by: ForegroundBy::Voxel,
        }
    }
}

/// Random augmentation; each transform fires with its own probability. Ranges follow nnU-Net's
/// defaults (Isensee et al. 2021, supplementary table) unless stated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// Mirror, per spatial axis.
    pub flip_prob: f64,
    /// Rotate by a multiple of 90° in the axial plane (off by default: anatomy has an up).
    pub rotate90_prob: f64,
    /// Small rotation (in-plane for 2D, about a random axis for 3D), up to `rotate_degrees`.
    pub rotate_prob: f64,
    /// Largest rotation angle in degrees; the angle is drawn from `[-rotate_degrees, rotate_degrees]`.
    pub rotate_degrees: f64,
    /// Isotropic zoom by a factor in `scale_range`.
    pub scale_prob: f64,
    /// Zoom factors `[low, high]`; above 1 magnifies.
    pub scale_range: [f64; 2],
    /// Gamma on the patch rescaled to [0, 1], gamma in `gamma_range`.
    pub gamma_prob: f64,
    /// Gamma exponents `[low, high]`.
    pub gamma_range: [f64; 2],
    /// Additive Gaussian noise with σ drawn from `[0, noise_std]`.
    pub noise_prob: f64,
    /// Largest noise σ, in normalised intensity units.
    pub noise_std: f64,
    /// Multiply intensities by a factor in `brightness_range`.
    pub brightness_prob: f64,
    /// Multiplicative factors `[low, high]`.
    pub brightness_range: [f64; 2],
    /// Scale around the patch mean by a factor in `contrast_range`.
    pub contrast_prob: f64,
    /// Contrast factors `[low, high]`; the result is clipped to the patch's original range.
    pub contrast_range: [f64; 2],
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig {
            flip_prob: 0.5,
            rotate90_prob: 0.0,
            rotate_prob: 0.2,
            rotate_degrees: 15.0,
            scale_prob: 0.2,
            scale_range: [0.85, 1.25],
            gamma_prob: 0.3,
            gamma_range: [0.7, 1.5],
            noise_prob: 0.1,
            noise_std: 0.1,
            brightness_prob: 0.15,
            brightness_range: [0.75, 1.25],
            contrast_prob: 0.15,
            contrast_range: [0.75, 1.25],
        }
    }
}

/// The network: a preset (`tiny`, `small`, `base`) plus any overrides. Input channels, classes,
/// dimensionality and patch size come from `data` and `sampling`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// The size preset the other fields override.
    pub preset: ModelPreset,
    /// 2.5D: neighbouring slices on each side given as extra channels (2D patches only).
    pub context_slices: usize,
    /// Stem stage widths; stage `i` works at 1/2^i resolution. Unset: the preset's.
    pub stem_widths: Option<Vec<usize>>,
    /// Residual blocks in each stem stage. Unset: the preset's.
    pub blocks_per_stage: Option<usize>,
    /// Stem voxels per token edge. Unset: the preset's.
    pub token_patch: Option<usize>,
    /// Transformer width. Unset: the preset's.
    pub embed_dim: Option<usize>,
    /// Transformer blocks. Unset: the preset's.
    pub depth: Option<usize>,
    /// Attention heads (must divide `embed_dim`). Unset: the preset's.
    pub heads: Option<usize>,
    /// Transformer MLP width as a multiple of `embed_dim`. Unset: the preset's.
    pub mlp_ratio: Option<usize>,
    /// Dropout in the transformer. Unset: the preset's.
    pub dropout: Option<f64>,
    /// `learned` or `sinusoidal`.
    pub position: Option<PositionEmbedding>,
    /// `instance` or `group`.
    pub norm: Option<NormKind>,
    /// UNETR-style skips from intermediate transformer blocks. Unset: the preset's (off).
    pub transformer_skips: Option<bool>,
    /// Extra logits at coarser decoder levels, trained with `train.deep_supervision_weights`.
    /// Unset: the preset's (off).
    pub deep_supervision: Option<bool>,
    /// CPU kernels: `medseg` (its own convolution gradients and activation) or `burn` (burn's
    /// ops, the reference). Saved with the model, so `segment` runs on the same path.
    pub kernels: KernelPath,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            preset: ModelPreset::Tiny,
            context_slices: 0,
            stem_widths: None,
            blocks_per_stage: None,
            token_patch: None,
            embed_dim: None,
            depth: None,
            heads: None,
            mlp_ratio: None,
            dropout: None,
            position: None,
            norm: None,
            transformer_skips: None,
            deep_supervision: None,
            kernels: KernelPath::Medseg,
        }
    }
}

/// The optimisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Training epochs.
    pub epochs: usize,
    /// Steps per epoch. 0: `ceil(training cases × patches_per_volume / batch_size)`.
    pub steps_per_epoch: usize,
    /// Patches per optimisation step.
    pub batch_size: usize,
    /// AdamW peak learning rate and decoupled weight decay.
    pub lr: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Linear warm-up from 0 over this many steps, then `schedule`.
    pub warmup_steps: usize,
    /// `cosine` (to 0), `poly` (`(1 - t)^poly_exponent`, nnU-Net's 0.9) or `constant`.
    pub schedule: Schedule,
    /// Exponent of the `poly` schedule.
    pub poly_exponent: f64,
    /// Clip the global gradient norm to this (nnU-Net: 12); 0 turns clipping off.
    pub grad_clip: f64,
    /// Weight of the soft Dice term in the loss.
    pub dice_weight: f64,
    /// The classes the soft Dice term averages over: `all` or `foreground`.
    pub dice_classes: DiceClasses,
    /// The most a small lesion's voxels weigh in the cross-entropy: each connected component of
    /// `sampling.foreground_classes` in a patch weighs `largest / size` (the batch's largest
    /// such component over its own size), clamped to `[1, lesion_weight_max]`. 1: off.
    pub lesion_weight_max: f64,
    /// Weight of the cross-entropy term in the loss.
    pub ce_weight: f64,
    /// Loss weights of the deep-supervision outputs, deepest first. Empty: nnU-Net's halving
    /// weights (1/2, 1/4, …), normalised with the full-resolution output's weight of 1.
    pub deep_supervision_weights: Vec<f64>,
    /// `cpu`, `wgpu` or `cuda` (the latter two need a build with that feature).
    pub device: DeviceKind,
    /// Seed of weight initialisation, patch sampling and augmentation.
    pub seed: u64,
    /// Fine-tuning (`train --init-from`): the encoder (stem and Transformer) is frozen for this
    /// many epochs, so the fresh head adapts before it moves the pre-trained features.
    pub freeze_encoder_epochs: usize,
    /// The encoder's learning rate as a share of `lr` (e.g. 0.1 to fine-tune it gently).
    pub encoder_lr_scale: f64,
    /// Decay of an exponential moving average of the weights (Polyak averaging), updated after
    /// every step; validation, checkpoint selection and the saved model use the average. 0: off.
    pub ema_decay: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 20,
            steps_per_epoch: 0,
            batch_size: 4,
            lr: 1e-3,
            weight_decay: 1e-2,
            warmup_steps: 20,
            schedule: Schedule::Cosine,
            poly_exponent: 0.9,
            grad_clip: 12.0,
            dice_weight: 1.0,
            dice_classes: DiceClasses::All,
            lesion_weight_max: 1.0,
            ce_weight: 1.0,
            deep_supervision_weights: Vec::new(),
            device: DeviceKind::Cpu,
            seed: 0,
            freeze_encoder_epochs: 0,
            encoder_lr_scale: 1.0,
            ema_decay: 0.0,
        }
    }
}

/// Validation on whole volumes of the validation cases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ValidateConfig {
    /// Validate every N epochs (and after the last). 0: never (the last checkpoint is the best).
    pub every: usize,
    /// Selects `best`: `mean_dice` (over foreground classes) or a class name for its Dice.
    pub metric: SelectionMetric,
    /// Stop after this many validations without improvement; 0: never stop early.
    pub patience: usize,
    /// Sliding-window overlap between neighbouring windows (nnU-Net: 0.5).
    pub overlap: f64,
    /// Windows evaluated together.
    pub batch_size: usize,
}

impl Default for ValidateConfig {
    fn default() -> Self {
        ValidateConfig {
            every: 1,
            metric: SelectionMetric::MeanDice,
            patience: 0,
            overlap: 0.5,
            batch_size: 4,
        }
    }
}

/// Inference on whole scans (`medseg segment`), saved with the model; `--set segment.key=value`
/// changes it at segmentation time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SegmentConfig {
    /// Sliding-window overlap between neighbouring windows (nnU-Net: 0.5).
    pub overlap: f64,
    /// Windows evaluated together.
    pub batch_size: usize,
    /// Mirror test-time augmentation over the spatial axes (also `--tta`).
    pub tta: bool,
    /// Two-class models: foreground where its probability reaches this. More classes: the most
    /// probable class, but a finding class (not an organ) whose probability reaches this takes the
    /// voxel; below 0.5 this adds voxels, from 0.5 up it is the plain argmax.
    pub threshold: f64,
    /// A fold ensemble's threshold: `matched` (per scan, see [`EnsembleThreshold::Matched`]) or
    /// `same` (`threshold`, as for one model). A single model always uses `threshold`.
    pub ensemble_threshold: EnsembleThreshold,
    /// Connected components (26-connected) smaller than this many mm³ are removed.
    pub min_lesion_mm3: f64,
    /// Classes (by name) of which only the largest component is kept, e.g. organs.
    pub keep_largest: Vec<String>,
    /// A region-of-interest stage: findings of other classes outside the dilated region are
    /// dropped (or only flagged); off when absent.
    pub roi: Option<RoiConfig>,
    /// What to do with NaN or infinite voxels: refuse the scan (`error`) or replace them with the
    /// scan's finite minimum and say so (`fill`).
    pub non_finite: NonFinite,
    /// Largest preprocessed grid (voxels) a scan may resample to; a larger one is refused before
    /// any work, naming the spacings (a header in cm instead of mm gives a grid 1000× too large).
    pub max_voxels: u64,
    /// RTSTRUCT export (`--format rtstruct`): one ROI per class (`class`) or per lesion
    /// (`lesion`, numbered as in the lesion table).
    pub rtstruct_rois: RoiGrouping,
    /// Logits are divided by this before the softmax: `"fitted"` (the temperature training fitted
    /// on validation, saved in the checkpoint's `calibration.json`; 1 when it has none) or a
    /// number (`1.0` = uncalibrated).
    pub temperature: Temperature,
    /// The map `--attention` writes: `lesion` (attention from the tokens inside each finding) or
    /// `rollout` (attention rollout through the Transformer blocks).
    pub attention: AttentionMap,
    /// Findings (classes other than the region of interest and `keep_largest`) whose confidence,
    /// their highest probability, is below this are removed: a number in `[0, 1]` (0 = keep
    /// all) or `"fitted"` (the lowest value within one bootstrap standard error of the best lesion
    /// F1 on the validation cases at the end of training, saved in the checkpoint's
    /// `operating_point.json`; 0 when it has none).
    pub min_confidence: MinConfidence,
}

/// `segment.min_confidence`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged, expecting = "expected \"fitted\" or a number in [0, 1]")]
pub enum MinConfidence {
    /// A named choice.
    Named(MinConfidenceChoice),
    /// This confidence.
    Value(f64),
}

/// The named `segment.min_confidence`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MinConfidenceChoice {
    /// The checkpoint's operating point, chosen on validation.
    Fitted,
}

/// `segment.temperature`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged, expecting = "expected \"fitted\" or a positive number")]
pub enum Temperature {
    /// A named choice.
    Named(TemperatureChoice),
    /// This temperature.
    Value(f64),
}

/// The named `segment.temperature`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TemperatureChoice {
    /// The checkpoint's fitted temperature.
    Fitted,
}

/// Which attention map `segment --attention` writes (see `infer::attention`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttentionMap {
    /// Attention from the tokens inside findings, averaged over heads and blocks.
    #[default]
    Lesion,
    /// Attention rollout through the blocks (Abnar & Zuidema, 2020).
    Rollout,
}

/// How RTSTRUCT ROIs are formed from a label map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoiGrouping {
    /// One ROI per class present.
    Class,
    /// One ROI per lesion (connected component), named `CLASS N` with the lesion table's id.
    Lesion,
}

/// `segment.ensemble_threshold`: how a fold ensemble decides its findings' extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EnsembleThreshold {
    /// Per scan, the finding threshold is lowered from `threshold` (in steps of 0.05, to 0.1 at
    /// most) to where the ensemble's findings, filtered as `segment` filters them, come closest
    /// in volume to the mean of its members' findings, each member decided and filtered alone at
    /// `threshold`. The mean of members that disagree at a lesion's border shrinks the lesion;
    /// the postprocessing search chose `threshold` on one member's predictions.
    Matched,
    /// `threshold`, as for one model.
    Same,
}

/// What to do with NaN or infinite voxels in a scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NonFinite {
    /// Refuse the scan, with the count.
    Error,
    /// Replace them with the scan's smallest finite value and record a warning.
    Fill,
}

/// The default `segment.max_voxels`: 2^27 voxels, about 2 GiB of image and probabilities for a
/// three-class model.
pub const DEFAULT_MAX_VOXELS: u64 = 1 << 27;

/// `[segment.roi]`: the organ classes that bound where lesions may be.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoiConfig {
    /// Class names that make the region (e.g. `["brain"]`).
    pub classes: Vec<String>,
    /// The region is dilated by this much (mm) before lesions are tested against it.
    pub margin_mm: f64,
    /// Remove lesions that do not reach the dilated region from the mask and the lesion table;
    /// when false they are kept and flagged `inside_roi = no`.
    pub drop_outside: bool,
}

impl Default for RoiConfig {
    fn default() -> Self {
        RoiConfig {
            classes: Vec::new(),
            margin_mm: 2.0,
            drop_outside: true,
        }
    }
}

impl Default for SegmentConfig {
    fn default() -> Self {
        SegmentConfig {
            overlap: 0.5,
            batch_size: 4,
            tta: false,
            threshold: 0.5,
            ensemble_threshold: EnsembleThreshold::Matched,
            min_lesion_mm3: 0.0,
            keep_largest: Vec::new(),
            roi: None,
            non_finite: NonFinite::Error,
            max_voxels: DEFAULT_MAX_VOXELS,
            rtstruct_rois: RoiGrouping::Class,
            temperature: Temperature::Named(TemperatureChoice::Fitted),
            attention: AttentionMap::Lesion,
            min_confidence: MinConfidence::Value(0.0),
        }
    }
}

/// Where the run's files go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputConfig {
    /// The run directory: effective config, checkpoints, metrics, curves, log.
    pub dir: PathBuf,
}

impl Default for OutputConfig {
    fn default() -> Self {
        OutputConfig {
            dir: PathBuf::from("runs/default"),
        }
    }
}

/// Section names, in file order.
const SECTIONS: [&str; 9] = [
    "data",
    "preprocess",
    "sampling",
    "augment",
    "model",
    "train",
    "validate",
    "segment",
    "output",
];

/// A config file made of named top-level sections (`[train]`, `[evaluate]`, `[synth]`, …). Every
/// subcommand loads its file the same way: defaults ← file ← `--set section.key=value`, unknown
/// sections and keys refused with their names, then [`ConfigFile::validate`].
pub trait ConfigFile: Serialize + Sized {
    /// The sections a file may hold, in file order.
    const SECTIONS: &'static [&'static str];
    /// Builds the config from the file's sections (see [`section`]); absent ones default.
    fn from_sections(table: &mut toml::Table, origin: &str) -> Result<Self>;
    /// Checks that need no data; `origin` names the file in messages.
    fn validate(&self, origin: &str) -> Result<()>;
}

/// Defaults ← `file` (if any) ← `overrides` (`section.key=value`, value in TOML syntax; a bare
/// word is a string).
pub fn load_layered<T: ConfigFile>(file: Option<&Path>, overrides: &[String]) -> Result<T> {
    let mut table = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            text.parse::<toml::Table>().map_err(|e| Error::Config {
                reason: format!("{}: {e}", path.display()),
            })?
        }
        None => toml::Table::new(),
    };
    for item in overrides {
        apply_override(&mut table, item)?;
    }
    let origin = file
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "--set".into());
    parse_table(table, &origin)
}

/// Parses a TOML document (e.g. a saved effective config).
pub fn parse_toml<T: ConfigFile>(text: &str, origin: &str) -> Result<T> {
    let table = text.parse::<toml::Table>().map_err(|e| Error::Config {
        reason: format!("{origin}: {e}"),
    })?;
    parse_table(table, origin)
}

fn parse_table<T: ConfigFile>(mut table: toml::Table, origin: &str) -> Result<T> {
    if let Some(key) = table.keys().find(|k| !T::SECTIONS.contains(&k.as_str())) {
        return Err(Error::Config {
            reason: format!(
                "{origin}: unknown section [{key}]; sections are {}",
                T::SECTIONS.join(", ")
            ),
        });
    }
    let config = T::from_sections(&mut table, origin)?;
    config.validate(origin)?;
    Ok(config)
}

/// The config as TOML (what `--dump-config` prints and runs save).
pub fn to_toml<T: Serialize>(config: &T) -> Result<String> {
    toml::to_string_pretty(config).map_err(|e| Error::Config {
        reason: format!("cannot serialise the config: {e}"),
    })
}

/// Section `name` of `table`, read on its own so that an error names it
/// (`[train] unknown field \`lrr\``); its defaults when absent.
pub fn section<T: DeserializeOwned + Default>(
    table: &mut toml::Table,
    name: &str,
    origin: &str,
) -> Result<T> {
    match table.remove(name) {
        None => Ok(T::default()),
        Some(toml::Value::Table(t)) => t.try_into().map_err(|e| Error::Config {
            reason: format!("{origin}: [{name}] {}", e.to_string().trim()),
        }),
        Some(_) => Err(Error::Config {
            reason: format!("{origin}: `{name}` must be a table ([{name}])"),
        }),
    }
}

impl ConfigFile for RunConfig {
    const SECTIONS: &'static [&'static str] = &SECTIONS;

    fn from_sections(table: &mut toml::Table, origin: &str) -> Result<Self> {
        Ok(RunConfig {
            data: section(table, "data", origin)?,
            preprocess: section(table, "preprocess", origin)?,
            sampling: section(table, "sampling", origin)?,
            augment: section(table, "augment", origin)?,
            model: section(table, "model", origin)?,
            train: section(table, "train", origin)?,
            validate: section(table, "validate", origin)?,
            segment: section(table, "segment", origin)?,
            output: section(table, "output", origin)?,
        })
    }

    fn validate(&self, _origin: &str) -> Result<()> {
        RunConfig::validate(self)
    }
}

impl RunConfig {
    /// Defaults ← `file` (if any) ← `overrides`; see [`load_layered`].
    pub fn load(file: Option<&Path>, overrides: &[String]) -> Result<Self> {
        load_layered(file, overrides)
    }

    /// Parses a TOML document (e.g. a saved effective config).
    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        parse_toml(text, origin)
    }

    /// The effective config as TOML (what `--dump-config` prints and runs save).
    pub fn to_toml(&self) -> Result<String> {
        to_toml(self)
    }

    /// Whether the patches are 3D (else 2D slices).
    pub fn is_3d(&self) -> bool {
        self.sampling.patch_size.is_3d()
    }

    /// Checks that do not need the dataset.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| Err(Error::Config { reason });
        let d = &self.data;
        if !d.label_values.is_empty()
            && !d.labels.is_empty()
            && d.label_values.len() != d.labels.len()
        {
            return bad(format!(
                "[data] label_values has {} entries but labels has {}",
                d.label_values.len(),
                d.labels.len()
            ));
        }
        validate_label_codes(d)?;
        for (name, f) in [
            ("validation_fraction", d.validation_fraction),
            ("test_fraction", d.test_fraction),
        ] {
            if !(0.0..1.0).contains(&f) {
                return bad(format!("[data] {name} must be in [0, 1), not {f}"));
            }
        }
        if d.folds > 1 && d.fold >= d.folds {
            return bad(format!(
                "[data] fold {} must be below folds {}",
                d.fold, d.folds
            ));
        }
        let p = &self.preprocess;
        if !(p.spacing.is_empty() || (p.spacing.len() == 3 && p.spacing.iter().all(|s| *s > 0.0))) {
            return bad(format!(
                "[preprocess] spacing must be empty or three positive mm values, not {:?}",
                p.spacing
            ));
        }
        for (c, i) in p.intensity.iter().enumerate() {
            if !(i.window.is_empty() || (i.window.len() == 2 && i.window[0] < i.window[1])) {
                return bad(format!(
                    "[[preprocess.intensity]] #{c}: window must be [low, high], not {:?}",
                    i.window
                ));
            }
        }
        let s = &self.sampling;
        if !(0.0..=1.0).contains(&s.foreground_fraction) || s.patches_per_volume == 0 {
            return bad(
                "[sampling] foreground_fraction must be in [0, 1] and patches_per_volume positive"
                    .into(),
            );
        }
        let a = &self.augment;
        for (name, prob) in [
            ("flip_prob", a.flip_prob),
            ("rotate90_prob", a.rotate90_prob),
            ("rotate_prob", a.rotate_prob),
            ("scale_prob", a.scale_prob),
            ("gamma_prob", a.gamma_prob),
            ("noise_prob", a.noise_prob),
            ("brightness_prob", a.brightness_prob),
            ("contrast_prob", a.contrast_prob),
        ] {
            if !(0.0..=1.0).contains(&prob) {
                return bad(format!("[augment] {name} must be in [0, 1], not {prob}"));
            }
        }
        for (name, [lo, hi]) in [
            ("scale_range", a.scale_range),
            ("gamma_range", a.gamma_range),
            ("brightness_range", a.brightness_range),
            ("contrast_range", a.contrast_range),
        ] {
            if !(lo > 0.0 && lo <= hi) {
                return bad(format!(
                    "[augment] {name} must be [low, high] with 0 < low <= high, not [{lo}, {hi}]"
                ));
            }
        }
        if self.model.context_slices > 0 && self.is_3d() {
            return bad("[model] context_slices (2.5D) needs a 2D patch_size".into());
        }
        let t = &self.train;
        if t.epochs == 0 || t.batch_size == 0 || t.lr.is_nan() || t.lr <= 0.0 {
            return bad("[train] epochs, batch_size and lr must be positive".into());
        }
        if !(t.encoder_lr_scale > 0.0 && t.encoder_lr_scale.is_finite()) {
            return bad(format!(
                "[train] encoder_lr_scale must be a positive share of lr, not {}",
                t.encoder_lr_scale
            ));
        }
        if !(t.lesion_weight_max >= 1.0 && t.lesion_weight_max.is_finite()) {
            return bad(format!(
                "[train] lesion_weight_max must be at least 1 (1: off), not {}",
                t.lesion_weight_max
            ));
        }
        if !(0.0..1.0).contains(&t.ema_decay) {
            return bad(format!(
                "[train] ema_decay must be in [0, 1) (0: off; e.g. 0.999), not {}",
                t.ema_decay
            ));
        }
        if !(0.0..1.0).contains(&self.validate.overlap) || self.validate.batch_size == 0 {
            return bad("[validate] overlap must be in [0, 1) and batch_size positive".into());
        }
        let g = &self.segment;
        if !(0.0..1.0).contains(&g.overlap)
            || g.batch_size == 0
            || !(0.0..=1.0).contains(&g.threshold)
        {
            return bad(
                "[segment] overlap must be in [0, 1), batch_size positive and threshold in [0, 1]"
                    .into(),
            );
        }
        if let Temperature::Value(t) = g.temperature {
            if !(t.is_finite() && t > 0.0) {
                return bad(format!(
                    "[segment] temperature must be \"fitted\" or a positive number, not {t}"
                ));
            }
        }
        if let MinConfidence::Value(c) = g.min_confidence {
            if !(0.0..=1.0).contains(&c) {
                return bad(format!(
                    "[segment] min_confidence must be \"fitted\" or a number in [0, 1], not {c}"
                ));
            }
        }
        if let Some(roi) = &g.roi {
            if roi.classes.is_empty() || !(roi.margin_mm.is_finite() && roi.margin_mm >= 0.0) {
                return bad("[segment.roi] needs classes (names) and a margin_mm >= 0".into());
            }
        }
        Ok(())
    }
}

/// The label values of class `names` among `labels` (background first, never matched), for the
/// settings that name classes (`key`, e.g. `segment.keep_largest`); an unknown name is a config
/// error listing the classes.
pub fn class_values(labels: &[String], key: &str, names: &[String]) -> Result<Vec<u32>> {
    let classes = labels.get(1..).unwrap_or_default();
    names
        .iter()
        .map(|name| {
            classes
                .iter()
                .position(|l| l == name)
                .map(|c| c as u32 + 1)
                .ok_or_else(|| Error::Config {
                    reason: format!("{key} names {name:?}, not one of the classes {classes:?}"),
                })
        })
        .collect()
}

/// Sets `section.key = value` in `table`; the value is TOML (`0.5`, `[1, 2]`, `"x"`, `true`), or a
/// bare string.
fn apply_override(table: &mut toml::Table, item: &str) -> Result<()> {
    let (key, raw) = item.split_once('=').ok_or_else(|| Error::Config {
        reason: format!("--set {item:?}: expected section.key=value"),
    })?;
    let key = key.trim();
    let parts: Vec<&str> = key.split('.').collect();
    if parts.len() < 2 || parts.iter().any(|p| p.is_empty()) {
        return Err(Error::Config {
            reason: format!("--set {item:?}: the key must be section.key, e.g. train.lr"),
        });
    }
    let value = format!("v = {}", raw.trim())
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.trim().to_string()));
    let mut node = table;
    for part in &parts[..parts.len() - 1] {
        let entry = node
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        node = match entry {
            toml::Value::Table(t) => t,
            _ => {
                return Err(Error::Config {
                    reason: format!("--set {item:?}: {part} is not a table"),
                })
            }
        };
    }
    node.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

/// `[data.label_codes]`: every key a class, every code complete.
fn validate_label_codes(d: &DataConfig) -> Result<()> {
    let bad = |reason: String| Err(Error::Config { reason });
    for (name, code) in &d.label_codes {
        if !d.labels.is_empty() && !d.labels.contains(name) {
            return bad(format!(
                "[data.label_codes] {name:?} is not a class; classes: {}",
                d.labels.join(", ")
            ));
        }
        for (what, c) in [("category", &code.category), ("type", &code.property)] {
            if [&c.scheme, &c.value, &c.meaning]
                .iter()
                .any(|v| v.trim().is_empty())
            {
                return bad(format!(
                    "[data.label_codes.{name}] {what} needs scheme, value and meaning"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_defaults_file_and_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        std::fs::write(
            &path,
            "[train]\nlr = 0.01\nepochs = 3\n[sampling]\npatch_size = [64, 64]\n",
        )
        .unwrap();
        let c = RunConfig::load(
            Some(&path),
            &["train.epochs=5".into(), "data.format=decathlon".into()],
        )
        .unwrap();
        assert_eq!(c.train.lr, 0.01); // file
        assert_eq!(c.train.epochs, 5); // --set beats file
        assert_eq!(c.data.format, DataFormat::Decathlon); // bare word is a string
        assert_eq!(c.train.batch_size, TrainConfig::default().batch_size); // default
        assert_eq!(c.sampling.patch_size.as_slice(), [64, 64]);
        // The dump reads back to the same config.
        let again = RunConfig::from_toml(&c.to_toml().unwrap(), "dump").unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = RunConfig::load(None, &["train.lrr=1".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("[train]") && e.contains("lrr"), "{e}");
        let e = RunConfig::load(None, &["trian.lr=1".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown section [trian]"), "{e}");
        let e = RunConfig::load(None, &["sampling.patch_size=[1]".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("patch_size"), "{e}");
    }

    #[test]
    fn loss_keys_parse_and_are_checked() {
        let c = RunConfig::load(
            None,
            &[
                "train.dice_classes=foreground".into(),
                "train.lesion_weight_max=8".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.train.dice_classes, DiceClasses::Foreground);
        assert_eq!(c.train.lesion_weight_max, 8.0);
        let e = RunConfig::load(None, &["train.dice_classes=background".into()]).unwrap_err();
        assert!(e.to_string().contains("dice_classes"), "{e}");
        for bad in ["0.5", "nan", "inf"] {
            let e = RunConfig::load(None, &[format!("train.lesion_weight_max={bad}")])
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("lesion_weight_max must be at least 1"),
                "{bad}: {e}"
            );
        }
        let c = RunConfig::load(None, &["train.ema_decay=0.999".into()]).unwrap();
        assert_eq!(c.train.ema_decay, 0.999);
        for bad in ["1", "-0.1", "nan"] {
            let e = RunConfig::load(None, &[format!("train.ema_decay={bad}")])
                .unwrap_err()
                .to_string();
            assert!(e.contains("ema_decay must be in [0, 1)"), "{bad}: {e}");
        }
    }

    #[test]
    fn label_codes_default_by_name_and_are_checked() {
        let lesion = LabelCode::default_for("Liver Tumor", 2);
        assert_eq!(lesion.property.value, "108369006");
        assert_eq!(lesion.category.value, "49755003");
        assert!(!lesion.is_anatomy());
        assert_eq!(
            LabelCode::default_for("lung_nodule", 1).property.value,
            "27925004"
        );
        let organ = LabelCode::default_for("kidney_left", 3);
        assert_eq!(
            (organ.property.value.as_str(), organ.is_anatomy()),
            ("64033007", true)
        );
        assert_eq!(
            LabelCode::default_for("class 7", 7).property.value,
            "85756007"
        );

        let text = "[data]\nlabels = [\"background\", \"lesion\"]\n\
                    [data.label_codes.lesoin]\n\
                    category = { scheme = \"SCT\", value = \"1\", meaning = \"x\" }\n\
                    type = { scheme = \"SCT\", value = \"2\", meaning = \"y\" }\n";
        let e = RunConfig::from_toml(text, "t").unwrap_err().to_string();
        assert!(e.contains("\"lesoin\" is not a class"), "{e}");
        let ok = RunConfig::from_toml(&text.replace("lesoin", "lesion"), "t").unwrap();
        assert_eq!(ok.data.label_codes["lesion"].property.value, "2");
    }
}
