//! Scanner effects for domain randomisation: the resolution a scan was acquired at (thick slices
//! with their slice profile, coarser in-plane sampling), blur, and Gaussian or Rician noise. They
//! act on the image only, on its own grid, so the labels stay exact.

use ndarray::{Array3, Axis};
use rand::{Rng, RngExt};
use serde::{Deserialize, Serialize};

/// How noise enters a magnitude image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NoiseKind {
    /// Additive Gaussian (CT, or MR far above the noise floor).
    Gaussian,
    /// Rician: the magnitude of a complex signal with Gaussian noise in both channels (MR).
    Rician,
}

/// Simulates acquisition at a coarser resolution along array axis `axis` (0 = k, 1 = j, 2 = i) of
/// `image` with voxel spacing `spacing_mm` on that axis: each acquired slice integrates a box
/// slice profile `thickness_mm` wide, slices are `thickness_mm` apart starting at `phase` (a share
/// of one slice, in `[0, 1)`), and the slices are linearly interpolated back onto the original
/// grid, as a clinical thick-slice scan resampled to a fine grid looks. A thickness at or below
/// the voxel spacing leaves the image unchanged.
pub fn simulate_thick_slices(
    image: &mut Array3<f32>,
    axis: usize,
    spacing_mm: f64,
    thickness_mm: f64,
    phase: f64,
) {
    let tau = thickness_mm / spacing_mm;
    if tau <= 1.0 + 1e-9 || !tau.is_finite() {
        return;
    }
    let n = image.len_of(Axis(axis));
    // Slice centres in voxel units, covering the whole axis.
    let first = phase.rem_euclid(1.0) * tau - tau;
    let centres: Vec<f64> = (0..)
        .map(|m| first + m as f64 * tau)
        .take_while(|c| *c <= n as f64 - 1.0 + tau)
        .collect();
    // Box profile sampled at a quarter voxel (at least 8 points per slice).
    let samples = ((tau * 4.0).ceil() as usize).max(8);
    let offsets: Vec<f64> = (0..samples)
        .map(|s| ((s as f64 + 0.5) / samples as f64 - 0.5) * tau)
        .collect();
    // Every lane samples the same positions: their taps are found once.
    let taps: Vec<Vec<Tap>> = centres
        .iter()
        .map(|c| offsets.iter().map(|o| Tap::at(n, c + o)).collect())
        .collect();
    let back: Vec<(usize, f32)> = (0..n)
        .map(|x| {
            let t = (x as f64 - first) / tau;
            let m = (t.floor().max(0.0) as usize).min(centres.len() - 2);
            (m, (t - m as f64).clamp(0.0, 1.0) as f32)
        })
        .collect();
    ndarray::Zip::from(image.lanes_mut(Axis(axis))).par_for_each(|mut lane| {
        let line: Vec<f32> = lane.iter().copied().collect();
        let acquired: Vec<f32> = taps
            .iter()
            .map(|slice| {
                let sum: f64 = slice.iter().map(|tap| tap.sample(&line) as f64).sum();
                (sum / samples as f64) as f32
            })
            .collect();
        for (v, &(m, w)) in lane.iter_mut().zip(&back) {
            *v = acquired[m] * (1.0 - w) + acquired[m + 1] * w;
        }
    });
}

/// Linear interpolation at a fractional index of a line of `n` values, clamped to its ends: the
/// lower neighbour and the upper one's weight (`None` past the last value).
#[derive(Debug, Clone, Copy)]
struct Tap {
    index: usize,
    weight: Option<f32>,
}

impl Tap {
    fn at(n: usize, x: f64) -> Tap {
        let last = n - 1;
        let x = x.clamp(0.0, last as f64);
        let index = (x.floor() as usize).min(last);
        let weight = (index != last).then_some((x - index as f64) as f32);
        Tap { index, weight }
    }

    fn sample(self, line: &[f32]) -> f32 {
        match self.weight {
            None => line[self.index],
            Some(w) => line[self.index] * (1.0 - w) + line[self.index + 1] * w,
        }
    }
}

/// Adds noise of standard deviation `sigma` to every voxel: Gaussian, or Rician (the magnitude of
/// the signal plus complex Gaussian noise, which lifts dark regions to the Rayleigh floor as in
/// magnitude MR).
pub fn add_noise(image: &mut Array3<f32>, sigma: f64, kind: NoiseKind, rng: &mut impl Rng) {
    if sigma <= 0.0 {
        return;
    }
    let normal = rand_distr::Normal::new(0.0, sigma).expect("positive sigma");
    for v in image.iter_mut() {
        let n1: f64 = rng.sample(normal);
        *v = match kind {
            NoiseKind::Gaussian => (*v as f64 + n1) as f32,
            NoiseKind::Rician => {
                let n2: f64 = rng.sample(normal);
                ((*v as f64 + n1).powi(2) + n2 * n2).sqrt() as f32
            }
        };
    }
}

