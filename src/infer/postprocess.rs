//! Label maps → lesion instances: 3D connected components with 26-connectivity, small-component
//! removal, keep-largest for organs, and per-lesion measurements in millimetres.

use ndarray::Array3;

use rayon::prelude::*;

use super::uncertainty::VoxelUncertainty;
use crate::config::{class_values, MinConfidence, MinConfidenceChoice, SegmentConfig};
use crate::error::Result;
use crate::geometry::Geometry;
pub use crate::io::layout::{Lesion, RoiSummary};
use crate::transforms::post::{connected_components, dilate_mm};

/// What to remove from a label map before measuring its lesions.
#[derive(Debug, Clone, Default)]
pub struct LesionFilter {
    /// Components smaller than this (mm³) become background.
    pub min_volume_mm3: f64,
    /// Classes (organs) of which only the largest component is kept.
    pub keep_largest: Vec<u32>,
    /// The region-of-interest stage, when on.
    pub roi: Option<RoiFilter>,
    /// Findings (classes neither in the region of interest nor in `keep_largest`) whose highest
    /// probability is below this become background (0 keeps all).
    pub min_confidence: f64,
    /// Leave each lesion's Feret diameter at 0: the searches that only count lesions skip it (on
    /// an organ's surface it costs more than the rest of the filter).
    pub skip_diameters: bool,
}

impl LesionFilter {
    /// The `[segment]` settings' filter for a model of classes `labels` (background first), class
    /// names resolved.
    pub fn from_config(segment: &SegmentConfig, labels: &[String]) -> Result<LesionFilter> {
        let resolve = |key: &str, names: &[String]| class_values(labels, key, names);
        let roi = match &segment.roi {
            Some(roi) => Some(RoiFilter {
                classes: resolve("segment.roi.classes", &roi.classes)?,
                names: roi.classes.clone(),
                margin_mm: roi.margin_mm,
                drop_outside: roi.drop_outside,
            }),
            None => None,
        };
        Ok(LesionFilter {
            min_volume_mm3: segment.min_lesion_mm3,
            keep_largest: resolve("segment.keep_largest", &segment.keep_largest)?,
            roi,
            // "fitted" is the checkpoint's, which the predictor sets.
            min_confidence: match segment.min_confidence {
                MinConfidence::Value(c) => c,
                MinConfidence::Named(MinConfidenceChoice::Fitted) => 0.0,
            },
            skip_diameters: false,
        })
    }
}

/// Lesions of other classes must reach these classes' voxels, dilated by `margin_mm`.
#[derive(Debug, Clone, Default)]
pub struct RoiFilter {
    /// Label values of the region's classes.
    pub classes: Vec<u32>,
    /// Their names, for the record.
    pub names: Vec<String>,
    /// Dilation of the region, mm (a box of that half-width along each axis).
    pub margin_mm: f64,
    /// Remove lesions outside (else only flag them).
    pub drop_outside: bool,
}

/// What lesion extraction reads of the model at one voxel.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Probe {
    /// The class's probability.
    pub probability: f32,
    /// With ensemble members: their uncertainty for the class.
    pub uncertainty: Option<VoxelUncertainty>,
}

/// The lesions of a label map and what the region-of-interest stage did.
#[derive(Debug, Clone, Default)]
pub struct Extracted {
    /// One per kept component, numbered from 1.
    pub lesions: Vec<Lesion>,
    /// The region-of-interest stage's record, when it ran.
    pub roi: Option<RoiSummary>,
    /// Findings removed for a confidence below the filter's `min_confidence`.
    pub below_confidence: usize,
}

