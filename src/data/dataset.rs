//! Cases ready for training: read, checked, spatially preprocessed (cached on disk), normalised,
//! and split into training, validation and test sets.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ndarray::{Array3, Array4, Axis};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::manifest::{self, CaseEntry};
use crate::config::{DataFormat, IntensityConfig, IntensityScheme, RunConfig};
use crate::error::{Error, Result};
use crate::geometry::Geometry;
use crate::io;
use crate::transforms::intensity::{normalize_channels, Normalization};
pub use crate::transforms::preprocessing::{SpatialPlan, SpatialResult};
use crate::transforms::spatial::{resample_labels_onto, Orientation};

/// Largest affine difference (mm) at which a label map counts as on its image's grid.
pub const GRID_TOLERANCE_MM: f64 = 1e-3;
/// Foreground voxels kept per class for oversampling (nnU-Net keeps 10,000).
const FOREGROUND_SAMPLES: usize = 10_000;
/// Voxels kept per connected component for per-component sampling.
const COMPONENT_SAMPLES: usize = 256;

/// A case ready for patch sampling: normalised image, class labels, and foreground positions.
#[derive(Debug, Clone)]
pub struct PreparedCase {
    /// Case name.
    pub id: String,
    /// `[C, D, H, W]` = `[channel, k, j, i]` on the preprocessed grid.
    pub image: Array4<f32>,
    /// `[D, H, W]` class indices.
    pub label: Array3<u8>,
    /// The preprocessed grid (voxel → RAS+ mm).
    pub geometry: Geometry,
    /// For each foreground class `1..K` (index 0 is class 1): up to 10,000 voxel positions `[k, j, i]`.
    pub foreground: Vec<Vec<[u32; 3]>>,
    /// For each foreground class, per connected component (26-connected): up to 256 of its
    /// voxel positions, so that a small lesion can be drawn as often as a large one.
    pub components: Vec<Vec<Vec<[u32; 3]>>>,
}

impl PreparedCase {
    /// Spacing in array order `[k, j, i]`, mm.
    pub fn spacing_kji(&self) -> [f64; 3] {
        self.geometry.array_spacing()
    }
}

/// Source label value → class index.
#[derive(Debug, Clone)]
pub struct LabelMap {
    classes: usize,
    /// `(source value, class)`; empty: value = class.
    values: Vec<u32>,
}

impl LabelMap {
    /// `classes` classes (background included); `values[c]` is class `c`'s value in the source
    /// files, and values not listed become background. Empty `values`: class `c` is value `c`.
    pub fn new(classes: usize, values: &[u32]) -> Self {
        LabelMap {
            classes,
            values: values.to_vec(),
        }
    }

    /// Number of classes, background included.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// The class of a source value; `Err` names a value that is not a declared class.
    pub(crate) fn class_of(&self, v: f32) -> std::result::Result<u8, String> {
        if v.fract() != 0.0 || v < 0.0 || !v.is_finite() {
            return Err(format!("label value {v} is not a non-negative integer"));
        }
        let v = v as u32;
        if self.values.is_empty() {
            if (v as usize) < self.classes {
                Ok(v as u8)
            } else {
                Err(format!(
                    "label value {v} is not one of the {} declared classes (0..={})",
                    self.classes,
                    self.classes - 1
                ))
            }
        } else {
            Ok(self
                .values
                .iter()
                .position(|x| *x == v)
                .map_or(0, |c| c as u8))
        }
    }

    fn key(&self) -> String {
        format!("{}:{:?}", self.classes, self.values)
    }
}

/// Whether a label map on `label` can be put on its image's grid `image`: `Ok(false)` when the
/// grids agree, `Ok(true)` when they hold the same voxel centres in another axis order (a label
/// written by another tool from the same series: reordered exactly); any other grid is refused,
/// saying both.
pub fn label_needs_reorder(
    label: &Geometry,
    image: &Geometry,
) -> std::result::Result<bool, String> {
    let close = |a: &Geometry, b: &Geometry| {
        a.max_affine_difference(b)
            .is_some_and(|d| d <= GRID_TOLERANCE_MM)
    };
    if close(label, image) {
        return Ok(false);
    }
    let canonical = |g: &Geometry| Orientation::of(g).apply_to_geometry(g);
    if close(&canonical(label), &canonical(image)) {
        return Ok(true);
    }
    Err(format!(
        "not on the image grid: label {:?} with affine {:?}, image {:?} with affine {:?}",
        label.dims, label.affine, image.dims, image.affine
    ))
}

