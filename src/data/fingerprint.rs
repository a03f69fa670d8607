//! A dataset's fingerprint (nnU-Net v2's `DatasetFingerprintExtractor`, plus lesion statistics):
//! per case its spacing, shape and labelled volume; per channel its modality and intensities under
//! the labels; per class its volumes and connected components. `medseg plan` derives a training
//! config from it. Computed once and cached, keyed by the files it read.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::dataset::{label_onto_image, source_key, LabelMap, SpatialPlan};
use super::manifest::{CaseEntry, Manifest};
use crate::config::DataConfig;
use crate::error::{Error, Result};
use crate::io;
use crate::transforms::intensity::{mean_std, percentiles};
use crate::transforms::post::connected_components;

/// Foreground intensities kept per case (evenly strided), as nnU-Net samples 10,000.
const SAMPLES_PER_CASE: usize = 10_000;

/// What a channel holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Modality {
    /// Hounsfield units: fixed meaning across scans.
    Ct,
    /// MR of any contrast: arbitrary units per scan.
    Mr,
    /// Anything else (PET, ultrasound, a derived map).
    Other,
}

impl Modality {
    /// From a channel name (`dataset.json`'s `channel_names`, a DICOM Modality): `CT`; `MR`, `MRI`,
    /// or an MR contrast (`T1`, `T1c`, `T2`, `FLAIR`, `PD`, `DWI`, `ADC`); else other.
    pub fn of(name: &str) -> Modality {
        let n = name.trim().to_ascii_lowercase();
        let mr = [
            "mr", "mri", "t1", "t2", "flair", "pd", "dwi", "adc", "swi", "tof",
        ];
        if n == "ct" || n.starts_with("ct ") || n.starts_with("ct_") {
            Modality::Ct
        } else if mr.iter().any(|m| n == *m || n.starts_with(m)) {
            Modality::Mr
        } else {
            Modality::Other
        }
    }
}

/// One case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseFingerprint {
    /// Case id.
    pub id: String,
    /// Voxel spacing after reorientation, mm, `[x, y, z]` (voxel axis order).
    pub spacing: [f64; 3],
    /// Grid after reorientation, voxels, same order.
    pub shape: [usize; 3],
    /// Labelled (non-background) voxels, and their volume in mm³.
    pub foreground_voxels: usize,
    /// See `foreground_voxels`.
    pub foreground_mm3: f64,
}

/// Summary numbers of a sample.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Distribution {
    /// Values summarised.
    pub count: usize,
    /// Smallest.
    pub min: f64,
    /// 0.5th, 5th, 50th, 95th and 99.5th percentiles.
    pub p00_5: f64,
    /// See `p00_5`.
    pub p05: f64,
    /// See `p00_5`.
    pub p50: f64,
    /// See `p00_5`.
    pub p95: f64,
    /// See `p00_5`.
    pub p99_5: f64,
    /// Largest.
    pub max: f64,
    /// Mean and standard deviation.
    pub mean: f64,
    /// See `mean`.
    pub std: f64,
}

impl Distribution {
    /// Of `values` (empty: all zero).
    pub fn of(values: &[f32]) -> Distribution {
        if values.is_empty() {
            return Distribution::default();
        }
        let p = percentiles(values, &[0.0, 0.5, 5.0, 50.0, 95.0, 99.5, 100.0]);
        let (mean, std) = mean_std(values);
        Distribution {
            count: values.len(),
            min: p[0] as f64,
            p00_5: p[1] as f64,
            p05: p[2] as f64,
            p50: p[3] as f64,
            p95: p[4] as f64,
            p99_5: p[5] as f64,
            max: p[6] as f64,
            mean: mean as f64,
            std: std as f64,
        }
    }
}

/// One input channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChannelFingerprint {
    /// Its name.
    pub name: String,
    /// From the name.
    pub modality: Modality,
    /// Intensities under the labels, sampled over every case with each class weighted equally,
    /// so a large organ does not set a window its lesions fall outside.
    pub foreground: Distribution,
    /// Intensities under each foreground class, class 1 first.
    pub classes: Vec<Distribution>,
}

