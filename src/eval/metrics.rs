//! Overlap and surface-distance metrics in millimetres for one class of one case.
//!
//! Conventions (documented in the README):
//! - Overlap metrics (Dice, IoU, precision, recall) follow Metrics Reloaded (Maier-Hein et al.,
//!   2024): both masks empty → 1 (a correct empty prediction), exactly one empty → 0.
//! - Surface metrics (HD95, ASSD, NSD) follow MONAI (`compute_hausdorff_distance`,
//!   `compute_average_surface_distance`, `compute_surface_dice`): a mask's surface is its voxels
//!   with a face neighbour outside the mask (binary erosion with a cross, border counts as
//!   outside); distances are exact Euclidean distances in mm between surface-voxel centres (a k-d
//!   tree over each surface); HD95 is the larger
//!   of the two directed 95th percentiles (linear interpolation, as NumPy); ASSD is the mean over
//!   both directions' distances together; NSD at tolerance τ counts surface voxels within τ of the
//!   other surface. When either mask is empty, HD95 and ASSD are undefined (NaN) and NSD is 0, or
//!   NaN when both are empty — MONAI's behaviour. Aggregates skip NaN and report how many.

use rayon::prelude::*;
use serde::Serialize;

/// Metrics of one class in one case.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ClassMetrics {
    pub dice: f64,
    pub iou: f64,
    pub precision: f64,
    pub recall: f64,
    pub truth_mm3: f64,
    pub pred_mm3: f64,
    /// `pred - truth`, mm³.
    pub volume_difference_mm3: f64,
    /// `(pred - truth) / truth`; NaN when the truth is empty.
    pub relative_volume_difference: f64,
    pub hd95_mm: f64,
    pub assd_mm: f64,
    pub nsd: f64,
}

/// Whether voxel `(k, j, i)` of `mask` is on its surface: set, with a face neighbour unset or
/// outside the grid (binary erosion with a cross, border outside, as MONAI's `get_mask_edges`).
fn on_surface(mask: &[bool], dims: [usize; 3], k: usize, j: usize, i: usize) -> bool {
    let [nk, nj, ni] = dims;
    let at = |k: usize, j: usize, i: usize| mask[(k * nj + j) * ni + i];
    if !at(k, j, i) {
        return false;
    }
    let inner = k > 0
        && k + 1 < nk
        && j > 0
        && j + 1 < nj
        && i > 0
        && i + 1 < ni
        && at(k - 1, j, i)
        && at(k + 1, j, i)
        && at(k, j - 1, i)
        && at(k, j + 1, i)
        && at(k, j, i - 1)
        && at(k, j, i + 1);
    !inner
}

/// Surface voxels of `mask` as a mask on the same grid.
pub fn surface(mask: &[bool], dims: [usize; 3]) -> Vec<bool> {
    let [_, nj, ni] = dims;
    let mut out = vec![false; mask.len()];
    out.par_chunks_mut(nj * ni)
        .enumerate()
        .for_each(|(k, slab)| {
            for j in 0..nj {
                for i in 0..ni {
                    slab[j * ni + i] = on_surface(mask, dims, k, j, i);
                }
            }
        });
    out
}

/// Positions (mm, `(k, j, i)` scaled by spacing) of the surface voxels of `mask` inside `bbox`.
fn surface_points(
    mask: &[bool],
    dims: [usize; 3],
    bbox: [(usize, usize); 3],
    spacing: [f64; 3],
) -> Vec<[f64; 3]> {
    (bbox[0].0..bbox[0].1)
        .into_par_iter()
        .flat_map_iter(|k| {
            let mut pts = Vec::new();
            for j in bbox[1].0..bbox[1].1 {
                for i in bbox[2].0..bbox[2].1 {
                    if on_surface(mask, dims, k, j, i) {
                        pts.push([
                            k as f64 * spacing[0],
                            j as f64 * spacing[1],
                            i as f64 * spacing[2],
                        ]);
                    }
                }
            }
            pts
        })
        .collect()
}

/// A static 3D k-d tree (median splits, implicit layout) for exact nearest-surface-voxel queries:
/// O(S log S) in the number of surface voxels instead of a distance transform over the volume.
struct PointTree {
    points: Vec<[f64; 3]>,
}

