//! The convolution and its weight gradient by tiled im2col and matrix products, on plain `f32`
//! slices.
//!
//! burn's CPU forward convolution gathers its im2col columns one strided index at a time: on the
//! tiny model's 8- and 16-channel layers that gather took 30 % of a segmentation (perf, 2.5D 64²
//! windows), more than the matrix products. [`forward`] copies whole rows instead.
//!
//! burn's CPU backend gets `dW` by convolving the input with the whole output gradient as the
//! kernel. On medseg's small-channel layers that runs a direct convolution whose only parallelism
//! is over input channels, and it took 55 % of a tiny 2D training step (perf, 224², 2 threads).
//! Here `dW[Co, Ci·K] = Σ_tiles dY[Co, T] · col[Ci·K, T]ᵀ`: tiles of output rows run in parallel
//! on rayon in a fixed number of groups, each sums into its own `dW`, and the partial sums are
//! added in order at the end.

use std::cell::RefCell;

use ndarray::{ArrayView2, ArrayViewMut, ArrayViewMut2, ArrayViewMut3, Axis, ShapeBuilder};
use rayon::prelude::*;

/// Output positions per im2col tile: `Ci·K × TILE` floats per worker stay in L2 for small `Ci`.
const TILE_POSITIONS: usize = 2048;

/// Partial sums of `dW`, whatever the thread count: enough to keep 16 cores busy.
pub(super) const GROUPS: usize = 16;

/// im2col floats per forward tile (1 MiB): the columns stay in L2 while the product reads them.
pub(super) const FORWARD_TILE_FLOATS: usize = 1 << 18;

/// A convolution's sizes, in 3D. A 2D convolution has depth 1, kernel depth 1, depth stride 1 and
/// no depth padding. Dilation is 1 and there is one group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    /// Batch size.
    pub batch: usize,
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Input `[D, H, W]`.
    pub input: [usize; 3],
    /// Kernel `[kd, kh, kw]`.
    pub kernel: [usize; 3],
    /// Stride per axis.
    pub stride: [usize; 3],
    /// Zero padding before each axis (padding after only decides the output size).
    pub padding: [usize; 3],
    /// Output `[D', H', W']`, taken from the output gradient so that end padding needs no field.
    pub output: [usize; 3],
}

impl ConvShape {
    fn kernel_volume(&self) -> usize {
        self.kernel.iter().product()
    }

    fn output_volume(&self) -> usize {
        self.output.iter().product()
    }

    fn input_volume(&self) -> usize {
        self.input.iter().product()
    }
}

/// The weight gradient `[Co, Ci, kd, kh, kw]` (flattened) of a convolution with input `x`
/// `[N, Ci, D, H, W]` and output gradient `dy` `[N, Co, D', H', W']`, both contiguous.
///
/// # Panics
/// When the slice lengths disagree with `shape`: callers build `shape` from the same tensors.
pub fn weight_grad(shape: &ConvShape, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let s = *shape;
    let cik = s.in_channels * s.kernel_volume();
    assert_eq!(x.len(), s.batch * s.in_channels * s.input_volume());
    assert_eq!(dy.len(), s.batch * s.out_channels * s.output_volume());
    let [od, oh, ow] = s.output;
    let rows = od * oh;
    let rows_per_tile = (TILE_POSITIONS / ow.max(1)).max(1);
    let tiles: Vec<(usize, usize, usize)> = (0..s.batch)
        .flat_map(|b| {
            (0..rows)
                .step_by(rows_per_tile)
                .map(move |r0| (b, r0, (r0 + rows_per_tile).min(rows)))
        })
        .collect();
    // Fixed groups of tiles summed in order: the result does not depend on thread count or
    // scheduling, so a resumed training run repeats the uninterrupted one bit for bit.
    let per_group = tiles.len().div_ceil(GROUPS).max(1);
    let partials: Vec<Vec<f32>> = tiles
        .par_chunks(per_group)
        .map(|group| {
            let mut dw = vec![0f32; s.out_channels * cik];
            let widest = group.iter().map(|&(_, r0, r1)| (r1 - r0) * ow).max();
            with_columns(cik * widest.unwrap_or(0), |col| {
                for &(b, r0, r1) in group {
                    let t = (r1 - r0) * ow;
                    let col = &mut col[..cik * t];
                    im2col(&s, x, b, r0, r1, col);
                    let out = s.output_volume();
                    let lhs = ArrayView2::from_shape(
                        (s.out_channels, t).strides((out, 1)),
                        &dy[(b * s.out_channels) * out + r0 * ow..],
                    )
                    .expect("dY tile lies inside the output gradient");
                    let rhs = ArrayView2::from_shape((cik, t), &*col).expect("im2col tile");
                    // Accumulated column-major (as `dWᵀ`): `gemm` then reads the im2col tile in
                    // place and packs only the smaller `dY` tile; row-major, it packed the tile.
                    let mut acc = ArrayViewMut2::from_shape(
                        (s.out_channels, cik).strides((1, s.out_channels)),
                        &mut dw,
                    )
                    .expect("dW has Co·Ci·K elements");
                    product(lhs, rhs.t(), &mut acc, true);
                }
            });
            dw
        })
        .collect();
    let mut partials = partials.into_iter();
    let mut dw = partials
        .next()
        .unwrap_or_else(|| vec![0f32; s.out_channels * cik]);
    for p in partials {
        dw.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
    }
    let dw_t =
        ArrayView2::from_shape((cik, s.out_channels), &dw).expect("dWᵀ has Co·Ci·K elements");
    dw_t.t().iter().copied().collect()
}