/// One foreground class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassFingerprint {
    /// Class name.
    pub name: String,
    /// Cases holding it.
    pub cases: usize,
    /// Its volume per case holding it, mm³.
    pub volume_mm3: Distribution,
    /// Connected components (26-connected) per case, over every case.
    pub components_per_case: Distribution,
    /// Each component's volume, mm³ (lesion sizes).
    pub component_mm3: Distribution,
    /// Each component's equivalent-sphere diameter, mm.
    pub component_diameter_mm: Distribution,
    /// Per case holding it: the largest component's share of the class's volume (near 1 for an
    /// organ in one piece, whatever specks the labelling left).
    pub largest_share: Distribution,
}

/// The dataset's fingerprint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// The manifest read.
    pub manifest: PathBuf,
    /// A hash of every file read (paths, sizes, modification times): the cache key.
    pub key: String,
    /// Per case.
    pub cases: Vec<CaseFingerprint>,
    /// Per channel.
    pub channels: Vec<ChannelFingerprint>,
    /// Per foreground class, class 1 first.
    pub classes: Vec<ClassFingerprint>,
}

/// What one case contributes, before aggregation.
struct CaseSample {
    case: CaseFingerprint,
    /// Per channel, per foreground class.
    intensities: Vec<Vec<Vec<f32>>>,
    /// Per class: component volumes, mm³.
    components: Vec<Vec<f64>>,
}

/// The manifest `data` names, with channel and class names (the config's, else the manifest's).
pub fn read_manifest(data: &DataConfig) -> Result<(PathBuf, Manifest)> {
    let (path, mut m) = super::dataset::read_manifest(data)?;
    if !data.channels.is_empty() {
        m.channels = data.channels.clone();
    }
    if !data.labels.is_empty() {
        m.labels = data.labels.clone();
    }
    if m.labels.len() < 2 || m.channels.is_empty() {
        return Err(Error::Config {
            reason: format!(
                "{}: channel and class names (background first) are needed, in the manifest or [data]",
                path.display()
            ),
        });
    }
    Ok((path, m))
}

