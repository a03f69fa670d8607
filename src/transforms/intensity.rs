//! Intensity normalisation per channel: CT windowing with dataset-wide statistics, MR z-score per
//! scan (nnU-Net's `CTNormalization` and `ZScoreNormalization`).

use ndarray::ArrayViewMut3;
use rayon::prelude::*;

use crate::config::{IntensityConfig, IntensityScheme};
use crate::error::{Error, Result};

/// A resolved normalisation: every number it needs is known.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Normalization {
    /// Clip to `[low, high]`, then `(x - mean) / std`.
    Ct {
        /// Lower clip bound, in the scan's units (HU for CT).
        low: f32,
        /// Upper clip bound, in the scan's units (HU for CT).
        high: f32,
        /// Mean subtracted after clipping.
        mean: f32,
        /// Standard deviation divided by after clipping.
        std: f32,
    },
    /// `(x - mean) / std` with the scan's own statistics (over non-zero voxels when `masked`, zero
    /// kept outside).
    ZScore {
        /// Statistics over non-zero voxels only, zero voxels left at zero (skull-stripped MR).
        masked: bool,
    },
    /// `(x - mean) / std` with the statistics of the scan's voxels above its own mean.
    ZScoreForeground,
    /// Values unchanged.
    None,
}

/// Percentiles of the foreground that bound the CT window (nnU-Net).
pub const CT_PERCENTILES: [f64; 2] = [0.5, 99.5];

impl Normalization {
    /// Resolves a channel's config; `foreground` samples intensities under the training labels
    /// and is needed only for a `ct` scheme with unset numbers.
    pub fn resolve(
        config: &IntensityConfig,
        foreground: Option<&[f32]>,
        masked: bool,
    ) -> Result<Self> {
        match config.scheme {
            IntensityScheme::Ct => {
                let needs_stats =
                    config.window.len() != 2 || config.mean.is_none() || config.std.is_none();
                let samples =
                    match (needs_stats, foreground) {
                        (true, Some(s)) if !s.is_empty() => Some(s),
                        (true, _) => return Err(Error::Config {
                            reason:
                                "the ct scheme needs window, mean and std, or labelled training \
                                     cases to compute them from"
                                    .into(),
                        }),
                        (false, _) => None,
                    };
                let (low, high) = match (&config.window[..], samples) {
                    ([lo, hi], _) => (*lo as f32, *hi as f32),
                    (_, Some(s)) => {
                        let p = percentiles(s, &CT_PERCENTILES);
                        (p[0], p[1])
                    }
                    _ => unreachable!("samples exist when the window is unset"),
                };
                let (mean, std) = match (config.mean, config.std, samples) {
                    (Some(m), Some(s), _) => (m as f32, s as f32),
                    (_, _, Some(s)) => {
                        let clipped: Vec<f32> = s.iter().map(|v| v.clamp(low, high)).collect();
                        mean_std(&clipped)
                    }
                    _ => unreachable!("samples exist when mean or std is unset"),
                };
                Ok(Normalization::Ct {
                    low,
                    high,
                    mean,
                    std: std.max(1e-6),
                })
            }
            IntensityScheme::Zscore => Ok(Normalization::ZScore { masked }),
            IntensityScheme::ZscoreForeground => Ok(Normalization::ZScoreForeground),
            IntensityScheme::None => Ok(Normalization::None),
        }
    }

    /// The config that reproduces this normalisation exactly (saved with the run).
    pub fn to_config(&self) -> IntensityConfig {
        match *self {
            Normalization::Ct {
                low,
                high,
                mean,
                std,
            } => IntensityConfig {
                scheme: IntensityScheme::Ct,
                window: vec![low as f64, high as f64],
                mean: Some(mean as f64),
                std: Some(std as f64),
            },
            Normalization::ZScore { .. } => IntensityConfig::default(),
            Normalization::ZScoreForeground => IntensityConfig {
                scheme: IntensityScheme::ZscoreForeground,
                ..IntensityConfig::default()
            },
            Normalization::None => IntensityConfig {
                scheme: IntensityScheme::None,
                ..IntensityConfig::default()
            },
        }
    }

    /// Normalises one channel `[k, j, i]` in place.
    pub fn apply(&self, mut channel: ArrayViewMut3<f32>) {
        let Some(data) = channel.as_slice_memory_order_mut() else {
            return;
        };
        match *self {
            Normalization::Ct {
                low,
                high,
                mean,
                std,
            } => data
                .par_iter_mut()
                .for_each(|v| *v = (v.clamp(low, high) - mean) / std),
            Normalization::ZScore { masked } => {
                let values: Vec<f32> = if masked {
                    data.iter().copied().filter(|v| *v != 0.0).collect()
                } else {
                    data.to_vec()
                };
                if values.is_empty() {
                    return;
                }
                let (mean, std) = mean_std(&values);
                let std = std.max(1e-6);
                data.par_iter_mut().for_each(|v| {
                    if !masked || *v != 0.0 {
                        *v = (*v - mean) / std;
                    }
                });
            }
            Normalization::ZScoreForeground => {
                let finite: Vec<f32> = data.iter().copied().filter(|v| v.is_finite()).collect();
                if finite.is_empty() {
                    return;
                }
                let (all_mean, _) = mean_std(&finite);
                let tissue: Vec<f32> = finite.into_iter().filter(|v| *v > all_mean).collect();
                if tissue.is_empty() {
                    return;
                }
                let (mean, std) = mean_std(&tissue);
                let std = std.max(1e-6);
                data.par_iter_mut().for_each(|v| *v = (*v - mean) / std);
            }
            Normalization::None => {}
        }
    }
}