/// Per component: removes what `filter` asks for (in place) and measures the rest.
/// `labels` is `[k, j, i]` on `geometry`; `probe(class, [k, j, i])` gives the model's probability
/// of that class at a voxel and, from `members` ensemble members (0 = none), its uncertainty. The
/// region-of-interest classes are cleaned first (so `keep_largest` applies to the organ before it
/// bounds the lesions); a lesion is inside when any of its voxels lies in the dilated region. An
/// empty region drops nothing. Rows are numbered by decreasing confidence.
pub fn extract_lesions(
    labels: &mut Array3<u8>,
    geometry: &Geometry,
    names: &[String],
    filter: &LesionFilter,
    members: usize,
    probe: impl Fn(u32, [usize; 3]) -> Probe,
) -> Extracted {
    let probe = Prober { members, probe };
    let classes = labels.iter().copied().max().unwrap_or(0) as u32;
    let roi_classes: Vec<u32> = filter.roi.iter().flat_map(|r| r.classes.clone()).collect();
    let (first, rest): (Vec<u32>, Vec<u32>) = (1..=classes).partition(|c| roi_classes.contains(c));
    let mut out = Extracted::default();
    for &class in &first {
        out.below_confidence += extract_class(
            labels,
            geometry,
            names,
            filter,
            class,
            None,
            &probe,
            &mut out.lesions,
        )
        .below_confidence;
    }
    let region = filter.roi.as_ref().map(|roi| {
        let mask: Vec<bool> = labels
            .iter()
            .map(|l| roi.classes.contains(&(*l as u32)))
            .collect();
        let voxels = mask.iter().filter(|v| **v).count();
        let (nk, nj, ni) = labels.dim();
        let spacing = geometry.array_spacing();
        let dilated = dilate_mm(&mask, [nk, nj, ni], spacing, roi.margin_mm);
        out.roi = Some(RoiSummary {
            classes: roi.names.clone(),
            margin_mm: roi.margin_mm,
            voxels,
            removed_outside: 0,
        });
        (voxels > 0).then_some((dilated, roi.drop_outside))
    });
    let region = region.flatten();
    for &class in &rest {
        let removed = extract_class(
            labels,
            geometry,
            names,
            filter,
            class,
            region.as_ref().map(|(mask, drop)| (mask.as_slice(), *drop)),
            &probe,
            &mut out.lesions,
        );
        out.below_confidence += removed.below_confidence;
        if let Some(summary) = &mut out.roi {
            summary.removed_outside += removed.outside;
        }
    }
    // Most confident first (ties keep raster order), numbered in that order.
    out.lesions.sort_by(|a, b| {
        b.confidence
            .unwrap_or(0.0)
            .total_cmp(&a.confidence.unwrap_or(0.0))
    });
    for (n, l) in out.lesions.iter_mut().enumerate() {
        l.id = n + 1;
    }
    out
}

/// The model's read-out at a voxel, with the ensemble size.
struct Prober<F> {
    members: usize,
    probe: F,
}

/// Per-lesion sums of what [`Probe`] reads.
#[derive(Debug, Clone, Copy, Default)]
struct LesionSums {
    probability: f64,
    max_probability: f32,
    entropy: f64,
    std: f64,
    detected_by: u64,
}

impl LesionSums {
    /// A sum's mean over the lesion's `size` voxels, when there are ensemble members.
    fn per_voxel(sum: f64, size: usize, members: usize) -> Option<f64> {
        (members > 0).then(|| sum / size as f64)
    }

    /// The share of `members` that detected the lesion.
    fn agreement(&self, members: usize) -> Option<f64> {
        (members > 0).then(|| self.detected_by.count_ones() as f64 / members as f64)
    }

    fn add(&mut self, p: Probe) {
        self.probability += p.probability as f64;
        self.max_probability = self.max_probability.max(p.probability);
        if let Some(u) = p.uncertainty {
            self.entropy += u.entropy as f64;
            self.std += u.std as f64;
            self.detected_by |= u.detected_by;
        }
    }
}

/// What [`extract_class`] removed, by reason.
struct Removed {
    /// Lesions outside the region of interest.
    outside: usize,
    /// Findings below the confidence asked for.
    below_confidence: usize,
}

