//! `medseg synth`: a lesion dataset in the Decathlon layout, built by inserting synthetic lesions
//! into (randomly deformed) real host scans. Splits are disjoint by host; everything follows from
//! the config's seed.

use std::path::{Path, PathBuf};

use ndarray::{Array3, Axis};
use rand::rngs::StdRng;
use rand::{Rng, RngExt, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::deform::{deform_host, DeformSettings};
use super::lesion::{Fraction, LesionShape};
use super::organ::{erode_mm, lung_mask, place};
use super::polarity::AppearanceConfig;
use super::randomise::{randomised_case, HostInputs, MadeCase, RandomiseConfig};
use super::{insert, label_volume, LesionSpec};
use crate::config::{load_layered, section, ConfigFile};
use crate::error::{Error, Result};
use crate::io::layout::{
    case_name, DatasetCase, DatasetJson, LabelEntry, SynthCase, SynthLesion, SynthLesions,
    SynthSummary, TestCase, IMAGES_TEST, IMAGES_TRAIN, LABELS_TEST, LABELS_TRAIN,
};
use crate::io::nifti::{write_label_map, write_nifti};
use crate::io::write_json_atomically;
use crate::volume::Volume;

/// The kind of lesion a synthetic dataset holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LesionKind {
    /// CT lung nodules, contrast in HU.
    LungNodule,
    /// MR brain tumours with enhancing rim and necrotic core, contrast relative to the tissue.
    BrainTumour,
}

impl LesionKind {
    /// The name recorded in `lesions.json`.
    pub fn name(self) -> &'static str {
        match self {
            LesionKind::LungNodule => "lung_nodule",
            LesionKind::BrainTumour => "brain_tumour",
        }
    }
}

/// Which split a host's cases go to; splits are disjoint by host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostSplit {
    /// `imagesTr/`, `labelsTr/`.
    Train,
    /// `imagesTs/`, `labelsTs/`.
    Test,
}

/// `[synth]`: what to insert into which hosts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SynthConfig {
    /// Seed of every random draw; each host and case derives its own from it.
    pub seed: u64,
    /// `lung_nodule` (CT, contrast in HU) or `brain_tumour` (MR, enhancing rim and necrotic core,
    /// contrast relative to the local tissue).
    pub lesion: LesionKind,
    /// Class name of the lesions in `dataset.json`.
    pub label: String,
    /// The host scans (`[[synth.hosts]]`).
    pub hosts: Vec<HostConfig>,
    /// Deformed copies made of each host.
    pub cases_per_host: usize,
    /// Lesions per case, `[min, max]`.
    pub lesions_per_case: [usize; 2],
    /// Share of cases left lesion-free, to measure false positives.
    pub control_fraction: f64,
    /// Log-normal diameters: median, σ of the log, and clip range (mm).
    pub diameter_median_mm: f64,
    /// σ of the natural log of the diameter.
    pub diameter_sigma: f64,
    /// Diameters are clipped to `[low, high]` mm.
    pub diameter_range_mm: [f64; 2],
    /// Share of lung nodules with spicules.
    pub spiculated_fraction: f64,
    /// Contrast added: HU for CT lesions; for MR, a share of the local tissue intensity (the
    /// enhancing rim of a brain tumour).
    pub delta: [f64; 2],
    /// Low-frequency texture inside the lesion, σ as a share of the contrast.
    pub texture: [f64; 2],
    /// Brain tumours at least this large (mm) get a necrotic core; smaller ones enhance solidly.
    pub core_min_diameter_mm: f64,
    /// Core radius as a share of the lesion's.
    pub core_fraction: [f64; 2],
    /// Contrast of the core, as `delta` (MR: a share of the local tissue; negative = darker).
    pub core_delta: [f64; 2],
    /// Random host deformation: rotation up to this many degrees and isotropic scale up to
    /// ±this share, about the volume centre, applied in mm before insertion.
    pub rotation_degrees: f64,
    /// Largest relative isotropic scaling (0.08: factors in `[0.92, 1.08]`).
    pub scale: f64,
    /// Elastic deformation: peak displacement (mm) of a smooth field with these wavelengths (mm).
    pub elastic_mm: f64,
    /// Wavelength range `[low, high]` of the elastic field's sinusoids, mm.
    pub elastic_wavelength_mm: [f64; 2],
    /// MR only: a smooth multiplicative bias field, up to ±this share across the field of view.
    pub bias_field: f64,
    /// Domain randomisation (tissue contrast, skull stripping, resolution, noise); off when absent.
    #[serde(default)]
    pub randomise: Option<RandomiseConfig>,
    /// Lesion contrast as a contrast-to-noise ratio of every polarity; needs `randomise`. When
    /// absent, `delta`, `core_delta` and `core_min_diameter_mm` set the contrast.
    #[serde(default)]
    pub appearance: Option<AppearanceConfig>,
    /// When set, the region of interest (each host's `roi`, else its `organ`) is written as label
    /// 2 with this name, so one model learns the organ and its lesions together.
    #[serde(default)]
    pub roi_label: Option<String>,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            seed: 7,
            lesion: LesionKind::LungNodule,
            label: "nodule".into(),
            hosts: Vec::new(),
            cases_per_host: 4,
            lesions_per_case: [1, 3],
            control_fraction: 0.2,
            // DATA.md: lung nodule median ≈ 6 mm, range 3–30 mm.
            diameter_median_mm: 6.0,
            diameter_sigma: 0.45,
            diameter_range_mm: [3.0, 30.0],
            spiculated_fraction: 0.3,
            // Solid nodule (−100…+100 HU) over aerated lung (≈ −750 HU).
            delta: [650.0, 850.0],
            texture: [0.05, 0.15],
            core_min_diameter_mm: 12.0,
            // DATA.md: T1 hypointense core −10…−30 % under an enhancing rim.
            core_fraction: [0.4, 0.7],
            core_delta: [-0.3, -0.1],
            rotation_degrees: 8.0,
            scale: 0.08,
            elastic_mm: 3.0,
            elastic_wavelength_mm: [80.0, 160.0],
            bias_field: 0.0,
            randomise: None,
            appearance: None,
            roi_label: None,
        }
    }
}

