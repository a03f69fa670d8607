//! The attention's scaled softmax over the last axis, forward and backward in one pass per row
//! each way, with the exponential in SIMD lanes.
//!
//! burn's softmax is a chain of tensor ops (scale, max, subtract, exp, sum, divide), each a full
//! pass over the `[B, heads, N, N]` scores that autodiff records and runs again backwards, and its
//! `exp` calls libm once per value: together about a tenth of a tiny 2D training step (perf,
//! 224², 784 tokens, 2 threads).

use pulp::{Simd, WithSimd};
use rayon::prelude::*;

use super::simd;

/// Rows per rayon task: enough values to amortise the task.
const TASK_VALUES: usize = 1 << 15;

/// More `f32` lanes than any SIMD vector has (AVX-512: 16).
const MAX_LANES: usize = 64;

/// Below this `exp` is taken as `exp(-87)` (≈ 1.6e-38, still a normal `f32`), where a row's
/// largest value gives 1: the tail adds nothing a row sum of at least 1 can show.
const LOWEST: f32 = -87.0;

/// `exp(x)` for `x ≤ 0` in every lane, to under 1e-6 relative: `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2`,
/// a degree-6 Taylor polynomial for `e^r` and `2^n` built in the exponent bits.
#[inline(always)]
pub(super) fn exp_nonpositive<S: Simd>(simd: S, x: S::f32s) -> S::f32s {
    // 1.5·2^23: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = simd.max_f32s(x, simd.splat_f32s(LOWEST));
    let t = simd.mul_add_f32s(
        x,
        simd.splat_f32s(std::f32::consts::LOG2_E),
        simd.splat_f32s(ROUND),
    );
    let n = simd.sub_f32s(t, simd.splat_f32s(ROUND));
    // ln 2 in two parts (Cody-Waite), so n·ln 2 is exact in the first.
    let r = simd.mul_add_f32s(n, simd.splat_f32s(-0.693_145_75), x);
    let r = simd.mul_add_f32s(n, simd.splat_f32s(-1.428_606_8e-6), r);
    let c = |v: f32| simd.splat_f32s(v);
    let mut p = c(1.0 / 720.0);
    for k in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = simd.mul_add_f32s(p, r, c(k));
    }
    // 2^n: n (two's complement, -126 ≤ n ≤ 0) into the exponent field of 1.0.
    let bits = simd.sub_u32s(
        simd.transmute_u32s_f32s(t),
        simd.transmute_u32s_f32s(c(ROUND)),
    );
    let bits = simd.wrapping_dyn_shl_u32s(bits, simd.splat_u32s(23));
    let two_n = simd.transmute_f32s_u32s(simd.add_u32s(bits, simd.splat_u32s(1.0f32.to_bits())));
    simd.mul_f32s(p, two_n)
}

/// `softmax(scale · row)` of every row of length `len` in `x`, written to `y`
/// (`scale > 0`). `x` and `y` may be one slice: see [`forward_in_place`].
///
/// # Panics
/// When the lengths differ or are not a multiple of `len`.
pub fn forward(len: usize, scale: f32, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len());
    y.copy_from_slice(x);
    forward_in_place(len, scale, y);
}

/// [`forward`] writing over `x`.
///
/// # Panics
/// When `x`'s length is not a multiple of `len`.
pub fn forward_in_place(len: usize, scale: f32, x: &mut [f32]) {
    if len == 0 {
        return;
    }
    assert_eq!(x.len() % len, 0);
    let rows = (TASK_VALUES / len).max(1);
    x.par_chunks_mut(rows * len).for_each(|block| {
        for row in block.chunks_exact_mut(len) {
            simd(Row { row, scale });
        }
    });
}