/// The output `[N, Co, D', H', W']` (flattened) of a bias-free convolution of `x`
/// `[N, Ci, D, H, W]` with `weight` `[Co, Ci, kd, kh, kw]`, both contiguous:
/// `Y[Co, T] = W[Co, Ci·K] · col[Ci·K, T]` per tile of output rows, the tiles in parallel. Each
/// output is one dot product whatever the tiling, so the result does not depend on thread count.
///
/// # Panics
/// When the slice lengths disagree with `shape`: callers build `shape` from the same tensors.
pub fn forward(shape: &ConvShape, x: &[f32], weight: &[f32]) -> Vec<f32> {
    let s = *shape;
    let cik = s.in_channels * s.kernel_volume();
    assert_eq!(x.len(), s.batch * s.in_channels * s.input_volume());
    assert_eq!(weight.len(), s.out_channels * cik);
    let [od, oh, ow] = s.output;
    let out = s.output_volume();
    let mut y = vec![0f32; s.batch * s.out_channels * out];
    if out == 0 || s.out_channels == 0 {
        return y;
    }
    let rows_per_tile = (FORWARD_TILE_FLOATS / (cik * ow).max(1)).clamp(1, od * oh);
    let w = ArrayView2::from_shape((s.out_channels, cik), weight).expect("W has Co·Ci·K elements");
    let y_view = ArrayViewMut3::from_shape((s.batch, s.out_channels, out), &mut y)
        .expect("Y has N·Co·D'·H'·W' elements");
    // Disjoint output blocks `[Co, T]`, one per (batch item, tile of rows).
    let blocks: Vec<(usize, usize, ArrayViewMut2<f32>)> = split(y_view, Axis(0), 1)
        .into_iter()
        .enumerate()
        .flat_map(|(b, item)| {
            split(
                item.index_axis_move(Axis(0), 0),
                Axis(1),
                rows_per_tile * ow,
            )
            .into_iter()
            .enumerate()
            .map(move |(i, block)| (b, i * rows_per_tile, block))
        })
        .collect();
    blocks.into_par_iter().for_each(|(b, r0, mut block)| {
        let t = block.ncols();
        let r1 = r0 + t / ow;
        with_columns(cik * t, |col| {
            im2col(&s, x, b, r0, r1, col);
            let rhs = ArrayView2::from_shape((cik, t), &*col).expect("im2col tile");
            product(w, rhs, &mut block, false);
        });
    });
    y
}

thread_local! {
    /// Each worker's im2col tile, kept between tiles and calls: a fresh one per task or group
    /// was zeroed and page-faulted in every time (a twentieth of a tiny 2D step).
    static COLUMNS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The largest tile a worker keeps (4 MiB); larger ones (wide layers of big presets) are
/// allocated per use rather than held for the thread's life.
const KEPT_COLUMNS: usize = 1 << 20;

/// Runs `f` on a tile buffer of `len` floats whose contents are stale (`im2col` writes every
/// value it reads): this thread's kept buffer when `len` fits [`KEPT_COLUMNS`].
fn with_columns<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    if len > KEPT_COLUMNS {
        return f(&mut vec![0.0; len]);
    }
    COLUMNS.with(|cell| match cell.try_borrow_mut() {
        Ok(mut col) => {
            if col.len() < len {
                col.resize(len, 0.0);
            }
            f(&mut col[..len])
        }
        // Re-entered on this thread (never by the callers here): a buffer of its own.
        Err(_) => f(&mut vec![0.0; len]),
    })
}

