//! How a lesion looks against its tissue, in units of the local noise σ: hyper-intense,
//! hypo-intense, ring-enhancing around a necrotic core, or iso-intense inside a halo of oedema.
//! Contrast is set as a contrast-to-noise ratio, so it means the same on every host and contrast.

use rand::{Rng, RngExt};
use serde::{Deserialize, Serialize};

use super::scanner::draw as uniform;

pub use crate::io::layout::Polarity;

/// Relative rates of the polarities (normalised when drawn; 0 turns one off).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolarityRates {
    /// Brighter than the tissue (T2/FLAIR lesions, enhancing metastases).
    pub hyper: f64,
    /// Darker than the tissue (T1 hypo-intense lesions, CT hypodense metastases).
    pub hypo: f64,
    /// An enhancing rim around a darker necrotic core (glioblastoma, large metastases).
    pub ring: f64,
    /// Barely different from the tissue, inside a brighter or darker halo of oedema.
    pub iso_oedema: f64,
}

impl Default for PolarityRates {
    fn default() -> Self {
        PolarityRates {
            hyper: 0.3,
            hypo: 0.25,
            ring: 0.3,
            iso_oedema: 0.15,
        }
    }
}

impl PolarityRates {
    /// The rates in the order of [`Polarity::ALL`].
    pub fn weights(&self) -> [f64; 4] {
        [self.hyper, self.hypo, self.ring, self.iso_oedema]
    }

    /// Every rate finite and non-negative, and at least one positive.
    pub fn is_valid(&self) -> bool {
        let w = self.weights();
        w.iter().all(|r| r.is_finite() && *r >= 0.0) && w.iter().sum::<f64>() > 0.0
    }

    /// One polarity, with probability proportional to its rate.
    pub fn draw(&self, rng: &mut impl Rng) -> Polarity {
        let w = self.weights();
        let mut u = rng.random::<f64>() * w.iter().sum::<f64>();
        for (p, r) in Polarity::ALL.into_iter().zip(w) {
            if u < r {
                return p;
            }
            u -= r;
        }
        // Only reached through rounding at the top end: the last polarity with a positive rate.
        Polarity::ALL
            .into_iter()
            .zip(w)
            .rev()
            .find(|(_, r)| *r > 0.0)
            .map_or(Polarity::Hyper, |(p, _)| p)
    }
}

/// How a contrast-to-noise ratio is drawn from its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CnrScale {
    /// Uniformly.
    Linear,
    /// Log-uniformly (as many lesions in 1.5-3 as in 15-30).
    Log,
}

/// Lesion appearance settings (`[synth.appearance]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppearanceConfig {
    /// Contrast-to-noise ratio of the lesion (of the oedema for iso-intense ones), `[low, high]`.
    pub cnr: [f64; 2],
    /// How `cnr` is drawn: `linear` (uniform) or `log` (log-uniform: more faint lesions).
    pub cnr_scale: CnrScale,
    /// How often each polarity occurs.
    pub polarity: PolarityRates,
    /// Ring lesions: radius share of the necrotic core.
    pub core_fraction: [f64; 2],
    /// Ring lesions: the core's contrast, a share of the rim's, below the tissue.
    pub core_contrast: [f64; 2],
    /// Iso-intense lesions: oedema radius as a multiple of the lesion's.
    pub oedema_scale: [f64; 2],
    /// Iso-intense lesions: the lesion's own contrast, a share of the oedema's (either sign).
    pub iso_contrast: f64,
}

impl Default for AppearanceConfig {
    fn default() -> Self {
        AppearanceConfig {
            cnr: [1.5, 30.0],
            cnr_scale: CnrScale::Linear,
            polarity: PolarityRates::default(),
            core_fraction: [0.4, 0.7],
            core_contrast: [0.3, 1.0],
            oedema_scale: [1.4, 2.2],
            iso_contrast: 0.2,
        }
    }
}

impl AppearanceConfig {
    /// What is wrong with these settings, if anything.
    pub fn problem(&self) -> Option<String> {
        let ordered = |r: [f64; 2], lo: f64| r[0] >= lo && r[0] <= r[1] && r[1].is_finite();
        if !ordered(self.cnr, 1e-6) {
            return Some(format!(
                "cnr must be positive [low, high], not {:?}",
                self.cnr
            ));
        }
        if !self.polarity.is_valid() {
            return Some("polarity rates must be non-negative with one positive".into());
        }
        if !ordered(self.core_fraction, 0.0) || self.core_fraction[1] >= 1.0 {
            return Some("core_fraction must be [low, high] within [0, 1)".into());
        }
        if !ordered(self.core_contrast, 0.0) || !ordered(self.oedema_scale, 1.0) {
            return Some(
                "core_contrast must be [low, high] >= 0 and oedema_scale [low, high] >= 1".into(),
            );
        }
        if !(0.0..=1.0).contains(&self.iso_contrast) {
            return Some("iso_contrast must be in [0, 1]".into());
        }
        None
    }

