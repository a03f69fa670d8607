//! The Vision-Transformer encoder: token embedding of the stem's last feature map, position
//! embeddings, pre-norm self-attention blocks; returns every block's hidden state (UNETR taps them).

use burn::module::Param;
use burn::nn::attention::{MhaInput, MultiHeadAttention, MultiHeadAttentionConfig};
use burn::nn::{
    Dropout, DropoutConfig, Initializer, LayerNorm, LayerNormConfig, Linear, LinearConfig,
};
use burn::prelude::*;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};

use super::blocks::{ConvNd, ConvNdConfig};
use super::kernels;

pub use crate::config::PositionEmbedding;

/// A [`Vit`] encoder over the stem's deepest feature map.
#[derive(Config, Debug)]
pub struct VitConfig {
    /// 2 or 3; in 2D tokens span H and W only.
    pub spatial_dims: usize,
    /// Channels of the stem feature map being tokenised.
    pub in_channels: usize,
    /// Transformer width (token dimension).
    pub embed_dim: usize,
    /// Transformer blocks.
    pub depth: usize,
    /// Attention heads (must divide `embed_dim`).
    pub heads: usize,
    /// Stem feature-map voxels per token edge (1 = one token per stem voxel).
    #[config(default = 1)]
    pub patch: usize,
    /// The token grid at training size `[d, h, w]` (sizes the learned position embedding).
    pub grid: [usize; 3],
    /// MLP width as a multiple of `embed_dim`.
    #[config(default = 4)]
    pub mlp_ratio: usize,
    /// Dropout on attention weights and after attention and MLP.
    #[config(default = 0.0)]
    pub dropout: f64,
    /// Learned (sized by `grid`) or sinusoidal position embeddings.
    #[config(default = "PositionEmbedding::Learned")]
    pub position: PositionEmbedding,
}

/// Pre-norm transformer block: `x + MHA(LN(x))`, then `x + MLP(LN(x))`.
#[derive(Module, Debug)]
pub struct VitBlock {
    norm_attention: LayerNorm,
    attention: MultiHeadAttention,
    norm_mlp: LayerNorm,
    mlp_in: Linear,
    mlp_out: Linear,
    dropout: Dropout,
}

/// A [`VitBlock`].
#[derive(Config, Debug)]
pub struct VitBlockConfig {
    /// Token dimension.
    pub embed_dim: usize,
    /// Attention heads (must divide `embed_dim`).
    pub heads: usize,
    /// MLP width as a multiple of `embed_dim`.
    #[config(default = 4)]
    pub mlp_ratio: usize,
    /// Dropout on attention weights and after attention and MLP.
    #[config(default = 0.0)]
    pub dropout: f64,
}

impl VitBlockConfig {
    /// Builds the block with freshly initialised weights on `device`.
    pub fn init(&self, device: &Device) -> VitBlock {
        let (d, hidden) = (self.embed_dim, self.embed_dim * self.mlp_ratio);
        VitBlock {
            // eps 1e-6 as in ViT (Dosovitskiy et al., 2021).
            norm_attention: LayerNormConfig::new(d).with_epsilon(1e-6).init(device),
            attention: MultiHeadAttentionConfig::new(d, self.heads)
                .with_dropout(self.dropout)
                .init(device),
            norm_mlp: LayerNormConfig::new(d).with_epsilon(1e-6).init(device),
            mlp_in: LinearConfig::new(d, hidden).init(device),
            mlp_out: LinearConfig::new(hidden, d).init(device),
            dropout: DropoutConfig::new(self.dropout).init(),
        }
    }
}

impl VitBlock {
    /// # Shapes
    /// - `x`: `[B, N, E]` → `[B, N, E]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.forward_with_attention(x).0
    }

    /// The block's output and its attention weights (computed by every pass anyway).
    ///
    /// # Shapes
    /// - `x`: `[B, N, E]` → (`[B, N, E]`, weights `[B, heads, N, N]`, rows sum to 1)
    pub fn forward_with_attention(&self, x: Tensor<3>) -> (Tensor<3>, Tensor<4>) {
        let (h, weights) = self.attend(self.norm_attention.forward(x.clone()));
        let x = x + self.dropout.forward(h);
        let h = self.mlp_in.forward(self.norm_mlp.forward(x.clone()));
        let h = self.mlp_out.forward(self.dropout.forward(kernels::gelu(h)));
        (x + self.dropout.forward(h), weights)
    }
}

