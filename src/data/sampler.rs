//! Training patches: where to cut them (foreground-oversampled, nnU-Net style) and how to augment
//! them, all driven by a seeded RNG.

use rand::{Rng, RngExt};

use super::dataset::PreparedCase;
use crate::config::{AugmentConfig, ForegroundBy, SamplingConfig};
use crate::transforms::augment::{augment_patch, cut_patch, rand_affine, Patch, PatchGeometry};

/// Cuts and augments patches from prepared cases.
#[derive(Debug, Clone)]
pub struct PatchSampler {
    /// `[D, H, W]`; `D = 1` for 2D.
    pub size: [usize; 3],
    /// 3D patches (else 2D slices or 2.5D stacks).
    pub three_d: bool,
    /// 2.5D: neighbouring slices on each side stacked as extra channels (0 = plain 2D).
    pub context: usize,
    /// Share of patches centred on a foreground voxel.
    pub foreground_fraction: f64,
    /// Classes (label values) foreground patches prefer; empty: any present class.
    pub foreground_classes: Vec<usize>,
    /// How the centre is drawn within the class.
    pub foreground_by: ForegroundBy,
    /// Augmentation applied to every patch.
    pub augment: AugmentConfig,
}

impl PatchSampler {
    /// A sampler for the `[sampling]` patch size and foreground share, `[augment]` settings and
    /// `context` 2.5D slices on each side.
    pub fn new(sampling: &SamplingConfig, augment: &AugmentConfig, context: usize) -> Self {
        PatchSampler {
            size: sampling.patch_size.window(),
            three_d: sampling.patch_size.is_3d(),
            context,
            foreground_fraction: sampling.foreground_fraction,
            foreground_classes: Vec::new(),
            foreground_by: sampling.foreground_by,
            augment: augment.clone(),
        }
    }

    /// Foreground patches prefer these classes (label values), when a case has them.
    pub fn with_foreground_classes(mut self, classes: Vec<usize>) -> Self {
        self.foreground_classes = classes;
        self
    }

    /// The patch centre `[k, j, i]`: on a foreground voxel of a random present class with
    /// probability `foreground_fraction` (any of its voxels, or one of a random component's: see
    /// `foreground_by`; jittered so the voxel is anywhere in the patch's middle half), else
    /// uniform over the volume.
    pub fn centre(&self, case: &PreparedCase, rng: &mut impl Rng) -> [f64; 3] {
        let (_, nk, nj, ni) = case.image.dim();
        let n = [nk, nj, ni];
        let present_of = |wanted: &dyn Fn(usize) -> bool| -> Vec<usize> {
            case.foreground
                .iter()
                .enumerate()
                .filter(|(c, f)| !f.is_empty() && wanted(c + 1))
                .map(|(c, _)| c)
                .collect()
        };
        let mut present = present_of(&|c| self.foreground_classes.contains(&c));
        if present.is_empty() {
            present = present_of(&|_| true);
        }
        if !present.is_empty() && rng.random::<f64>() < self.foreground_fraction {
            let class = present[rng.random_range(0..present.len())];
            let voxels = match self.foreground_by {
                ForegroundBy::Voxel => &case.foreground[class],
                ForegroundBy::Component => {
                    let components = &case.components[class];
                    &components[rng.random_range(0..components.len())]
                }
            };
            let v = voxels[rng.random_range(0..voxels.len())];
            let mut c = [v[0] as f64, v[1] as f64, v[2] as f64];
            // 2D patches keep their slice; other axes jitter by up to a quarter patch.
            let first = if self.three_d { 0 } else { 1 };
            for (a, x) in c.iter_mut().enumerate().skip(first) {
                let jitter = self.size[a] as f64 / 4.0;
                if jitter >= 1.0 {
                    *x += rng.random_range(-jitter..=jitter).round();
                }
            }
            return c;
        }
        [0, 1, 2].map(|a| {
            let (len, size) = (n[a], self.size[a]);
            if a == 0 && !self.three_d {
                rng.random_range(0..len) as f64
            } else if len <= size {
                // Smaller than the patch: centred, the rest padded.
                (len as f64 - 1.0) / 2.0
            } else {
                // Patch fully inside: centre in [half, len - 1 - half].
                let half = (size as f64 - 1.0) / 2.0;
                let x = rng.random_range(half..=(len as f64 - 1.0 - half));
                if size % 2 == 0 {
                    x.floor() + 0.5
                } else {
                    x.round()
                }
            }
        })
    }

