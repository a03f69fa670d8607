//! Per-tissue contrast randomisation (SynthSeg's idea, on real hosts): the host's tissue classes
//! are found by k-means on its intensities, inside the organ (e.g. CSF, grey and white matter in a
//! brain) and outside it (air, soft tissue, fat and marrow), and each class is moved to a new
//! random mean. The host's own texture and noise are kept: every voxel keeps its deviation from its
//! tissue's mean, scaled by one random gain. So a T1 host can look T2-like, FLAIR-like or
//! post-contrast, while every structure stays where it was: the labels are untouched.

use ndarray::{Array3, Zip};
use rand::{Rng, RngExt};

use super::lesion::gaussian_blur;

/// Intensity classes of one region, from 1D k-means: centres ascending, with their spreads.
#[derive(Debug, Clone, PartialEq)]
pub struct TissueModel {
    /// Class means, ascending.
    pub centres: Vec<f64>,
    /// Class standard deviations (floored, so memberships stay soft).
    pub sigmas: Vec<f64>,
}

/// Most classes a model may have.
pub const MAX_CLASSES: usize = 8;
/// Samples used to fit a model (evenly strided).
const FIT_SAMPLES: usize = 200_000;
/// Lloyd iterations; 1D k-means on sorted quantile starts converges in a few.
const ITERATIONS: usize = 30;

impl TissueModel {
    /// Fits `k` classes to `values` (NaN ignored); `None` without enough distinct values.
    pub fn fit(values: impl Iterator<Item = f32> + Clone, k: usize) -> Option<TissueModel> {
        let total = values.clone().filter(|v| v.is_finite()).count();
        let stride = total.div_ceil(FIT_SAMPLES).max(1);
        let mut x: Vec<f64> = values
            .filter(|v| v.is_finite())
            .step_by(stride)
            .map(f64::from)
            .collect();
        x.sort_by(f64::total_cmp);
        if k == 0 || k > MAX_CLASSES || x.len() < 10 * k || x[0] == x[x.len() - 1] {
            return None;
        }
        // Start evenly spread over the 1st-99th percentile range (a large class such as air
        // would take several quantile starts), then Lloyd iterations on the sorted samples.
        let (p1, p99) = (x[x.len() / 100], x[x.len() * 99 / 100]);
        let mut centres: Vec<f64> = (0..k)
            .map(|c| p1 + (c as f64 + 0.5) / k as f64 * (p99 - p1))
            .collect();
        let mut bounds = vec![0usize; k + 1];
        for _ in 0..ITERATIONS {
            bounds[k] = x.len();
            for c in 1..k {
                let cut = 0.5 * (centres[c - 1] + centres[c]);
                bounds[c] = x.partition_point(|v| *v < cut);
            }
            let next: Vec<f64> = (0..k)
                .map(|c| {
                    let part = &x[bounds[c]..bounds[c + 1]];
                    if part.is_empty() {
                        centres[c]
                    } else {
                        part.iter().sum::<f64>() / part.len() as f64
                    }
                })
                .collect();
            if next == centres {
                break;
            }
            centres = next;
        }
        let range = x[x.len() - 1] - x[0];
        let sigmas = (0..k)
            .map(|c| {
                let part = &x[bounds[c]..bounds[c + 1]];
                let var = part.iter().map(|v| (v - centres[c]).powi(2)).sum::<f64>()
                    / part.len().max(1) as f64;
                var.sqrt().max(0.02 * range / k as f64)
            })
            .collect();
        Some(TissueModel { centres, sigmas })
    }

    /// Membership of intensity `v` in each class (Gaussian likelihoods, normalised), into `out`.
    pub fn memberships(&self, v: f64, out: &mut [f64]) {
        let mut sum = 0.0;
        for ((o, c), s) in out.iter_mut().zip(&self.centres).zip(&self.sigmas) {
            let z = (v - c) / s;
            *o = (-0.5 * z * z).exp() / s;
            sum += *o;
        }
        if sum > 0.0 && sum.is_finite() {
            out.iter_mut().for_each(|o| *o /= sum);
        } else {
            // Far outside every class: the nearest one.
            let nearest = (0..self.centres.len())
                .min_by(|&a, &b| {
                    (v - self.centres[a])
                        .abs()
                        .total_cmp(&(v - self.centres[b]).abs())
                })
                .unwrap_or(0);
            out.iter_mut()
                .enumerate()
                .for_each(|(i, o)| *o = (i == nearest) as u8 as f64);
        }
    }
}