/// `dst = lhs · rhs`, or `dst += lhs · rhs` when `accumulate`, by burn's `gemm`, at whatever
/// strides the views have. For the forward tile `Y[Co, T] = W · col[Ci·K, T]` it computes the
/// transposed product, in which `col` is a column-major left operand that its micro-kernel reads
/// in place (matrixmultiply packed every tile first, a copy: 17 % of a small 3D step); for `dW` it
/// reads the output gradient in place.
pub(super) fn product(
    lhs: ArrayView2<f32>,
    rhs: ArrayView2<f32>,
    dst: &mut ArrayViewMut2<f32>,
    accumulate: bool,
) {
    let ((m, k), (k2, n)) = (lhs.dim(), rhs.dim());
    assert_eq!(k, k2);
    assert_eq!(dst.dim(), (m, n));
    let [ls, rs, ds] = [lhs.strides(), rhs.strides(), dst.strides()].map(|s| [s[0], s[1]]);
    // SAFETY: `gemm` addresses `lhs`, `rhs` and `dst` only at `i·row_stride + j·col_stride` for
    // `i, j` inside each view's dimensions, which the asserts above make consistent, so every
    // access lies inside memory the views borrow; `dst` is borrowed mutably and alone.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            ds[1],
            ds[0],
            accumulate,
            lhs.as_ptr(),
            ls[1],
            ls[0],
            rhs.as_ptr(),
            rs[1],
            rs[0],
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// `view` cut along `axis` into consecutive pieces of `size` (the last may be shorter), each
/// keeping the whole view's lifetime so that they can go to other threads.
pub(super) fn split<D: ndarray::Dimension>(
    mut view: ArrayViewMut<'_, f32, D>,
    axis: Axis,
    size: usize,
) -> Vec<ArrayViewMut<'_, f32, D>> {
    let mut pieces = Vec::new();
    while view.len_of(axis) > size {
        let (head, tail) = view.split_at(axis, size);
        pieces.push(head);
        view = tail;
    }
    pieces.push(view);
    pieces
}

