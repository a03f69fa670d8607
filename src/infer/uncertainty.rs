//! Uncertainty from an ensemble of predictions of one scan (the mirrored passes of test-time
//! augmentation): per voxel, the running mean of every class probability and the running sum of
//! squared deviations (M2) of the foreground probability, updated one member at a time (Welford),
//! so only one member's probabilities are held besides the running sums. Each member's own class
//! map is kept (one byte per voxel and member) for per-lesion detection agreement.

use ndarray::{Array3, Array4, ArrayView4, Axis, Zip};

use crate::error::{Error, Result};
use crate::transforms::post::{decide_classes, ClassRule};

/// Members one lesion's agreement can count (a bit each).
pub const MAX_MEMBERS: usize = 64;

/// Running per-voxel statistics over ensemble members, on the preprocessed grid.
#[derive(Debug, Clone)]
pub struct MemberStats {
    /// Members added so far.
    pub members: usize,
    /// `[K, D, H, W]` mean class probabilities (the ensemble's prediction).
    pub mean: Array4<f32>,
    /// `[D, H, W]` sum of squared deviations of the foreground probability `1 − p₀`.
    m2: Array3<f32>,
    /// Each member's class map `[D, H, W]` (the same threshold rule as the final map).
    pub decisions: Vec<Array3<u8>>,
    rule: Option<ClassRule>,
}

/// A voxel's uncertainty, as the lesion table aggregates it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VoxelUncertainty {
    /// Normalised entropy of the mean foreground probability.
    pub entropy: f32,
    /// Standard deviation of the foreground probability across members.
    pub std: f32,
    /// Bit `m` set when member `m` decided the asked class here.
    pub detected_by: u64,
}

/// Binary entropy of `p` in bits, so in `[0, 1]`: 0 at `p ∈ {0, 1}`, 1 at `p = 0.5`.
pub fn binary_entropy(p: f32) -> f32 {
    let p = p.clamp(0.0, 1.0) as f64;
    let h = |x: f64| if x > 0.0 { -x * x.log2() } else { 0.0 };
    (h(p) + h(1.0 - p)) as f32
}

impl MemberStats {
    /// Empty statistics; members' class maps use `rule` as [`decide_classes`] does.
    pub fn new(rule: Option<ClassRule>) -> Self {
        MemberStats {
            members: 0,
            mean: Array4::zeros([0, 0, 0, 0]),
            m2: Array3::zeros([0, 0, 0]),
            decisions: Vec::new(),
            rule,
        }
    }

    /// Adds one member's probabilities `[K, D, H, W]`.
    pub fn add(&mut self, probs: ArrayView4<f32>) -> Result<()> {
        if self.members == 0 {
            let (_, d, h, w) = probs.dim();
            self.mean = Array4::zeros(probs.raw_dim());
            self.m2 = Array3::zeros([d, h, w]);
        } else if probs.dim() != self.mean.dim() {
            return Err(Error::Config {
                reason: format!(
                    "ensemble member of shape {:?} added to members of shape {:?}",
                    probs.dim(),
                    self.mean.dim()
                ),
            });
        }
        if self.members == MAX_MEMBERS {
            return Err(Error::Config {
                reason: format!("at most {MAX_MEMBERS} ensemble members"),
            });
        }
        self.members += 1;
        let n = self.members as f32;
        // Foreground M2 first: it needs the mean before and after this member.
        Zip::from(&mut self.m2)
            .and(self.mean.index_axis(Axis(0), 0))
            .and(probs.index_axis(Axis(0), 0))
            .for_each(|m2, &mean_bg, &p_bg| {
                let (old, x) = (1.0 - mean_bg, 1.0 - p_bg);
                let new = old + (x - old) / n;
                *m2 += (x - old) * (x - new);
            });
        Zip::from(&mut self.mean)
            .and(probs)
            .for_each(|m, &p| *m += (p - *m) / n);
        self.decisions
            .push(decide_classes(probs, self.rule.as_ref()));
        Ok(())
    }

    /// `[D, H, W]` mean foreground probability.
    pub fn foreground(&self) -> Array3<f32> {
        self.mean.index_axis(Axis(0), 0).mapv(|p| 1.0 - p)
    }

    /// The mean probabilities (the ensemble's prediction) and the rest, which no longer needs them.
    pub fn into_parts(self) -> (Array4<f32>, MemberSpread) {
        let spread = MemberSpread {
            members: self.members,
            m2: self.m2,
            decisions: self.decisions,
        };
        (self.mean, spread)
    }
}

