//! Random augmentation of training patches, seeded by the caller's RNG so that a run is
//! reproducible and resumes exactly.
//!
//! Rotation and zoom are applied while the patch is cut out of the whole volume ([`cut_patch`]), in
//! millimetres, so anisotropic grids rotate correctly and no border is invented inside the volume
//! (nnU-Net's spatial transform works the same way). Mirroring, 90° turns and the intensity
//! transforms then act on the patch.

use ndarray::{Array3, Array4, ArrayView3, ArrayView4, Axis};
use rand::{Rng, RngExt};

use super::spatial::sample_linear;
use crate::config::AugmentConfig;

/// A cut-out patch: image `[C_in, D, H, W]` and labels `[D, H, W]`.
#[derive(Debug, Clone)]
pub struct Patch {
    /// Image `[C_in, D, H, W]` (array order).
    pub image: Array4<f32>,
    /// Class indices `[D, H, W]`.
    pub label: Array3<u8>,
}

/// Where and how to cut a patch out of a volume.
#[derive(Debug, Clone)]
pub struct PatchGeometry {
    /// Patch centre in voxel indices `[k, j, i]` (continuous).
    pub centre: [f64; 3],
    /// `[D, H, W]`; `D = 1` for 2D slices.
    pub size: [usize; 3],
    /// Patch offset → source offset in voxel indices (`[k, j, i]` order); `None`: identity, an
    /// exact copy.
    pub matrix: Option<[[f64; 3]; 3]>,
    /// 2.5D: slices on each side of the centre slice stacked as channels.
    pub context: usize,
}

/// Cuts a patch from `image` `[C, D, H, W]` and `label` `[D, H, W]`. Outside the volume the image is
/// 0 (the normalised mean) and the label background. Images are interpolated linearly, labels by
/// nearest neighbour. With `context > 0` (2D only) the output has `C · (2·context + 1)` channels,
/// neighbouring slices clamped at the volume's ends.
pub fn cut_patch(image: ArrayView4<f32>, label: ArrayView3<u8>, at: &PatchGeometry) -> Patch {
    let (c, nk, nj, ni) = image.dim();
    let [pd, ph, pw] = at.size;
    let slices = 2 * at.context + 1;
    let mut out = Array4::<f32>::zeros([c * slices, pd, ph, pw]);
    let mut out_label = Array3::<u8>::zeros([pd, ph, pw]);
    let half = [
        (pd as f64 - 1.0) / 2.0,
        (ph as f64 - 1.0) / 2.0,
        (pw as f64 - 1.0) / 2.0,
    ];
    let dims = [nk as isize, nj as isize, ni as isize];
    let inside = |p: [isize; 3]| (0..3).all(|a| p[a] >= 0 && p[a] < dims[a]);
    for d in 0..pd {
        for h in 0..ph {
            for w in 0..pw {
                let off = [d as f64 - half[0], h as f64 - half[1], w as f64 - half[2]];
                let src = match &at.matrix {
                    None => off,
                    Some(m) => {
                        [0, 1, 2].map(|r| m[r][0] * off[0] + m[r][1] * off[1] + m[r][2] * off[2])
                    }
                };
                let p = [0, 1, 2].map(|a| at.centre[a] + src[a]);
                let nearest = p.map(|x| x.round() as isize);
                if inside(nearest) {
                    out_label[[d, h, w]] = label[[
                        nearest[0] as usize,
                        nearest[1] as usize,
                        nearest[2] as usize,
                    ]];
                }
                for s in 0..slices {
                    // 2.5D neighbours step along k from the (rounded) centre slice.
                    let dk = s as f64 - at.context as f64;
                    let q = [p[0] + dk, p[1], p[2]];
                    for ch in 0..c {
                        out[[ch * slices + s, d, h, w]] = if at.matrix.is_none() {
                            let mut qi = q.map(|x| x.round() as isize);
                            if at.context > 0 && inside(nearest) {
                                qi[0] = qi[0].clamp(0, dims[0] - 1);
                            }
                            if inside(qi) {
                                image[[ch, qi[0] as usize, qi[1] as usize, qi[2] as usize]]
                            } else {
                                0.0
                            }
                        } else {
                            let q = if at.context > 0 {
                                [q[0].round().clamp(0.0, (nk - 1) as f64), q[1], q[2]]
                            } else {
                                q
                            };
                            sample_linear(image.index_axis(Axis(0), ch), q)
                        };
                    }
                }
            }
        }
    }
    Patch {
        image: out,
        label: out_label,
    }
}