/// The input gradient of [`forward`] from its output `y` and the output gradient `dy`:
/// `scale · y · (dy − Σ dy·y)` per row.
///
/// # Panics
/// When the lengths differ or are not a multiple of `len`.
pub fn backward(len: usize, scale: f32, y: &[f32], dy: &[f32]) -> Vec<f32> {
    assert_eq!(y.len(), dy.len());
    let mut dx = vec![0f32; y.len()];
    if len == 0 {
        return dx;
    }
    assert_eq!(y.len() % len, 0);
    let rows = (TASK_VALUES / len).max(1);
    dx.par_chunks_mut(rows * len)
        .zip(y.par_chunks(rows * len).zip(dy.par_chunks(rows * len)))
        .for_each(|(dx, (y, dy))| {
            for ((dx, y), dy) in dx
                .chunks_exact_mut(len)
                .zip(y.chunks_exact(len))
                .zip(dy.chunks_exact(len))
            {
                simd(RowGradient { dx, y, dy, scale });
            }
        });
    dx
}

/// Copies `tail` into a vector padded with `pad`.
#[inline(always)]
fn padded(tail: &[f32], pad: f32) -> [f32; MAX_LANES] {
    let mut v = [pad; MAX_LANES];
    v[..tail.len()].copy_from_slice(tail);
    v
}

/// One row's softmax in place: its maximum, then `exp(scale·(v − max))` and their sum, then the
/// division by the sum.
struct Row<'a> {
    row: &'a mut [f32],
    scale: f32,
}

impl WithSimd for Row<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Row { row, scale } = self;
        let lanes = S::F32_LANES;
        let (head, tail) = S::as_mut_simd_f32s(row);
        let mut top = simd.splat_f32s(f32::NEG_INFINITY);
        for &v in head.iter() {
            top = simd.max_f32s(top, v);
        }
        let top = tail
            .iter()
            .fold(simd.reduce_max_f32s(top), |m, &v| m.max(v));
        let (shift, s) = (simd.splat_f32s(-scale * top), simd.splat_f32s(scale));
        let mut sum = simd.splat_f32s(0.0);
        for v in head.iter_mut() {
            *v = exp_nonpositive(simd, simd.mul_add_f32s(*v, s, shift));
            sum = simd.add_f32s(sum, *v);
        }
        let mut total = simd.reduce_sum_f32s(sum);
        if !tail.is_empty() {
            let buf = padded(tail, top);
            let v = exp_nonpositive(
                simd,
                simd.mul_add_f32s(S::as_simd_f32s(&buf[..lanes]).0[0], s, shift),
            );
            let mut out = [0f32; MAX_LANES];
            S::as_mut_simd_f32s(&mut out[..lanes]).0[0] = v;
            let tail_len = tail.len();
            tail.copy_from_slice(&out[..tail_len]);
            total += out[..tail_len].iter().sum::<f32>();
        }
        let inv = simd.splat_f32s(1.0 / total);
        for v in head.iter_mut() {
            *v = simd.mul_f32s(*v, inv);
        }
        for v in tail.iter_mut() {
            *v /= total;
        }
    }
}

/// One row's input gradient: `Σ dy·y`, then `scale · y · (dy − Σ)`.
struct RowGradient<'a> {
    dx: &'a mut [f32],
    y: &'a [f32],
    dy: &'a [f32],
    scale: f32,
}

