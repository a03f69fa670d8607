//! Where lesions may go: organ masks from the host scan (lungs by an HU threshold and the largest
//! components), eroded in millimetres, and non-overlapping centres drawn inside them.

use ndarray::{Array3, ArrayView3};
use rand::{Rng, RngExt};

use crate::geometry::Geometry;
use crate::transforms::post::connected_components;

/// Air inside the body below this (HU) is lung (DATA.md: lung from HU < −500).
pub const LUNG_HU: f32 = -500.0;

/// The second-largest air region counts as a lung only when it is at least this share of the
/// largest: two lungs are of a size, while stomach or bowel gas is far smaller than a lung.
const SECOND_LUNG_SHARE: f64 = 1.0 / 3.0;

/// The lungs of a CT `[k, j, i]`: voxels below −500 HU, without the air around the body (components
/// touching the in-plane border); the largest component, and the second when it is as large as a
/// lung (the lungs are one component when the bronchi join them). Meant for chest CTs: in a scan
/// that holds only the lung bases, bowel gas can be larger, so place lesions there by a lung label
/// map instead (`mask:PATH=LABELS`).
pub fn lung_mask(ct: ArrayView3<f32>) -> Array3<bool> {
    let (nk, nj, ni) = ct.dim();
    let air: Vec<bool> = ct.iter().map(|v| *v < LUNG_HU).collect();
    let cc = connected_components(&air, [nk, nj, ni]);
    let mut touches = vec![false; cc.count() + 1];
    for k in 0..nk {
        for j in 0..nj {
            for i in 0..ni {
                if j == 0 || i == 0 || j == nj - 1 || i == ni - 1 {
                    touches[cc.labels[(k * nj + j) * ni + i] as usize] = true;
                }
            }
        }
    }
    let mut inner: Vec<(usize, usize)> = (1..=cc.count())
        .filter(|&id| !touches[id])
        .map(|id| (cc.sizes[id - 1], id))
        .collect();
    inner.sort_unstable_by(|a, b| b.cmp(a));
    let largest = inner.first().map_or(0, |(size, _)| *size) as f64;
    let keep: Vec<u32> = inner
        .iter()
        .take(2)
        .filter(|(size, _)| *size as f64 >= largest * SECOND_LUNG_SHARE)
        .map(|(_, id)| *id as u32)
        .collect();
    Array3::from_shape_vec(
        [nk, nj, ni],
        cc.labels
            .iter()
            .map(|l| *l != 0 && keep.contains(l))
            .collect(),
    )
    .expect("same size")
}

/// Erodes a mask by `radius_mm` with a box of that half-width in mm along each axis (separable
/// minimum filter), so anything centred in the result lies `radius_mm` inside the organ.
pub fn erode_mm(mask: &Array3<bool>, geometry: &Geometry, radius_mm: f64) -> Array3<bool> {
    let half = geometry
        .array_spacing()
        .map(|sp| (radius_mm / sp).ceil() as isize);
    let mut out = mask.clone();
    for (axis, h) in half.into_iter().enumerate() {
        if h <= 0 {
            continue;
        }
        let src = out.clone();
        let dims = src.dim();
        let n = [dims.0, dims.1, dims.2][axis] as isize;
        ndarray::Zip::indexed(&mut out).par_for_each(|(k, j, i), v| {
            if !*v {
                return;
            }
            let at = [k as isize, j as isize, i as isize];
            *v = (-h..=h).all(|d| {
                let x = at[axis] + d;
                if x < 0 || x >= n {
                    return false;
                }
                let mut idx = at;
                idx[axis] = x;
                src[[idx[0] as usize, idx[1] as usize, idx[2] as usize]]
            });
        });
    }
    out
}

/// Draws a centre (world mm) inside `allowed` for a lesion reaching `reach_mm`, at least
/// `gap_mm` away from every earlier lesion's surface; `None` after 200 tries.
pub fn place(
    allowed: &Array3<bool>,
    geometry: &Geometry,
    reach_mm: f64,
    taken: &[([f64; 3], f64)],
    gap_mm: f64,
    rng: &mut impl Rng,
) -> Option<[f64; 3]> {
    let candidates: Vec<(usize, usize, usize)> = allowed
        .indexed_iter()
        .filter(|(_, v)| **v)
        .map(|(p, _)| p)
        .collect();
    if candidates.is_empty() {
        return None;
    }
    for _ in 0..200 {
        let (k, j, i) = candidates[rng.random_range(0..candidates.len())];
        let c = geometry.voxel_to_world([i as f64, j as f64, k as f64]);
        let clear = taken.iter().all(|(o, r)| {
            let d = ((c[0] - o[0]).powi(2) + (c[1] - o[1]).powi(2) + (c[2] - o[2]).powi(2)).sqrt();
            d >= r + reach_mm + gap_mm
        });
        if clear {
            return Some(c);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lungs_exclude_outside_air_and_erosion_works_in_mm() {
        // Body (0 HU) in air (−1000), with two "lungs" (−800) inside.
        let mut ct = Array3::<f32>::from_elem([6, 20, 30], -1000.0);
        for k in 0..6 {
            for j in 2..18 {
                for i in 2..28 {
                    ct[[k, j, i]] = 0.0;
                }
            }
            for j in 5..15 {
                for i in 4..12 {
                    ct[[k, j, i]] = -800.0;
                }
                for i in 16..26 {
                    ct[[k, j, i]] = -800.0;
                }
            }
        }
        let m = lung_mask(ct.view());
        assert_eq!(m.iter().filter(|v| **v).count(), 6 * 10 * (8 + 10));
        // A gas pocket far smaller than a lung is not one.
        let mut gas = ct.clone();
        for j in 5..15 {
            for i in 4..12 {
                gas[[1, j, i]] = 0.0;
                gas[[2, j, i]] = 0.0;
                gas[[4, j, i]] = 0.0;
            }
        }
        let without_gas = lung_mask(gas.view());
        assert_eq!(without_gas.iter().filter(|v| **v).count(), 6 * 10 * 10);
        assert!(!m[[0, 0, 0]]);
        let g = Geometry::new([30, 20, 6], crate::geometry::IDENTITY);
        let e = erode_mm(&m, &g, 2.0);
        // Box erosion by 2 voxels in-plane and through-plane (6 slices → 2 left).
        assert_eq!(e.iter().filter(|v| **v).count(), 2 * 6 * (4 + 6));
    }
}