/// One host scan and where lesions may go in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// The host scan: a NIfTI file, DICOM file or DICOM series directory. Of a 4D scan (e.g. an
    /// fMRI or diffusion series) the first volume is the host.
    pub image: PathBuf,
    /// `lung` (chest CTs: HU < −500, the lung-sized inner air regions), or a mask on the host's
    /// grid: `mask:PATH` (non-zero voxels, e.g. a brain mask), `mask:PATH>T` (a probability map
    /// above T) or `mask:PATH=V,W,...` (values of a label map, e.g. TotalSegmentator's lung lobes
    /// 10-14 or liver 5).
    pub organ: String,
    /// `train` or `test`: splits are disjoint by host.
    pub split: HostSplit,
    /// Deformed copies of this host; default `cases_per_host`.
    #[serde(default)]
    pub cases: Option<usize>,
    /// The region of interest (e.g. the whole brain where `organ` is the white matter), in
    /// `organ`'s syntax; several joined by `|` are united. Default: the organ.
    #[serde(default)]
    pub roi: Option<String>,
}

/// Where lesions go in a host, parsed from [`HostConfig::organ`].
#[derive(Debug, Clone, PartialEq)]
pub enum Organ {
    /// Lungs of a chest CT by HU.
    Lung,
    /// Voxels of a mask file on the host's grid that pass `select`.
    Mask {
        /// The mask file.
        path: PathBuf,
        /// Which of its voxels count.
        select: MaskSelect,
    },
}

/// Which voxels of an organ mask file count.
#[derive(Debug, Clone, PartialEq)]
pub enum MaskSelect {
    /// Non-zero voxels (`mask:PATH`).
    NonZero,
    /// Voxels above a threshold (`mask:PATH>T`).
    Above(f32),
    /// Voxels equal to one of these label values (`mask:PATH=V,W,...`).
    Values(Vec<f32>),
}

impl MaskSelect {
    fn test(&self, v: f32) -> bool {
        match self {
            MaskSelect::NonZero => v != 0.0,
            MaskSelect::Above(t) => v > *t,
            MaskSelect::Values(values) => values.contains(&v),
        }
    }
}

impl HostConfig {
    /// The parsed `organ`: `lung`, `mask:PATH`, `mask:PATH>T` or `mask:PATH=V,W,...`.
    pub fn organ(&self) -> Result<Organ> {
        parse_organ(&self.organ).ok_or_else(|| organ_error("organ", &self.organ))
    }

