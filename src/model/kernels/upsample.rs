//! The decoder's learned upsampling, a transposed convolution whose kernel equals its stride, and
//! its gradients, by matrix products on plain `f32` slices.
//!
//! With kernel = stride the kernel windows do not overlap: every input voxel spreads into its own
//! `fd×fh×fw` output block, so the whole layer is one product `Z[Co·K, S] = Wᵀ[Co·K, Ci] ·
//! X[Ci, S]` (`K` taps, `S` input voxels) and a reordering of `Z` into the output. burn's CPU
//! transposed convolution and its backward (a direct convolution for the input gradient) took
//! about a tenth of a tiny 2D training step (perf, 224², 2 threads) for 3 % of its multiply-adds.

use ndarray::{s, ArrayView2, ArrayViewMut2, Axis};
use rayon::prelude::*;

use super::conv::{product, split, FORWARD_TILE_FLOATS, GROUPS};

/// A kernel = stride transposed convolution's sizes, in 3D (a 2D one has depth 1 and factor 1 in
/// depth). No padding, dilation 1, one group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpsampleShape {
    /// Batch size.
    pub batch: usize,
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Input `[D, H, W]`.
    pub input: [usize; 3],
    /// Kernel and stride `[fd, fh, fw]`.
    pub factor: [usize; 3],
}

impl UpsampleShape {
    fn taps(&self) -> usize {
        self.factor.iter().product()
    }

    fn input_volume(&self) -> usize {
        self.input.iter().product()
    }

    /// `[D·fd, H·fh, W·fw]`.
    pub fn output(&self) -> [usize; 3] {
        [0, 1, 2].map(|a| self.input[a] * self.factor[a])
    }

    fn output_volume(&self) -> usize {
        self.output().iter().product()
    }

    /// Rows of `Z`: one per output channel and tap.
    fn rows(&self) -> usize {
        self.out_channels * self.taps()
    }

    /// Columns per product tile: its operands stay in L2.
    fn tile(&self) -> usize {
        (FORWARD_TILE_FLOATS / self.rows().max(self.in_channels).max(1)).max(1)
    }
}

/// The output `[N, Co, D·fd, H·fh, W·fw]` (flattened) of the transposed convolution of `x`
/// `[N, Ci, D, H, W]` by `weight` `[Ci, Co, fd, fh, fw]` (burn's layout), both contiguous, bias
/// free. Each output is one dot product over `Ci`, so the result does not depend on thread count.
///
/// # Panics
/// When the slice lengths disagree with `shape`: callers build `shape` from the same tensors.
pub fn forward(shape: &UpsampleShape, x: &[f32], weight: &[f32]) -> Vec<f32> {
    let sh = *shape;
    let (ci, rows, sv) = (sh.in_channels, sh.rows(), sh.input_volume());
    assert_eq!(x.len(), sh.batch * ci * sv);
    assert_eq!(weight.len(), ci * rows);
    let item = sh.out_channels * sh.output_volume();
    let mut y = vec![0f32; sh.batch * item];
    if item == 0 || ci == 0 {
        return y;
    }
    let wt = ArrayView2::from_shape((ci, rows), weight)
        .expect("W has Ci·Co·K elements")
        .reversed_axes();
    let mut z = vec![0f32; rows * sv];
    for (b, y) in y.chunks_exact_mut(item).enumerate() {
        let xb = ArrayView2::from_shape((ci, sv), &x[b * ci * sv..][..ci * sv])
            .expect("X item has Ci·S elements");
        let zv = ArrayViewMut2::from_shape((rows, sv), &mut z).expect("Z has Co·K·S elements");
        let tile = sh.tile();
        split(zv, Axis(1), tile)
            .into_par_iter()
            .enumerate()
            .for_each(|(i, mut block)| {
                let c0 = i * tile;
                let cols = xb.slice(s![.., c0..c0 + block.ncols()]);
                product(wt, cols, &mut block, false);
            });
        scatter(&sh, &z, y);
    }
    y
}

