//! Attention maps of the Transformer encoder, for the windows that hold findings:
//! - **lesion** (the default): the attention paid by the tokens that cover a finding to every
//!   token, averaged over heads, blocks and those query tokens. It shows what the model looked at
//!   when it decided about that finding.
//! - **rollout** (Abnar & Zuidema, 2020): per block the heads' mean attention plus the identity
//!   (the residual path), rows renormalised, multiplied through the blocks (later blocks on the
//!   left); the map is the mean row, i.e. how much each token feeds the window's final tokens.
//!
//! Token maps are interpolated (linearly, token centres at the middle of their footprint) onto the
//! window's voxels, blended over overlapping windows with the sliding window's importance map,
//! and scaled so the case's largest value is 1. Attention shows where information flowed, not why
//! the model decided: it is not proof of causation.

use burn::prelude::*;
use ndarray::{s, Array2, Array3, ArrayView4};

use super::sliding_window::{importance_map, SlidingWindow};
use crate::error::{Error, Result};
use crate::model::HybridSegNet;

pub use crate::config::AttentionMap;

/// The mean over heads of one block's weights `[heads, N, N]` (row-major), as an `N × N` matrix.
pub fn head_mean(weights: &[f32], heads: usize, n: usize) -> Array2<f64> {
    let mut out = Array2::<f64>::zeros([n, n]);
    for h in 0..heads {
        let block = &weights[h * n * n..(h + 1) * n * n];
        for (o, &v) in out.iter_mut().zip(block) {
            *o += v as f64 / heads as f64;
        }
    }
    out
}

/// Attention rollout over blocks (first block first, each `N × N`, rows summing to 1): the
/// product `Â_L ⋯ Â_1` with `Â = (A + I) / 2`, rows renormalised.
pub fn rollout(blocks: &[Array2<f64>]) -> Array2<f64> {
    let n = blocks.first().map_or(0, |a| a.nrows());
    let mut r = Array2::<f64>::eye(n);
    for a in blocks {
        let mut hat = (a + &Array2::<f64>::eye(n)) * 0.5;
        for mut row in hat.rows_mut() {
            let sum: f64 = row.sum();
            if sum > 0.0 {
                row /= sum;
            }
        }
        r = hat.dot(&r);
    }
    r
}

/// The mean of the rows `queries` of `m` (all rows when empty): one value per key token.
pub fn mean_rows(m: &Array2<f64>, queries: &[usize]) -> Vec<f64> {
    let rows: Vec<usize> = if queries.is_empty() {
        (0..m.nrows()).collect()
    } else {
        queries.to_vec()
    };
    let mut out = vec![0.0; m.ncols()];
    for &q in &rows {
        for (o, v) in out.iter_mut().zip(m.row(q)) {
            *o += v / rows.len() as f64;
        }
    }
    out
}

/// The token map of one window: `blocks` are the head-averaged weights of every block, `queries`
/// the tokens that cover a finding.
pub fn token_map(kind: AttentionMap, blocks: &[Array2<f64>], queries: &[usize]) -> Vec<f64> {
    match kind {
        AttentionMap::Rollout => mean_rows(&rollout(blocks), &[]),
        AttentionMap::Lesion => {
            let n = blocks.first().map_or(0, |a| a.ncols());
            let mut out = vec![0.0; n];
            for a in blocks {
                for (o, v) in out.iter_mut().zip(mean_rows(a, queries)) {
                    *o += v / blocks.len() as f64;
                }
            }
            out
        }
    }
}

/// The tokens (raster order over `tokens = [d, h, w]`) whose footprint in a window of `window`
/// voxels holds a voxel where `finding` is true (`finding` is `[D, H, W]` over the window).
pub fn covering_tokens(finding: &Array3<bool>, tokens: [usize; 3]) -> Vec<usize> {
    let dims = finding.dim();
    let window = [dims.0, dims.1, dims.2];
    let step = [0, 1, 2].map(|a| window[a].div_ceil(tokens[a]).max(1));
    let mut hit = vec![false; tokens.iter().product()];
    for ((z, y, x), &f) in finding.indexed_iter() {
        if f {
            let t = [z / step[0], y / step[1], x / step[2]];
            let t = [0, 1, 2].map(|a| t[a].min(tokens[a] - 1));
            hit[(t[0] * tokens[1] + t[1]) * tokens[2] + t[2]] = true;
        }
    }
    (0..hit.len()).filter(|&t| hit[t]).collect()
}