/// Random rotation and zoom, as a patch→source index matrix for a grid with `spacing` (`[k, j, i]`
/// order, mm). In-plane (about the k axis) for 2D, about a random axis for 3D.
pub fn rand_affine(
    config: &AugmentConfig,
    spacing: [f64; 3],
    three_d: bool,
    rng: &mut impl Rng,
) -> Option<[[f64; 3]; 3]> {
    let rotate = rng.random::<f64>() < config.rotate_prob;
    let scale = rng.random::<f64>() < config.scale_prob;
    if !rotate && !scale {
        return None;
    }
    let angle = if rotate {
        let a = config.rotate_degrees.to_radians();
        rng.random_range(-a..=a)
    } else {
        0.0
    };
    let axis = if three_d {
        rng.random_range(0..3usize)
    } else {
        0
    };
    let zoom = if scale {
        let [lo, hi] = config.scale_range;
        rng.random_range(lo..=hi)
    } else {
        1.0
    };
    // Rotation about `axis` in mm space, then zoom (zoom > 1 magnifies: source steps shrink).
    let (s, c) = angle.sin_cos();
    let (p, q) = match axis {
        0 => (1, 2),
        1 => (0, 2),
        _ => (0, 1),
    };
    let mut rot = [[0.0; 3]; 3];
    for (a, row) in rot.iter_mut().enumerate() {
        row[a] = 1.0;
    }
    rot[p][p] = c;
    rot[p][q] = -s;
    rot[q][p] = s;
    rot[q][q] = c;
    // index offset → mm (× spacing) → rotate, zoom → back to index (÷ spacing)
    let mut m = [[0.0; 3]; 3];
    for r in 0..3 {
        for col in 0..3 {
            m[r][col] = rot[r][col] * spacing[col] / spacing[r] / zoom;
        }
    }
    Some(m)
}

/// Mirroring, 90° in-plane turns and intensity transforms on a cut patch.
pub fn augment_patch(patch: &mut Patch, config: &AugmentConfig, three_d: bool, rng: &mut impl Rng) {
    // Mirror each spatial axis (2D: rows and columns only).
    let first_axis = if three_d { 0 } else { 1 };
    for axis in first_axis..3 {
        if rng.random::<f64>() < config.flip_prob {
            patch.image.invert_axis(Axis(axis + 1));
            patch.label.invert_axis(Axis(axis));
        }
    }
    let (_, _, h, w) = patch.image.dim();
    if h == w && rng.random::<f64>() < config.rotate90_prob {
        let turns = rng.random_range(1..4usize);
        for _ in 0..turns {
            // (h, w) → (w, H−1−h): swap the in-plane axes, then mirror the new rows.
            patch.image.swap_axes(2, 3);
            patch.image.invert_axis(Axis(2));
            patch.label.swap_axes(1, 2);
            patch.label.invert_axis(Axis(1));
        }
    }
    patch.image = patch.image.as_standard_layout().into_owned();
    patch.label = patch.label.as_standard_layout().into_owned();

    for mut channel in patch.image.axis_iter_mut(Axis(0)) {
        let Some(data) = channel.as_slice_memory_order_mut() else {
            continue;
        };
        if rng.random::<f64>() < config.noise_prob {
            let sigma = rng.random_range(0.0..=config.noise_std.max(0.0)) as f32;
            let normal = rand_distr::Normal::new(0.0f32, sigma.max(0.0)).ok();
            if let Some(normal) = normal {
                for v in data.iter_mut() {
                    *v += rng.sample(normal);
                }
            }
        }
        if rng.random::<f64>() < config.brightness_prob {
            let [lo, hi] = config.brightness_range;
            let f = rng.random_range(lo..=hi) as f32;
            data.iter_mut().for_each(|v| *v *= f);
        }
        if rng.random::<f64>() < config.contrast_prob {
            // nnU-Net: scale around the mean, then clip to the original range.
            let [lo, hi] = config.contrast_range;
            let f = rng.random_range(lo..=hi) as f32;
            let (min, max, mean) = stats(data);
            data.iter_mut()
                .for_each(|v| *v = ((*v - mean) * f + mean).clamp(min, max));
        }
        if rng.random::<f64>() < config.gamma_prob {
            // nnU-Net: gamma on the patch rescaled to [0, 1], original range restored.
            let [lo, hi] = config.gamma_range;
            let g = rng.random_range(lo..=hi) as f32;
            let (min, max, _) = stats(data);
            let range = (max - min).max(1e-6);
            data.iter_mut()
                .for_each(|v| *v = ((*v - min) / range).max(0.0).powf(g) * range + min);
        }
    }
}

fn stats(data: &[f32]) -> (f32, f32, f32) {
    let (mut min, mut max, mut sum) = (f32::INFINITY, f32::NEG_INFINITY, 0.0f64);
    for v in data {
        min = min.min(*v);
        max = max.max(*v);
        sum += *v as f64;
    }
    (min, max, (sum / data.len().max(1) as f64) as f32)
}

