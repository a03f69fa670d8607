//! Confidence calibration: a single temperature `T` fitted by minimising the negative
//! log-likelihood of `softmax(logits / T)` (Guo et al., 2017), and reliability bins for the expected
//! calibration error (ECE) and the Brier score of a foreground probability.
//!
//! The ECE here is the binary one of the foreground probability `p = 1 − P(background)`: `p` is
//! binned into equal-width bins on `[0, 1]`, and each bin's mean `p` is compared with the share of
//! its voxels (or lesions) that are foreground. `ECE = Σ_b (n_b / n) · |mean p_b − share_b|`.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

pub use crate::io::layout::{Calibration, ReliabilityBin};

/// Bins of the reliability diagram and the ECE (Guo et al. use 15).
pub const ECE_BINS: usize = 15;

/// Weighted counts of (probability, outcome) pairs in equal-width probability bins, plus the
/// squared error for the Brier score. Weights let a stratified sample stand for its population.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reliability {
    /// Pairs per bin (unweighted).
    pub counts: Vec<u64>,
    /// Summed weights per bin.
    pub weights: Vec<f64>,
    /// Weighted sums of the probability per bin.
    pub probability: Vec<f64>,
    /// Weighted sums of the outcome (1 = foreground) per bin.
    pub positives: Vec<f64>,
    /// Weighted sum of `(p − y)²`.
    pub squared_error: f64,
}

impl Default for Reliability {
    fn default() -> Self {
        Reliability {
            counts: vec![0; ECE_BINS],
            weights: vec![0.0; ECE_BINS],
            probability: vec![0.0; ECE_BINS],
            positives: vec![0.0; ECE_BINS],
            squared_error: 0.0,
        }
    }
}

impl Reliability {
    /// Adds one pair of weight `w`; a non-finite probability is skipped.
    pub fn add(&mut self, p: f64, positive: bool, w: f64) {
        if !p.is_finite() {
            return;
        }
        let p = p.clamp(0.0, 1.0);
        let b = ((p * ECE_BINS as f64) as usize).min(ECE_BINS - 1);
        let y = if positive { 1.0 } else { 0.0 };
        self.counts[b] += 1;
        self.weights[b] += w;
        self.probability[b] += w * p;
        self.positives[b] += w * y;
        self.squared_error += w * (p - y) * (p - y);
    }

    /// Adds another's counts.
    pub fn merge(&mut self, other: &Reliability) {
        for b in 0..ECE_BINS {
            self.counts[b] += other.counts[b];
            self.weights[b] += other.weights[b];
            self.probability[b] += other.probability[b];
            self.positives[b] += other.positives[b];
        }
        self.squared_error += other.squared_error;
    }

    /// Summed weight of every pair.
    pub fn total(&self) -> f64 {
        self.weights.iter().sum()
    }

    /// The expected calibration error; `None` without pairs.
    pub fn ece(&self) -> Option<f64> {
        let total = self.total();
        (total > 0.0).then(|| {
            (0..ECE_BINS)
                .filter(|&b| self.weights[b] > 0.0)
                .map(|b| (self.probability[b] - self.positives[b]).abs())
                .sum::<f64>()
                / total
        })
    }

    /// The Brier score (mean squared error of the probability); `None` without pairs.
    pub fn brier(&self) -> Option<f64> {
        let total = self.total();
        (total > 0.0).then(|| self.squared_error / total)
    }

    /// The reliability diagram's rows: bin edges, count, mean probability and observed share.
    pub fn bins(&self) -> Vec<ReliabilityBin> {
        (0..ECE_BINS)
            .map(|b| {
                let w = self.weights[b];
                ReliabilityBin {
                    lower: b as f64 / ECE_BINS as f64,
                    upper: (b + 1) as f64 / ECE_BINS as f64,
                    count: self.counts[b],
                    mean_probability: (w > 0.0).then(|| self.probability[b] / w),
                    observed: (w > 0.0).then(|| self.positives[b] / w),
                }
            })
            .collect()
    }
}

/// Voxels of a validation set, sampled with their logits and labels: foreground and background
/// are sampled apart (each up to its own capacity, by reservoir sampling), and each sample carries
/// the weight that makes its stratum count as in the population.
#[derive(Debug, Clone)]
pub struct LogitSamples {
    /// Classes per sample.
    pub classes: usize,
    /// `classes` logits per sample.
    pub logits: Vec<f32>,
    /// Label value per sample.
    pub labels: Vec<u8>,
    /// Weight per sample.
    pub weights: Vec<f64>,
}

