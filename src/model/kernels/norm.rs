//! Group (and instance) normalisation with an optional LeakyReLU, forward and backward in two
//! passes over the tensor each, on plain `f32` slices.
//!
//! burn's `GroupNorm` is a chain of eight tensor ops (mean, subtract, square, mean, add, square
//! root, divide, scale and shift), each a full pass that autodiff records and runs again backwards;
//! with the LeakyReLU after it the norm took more time in a tiny 2D training step than the
//! convolutions. Here the forward reads the input twice (statistics, then the affine map with the
//! activation) and the backward reads it and the output gradient twice; only the input and the
//! per-group mean and inverse deviation are kept for the backward pass.
//!
//! Statistics are summed in `f32` lanes over short blocks and in `f64` across blocks, and around
//! each channel's first value, so that a large common offset does not cancel the variance away.

use pulp::{Simd, WithSimd};
use rayon::prelude::*;

use super::simd;

/// Values summed in `f32` before the sums move to `f64`.
const BLOCK: usize = 512;

/// The sizes of a normalised tensor `[N, C, S…]`, with `S` the product of the spatial sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NormShape {
    /// Batch size.
    pub batch: usize,
    /// Channels.
    pub channels: usize,
    /// Groups (channels for instance normalisation); divides `channels`.
    pub groups: usize,
    /// Values per channel and sample.
    pub spatial: usize,
}

impl NormShape {
    fn len(&self) -> usize {
        self.batch * self.channels * self.spatial
    }

    fn per_group(&self) -> usize {
        self.channels / self.groups
    }
}

/// The activation after the affine map: LeakyReLU with its negative slope, or none.
pub type Slope = Option<f32>;

/// `(Σ p, Σ q)` of `(p, q) = term(x, y)` over two equally long slices, one SIMD vector at a time:
/// in vector lanes per block and in `f64` across blocks. The tail is padded with `pad`, values
/// for which `term` gives zeros.
#[inline(always)]
fn pair_sums<S: Simd>(
    simd: S,
    x: &[f32],
    y: &[f32],
    pad: [f32; 2],
    term: impl Fn(S::f32s, S::f32s) -> (S::f32s, S::f32s),
) -> (f64, f64) {
    let (mut a, mut b) = (0f64, 0f64);
    for (xb, yb) in x.chunks(BLOCK).zip(y.chunks(BLOCK)) {
        let ((xv, xt), (yv, yt)) = (S::as_simd_f32s(xb), S::as_simd_f32s(yb));
        let (mut sa, mut sb) = (simd.splat_f32s(0.0), simd.splat_f32s(0.0));
        let mut add = |(p, q): (S::f32s, S::f32s)| {
            sa = simd.add_f32s(sa, p);
            sb = simd.add_f32s(sb, q);
        };
        for (&u, &v) in xv.iter().zip(yv) {
            add(term(u, v));
        }
        if !xt.is_empty() {
            let (mut px, mut py) = ([pad[0]; MAX_LANES], [pad[1]; MAX_LANES]);
            px[..xt.len()].copy_from_slice(xt);
            py[..yt.len()].copy_from_slice(yt);
            let lanes = S::F32_LANES;
            let (u, v) = (
                S::as_simd_f32s(&px[..lanes]).0,
                S::as_simd_f32s(&py[..lanes]).0,
            );
            add(term(u[0], v[0]));
        }
        a += simd.reduce_sum_f32s(sa) as f64;
        b += simd.reduce_sum_f32s(sb) as f64;
    }
    (a, b)
}

/// More `f32` lanes than any SIMD vector has (AVX-512: 16).
const MAX_LANES: usize = 64;

