//! Label-map post-processing shared by inference, evaluation and lesion synthesis: 3D connected
//! components with their boxes, and class decisions from probabilities.
//!
//! Axis order: flat masks and arrays are `[k, j, i]` (C order, `i` fastest); boxes are given as
//! `[[i, j, k] min, [i, j, k] max]`, inclusive, as lesion tables print them.

use ndarray::{Array3, ArrayView4, Axis};

use crate::config::{DataConfig, SegmentConfig};

/// An inclusive voxel bounding box `[[i, j, k] min, [i, j, k] max]`.
pub type VoxelBox = [[usize; 3]; 2];

/// Connected components of a binary mask on a `[nk, nj, ni]` grid (C order, `i` fastest).
#[derive(Debug, Clone, PartialEq)]
pub struct Components {
    /// Per voxel: 0 for background, else the component id `1..=count`, numbered in raster order
    /// of each component's first voxel.
    pub labels: Vec<u32>,
    /// Voxel count of component `id` at index `id - 1`.
    pub sizes: Vec<usize>,
}

impl Components {
    /// Number of components.
    pub fn count(&self) -> usize {
        self.sizes.len()
    }
}

fn find(parent: &mut [u32], mut x: u32) -> u32 {
    while parent[x as usize] != x {
        let up = parent[parent[x as usize] as usize];
        parent[x as usize] = up; // path halving
        x = up;
    }
    x
}

/// Labels the 26-connected components of `mask` (two-pass union-find: each foreground voxel is
/// joined with its 13 already-visited neighbours).
pub fn connected_components(mask: &[bool], dims: [usize; 3]) -> Components {
    let [nk, nj, ni] = dims;
    assert_eq!(
        mask.len(),
        nk * nj * ni,
        "mask length does not match the grid {dims:?}"
    );
    let mut provisional = vec![0u32; mask.len()];
    let mut parent: Vec<u32> = vec![0]; // id 0 = background
                                        // Neighbours before (k, j, i) in raster order: all of slice k-1, the row j-1 of slice k, and
                                        // (k, j, i-1).
    let mut offsets: Vec<(isize, isize, isize)> = Vec::with_capacity(13);
    for dk in -1..=0isize {
        for dj in -1..=1isize {
            for di in -1..=1isize {
                if dk < 0 || dj < 0 || (dj == 0 && di < 0) {
                    offsets.push((dk, dj, di));
                }
            }
        }
    }
    for k in 0..nk {
        for j in 0..nj {
            for i in 0..ni {
                let idx = (k * nj + j) * ni + i;
                if !mask[idx] {
                    continue;
                }
                let mut root = 0u32;
                for &(dk, dj, di) in &offsets {
                    let (kk, jj, ii) = (k as isize + dk, j as isize + dj, i as isize + di);
                    if kk < 0 || jj < 0 || ii < 0 || jj >= nj as isize || ii >= ni as isize {
                        continue;
                    }
                    let n = provisional[(kk as usize * nj + jj as usize) * ni + ii as usize];
                    if n == 0 {
                        continue;
                    }
                    let r = find(&mut parent, n);
                    if root == 0 {
                        root = r;
                    } else if r != root {
                        let (lo, hi) = (root.min(r), root.max(r));
                        parent[hi as usize] = lo;
                        root = lo;
                    }
                }
                if root == 0 {
                    root = parent.len() as u32;
                    parent.push(root);
                }
                provisional[idx] = root;
            }
        }
    }
    // Second pass: compact ids in order of first appearance.
    let mut compact = vec![0u32; parent.len()];
    let mut sizes = Vec::new();
    for label in provisional.iter_mut() {
        if *label == 0 {
            continue;
        }
        let r = find(&mut parent, *label) as usize;
        if compact[r] == 0 {
            sizes.push(0);
            compact[r] = sizes.len() as u32;
        }
        *label = compact[r];
        sizes[*label as usize - 1] += 1;
    }
    Components {
        labels: provisional,
        sizes,
    }
}