/// Reservoir sampling of `(logits, label)` into two strata (background, foreground).
pub struct StratifiedSampler {
    classes: usize,
    capacity: [usize; 2],
    seen: [u64; 2],
    logits: [Vec<f32>; 2],
    labels: [Vec<u8>; 2],
    rng: StdRng,
}

impl StratifiedSampler {
    /// Keeps up to `background` and `foreground` samples of `classes` logits each.
    pub fn new(classes: usize, background: usize, foreground: usize, seed: u64) -> Self {
        StratifiedSampler {
            classes,
            capacity: [background, foreground],
            seen: [0; 2],
            logits: [Vec::new(), Vec::new()],
            labels: [Vec::new(), Vec::new()],
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Offers one voxel: its logits (`classes` values) and its label.
    pub fn offer(&mut self, logits: impl Iterator<Item = f32>, label: u8) {
        let s = (label > 0) as usize;
        self.seen[s] += 1;
        let kept = self.labels[s].len();
        let slot = if kept < self.capacity[s] {
            self.labels[s].push(label);
            self.logits[s].extend(std::iter::repeat_n(0.0, self.classes));
            kept
        } else {
            let r = self.rng.random_range(0..self.seen[s]) as usize;
            if r >= self.capacity[s] {
                return;
            }
            self.labels[s][r] = label;
            r
        };
        let row = &mut self.logits[s][slot * self.classes..(slot + 1) * self.classes];
        for (o, v) in row.iter_mut().zip(logits) {
            *o = v;
        }
    }

    /// The samples, each weighted by its stratum's population over its sample count.
    pub fn finish(self) -> LogitSamples {
        let mut out = LogitSamples {
            classes: self.classes,
            logits: Vec::new(),
            labels: Vec::new(),
            weights: Vec::new(),
        };
        for s in 0..2 {
            let n = self.labels[s].len();
            if n == 0 {
                continue;
            }
            let w = self.seen[s] as f64 / n as f64;
            out.logits.extend_from_slice(&self.logits[s]);
            out.labels.extend_from_slice(&self.labels[s]);
            out.weights.extend(std::iter::repeat_n(w, n));
        }
        out
    }
}

impl LogitSamples {
    /// Samples held.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Weighted mean negative log-likelihood of the labels under `softmax(logits / t)`.
    pub fn nll(&self, t: f64) -> f64 {
        let k = self.classes;
        let mut sum = 0.0;
        let mut total = 0.0;
        for (n, (&y, &w)) in self.labels.iter().zip(&self.weights).enumerate() {
            let z = &self.logits[n * k..(n + 1) * k];
            let lse = log_sum_exp(z, t);
            // A label beyond the logits (not a class of the model) costs nothing.
            let zy = z.get(y as usize).map_or(lse, |&v| v as f64 / t);
            sum += w * (lse - zy);
            total += w;
        }
        if total > 0.0 {
            sum / total
        } else {
            0.0
        }
    }

    /// Reliability of the foreground probability `1 − softmax(logits / t)[0]`.
    pub fn reliability(&self, t: f64) -> Reliability {
        let k = self.classes;
        let mut r = Reliability::default();
        for (n, (&y, &w)) in self.labels.iter().zip(&self.weights).enumerate() {
            let z = &self.logits[n * k..(n + 1) * k];
            let background = (z[0] as f64 / t - log_sum_exp(z, t)).exp();
            r.add(1.0 - background, y > 0, w);
        }
        r
    }
}

/// `ln Σ exp(z / t)`, computed from the largest term so it cannot overflow.
fn log_sum_exp(z: &[f32], t: f64) -> f64 {
    let max = z
        .iter()
        .fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64 / t));
    max + z
        .iter()
        .map(|&v| (v as f64 / t - max).exp())
        .sum::<f64>()
        .ln()
}

/// Temperatures searched (beyond them a model is not miscalibrated but broken).
pub const TEMPERATURE_RANGE: [f64; 2] = [0.05, 20.0];