impl PointTree {
    fn new(mut points: Vec<[f64; 3]>) -> Self {
        fn build(p: &mut [[f64; 3]], depth: usize) {
            if p.len() <= 1 {
                return;
            }
            let mid = p.len() / 2;
            let axis = depth % 3;
            p.select_nth_unstable_by(mid, |a, b| a[axis].total_cmp(&b[axis]));
            let (left, right) = p.split_at_mut(mid);
            rayon::join(
                || build(left, depth + 1),
                || build(&mut right[1..], depth + 1),
            );
        }
        build(&mut points, 0);
        PointTree { points }
    }

    /// Squared distance from `q` to the nearest point.
    fn nearest_squared(&self, q: [f64; 3]) -> f64 {
        fn search(p: &[[f64; 3]], depth: usize, q: [f64; 3], best: &mut f64) {
            if p.is_empty() || *best == 0.0 {
                return;
            }
            let mid = p.len() / 2;
            let c = p[mid];
            let d = (c[0] - q[0]).powi(2) + (c[1] - q[1]).powi(2) + (c[2] - q[2]).powi(2);
            *best = best.min(d);
            let axis = depth % 3;
            let diff = q[axis] - c[axis];
            let (near, far) = if diff < 0.0 {
                (&p[..mid], &p[mid + 1..])
            } else {
                (&p[mid + 1..], &p[..mid])
            };
            search(near, depth + 1, q, best);
            if diff * diff < *best {
                search(far, depth + 1, q, best);
            }
        }
        let mut best = f64::INFINITY;
        search(&self.points, 0, q, &mut best);
        best
    }
}

/// Squared Euclidean distance (mm²) from every voxel to the nearest `source` voxel, on a
/// `[nk, nj, ni]` grid with `spacing` `[sk, sj, si]` mm: the exact separable algorithm of
/// Felzenszwalb & Huttenlocher (2012), one pass per axis, lines in parallel. `f64::INFINITY` where
/// there is no source.
pub fn squared_distance_transform(
    source: &[bool],
    dims: [usize; 3],
    spacing: [f64; 3],
) -> Vec<f64> {
    let [nk, nj, ni] = dims;
    let mut d: Vec<f64> = source
        .par_iter()
        .map(|&s| if s { 0.0 } else { f64::INFINITY })
        .collect();
    // Axis i: contiguous lines.
    d.par_chunks_mut(ni).for_each(|line| {
        let mut buf = vec![0.0; ni];
        envelope(line, &mut buf, spacing[2]);
        line.copy_from_slice(&buf);
    });
    // Axis j: within each k slab, columns of stride ni.
    d.par_chunks_mut(nj * ni).for_each(|slab| {
        let (mut line, mut out) = (vec![0.0; nj], vec![0.0; nj]);
        for i in 0..ni {
            for j in 0..nj {
                line[j] = slab[j * ni + i];
            }
            envelope(&line, &mut out, spacing[1]);
            for j in 0..nj {
                slab[j * ni + i] = out[j];
            }
        }
    });
    // Axis k: lines of stride nj·ni; parallel over rows j (each row's columns are disjoint).
    let plane = nj * ni;
    let columns: Vec<Vec<f64>> = (0..plane)
        .into_par_iter()
        .map(|p| {
            let line: Vec<f64> = (0..nk).map(|k| d[k * plane + p]).collect();
            let mut out = vec![0.0; nk];
            envelope(&line, &mut out, spacing[0]);
            out
        })
        .collect();
    for (p, col) in columns.into_iter().enumerate() {
        for (k, v) in col.into_iter().enumerate() {
            d[k * plane + p] = v;
        }
    }
    d
}