/// The fingerprint of `data`'s labelled cases, from `cache_dir` when the same files were
/// fingerprinted before.
pub fn fingerprint(
    data: &DataConfig,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<Fingerprint> {
    let (path, m) = read_manifest(data)?;
    let cases: Vec<&CaseEntry> = m.cases.iter().filter(|c| c.label.is_some()).collect();
    if cases.is_empty() {
        return Err(Error::NothingFound {
            path,
            detail: " (no labelled case to fingerprint)".into(),
        });
    }
    let mut h = Sha256::new();
    h.update(path.to_string_lossy().as_bytes());
    h.update(format!("{:?}{:?}", m.labels, data.label_values).as_bytes());
    for c in &cases {
        h.update(source_key(c).as_bytes());
    }
    let key: String = h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let cached = data.cache_dir.join(format!("fingerprint-{key}.json"));
    if let Ok(f) = io::read_json::<Fingerprint>(&cached) {
        return Ok(f);
    }
    let labels = LabelMap::new(m.labels.len(), &data.label_values);
    let done = std::sync::atomic::AtomicUsize::new(0);
    progress(0, cases.len());
    let samples: Vec<Result<CaseSample>> = cases
        .par_iter()
        .map(|c| {
            let s = sample_case(c, m.labels.len(), &labels);
            let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            progress(n, cases.len());
            s
        })
        .collect();
    let mut problems = Vec::new();
    let samples: Vec<CaseSample> = samples
        .into_iter()
        .filter_map(|s| s.map_err(|e| problems.push(e.to_string())).ok())
        .collect();
    if !problems.is_empty() {
        return Err(Error::Dataset { path, problems });
    }
    let f = aggregate(path, key, &m, samples);
    std::fs::create_dir_all(&data.cache_dir).map_err(|e| Error::io(&data.cache_dir, e))?;
    io::write_json_atomically(&cached, &f)?;
    Ok(f)
}

/// Reads one case at its own (reoriented) resolution.
fn sample_case(entry: &CaseEntry, classes: usize, labels: &LabelMap) -> Result<CaseSample> {
    let case_err = |e: Error| Error::Case {
        case: entry.id.clone(),
        reason: e.to_string(),
    };
    let scan = io::read_channels(&entry.images, 1e-3).map_err(case_err)?;
    let label_path = entry.label.as_deref().unwrap_or(Path::new(""));
    let label = io::read_volume(label_path, None).map_err(case_err)?;
    let oriented = SpatialPlan {
        spacing: [1.0; 3],
        reorient: true,
        crop_to_nonzero: false,
    }
    .oriented(&scan.geometry);
    let voxel_mm3: f64 = scan.geometry.spacing().iter().product();
    let mut mapped = ndarray::Array3::<u8>::zeros(label.geometry.shape());
    for (out, v) in mapped.iter_mut().zip(label.voxels.iter()) {
        *out = labels.class_of(*v).map_err(|reason| Error::Case {
            case: entry.id.clone(),
            reason: format!("{}: {reason}", label_path.display()),
        })?;
    }
    let on_image = label_onto_image(mapped, &label.geometry, &scan.geometry).map_err(|reason| {
        Error::Case {
            case: entry.id.clone(),
            reason: format!("{}: {reason}", label_path.display()),
        }
    })?;
    let class_of: Vec<u8> = on_image.iter().copied().collect();
    let foreground = class_of.iter().filter(|c| **c > 0).count();
    // Up to SAMPLES_PER_CASE per class, evenly strided.
    let counts: Vec<usize> = (1..classes as u8)
        .map(|k| class_of.iter().filter(|c| **c == k).count())
        .collect();
    let intensities = (0..scan.voxels.dim().0)
        .map(|ch| {
            let image = scan.voxels.index_axis(ndarray::Axis(0), ch);
            (1..classes as u8)
                .map(|k| {
                    let stride = counts[k as usize - 1].div_ceil(SAMPLES_PER_CASE).max(1);
                    image
                        .iter()
                        .zip(&class_of)
                        .filter(|(_, c)| **c == k)
                        .map(|(v, _)| *v)
                        .step_by(stride)
                        .collect()
                })
                .collect()
        })
        .collect();
    let dims = scan.geometry.shape();
    let components = (1..classes as u8)
        .map(|class| {
            let mask: Vec<bool> = class_of.iter().map(|c| *c == class).collect();
            connected_components(&mask, dims)
                .sizes
                .iter()
                .map(|n| *n as f64 * voxel_mm3)
                .collect()
        })
        .collect();
    Ok(CaseSample {
        case: CaseFingerprint {
            id: entry.id.clone(),
            spacing: oriented.spacing(),
            shape: oriented.dims,
            foreground_voxels: foreground,
            foreground_mm3: foreground as f64 * voxel_mm3,
        },
        intensities,
        components,
    })
}

fn aggregate(
    manifest: PathBuf,
    key: String,
    m: &Manifest,
    samples: Vec<CaseSample>,
) -> Fingerprint {
    let channels = m
        .channels
        .iter()
        .enumerate()
        .map(|(ch, name)| {
            let per_class: Vec<Vec<f32>> = (0..m.labels.len().saturating_sub(1))
                .map(|k| {
                    samples
                        .iter()
                        .flat_map(|s| {
                            s.intensities
                                .get(ch)
                                .and_then(|c| c.get(k))
                                .cloned()
                                .unwrap_or_default()
                        })
                        .collect()
                })
                .collect();
            // Each class thinned to the smallest class's count, then pooled.
            let n = per_class
                .iter()
                .map(Vec::len)
                .filter(|n| *n > 0)
                .min()
                .unwrap_or(0);
            let pooled: Vec<f32> = per_class
                .iter()
                .filter(|v| !v.is_empty())
                .flat_map(|v| {
                    let stride = v.len() as f64 / n as f64;
                    (0..n).map(move |i| v[(i as f64 * stride) as usize])
                })
                .collect();
            ChannelFingerprint {
                name: name.clone(),
                modality: Modality::of(name),
                foreground: Distribution::of(&pooled),
                classes: per_class.iter().map(|v| Distribution::of(v)).collect(),
            }
        })
        .collect();
    let f32s = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
    let classes = (1..m.labels.len())
        .map(|c| {
            let per_case = |s: &CaseSample| s.components.get(c - 1).cloned().unwrap_or_default();
            let sizes: Vec<f64> = samples.iter().flat_map(per_case).collect();
            let volumes: Vec<f64> = samples
                .iter()
                .map(|s| per_case(s).iter().sum::<f64>())
                .filter(|v| *v > 0.0)
                .collect();
            let shares: Vec<f64> = samples
                .iter()
                .map(per_case)
                .filter(|v| !v.is_empty())
                .map(|v| v.iter().copied().fold(0.0, f64::max) / v.iter().sum::<f64>())
                .collect();
            let diameters = sizes
                .iter()
                .map(|v| (6.0 * v / std::f64::consts::PI).cbrt())
                .collect();
            ClassFingerprint {
                name: m.labels[c].clone(),
                cases: volumes.len(),
                volume_mm3: Distribution::of(&f32s(volumes)),
                components_per_case: Distribution::of(&f32s(
                    samples.iter().map(|s| per_case(s).len() as f64).collect(),
                )),
                component_mm3: Distribution::of(&f32s(sizes)),
                component_diameter_mm: Distribution::of(&f32s(diameters)),
                largest_share: Distribution::of(&f32s(shares)),
            }
        })
        .collect();
    Fingerprint {
        manifest,
        key,
        cases: samples.into_iter().map(|s| s.case).collect(),
        channels,
        classes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modality_from_channel_names() {
        assert_eq!(Modality::of("CT"), Modality::Ct);
        for mr in ["MR", "T1", "t1c", "FLAIR", "T2w", "ADC"] {
            assert_eq!(Modality::of(mr), Modality::Mr, "{mr}");
        }
        assert_eq!(Modality::of("PET"), Modality::Other);
    }

    #[test]
    fn distribution_percentiles() {
        let v: Vec<f32> = (0..=100).map(|x| x as f32).collect();
        let d = Distribution::of(&v);
        assert_eq!((d.min, d.p50, d.max, d.count), (0.0, 50.0, 100.0, 101));
        assert!((d.p05 - 5.0).abs() < 1e-9 && (d.mean - 50.0).abs() < 1e-9);
    }

    #[test]
    fn a_large_organ_does_not_set_the_intensity_window_alone() {
        // The lung (class 1) outnumbers the nodules (class 2) a hundred to one.
        let m = Manifest {
            cases: Vec::new(),
            channels: vec!["CT".into()],
            labels: vec!["background".into(), "lung".into(), "nodule".into()],
        };
        let sample = CaseSample {
            case: CaseFingerprint {
                id: "c".into(),
                spacing: [1.0; 3],
                shape: [1; 3],
                foreground_voxels: 0,
                foreground_mm3: 0.0,
            },
            intensities: vec![vec![vec![-800.0; 10_000], vec![50.0; 100]]],
            components: vec![Vec::new(), Vec::new()],
        };
        let f = aggregate("m".into(), "k".into(), &m, vec![sample]);
        let ch = &f.channels[0];
        assert_eq!((ch.foreground.p00_5, ch.foreground.p99_5), (-800.0, 50.0));
        assert_eq!(ch.classes[0].count, 10_000);
        assert_eq!(ch.classes[1].p50, 50.0);
    }
}
