//! Overlap and surface-distance metrics in millimetres for one class of one case.
//!
//! Conventions (documented in the README):
//! - Overlap metrics (Dice, IoU, precision, recall) follow Metrics Reloaded (Maier-Hein et al.,
//!   2024): both masks empty → 1 (a correct empty prediction), exactly one empty → 0.
//! - Surface metrics (HD95, ASSD, NSD) follow MONAI (`compute_hausdorff_distance`,
//!   `compute_average_surface_distance`, `compute_surface_dice`): a mask's surface is its voxels
//!   with a face neighbour outside the mask (binary erosion with a cross, border counts as
//!   outside); distances are Euclidean in mm on the voxel grid with its spacing; HD95 is the larger
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

/// Bounding box `[lo, hi)` per axis `(k, j, i)` of the voxels set in either mask.
fn union_bbox(a: &[bool], b: &[bool], dims: [usize; 3]) -> Option<[(usize, usize); 3]> {
    let [_, nj, ni] = dims;
    let plane = nj * ni;
    let mut bbox: Option<[(usize, usize); 3]> = None;
    for (idx, (&x, &y)) in a.iter().zip(b).enumerate() {
        if x || y {
            let p = [idx / plane, (idx / ni) % nj, idx % ni];
            let bb = bbox.get_or_insert([(p[0], p[0] + 1), (p[1], p[1] + 1), (p[2], p[2] + 1)]);
            for a in 0..3 {
                bb[a].0 = bb[a].0.min(p[a]);
                bb[a].1 = bb[a].1.max(p[a] + 1);
            }
        }
    }
    bbox
}

/// Surface voxels of `mask`: set voxels with a face neighbour unset or outside the grid.
pub fn surface(mask: &[bool], dims: [usize; 3]) -> Vec<bool> {
    let [nk, nj, ni] = dims;
    let at = |k: usize, j: usize, i: usize| mask[(k * nj + j) * ni + i];
    let mut out = vec![false; mask.len()];
    out.par_chunks_mut(nj * ni)
        .enumerate()
        .for_each(|(k, slab)| {
            for j in 0..nj {
                for i in 0..ni {
                    if !at(k, j, i) {
                        continue;
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
                    slab[j * ni + i] = !inner;
                }
            }
        });
    out
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

/// Distances (mm) from each surface voxel of `from` to the nearest surface voxel of `to`.
fn directed_distances(from: &[bool], to_distance: &[f64]) -> Vec<f64> {
    from.iter()
        .zip(to_distance)
        .filter(|(f, _)| **f)
        .map(|(_, d)| d.sqrt())
        .collect()
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
    let (tp, t, p) = truth
        .par_iter()
        .zip(pred)
        .map(|(&a, &b)| ((a && b) as usize, a as usize, b as usize))
        .reduce(|| (0, 0, 0), |x, y| (x.0 + y.0, x.1 + y.1, x.2 + y.2));
    let ratio = |num: usize, den: usize, empty: f64| {
        if den == 0 {
            empty
        } else {
            num as f64 / den as f64
        }
    };
    let both_empty = t == 0 && p == 0;
    let overlap_empty = if both_empty { 1.0 } else { 0.0 };
    let (hd95_mm, assd_mm, nsd) = surface_metrics(truth, pred, dims, spacing, tolerance_mm, t, p);
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

fn surface_metrics(
    truth: &[bool],
    pred: &[bool],
    dims: [usize; 3],
    spacing: [f64; 3],
    tolerance_mm: f64,
    t: usize,
    p: usize,
) -> (f64, f64, f64) {
    if t == 0 || p == 0 {
        let nsd = if t == 0 && p == 0 { f64::NAN } else { 0.0 };
        return (f64::NAN, f64::NAN, nsd);
    }
    // Every surface voxel lies in the union's bounding box, so distances computed inside it are
    // exact; cropping makes lesion-sized masks cheap on CT-sized grids.
    let Some(bb) = union_bbox(truth, pred, dims) else {
        return (f64::NAN, f64::NAN, f64::NAN);
    };
    let sub = [bb[0].1 - bb[0].0, bb[1].1 - bb[1].0, bb[2].1 - bb[2].0];
    let crop = |m: &[bool]| -> Vec<bool> {
        let mut out = Vec::with_capacity(sub.iter().product());
        for k in bb[0].0..bb[0].1 {
            for j in bb[1].0..bb[1].1 {
                let row = (k * dims[1] + j) * dims[2];
                out.extend_from_slice(&m[row + bb[2].0..row + bb[2].1]);
            }
        }
        out
    };
    // Surfaces on the full grid (a crop border is not the image border), then cropped.
    let (st, sp) = (crop(&surface(truth, dims)), crop(&surface(pred, dims)));
    let (dt, dp) = rayon::join(
        || squared_distance_transform(&st, sub, spacing),
        || squared_distance_transform(&sp, sub, spacing),
    );
    let mut pred_to_truth = directed_distances(&sp, &dt);
    let mut truth_to_pred = directed_distances(&st, &dp);
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
    fn percentile_interpolates_like_numpy() {
        // np.percentile([1, 2, 3, 4], 95) == 3.85
        assert!((percentile(&mut [4.0, 1.0, 3.0, 2.0], 95.0) - 3.85).abs() < 1e-12);
    }
}