/// The gradients `(dx, dW)` of [`forward`] given the output gradient `dy`, all contiguous:
/// `dZ` is `dy` reordered, then `dX[Ci, S] = W · dZ` per tile and `dW = Σ_tiles X · dZᵀ`, the
/// tiles summed in a fixed number of groups and the groups in order, so the result does not
/// depend on thread count or scheduling.
///
/// # Panics
/// When the slice lengths disagree with `shape`.
pub fn backward(
    shape: &UpsampleShape,
    x: &[f32],
    weight: &[f32],
    dy: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let sh = *shape;
    let (ci, rows, sv) = (sh.in_channels, sh.rows(), sh.input_volume());
    let item = sh.out_channels * sh.output_volume();
    assert_eq!(x.len(), sh.batch * ci * sv);
    assert_eq!(weight.len(), ci * rows);
    assert_eq!(dy.len(), sh.batch * item);
    let mut dx = vec![0f32; x.len()];
    let mut dw = vec![0f32; weight.len()];
    if item == 0 || ci == 0 {
        return (dx, dw);
    }
    let mut dz = vec![0f32; sh.batch * rows * sv];
    for (dz, dy) in dz.chunks_exact_mut(rows * sv).zip(dy.chunks_exact(item)) {
        gather(&sh, dy, dz);
    }
    let w = ArrayView2::from_shape((ci, rows), weight).expect("W has Ci·Co·K elements");
    let dz_item = |b: usize| {
        ArrayView2::from_shape((rows, sv), &dz[b * rows * sv..][..rows * sv])
            .expect("dZ item has Co·K·S elements")
    };
    let x_item = |b: usize| {
        ArrayView2::from_shape((ci, sv), &x[b * ci * sv..][..ci * sv])
            .expect("X item has Ci·S elements")
    };
    let tile = sh.tile();
    // dX: disjoint column blocks of each item.
    let blocks: Vec<(usize, usize, ArrayViewMut2<f32>)> = dx
        .chunks_exact_mut(ci * sv)
        .enumerate()
        .flat_map(|(b, item)| {
            let view = ArrayViewMut2::from_shape((ci, sv), item).expect("dX item has Ci·S");
            split(view, Axis(1), tile)
                .into_iter()
                .enumerate()
                .map(move |(i, block)| (b, i * tile, block))
        })
        .collect();
    let tiles: Vec<(usize, usize, usize)> = blocks
        .iter()
        .map(|(b, c0, block)| (*b, *c0, c0 + block.ncols()))
        .collect();
    blocks.into_par_iter().for_each(|(b, c0, mut block)| {
        let cols = dz_item(b).slice_move(s![.., c0..c0 + block.ncols()]);
        product(w, cols, &mut block, false);
    });
    // dW: partial sums over fixed groups of tiles, added in order.
    let per_group = tiles.len().div_ceil(GROUPS).max(1);
    let partials: Vec<Vec<f32>> = tiles
        .par_chunks(per_group)
        .map(|group| {
            let mut part = vec![0f32; ci * rows];
            let mut acc = ArrayViewMut2::from_shape((ci, rows), &mut part).expect("dW part");
            for &(b, c0, c1) in group {
                let xs = x_item(b).slice_move(s![.., c0..c1]);
                let dzs = dz_item(b).slice_move(s![.., c0..c1]);
                product(xs, dzs.reversed_axes(), &mut acc, true);
            }
            part
        })
        .collect();
    for part in partials {
        dw.iter_mut().zip(&part).for_each(|(a, p)| *a += p);
    }
    (dx, dw)
}

/// The `(row of Z, input voxel)` each output voxel of one output plane `(co, od)` comes from,
/// visited in output order: `f(output index in plane, Z row, Z column)`.
#[inline(always)]
fn for_each_source(
    sh: &UpsampleShape,
    co: usize,
    od: usize,
    mut f: impl FnMut(usize, usize, usize),
) {
    let [_, h, w] = sh.input;
    let [fd, fh, fw] = sh.factor;
    let [_, oh, ow] = sh.output();
    let (a, d) = (od % fd, od / fd);
    for y in 0..oh {
        let (bb, hh) = (y % fh, y / fh);
        let column = (d * h + hh) * w;
        for (c, xo) in (0..fw).flat_map(|c| (0..w).map(move |xi| (c, xi))) {
            let row = co * sh.taps() + (a * fh + bb) * fw + c;
            f(y * ow + xo * fw + c, row, column + xo);
        }
    }
}

/// One item's output `[Co, D', H', W']` from `Z[Co·K, S]`, one output plane per task.
fn scatter(sh: &UpsampleShape, z: &[f32], y: &mut [f32]) {
    let [od, oh, ow] = sh.output();
    let sv = sh.input_volume();
    y.par_chunks_mut(oh * ow)
        .enumerate()
        .for_each(|(p, plane)| {
            for_each_source(sh, p / od, p % od, |o, row, col| {
                plane[o] = z[row * sv + col]
            });
        });
}

