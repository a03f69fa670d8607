//! The transformer MLP's GELU, `x·Φ(x)` with the exact (erf) normal CDF as burn's, forward and
//! backward in one pass each, in SIMD lanes.
//!
//! burn's GELU calls libm's `erf` once per value and its backward is a chain of recorded tensor
//! ops; together about 7 % of a small 2D training step (perf, 224², 2 threads).

use pulp::{Simd, WithSimd};
use rayon::prelude::*;

use super::simd;
use super::softmax::exp_nonpositive;

/// Values per rayon task.
const TASK_VALUES: usize = 1 << 15;

/// `(Φ(x), φ(x))` per lane: the normal CDF by Abramowitz & Stegun 7.1.26 (absolute error of erf
/// below 1.5e-7), taken as a tail `½·erfc(|x|/√2)` on either side so that no cancellation
/// loses the small values of the negative side.
#[inline(always)]
fn normal<S: Simd>(simd: S, x: S::f32s) -> (S::f32s, S::f32s) {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_8,
        -1.453_152_1,
        1.061_405_4,
    ];
    let c = |v: f32| simd.splat_f32s(v);
    let z = simd.mul_f32s(simd.abs_f32s(x), c(std::f32::consts::FRAC_1_SQRT_2));
    let t = simd.div_f32s(c(1.0), simd.mul_add_f32s(c(P), z, c(1.0)));
    let mut poly = c(A[4]);
    for a in A[..4].iter().rev() {
        poly = simd.mul_add_f32s(poly, t, c(*a));
    }
    poly = simd.mul_f32s(poly, t);
    let e = exp_nonpositive(simd, simd.neg_f32s(simd.mul_f32s(z, z)));
    let tail = simd.mul_f32s(c(0.5), simd.mul_f32s(poly, e));
    let negative = simd.less_than_f32s(x, c(0.0));
    let cdf = simd.select_f32s(negative, tail, simd.sub_f32s(c(1.0), tail));
    // φ(x) = e^{-x²/2} / √(2π), and e = e^{-z²} = e^{-x²/2}.
    let pdf = simd.mul_f32s(e, c(0.398_942_3));
    (cdf, pdf)
}

/// `y = x·Φ(x)` of every value, over `x` itself.
pub fn forward_in_place(x: &mut [f32]) {
    x.par_chunks_mut(TASK_VALUES)
        .for_each(|x| simd(Forward { x }));
}

/// `y = x·Φ(x)` of every value of `x`.
pub fn forward(x: &[f32]) -> Vec<f32> {
    let mut y = x.to_vec();
    forward_in_place(&mut y);
    y
}

/// The input gradient `dy·(Φ(x) + x·φ(x))`, written over `dy`.
///
/// # Panics
/// When the lengths differ.
pub fn backward_in_place(x: &[f32], dy: &mut [f32]) {
    assert_eq!(x.len(), dy.len());
    dy.par_chunks_mut(TASK_VALUES)
        .zip(x.par_chunks(TASK_VALUES))
        .for_each(|(dy, x)| simd(Backward { x, dy }));
}

struct Forward<'a> {
    x: &'a mut [f32],
}

impl WithSimd for Forward<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let (head, tail) = S::as_mut_simd_f32s(self.x);
        let gelu = |v: S::f32s| simd.mul_f32s(v, normal(simd, v).0);
        for v in head {
            *v = gelu(*v);
        }
        if !tail.is_empty() {
            let v = gelu(simd.partial_load_f32s(tail));
            simd.partial_store_f32s(tail, v);
        }
    }
}

struct Backward<'a> {
    x: &'a [f32],
    dy: &'a mut [f32],
}

impl WithSimd for Backward<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let (xh, xt) = S::as_simd_f32s(self.x);
        let (gh, gt) = S::as_mut_simd_f32s(self.dy);
        let slope = |v: S::f32s| {
            let (cdf, pdf) = normal(simd, v);
            simd.mul_add_f32s(v, pdf, cdf)
        };
        for (g, &v) in gh.iter_mut().zip(xh) {
            *g = simd.mul_f32s(*g, slope(v));
        }
        if !xt.is_empty() {
            let g = simd.mul_f32s(
                simd.partial_load_f32s(gt),
                slope(simd.partial_load_f32s(xt)),
            );
            simd.partial_store_f32s(gt, g);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The normal CDF in `f64`: erf's Taylor series for |z| ≤ 3, erfc's continued fraction
    /// beyond (where the series cancels).
    fn cdf(x: f64) -> f64 {
        let z = x.abs() / std::f64::consts::SQRT_2;
        let tail = if z <= 3.0 {
            let (mut term, mut sum, mut n) = (z, z, 0.0);
            while term.abs() > 1e-18 {
                n += 1.0;
                term *= -z * z / n;
                sum += term / (2.0 * n + 1.0);
            }
            0.5 * (1.0 - sum * 2.0 / std::f64::consts::PI.sqrt())
        } else {
            let fraction = (1..=80).rev().fold(z, |k, i| z + (i as f64 / 2.0) / k);
            0.5 * (-z * z).exp() / std::f64::consts::PI.sqrt() / fraction
        };
        if x < 0.0 {
            tail
        } else {
            1.0 - tail
        }
    }

    #[test]
    fn gelu_and_its_slope_match_the_definition() {
        // -8 … 8 by 1/64 plus a tail shorter than a SIMD vector.
        let x: Vec<f32> = (-512..=512 + 3).map(|i| i as f32 / 64.0).collect();
        let y = forward(&x);
        let mut dx = vec![1f32; x.len()];
        backward_in_place(&x, &mut dx);
        for ((&v, &got), &slope) in x.iter().zip(&y).zip(&dx) {
            let v64 = v as f64;
            let cdf = cdf(v64);
            let pdf = (-v64 * v64 / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let (want, want_slope) = (v64 * cdf, cdf + v64 * pdf);
            assert!(
                (got as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "gelu({v}) = {got}, want {want}"
            );
            assert!(
                (slope as f64 - want_slope).abs() <= 1e-6 * (1.0 + want_slope.abs()),
                "gelu'({v}) = {slope}, want {want_slope}"
            );
        }
    }
}