impl Components {
    /// The inclusive `[i, j, k]` box of every component, in id order, on the `[nk, nj, ni]` grid
    /// the components were labelled on.
    pub fn boxes(&self, dims: [usize; 3]) -> Vec<VoxelBox> {
        let [_, nj, ni] = dims;
        let mut boxes = vec![[[usize::MAX; 3], [0; 3]]; self.count()];
        for (idx, &id) in self.labels.iter().enumerate() {
            if id == 0 {
                continue;
            }
            let at = [idx % ni, (idx / ni) % nj, idx / (nj * ni)];
            let b = &mut boxes[id as usize - 1];
            for axis in 0..3 {
                b[0][axis] = b[0][axis].min(at[axis]);
                b[1][axis] = b[1][axis].max(at[axis]);
            }
        }
        boxes
    }

    /// The mean voxel-centre position `[i, j, k]` of every component, in id order, on the
    /// `[nk, nj, ni]` grid the components were labelled on.
    pub fn mean_voxels(&self, dims: [usize; 3]) -> Vec<[f64; 3]> {
        let [_, nj, ni] = dims;
        let mut sums = vec![[0.0f64; 3]; self.count()];
        for (idx, &id) in self.labels.iter().enumerate() {
            if id > 0 {
                let s = &mut sums[id as usize - 1];
                for (a, x) in [idx % ni, (idx / ni) % nj, idx / (nj * ni)]
                    .into_iter()
                    .enumerate()
                {
                    s[a] += x as f64;
                }
            }
        }
        sums.iter()
            .zip(&self.sizes)
            .map(|(s, &n)| s.map(|x| x / n as f64))
            .collect()
    }
}

/// How each voxel's class is decided from its probabilities (`[segment] threshold`).
#[derive(Debug, Clone, PartialEq)]
pub struct ClassRule {
    /// Two classes: foreground where its probability reaches this. More: see `findings`.
    pub threshold: f32,
    /// With more than two classes, the finding classes (not organs): one whose probability reaches
    /// `threshold` takes the voxel, the most probable of them; every other voxel takes the most
    /// probable class. Below 0.5 this adds the voxels where a finding is likely but not the most
    /// probable class (a fold ensemble's mean is lowered where its members disagree); from 0.5 up
    /// it is the plain argmax (removing findings is `min_confidence`'s job).
    pub findings: Vec<u8>,
}

impl ClassRule {
    /// The threshold alone: two-class models, or more classes with no finding lowered.
    pub fn binary(threshold: f32) -> Self {
        ClassRule {
            threshold,
            findings: Vec::new(),
        }
    }

    /// `segment.threshold` over `data`'s finding classes.
    pub fn from_config(segment: &SegmentConfig, data: &DataConfig) -> Self {
        ClassRule {
            threshold: segment.threshold as f32,
            findings: data
                .finding_classes()
                .into_iter()
                .map(|c| c as u8)
                .collect(),
        }
    }
}

/// The class of every voxel from `[K, D, H, W]` probabilities: with a `rule`, as it says;
/// otherwise the most probable class (the first on ties).
pub fn decide_classes(probabilities: ArrayView4<f32>, rule: Option<&ClassRule>) -> Array3<u8> {
    probabilities.map_axis(Axis(0), |p| {
        if let Some(rule) = rule {
            if p.len() == 2 {
                return (p[1] >= rule.threshold) as u8;
            }
            let finding = rule
                .findings
                .iter()
                .filter_map(|&c| p.get(c as usize).map(|&v| (c, v)))
                .filter(|&(_, v)| v >= rule.threshold)
                .fold(None, |best: Option<(u8, f32)>, (c, v)| match best {
                    Some((_, b)) if b >= v => best,
                    _ => Some((c, v)),
                });
            if let Some((c, _)) = finding {
                return c;
            }
        }
        p.iter()
            .enumerate()
            .fold((0u8, f32::NEG_INFINITY), |best, (c, &v)| {
                if v > best.1 {
                    (c as u8, v)
                } else {
                    best
                }
            })
            .0
    })
}