/// Per `(sample, group)`: `[mean, 1 / sqrt(var + eps)]`, the variance biased (as burn's and
/// PyTorch's group norm).
///
/// # Panics
/// When `x` is not `shape`'s length or `shape.groups` does not divide the channels.
pub fn statistics(shape: &NormShape, x: &[f32], epsilon: f64) -> Vec<[f32; 2]> {
    assert_eq!(x.len(), shape.len());
    assert!(shape.groups > 0 && shape.channels % shape.groups == 0);
    let s = shape.spatial;
    // Per channel: shift, Σ(v - shift), Σ(v - shift)².
    let channel: Vec<(f64, f64, f64)> = x
        .par_chunks(s.max(1))
        .map(|values| {
            let shift = values.first().copied().unwrap_or(0.0);
            let (sum, squares) = simd(ShiftedSums { values, shift });
            (shift as f64, sum, squares)
        })
        .collect();
    let count = (shape.per_group() * s) as f64;
    channel
        .chunks(shape.per_group())
        .map(|group| {
            // Σv and Σv² from the shifted sums, around the group's first shift.
            let origin = group[0].0;
            let (mut sum, mut squares) = (0f64, 0f64);
            for &(shift, a, b) in group {
                let k = shift - origin;
                sum += a + s as f64 * k;
                squares += b + 2.0 * k * a + s as f64 * k * k;
            }
            let mean = sum / count;
            let var = (squares / count - mean * mean).max(0.0);
            [
                (origin + mean) as f32,
                (1.0 / (var + epsilon).sqrt()) as f32,
            ]
        })
        .collect()
}

/// `negative` for `v < 0`, else 1, as arithmetic on the comparison: a select here is compiled to
/// one branch per lane inside the vectorised sums.
#[inline(always)]
fn factor(v: f32, negative: f32) -> f32 {
    1.0 - (1.0 - negative) * f32::from(u8::from(v < 0.0))
}

#[inline(always)]
fn activate(v: f32, negative: f32) -> f32 {
    v * factor(v, negative)
}

/// `out = act(γ·(x - mean)·rstd + β)` per channel.
///
/// # Panics
/// When the slices disagree with `shape`.
pub fn apply(
    shape: &NormShape,
    stats: &[[f32; 2]],
    gamma: &[f32],
    beta: &[f32],
    slope: Slope,
    x: &[f32],
    out: &mut [f32],
) {
    assert_eq!((x.len(), out.len()), (shape.len(), shape.len()));
    out.par_chunks_mut(shape.spatial.max(1))
        .zip(x.par_chunks(shape.spatial.max(1)))
        .enumerate()
        .for_each(|(i, (out, x))| {
            let unit = Unit::of(shape, stats, gamma, beta, slope, i);
            simd(Affine { out, x, unit });
        });
}

/// [`apply`] writing over `x`.
///
/// # Panics
/// When the slices disagree with `shape`.
pub fn apply_in_place(
    shape: &NormShape,
    stats: &[[f32; 2]],
    gamma: &[f32],
    beta: &[f32],
    slope: Slope,
    x: &mut [f32],
) {
    assert_eq!(x.len(), shape.len());
    x.par_chunks_mut(shape.spatial.max(1))
        .enumerate()
        .for_each(|(i, x)| {
            let unit = Unit::of(shape, stats, gamma, beta, slope, i);
            simd(AffineInPlace { x, unit });
        });
}

