//! An exponential moving average of the weights (Polyak averaging, as timm's `ModelEmaV2` and
//! TensorFlow's `ExponentialMovingAverage` keep it): after every optimiser step each averaged
//! parameter moves `1 - rate` of the way to the new value. The average over the last stretch of
//! training smooths out the step-to-step noise of small batches, which the single last
//! (or best-validated) set of weights carries.

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::prelude::*;

use crate::error::{Error, Result};
use crate::model::HybridSegNet;

/// The averaged weights, on the inner backend (no autodiff graph).
#[derive(Debug, Clone)]
pub struct Ema {
    decay: f64,
    updates: usize,
    model: HybridSegNet,
}

impl Ema {
    /// Starts the average at `model`'s weights, as if it had already taken `updates` steps (a
    /// resumed run passes its global step, so the rate continues where it was).
    pub fn new(decay: f64, model: HybridSegNet, updates: usize) -> Self {
        Ema {
            decay,
            updates,
            model: model.valid(),
        }
    }

    /// The share of the old average kept at the next update: `min(decay, (1 + n) / (10 + n))`
    /// after `n` updates (TensorFlow's `num_updates` rule), so the fresh network's random
    /// weights are forgotten in tens of steps rather than thousands.
    pub fn rate(&self) -> f64 {
        let n = self.updates as f64;
        self.decay.min((1.0 + n) / (10.0 + n))
    }

    /// Moves the average towards `current` (the trained network, either backend).
    pub fn update(&mut self, current: &HybridSegNet) -> Result<()> {
        let mut values = Values::default();
        current.valid().visit(&mut values);
        let expected = values.0.len();
        let mut blend = Blend {
            values: values.0,
            rate: self.rate(),
        };
        self.model = self.model.clone().map(&mut blend);
        // Each blended parameter is taken out of `values`: any left matched nothing.
        if !blend.values.is_empty() {
            return Err(Error::Training {
                reason: format!(
                    "the weight average matched {} of the network's {expected} parameters; the averaged and the trained network differ",
                    expected - blend.values.len()
                ),
            });
        }
        self.updates += 1;
        Ok(())
    }

    /// The averaged network.
    pub fn model(&self) -> &HybridSegNet {
        &self.model
    }
}

/// Each parameter's value, flattened, by id.
#[derive(Default)]
struct Values(HashMap<ParamId, Tensor<1>>);

impl ModuleVisitor for Values {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let value = param.val();
        let n = value.shape().num_elements();
        self.0.insert(param.id, value.reshape([n]));
    }
}

/// `average · rate + value · (1 − rate)` for every parameter whose id `values` holds.
struct Blend {
    values: HashMap<ParamId, Tensor<1>>,
    rate: f64,
}

impl ModuleMapper for Blend {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(value) = self.values.remove(&param.id) else {
            return param;
        };
        let rate = self.rate;
        param.map(|average| {
            let dims = average.dims();
            average.mul_scalar(rate) + value.reshape(dims).mul_scalar(1.0 - rate)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::PatchSize;
    use crate::model::HybridSegNetConfig;

    /// Every parameter value, in the order the tree is walked (the same for networks of one
    /// config).
    #[derive(Default)]
    struct Flat(Vec<f32>);

    impl ModuleVisitor for Flat {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0
                .extend(param.val().into_data().try_to_vec::<f32>().unwrap());
        }
    }

    fn flat(model: &HybridSegNet) -> Vec<f32> {
        let mut values = Flat::default();
        model.visit(&mut values);
        values.0
    }

    fn config() -> HybridSegNetConfig {
        HybridSegNetConfig::new(PatchSize::new(&[32, 32]).unwrap(), 2)
    }

    #[test]
    fn rate_warms_up_to_the_decay() {
        let device = crate::model::device("cpu").unwrap();
        let config = config();
        let mut ema = Ema::new(0.99, config.init(&device).unwrap(), 0);
        assert!((ema.rate() - 0.1).abs() < 1e-12);
        ema.updates = 90;
        assert!((ema.rate() - 0.91).abs() < 1e-12);
        ema.updates = 100_000;
        assert_eq!(ema.rate(), 0.99);
    }

    /// Two networks of one init (same parameter ids), the second's weights moved: one update at
    /// rate r gives r·a + (1−r)·b for every value, and a network of other ids is refused.
    #[test]
    fn update_blends_every_parameter() {
        let device = crate::model::device("cpu").unwrap();
        let config = config();
        let a = config.init(&device).unwrap();
        let b = a.clone().map(&mut Shift(0.5));
        let mut ema = Ema::new(0.75, a.clone(), 1_000);
        ema.update(&b).unwrap();
        let (fa, fb, fe) = (flat(&a), flat(&b), flat(ema.model()));
        assert_eq!((fa.len(), fb.len()), (fe.len(), fe.len()));
        assert!(fe.len() > 10_000);
        for ((x, y), e) in fa.iter().zip(&fb).zip(&fe) {
            assert!((e - (0.75 * x + 0.25 * y)).abs() < 1e-5, "{e} vs {x}, {y}");
        }
        let other = config.init(&device).unwrap();
        let e = ema.update(&other).unwrap_err().to_string();
        assert!(e.contains("matched 0 of"), "{e}");
    }

    struct Shift(f32);

    impl ModuleMapper for Shift {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let by = self.0;
            param.map(|t| t.add_scalar(by))
        }
    }
}