impl WithSimd for RowGradient<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let RowGradient { dx, y, dy, scale } = self;
        let ((yh, yt), (gh, gt)) = (S::as_simd_f32s(y), S::as_simd_f32s(dy));
        let mut acc = simd.splat_f32s(0.0);
        for (&a, &b) in yh.iter().zip(gh) {
            acc = simd.mul_add_f32s(a, b, acc);
        }
        let dot = simd.reduce_sum_f32s(acc) + yt.iter().zip(gt).map(|(a, b)| a * b).sum::<f32>();
        let (dh, dt) = S::as_mut_simd_f32s(dx);
        let (d, s) = (simd.splat_f32s(dot), simd.splat_f32s(scale));
        for ((o, &a), &b) in dh.iter_mut().zip(yh).zip(gh) {
            *o = simd.mul_f32s(simd.mul_f32s(a, s), simd.sub_f32s(b, d));
        }
        for ((o, &a), &b) in dt.iter_mut().zip(yt).zip(gt) {
            *o = a * scale * (b - dot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The softmax of one row in `f64`, by definition.
    fn reference(row: &[f32], scale: f64) -> Vec<f64> {
        let top = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let e: Vec<f64> = row
            .iter()
            .map(|&v| (scale * (v as f64 - top)).exp())
            .collect();
        let sum: f64 = e.iter().sum();
        e.iter().map(|v| v / sum).collect()
    }

    #[test]
    fn exp_is_accurate_over_the_whole_range() {
        struct Exp<'a>(&'a mut [f32]);
        impl WithSimd for Exp<'_> {
            type Output = ();
            #[inline(always)]
            fn with_simd<S: Simd>(self, simd: S) {
                let (head, _) = S::as_mut_simd_f32s(self.0);
                for v in head {
                    *v = exp_nonpositive(simd, *v);
                }
            }
        }
        let xs: Vec<f32> = (0..=87_000).map(|i| -(i as f32) / 1000.0).collect();
        let mut ys = xs.clone();
        let covered = ys.len() / 64 * 64;
        simd(Exp(&mut ys[..covered]));
        for (x, y) in xs[..covered].iter().zip(&ys[..covered]) {
            let want = (*x as f64).exp();
            let rel = ((*y as f64) - want).abs() / want;
            assert!(
                rel < 1e-6,
                "exp({x}) = {y}, want {want} (relative error {rel:e})"
            );
        }
    }

    #[test]
    fn rows_match_the_definition_and_the_gradient_its_finite_difference() {
        // Lengths with and without a SIMD tail; a row of one; large and negative values.
        for (len, scale) in [
            (1usize, 0.5f32),
            (7, 1.0),
            (16, 0.125),
            (37, 0.3),
            (784, 0.25),
        ] {
            let rows = 3;
            let x: Vec<f32> = (0..rows * len)
                .map(|i| {
                    ((i * 7919 % 1000) as f32 / 50.0 - 10.0) * if i % 5 == 0 { 8.0 } else { 1.0 }
                })
                .collect();
            let mut y = vec![0f32; x.len()];
            forward(len, scale, &x, &mut y);
            for (r, (row, out)) in x.chunks(len).zip(y.chunks(len)).enumerate() {
                for (got, want) in out.iter().zip(reference(row, scale as f64)) {
                    assert!(
                        (*got as f64 - want).abs() <= 1e-6 * (1.0 + want),
                        "len {len} row {r}: {got} vs {want}"
                    );
                }
            }
            // Gradient of Σ y·g against central differences of the f64 reference.
            let g: Vec<f32> = (0..x.len())
                .map(|i| ((i * 31 % 17) as f32 - 8.0) / 8.0)
                .collect();
            let dx = backward(len, scale, &y, &g);
            let loss = |row: &[f32], gr: &[f32]| -> f64 {
                reference(row, scale as f64)
                    .iter()
                    .zip(gr)
                    .map(|(a, b)| a * *b as f64)
                    .sum()
            };
            for (row, (gr, dxr)) in x.chunks(len).zip(g.chunks(len).zip(dx.chunks(len))) {
                for j in 0..len {
                    let h = 1e-3f32;
                    let (mut up, mut down) = (row.to_vec(), row.to_vec());
                    up[j] += h;
                    down[j] -= h;
                    let numeric = (loss(&up, gr) - loss(&down, gr)) / (2.0 * h as f64);
                    assert!(
                        (dxr[j] as f64 - numeric).abs() <= 1e-3,
                        "len {len}: dx {} vs {numeric}",
                        dxr[j]
                    );
                }
            }
        }
    }
}
