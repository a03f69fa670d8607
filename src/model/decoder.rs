//! The U-shaped decoder: from the transformer's token map back to full resolution, fusing the
//! stem's skip features at every scale (TransUNet's cascaded upsampler). Optionally each scale also
//! receives an intermediate transformer hidden state brought to that scale (UNETR's skips).

use burn::prelude::*;

use super::blocks::{
    ConvNd, ConvNdConfig, ConvNormAct, ConvNormActConfig, NormKind, UpsampleNd, UpsampleNdConfig,
};

/// A [`Decoder`] mirroring a stem of `widths` below a transformer of width `embed_dim`.
#[derive(Config, Debug)]
pub struct DecoderConfig {
    /// 2 or 3; in 2D depth is not upsampled.
    pub spatial_dims: usize,
    /// Transformer width: channels of the token map and of the hidden states.
    pub embed_dim: usize,
    /// Stem widths, shallow to deep (the decoder mirrors them).
    pub widths: Vec<usize>,
    /// Stem feature-map voxels per token edge.
    pub patch: usize,
    /// Output classes including background (channels of the logits).
    pub num_classes: usize,
    /// Transformer depth (for choosing the hidden states of UNETR skips).
    pub vit_depth: usize,
    /// Add projected intermediate hidden states to the skips (UNETR).
    #[config(default = false)]
    pub transformer_skips: bool,
    /// Extra 1×1 heads on the coarser decoder levels (deep supervision, as nnU-Net).
    #[config(default = false)]
    pub deep_supervision: bool,
    /// Normalisation in the fusion layers.
    #[config(default = "NormKind::Instance")]
    pub norm: NormKind,
}

/// One decoder level: fuse `[up, skip]` by two conv-norm-act layers.
#[derive(Module, Debug)]
pub struct DecoderLevel {
    up: UpsampleNd,
    fuse: Vec<ConvNormAct>,
    /// Projection of a transformer hidden state to this level (UNETR skip).
    hidden_skip: Option<UpsampleNd>,
}

/// Upsampling levels from the token grid to full resolution, then a 1×1 class head.
#[derive(Module, Debug)]
pub struct Decoder {
    /// Deepest first.
    levels: Vec<DecoderLevel>,
    head: ConvNd,
    deep_heads: Vec<ConvNd>,
    /// Hidden-state index used by each level (UNETR), deepest level first.
    hidden_index: Vec<usize>,
}

impl DecoderConfig {
    /// Which hidden state feeds each level, deepest first: evenly spread, the deepest level takes
    /// the last block (UNETR taps blocks 3, 6, 9, 12 of 12).
    fn hidden_indices(&self) -> Vec<usize> {
        let levels = self.widths.len();
        (0..levels)
            .map(|i| {
                let from_top = (self.vit_depth * (levels - i)) / levels;
                from_top.clamp(1, self.vit_depth) - 1
            })
            .collect()
    }

    /// Builds the decoder with freshly initialised weights on `device`.
    pub fn init(&self, device: &Device) -> Decoder {
        let s = self.spatial_dims;
        let n = self.widths.len();
        let mut levels = Vec::with_capacity(n);
        // Deepest level: tokens (E channels, scale 2^(n-1)·p) → stem's last map (scale 2^(n-1)).
        let mut cin = self.embed_dim;
        for level in (0..n).rev() {
            let w = self.widths[level];
            let factor = if level == n - 1 { self.patch } else { 2 };
            // Token scale relative to this level: 2^(n-1-level) · patch.
            let hidden_factor = (1usize << (n - 1 - level)) * self.patch;
            levels.push(DecoderLevel {
                up: UpsampleNdConfig::new(s, [cin, w], factor).init(device),
                fuse: vec![
                    ConvNormActConfig::new(s, [2 * w, w])
                        .with_norm(self.norm)
                        .init(device),
                    ConvNormActConfig::new(s, [w, w])
                        .with_norm(self.norm)
                        .init(device),
                ],
                hidden_skip: self.transformer_skips.then(|| {
                    UpsampleNdConfig::new(s, [self.embed_dim, w], hidden_factor).init(device)
                }),
            });
            cin = w;
        }
        Decoder {
            levels,
            head: ConvNdConfig::new(s, [self.widths[0], self.num_classes], 1).init(device),
            deep_heads: if self.deep_supervision {
                (1..n)
                    .rev()
                    .map(|l| {
                        ConvNdConfig::new(s, [self.widths[l], self.num_classes], 1).init(device)
                    })
                    .collect()
            } else {
                Vec::new()
            },
            hidden_index: self.hidden_indices(),
        }
    }
}

impl Decoder {
    /// # Shapes
    /// - `tokens`: `[B, E, d, h, w]` (transformer output on the token grid)
    /// - `skips`: stem maps, level `i` `[B, widths[i], D/2^i, H/2^i, W/2^i]`
    /// - `hidden`: transformer hidden states, each `[B, E, d, h, w]`
    /// - output: logits `[B, K, D, H, W]`, and with deep supervision the coarser logits, deepest
    ///   first, level `i` at `[B, K, D/2^i, H/2^i, W/2^i]`
    ///
    /// # Panics
    /// When `skips` does not have one map per stem level (a wiring bug, not a data error).
    pub fn forward(
        &self,
        tokens: Tensor<5>,
        skips: &[Tensor<5>],
        hidden: &[Tensor<5>],
    ) -> (Tensor<5>, Vec<Tensor<5>>) {
        // Level i fuses skip n-1-i: a stem with another depth would silently misalign scales.
        let n = self.levels.len();
        assert_eq!(
            skips.len(),
            n,
            "decoder built for {n} stem levels got {} skip maps",
            skips.len()
        );
        let mut x = tokens;
        let mut deep = Vec::new();
        for (i, level) in self.levels.iter().enumerate() {
            let scale = n - 1 - i;
            let mut skip = skips[scale].clone();
            if let (Some(proj), Some(h)) = (&level.hidden_skip, hidden.get(self.hidden_index[i])) {
                skip = skip + proj.forward(h.clone());
            }
            x = Tensor::cat(vec![level.up.forward(x), skip], 1);
            for layer in &level.fuse {
                x = layer.forward(x);
            }
            if let Some(head) = self.deep_heads.get(i) {
                deep.push(head.forward(x.clone()));
            }
        }
        (self.head.forward(x), deep)
    }
}