/// Filters and measures the components of one class, appending to `lesions`; `region` is the
/// dilated region of interest over the whole grid and whether to drop lesions outside it.
#[allow(clippy::too_many_arguments)] // one class of extract_lesions: its inputs plus the region
fn extract_class(
    labels: &mut Array3<u8>,
    geometry: &Geometry,
    names: &[String],
    filter: &LesionFilter,
    class: u32,
    region: Option<(&[bool], bool)>,
    probe: &Prober<impl Fn(u32, [usize; 3]) -> Probe>,
    lesions: &mut Vec<Lesion>,
) -> Removed {
    let (_, nj, ni) = labels.dim();
    let voxel_mm3 = voxel_volume(geometry);
    // Components are found inside the class's bounding box only: lesions are small next to a
    // CT-sized grid, and the id map is 4 bytes per voxel of the box.
    let Some([bk, bj, bi]) = class_box(labels, class as u8) else {
        return Removed {
            outside: 0,
            below_confidence: 0,
        };
    };
    let box_dims = [bk.len(), bj.len(), bi.len()];
    let [bnk, bnj, bni] = box_dims;
    let mask: Vec<bool> = labels
        .slice(ndarray::s![bk.clone(), bj.clone(), bi.clone()])
        .iter()
        .map(|l| *l as u32 == class)
        .collect();
    let cc = connected_components(&mask, box_dims);
    drop(mask);
    let n = cc.count();
    let full_index = |bz: usize, by: usize, bx: usize| {
        ((bz + bk.start) * nj + by + bj.start) * ni + bx + bi.start
    };
    let inside = match region {
        Some((region, _)) => reaching(&cc, box_dims, |bz, by, bx| region[full_index(bz, by, bx)]),
        None => vec![false; n],
    };
    let largest = (0..n).max_by_key(|&c| (cc.sizes[c], std::cmp::Reverse(c)));
    let drop_outside = region.is_some_and(|(_, drop)| drop);
    let big: Vec<bool> = (0..n)
        .map(|c| cc.sizes[c] as f64 * voxel_mm3 >= filter.min_volume_mm3)
        .collect();
    let largest_ok = |c| !filter.keep_largest.contains(&class) || Some(c) == largest;
    let keep: Vec<bool> = (0..n)
        .map(|c| big[c] && largest_ok(c) && (inside[c] || !drop_outside))
        .collect();
    let removed = (0..n)
        .filter(|&c| drop_outside && big[c] && !inside[c])
        .count();
    // Accumulate each kept component's statistics in one raster pass over the box.
    let mut sum = vec![[0.0f64; 3]; n];
    let mut read = vec![LesionSums::default(); n];
    let mut surface: Vec<Vec<[usize; 3]>> = vec![Vec::new(); n];
    let id_at = |k: isize, j: isize, i: isize| -> u32 {
        if k < 0 || j < 0 || i < 0 || k as usize >= bnk || j as usize >= bnj || i as usize >= bni {
            0
        } else {
            cc.labels[(k as usize * bnj + j as usize) * bni + i as usize]
        }
    };
    let data = labels.as_slice_mut().expect("standard layout");
    for bz in 0..bnk {
        for by in 0..bnj {
            for bx in 0..bni {
                let id = cc.labels[(bz * bnj + by) * bni + bx] as usize;
                if id == 0 {
                    continue;
                }
                let (k, j, i) = (bz + bk.start, by + bj.start, bx + bi.start);
                let c = id - 1;
                if !keep[c] {
                    data[full_index(bz, by, bx)] = 0;
                    continue;
                }
                for (a, x) in [i, j, k].into_iter().enumerate() {
                    sum[c][a] += x as f64;
                }
                read[c].add((probe.probe)(class, [k, j, i]));
                let (z, y, x) = (bz as isize, by as isize, bx as isize);
                let me = id as u32;
                let on_surface = id_at(z - 1, y, x) != me
                    || id_at(z + 1, y, x) != me
                    || id_at(z, y - 1, x) != me
                    || id_at(z, y + 1, x) != me
                    || id_at(z, y, x - 1) != me
                    || id_at(z, y, x + 1) != me;
                if on_surface {
                    surface[c].push([i, j, k]);
                }
            }
        }
    }
    // A finding's confidence is known after the pass; the unconfident ones are cleared after.
    let finding = !filter.keep_largest.contains(&class)
        && filter
            .roi
            .as_ref()
            .is_none_or(|r| !r.classes.contains(&class));
    let unconfident: Vec<bool> = (0..n)
        .map(|c| finding && keep[c] && (read[c].max_probability as f64) < filter.min_confidence)
        .collect();
    if unconfident.contains(&true) {
        for bz in 0..bnk {
            for by in 0..bnj {
                for bx in 0..bni {
                    let id = cc.labels[(bz * bnj + by) * bni + bx] as usize;
                    if id > 0 && unconfident[id - 1] {
                        data[full_index(bz, by, bx)] = 0;
                    }
                }
            }
        }
    }
    // Component boxes are box-local `[i, j, k]`; shift them onto the full grid.
    let origin = [bi.start, bj.start, bk.start];
    let boxes = cc.boxes(box_dims);
    for c in (0..n).filter(|&c| keep[c] && !unconfident[c]) {
        let size = cc.sizes[c];
        let [lo, hi] = boxes[c].map(|corner| [0, 1, 2].map(|a| corner[a] + origin[a]));
        let mean = [0, 1, 2].map(|a| sum[c][a] / size as f64);
        lesions.push(Lesion {
            id: lesions.len() + 1,
            class,
            label: names
                .get(class as usize)
                .cloned()
                .unwrap_or_else(|| format!("class {class}")),
            voxels: size,
            volume_mm3: size as f64 * voxel_mm3,
            centroid_mm: geometry.voxel_to_world(mean),
            bbox_voxel: [lo, hi],
            bbox_mm: corner_extent(geometry, lo, hi),
            diameter_mm: if filter.skip_diameters {
                0.0
            } else {
                feret_diameter(geometry, &surface[c])
            },
            mean_probability: read[c].probability / size as f64,
            max_probability: read[c].max_probability as f64,
            confidence: Some(read[c].max_probability as f64),
            inside_roi: region.map(|_| inside[c]),
            mean_entropy: LesionSums::per_voxel(read[c].entropy, size, probe.members),
            detection_agreement: read[c].agreement(probe.members),
            probability_std: LesionSums::per_voxel(read[c].std, size, probe.members),
        });
    }
    Removed {
        outside: removed,
        below_confidence: unconfident.iter().filter(|u| **u).count(),
    }
}