/// 1D lower envelope of parabolas `f(q) + ((x - q)·s)²` (Felzenszwalb & Huttenlocher).
fn envelope(f: &[f64], out: &mut [f64], s: f64) {
    let n = f.len();
    let mut v = vec![0usize; n];
    let mut z = vec![0.0f64; n + 1];
    let mut k = 0usize;
    let Some(q0) = f.iter().position(|v| v.is_finite()) else {
        out.iter_mut().for_each(|o| *o = f64::INFINITY);
        return;
    };
    v[0] = q0;
    z[0] = f64::NEG_INFINITY;
    z[1] = f64::INFINITY;
    let pos = |q: usize| q as f64 * s;
    for q in q0 + 1..n {
        if !f[q].is_finite() {
            continue;
        }
        loop {
            let p = v[k];
            let inter =
                ((f[q] + pos(q) * pos(q)) - (f[p] + pos(p) * pos(p))) / (2.0 * (pos(q) - pos(p)));
            if inter <= z[k] && k > 0 {
                k -= 1;
                continue;
            }
            if inter <= z[k] {
                // k == 0: the new parabola dominates everywhere.
                v[0] = q;
                z[1] = f64::INFINITY;
                break;
            }
            k += 1;
            v[k] = q;
            z[k] = inter;
            z[k + 1] = f64::INFINITY;
            break;
        }
    }
    let mut k = 0;
    for (x, o) in out.iter_mut().enumerate() {
        while z[k + 1] < pos(x) {
            k += 1;
        }
        let d = pos(x) - pos(v[k]);
        *o = d * d + f[v[k]];
    }
}

/// NumPy's default percentile (linear interpolation between closest ranks).
pub fn percentile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let rank = q / 100.0 * (values.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    values[lo] + (values[hi] - values[lo]) * (rank - lo as f64)
}

/// All metrics of one class: `truth` and `pred` are binary masks on a `[nk, nj, ni]` grid with
/// voxel `spacing` `[sk, sj, si]` mm; `tolerance_mm` is NSD's τ.
pub fn class_metrics(
    truth: &[bool],
    pred: &[bool],
    dims: [usize; 3],
    spacing: [f64; 3],
    tolerance_mm: f64,
) -> ClassMetrics {
    let voxel_mm3 = spacing.iter().product::<f64>();
    let plane = dims[1] * dims[2];
    // One parallel pass per slab: counts and the bounding box of the union.
    type Acc = (usize, usize, usize, Option<[(usize, usize); 3]>);
    let merge = |a: Option<[(usize, usize); 3]>, b: Option<[(usize, usize); 3]>| match (a, b) {
        (None, x) | (x, None) => x,
        (Some(a), Some(b)) => Some(std::array::from_fn(|x| {
            (a[x].0.min(b[x].0), a[x].1.max(b[x].1))
        })),
    };
    let (tp, t, p, bbox): Acc = truth
        .par_chunks(plane)
        .zip(pred.par_chunks(plane))
        .enumerate()
        .map(|(k, (ts, ps))| {
            let (mut both, mut nt, mut np) = (0, 0, 0);
            let (mut jlo, mut jhi, mut ilo, mut ihi) = (usize::MAX, 0, usize::MAX, 0);
            for (j, (tr, pr)) in ts
                .chunks_exact(dims[2])
                .zip(ps.chunks_exact(dims[2]))
                .enumerate()
            {
                for (i, (&a, &b)) in tr.iter().zip(pr).enumerate() {
                    both += (a && b) as usize;
                    nt += a as usize;
                    np += b as usize;
                    if a || b {
                        (jlo, jhi) = (jlo.min(j), jhi.max(j + 1));
                        (ilo, ihi) = (ilo.min(i), ihi.max(i + 1));
                    }
                }
            }
            let bb = (jlo != usize::MAX).then_some([(k, k + 1), (jlo, jhi), (ilo, ihi)]);
            (both, nt, np, bb)
        })
        .reduce(
            || (0, 0, 0, None),
            |x, y| (x.0 + y.0, x.1 + y.1, x.2 + y.2, merge(x.3, y.3)),
        );
    let ratio = |num: usize, den: usize, empty: f64| {
        if den == 0 {
            empty
        } else {
            num as f64 / den as f64
        }
    };
    let overlap_empty = if t == 0 && p == 0 { 1.0 } else { 0.0 };
    let (hd95_mm, assd_mm, nsd) = match bbox {
        Some(bb) if t > 0 && p > 0 => surface_metrics(truth, pred, dims, bb, spacing, tolerance_mm),
        _ if t == 0 && p == 0 => (f64::NAN, f64::NAN, f64::NAN),
        _ => (f64::NAN, f64::NAN, 0.0),
    };
    ClassMetrics {
        dice: ratio(2 * tp, t + p, overlap_empty),
        iou: ratio(tp, t + p - tp, overlap_empty),
        precision: ratio(tp, p, overlap_empty),
        recall: ratio(tp, t, overlap_empty),
        truth_mm3: t as f64 * voxel_mm3,
        pred_mm3: p as f64 * voxel_mm3,
        volume_difference_mm3: (p as f64 - t as f64) * voxel_mm3,
        relative_volume_difference: if t == 0 {
            f64::NAN
        } else {
            (p as f64 - t as f64) / t as f64
        },
        hd95_mm,
        assd_mm,
        nsd,
    }
}