/// One item's `dZ[Co·K, S]` from its output gradient `[Co, D', H', W']`, one output plane's
/// sources per step.
fn gather(sh: &UpsampleShape, dy: &[f32], dz: &mut [f32]) {
    let [od, oh, ow] = sh.output();
    let sv = sh.input_volume();
    // One output channel's planes fill exactly its K rows of dZ: channels are the parallel unit.
    dz.par_chunks_mut(sh.taps() * sv)
        .enumerate()
        .for_each(|(co, rows)| {
            for p in co * od..(co + 1) * od {
                let plane = &dy[p * oh * ow..][..oh * ow];
                for_each_source(sh, co, p % od, |o, row, col| {
                    rows[(row - co * sh.taps()) * sv + col] = plane[o];
                });
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    /// Every multiply-add by definition: `f(y, w, x)` with the flat indices of the output, the
    /// weight and the input it joins.
    fn for_each_product(s: &UpsampleShape, mut f: impl FnMut(usize, usize, usize)) {
        let [d, h, w] = s.input;
        let [fd, fh, fw] = s.factor;
        let [od, oh, ow] = s.output();
        for b in 0..s.batch {
            for ci in 0..s.in_channels {
                for co in 0..s.out_channels {
                    for (i, j, k) in (0..d)
                        .flat_map(|i| (0..h).flat_map(move |j| (0..w).map(move |k| (i, j, k))))
                    {
                        for (a, bb, c) in (0..fd).flat_map(|a| {
                            (0..fh).flat_map(move |bb| (0..fw).map(move |c| (a, bb, c)))
                        }) {
                            let (y0, y1, y2) = (i * fd + a, j * fh + bb, k * fw + c);
                            f(
                                (((b * s.out_channels + co) * od + y0) * oh + y1) * ow + y2,
                                (((ci * s.out_channels + co) * fd + a) * fh + bb) * fw + c,
                                (((b * s.in_channels + ci) * d + i) * h + j) * w + k,
                            );
                        }
                    }
                }
            }
        }
    }

    fn close(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (g, w) in got.iter().zip(want) {
            assert!(
                (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                "{what}: {g} vs {w}"
            );
        }
    }

    #[test]
    fn forward_and_gradients_match_the_definition() {
        let cases = [
            // 2D ×2, odd sizes, batch 3.
            (3, 3, 5, [1, 7, 5], [1, 2, 2]),
            // 3D ×2 and an anisotropic factor.
            (2, 4, 3, [3, 4, 5], [2, 2, 2]),
            (1, 2, 6, [2, 3, 3], [1, 4, 2]),
            // One channel each way, factor 1 (a 1×1 convolution).
            (1, 1, 1, [1, 5, 6], [1, 1, 1]),
        ];
        for (n, ci, co, input, factor) in cases {
            let s = UpsampleShape {
                batch: n,
                in_channels: ci,
                out_channels: co,
                input,
                factor,
            };
            let k: usize = factor.iter().product();
            let x = values(n * ci * s.input_volume(), 7);
            let wt = values(ci * co * k, 13);
            let dy = values(n * co * s.output_volume(), 11);
            let (mut y, mut dx, mut dw) = (
                vec![0f32; dy.len()],
                vec![0f32; x.len()],
                vec![0f32; wt.len()],
            );
            for_each_product(&s, |yi, wi, xi| {
                y[yi] += wt[wi] * x[xi];
                dx[xi] += wt[wi] * dy[yi];
                dw[wi] += x[xi] * dy[yi];
            });
            close(&forward(&s, &x, &wt), &y, &format!("{s:?} Y"));
            let (gx, gw) = backward(&s, &x, &wt, &dy);
            close(&gx, &dx, &format!("{s:?} dX"));
            close(&gw, &dw, &format!("{s:?} dW"));
        }
    }

    #[test]
    fn the_same_bits_on_any_thread_count() {
        // More tiles than GROUPS, so groups hold several tiles.
        let s = UpsampleShape {
            batch: 2,
            in_channels: 64,
            out_channels: 32,
            input: [1, 120, 100],
            factor: [1, 2, 2],
        };
        let x = values(2 * 64 * 120 * 100, 3);
        let wt = values(64 * 32 * 4, 5);
        let dy = values(2 * 32 * 240 * 200, 9);
        let on = |threads| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| (forward(&s, &x, &wt), backward(&s, &x, &wt, &dy)))
        };
        let one = on(1);
        assert_eq!(one, on(3));
        assert_eq!(one, on(8));
    }
}