    /// Draws one lesion's look.
    pub fn draw(&self, rng: &mut impl Rng) -> Appearance {
        let polarity = self.polarity.draw(rng);
        let [lo, hi] = self.cnr;
        let u = rng.random::<f64>();
        let cnr = match self.cnr_scale {
            CnrScale::Linear => lo + u * (hi - lo),
            CnrScale::Log => (lo.ln() + u * (hi.ln() - lo.ln())).exp(),
        };
        let sign = if rng.random::<bool>() { 1.0 } else { -1.0 };
        match polarity {
            Polarity::Hyper => Appearance::solid(polarity, cnr),
            Polarity::Hypo => Appearance::solid(polarity, -cnr),
            Polarity::Ring => Appearance {
                polarity,
                body: cnr,
                core: Some((
                    uniform(self.core_fraction, rng),
                    -cnr * uniform(self.core_contrast, rng),
                )),
                halo: None,
                cnr,
            },
            Polarity::IsoOedema => Appearance {
                polarity,
                body: sign * cnr * self.iso_contrast * (2.0 * rng.random::<f64>() - 1.0),
                core: None,
                halo: Some((uniform(self.oedema_scale, rng), sign * cnr)),
                cnr,
            },
        }
    }
}

/// One lesion's contrasts, in units of the local noise σ (multiply by σ for host units).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Appearance {
    /// The drawn polarity.
    pub polarity: Polarity,
    /// Contrast of the lesion (of the rim, for a ring).
    pub body: f64,
    /// Necrotic core: `(radius share, contrast)`.
    pub core: Option<(f64, f64)>,
    /// Oedema around the lesion, unlabelled: `(radius multiple, contrast)`.
    pub halo: Option<(f64, f64)>,
    /// The drawn contrast-to-noise ratio.
    pub cnr: f64,
}

impl Appearance {
    fn solid(polarity: Polarity, body: f64) -> Self {
        Appearance {
            polarity,
            body,
            core: None,
            halo: None,
            cnr: body.abs(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn every_polarity_occurs_at_its_configured_rate() {
        let config = AppearanceConfig {
            polarity: PolarityRates {
                hyper: 0.4,
                hypo: 0.2,
                ring: 0.3,
                iso_oedema: 0.1,
            },
            ..AppearanceConfig::default()
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let mut counts = [0usize; 4];
        let draws = 1000;
        for _ in 0..draws {
            let a = config.draw(&mut rng);
            counts[Polarity::ALL.iter().position(|p| *p == a.polarity).unwrap()] += 1;
            assert!((1.5..=30.0).contains(&a.cnr), "{}", a.cnr);
            match a.polarity {
                Polarity::Hyper => assert!(a.body > 0.0 && a.core.is_none() && a.halo.is_none()),
                Polarity::Hypo => assert!(a.body < 0.0 && a.core.is_none()),
                Polarity::Ring => assert!(a.body > 0.0 && a.core.is_some_and(|c| c.1 <= 0.0)),
                Polarity::IsoOedema => {
                    let (scale, halo) = a.halo.unwrap();
                    assert!(scale >= 1.4 && halo.abs() == a.cnr && a.body.abs() <= 0.2 * a.cnr);
                }
            }
        }
        // Binomial: 4 standard deviations around each configured rate.
        for (count, rate) in counts.iter().zip(config.polarity.weights()) {
            let sd = (draws as f64 * rate * (1.0 - rate)).sqrt();
            let expected = draws as f64 * rate;
            assert!(
                (*count as f64 - expected).abs() <= 4.0 * sd,
                "{counts:?} for rates {:?}",
                config.polarity.weights()
            );
        }
        // A polarity turned off never occurs.
        let only_ring = PolarityRates {
            hyper: 0.0,
            hypo: 0.0,
            ring: 1.0,
            iso_oedema: 0.0,
        };
        assert!((0..200).all(|_| only_ring.draw(&mut rng) == Polarity::Ring));
    }

    #[test]
    fn bad_settings_are_named() {
        let bad = AppearanceConfig {
            cnr: [5.0, 1.0],
            ..AppearanceConfig::default()
        };
        assert!(bad.problem().unwrap().contains("cnr"));
        assert!(AppearanceConfig::default().problem().is_none());
    }
}