    /// The parsed region of interest: `roi` (masks united by `|`), else the organ.
    pub fn roi(&self) -> Result<Vec<Organ>> {
        match &self.roi {
            None => Ok(vec![self.organ()?]),
            Some(spec) => spec
                .split('|')
                .map(|part| parse_organ(part.trim()).ok_or_else(|| organ_error("roi", spec)))
                .collect(),
        }
    }
}

fn organ_error(key: &str, spec: &str) -> Error {
    Error::Config {
        reason: format!(
            "[synth] {key} {spec:?}: use lung, mask:PATH, mask:PATH>THRESHOLD or mask:PATH=LABEL[,LABEL...]"
        ),
    }
}

/// `lung`, `mask:PATH`, `mask:PATH>T` or `mask:PATH=V,W,...`; `None` when malformed.
fn parse_organ(spec: &str) -> Option<Organ> {
    if spec == "lung" {
        return Some(Organ::Lung);
    }
    let spec = spec.strip_prefix("mask:")?;
    let (path, select) = if let Some((p, t)) = spec.rsplit_once('>') {
        (p, MaskSelect::Above(t.trim().parse().ok()?))
    } else if let Some((p, t)) = spec.rsplit_once('=') {
        let values = t
            .split(',')
            .map(|x| x.trim().parse::<f32>())
            .collect::<std::result::Result<Vec<f32>, _>>()
            .ok()?;
        (p, MaskSelect::Values(values))
    } else {
        (spec, MaskSelect::NonZero)
    };
    Some(Organ::Mask {
        path: PathBuf::from(path),
        select,
    })
}

/// The config file: a `[synth]` table, layered like every config (see [`ConfigFile`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SynthFile {
    /// The settings.
    #[serde(default)]
    pub synth: SynthConfig,
}

impl ConfigFile for SynthFile {
    const SECTIONS: &'static [&'static str] = &["synth"];

    fn from_sections(table: &mut toml::Table, origin: &str) -> Result<Self> {
        Ok(SynthFile {
            synth: section(table, "synth", origin)?,
        })
    }

    fn validate(&self, origin: &str) -> Result<()> {
        self.synth.validate(origin)
    }
}

impl SynthConfig {
    /// The config as a file's text (`[synth]` table), as [`SynthConfig::from_file`] reads it.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(&SynthFile {
            synth: self.clone(),
        })
        .map_err(|e| Error::Config {
            reason: e.to_string(),
        })
    }

    /// Cases the dataset will hold.
    pub fn total_cases(&self) -> usize {
        self.hosts
            .iter()
            .map(|h| h.cases.unwrap_or(self.cases_per_host))
            .sum()
    }

    /// Reads a `[synth]` file (see [`SynthFile`]).
    pub fn from_file(path: &Path) -> Result<Self> {
        load_layered::<SynthFile>(Some(path), &[]).map(|f| f.synth)
    }

    /// Checks that need no host; `origin` names the file in messages.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let c = self;
        let path = Path::new(origin);
        if c.hosts.is_empty() {
            return Err(Error::Config {
                reason: format!(
                    "{}: [synth] needs hosts (a test-only set, e.g. for a shifted domain, is allowed)",
                    path.display()
                ),
            });
        }
        let bad = |what: &str| Error::Config {
            reason: format!("{}: [synth] {what}", path.display()),
        };
        let [dlo, dhi] = c.diameter_range_mm;
        if !(c.diameter_median_mm > 0.0 && c.diameter_sigma >= 0.0 && dlo > 0.0 && dlo <= dhi) {
            return Err(bad("diameter_median_mm and diameter_range_mm must be positive (low <= high), diameter_sigma >= 0"));
        }
        if c.cases_per_host == 0
            || c.hosts.iter().any(|h| h.cases == Some(0))
            || c.lesions_per_case[0] > c.lesions_per_case[1]
        {
            return Err(bad(
                "cases_per_host (and a host's cases) must be positive and lesions_per_case [min, max] with min <= max",
            ));
        }
        let shares = [
            c.control_fraction,
            c.spiculated_fraction,
            c.scale,
            c.bias_field,
        ];
        if !(shares.iter().all(|v| (0.0..=1.0).contains(v))
            && c.rotation_degrees >= 0.0
            && c.delta[0] <= c.delta[1]
            && c.core_delta[0] <= c.core_delta[1]
            && c.texture[0] >= 0.0
            && c.texture[0] <= c.texture[1])
        {
            return Err(bad("control_fraction, spiculated_fraction, scale and bias_field must be in [0, 1], rotation_degrees >= 0, delta, core_delta and texture [low, high] (texture >= 0)"));
        }
        let [clo, chi] = c.core_fraction;
        let [wlo, whi] = c.elastic_wavelength_mm;
        if !(clo > 0.0 && clo <= chi && chi < 1.0 && c.elastic_mm >= 0.0 && wlo > 0.0 && wlo <= whi)
        {
            return Err(bad("core_fraction must be [low, high] within (0, 1), elastic_mm >= 0 and elastic_wavelength_mm positive [low, high]"));
        }
        for h in &c.hosts {
            h.organ().and_then(|_| h.roi()).map_err(|e| Error::Config {
                reason: format!("{}: {e}", path.display()),
            })?;
        }
        match (&c.randomise, &c.appearance) {
            (Some(r), Some(a)) => {
                if let Some(problem) = r.problem() {
                    return Err(bad(&format!("randomise: {problem}")));
                }
                if let Some(problem) = a.problem() {
                    return Err(bad(&format!("appearance: {problem}")));
                }
            }
            (None, None) => {}
            _ => {
                return Err(bad(
                    "randomise and appearance go together: set both [synth.randomise] and [synth.appearance], or neither",
                ))
            }
        }
        if c.roi_label
            .as_deref()
            .is_some_and(|l| l.is_empty() || *l == c.label)
        {
            return Err(bad("roi_label must be a name other than the lesion label"));
        }
        Ok(())
    }
}