    /// One augmented patch from `case`.
    pub fn sample(&self, case: &PreparedCase, rng: &mut impl Rng) -> Patch {
        let mut centre = self.centre(case, rng);
        if !self.three_d {
            centre[0] = centre[0].round();
        }
        let matrix = rand_affine(&self.augment, case.spacing_kji(), self.three_d, rng);
        let at = PatchGeometry {
            centre,
            size: self.size,
            matrix,
            context: self.context,
        };
        let mut patch = cut_patch(case.image.view(), case.label.view(), &at);
        augment_patch(&mut patch, &self.augment, self.three_d, rng);
        patch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::{Geometry, IDENTITY};
    use ndarray::{Array3, Array4};
    use rand::SeedableRng;

    /// A prepared 64 × 64 × 40 case of zeros with `label` and `classes` classes.
    fn case_of(label: Array3<u8>, classes: usize) -> crate::data::dataset::PreparedCase {
        crate::data::dataset::prepare(
            "c".into(),
            crate::data::dataset::SpatialResult {
                image: Array4::zeros([1, 40, 64, 64]),
                label: Some(label),
                geometry: Geometry::new([64, 64, 40], IDENTITY),
            },
            &[crate::transforms::intensity::Normalization::None],
            classes,
        )
    }

    /// 8³ patches, `foreground_fraction` of them centred on foreground.
    fn sampling(foreground_fraction: f64) -> SamplingConfig {
        SamplingConfig {
            patch_size: crate::geometry::PatchSize::new(&[8, 8, 8]).unwrap(),
            foreground_fraction,
            patches_per_volume: 1,
            foreground_classes: Vec::new(),
            foreground_by: ForegroundBy::Voxel,
        }
    }

    #[test]
    fn components_are_drawn_alike_whatever_their_size() {
        // One 10³ lesion and one single-voxel lesion of class 1, and an organ (class 2) voxel.
        let mut label = Array3::<u8>::zeros([40, 64, 64]);
        label.slice_mut(ndarray::s![5..15, 10..20, 10..20]).fill(1);
        label[[30, 50, 50]] = 1;
        label[[30, 5, 5]] = 2;
        let case = case_of(label, 3);
        assert_eq!(case.components[0].len(), 2);
        // 1,000 voxels strided by 4 to stay within 256.
        assert_eq!(case.components[0][0].len(), 250);
        assert_eq!(case.components[0][1], vec![[30, 50, 50]]);
        assert_eq!(case.components[1], vec![vec![[30, 5, 5]]]);
        // Patches of 3³ do not jitter: the centre is the drawn voxel.
        let mut sampling = sampling(1.0);
        sampling.patch_size = crate::geometry::PatchSize::new(&[3, 3, 3]).unwrap();
        let mut small_share = |by: ForegroundBy| {
            sampling.foreground_by = by;
            let s = PatchSampler::new(&sampling, &AugmentConfig::default(), 0)
                .with_foreground_classes(vec![1]);
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            (0..2000)
                .filter(|_| s.centre(&case, &mut rng) == [30.0, 50.0, 50.0])
                .count() as f64
                / 2000.0
        };
        // By voxel the small lesion is 1 of 1,001 voxels; by component 1 of 2 lesions.
        assert!(small_share(ForegroundBy::Voxel) < 0.01);
        let by_component = small_share(ForegroundBy::Component);
        assert!((0.45..0.55).contains(&by_component), "{by_component}");
    }

    #[test]
    fn foreground_oversampling_hits_the_asked_share() {
        // One small foreground blob in a large volume: uniform patches rarely contain it.
        let mut label = Array3::<u8>::zeros([40, 64, 64]);
        label[[20, 40, 40]] = 1;
        let case = case_of(label, 2);
        let sampling = sampling(0.33);
        let s = PatchSampler::new(&sampling, &AugmentConfig::default(), 0);
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let hits = (0..600)
            .filter(|_| s.sample(&case, &mut rng).label.iter().any(|l| *l == 1))
            .count();
        let share = hits as f64 / 600.0;
        assert!((0.25..0.42).contains(&share), "{share}");
    }

    #[test]
    fn preferred_foreground_classes_take_the_foreground_patches() {
        // An organ (class 2) filling a slab and one lesion voxel (class 1), far apart.
        let mut label = Array3::<u8>::zeros([40, 64, 64]);
        label.slice_mut(ndarray::s![0..10, .., ..]).fill(2);
        label[[30, 40, 40]] = 1;
        let case = case_of(label, 3);
        let sampling = sampling(1.0);
        let lesion_share = |s: &PatchSampler| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(6);
            (0..400)
                .filter(|_| s.sample(&case, &mut rng).label.iter().any(|l| *l == 1))
                .count() as f64
                / 400.0
        };
        let any = PatchSampler::new(&sampling, &AugmentConfig::default(), 0);
        let lesions = any.clone().with_foreground_classes(vec![1]);
        // Uniform over present classes: about half on the lesion; preferred: all of them, but
        // for the few where rotation or zoom resamples the one-voxel lesion away.
        assert!(
            (0.35..0.65).contains(&lesion_share(&any)),
            "{}",
            lesion_share(&any)
        );
        assert!(lesion_share(&lesions) > 0.9, "{}", lesion_share(&lesions));
    }
}