impl VitBlock {
    /// Self-attention with burn's `MultiHeadAttention` weights (the same record), its scaled
    /// softmax on [`kernels::softmax`]: burn's is six recorded tensor ops and a libm `exp` per
    /// score. A quiet softmax goes to burn's own forward.
    ///
    /// # Shapes
    /// - `x`: `[B, N, E]` → (`[B, N, E]`, weights `[B, heads, N, N]`)
    fn attend(&self, x: Tensor<3>) -> (Tensor<3>, Tensor<4>) {
        let mha = &self.attention;
        if mha.quiet_softmax {
            let out = mha.forward(MhaInput::self_attn(x));
            return (out.context, out.weights);
        }
        let [b, n, e] = x.dims();
        let heads = |linear: &Linear| {
            linear
                .forward(x.clone())
                .reshape([b, n, mha.n_heads, mha.d_k])
                .swap_dims(1, 2)
        };
        let (q, k, v) = (heads(&mha.query), heads(&mha.key), heads(&mha.value));
        let scores = q.matmul(k.transpose());
        let weights = mha
            .dropout
            .forward(kernels::softmax(scores, (mha.d_k as f64).sqrt()));
        let context = weights.clone().matmul(v).swap_dims(1, 2).reshape([b, n, e]);
        (mha.output.forward(context), weights)
    }
}

/// Patch embedding, position embedding, transformer blocks and a final layer norm.
#[derive(Module, Debug)]
pub struct Vit {
    embed: ConvNd,
    /// `[1, N_train, E]`; `None` with sinusoidal embeddings.
    position: Option<Param<Tensor<3>>>,
    blocks: Vec<VitBlock>,
    norm: LayerNorm,
    grid: [usize; 3],
    embed_dim: usize,
}

/// Encoder output: the final (normed) tokens as a feature map, and every block's hidden state.
pub struct VitOutput {
    /// `[B, E, d, h, w]`
    pub features: Tensor<5>,
    /// Per block, `[B, E, d, h, w]`.
    pub hidden: Vec<Tensor<5>>,
    /// Per block, the attention weights `[B, heads, N, N]` (tokens in `[d, h, w]` raster order)
    /// when asked for, else empty.
    pub attention: Vec<Tensor<4>>,
}

impl VitConfig {
    /// Builds the encoder with freshly initialised weights on `device`.
    pub fn init(&self, device: &Device) -> Vit {
        let n: usize = self.grid.iter().product();
        Vit {
            embed: ConvNdConfig::new(
                self.spatial_dims,
                [self.in_channels, self.embed_dim],
                self.patch,
            )
            .with_stride(self.patch)
            .with_pad(false)
            .init(device),
            position: (self.position == PositionEmbedding::Learned).then(|| {
                // std 0.02 as ViT / timm's trunc_normal_ init.
                Initializer::Normal {
                    mean: 0.0,
                    std: 0.02,
                }
                .init([1, n, self.embed_dim], device)
            }),
            blocks: (0..self.depth)
                .map(|_| {
                    VitBlockConfig::new(self.embed_dim, self.heads)
                        .with_mlp_ratio(self.mlp_ratio)
                        .with_dropout(self.dropout)
                        .init(device)
                })
                .collect(),
            norm: LayerNormConfig::new(self.embed_dim)
                .with_epsilon(1e-6)
                .init(device),
            grid: self.grid,
            embed_dim: self.embed_dim,
        }
    }
}

impl Vit {
    /// # Shapes
    /// - `x`: stem features `[B, C, D, H, W]`; 2D uses `D = 1` and the patch only spans H, W
    /// - output: [`VitOutput`] on the token grid `[d, h, w] = [D/p (3D) or 1, H/p, W/p]`
    pub fn forward(&self, x: Tensor<5>) -> VitOutput {
        self.encode(x, false)
    }

    /// [`Self::forward`] keeping every block's attention weights.
    ///
    /// # Shapes
    /// - as [`Self::forward`]; `attention` per block `[B, heads, N, N]`, `N = d·h·w`
    pub fn forward_with_attention(&self, x: Tensor<5>) -> VitOutput {
        self.encode(x, true)
    }

    /// # Shapes
    /// - as [`Self::forward`]
    fn encode(&self, x: Tensor<5>, keep_attention: bool) -> VitOutput {
        let tokens = self.embed.forward(x);
        let [b, e, d, h, w] = tokens.dims();
        let n = d * h * w;
        // [B, E, d, h, w] → [B, E, N] → [B, N, E]
        let mut t = tokens.reshape([b, e, n]).swap_dims(1, 2);
        let device = t.device();
        t = t + match &self.position {
            Some(p) => self.resize_position(p.val(), [d, h, w]),
            None => sinusoidal([d, h, w], e, &device),
        };
        let to_map = |t: Tensor<3>| t.swap_dims(1, 2).reshape([b, e, d, h, w]);
        let mut hidden = Vec::with_capacity(self.blocks.len());
        let mut attention = Vec::new();
        for block in &self.blocks {
            let (out, weights) = block.forward_with_attention(t);
            t = out;
            hidden.push(to_map(t.clone()));
            if keep_attention {
                attention.push(weights);
            }
        }
        VitOutput {
            features: to_map(self.norm.forward(t)),
            hidden,
            attention,
        }
    }

    /// The token grid the learned position embedding was trained on.
    pub(super) fn grid(&self) -> [usize; 3] {
        self.grid
    }