/// Where a randomised case's lesion contrasts come from: CNR-based appearances drawn from their
/// own random stream, against the local noise plus the noise still to be added.
struct Looks<'a> {
    appearance: &'a AppearanceConfig,
    extra_noise: f64,
    rng: &'a mut StdRng,
}

/// Draws this case's lesion count (0 for a control case) and inserts that many lesions into
/// `scan`, each fully inside the organ and apart from the others. Shapes and places come from
/// `rng`; contrasts from `rng` too (the config's `delta`, `core_delta`), or from `looks` in a
/// randomised case. Returns the partial-volume fractions for the label map and the records.
fn insert_lesions(
    config: &SynthConfig,
    scan: &mut Volume,
    organ: &Array3<bool>,
    rng: &mut StdRng,
    mut looks: Option<Looks>,
    case: &str,
    host_name: &str,
) -> (Vec<Fraction>, Vec<SynthLesion>) {
    let kind = config.lesion;
    let control = rng.random::<f64>() < config.control_fraction;
    let wanted = if control {
        0
    } else {
        rng.random_range(
            config.lesions_per_case[0]..=config.lesions_per_case[1].max(config.lesions_per_case[0]),
        )
    };
    let mut fractions = Vec::new();
    let mut records = Vec::new();
    let mut taken = Vec::new();
    for _ in 0..wanted * 4 {
        if fractions.len() >= wanted {
            break;
        }
        let d = lognormal_diameter(config, rng);
        let reach = d * 0.5 * 1.35;
        let allowed = erode_mm(organ, &scan.geometry, reach);
        let Some(centre) = place(&allowed, &scan.geometry, reach, &taken, 2.0, rng) else {
            continue;
        };
        let spicules =
            if kind == LesionKind::LungNodule && rng.random::<f64>() < config.spiculated_fraction {
                3
            } else {
                0
            };
        let shape = LesionShape::random(centre, d, spicules, rng);
        let [tlo, thi] = config.texture;
        let (spec, polarity) = match looks.as_mut() {
            None => {
                let local = local_tissue(scan, centre);
                let delta = contrast(config, config.delta, local, rng);
                let core = (kind == LesionKind::BrainTumour && d >= config.core_min_diameter_mm)
                    .then(|| {
                        let [lo, hi] = config.core_fraction;
                        let share = rng.random_range(lo..=hi);
                        (share, contrast(config, config.core_delta, local, rng))
                    });
                let spec = LesionSpec {
                    shape,
                    delta,
                    core,
                    texture: rng.random_range(tlo..=thi),
                    halo: None,
                    min_cnr: 1.0,
                };
                (spec, None)
            }
            Some(looks) => {
                let look = looks.appearance.draw(looks.rng);
                let sigma = noise_around(scan, centre, reach).hypot(looks.extra_noise);
                let spec = LesionSpec {
                    shape,
                    delta: look.body * sigma,
                    core: look.core.map(|(share, c)| (share, c * sigma)),
                    texture: looks.rng.random_range(tlo..=thi),
                    halo: look.halo.map(|(scale, c)| (scale, c * sigma)),
                    // The final contrast is measured after re-acquisition.
                    min_cnr: 0.0,
                };
                (spec, Some(look.polarity))
            }
        };
        let inserted = match looks.as_mut() {
            None => insert(scan, &spec, rng),
            Some(looks) => insert(scan, &spec, looks.rng),
        };
        if let Some((f, lesion)) = inserted {
            taken.push((centre, reach));
            fractions.push(f);
            records.push(SynthLesion {
                case: case.to_string(),
                id: fractions.len(),
                kind: kind.name().into(),
                host: host_name.to_string(),
                polarity,
                slice_thickness_mm: None,
                lesion,
            });
        }
    }
    (fractions, records)
}