/// A label map's classes on its image's grid (see [`label_needs_reorder`]).
pub fn label_onto_image(
    classes: Array3<u8>,
    label: &Geometry,
    image: &Geometry,
) -> std::result::Result<Array3<u8>, String> {
    if label_needs_reorder(label, image)? {
        Ok(resample_labels_onto(classes.view(), label, image))
    } else {
        Ok(classes)
    }
}

/// Reads a case's channels and label, checks them and applies the spatial plan; a case whose
/// resampled grid would exceed `max_voxels` is refused before any resampling.
pub fn load_case(
    entry: &CaseEntry,
    channels: usize,
    labels: &LabelMap,
    plan: &SpatialPlan,
    max_voxels: u64,
) -> Result<SpatialResult> {
    let case_err = |reason: String| Error::Case {
        case: entry.id.clone(),
        reason,
    };
    let scan =
        io::read_channels(&entry.images, GRID_TOLERANCE_MM).map_err(|e| case_err(e.to_string()))?;
    // A NaN would poison the case's statistics and every patch cut from it.
    let (nan, inf) = scan.non_finite();
    if nan + inf > 0 {
        let files: Vec<String> = entry
            .images
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        return Err(case_err(format!(
            "{nan} NaN and {inf} infinite voxel(s) in {}",
            files.join(", ")
        )));
    }
    if let Some(reason) = plan.size_problem(&scan.geometry, max_voxels, "segment.max_voxels") {
        return Err(case_err(reason));
    }
    let geometry = scan.geometry;
    let image = scan.voxels;
    if image.shape()[0] != channels {
        return Err(case_err(format!(
            "has {} image channel(s), the dataset declares {channels}",
            image.shape()[0]
        )));
    }
    let label = match &entry.label {
        None => None,
        Some(path) => {
            let v = io::read_volume(path, None).map_err(|e| case_err(e.to_string()))?;
            if v.channels() != 1 {
                return Err(case_err(format!(
                    "label {} has {} channels, expected 1",
                    path.display(),
                    v.channels()
                )));
            }
            // The grid first: a label on another grid is reported as such, whatever its values.
            label_needs_reorder(&v.geometry, &geometry)
                .map_err(|reason| case_err(format!("label {}: {reason}", path.display())))?;
            let mut classes = ndarray::Array4::<u8>::zeros(v.voxels.dim());
            for (c, x) in classes.iter_mut().zip(v.voxels.iter()) {
                *c = labels
                    .class_of(*x)
                    .map_err(|r| case_err(format!("{}: {r}", path.display())))?;
            }
            let l = label_onto_image(classes.index_axis_move(Axis(0), 0), &v.geometry, &geometry)
                .map_err(|reason| case_err(format!("label {}: {reason}", path.display())))?;
            Some(l.insert_axis(Axis(0)))
        }
    };
    Ok(plan.apply(image.view(), label.as_ref().map(|l| l.view()), &geometry))
}

/// Stable identity of a case's source files (paths, sizes, modification times).
pub(crate) fn source_key(entry: &CaseEntry) -> String {
    let mut h = Sha256::new();
    for p in entry.images.iter().chain(entry.label.iter()) {
        h.update(p.to_string_lossy().as_bytes());
        let mut files: Vec<PathBuf> = if p.is_dir() {
            walkdir::WalkDir::new(p)
                .sort_by_file_name()
                .into_iter()
                .filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_file())
                .map(|e| e.into_path())
                .collect()
        } else {
            vec![p.clone()]
        };
        files.sort();
        for f in files {
            if let Ok(m) = std::fs::metadata(&f) {
                let mtime = m
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos());
                h.update(format!("{}|{}|{mtime};", f.display(), m.len()).as_bytes());
            }
        }
    }
    hex(&h.finalize()[..16])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Cache file format version; bump when the layout or the preprocessing code changes meaning.
const CACHE_VERSION: &str = "medseg-case-v1";

#[derive(Serialize, Deserialize)]
struct CacheHeader {
    version: String,
    shape: [usize; 4],
    has_label: bool,
    geometry: Geometry,
}

/// The on-disk cache of spatially preprocessed cases. Files are named by hash only, so no case id
/// (which may hold a patient name) reaches a file name.
pub struct CaseCache {
    dir: PathBuf,
    max_voxels: u64,
}