/// Per component of `cc` (on a box of `dims`): whether any of its voxels is `in_region`.
fn reaching(
    cc: &crate::transforms::post::Components,
    dims: [usize; 3],
    in_region: impl Fn(usize, usize, usize) -> bool,
) -> Vec<bool> {
    let [bnk, bnj, bni] = dims;
    let mut inside = vec![false; cc.count()];
    for bz in 0..bnk {
        for by in 0..bnj {
            for bx in 0..bni {
                let id = cc.labels[(bz * bnj + by) * bni + bx] as usize;
                if id > 0 && !inside[id - 1] && in_region(bz, by, bx) {
                    inside[id - 1] = true;
                }
            }
        }
    }
    inside
}

/// Bounding box `[k, j, i]` of the voxels of `class`, or `None` when it has none.
fn class_box(labels: &Array3<u8>, class: u8) -> Option<[std::ops::Range<usize>; 3]> {
    let mut lo = [usize::MAX; 3];
    let mut hi = [0usize; 3];
    for ((k, j, i), l) in labels.indexed_iter() {
        if *l == class {
            for (a, x) in [k, j, i].into_iter().enumerate() {
                lo[a] = lo[a].min(x);
                hi[a] = hi[a].max(x + 1);
            }
        }
    }
    (lo[0] != usize::MAX).then(|| [lo[0]..hi[0], lo[1]..hi[1], lo[2]..hi[2]])
}

/// Volume of one voxel, mm³ (|det| of the affine's linear part).
pub fn voxel_volume(g: &Geometry) -> f64 {
    let a = &g.affine;
    (a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1])
        - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
        + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0]))
        .abs()
}

/// World min/max over the 8 corners of a voxel box (voxel centres).
fn corner_extent(g: &Geometry, lo: [usize; 3], hi: [usize; 3]) -> [[f64; 3]; 2] {
    let mut min = [f64::INFINITY; 3];
    let mut max = [f64::NEG_INFINITY; 3];
    for corner in 0..8 {
        let p = [0, 1, 2].map(|a| if corner >> a & 1 == 1 { hi[a] } else { lo[a] } as f64);
        let w = g.voxel_to_world(p);
        for a in 0..3 {
            min[a] = min[a].min(w[a]);
            max[a] = max[a].max(w[a]);
        }
    }
    [min, max]
}