/// `mask` with its enclosed background filled (a region of interest has no inner holes, e.g. the
/// ventricles inside a brain drawn from tissue maps): background components not touching the
/// grid's border become foreground.
pub fn fill_holes(mask: &Array3<bool>) -> Array3<bool> {
    let (nk, nj, ni) = mask.dim();
    let background: Vec<bool> = mask.iter().map(|m| !m).collect();
    let cc = crate::transforms::post::connected_components(&background, [nk, nj, ni]);
    let mut outer = vec![false; cc.count() + 1];
    for ((k, j, i), _) in mask.indexed_iter() {
        if k == 0 || j == 0 || i == 0 || k == nk - 1 || j == nj - 1 || i == ni - 1 {
            outer[cc.labels[(k * nj + j) * ni + i] as usize] = true;
        }
    }
    let filled = cc
        .labels
        .iter()
        .map(|id| *id == 0 || !outer[*id as usize])
        .collect();
    Array3::from_shape_vec((nk, nj, ni), filled).expect("same size")
}

/// Noise σ of channel 0 in a box of half-width `radius_mm` around a world point.
fn noise_around(scan: &Volume, centre_mm: [f64; 3], radius_mm: f64) -> f64 {
    let g = &scan.geometry;
    let Some(p) = g.world_to_voxel(centre_mm) else {
        return 0.0;
    };
    let spacing = g.spacing();
    let (lo, hi): (Vec<usize>, Vec<usize>) = (0..3)
        .map(|a| {
            let half = (radius_mm / spacing[a]).ceil();
            let lo = (p[a] - half).max(0.0) as usize;
            let hi = ((p[a] + half).max(0.0) as usize).min(g.dims[a] - 1);
            (lo, hi.max(lo))
        })
        .unzip();
    let origin = crate::geometry::to_array_order([lo[0], lo[1], lo[2]]);
    let dims = crate::geometry::to_array_order([0, 1, 2].map(|a| hi[a] - lo[a] + 1));
    super::local_noise(&scan.voxels.index_axis(Axis(0), 0), origin, dims)
}

/// The label value of the region of interest when `roi_label` is set (lesions are 1).
pub const ROI_LABEL_VALUE: u8 = 2;

/// The Decathlon `dataset.json` of a synthetic dataset.
fn dataset_json(
    config: &SynthConfig,
    training: Vec<DatasetCase>,
    test: Vec<TestCase>,
) -> DatasetJson {
    let kind = config.lesion;
    let modality = match kind {
        LesionKind::LungNodule => "CT",
        LesionKind::BrainTumour => "MR",
    };
    DatasetJson {
        name: format!("medseg synthetic {}", kind.name()),
        description: "Synthetic lesions inserted into real host scans by medseg synth".into(),
        channel_names: [("0".to_string(), modality.to_string())].into(),
        labels: [
            ("background".to_string(), LabelEntry::Value(0)),
            (config.label.clone(), LabelEntry::Value(1)),
        ]
        .into_iter()
        .chain(
            config
                .roi_label
                .iter()
                .map(|name| (name.clone(), LabelEntry::Value(ROI_LABEL_VALUE as u64))),
        )
        .collect(),
        num_training: Some(training.len()),
        file_ending: Some(".nii.gz".into()),
        training: Some(training),
        test,
        ..DatasetJson::default()
    }
}