/// A token map `[d, h, w]` interpolated linearly onto `window` voxels: token `t` along an axis
/// covers voxels `[t·s, (t+1)·s)` (`s` = voxels per token), so its value sits at their middle.
pub fn upsample(map: &[f64], tokens: [usize; 3], window: [usize; 3]) -> Array3<f32> {
    let axis = |a: usize| -> Vec<(usize, usize, f64)> {
        let s = window[a] as f64 / tokens[a] as f64;
        (0..window[a])
            .map(|v| {
                let c = ((v as f64 + 0.5) / s - 0.5).clamp(0.0, (tokens[a] - 1) as f64);
                let lo = c.floor() as usize;
                let hi = (lo + 1).min(tokens[a] - 1);
                (lo, hi, c - lo as f64)
            })
            .collect()
    };
    let (az, ay, ax) = (axis(0), axis(1), axis(2));
    let at = |z: usize, y: usize, x: usize| map[(z * tokens[1] + y) * tokens[2] + x];
    Array3::from_shape_fn(window, |(z, y, x)| {
        let ((z0, z1, fz), (y0, y1, fy), (x0, x1, fx)) = (az[z], ay[y], ax[x]);
        let lerp = |a: f64, b: f64, f: f64| a + (b - a) * f;
        let plane = |z: usize| {
            lerp(
                lerp(at(z, y0, x0), at(z, y0, x1), fx),
                lerp(at(z, y1, x0), at(z, y1, x1), fx),
                fy,
            )
        };
        lerp(plane(z0), plane(z1), fz) as f32
    })
}