/// The temperature minimising [`LogitSamples::nll`]: golden-section search over `ln T` (the NLL
/// is convex in `1/T`, so unimodal in `ln T`), to a relative precision of about 1e-6.
pub fn fit_temperature(samples: &LogitSamples) -> f64 {
    let phi = (5f64.sqrt() - 1.0) / 2.0;
    let f = |x: f64| samples.nll(x.exp());
    let (mut a, mut b) = (TEMPERATURE_RANGE[0].ln(), TEMPERATURE_RANGE[1].ln());
    let mut c = b - phi * (b - a);
    let mut d = a + phi * (b - a);
    let (mut fc, mut fd) = (f(c), f(d));
    while b - a > 1e-6 {
        if fc < fd {
            b = d;
            d = c;
            fd = fc;
            c = b - phi * (b - a);
            fc = f(c);
        } else {
            a = c;
            c = d;
            fc = fd;
            d = a + phi * (b - a);
            fd = f(d);
        }
    }
    ((a + b) / 2.0).exp()
}

/// Fits the temperature on `samples` and records the fit with the validation NLL and ECE at
/// `T = 1` and at the fitted `T`.
pub fn calibrate(samples: &LogitSamples) -> Calibration {
    let temperature = fit_temperature(samples);
    let before = samples.reliability(1.0);
    let after = samples.reliability(temperature);
    Calibration {
        temperature,
        samples: samples.len(),
        nll_before: samples.nll(1.0),
        nll_after: samples.nll(temperature),
        ece_before: before.ece().unwrap_or(0.0),
        ece_after: after.ece().unwrap_or(0.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Labels drawn from `softmax(z)` of random logits `z`, stored as `3 z`: the fit must
    /// undo the factor.
    #[test]
    fn temperature_recovers_a_known_logit_scale() {
        let mut rng = StdRng::seed_from_u64(5);
        let k = 3;
        let mut sampler = StratifiedSampler::new(k, 20_000, 20_000, 1);
        for _ in 0..40_000 {
            let z: Vec<f64> = (0..k).map(|_| rng.random_range(-3.0..3.0)).collect();
            let e: Vec<f64> = z.iter().map(|v| v.exp()).collect();
            let s: f64 = e.iter().sum();
            let u: f64 = rng.random_range(0.0..1.0);
            let mut acc = 0.0;
            let mut y = k - 1;
            for (c, v) in e.iter().enumerate() {
                acc += v / s;
                if u < acc {
                    y = c;
                    break;
                }
            }
            sampler.offer(z.iter().map(|v| (3.0 * v) as f32), y as u8);
        }
        let samples = sampler.finish();
        let t = fit_temperature(&samples);
        assert!((t - 3.0).abs() < 0.15, "fitted T = {t}");
        let fit = calibrate(&samples);
        assert!(fit.nll_after < fit.nll_before);
        assert!(fit.ece_after < fit.ece_before);
    }

    /// Strata keep their capacity and carry population weights.
    #[test]
    fn stratified_samples_weigh_back_to_the_population() {
        let mut s = StratifiedSampler::new(2, 10, 5, 0);
        for n in 0..1000 {
            s.offer([0.0f32, 1.0].into_iter(), (n % 100 == 0) as u8);
        }
        let out = s.finish();
        assert_eq!(out.len(), 15);
        let total: f64 = out.weights.iter().sum();
        assert!((total - 1000.0).abs() < 1e-9);
        let fg: f64 = out
            .labels
            .iter()
            .zip(&out.weights)
            .filter(|(l, _)| **l > 0)
            .map(|(_, w)| w)
            .sum();
        assert!((fg - 10.0).abs() < 1e-9);
    }

    /// ECE and Brier by hand: bins [0.1, 0.1, 0.9] with outcomes [0, 1, 1] → bin 1 (0.0667–
    /// 0.1333): mean 0.1, share 0.5, two pairs; bin 13: mean 0.9, share 1, one pair.
    /// ECE = (2 · 0.4 + 1 · 0.1) / 3 = 0.3; Brier = (0.01 + 0.81 + 0.01) / 3.
    #[test]
    fn ece_and_brier_match_the_hand_computation() {
        let mut r = Reliability::default();
        r.add(0.1, false, 1.0);
        r.add(0.1, true, 1.0);
        r.add(0.9, true, 1.0);
        assert!((r.ece().unwrap() - 0.3).abs() < 1e-12);
        assert!((r.brier().unwrap() - 0.83 / 3.0).abs() < 1e-12);
        let bins = r.bins();
        assert_eq!(bins.len(), ECE_BINS);
        assert_eq!(bins[1].count, 2);
        assert_eq!(bins[1].observed, Some(0.5));
        assert_eq!(bins[13].count, 1);
        assert_eq!(bins[0].mean_probability, None);
        assert_eq!(bins.iter().map(|b| b.count).sum::<u64>(), 3);
        assert_eq!(Reliability::default().ece(), None);
    }
}