/// Dilates a mask on a `[nk, nj, ni]` grid (C order) by `margin_mm` along each axis: a voxel is
/// set when a set voxel lies within `margin_mm` along k, then j, then i (a box of that half-width
/// in mm, so anisotropic grids dilate by the same distance). Exact, and linear in the voxel count
/// whatever the margin: each line is swept forward and back with the distance to the last set voxel.
pub fn dilate_mm(mask: &[bool], dims: [usize; 3], spacing: [f64; 3], margin_mm: f64) -> Vec<bool> {
    let mut out = mask.to_vec();
    let [nk, nj, ni] = dims;
    let strides = [nj * ni, ni, 1];
    for axis in 0..3 {
        // Whole voxels within the margin (a NaN margin reaches none).
        let reach = (margin_mm / spacing[axis]).floor();
        let reach = if reach.is_finite() && reach >= 1.0 {
            reach as usize
        } else {
            continue;
        };
        let n = dims[axis];
        let stride = strides[axis];
        let src = out.clone();
        // Every line along `axis`: its first voxel runs over the other two axes (in raster
        // order: the blocks of `n * stride` voxels, and `stride` lines in each).
        let block = n * stride;
        let starts =
            (0..nk * nj * ni / block).flat_map(|b| (0..stride).map(move |r| b * block + r));
        for start in starts {
            let at = |t: usize| start + t * stride;
            let mut since = usize::MAX;
            for t in 0..n {
                since = if src[at(t)] {
                    0
                } else {
                    since.saturating_add(1)
                };
                if since <= reach {
                    out[at(t)] = true;
                }
            }
            since = usize::MAX;
            for t in (0..n).rev() {
                since = if src[at(t)] {
                    0
                } else {
                    since.saturating_add(1)
                };
                if since <= reach {
                    out[at(t)] = true;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn dilation_reaches_the_margin_in_mm_on_anisotropic_grids() {
        // One voxel at (k 5, j 5, i 5) of an 11³ grid with 1 × 2 × 0.5 mm spacing ([k, j, i]).
        let dims = [11, 11, 11];
        let mut mask = vec![false; 11 * 11 * 11];
        mask[(5 * 11 + 5) * 11 + 5] = true;
        let out = dilate_mm(&mask, dims, [1.0, 2.0, 0.5], 2.0);
        let set = |k: usize, j: usize, i: usize| out[(k * 11 + j) * 11 + i];
        // 2 mm is 2 voxels along k, 1 along j, 4 along i: a box, corners included.
        assert!(set(3, 4, 1) && set(7, 6, 9) && set(5, 5, 5));
        assert!(!set(2, 5, 5) && !set(5, 3, 5) && !set(5, 5, 0) && !set(8, 5, 5));
        assert_eq!(out.iter().filter(|v| **v).count(), 5 * 3 * 9);
        // No margin: unchanged.
        assert_eq!(dilate_mm(&mask, dims, [1.0; 3], 0.5), mask);
    }

    use super::*;

    #[test]
    fn diagonal_neighbours_join_and_separate_blobs_stay_apart() {
        // 3 × 3 × 3: a corner-to-corner diagonal (26-connected only) and an isolated voxel.
        let mut m = vec![false; 27];
        m[0] = true; // (0,0,0)
        m[13] = true; // (1,1,1)
        m[26] = true; // (2,2,2)
        m[2] = true; // (0,0,2): touches (1,1,1) diagonally too
        let c = connected_components(&m, [3, 3, 3]);
        assert_eq!(c.count(), 1);
        let mut m = vec![false; 27];
        m[0] = true;
        m[2] = true; // (0,0,2) is two voxels away from (0,0,0)
        let c = connected_components(&m, [3, 3, 3]);
        assert_eq!(c.sizes, vec![1, 1]);
        assert_eq!((c.labels[0], c.labels[2]), (1, 2));
    }

    #[test]
    fn u_shape_merges_into_one_component() {
        // Two arms that only meet at the bottom row: union-find must merge their provisional ids.
        let (nk, nj, ni) = (1, 4, 5);
        let mut m = vec![false; nk * nj * ni];
        for j in 0..4 {
            m[j * ni] = true;
            m[j * ni + 4] = true;
        }
        for i in 0..5 {
            m[3 * ni + i] = true;
        }
        let c = connected_components(&m, [nk, nj, ni]);
        assert_eq!(c.sizes, vec![11]);
    }

    #[test]
    fn boxes_are_inclusive_and_in_ijk_order() {
        // [nk, nj, ni] = [2, 3, 4]: component 1 at (k0, j0, i1..=2), component 2 at (k1, j2, i3).
        let mut m = vec![false; 24];
        m[1] = true;
        m[2] = true;
        m[12 + 2 * 4 + 3] = true;
        let c = connected_components(&m, [2, 3, 4]);
        assert_eq!(
            c.boxes([2, 3, 4]),
            vec![[[1, 0, 0], [2, 0, 0]], [[3, 2, 1], [3, 2, 1]]]
        );
    }

    #[test]
    fn binary_threshold_and_multiclass_argmax() {
        let p = ndarray::Array4::from_shape_vec([2, 1, 1, 2], vec![0.6, 0.5, 0.4, 0.5]).unwrap();
        // Threshold 0.5 takes the tie as foreground; plain argmax keeps the first class.
        assert_eq!(
            decide_classes(p.view(), Some(&ClassRule::binary(0.5)))
                .into_raw_vec_and_offset()
                .0,
            vec![0, 1]
        );
        assert_eq!(
            decide_classes(p.view(), None).into_raw_vec_and_offset().0,
            vec![0, 0]
        );
        let p3 = ndarray::Array4::from_shape_vec([3, 1, 1, 1], vec![0.2, 0.3, 0.5]).unwrap();
        assert_eq!(
            decide_classes(p3.view(), Some(&ClassRule::binary(0.9)))[[0, 0, 0]],
            2
        );
    }

    #[test]
    fn a_finding_class_reaching_the_threshold_takes_the_voxel_from_the_argmax() {
        // Classes background, lesion, brain, second lesion kind; five voxels.
        #[rustfmt::skip]
        let p = ndarray::Array4::from_shape_vec([4, 1, 1, 5], vec![
            0.1, 0.2, 0.5, 0.3, 0.36, // background
            0.35, 0.1, 0.5, 0.55, 0.32, // lesion
            0.45, 0.6, 0.0, 0.15, 0.0, // brain
            0.1, 0.1, 0.0, 0.0, 0.32, // second lesion kind
        ])
        .unwrap();
        let rule = |t| ClassRule {
            threshold: t,
            findings: vec![1, 3],
        };
        let classes = |r: &ClassRule| {
            decide_classes(p.view(), Some(r))
                .into_raw_vec_and_offset()
                .0
        };
        // At 0.5 it is the argmax but for the tie (the lesion reaches 0.5).
        assert_eq!(classes(&rule(0.5)), vec![2, 2, 1, 1, 0]);
        assert_eq!(
            decide_classes(p.view(), None).into_raw_vec_and_offset().0,
            vec![2, 2, 0, 1, 0]
        );
        // At 0.3 the lesion takes the first voxel from the brain; on the last both findings reach
        // 0.3 and the first of the most probable wins over the background.
        assert_eq!(classes(&rule(0.3)), vec![1, 2, 1, 1, 1]);
        // Above 0.5 nothing is taken from the argmax: a finding is never removed by the rule.
        assert_eq!(classes(&rule(0.7)), vec![2, 2, 0, 1, 0]);
        // An organ is never a finding: with none listed, the argmax.
        assert_eq!(classes(&ClassRule::binary(0.1)), vec![2, 2, 0, 1, 0]);
    }
}