/// The attention map `[D, H, W]` of `image` `[C, D, H, W]` on the preprocessed grid: the windows
/// of `window`'s tiling that hold a voxel of `findings` (classes in `classes`, the class map) are
/// run again with attention kept; elsewhere the map is 0.
#[allow(clippy::too_many_arguments)] // the sliding window's inputs plus what to look at
pub fn attention_map(
    model: &HybridSegNet,
    window: &SlidingWindow,
    image: ArrayView4<f32>,
    classes: &Array3<u8>,
    findings: &[u32],
    kind: AttentionMap,
    device: &Device,
) -> Result<Array3<f32>> {
    let tiling = window.tile(image)?;
    let [nd, nh, nw] = tiling.dims;
    let (_, pd, ph, pw) = tiling.padded.dim();
    let [wd, wh, ww] = window.window;
    let mut finding = Array3::from_elem([pd, ph, pw], false);
    finding
        .slice_mut(s![..nd, ..nh, ..nw])
        .assign(&classes.mapv(|c| findings.contains(&(c as u32))));
    let region = |[d, h, w]: [usize; 3]| finding.slice(s![d..d + wd, h..h + wh, w..w + ww]);
    let starts: Vec<[usize; 3]> = tiling
        .starts
        .iter()
        .copied()
        .filter(|&at| region(at).iter().any(|f| *f))
        .collect();
    let importance = importance_map(window.window);
    let mut acc = Array3::<f32>::zeros([pd, ph, pw]);
    let mut weight = Array3::<f32>::zeros([pd, ph, pw]);
    for chunk in starts.chunks(window.batch_size.max(1)) {
        let (blocks, tokens) = model.attention(window.window_input(&tiling, chunk, device));
        let n: usize = tokens.iter().product();
        let values = blocks
            .into_iter()
            .map(|b| {
                let heads = b.dims()[1];
                b.try_to_vec_as::<f32>()
                    .map(|v| (v, heads))
                    .map_err(|e| Error::Config {
                        reason: format!("reading attention from the device: {e:?}"),
                    })
            })
            .collect::<Result<Vec<(Vec<f32>, usize)>>>()?;
        // Voxels per token along each axis, and the window padded to whole tokens.
        let padded = [0, 1, 2].map(|a| window.window[a].div_ceil(tokens[a]) * tokens[a]);
        for (i, &at) in chunk.iter().enumerate() {
            let per_block: Vec<Array2<f64>> = values
                .iter()
                .map(|(v, heads)| {
                    let size = heads * n * n;
                    head_mean(&v[i * size..(i + 1) * size], *heads, n)
                })
                .collect();
            let queries = covering_tokens(&region(at).to_owned(), tokens);
            let map = upsample(&token_map(kind, &per_block, &queries), tokens, padded);
            let map = map.slice(s![..wd, ..wh, ..ww]);
            let [d, h, w] = at;
            let mut out = acc.slice_mut(s![d..d + wd, h..h + wh, w..w + ww]);
            ndarray::Zip::from(&mut out)
                .and(&map)
                .and(&importance)
                .for_each(|o, &m, &g| *o += m * g);
            let mut wr = weight.slice_mut(s![d..d + wd, h..h + wh, w..w + ww]);
            wr += &importance;
        }
    }
    ndarray::Zip::from(&mut acc)
        .and(&weight)
        .for_each(|a, &w| *a = if w > 0.0 { *a / w } else { 0.0 });
    let mut map = acc.slice_move(s![..nd, ..nh, ..nw]);
    let max = map.iter().copied().fold(0.0f32, f32::max);
    if max > 0.0 {
        map /= max;
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollout_of_identity_attention_is_uniform() {
        let n = 6;
        let blocks = vec![Array2::<f64>::eye(n); 3];
        let map = token_map(AttentionMap::Rollout, &blocks, &[]);
        for v in &map {
            assert!((v - 1.0 / n as f64).abs() < 1e-12);
        }
    }

    /// Two blocks of 3 tokens, checked against NumPy:
    /// ```text
    /// a1 = np.array([[.6,.3,.1],[.2,.5,.3],[.1,.1,.8]]); a2 = np.array([[.2,.2,.6],[.7,.2,.1],[.3,.3,.4]])
    /// hat = lambda a: (a + np.eye(3)) / 2 / ((a + np.eye(3)) / 2).sum(1, keepdims=True)
    /// r = hat(a2) @ hat(a1); r.mean(0)  # rollout map
    /// (a1[[0, 2]].mean(0) + a2[[0, 2]].mean(0)) / 2  # lesion map, queries 0 and 2
    /// ```
    #[test]
    fn rollout_and_lesion_maps_match_numpy() {
        let a1 = Array2::from_shape_vec([3, 3], vec![0.6, 0.3, 0.1, 0.2, 0.5, 0.3, 0.1, 0.1, 0.8])
            .unwrap();
        let a2 = Array2::from_shape_vec([3, 3], vec![0.2, 0.2, 0.6, 0.7, 0.2, 0.1, 0.3, 0.3, 0.4])
            .unwrap();
        let blocks = [a1, a2];
        let r = token_map(AttentionMap::Rollout, &blocks, &[]);
        let want = [0.33916666666666667, 0.285, 0.37583333333333333];
        for (v, w) in r.iter().zip(want) {
            assert!((v - w).abs() < 1e-12, "{r:?}");
        }
        let l = token_map(AttentionMap::Lesion, &blocks, &[0, 2]);
        let want = [0.3, 0.225, 0.475];
        for (v, w) in l.iter().zip(want) {
            assert!((v - w).abs() < 1e-12, "{l:?}");
        }
        // Rows of the rollout still sum to 1.
        let rolled = rollout(&blocks);
        for row in rolled.rows() {
            assert!((row.sum() - 1.0).abs() < 1e-12);
        }
    }

    #[test]
    fn heads_average_and_tokens_cover_their_footprint() {
        // Two heads of 2 tokens.
        let w = [1.0f32, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0];
        let m = head_mean(&w, 2, 2);
        assert!(m.iter().all(|v| (v - 0.5).abs() < 1e-12));
        // A 1 × 8 × 8 window of 1 × 2 × 2 tokens: a finding at voxel (0, 5, 1) is token (0, 1, 0).
        let mut f = Array3::from_elem([1, 8, 8], false);
        f[[0, 5, 1]] = true;
        assert_eq!(covering_tokens(&f, [1, 2, 2]), vec![2]);
        // Upsampling reproduces token values at footprint centres and is constant for a
        // constant map.
        let up = upsample(&[0.0, 1.0, 2.0, 3.0], [1, 2, 2], [1, 8, 8]);
        assert_eq!(up.dim(), (1, 8, 8));
        assert_eq!(up[[0, 0, 0]], 0.0);
        assert_eq!(up[[0, 7, 7]], 3.0);
        assert!((up[[0, 1, 6]] - 1.0).abs() < 1e-6);
        assert!((up[[0, 1, 5]] - 0.875).abs() < 1e-6);
        let flat = upsample(&[0.25; 4], [1, 2, 2], [1, 8, 8]);
        assert!(flat.iter().all(|v| (v - 0.25).abs() < 1e-7));
    }
}