/// Fills `col[Ci·K, T]` with the input values under each kernel tap for the output rows
/// `r0..r1` (row = `d'·H' + h'`) of batch item `b`; taps in the padding are 0.
fn im2col(s: &ConvShape, x: &[f32], b: usize, r0: usize, r1: usize, col: &mut [f32]) {
    let [d, h, w] = s.input;
    let [kd, kh, kw] = s.kernel;
    let [sd, sh, sw] = s.stride;
    let [pd, ph, pw] = s.padding;
    let [_, oh, ow] = s.output;
    let t = (r1 - r0) * ow;
    let mut j = 0;
    for ci in 0..s.in_channels {
        let plane = &x[(b * s.in_channels + ci) * d * h * w..][..d * h * w];
        for zd in 0..kd {
            for zh in 0..kh {
                for zw in 0..kw {
                    let dst = &mut col[j * t..(j + 1) * t];
                    // Output columns whose tap lands inside the row: lo ≤ w' < hi.
                    let lo = pw.saturating_sub(zw).div_ceil(sw).min(ow);
                    let hi = (w + pw).saturating_sub(zw).div_ceil(sw).clamp(lo, ow);
                    for (ri, r) in (r0..r1).enumerate() {
                        let out = &mut dst[ri * ow..(ri + 1) * ow];
                        let id = (r / oh * sd + zd).checked_sub(pd).filter(|&v| v < d);
                        let ih = (r % oh * sh + zh).checked_sub(ph).filter(|&v| v < h);
                        let (Some(id), Some(ih)) = (id, ih) else {
                            out.fill(0.0);
                            continue;
                        };
                        let src = &plane[(id * h + ih) * w..][..w];
                        out[..lo].fill(0.0);
                        out[hi..].fill(0.0);
                        let first = lo * sw + zw - pw;
                        if sw == 1 {
                            out[lo..hi].copy_from_slice(&src[first..first + hi - lo]);
                        } else {
                            for (o, v) in
                                out[lo..hi].iter_mut().zip(src[first..].iter().step_by(sw))
                            {
                                *o = *v;
                            }
                        }
                    }
                    j += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every multiply-add of the convolution by definition: `f(y, w, x)` with the flat indices of
    /// the output, the weight and the input it joins (taps in the padding are skipped).
    fn for_each_product(s: &ConvShape, mut f: impl FnMut(usize, usize, usize)) {
        let [d, h, w] = s.input;
        let [kd, kh, kw] = s.kernel;
        let [od, oh, ow] = s.output;
        let tap = |o: usize, k: usize, a: usize, n: usize| {
            (o * s.stride[a] + k)
                .checked_sub(s.padding[a])
                .filter(|&v| v < n)
        };
        for (b, co, ci) in grid3(s.batch, s.out_channels, s.in_channels) {
            for (a, bb, c) in grid3(od, oh, ow) {
                for (zd, zh, zw) in grid3(kd, kh, kw) {
                    let (Some(i), Some(j), Some(k)) =
                        (tap(a, zd, 0, d), tap(bb, zh, 1, h), tap(c, zw, 2, w))
                    else {
                        continue;
                    };
                    f(
                        (((b * s.out_channels + co) * od + a) * oh + bb) * ow + c,
                        (((co * s.in_channels + ci) * kd + zd) * kh + zh) * kw + zw,
                        (((b * s.in_channels + ci) * d + i) * h + j) * w + k,
                    );
                }
            }
        }
    }

    /// The weight gradient by definition.
    fn naive(s: &ConvShape, x: &[f32], dy: &[f32]) -> Vec<f32> {
        let mut dw = vec![0f32; s.out_channels * s.in_channels * s.kernel_volume()];
        for_each_product(s, |yi, wi, xi| dw[wi] += dy[yi] * x[xi]);
        dw
    }

    /// The forward convolution by definition.
    fn naive_forward(s: &ConvShape, x: &[f32], wt: &[f32]) -> Vec<f32> {
        let mut y = vec![0f32; s.batch * s.out_channels * s.output_volume()];
        for_each_product(s, |yi, wi, xi| y[yi] += wt[wi] * x[xi]);
        y
    }

    fn grid3(a: usize, b: usize, c: usize) -> impl Iterator<Item = (usize, usize, usize)> {
        (0..a).flat_map(move |i| (0..b).flat_map(move |j| (0..c).map(move |k| (i, j, k))))
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    #[test]
    fn forward_and_weight_grad_match_the_definition_for_2d_and_3d_strides_and_padding() {
        let cases = [
            // 2D 3×3 stride 1 pad 1, odd sizes.
            ([1, 3, 5], [1, 7, 9], [1, 3, 3], [1, 1, 1], [0, 1, 1]),
            // 2D stride 2 pad 1, batch 3.
            ([3, 2, 4], [1, 9, 6], [1, 3, 3], [1, 2, 2], [0, 1, 1]),
            // 3D 3×3×3 stride 2, pad 1.
            ([2, 4, 3], [5, 6, 7], [3, 3, 3], [2, 2, 2], [1, 1, 1]),
            // 1×1 and a 2×2 patch embedding without padding.
            ([1, 5, 2], [3, 4, 4], [1, 1, 1], [1, 1, 1], [0, 0, 0]),
            ([2, 3, 4], [4, 8, 8], [2, 2, 2], [2, 2, 2], [0, 0, 0]),
        ];
        for ([n, ci, co], input, kernel, stride, padding) in cases {
            let output = [0, 1, 2].map(|a| (input[a] + 2 * padding[a] - kernel[a]) / stride[a] + 1);
            let s = ConvShape {
                batch: n,
                in_channels: ci,
                out_channels: co,
                input,
                kernel,
                stride,
                padding,
                output,
            };
            let x = values(n * ci * input.iter().product::<usize>(), 7);
            let dy = values(n * co * output.iter().product::<usize>(), 11);
            let wt = values(co * ci * kernel.iter().product::<usize>(), 13);
            let (got, want) = (weight_grad(&s, &x, &dy), naive(&s, &x, &dy));
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "{s:?}: dW {g} vs {w}"
                );
            }
            let (got, want) = (forward(&s, &x, &wt), naive_forward(&s, &x, &wt));
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "{s:?}: Y {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn the_same_bits_on_any_thread_count() {
        // 28 tiles: more than GROUPS, so groups hold several tiles.
        let s = ConvShape {
            batch: 2,
            in_channels: 3,
            out_channels: 4,
            input: [6, 90, 50],
            kernel: [3, 3, 3],
            stride: [1, 1, 1],
            padding: [1, 1, 1],
            output: [6, 90, 50],
        };
        let x = values(2 * 3 * 6 * 90 * 50, 3);
        let dy = values(2 * 4 * 6 * 90 * 50, 5);
        let on = |threads| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| weight_grad(&s, &x, &dy))
        };
        let one = on(1);
        assert_eq!(one, on(3));
        assert_eq!(one, on(8));
    }
}
