//! Layer summary, parameter count and multiply-adds of one forward pass, computed from the config
//! alone (so `medseg model` needs no weights). A test checks the count against burn's own.

use super::HybridSegNetConfig;
use crate::geometry::PatchSize;

/// One row of the summary.
#[derive(Debug, Clone)]
pub struct LayerRow {
    /// Dotted layer path, e.g. `stem.1.0.conv1` or `vit.block.3`.
    pub name: String,
    /// `[C, D, H, W]` of the layer's output.
    pub output: [usize; 4],
    /// Trainable parameters of the layer.
    pub params: usize,
    /// Multiply-accumulates for one sample.
    pub macs: u64,
}

/// Rows for one sample of size `size` (the model's own dimensionality).
pub fn summarize(c: &HybridSegNetConfig, size: PatchSize) -> Vec<LayerRow> {
    let n = c.spatial_dims() as u32;
    let stride = c.total_stride();
    let [d, h, w] = size.window();
    let pad = |x: usize| x.div_ceil(stride) * stride;
    let mut dims = [if size.is_3d() { pad(d) } else { 1 }, pad(h), pad(w)];
    let scale = |d: [usize; 3], f: usize, up: bool| -> [usize; 3] {
        let g = |x: usize| if up { x * f } else { x / f };
        if !size.is_3d() {
            [d[0], g(d[1]), g(d[2])]
        } else {
            d.map(g)
        }
    };
    let vox = |d: [usize; 3]| d.iter().product::<usize>() as u64;
    let mut rows = Vec::new();
    // conv k^n, then either a norm (gamma, beta; the conv has no bias) or a bias
    let conv = |rows: &mut Vec<LayerRow>,
                name: String,
                cin: usize,
                cout: usize,
                k: usize,
                out: [usize; 3],
                norm: bool| {
        let kv = k.pow(n);
        rows.push(LayerRow {
            name,
            output: [cout, out[0], out[1], out[2]],
            params: cin * cout * kv + if norm { 2 * cout } else { cout },
            macs: vox(out) * (cin * cout * kv) as u64,
        });
    };
    let mut cin = c.input_channels();
    let mut skips = Vec::new();
    for (i, &w) in c.stem_widths.iter().enumerate() {
        for b in 0..c.blocks_per_stage.max(1) {
            let s = if i > 0 && b == 0 { 2 } else { 1 };
            let out = scale(dims, s, false);
            conv(
                &mut rows,
                format!("stem.{i}.{b}.conv1"),
                cin,
                w,
                3,
                out,
                true,
            );
            conv(&mut rows, format!("stem.{i}.{b}.conv2"), w, w, 3, out, true);
            if cin != w || s != 1 {
                conv(
                    &mut rows,
                    format!("stem.{i}.{b}.shortcut"),
                    cin,
                    w,
                    1,
                    out,
                    true,
                );
            }
            dims = out;
            cin = w;
        }
        skips.push(dims);
    }
    // Transformer
    let e = c.embed_dim;
    let p = c.token_patch;
    let grid = scale(dims, p, false);
    let tokens = vox(grid);
    conv(&mut rows, "vit.embed".into(), cin, e, p, grid, false);
    if c.position == super::PositionEmbedding::Learned {
        rows.push(LayerRow {
            name: "vit.position".into(),
            output: [e, grid[0], grid[1], grid[2]],
            params: c.token_grid(c.patch_size).iter().product::<usize>() * e,
            macs: 0,
        });
    }
    let hidden = e * c.mlp_ratio;
    for l in 0..c.depth {
        rows.push(LayerRow {
            name: format!("vit.block.{l}"),
            output: [e, grid[0], grid[1], grid[2]],
            // 2 LayerNorms, q/k/v/out projections, MLP in/out
            params: 4 * e + 4 * (e * e + e) + (e * hidden + hidden) + (hidden * e + e),
            macs: tokens * (4 * e * e + 2 * e * hidden) as u64 + 2 * tokens * tokens * e as u64,
        });
    }
    rows.push(LayerRow {
        name: "vit.norm".into(),
        output: [e, grid[0], grid[1], grid[2]],
        params: 2 * e,
        macs: 0,
    });
    // Decoder, deepest level first
    let levels = c.stem_widths.len();
    let mut cin = e;
    let mut here = grid;
    for level in (0..levels).rev() {
        let w = c.stem_widths[level];
        let f = if level == levels - 1 { p } else { 2 };
        let fv = f.pow(n);
        let out = skips[level];
        rows.push(LayerRow {
            name: format!("decoder.{level}.up"),
            output: [w, out[0], out[1], out[2]],
            params: cin * w * fv + w,
            macs: vox(here) * (cin * w * fv) as u64,
        });
        if c.transformer_skips {
            let hf = ((1usize << (levels - 1 - level)) * p).pow(n);
            rows.push(LayerRow {
                name: format!("decoder.{level}.hidden_skip"),
                output: [w, out[0], out[1], out[2]],
                params: e * w * hf + w,
                macs: tokens * (e * w * hf) as u64,
            });
        }
        conv(
            &mut rows,
            format!("decoder.{level}.fuse1"),
            2 * w,
            w,
            3,
            out,
            true,
        );
        conv(
            &mut rows,
            format!("decoder.{level}.fuse2"),
            w,
            w,
            3,
            out,
            true,
        );
        if c.deep_supervision && level > 0 {
            conv(
                &mut rows,
                format!("decoder.{level}.deep_head"),
                w,
                c.num_classes,
                1,
                out,
                false,
            );
        }
        cin = w;
        here = out;
    }
    conv(&mut rows, "head".into(), cin, c.num_classes, 1, here, false);
    rows
}