impl CaseCache {
    /// A cache in `dir` (created when first written); cases are held to the default
    /// `segment.max_voxels`.
    pub fn new(dir: &Path) -> Self {
        CaseCache {
            dir: dir.to_path_buf(),
            max_voxels: crate::config::DEFAULT_MAX_VOXELS,
        }
    }

    /// The same cache, refusing cases whose resampled grid exceeds `max_voxels`.
    pub fn with_max_voxels(mut self, max_voxels: u64) -> Self {
        self.max_voxels = max_voxels;
        self
    }

    fn path(&self, entry: &CaseEntry, plan: &SpatialPlan, labels: &LabelMap) -> PathBuf {
        let mut h = Sha256::new();
        h.update(CACHE_VERSION);
        h.update(source_key(entry));
        h.update(format!(
            "{:?}|{}|{}|{}",
            plan.spacing.map(f64::to_bits),
            plan.reorient,
            plan.crop_to_nonzero,
            labels.key()
        ));
        self.dir.join(format!("{}.case", hex(&h.finalize()[..16])))
    }

    /// The cached result, or `load_case` run and stored.
    pub fn load(
        &self,
        entry: &CaseEntry,
        channels: usize,
        labels: &LabelMap,
        plan: &SpatialPlan,
    ) -> Result<SpatialResult> {
        let path = self.path(entry, plan, labels);
        if let Some(hit) = Self::read(&path) {
            return Ok(hit);
        }
        let result = load_case(entry, channels, labels, plan, self.max_voxels)?;
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        let (c, k, j, i) = result.image.dim();
        let header = serde_json::to_vec(&CacheHeader {
            version: CACHE_VERSION.into(),
            shape: [c, k, j, i],
            has_label: result.label.is_some(),
            geometry: result.geometry.clone(),
        })
        .map_err(|e| Error::Write {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let mut bytes = Vec::with_capacity(8 + header.len() + result.image.len() * 5);
        bytes.extend_from_slice(&(header.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&header);
        for v in result.image.iter() {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        if let Some(l) = &result.label {
            bytes.extend(l.iter());
        }
        io::write_atomically(&path, &bytes)?;
        Ok(result)
    }

    /// A cache entry, or `None` when absent or unreadable (then it is rebuilt).
    fn read(path: &Path) -> Option<SpatialResult> {
        let bytes = std::fs::read(path).ok()?;
        let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
        let header: CacheHeader = serde_json::from_slice(bytes.get(8..8 + n)?).ok()?;
        if header.version != CACHE_VERSION {
            return None;
        }
        let [c, k, j, i] = header.shape;
        let voxels = c * k * j * i;
        let body = bytes.get(8 + n..)?;
        let image_bytes = body.get(..voxels * 4)?;
        let image: Vec<f32> = image_bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let image = Array4::from_shape_vec([c, k, j, i], image).ok()?;
        let label = if header.has_label {
            let l = body.get(voxels * 4..voxels * 4 + k * j * i)?;
            Some(Array3::from_shape_vec([k, j, i], l.to_vec()).ok()?)
        } else {
            None
        };
        Some(SpatialResult {
            image,
            label,
            geometry: header.geometry,
        })
    }

    /// The grid of a case's first image (read from the header for NIfTI; cached for DICOM).
    pub fn source_geometry(&self, entry: &CaseEntry) -> Result<Geometry> {
        let case_err = |e: Error| Error::Case {
            case: entry.id.clone(),
            reason: e.to_string(),
        };
        let first = entry.images.first().ok_or_else(|| Error::Case {
            case: entry.id.clone(),
            reason: "no image file".into(),
        })?;
        if io::nifti::is_nifti_path(first) {
            let h = io::nifti::read_header(first).map_err(case_err)?;
            return Ok(Geometry::new(h.spatial_dims(), h.affine()));
        }
        let path = self
            .dir
            .join(format!("{}.geometry.json", source_key(entry)));
        if let Some(g) = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Geometry>(&b).ok())
        {
            return Ok(g);
        }
        let g = io::read_volume(first, None).map_err(case_err)?.geometry;
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        let json = serde_json::to_vec(&g).map_err(|e| Error::Write {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        io::write_atomically(&path, &json)?;
        Ok(g)
    }
}

/// The case ids of each split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Split {
    /// Training cases, sorted.
    pub train: Vec<String>,
    /// Validation cases (model selection and early stopping).
    pub validation: Vec<String>,
    /// Held-out test cases, never used in training or selection.
    pub test: Vec<String>,
}

/// Splits case ids by the `[data]` settings: explicit lists first, else a seeded shuffle cut by
/// fractions, or k folds. `groups` maps a case id to its group (patient, host): folds keep a group
/// whole, and a case not in it is a group of its own.
pub fn split_cases(
    ids: &[String],
    groups: &BTreeMap<String, String>,
    config: &crate::config::DataConfig,
) -> Result<Split> {
    let mut rest: Vec<String> = ids.to_vec();
    rest.sort();
    for wanted in config.test_cases.iter().chain(&config.validation_cases) {
        if !rest.contains(wanted) {
            return Err(Error::Config {
                reason: format!("[data] names case {wanted:?}, which the manifest does not list"),
            });
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(config.seed);
    rest.shuffle(&mut rng);
    let n = rest.len();
    let test: Vec<String> = if config.test_cases.is_empty() {
        let k = (n as f64 * config.test_fraction).round() as usize;
        rest.drain(..k.min(n.saturating_sub(1))).collect()
    } else {
        rest.retain(|c| !config.test_cases.contains(c));
        config.test_cases.clone()
    };
    let validation: Vec<String> = if !config.validation_cases.is_empty() {
        rest.retain(|c| !config.validation_cases.contains(c));
        config.validation_cases.clone()
    } else if config.folds > 1 {
        let none = BTreeMap::new();
        let groups = match config.fold_by {
            crate::config::FoldBy::Group => groups,
            crate::config::FoldBy::Case => &none,
        };
        let fold_of = assign_folds(&rest, groups, config.folds, &mut rng)?;
        let (val, train): (Vec<String>, Vec<String>) = rest
            .iter()
            .cloned()
            .partition(|c| fold_of[c] == config.fold);
        rest = train;
        val
    } else {
        let k = (rest.len() as f64 * config.validation_fraction).round() as usize;
        // At least one validation case when a fraction is asked for and two cases exist.
        let k = if config.validation_fraction > 0.0 && rest.len() > 1 {
            k.max(1)
        } else {
            k
        };
        rest.drain(..k.min(rest.len().saturating_sub(1))).collect()
    };
    if rest.is_empty() {
        return Err(Error::Config {
            reason: "[data] the split leaves no training case".into(),
        });
    }
    rest.sort();
    Ok(Split {
        train: rest,
        validation,
        test,
    })
}

/// The fold of each case in `cases` (already shuffled): whole groups, largest first, each to the
/// fold with the fewest cases so far (ties to the lower fold), so folds are as even as the groups
/// allow. Fewer groups than folds is refused: a fold would validate on nothing.
fn assign_folds(
    cases: &[String],
    groups: &BTreeMap<String, String>,
    folds: usize,
    rng: &mut impl rand::Rng,
) -> Result<BTreeMap<String, usize>> {
    // Groups in first-seen order of the shuffled cases, so the seed decides ties between sizes.
    let mut members: Vec<(String, Vec<String>)> = Vec::new();
    for case in cases {
        let group = groups.get(case).unwrap_or(case);
        match members.iter_mut().find(|(g, _)| g == group) {
            Some((_, list)) => list.push(case.clone()),
            None => members.push((group.clone(), vec![case.clone()])),
        }
    }
    if members.len() < folds {
        return Err(Error::Config {
            reason: format!(
                "[data] folds = {folds}, but the cases form only {} group(s); every fold needs one",
                members.len()
            ),
        });
    }
    members.shuffle(rng);
    members.sort_by_key(|(_, list)| std::cmp::Reverse(list.len()));
    let mut sizes = vec![0usize; folds];
    let mut fold_of = BTreeMap::new();
    for (_, list) in members {
        let fold = (0..folds).min_by_key(|&f| (sizes[f], f)).unwrap_or(0);
        sizes[fold] += list.len();
        for case in list {
            fold_of.insert(case, fold);
        }
    }
    Ok(fold_of)
}

/// Training and validation cases in memory, with everything that preprocessing resolved.
pub struct Dataset {
    /// The training cases.
    pub train: Vec<Arc<PreparedCase>>,
    /// The validation cases.
    pub validation: Vec<Arc<PreparedCase>>,
    /// The case ids of every split, test included.
    pub split: Split,
}

/// The manifest `[data]` names, and its path: `dataset.json` under `root`, or the CSV file.
pub fn read_manifest(data: &crate::config::DataConfig) -> Result<(PathBuf, manifest::Manifest)> {
    match data.format {
        DataFormat::Decathlon => Ok((
            data.root.join("dataset.json"),
            manifest::read_decathlon(&data.root)?,
        )),
        DataFormat::Csv => {
            let path = data.root.join(&data.manifest);
            let m = manifest::read_csv(&path, &data.root)?;
            Ok((path, m))
        }
    }
}

/// The manifest's cases with the channel and label names the run uses (the config's, else the
/// manifest's), every file checked to exist.
struct Sources {
    path: PathBuf,
    cases: Vec<CaseEntry>,
    channels: Vec<String>,
    labels: Vec<String>,
}

impl Sources {
    fn read(data: &crate::config::DataConfig) -> Result<Sources> {
        let (path, manifest) = read_manifest(data)?;
        let or = |given: &Vec<String>, found: Vec<String>| {
            if given.is_empty() {
                found
            } else {
                given.clone()
            }
        };
        let channels = or(&data.channels, manifest.channels);
        let labels = or(&data.labels, manifest.labels);
        if channels.is_empty() || labels.len() < 2 {
            return Err(Error::Config {
                reason: format!(
                    "{}: [data] channels and labels (background first, at least 2) must be given in the config or the dataset.json",
                    path.display()
                ),
            });
        }
        if !data.label_values.is_empty() && data.label_values.len() != labels.len() {
            return Err(Error::Config {
                reason: "[data] label_values needs one value per label".into(),
            });
        }
        let mut problems = Vec::new();
        for c in &manifest.cases {
            if c.label.is_none() {
                problems.push(format!("case {}: no label file", c.id));
            }
            for p in c.images.iter().chain(c.label.iter()) {
                if !p.exists() {
                    problems.push(format!("case {}: {} does not exist", c.id, p.display()));
                }
            }
        }
        let sources = Sources {
            path,
            cases: manifest.cases,
            channels,
            labels,
        };
        sources.check(problems)?;
        Ok(sources)
    }

    /// All problems of one stage, reported together against the manifest.
    fn check(&self, problems: Vec<String>) -> Result<()> {
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Dataset {
                path: self.path.clone(),
                problems,
            })
        }
    }

    /// Each grouped case's group.
    fn groups(&self) -> BTreeMap<String, String> {
        self.cases
            .iter()
            .filter_map(|c| Some((c.id.clone(), c.group.clone()?)))
            .collect()
    }

    /// The entries of `ids`, in that order.
    fn entries<'a>(&self, ids: impl IntoIterator<Item = &'a String>) -> Vec<CaseEntry> {
        ids.into_iter()
            .filter_map(|id| self.cases.iter().find(|c| &c.id == id).cloned())
            .collect()
    }
}

/// Target spacing (nnU-Net's plan): the per-axis median of the training cases' (reoriented)
/// spacings, rounded to 1e-4 mm so the saved config reads cleanly. `spacings` is not empty.
pub fn median_spacing(spacings: &[[f64; 3]]) -> [f64; 3] {
    [0, 1, 2].map(|a| {
        let mut v: Vec<f64> = spacings.iter().map(|s| s[a]).collect();
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2] * 1e4).round() / 1e4
    })
}

/// The default intensity scheme of each channel: CT windowing for a channel named `CT`, else a
/// z-score inside the foreground.
pub fn default_intensity(channels: &[String]) -> Vec<IntensityConfig> {
    channels
        .iter()
        .map(|name| IntensityConfig {
            scheme: if name.eq_ignore_ascii_case("ct") {
                IntensityScheme::Ct
            } else {
                IntensityScheme::Zscore
            },
            ..IntensityConfig::default()
        })
        .collect()
}

/// The config's spacing, else the median over the training cases' source grids.
fn plan_spacing(
    config: &RunConfig,
    sources: &Sources,
    split: &Split,
    cache: &CaseCache,
) -> Result<[f64; 3]> {
    if let [x, y, z] = config.preprocess.spacing[..] {
        return Ok([x, y, z]);
    }
    let unit = SpatialPlan {
        spacing: [1.0; 3],
        reorient: config.preprocess.reorient,
        crop_to_nonzero: false,
    };
    let geometries: Vec<Result<Geometry>> = sources
        .entries(&split.train)
        .par_iter()
        .map(|e| cache.source_geometry(e))
        .collect();
    let mut spacings = Vec::new();
    let mut problems = Vec::new();
    for g in geometries {
        match g {
            Ok(g) => spacings.push(unit.oriented(&g).spacing()),
            Err(e) => problems.push(e.to_string()),
        }
    }
    sources.check(problems)?;
    Ok(median_spacing(&spacings))
}

/// Training and validation cases on the target grid (from the cache when it holds them).
fn load_resampled(
    sources: &Sources,
    split: &Split,
    cache: &CaseCache,
    plan: &SpatialPlan,
    labels: &LabelMap,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<Vec<(String, SpatialResult)>> {
    let wanted = sources.entries(split.train.iter().chain(&split.validation));
    let total = wanted.len();
    let done = std::sync::atomic::AtomicUsize::new(0);
    progress(0, total);
    let loaded: Vec<(String, Result<SpatialResult>)> = wanted
        .par_iter()
        .map(|e| {
            let r = cache.load(e, sources.channels.len(), labels, plan);
            progress(
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1,
                total,
            );
            (e.id.clone(), r)
        })
        .collect();
    let mut spatial = Vec::new();
    let mut problems = Vec::new();
    for (id, r) in loaded {
        match r {
            Ok(s) if s.label.is_some() => spatial.push((id, s)),
            Ok(_) => problems.push(format!("case {id}: no label")),
            Err(e) => problems.push(e.to_string()),
        }
    }
    sources.check(problems)?;
    Ok(spatial)
}

/// Each channel's normalisation, resolved with foreground statistics of the training cases.
fn plan_intensity(
    config: &RunConfig,
    channels: &[String],
    spatial: &[(String, SpatialResult)],
    split: &Split,
) -> Result<Vec<Normalization>> {
    let intensity = if config.preprocess.intensity.is_empty() {
        default_intensity(channels)
    } else {
        config.preprocess.intensity.clone()
    };
    if intensity.len() != channels.len() {
        return Err(Error::Config {
            reason: format!(
                "[preprocess] intensity has {} entries for {} channels",
                intensity.len(),
                channels.len()
            ),
        });
    }
    intensity
        .iter()
        .enumerate()
        .map(|(c, ic)| {
            let samples: Vec<f32> = spatial
                .iter()
                .filter(|(id, _)| split.train.contains(id))
                .flat_map(|(_, s)| foreground_samples(s, c))
                .collect();
            Normalization::resolve(ic, Some(&samples), config.preprocess.crop_to_nonzero)
        })
        .collect()
}

/// Reads the manifest named by `config.data`, checks every case, plans what the config leaves to
/// the dataset (channels, labels, target spacing, intensity statistics), and prepares the training
/// and validation cases. The plan is written back into `config`, which the run saves, so inference
/// repeats it exactly. All problems of a stage are reported together, one line per case.
/// `progress(done, total)` follows the case preparation.
pub fn build(config: &mut RunConfig, progress: &(dyn Fn(usize, usize) + Sync)) -> Result<Dataset> {
    let sources = Sources::read(&config.data)?;
    let classes = sources.labels.len();
    let labels = LabelMap::new(classes, &config.data.label_values);
    let ids: Vec<String> = sources.cases.iter().map(|c| c.id.clone()).collect();
    let groups = sources.groups();
    let split = split_cases(&ids, &groups, &config.data)?;
    let cache = CaseCache::new(&config.data.cache_dir).with_max_voxels(config.segment.max_voxels);
    let spacing = plan_spacing(config, &sources, &split, &cache)?;
    let plan = SpatialPlan {
        spacing,
        reorient: config.preprocess.reorient,
        crop_to_nonzero: config.preprocess.crop_to_nonzero,
    };
    let spatial = load_resampled(&sources, &split, &cache, &plan, &labels, progress)?;
    let normalization = plan_intensity(config, &sources.channels, &spatial, &split)?;

    config.preprocess.spacing = spacing.to_vec();
    config.preprocess.intensity = normalization.iter().map(Normalization::to_config).collect();
    config.data.channels = sources.channels;
    config.data.labels = sources.labels;

    let (mut train, mut validation) = (Vec::new(), Vec::new());
    for (id, s) in spatial {
        let case = Arc::new(prepare(id.clone(), s, &normalization, classes));
        if split.train.contains(&id) {
            train.push(case);
        } else {
            validation.push(case);
        }
    }
    train.sort_by(|a, b| a.id.cmp(&b.id));
    validation.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(Dataset {
        train,
        validation,
        split,
    })
}

/// Up to 10,000 channel values under the foreground, evenly strided.
fn foreground_samples(s: &SpatialResult, channel: usize) -> Vec<f32> {
    let Some(label) = &s.label else {
        return Vec::new();
    };
    let image = s.image.index_axis(Axis(0), channel);
    let values: Vec<f32> = image
        .iter()
        .zip(label.iter())
        .filter(|(_, l)| **l > 0)
        .map(|(v, _)| *v)
        .collect();
    let stride = values.len().div_ceil(FOREGROUND_SAMPLES).max(1);
    values.into_iter().step_by(stride).collect()
}

/// Normalises a spatially preprocessed case and indexes its foreground.
pub fn prepare(
    id: String,
    s: SpatialResult,
    normalization: &[Normalization],
    classes: usize,
) -> PreparedCase {
    let mut image = s.image;
    normalize_channels(&mut image, normalization);
    let (_, nk, nj, ni) = image.dim();
    let label = s.label.unwrap_or_else(|| Array3::zeros([nk, nj, ni]));
    let mut foreground = vec![Vec::new(); classes.saturating_sub(1)];
    for ((k, j, i), l) in label.indexed_iter() {
        if *l > 0 && (*l as usize) < classes {
            foreground[*l as usize - 1].push([k as u32, j as u32, i as u32]);
        }
    }
    let components = foreground
        .iter()
        .map(|list| strided(group_by_component(list, [nk, nj, ni]), COMPONENT_SAMPLES))
        .collect();
    for list in &mut foreground {
        let stride = list.len().div_ceil(FOREGROUND_SAMPLES).max(1);
        if stride > 1 {
            *list = list.iter().step_by(stride).copied().collect();
        }
    }
    PreparedCase {
        id,
        image,
        label,
        geometry: s.geometry,
        foreground,
        components,
    }
}

/// The voxels of `list` (raster order, all of one class on a `[nk, nj, ni]` grid) grouped by
/// 26-connected component, found inside their bounding box only.
fn group_by_component(list: &[[u32; 3]], dims: [usize; 3]) -> Vec<Vec<[u32; 3]>> {
    if list.is_empty() {
        return Vec::new();
    }
    let mut lo = [u32::MAX; 3];
    let mut hi = [0u32; 3];
    for v in list {
        for a in 0..3 {
            lo[a] = lo[a].min(v[a]);
            hi[a] = hi[a].max(v[a]);
        }
    }
    debug_assert!((0..3).all(|a| (hi[a] as usize) < dims[a]));
    let b = [0, 1, 2].map(|a| (hi[a] - lo[a]) as usize + 1);
    let at = |v: &[u32; 3]| {
        (((v[0] - lo[0]) as usize * b[1]) + (v[1] - lo[1]) as usize) * b[2]
            + (v[2] - lo[2]) as usize
    };
    let mut mask = vec![false; b[0] * b[1] * b[2]];
    for v in list {
        mask[at(v)] = true;
    }
    let cc = crate::transforms::post::connected_components(&mask, b);
    let mut groups = vec![Vec::new(); cc.count()];
    for v in list {
        groups[cc.labels[at(v)] as usize - 1].push(*v);
    }
    groups
}

/// Each group thinned to at most `most` evenly strided members.
fn strided(groups: Vec<Vec<[u32; 3]>>, most: usize) -> Vec<Vec<[u32; 3]>> {
    groups
        .into_iter()
        .map(|g| {
            let stride = g.len().div_ceil(most).max(1);
            g.into_iter().step_by(stride).collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DataConfig;

    #[test]
    fn plan_takes_the_median_spacing_and_ct_windows_for_ct() {
        let s = median_spacing(&[[1.0, 1.0, 5.0], [0.7, 0.7, 1.25], [0.8, 0.80004, 3.0]]);
        assert_eq!(s, [0.8, 0.8, 3.0]);
        let schemes: Vec<_> = default_intensity(&["CT".into(), "T1".into()])
            .into_iter()
            .map(|c| c.scheme)
            .collect();
        assert_eq!(schemes, [IntensityScheme::Ct, IntensityScheme::Zscore]);
    }

    #[test]
    fn splits_are_disjoint_seeded_and_cover_every_case() {
        let ids: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
        let config = DataConfig {
            validation_fraction: 0.2,
            test_fraction: 0.1,
            ..DataConfig::default()
        };
        let s = split_cases(&ids, &BTreeMap::new(), &config).unwrap();
        assert_eq!((s.train.len(), s.validation.len(), s.test.len()), (7, 2, 1));
        assert_eq!(split_cases(&ids, &BTreeMap::new(), &config).unwrap(), s);
        let mut all: Vec<_> = s
            .train
            .iter()
            .chain(&s.validation)
            .chain(&s.test)
            .cloned()
            .collect();
        all.sort();
        let mut want = ids.clone();
        want.sort();
        assert_eq!(all, want);
        // k folds: every non-test case validates in exactly one fold.
        let mut seen = Vec::new();
        for fold in 0..3 {
            let c = DataConfig {
                folds: 3,
                fold,
                test_fraction: 0.0,
                ..DataConfig::default()
            };
            seen.extend(split_cases(&ids, &BTreeMap::new(), &c).unwrap().validation);
        }
        seen.sort();
        assert_eq!(seen, want);
    }

    #[test]
    fn folds_keep_groups_whole_and_cover_every_case() {
        // 3 hosts of 4, 3 and 2 copies, and one case without a group.
        let mut groups = BTreeMap::new();
        let mut ids = Vec::new();
        for (host, n) in [("h1", 4), ("h2", 3), ("h3", 2)] {
            for i in 0..n {
                let id = format!("{host}_{i}");
                groups.insert(id.clone(), host.to_string());
                ids.push(id);
            }
        }
        ids.push("alone".into());
        let folds: Vec<Split> = (0..3)
            .map(|fold| {
                let c = DataConfig {
                    folds: 3,
                    fold,
                    seed: 11,
                    test_fraction: 0.0,
                    ..DataConfig::default()
                };
                split_cases(&ids, &groups, &c).unwrap()
            })
            .collect();
        let mut seen: Vec<String> = folds.iter().flat_map(|s| s.validation.clone()).collect();
        seen.sort();
        let mut want = ids.clone();
        want.sort();
        assert_eq!(seen, want);
        for s in &folds {
            // Disjoint within a fold, and no host on both sides.
            assert!(s.train.iter().all(|c| !s.validation.contains(c)));
            for host in ["h1", "h2", "h3"] {
                let on = |l: &Vec<String>| l.iter().any(|c| c.starts_with(host));
                assert!(!(on(&s.train) && on(&s.validation)), "{host} split: {s:?}");
            }
        }
        // Balanced as the groups allow: 4 | 3 | 2 + 1.
        let mut sizes: Vec<usize> = folds.iter().map(|s| s.validation.len()).collect();
        sizes.sort();
        assert_eq!(sizes, [3, 3, 4]);
        let too_many = DataConfig {
            folds: 5,
            test_fraction: 0.0,
            ..DataConfig::default()
        };
        let e = split_cases(&ids, &groups, &too_many)
            .unwrap_err()
            .to_string();
        assert!(e.contains("4 group(s)"), "{e}");
        // Case folds ignore the groups: 5 folds of 2, and some host on both sides of a fold.
        let by_case: Vec<Split> = (0..5)
            .map(|fold| {
                let c = DataConfig {
                    fold,
                    fold_by: crate::config::FoldBy::Case,
                    ..too_many.clone()
                };
                split_cases(&ids, &groups, &c).unwrap()
            })
            .collect();
        assert!(by_case.iter().all(|s| s.validation.len() == 2));
        let mixed = by_case.iter().any(|s| {
            ["h1", "h2", "h3"].iter().any(|h| {
                s.train.iter().any(|c| c.starts_with(h))
                    && s.validation.iter().any(|c| c.starts_with(h))
            })
        });
        assert!(mixed, "{by_case:?}");
    }

    #[test]
    fn label_values_pick_classes() {
        let map = LabelMap::new(2, &[0, 5]);
        assert_eq!(map.class_of(5.0), Ok(1));
        assert_eq!(map.class_of(3.0), Ok(0));
        assert!(LabelMap::new(2, &[])
            .class_of(3.0)
            .unwrap_err()
            .contains("label value 3"));
        assert!(LabelMap::new(2, &[]).class_of(0.5).is_err());
    }
}