/// The gradients `(dx, dγ, dβ)` of [`apply`] after [`statistics`], given the output gradient `dy`.
///
/// # Panics
/// When the slices disagree with `shape`.
pub fn backward(
    shape: &NormShape,
    stats: &[[f32; 2]],
    gamma: &[f32],
    beta: &[f32],
    slope: Slope,
    x: &[f32],
    dy: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    assert_eq!((x.len(), dy.len()), (shape.len(), shape.len()));
    let s = shape.spatial.max(1);
    let c_count = shape.channels;
    // Per channel and sample: Σ dy' and Σ dy'·x̂.
    let sums: Vec<(f64, f64)> = x
        .par_chunks(s)
        .zip(dy.par_chunks(s))
        .enumerate()
        .map(|(i, (x, dy))| {
            let unit = Unit::of(shape, stats, gamma, beta, slope, i);
            simd(GradientSums { x, dy, unit })
        })
        .collect();
    let count = (shape.per_group() * shape.spatial) as f64;
    // Per group: the means of γ·Σdy' and γ·Σdy'·x̂ over its values.
    let group_means: Vec<[f32; 2]> = sums
        .chunks(shape.per_group())
        .enumerate()
        .map(|(g, group)| {
            let first = (g * shape.per_group()) % c_count;
            let (mut m1, mut m2) = (0f64, 0f64);
            for (k, &(a, b)) in group.iter().enumerate() {
                let gm = gamma[first + k] as f64;
                m1 += gm * a;
                m2 += gm * b;
            }
            [(m1 / count) as f32, (m2 / count) as f32]
        })
        .collect();
    let mut dx = vec![0f32; shape.len()];
    dx.par_chunks_mut(s)
        .zip(x.par_chunks(s).zip(dy.par_chunks(s)))
        .enumerate()
        .for_each(|(i, (dx, (x, dy)))| {
            let unit = Unit::of(shape, stats, gamma, beta, slope, i);
            let [m1, m2] = group_means[i / shape.per_group()];
            let gm = gamma[i % c_count];
            simd(InputGradient {
                dx,
                x,
                dy,
                unit,
                scales: [gm, m1, m2],
            });
        });
    let mut dgamma = vec![0f64; c_count];
    let mut dbeta = vec![0f64; c_count];
    for (i, &(a, b)) in sums.iter().enumerate() {
        dbeta[i % c_count] += a;
        dgamma[i % c_count] += b;
    }
    let narrow = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect();
    (dx, narrow(dgamma), narrow(dbeta))
}

/// One channel's constants: the affine map `v·a + b`, the activation's negative factor and the
/// group's mean and inverse deviation.
#[derive(Clone, Copy)]
struct Unit {
    a: f32,
    b: f32,
    negative: f32,
    mean: f32,
    rstd: f32,
}

impl Unit {
    /// The constants of channel `i` of the flattened `[N·C]` channels: `y = act(v·a + b)` with
    /// `a = rstd·γ`, `b = β - mean·a`; without an activation the negative factor is 1 (the loops
    /// stay branch-free).
    fn of(
        shape: &NormShape,
        stats: &[[f32; 2]],
        gamma: &[f32],
        beta: &[f32],
        slope: Slope,
        i: usize,
    ) -> Unit {
        let c = i % shape.channels;
        let [mean, rstd] = stats[i / shape.per_group()];
        let a = rstd * gamma[c];
        Unit {
            a,
            b: beta[c] - mean * a,
            negative: slope.unwrap_or(1.0),
            mean,
            rstd,
        }
    }

    /// The output gradient passed back through the activation: `g` scaled where the affine
    /// output was negative (its sign is the activation's for a positive slope; at 0 it passes).
    #[inline(always)]
    fn through_activation(self, v: f32, g: f32) -> f32 {
        g * factor(v * self.a + self.b, self.negative)
    }
}

// The kernels below hold every constant by value and every slice as a field, so that, inlined
// into [`simd`], the compiler sees that nothing aliases and vectorises their loops.

/// `Σ(v - shift)` and `Σ(v - shift)²` over one channel's values.
struct ShiftedSums<'a> {
    values: &'a [f32],
    shift: f32,
}

impl WithSimd for ShiftedSums<'_> {
    type Output = (f64, f64);

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> (f64, f64) {
        let shift = simd.splat_f32s(self.shift);
        pair_sums(simd, self.values, self.values, [self.shift; 2], |v, _| {
            let d = simd.sub_f32s(v, shift);
            (d, simd.mul_f32s(d, d))
        })
    }
}

/// `out = act(x·a + b)` over one channel.
struct Affine<'a> {
    out: &'a mut [f32],
    x: &'a [f32],
    unit: Unit,
}

impl WithSimd for Affine<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) {
        let Unit { a, b, negative, .. } = self.unit;
        for (o, &v) in self.out.iter_mut().zip(self.x) {
            *o = activate(v * a + b, negative);
        }
    }
}

/// `x = act(x·a + b)` over one channel.
struct AffineInPlace<'a> {
    x: &'a mut [f32],
    unit: Unit,
}