/// HD95, ASSD and NSD of two non-empty masks whose voxels all lie in `bbox`.
fn surface_metrics(
    truth: &[bool],
    pred: &[bool],
    dims: [usize; 3],
    bbox: [(usize, usize); 3],
    spacing: [f64; 3],
    tolerance_mm: f64,
) -> (f64, f64, f64) {
    let (st, sp) = rayon::join(
        || surface_points(truth, dims, bbox, spacing),
        || surface_points(pred, dims, bbox, spacing),
    );
    let (tt, tp) = rayon::join(|| PointTree::new(st.clone()), || PointTree::new(sp.clone()));
    let directed = |from: &[[f64; 3]], to: &PointTree| -> Vec<f64> {
        from.par_iter()
            .map(|&q| to.nearest_squared(q).sqrt())
            .collect()
    };
    let mut pred_to_truth = directed(&sp, &tt);
    let mut truth_to_pred = directed(&st, &tp);
    let n = pred_to_truth.len() + truth_to_pred.len();
    let within = pred_to_truth
        .iter()
        .chain(&truth_to_pred)
        .filter(|&&d| d <= tolerance_mm)
        .count();
    let assd = pred_to_truth.iter().chain(&truth_to_pred).sum::<f64>() / n as f64;
    let hd95 = percentile(&mut pred_to_truth, 95.0).max(percentile(&mut truth_to_pred, 95.0));
    (hd95, assd, within as f64 / n as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute_force(source: &[bool], dims: [usize; 3], s: [f64; 3]) -> Vec<f64> {
        let [nk, nj, ni] = dims;
        let pts: Vec<[usize; 3]> = (0..source.len())
            .filter(|&x| source[x])
            .map(|x| [x / (nj * ni), (x / ni) % nj, x % ni])
            .collect();
        (0..nk * nj * ni)
            .map(|x| {
                let q = [x / (nj * ni), (x / ni) % nj, x % ni];
                pts.iter()
                    .map(|p| {
                        (0..3)
                            .map(|a| ((p[a] as f64 - q[a] as f64) * s[a]).powi(2))
                            .sum::<f64>()
                    })
                    .fold(f64::INFINITY, f64::min)
            })
            .collect()
    }

    #[test]
    fn distance_transform_matches_brute_force_on_anisotropic_grid() {
        let dims = [5, 7, 9];
        let spacing = [2.5, 0.7, 1.3];
        let mut src = vec![false; 5 * 7 * 9];
        for x in [3usize, 100, 200, 250, 314] {
            src[x] = true;
        }
        let fast = squared_distance_transform(&src, dims, spacing);
        let slow = brute_force(&src, dims, spacing);
        for (a, b) in fast.iter().zip(&slow) {
            assert!((a - b).abs() < 1e-9, "{a} vs {b}");
        }
        assert!(squared_distance_transform(&[false; 8], [2, 2, 2], [1.0; 3])
            .iter()
            .all(|d| d.is_infinite()));
    }

    #[test]
    fn point_tree_finds_the_exact_nearest_point() {
        let mut state = 12345u64;
        let mut rnd = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as f64 / (1u64 << 31) as f64 * 50.0
        };
        let pts: Vec<[f64; 3]> = (0..500).map(|_| [rnd(), rnd(), rnd()]).collect();
        let tree = PointTree::new(pts.clone());
        for _ in 0..300 {
            let q = [rnd(), rnd(), rnd()];
            let brute = pts
                .iter()
                .map(|p| (p[0] - q[0]).powi(2) + (p[1] - q[1]).powi(2) + (p[2] - q[2]).powi(2))
                .fold(f64::INFINITY, f64::min);
            assert_eq!(tree.nearest_squared(q), brute);
        }
    }

    #[test]
    fn percentile_interpolates_like_numpy() {
        // np.percentile([1, 2, 3, 4], 95) == 3.85
        assert!((percentile(&mut [4.0, 1.0, 3.0, 2.0], 95.0) - 3.85).abs() < 1e-12);
    }
}