/// Normalises each channel of `[C, D, H, W]` voxels with its own scheme.
pub fn normalize_channels(image: &mut ndarray::Array4<f32>, normalization: &[Normalization]) {
    for (c, n) in normalization.iter().enumerate() {
        n.apply(image.index_axis_mut(ndarray::Axis(0), c));
    }
}

/// Mean and standard deviation, accumulated in f64.
pub fn mean_std(values: &[f32]) -> (f32, f32) {
    let n = values.len().max(1) as f64;
    let mean = values.iter().map(|v| *v as f64).sum::<f64>() / n;
    let var = values
        .iter()
        .map(|v| (*v as f64 - mean).powi(2))
        .sum::<f64>()
        / n;
    (mean as f32, var.sqrt() as f32)
}

/// NumPy's default percentile (linear interpolation between closest ranks) of ascending `sorted`
/// values, `q` in percent.
fn interpolate_sorted(sorted: &[f64], q: f64) -> f64 {
    let x = q / 100.0 * (sorted.len() - 1) as f64;
    let (i0, t) = (x.floor() as usize, x - x.floor());
    let i1 = (i0 + 1).min(sorted.len() - 1);
    sorted[i0] * (1.0 - t) + sorted[i1] * t
}

/// NumPy's default percentile of `values` (sorted in place), `q` in percent; NaN when empty.
pub fn percentile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    interpolate_sorted(values, q)
}

/// Percentiles of the finite `values` (see [`percentile`]), `q` in percent; zeros when none is
/// finite.
pub fn percentiles(values: &[f32], q: &[f64]) -> Vec<f32> {
    let mut sorted: Vec<f64> = values
        .iter()
        .filter(|v| v.is_finite())
        .map(|&v| v as f64)
        .collect();
    if sorted.is_empty() {
        return vec![0.0; q.len()];
    }
    sorted.sort_by(f64::total_cmp);
    q.iter()
        .map(|&p| interpolate_sorted(&sorted, p) as f32)
        .collect()
}

/// The grey-level window of a picture of `values`: their 1st and 99th percentiles.
pub fn display_window(values: &[f32]) -> [f64; 2] {
    let mut v: Vec<f64> = values.iter().map(|&x| x as f64).collect();
    let lo = percentile(&mut v, 1.0);
    [lo, percentile(&mut v, 99.0).max(lo + 1e-6)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array3;

    #[test]
    fn foreground_zscore_ignores_how_much_air_surrounds_the_tissue() {
        // Tissue 100 ± 10 (alternating), air 2: a small and a four-times larger field of view.
        let tissue = |n: usize| (0..n).map(|i| if i % 2 == 0 { 90.0 } else { 110.0 });
        let scan = |air: usize| {
            let v: Vec<f32> = tissue(1000).chain(std::iter::repeat_n(2.0, air)).collect();
            let n = v.len();
            let mut a = Array3::from_shape_vec((1, 1, n), v).unwrap();
            Normalization::ZScoreForeground.apply(a.view_mut());
            a
        };
        let (small, large) = (scan(500), scan(4000));
        for i in 0..1000 {
            assert!((small[[0, 0, i]] - large[[0, 0, i]]).abs() < 1e-5);
        }
        assert!((small[[0, 0, 0]] + 1.0).abs() < 1e-5 && (small[[0, 0, 1]] - 1.0).abs() < 1e-5);
        // A plain z-score moves with the air.
        let mut plain = Array3::from_shape_vec(
            (1, 1, 1500),
            tissue(1000).chain(std::iter::repeat_n(2.0, 500)).collect(),
        )
        .unwrap();
        Normalization::ZScore { masked: false }.apply(plain.view_mut());
        assert!((plain[[0, 0, 0]] - small[[0, 0, 0]]).abs() > 0.1);
    }

    #[test]
    fn ct_window_from_foreground_matches_numpy() {
        let fg: Vec<f32> = (0..=1000).map(|v| v as f32).collect();
        // numpy.percentile(arange(1001), [0.5, 99.5]) = [5, 995]
        assert_eq!(percentiles(&fg, &CT_PERCENTILES), vec![5.0, 995.0]);
        let n = Normalization::resolve(
            &IntensityConfig {
                scheme: IntensityScheme::Ct,
                ..Default::default()
            },
            Some(&fg),
            false,
        )
        .unwrap();
        let Normalization::Ct {
            low, high, mean, ..
        } = n
        else {
            panic!("{n:?}")
        };
        assert_eq!((low, high, mean), (5.0, 995.0, 500.0));
        let mut vol = Array3::from_elem([1, 1, 2], 2000.0f32);
        n.apply(vol.view_mut());
        let Normalization::Ct { std, .. } = n else {
            unreachable!()
        };
        assert!((vol[[0, 0, 0]] - (995.0 - 500.0) / std).abs() < 1e-4);
        // The resolved numbers round-trip through the config.
        assert_eq!(
            Normalization::resolve(&n.to_config(), None, false).unwrap(),
            n
        );
    }

    #[test]
    fn masked_zscore_leaves_background() {
        let mut vol = Array3::from_shape_vec([1, 1, 4], vec![0.0f32, 1.0, 2.0, 3.0]).unwrap();
        Normalization::ZScore { masked: true }.apply(vol.view_mut());
        assert_eq!(vol[[0, 0, 0]], 0.0);
        assert!((vol[[0, 0, 2]]).abs() < 1e-6);
    }
}