/// A host's organ mask (where lesions go) and region of interest (its `roi` masks united, holes
/// filled; else the organ).
fn host_masks(host_cfg: &HostConfig, host: &Volume) -> Result<(Array3<bool>, Array3<bool>)> {
    let organ = organ_mask(host, &host_cfg.organ()?)?;
    let roi = match &host_cfg.roi {
        None => organ.clone(),
        Some(_) => {
            let mut union = Array3::from_elem(organ.dim(), false);
            for part in host_cfg.roi()? {
                union.zip_mut_with(&organ_mask(host, &part)?, |u, m| *u |= *m);
            }
            fill_holes(&union)
        }
    };
    Ok((organ, roi))
}

/// One case from `seed`: domain-randomised when `[synth.randomise]` is set, else the host
/// deformed with lesions at the config's contrasts (one random stream, as before randomisation
/// existed, so such datasets stay byte-identical).
fn make_case(
    config: &SynthConfig,
    host: &HostInputs,
    deform_settings: &DeformSettings,
    seed: u64,
    case: &str,
) -> MadeCase {
    if let (Some(randomise), Some(appearance)) = (&config.randomise, &config.appearance) {
        return randomised_case(
            randomise,
            deform_settings,
            config.bias_field,
            host,
            seed,
            |scan, organ, rng, look, extra_noise| {
                let looks = Looks {
                    appearance,
                    extra_noise,
                    rng: look,
                };
                insert_lesions(config, scan, organ, rng, Some(looks), case, host.name)
            },
        );
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut scan, masks) = deform_host(
        host.host,
        &[host.organ, host.roi],
        deform_settings,
        &mut rng,
    );
    let (fractions, lesions) = insert_lesions(
        config, &mut scan, &masks[0], &mut rng, None, case, host.name,
    );
    MadeCase {
        scan,
        fractions,
        lesions,
        roi: masks.into_iter().nth(1).expect("two masks"),
        acquisition: None,
    }
}