    /// The learned position embedding resampled to `grid` (`None` with sinusoidal embeddings).
    ///
    /// # Shapes
    /// - output: `[1, d·h·w, E]`
    pub(super) fn position_on(&self, grid: [usize; 3]) -> Option<Tensor<3>> {
        self.position
            .as_ref()
            .map(|p| self.resize_position(p.val(), grid))
    }

    /// The learned embedding on `grid`: as stored when it is the training grid, else resampled
    /// (bilinear per plane, then along depth) like ViT's interpolated position embeddings.
    ///
    /// # Shapes
    /// - `pos`: `[1, N_train, E]` → `[1, d·h·w, E]`
    fn resize_position(&self, pos: Tensor<3>, grid: [usize; 3]) -> Tensor<3> {
        if grid == self.grid {
            return pos;
        }
        let [d0, h0, w0] = self.grid;
        let [d, h, w] = grid;
        let e = self.embed_dim;
        let opts = |size: [usize; 2]| {
            InterpolateOptions::new(InterpolateMode::Bilinear)
                .with_align_corners(false)
                .with_output_size(size)
        };
        // [1, N, E] → [1, E, d0, h0, w0] → planes [E·d0 as batch.. ] → resize H, W
        let map = pos.swap_dims(1, 2).reshape([e, d0, h0, w0]);
        let planes = interpolate(map, opts([h, w])); // [E, d0, h, w] with d0 as channels
        let resized = if d0 == d {
            planes
        } else {
            // Resize depth: treat [E, 1, d0, h·w] as an image and stretch its first axis.
            let deep = planes.reshape([e, 1, d0, h * w]);
            interpolate(deep, opts([d, h * w])).reshape([e, d, h, w])
        };
        resized.reshape([1, e, d * h * w]).swap_dims(1, 2)
    }
}

/// Fixed sinusoidal embeddings: the embedding is split in three (depth, height, width), each a
/// sin/cos pair over geometric frequencies.
///
/// # Shapes
/// - output: `[1, d·h·w, E]`
fn sinusoidal(grid: [usize; 3], e: usize, device: &Device) -> Tensor<3> {
    let per_axis = (e / 6) * 2; // an even share per axis; any remainder stays zero
    let n: usize = grid.iter().product();
    let mut data = vec![0f32; n * e];
    for (idx, row) in data.chunks_exact_mut(e).enumerate() {
        let pos = [
            idx / (grid[1] * grid[2]),
            (idx / grid[2]) % grid[1],
            idx % grid[2],
        ];
        for (axis, &p) in pos.iter().enumerate() {
            for i in 0..per_axis / 2 {
                let freq = 1.0 / 10000f32.powf(2.0 * i as f32 / per_axis as f32);
                row[axis * per_axis + 2 * i] = (p as f32 * freq).sin();
                row[axis * per_axis + 2 * i + 1] = (p as f32 * freq).cos();
            }
        }
    }
    Tensor::from_data(TensorData::new(data, [1, n, e]), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{activation, Distribution};

    fn max_diff(a: Tensor<3>, b: Tensor<3>) -> f32 {
        let top = |t: Tensor<3>| t.abs().max().into_scalar::<f32>();
        top(a - b.clone()) / (1.0 + top(b))
    }

    /// The block's own attention (the default, medseg's softmax and GELU) equals burn's
    /// `MultiHeadAttention` and `gelu` with the same weights: output, attention weights and the
    /// input's gradient.
    #[test]
    fn the_block_equals_burn_attention_and_mlp_with_the_same_weights() {
        let device = Device::flex().autodiff();
        let block = VitBlockConfig::new(24, 3).init(&device);
        let input =
            || Tensor::<3>::random([2, 37, 24], Distribution::Normal(0.0, 2.0), &Device::flex());
        let x0 = input();
        let probe = Tensor::<3>::from_data(input().into_data(), &device);
        let run = |own: bool| {
            let x = Tensor::<3>::from_data(x0.clone().into_data(), &device).require_grad();
            let (y, weights) = if own {
                block.forward_with_attention(x.clone())
            } else {
                let mha = block
                    .attention
                    .forward(MhaInput::self_attn(block.norm_attention.forward(x.clone())));
                let h = x.clone() + mha.context;
                let mlp = block.mlp_out.forward(activation::gelu(
                    block.mlp_in.forward(block.norm_mlp.forward(h.clone())),
                ));
                (h + mlp, mha.weights)
            };
            let grads = (y.clone() * probe.clone()).sum().backward();
            let dx = x.grad(&grads).expect("input gradient");
            let [b, h, n, _] = weights.dims();
            (
                y,
                weights.reshape([b * h, n, n]),
                Tensor::<3>::from_data(dx.into_data(), &device),
            )
        };
        let (ours, reference) = (run(true), run(false));
        for (name, a, b) in [
            ("output", ours.0, reference.0),
            ("weights", ours.1, reference.1),
            ("dx", ours.2, reference.2),
        ] {
            let diff = max_diff(a, b);
            assert!(diff <= 1e-4, "{name} differs by {diff}");
        }
    }
}