/// Surface points beyond which the diameter is taken over extreme points in many directions.
const EXACT_DIAMETER_POINTS: usize = 1000;

/// Longest distance between two points (world mm). Exact for up to 1,000 surface voxels; above,
/// the candidates are the extreme points along 614 directions (a Fibonacci sphere), whose
/// diameter is within 0.3 % of the true one (the directions are about 8° apart).
fn feret_diameter(g: &Geometry, surface: &[[usize; 3]]) -> f64 {
    let points: Vec<[f64; 3]> = surface
        .iter()
        .map(|p| g.voxel_to_world([p[0] as f64, p[1] as f64, p[2] as f64]))
        .collect();
    let candidates: Vec<[f64; 3]> = if points.len() <= EXACT_DIAMETER_POINTS {
        points
    } else {
        let n = 614;
        let golden = std::f64::consts::PI * (3.0 - 5f64.sqrt());
        (0..n)
            .into_par_iter()
            .flat_map_iter(|d| {
                let z = 1.0 - 2.0 * (d as f64 + 0.5) / n as f64;
                let r = (1.0 - z * z).sqrt();
                let dir = [
                    r * (golden * d as f64).cos(),
                    r * (golden * d as f64).sin(),
                    z,
                ];
                let (mut lo, mut hi) = ((f64::INFINITY, 0), (f64::NEG_INFINITY, 0));
                for (idx, p) in points.iter().enumerate() {
                    let v = p[0] * dir[0] + p[1] * dir[1] + p[2] * dir[2];
                    if v < lo.0 {
                        lo = (v, idx);
                    }
                    if v > hi.0 {
                        hi = (v, idx);
                    }
                }
                [points[lo.1], points[hi.1]]
            })
            .collect()
    };
    let mut best = 0.0f64;
    for (n, a) in candidates.iter().enumerate() {
        for b in &candidates[n + 1..] {
            let d = (a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2);
            best = best.max(d);
        }
    }
    best.sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lesions_are_filtered_and_measured_in_mm() {
        // 2 mm isotropic grid: a 2×2×2 cube (64 mm³) and a single voxel (8 mm³) of class 1, and a
        // 3-voxel row of class 2 next to a 1-voxel speck of class 2.
        let g = Geometry::new(
            [10, 10, 10],
            [
                [2.0, 0.0, 0.0, -5.0],
                [0.0, 2.0, 0.0, 0.0],
                [0.0, 0.0, 2.0, 0.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
        );
        let mut labels = Array3::<u8>::zeros([10, 10, 10]);
        for k in 1..3 {
            for j in 1..3 {
                for i in 1..3 {
                    labels[[k, j, i]] = 1;
                }
            }
        }
        labels[[8, 8, 8]] = 1;
        for i in 5..8 {
            labels[[5, 5, i]] = 2;
        }
        labels[[0, 9, 0]] = 2;
        let names = vec!["background".into(), "nodule".into(), "organ".into()];
        let filter = LesionFilter {
            min_volume_mm3: 10.0,
            keep_largest: vec![2],
            roi: None,
            min_confidence: 0.0,
            skip_diameters: false,
        };
        let original = labels.clone();
        let lesions = extract_lesions(&mut labels, &g, &names, &filter, 0, |c, _| Probe {
            probability: c as f32 / 4.0,
            uncertainty: None,
        })
        .lesions;
        // Without diameters (the searches' filter): the same map and lesions, diameters 0.
        let mut counted = original;
        let quick = LesionFilter {
            skip_diameters: true,
            ..filter.clone()
        };
        let without = extract_lesions(&mut counted, &g, &names, &quick, 0, |c, _| Probe {
            probability: c as f32 / 4.0,
            uncertainty: None,
        })
        .lesions;
        assert_eq!(counted, labels);
        assert_eq!(without.len(), lesions.len());
        for (a, b) in without.iter().zip(&lesions) {
            assert_eq!(
                (a.class, a.voxels, a.bbox_voxel),
                (b.class, b.voxels, b.bbox_voxel)
            );
            assert_eq!((a.confidence, a.diameter_mm), (b.confidence, 0.0));
        }
        assert_eq!(lesions.len(), 2);
        // Numbered by confidence: the organ (0.5) before the cube (0.25).
        assert_eq!((lesions[0].id, lesions[0].class), (1, 2));
        let cube = &lesions[1];
        assert_eq!((cube.class, cube.voxels, cube.volume_mm3), (1, 8, 64.0));
        assert_eq!(cube.bbox_voxel, [[1, 1, 1], [2, 2, 2]]);
        assert_eq!(cube.centroid_mm, [-5.0 + 3.0, 3.0, 3.0]);
        // Opposite corners of the 2×2×2 cube of 2 mm voxels: √(3 · 2²).
        assert!((cube.diameter_mm - 12f64.sqrt()).abs() < 1e-12);
        assert_eq!((cube.max_probability, cube.confidence), (0.25, Some(0.25)));
        let organ = &lesions[0];
        assert_eq!((organ.class, organ.voxels, organ.diameter_mm), (2, 3, 4.0));
        // The small voxel and the smaller organ piece were removed from the map.
        assert_eq!(labels[[8, 8, 8]], 0);
        assert_eq!(labels[[0, 9, 0]], 0);
        assert_eq!(labels.iter().filter(|l| **l > 0).count(), 11);
    }

    #[test]
    fn findings_below_the_confidence_asked_for_are_removed_and_counted() {
        let g = Geometry::new([12, 12, 12], crate::geometry::IDENTITY);
        let mut labels = Array3::<u8>::zeros([12, 12, 12]);
        // Three class-1 findings along i, whose peak probabilities are 0.9, 0.6 and 0.4 (one
        // voxel of each reaches the peak), and an organ (class 2) the model is unsure of.
        for i in [1usize, 5, 9] {
            for k in 1..3 {
                labels[[k, 1, i]] = 1;
            }
        }
        for k in 6..10 {
            labels[[k, 8, 8]] = 2;
        }
        let peak = |i: usize| match i {
            1 => 0.9,
            5 => 0.6,
            _ => 0.4,
        };
        let probe = |c: u32, [k, _, i]: [usize; 3]| Probe {
            probability: if c == 2 {
                0.3
            } else if k == 1 {
                peak(i)
            } else {
                0.2
            },
            uncertainty: None,
        };
        let names = vec!["background".into(), "lesion".into(), "organ".into()];
        for (min_confidence, kept) in [(0.0, 3), (0.5, 2), (0.6, 2), (0.61, 1), (0.95, 0)] {
            let mut map = labels.clone();
            let filter = LesionFilter {
                keep_largest: vec![2],
                min_confidence,
                ..LesionFilter::default()
            };
            let out = extract_lesions(&mut map, &g, &names, &filter, 0, probe);
            let found: Vec<_> = out.lesions.iter().filter(|l| l.class == 1).collect();
            assert_eq!(found.len(), kept, "min_confidence {min_confidence}");
            assert_eq!(out.below_confidence, 3 - kept);
            assert!(found.iter().all(|l| l.max_probability >= min_confidence));
            // Removed findings are gone from the map; the organ stays whatever its probability.
            let voxels = map.iter().filter(|l| **l == 1).count();
            assert_eq!(voxels, 2 * kept);
            assert_eq!(map.iter().filter(|l| **l == 2).count(), 4);
            assert!(out.lesions.iter().any(|l| l.class == 2));
        }
    }

    #[test]
    fn the_roi_filter_drops_exactly_the_lesions_outside_the_dilated_region() {
        // 1 × 1 × 2 mm voxels ([i, j, k]), a 30 × 30 × 15 grid. The organ (class 2) is a box
        // i, j in 10..20, k in 5..10, plus a stray organ voxel far away (removed by keep_largest
        // before it can count as region). Margin 3 mm: 3 voxels along i and j, 1 along k.
        let g = Geometry::new(
            [30, 30, 15],
            [
                [1.0, 0.0, 0.0, 0.0],
                [0.0, 1.0, 0.0, 0.0],
                [0.0, 0.0, 2.0, 0.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
        );
        let mut labels = Array3::<u8>::zeros([15, 30, 30]);
        labels.slice_mut(ndarray::s![5..10, 10..20, 10..20]).fill(2);
        labels[[0, 0, 29]] = 2;
        // Lesions (class 1), single voxels [k, j, i] in raster order (the order of their rows),
        // none touching another.
        let cases = [
            ([0, 1, 28], false),   // beside the stray organ voxel, which keep_largest removed
            ([7, 12, 23], false),  // 4 mm past the organ's edge along i
            ([7, 15, 15], true),   // inside the organ
            ([7, 17, 22], true),   // 3 mm past along i: inside the margin
            ([10, 17, 17], true),  // one 2 mm slice past along k: inside
            ([11, 12, 12], false), // two slices (4 mm) past along k
        ];
        for (at, _) in &cases {
            labels[*at] = 1;
        }
        let names = vec!["background".into(), "lesion".into(), "brain".into()];
        let roi = |drop_outside| RoiFilter {
            classes: vec![2],
            names: vec!["brain".into()],
            margin_mm: 3.0,
            drop_outside,
        };
        let filter = |drop| LesionFilter {
            min_volume_mm3: 0.0,
            keep_largest: vec![2],
            roi: Some(roi(drop)),
            min_confidence: 0.0,
            skip_diameters: false,
        };
        let one = |_: u32, _: [usize; 3]| Probe {
            probability: 1.0,
            uncertainty: None,
        };
        // Flagging only: every lesion kept, each flagged as expected; the organ row has no flag.
        let mut flagged = labels.clone();
        let out = extract_lesions(&mut flagged, &g, &names, &filter(false), 0, one);
        let lesions: Vec<_> = out.lesions.iter().filter(|l| l.class == 1).collect();
        assert_eq!(lesions.len(), cases.len());
        for (l, (at, inside)) in lesions.iter().zip(&cases) {
            let [i, j, k] = l.bbox_voxel[0];
            assert_eq!([k, j, i], *at);
            assert_eq!(l.inside_roi, Some(*inside), "lesion at {at:?}");
        }
        assert!(out
            .lesions
            .iter()
            .filter(|l| l.class == 2)
            .all(|l| l.inside_roi.is_none()));
        assert_eq!(out.roi.as_ref().unwrap().removed_outside, 0);
        // Dropping: exactly the outside ones leave the table and the mask.
        let out = extract_lesions(&mut labels, &g, &names, &filter(true), 0, one);
        let kept: Vec<[usize; 3]> = out
            .lesions
            .iter()
            .filter(|l| l.class == 1)
            .map(|l| {
                let [i, j, k] = l.bbox_voxel[0];
                [k, j, i]
            })
            .collect();
        let want: Vec<[usize; 3]> = cases.iter().filter(|c| c.1).map(|c| c.0).collect();
        assert_eq!(kept, want);
        for (at, inside) in &cases {
            assert_eq!(labels[*at] == 1, *inside, "{at:?}");
        }
        let summary = out.roi.unwrap();
        assert_eq!((summary.removed_outside, summary.voxels), (3, 500 - 1));
        // An empty region drops nothing.
        let mut no_organ = Array3::<u8>::zeros([15, 30, 30]);
        no_organ[[3, 3, 3]] = 1;
        let out = extract_lesions(&mut no_organ, &g, &names, &filter(true), 0, one);
        assert_eq!(out.lesions.len(), 1);
        assert_eq!(out.lesions[0].inside_roi, None);
        assert_eq!(out.roi.unwrap().voxels, 0);
    }

    #[test]
    fn diameter_over_directions_matches_the_exact_one() {
        let g = Geometry::new([1, 1, 1], crate::geometry::IDENTITY);
        // A 40 × 30 × 20 box surface: far more than the exact-search limit.
        let mut pts = Vec::new();
        for k in 0..20usize {
            for j in 0..30usize {
                for i in 0..40usize {
                    if i == 0 || j == 0 || k == 0 || i == 39 || j == 29 || k == 19 {
                        pts.push([i, j, k]);
                    }
                }
            }
        }
        assert!(pts.len() > EXACT_DIAMETER_POINTS);
        let exact = (39f64.powi(2) + 29f64.powi(2) + 19f64.powi(2)).sqrt();
        assert!((feret_diameter(&g, &pts) - exact).abs() < 1e-9);
    }
}