/// A share drawn uniformly from `[lo, hi]` (a degenerate or reversed range gives `lo`).
pub fn draw(range: [f64; 2], rng: &mut impl Rng) -> f64 {
    let [lo, hi] = range;
    if hi > lo {
        rng.random_range(lo..=hi)
    } else {
        lo
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// 10–90 % rise distance (voxels) of a rising edge profile.
    fn rise(profile: &[f32]) -> f64 {
        let (lo, hi) = (profile[0] as f64, profile[profile.len() - 1] as f64);
        let cross = |level: f64| {
            let t = lo + level * (hi - lo);
            let i = profile.iter().position(|v| *v as f64 >= t).unwrap();
            let (a, b) = (profile[i - 1] as f64, profile[i] as f64);
            i as f64 - 1.0 + (t - a) / (b - a)
        };
        cross(0.9) - cross(0.1)
    }

    #[test]
    fn thick_slices_blur_a_sharp_edge_to_the_slice_thickness() {
        // A step edge along k on a 1 mm grid, 96 slices; simulate 2-8 mm slices at several phases.
        for thickness in [2.0, 3.0, 5.0, 6.5, 8.0] {
            for phase in [0.0, 0.3, 0.7] {
                let mut img = Array3::from_shape_fn((96, 2, 3), |(k, _, _)| (k >= 48) as u8 as f32);
                simulate_thick_slices(&mut img, 0, 1.0, thickness, phase);
                let profile: Vec<f32> = (0..96).map(|k| img[[k, 1, 2]]).collect();
                // A box of width T followed by linear interpolation between slices T apart: the
                // 10–90 % rise of an ideal step lies between 0.8 T and 1.6 T; the sampled edge
                // itself rises over one voxel, which widens that by up to half a voxel.
                let r = rise(&profile);
                assert!(
                    (0.8 * thickness - 0.3..=1.6 * thickness + 0.5).contains(&r),
                    "{thickness} mm, phase {phase}: rise {r:.2} mm"
                );
                // Far from the edge the values are unchanged; every lane is treated the same.
                assert!(profile[..10].iter().all(|v| v.abs() < 1e-6));
                assert!(profile[86..].iter().all(|v| (v - 1.0).abs() < 1e-6));
                assert_eq!(img[[50, 0, 0]], img[[50, 1, 2]]);
            }
        }
        // At the voxel size the image is untouched; the through-plane axis only is affected.
        let orig = Array3::from_shape_fn((8, 8, 8), |(k, j, i)| (k * 64 + j * 8 + i) as f32);
        let mut same = orig.clone();
        simulate_thick_slices(&mut same, 1, 2.0, 2.0, 0.4);
        assert_eq!(same, orig);
        let mut img = Array3::from_shape_fn((4, 4, 40), |(_, _, i)| (i >= 20) as u8 as f32);
        simulate_thick_slices(&mut img, 0, 1.0, 5.0, 0.0);
        assert!(
            img.iter().all(|v| *v == 0.0 || *v == 1.0),
            "axis 0 must not touch an i-edge"
        );
    }

    #[test]
    fn noise_has_the_asked_spread_and_rician_lifts_the_background() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut img = Array3::<f32>::from_elem((20, 50, 50), 100.0);
        add_noise(&mut img, 5.0, NoiseKind::Gaussian, &mut rng);
        let n = img.len() as f64;
        let mean = img.iter().map(|v| *v as f64).sum::<f64>() / n;
        let sd = (img.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!(
            (mean - 100.0).abs() < 0.1 && (sd - 5.0).abs() < 0.1,
            "{mean} {sd}"
        );
        // Rician noise on zero signal is Rayleigh: mean σ·sqrt(π/2).
        let mut dark = Array3::<f32>::zeros((20, 50, 50));
        add_noise(&mut dark, 5.0, NoiseKind::Rician, &mut rng);
        let mean = dark.iter().map(|v| *v as f64).sum::<f64>() / n;
        assert!(
            (mean - 5.0 * (std::f64::consts::PI / 2.0).sqrt()).abs() < 0.1,
            "{mean}"
        );
        assert!(dark.iter().all(|v| *v >= 0.0));
    }
}