/// A drawn contrast: the new mean of every class inside and outside the organ, and the gain on
/// each voxel's deviation from its class mean.
#[derive(Debug, Clone, PartialEq)]
pub struct Contrast {
    /// The host's classes inside the organ (region of interest).
    pub inside: TissueModel,
    /// Their new means, one per class.
    pub inside_means: Vec<f64>,
    /// The host's classes outside it, when fitted.
    pub outside: Option<TissueModel>,
    /// Their new means (the darkest, air, unchanged).
    pub outside_means: Vec<f64>,
    /// Gain on each voxel's deviation from its class mean (texture and noise).
    pub gain: f64,
}

impl Contrast {
    /// Draws new class means: inside the organ each class anywhere in `[0.05, 1]` of the organ's
    /// brightest class (so grey/white/CSF order is free: T1-, T2-, FLAIR-like), outside in
    /// `[0, 1.2]` of it except the darkest class (air, which has no signal in any contrast).
    pub fn random(inside: TissueModel, outside: Option<TissueModel>, rng: &mut impl Rng) -> Self {
        let top = inside
            .centres
            .iter()
            .copied()
            .fold(0.0f64, f64::max)
            .max(1e-6);
        let inside_means = inside
            .centres
            .iter()
            .map(|_| rng.random_range(0.05..=1.0) * top)
            .collect();
        let outside_means = outside
            .as_ref()
            .map(|m| {
                m.centres
                    .iter()
                    .enumerate()
                    .map(|(c, centre)| {
                        if c == 0 {
                            *centre
                        } else {
                            rng.random_range(0.0..=1.2) * top
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        Contrast {
            inside,
            inside_means,
            outside,
            outside_means,
            gain: rng.random_range(0.6..=1.4),
        }
    }
}

/// Applies `contrast` to `image` (`[k, j, i]`): memberships are taken on the image smoothed by one
/// voxel (so noise does not flip a voxel's class), each voxel becomes its classes' new means plus
/// `gain` × its deviation from their old means (at most 3 σ of its classes), and the organ and outside remaps are blended
/// across a one-voxel soft edge of `organ`. Values stay non-negative (magnitude images).
pub fn apply_contrast(image: &mut Array3<f32>, organ: &Array3<bool>, contrast: &Contrast) {
    let smooth = gaussian_blur(image, [1.0; 3]);
    let weight = gaussian_blur(&organ.mapv(|o| o as u8 as f32), [1.0; 3]);
    let remap = |model: &TissueModel, means: &[f64], v: f64, s: f64| {
        // At most MAX_CLASSES classes: no allocation per voxel.
        let mut buffer = [0.0; MAX_CLASSES];
        let r = &mut buffer[..model.centres.len().min(MAX_CLASSES)];
        model.memberships(s, r);
        let old: f64 = r.iter().zip(&model.centres).map(|(a, b)| a * b).sum();
        let new: f64 = r.iter().zip(means).map(|(a, b)| a * b).sum();
        // The deviation is texture and noise; bounded so that a voxel given the wrong class
        // (a thin structure lost in the smoothing) cannot swing past the classes' range.
        let spread = 3.0 * r.iter().zip(&model.sigmas).map(|(a, b)| a * b).sum::<f64>();
        new + contrast.gain * (v - old).clamp(-spread, spread)
    };
    Zip::from(image)
        .and(&smooth)
        .and(&weight)
        .par_for_each(|v, s, w| {
            let (x, s, w) = (*v as f64, *s as f64, *w as f64);
            let inside = remap(&contrast.inside, &contrast.inside_means, x, s);
            let out = match &contrast.outside {
                Some(m) if w < 1.0 => remap(m, &contrast.outside_means, x, s),
                _ => inside,
            };
            *v = (w * inside + (1.0 - w) * out).max(0.0) as f32;
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// Nested spheres: class 2 core, class 1 shell, class 0 outside, with noise.
    fn phantom(rng: &mut impl Rng) -> (Array3<f32>, Array3<u8>) {
        let n = 40;
        let labels = Array3::from_shape_fn((n, n, n), |(k, j, i)| {
            let r = [k, j, i]
                .map(|x| (x as f64 - 19.5).powi(2))
                .iter()
                .sum::<f64>()
                .sqrt();
            if r < 8.0 {
                2
            } else if r < 15.0 {
                1
            } else {
                0
            }
        });
        let means = [30.0f32, 80.0, 140.0];
        let normal = rand_distr::Normal::new(0.0f32, 4.0).unwrap();
        let image = labels.mapv(|l| means[l as usize] + rng.sample(normal));
        (image, labels)
    }

    fn class_mean(image: &Array3<f32>, labels: &Array3<u8>, class: u8) -> f64 {
        let v: Vec<f64> = Zip::from(image)
            .and(labels)
            .fold(Vec::new(), |mut acc, x, l| {
                if *l == class {
                    acc.push(*x as f64);
                }
                acc
            });
        v.iter().sum::<f64>() / v.len() as f64
    }

    #[test]
    fn kmeans_finds_the_tissue_classes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let (image, _) = phantom(&mut rng);
        let m = TissueModel::fit(image.iter().copied(), 3).unwrap();
        for (c, want) in m.centres.iter().zip([30.0, 80.0, 140.0]) {
            assert!((c - want).abs() < 2.0, "{:?}", m.centres);
        }
        assert!(
            m.sigmas.iter().all(|s| (2.0..6.0).contains(s)),
            "{:?}",
            m.sigmas
        );
        let mut r = [0.0; 3];
        m.memberships(80.0, &mut r);
        assert!(r[1] > 0.99, "{r:?}");
        m.memberships(110.0, &mut r);
        assert!(r[1] > 0.0 && r[2] > 0.0 && (r.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        assert!(TissueModel::fit(std::iter::repeat_n(5.0f32, 1000), 3).is_none());
    }

    #[test]
    fn remapping_changes_the_contrast_but_not_where_the_tissues_are() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (mut image, labels) = phantom(&mut rng);
        let organ = labels.mapv(|l| l > 0);
        let region = |want: bool| {
            let values = Zip::from(&image)
                .and(&organ)
                .fold(Vec::new(), |mut a, v, o| {
                    if *o == want {
                        a.push(*v);
                    }
                    a
                });
            TissueModel::fit(values.into_iter(), if want { 2 } else { 1 }).unwrap()
        };
        // Invert the order: the core (brightest) becomes darker than the shell (T1 → T2-like);
        // the outside keeps its mean.
        let contrast = Contrast {
            inside_means: vec![120.0, 40.0],
            inside: region(true),
            outside: Some(region(false)),
            outside_means: vec![30.0],
            gain: 1.0,
        };
        let before = labels.clone();
        apply_contrast(&mut image, &organ, &contrast);
        assert_eq!(labels, before);
        let (shell, core) = (
            class_mean(&image, &labels, 1),
            class_mean(&image, &labels, 2),
        );
        // Near the class and organ edges voxels blend their neighbours' new means (the shell is
        // only 7 voxels thick), so the class means sit a little towards them.
        assert!(
            (shell - 120.0).abs() < 10.0 && (core - 40.0).abs() < 5.0,
            "{shell} {core}"
        );
        // Geometry unchanged: along a ray through the centre, the largest intensity steps stay
        // at the class boundaries (radius 8 and 15 voxels from 19.5).
        let ray: Vec<f32> = (0..40).map(|i| image[[20, 20, i]]).collect();
        let mut steps: Vec<(f32, usize)> =
            (1..40).map(|i| ((ray[i] - ray[i - 1]).abs(), i)).collect();
        steps.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut at: Vec<usize> = steps[..4].iter().map(|s| s.1).collect();
        at.sort();
        assert_eq!(at, [5, 12, 28, 35], "{ray:?}");
    }

    #[test]
    fn drawn_contrasts_reorder_tissues_and_keep_air_dark() {
        let model = |c: Vec<f64>| TissueModel {
            sigmas: vec![5.0; c.len()],
            centres: c,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let mut inverted = 0;
        for _ in 0..200 {
            let c = Contrast::random(
                model(vec![30.0, 80.0, 140.0]),
                Some(model(vec![2.0, 60.0])),
                &mut rng,
            );
            assert!(c.inside_means.iter().all(|m| (7.0..=140.0).contains(m)));
            assert_eq!(c.outside_means[0], 2.0);
            inverted += (c.inside_means[0] > c.inside_means[2]) as usize;
        }
        // The CSF-brighter-than-white-matter (T2-like) order occurs about half the time.
        assert!((70..130).contains(&inverted), "{inverted}");
    }
}