/// Builds the dataset into `out` (Decathlon layout plus `lesions.json`). `progress(case)` is
/// called after each case.
pub fn build_dataset(
    config: &SynthConfig,
    out: &Path,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<SynthSummary> {
    for dir in [IMAGES_TRAIN, LABELS_TRAIN, IMAGES_TEST, LABELS_TEST] {
        std::fs::create_dir_all(out.join(dir)).map_err(|e| Error::io(out.join(dir), e))?;
    }
    let mut records = Vec::new();
    let mut cases = Vec::new();
    let mut summary = SynthSummary::default();
    let mut training = Vec::new();
    let mut test = Vec::new();
    let deform_settings = DeformSettings {
        rotation_degrees: config.rotation_degrees,
        scale: config.scale,
        elastic_mm: config.elastic_mm,
        elastic_wavelength_mm: config.elastic_wavelength_mm,
        bias_field: config.bias_field,
    };
    for (h, host_cfg) in config.hosts.iter().enumerate() {
        let host = crate::io::read_volume(&host_cfg.image, None)?;
        if host.channels() > 1 {
            eprintln!(
                "synth: {} holds {} volumes; its first is the host",
                host_cfg.image.display(),
                host.channels()
            );
        }
        let (organ, roi) = host_masks(host_cfg, &host)?;
        let host_name = case_name(&host_cfg.image);
        let is_train = host_cfg.split == HostSplit::Train;
        // Case numbers run on across hosts.
        let first_case = config.hosts[..h]
            .iter()
            .map(|x| x.cases.unwrap_or(config.cases_per_host))
            .sum::<usize>();
        let inputs = HostInputs {
            host: &host,
            organ: &organ,
            roi: &roi,
            name: &host_name,
        };
        let count = host_cfg.cases.unwrap_or(config.cases_per_host);
        // Each case has its own seed, so cases are made concurrently and gathered in order: the
        // dataset is the same whatever the thread count. A chunk bounds how many cases' volumes
        // are alive at once on a many-core host.
        let chunk = rayon::current_num_threads().clamp(1, MAX_CONCURRENT_CASES);
        for start in (0..count).step_by(chunk) {
            let made: Vec<WrittenCase> = (start..(start + chunk).min(count))
                .into_par_iter()
                .map(|c| {
                    // Seeds differ per host, per case and between splits.
                    let seed = crate::transforms::augment::derive_seed(
                        config.seed ^ if is_train { 0 } else { 0x5eed },
                        h,
                        c,
                    );
                    let case = format!(
                        "{}_{:03}",
                        if is_train { "synthTr" } else { "synthTs" },
                        first_case + c
                    );
                    let written =
                        write_case(config, out, &inputs, &deform_settings, seed, case, is_train)?;
                    progress(&written.record.case);
                    Ok(written)
                })
                .collect::<Result<_>>()?;
            for w in made {
                if w.control {
                    summary.control_cases += 1;
                }
                summary.lesions += w.lesions.len();
                records.extend(w.lesions);
                cases.push(w.record);
                if is_train {
                    summary.train_cases += 1;
                    training.push(w.entry);
                } else {
                    summary.test_cases += 1;
                    test.push(TestCase::Labelled(w.entry));
                }
            }
        }
    }
    let dataset = dataset_json(config, training, test);
    write_json_atomically(&DatasetJson::path(out), &dataset)?;
    write_json_atomically(
        &SynthLesions::path(out),
        &SynthLesions {
            lesions: records,
            summary: summary.clone(),
            cases,
        },
    )?;
    Ok(summary)
}

/// Cases made at once (each holds a few copies of its host's volume).
const MAX_CONCURRENT_CASES: usize = 4;

/// A case written to disk, with what the dataset's records need.
struct WrittenCase {
    record: SynthCase,
    lesions: Vec<SynthLesion>,
    entry: DatasetCase,
    control: bool,
}

/// Makes case `case` from `seed` and writes its scan and label map into `out`.
fn write_case(
    config: &SynthConfig,
    out: &Path,
    inputs: &HostInputs,
    deform_settings: &DeformSettings,
    seed: u64,
    case: String,
    is_train: bool,
) -> Result<WrittenCase> {
    let MadeCase {
        scan,
        fractions,
        lesions,
        roi,
        acquisition,
    } = make_case(config, inputs, deform_settings, seed, &case);
    let mut label = label_volume(scan.geometry.dims, &fractions);
    if config.roi_label.is_some() {
        label.zip_mut_with(&roi, |l, r| {
            if *l == 0 && *r {
                *l = ROI_LABEL_VALUE;
            }
        });
    }
    let (images, labels) = if is_train {
        (IMAGES_TRAIN, LABELS_TRAIN)
    } else {
        (IMAGES_TEST, LABELS_TEST)
    };
    write_nifti(
        &scan,
        &out.join(images).join(format!("{case}_0000.nii.gz")),
        writable(scan.info.dtype),
    )?;
    write_label_map(
        &label,
        &scan.geometry,
        &out.join(labels).join(format!("{case}.nii.gz")),
    )?;
    Ok(WrittenCase {
        record: SynthCase {
            case: case.clone(),
            host: inputs.name.to_string(),
            lesions: lesions.len(),
            contrast_redrawn: acquisition.is_some_and(|a| a.contrast),
            skull_stripped: acquisition.is_some_and(|a| a.skull_stripped),
            slice_thickness_mm: acquisition.and_then(|a| a.slice_thickness_mm),
            noise_sigma: acquisition.map_or(0.0, |a| a.noise_sigma),
        },
        control: fractions.is_empty(),
        lesions,
        entry: DatasetCase {
            image: format!("./{images}/{case}_0000.nii.gz"),
            label: format!("./{labels}/{case}.nii.gz"),
            // Copies of one host are one group: folds stay disjoint by host.
            group: Some(inputs.name.to_string()),
        },
    })
}

fn writable(dtype: crate::DataType) -> crate::DataType {
    use crate::DataType::*;
    match dtype {
        Uint8 | Int16 | Uint16 => dtype,
        Int8 | Int32 | Int64 | Uint32 | Uint64 => Int16,
        _ => Float32,
    }
}

/// Less lung than this (ml) means the scan is not a chest CT.
const MIN_LUNG_ML: f64 = 400.0;

fn organ_mask(host: &Volume, organ: &Organ) -> Result<Array3<bool>> {
    match organ {
        Organ::Lung => {
            let mask = lung_mask(host.voxels.index_axis(Axis(0), 0));
            let s = host.geometry.spacing();
            let ml = mask.iter().filter(|v| **v).count() as f64 * s[0] * s[1] * s[2] / 1000.0;
            if ml < MIN_LUNG_ML {
                return Err(Error::Unsupported {
                    path: host.info.path.clone(),
                    reason: format!(
                        "organ = \"lung\" found only {ml:.0} ml of lung (HU < -500 inside the body); \
                         it needs a chest CT, or give a lung label map as mask:PATH=LABELS"
                    ),
                });
            }
            Ok(mask)
        }
        Organ::Mask { path, select } => {
            let m = crate::io::read_volume(path, None)?;
            if m.geometry
                .max_affine_difference(&host.geometry)
                .is_none_or(|d| d > 1e-3)
            {
                return Err(Error::Unsupported {
                    path: path.clone(),
                    reason: format!(
                        "the organ mask is not on the host's grid ({})",
                        host.info.path.display()
                    ),
                });
            }
            let mask = m.voxels.index_axis(Axis(0), 0).mapv(|v| select.test(v));
            if !mask.iter().any(|v| *v) {
                return Err(Error::Unsupported {
                    path: path.clone(),
                    reason: format!("the organ mask selects no voxel ({select:?})"),
                });
            }
            Ok(mask)
        }
    }
}

fn lognormal_diameter(config: &SynthConfig, rng: &mut impl Rng) -> f64 {
    let normal = rand_distr::Normal::new(
        config.diameter_median_mm.ln(),
        config.diameter_sigma.max(1e-6),
    )
    .expect("finite parameters");
    let [lo, hi] = config.diameter_range_mm;
    rng.sample(normal).exp().clamp(lo, hi)
}

/// Mean host intensity in the 5×5×5 voxels around a world point (MR contrast is relative to it).
fn local_tissue(scan: &Volume, centre: [f64; 3]) -> f64 {
    let Some(p) = scan.geometry.world_to_voxel(centre) else {
        return 0.0;
    };
    let channel = scan.voxels.index_axis(Axis(0), 0);
    let (nk, nj, ni) = channel.dim();
    let at = |x: f64, n: usize| (x.round().max(0.0) as usize).min(n - 1);
    let (ci, cj, ck) = (at(p[0], ni), at(p[1], nj), at(p[2], nk));
    let region = channel.slice(ndarray::s![
        ck.saturating_sub(2)..(ck + 3).min(nk),
        cj.saturating_sub(2)..(cj + 3).min(nj),
        ci.saturating_sub(2)..(ci + 3).min(ni)
    ]);
    region.iter().map(|v| *v as f64).sum::<f64>() / region.len().max(1) as f64
}

/// A contrast drawn from `range`: CT in HU directly; MR as a share of the local tissue.
fn contrast(config: &SynthConfig, range: [f64; 2], local: f64, rng: &mut impl Rng) -> f64 {
    let [lo, hi] = range;
    let d = rng.random_range(lo..=hi.max(lo));
    if config.lesion == LesionKind::LungNodule {
        d
    } else {
        d * local.abs().max(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_are_filled_but_not_open_dents() {
        // A hollow 5³ cube (a 1-voxel shell around a 3³ cavity) inside a 7³ grid.
        let mut m = Array3::from_elem((7, 7, 7), false);
        for ((k, j, i), v) in m.indexed_iter_mut() {
            let shell = [k, j, i].iter().all(|x| (1..=5).contains(x));
            let cavity = [k, j, i].iter().all(|x| (2..=4).contains(x));
            *v = shell && !cavity;
        }
        let filled = fill_holes(&m);
        assert_eq!(filled.iter().filter(|v| **v).count(), 125);
        // A channel from the cavity to the outside: nothing is enclosed any more.
        let mut open = m.clone();
        open[[3, 3, 5]] = false;
        assert_eq!(fill_holes(&open), open);
    }
}