/// What [`MemberStats`] knows beside the mean: the foreground's M2 and each member's class map.
#[derive(Debug, Clone)]
pub struct MemberSpread {
    /// Members.
    pub members: usize,
    m2: Array3<f32>,
    decisions: Vec<Array3<u8>>,
}

impl MemberSpread {
    /// `[D, H, W]` population variance of the foreground probability across members.
    pub fn variance(&self) -> Array3<f32> {
        let n = self.members.max(1) as f32;
        self.m2.mapv(|m| (m / n).max(0.0))
    }

    /// The uncertainty at grid voxel `[z, y, x]`, whose mean foreground probability is `fg`, for
    /// lesions of `class`.
    pub fn at(&self, class: u32, [z, y, x]: [usize; 3], fg: f32) -> VoxelUncertainty {
        let variance = (self.m2[[z, y, x]] / self.members.max(1) as f32).max(0.0);
        let detected_by = self
            .decisions
            .iter()
            .enumerate()
            .filter(|(_, d)| d[[z, y, x]] as u32 == class)
            .fold(0u64, |bits, (m, _)| bits | 1 << m);
        VoxelUncertainty {
            entropy: binary_entropy(fg),
            std: variance.sqrt(),
            detected_by,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    /// Two-class member outputs `[2, 1, 1, n]` from foreground probabilities.
    fn member(fg: &[f32]) -> Array4<f32> {
        Array4::from_shape_fn([2, 1, 1, fg.len()], |(c, _, _, i)| {
            if c == 1 {
                fg[i]
            } else {
                1.0 - fg[i]
            }
        })
    }

    #[test]
    fn entropy_is_zero_where_members_agree_and_one_at_a_coin_toss() {
        let mut s = MemberStats::new(Some(ClassRule::binary(0.5)));
        // Voxel 0: all members say 0; voxel 1: all say 1; voxel 2: half 0, half 1; voxel 3:
        // all 0.5.
        for m in 0..4 {
            let split = if m % 2 == 0 { 0.0 } else { 1.0 };
            s.add(member(&[0.0, 1.0, split, 0.5]).view()).unwrap();
        }
        let fg = s.foreground();
        let (_, spread) = s.into_parts();
        let h: Vec<f32> = fg.iter().map(|&p| binary_entropy(p)).collect();
        assert_eq!(h[0], 0.0);
        assert_eq!(h[1], 0.0);
        assert!((h[2] - 1.0).abs() < 1e-6 && (h[3] - 1.0).abs() < 1e-6);
        // Variance separates the split voxel (members disagree) from the unsure one.
        let v = spread.variance();
        assert!((v[[0, 0, 2]] - 0.25).abs() < 1e-6);
        assert!(v[[0, 0, 3]].abs() < 1e-7 && v[[0, 0, 0]].abs() < 1e-7);
        // Members 1 and 3 decided foreground at the split voxel.
        assert_eq!(spread.at(1, [0, 0, 2], 0.5).detected_by, 0b1010);
        assert_eq!(spread.at(1, [0, 0, 1], 1.0).detected_by, 0b1111);
        assert!((spread.at(1, [0, 0, 2], 0.5).std - 0.5).abs() < 1e-6);
    }

    #[test]
    fn welford_matches_the_two_pass_mean_and_variance() {
        let mut rng = StdRng::seed_from_u64(3);
        let (members, n) = (8, 500);
        let draws: Vec<Vec<f32>> = (0..members)
            .map(|_| (0..n).map(|_| rng.random_range(0.0..1.0)).collect())
            .collect();
        let mut s = MemberStats::new(None);
        for d in &draws {
            s.add(member(d).view()).unwrap();
        }
        let fg = s.foreground();
        // A member of another shape is refused.
        assert!(s.add(member(&[0.5]).view()).is_err());
        let var = s.into_parts().1.variance();
        for i in 0..n {
            let mean = draws.iter().map(|d| d[i] as f64).sum::<f64>() / members as f64;
            let two_pass = draws
                .iter()
                .map(|d| (d[i] as f64 - mean).powi(2))
                .sum::<f64>()
                / members as f64;
            assert!((fg[[0, 0, i]] as f64 - mean).abs() < 1e-5);
            assert!((var[[0, 0, i]] as f64 - two_pass).abs() < 1e-5);
        }
    }
}