impl WithSimd for AffineInPlace<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) {
        let Unit { a, b, negative, .. } = self.unit;
        for v in self.x.iter_mut() {
            *v = activate(*v * a + b, negative);
        }
    }
}

/// `Σ g'` and `Σ g'·x̂` over one channel, `g'` the output gradient through the activation.
struct GradientSums<'a> {
    x: &'a [f32],
    dy: &'a [f32],
    unit: Unit,
}

impl WithSimd for GradientSums<'_> {
    type Output = (f64, f64);

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> (f64, f64) {
        let u = self.unit;
        let [a, b, negative, mean, rstd] =
            [u.a, u.b, u.negative, u.mean, u.rstd].map(|v| simd.splat_f32s(v));
        let (one, zero) = (simd.splat_f32s(1.0), simd.splat_f32s(0.0));
        // A zero gradient pads the tail: both terms vanish.
        pair_sums(simd, self.x, self.dy, [0.0; 2], |v, g| {
            // As `Unit::through_activation`: multiply, then add (no fused multiply-add), so
            // that the sign agrees with the forward pass's.
            let z = simd.add_f32s(simd.mul_f32s(v, a), b);
            let f = simd.select_f32s(simd.less_than_f32s(z, zero), negative, one);
            let g = simd.mul_f32s(g, f);
            let xhat = simd.mul_f32s(simd.sub_f32s(v, mean), rstd);
            (g, simd.mul_f32s(g, xhat))
        })
    }
}

/// `dx = rstd·(γ·g' - m1 - x̂·m2)` over one channel, with `scales = [γ, m1, m2]`.
struct InputGradient<'a> {
    dx: &'a mut [f32],
    x: &'a [f32],
    dy: &'a [f32],
    unit: Unit,
    scales: [f32; 3],
}

impl WithSimd for InputGradient<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) {
        let (unit, [gm, m1, m2]) = (self.unit, self.scales);
        for ((d, &v), &g) in self.dx.iter_mut().zip(self.x).zip(self.dy) {
            let xhat = (v - unit.mean) * unit.rstd;
            *d = unit.rstd * (unit.through_activation(v, g) * gm - m1 - xhat * m2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(batch: usize, channels: usize, groups: usize, spatial: usize) -> NormShape {
        NormShape {
            batch,
            channels,
            groups,
            spatial,
        }
    }

    #[test]
    fn statistics_survive_a_large_offset() {
        // Values 1e4 + {0, 1, 2, 3}: naive f32 sums of squares lose the variance 1.25.
        let x: Vec<f32> = (0..4000).map(|i| 1e4 + (i % 4) as f32).collect();
        let [[mean, rstd]] = statistics(&shape(1, 1, 1, 4000), &x, 0.0)[..] else {
            panic!("one group")
        };
        assert!((mean - 10001.5).abs() < 1e-3, "{mean}");
        assert!((1.0 / (rstd * rstd) - 1.25).abs() < 1e-4, "{rstd}");
    }

    #[test]
    fn groups_pool_their_channels() {
        // Two channels, one group: channel means 0 and 2 pool to 1, the spread to 1 + 1/12·4.
        let x = [-0.5f32, 0.5, 1.5, 2.5];
        let stats = statistics(&shape(1, 2, 1, 2), &x, 0.0);
        assert_eq!(stats.len(), 1);
        assert!((stats[0][0] - 1.0).abs() < 1e-6);
        assert!((1.0 / (stats[0][1] * stats[0][1]) - 1.25).abs() < 1e-5);
        let mut out = [0f32; 4];
        apply(
            &shape(1, 2, 1, 2),
            &stats,
            &[1.0, 2.0],
            &[0.0, 0.5],
            Some(0.1),
            &x,
            &mut out,
        );
        let r = stats[0][1];
        let want = [
            -1.5 * r * 0.1,
            -0.5 * r * 0.1,
            0.5 * r * 2.0 + 0.5,
            1.5 * r * 2.0 + 0.5,
        ];
        for (o, w) in out.iter().zip(want) {
            assert!((o - w).abs() < 1e-6, "{out:?} vs {want:?}");
        }
    }
}