/// An independent RNG seed for item `(a, b)` of a seeded run: one batch (epoch, step) of
/// training, one synthetic case (host, case).
pub fn derive_seed(seed: u64, a: usize, b: usize) -> u64 {
    // SplitMix64 finaliser over the packed triple: neighbouring steps get unrelated streams.
    let mut z = seed
        .wrapping_add((a as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add((b as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn volume() -> (Array4<f32>, Array3<u8>) {
        let image =
            Array4::from_shape_fn([1, 6, 8, 10], |(_, k, j, i)| (100 * k + 10 * j + i) as f32);
        let label = Array3::from_shape_fn([6, 8, 10], |(k, j, i)| ((k + j + i) % 2) as u8);
        (image, label)
    }

    #[test]
    fn identity_cut_is_an_exact_copy_with_zero_outside() {
        let (image, label) = volume();
        let at = PatchGeometry {
            centre: [2.5, 3.5, 4.5],
            size: [2, 4, 6],
            matrix: None,
            context: 0,
        };
        let p = cut_patch(image.view(), label.view(), &at);
        // Centre 2.5 with size 2 → slices 2..4; rows 2..6; columns 2..8.
        assert_eq!(p.image[[0, 0, 0, 0]], image[[0, 2, 2, 2]]);
        assert_eq!(p.label[[1, 3, 5]], label[[3, 5, 7]]);
        let edge = PatchGeometry {
            centre: [0.0, 0.0, 0.0],
            size: [1, 3, 3],
            matrix: None,
            context: 0,
        };
        let p = cut_patch(image.view(), label.view(), &edge);
        assert_eq!(p.image[[0, 0, 0, 0]], 0.0);
        assert_eq!(p.image[[0, 0, 1, 1]], image[[0, 0, 0, 0]]);
    }

    #[test]
    fn context_slices_become_channels() {
        let (image, label) = volume();
        let at = PatchGeometry {
            centre: [0.0, 3.5, 4.5],
            size: [1, 2, 2],
            matrix: None,
            context: 1,
        };
        let p = cut_patch(image.view(), label.view(), &at);
        assert_eq!(p.image.dim(), (3, 1, 2, 2));
        // Slice −1 clamps to 0; slice +1 is the next one.
        assert_eq!(p.image[[0, 0, 0, 0]], image[[0, 0, 3, 4]]);
        assert_eq!(p.image[[2, 0, 0, 0]], image[[0, 1, 3, 4]]);
    }

    #[test]
    fn augmentation_is_reproducible_and_keeps_labels_with_voxels() {
        let (image, label) = volume();
        let config = AugmentConfig {
            flip_prob: 1.0,
            rotate90_prob: 1.0,
            ..AugmentConfig::default()
        };
        let at = PatchGeometry {
            centre: [2.5, 3.5, 3.5],
            size: [2, 4, 4],
            matrix: None,
            context: 0,
        };
        let run = |seed| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut p = cut_patch(image.view(), label.view(), &at);
            augment_patch(
                &mut p,
                &AugmentConfig {
                    gamma_prob: 0.0,
                    noise_prob: 0.0,
                    brightness_prob: 0.0,
                    contrast_prob: 0.0,
                    ..config.clone()
                },
                true,
                &mut rng,
            );
            p
        };
        let (a, b) = (run(7), run(7));
        assert_eq!(a.image, b.image);
        // Spatial augmentation moved image and label together: labels still follow (k+j+i) parity
        // of the voxel value they sit on.
        for ((d, h, w), l) in a.label.indexed_iter() {
            let v = a.image[[0, d, h, w]] as usize;
            assert_eq!(((v / 100) + (v / 10 % 10) + (v % 10)) % 2, *l as usize);
        }
    }

    #[test]
    fn rotation_in_mm_keeps_physical_lengths() {
        let config = AugmentConfig {
            rotate_prob: 1.0,
            scale_prob: 0.0,
            rotate_degrees: 90.0,
            ..AugmentConfig::default()
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let spacing = [3.0, 1.0, 1.0];
        let m = rand_affine(&config, spacing, false, &mut rng).unwrap();
        // A one-voxel in-plane step maps to a step of 1 mm in the source.
        let v = [m[0][1], m[1][1], m[2][1]];
        let mm = ((v[0] * spacing[0]).powi(2)
            + (v[1] * spacing[1]).powi(2)
            + (v[2] * spacing[2]).powi(2))
        .sqrt();
        assert!((mm - 1.0).abs() < 1e-9);
        assert_eq!(m[0][0], 1.0);
    }
}
