//! `HybridSegNet`: CNN stem → Vision-Transformer encoder → U-shaped decoder (TransUNet; UNETR
//! skips and Primus-style coarse tokens as options), for 2D slices, 2.5D slice stacks and 3D patches.
//!
//! The whole architecture is one serialisable [`HybridSegNetConfig`]; it is saved beside the
//! weights and is all that inference needs to rebuild the network.

pub mod blocks;
pub mod decoder;
pub mod kernels;
pub mod stem;
pub mod summary;
pub mod transfer;
pub mod vit;

use crate::io::layout::Checkpoint;
use std::path::Path;

use burn::prelude::*;
use burn::tensor::ops::PadMode;

pub use crate::config::{KernelPath, ModelPreset};
use crate::error::{Error, Result};
use crate::geometry::PatchSize;
pub use blocks::NormKind;
use decoder::{Decoder, DecoderConfig};
use stem::{Stem, StemConfig};
pub use vit::PositionEmbedding;
use vit::{Vit, VitConfig};

/// The whole network, serialised as `model.json` beside the weights. Build one with
/// [`HybridSegNetConfig::preset`] or `HybridSegNetConfig::new(patch_size, num_classes)` and the
/// `with_*` setters; the defaults are the `tiny` preset.
#[derive(Config, Debug)]
pub struct HybridSegNetConfig {
    /// Training patch size in array order, `[H, W]` (2D slices or 2.5D stacks) or `[D, H, W]`
    /// (3D patches): sets the spatial dimensions and sizes the learned position grid.
    pub patch_size: PatchSize,
    /// Output classes including background.
    pub num_classes: usize,
    /// Image channels (MR sequences, CT = 1).
    #[config(default = 1)]
    pub in_channels: usize,
    /// 2.5D: neighbouring slices on each side stacked as extra input channels (0 = plain 2D).
    #[config(default = 0)]
    pub context_slices: usize,
    /// Stem stage widths; stage `i` works at 1/2^i resolution.
    #[config(default = "vec![8, 16, 32]")]
    pub stem_widths: Vec<usize>,
    /// Residual blocks in each stem stage.
    #[config(default = 1)]
    pub blocks_per_stage: usize,
    /// Stem voxels per token edge; total stride = 2^(stages-1) · token_patch.
    #[config(default = 2)]
    pub token_patch: usize,
    /// Transformer width.
    #[config(default = 64)]
    pub embed_dim: usize,
    /// Transformer blocks.
    #[config(default = 2)]
    pub depth: usize,
    /// Attention heads (must divide `embed_dim`).
    #[config(default = 2)]
    pub heads: usize,
    /// MLP width as a multiple of `embed_dim`.
    #[config(default = 2)]
    pub mlp_ratio: usize,
    /// Dropout in the transformer.
    #[config(default = 0.0)]
    pub dropout: f64,
    /// How tokens learn where they are.
    #[config(default = "PositionEmbedding::Learned")]
    pub position: PositionEmbedding,
    /// Normalisation in the stem and decoder.
    #[config(default = "NormKind::Instance")]
    pub norm: NormKind,
    /// UNETR-style skips from intermediate transformer blocks.
    #[config(default = false)]
    pub transformer_skips: bool,
    /// Extra logits at coarser decoder levels (nnU-Net's deep supervision).
    #[config(default = false)]
    pub deep_supervision: bool,
    /// CPU kernels for the convolutions and activations; building the model selects them for
    /// the process. Unset (as in model.json files written before it existed): medseg's.
    #[config(default = "None")]
    pub kernels: Option<KernelPath>,
}

impl HybridSegNetConfig {
    /// A preset for a patch size (2D or 3D) and a class count; see [`ModelPreset`].
    ///
    /// - `tiny`: stem 8-16-32, ViT 64 × 2 layers × 2 heads (trains in minutes on 2 CPU cores)
    /// - `small`: stem 16-32-64, ViT 192 × 4 × 3 (the scale DESIGN.md's PyTorch timing used)
    /// - `base`: stem 64-128-256-512 with 2 blocks per stage, ViT-B 768 × 12 × 12 on 16× coarse
    ///   tokens (TransUNet R50-ViT-B/16 scale, about 10^8 parameters)
    pub fn preset(preset: ModelPreset, patch_size: PatchSize, num_classes: usize) -> Self {
        let config = HybridSegNetConfig::new(patch_size, num_classes);
        match preset {
            ModelPreset::Tiny => config,
            ModelPreset::Small => config
                .with_stem_widths(vec![16, 32, 64])
                .with_embed_dim(192)
                .with_depth(4)
                .with_heads(3)
                .with_mlp_ratio(4),
            ModelPreset::Base => config
                .with_stem_widths(vec![64, 128, 256, 512])
                .with_blocks_per_stage(2)
                .with_embed_dim(768)
                .with_depth(12)
                .with_heads(12)
                .with_mlp_ratio(4)
                .with_norm(NormKind::Group),
        }
    }

    /// The default training patch for a preset: 2D 224², 3D 96³.
    pub fn default_patch(spatial_dims: usize) -> Result<PatchSize> {
        match spatial_dims {
            2 => Ok(PatchSize::new(&[224, 224]).expect("positive")),
            3 => Ok(PatchSize::new(&[96, 96, 96]).expect("positive")),
            other => Err(Error::Config {
                reason: format!("spatial_dims must be 2 or 3, not {other}"),
            }),
        }
    }

    /// 2 (slices, or 2.5D stacks) or 3 (patches): from the patch size.
    pub fn spatial_dims(&self) -> usize {
        self.patch_size.spatial_dims()
    }

    /// Input channels seen by the first layer: channels × (2·context + 1) for 2.5D.
    pub fn input_channels(&self) -> usize {
        self.in_channels * (2 * self.context_slices + 1)
    }

    /// Product of all downsampling: stem stages then token patches.
    pub fn total_stride(&self) -> usize {
        (1 << (self.stem_widths.len().saturating_sub(1))) * self.token_patch
    }

    /// Checks the configuration's internal consistency.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| Err(Error::Config { reason });
        if self.stem_widths.is_empty() || self.stem_widths.contains(&0) {
            return bad(format!(
                "stem_widths {:?} must be non-empty and positive",
                self.stem_widths
            ));
        }
        if self.heads == 0 || self.embed_dim % self.heads != 0 {
            return bad(format!(
                "embed_dim {} must be divisible by heads {}",
                self.embed_dim, self.heads
            ));
        }
        if self.in_channels == 0
            || self.num_classes == 0
            || self.token_patch == 0
            || self.depth == 0
        {
            return bad("in_channels, num_classes, token_patch and depth must be positive".into());
        }
        if self.context_slices > 0 && self.patch_size.is_3d() {
            return bad("context_slices (2.5D) needs a 2D patch_size".into());
        }
        Ok(())
    }

    /// Token grid `[d, h, w]` for an input size (after padding to the total stride); `d = 1` in 2D.
    pub fn token_grid(&self, size: PatchSize) -> [usize; 3] {
        let s = self.total_stride();
        let [d, h, w] = size.window();
        let d = if size.is_3d() { d.div_ceil(s) } else { 1 };
        [d, h.div_ceil(s), w.div_ceil(s)]
    }

    /// Validates the config and builds the network with freshly initialised weights on `device`.
    pub fn init(&self, device: &Device) -> Result<HybridSegNet> {
        self.validate()?;
        kernels::select(self.kernels.unwrap_or_default());
        let s = self.spatial_dims();
        let last = *self.stem_widths.last().unwrap_or(&1);
        Ok(HybridSegNet {
            stem: StemConfig::new(s, self.input_channels(), self.stem_widths.clone())
                .with_blocks_per_stage(self.blocks_per_stage)
                .with_norm(self.norm)
                .init(device),
            vit: VitConfig::new(
                s,
                last,
                self.embed_dim,
                self.depth,
                self.heads,
                self.token_grid(self.patch_size),
            )
            .with_patch(self.token_patch)
            .with_mlp_ratio(self.mlp_ratio)
            .with_dropout(self.dropout)
            .with_position(self.position)
            .init(device),
            decoder: DecoderConfig::new(
                s,
                self.embed_dim,
                self.stem_widths.clone(),
                self.token_patch,
                self.num_classes,
                self.depth,
            )
            .with_transformer_skips(self.transformer_skips)
            .with_deep_supervision(self.deep_supervision)
            .with_norm(self.norm)
            .init(device),
            spatial_dims: s,
            stride: self.total_stride(),
        })
    }
}

/// The segmentation network: CNN stem → ViT encoder → U-shaped decoder. Build it with
/// [`HybridSegNetConfig::init`] or [`load`].
#[derive(Module, Debug)]
pub struct HybridSegNet {
    stem: Stem,
    vit: Vit,
    decoder: Decoder,
    spatial_dims: usize,
    stride: usize,
}

/// Class logits at input resolution, plus coarser deep-supervision logits (deepest first).
#[derive(Debug, Clone)]
pub struct SegOutput {
    /// `[B, K, D, H, W]` (`D = 1` in 2D)
    pub logits: Tensor<5>,
    /// Deep-supervision logits, deepest first, level `i` at `[B, K, D/2^i, H/2^i, W/2^i]` (depth
    /// kept in 2D); empty unless the config enables deep supervision.
    pub deep: Vec<Tensor<5>>,
}

impl HybridSegNet {
    /// Any spatial size works: the input is zero-padded up to a multiple of the total stride and
    /// the logits are cropped back.
    ///
    /// # Shapes
    /// - `x`: `[B, C_in, D, H, W]`; in 2D `D` must be 1 (2.5D stacks are channels)
    /// - output: [`SegOutput`] with logits `[B, K, D, H, W]`
    pub fn forward(&self, x: Tensor<5>) -> SegOutput {
        let [_, _, d, h, w] = x.dims();
        let s = self.stride;
        let extra = |n: usize| n.div_ceil(s) * s - n;
        let depth_pad = if self.spatial_dims == 3 { extra(d) } else { 0 };
        let (ph, pw) = (extra(h), extra(w));
        let padded = depth_pad + ph + pw > 0;
        let x = if padded {
            // Pairs apply to the last three axes (D, H, W); pad at the far end only.
            x.pad([(0, depth_pad), (0, ph), (0, pw)], PadMode::Constant(0.0))
        } else {
            x
        };
        let skips = self.stem.forward(x);
        let deepest = skips
            .last()
            .cloned()
            .expect("the stem has at least one stage (validated)");
        let encoded = self.vit.forward(deepest);
        let (logits, deep) = self
            .decoder
            .forward(encoded.features, &skips, &encoded.hidden);
        let logits = if padded {
            let [b, k, ..] = logits.dims();
            logits.slice([0..b, 0..k, 0..d, 0..h, 0..w])
        } else {
            logits
        };
        SegOutput { logits, deep }
    }

    /// The Transformer's attention over a batch of windows: every block's weights and the token
    /// grid they index (stem and encoder only; the decoder is not run).
    ///
    /// # Shapes
    /// - `x`: `[B, C_in, D, H, W]` as for [`Self::forward`]
    /// - output: per block `[B, heads, N, N]`, and the token grid `[d, h, w]` (`N = d·h·w`)
    ///   covering the input padded to a multiple of the total stride
    pub fn attention(&self, x: Tensor<5>) -> (Vec<Tensor<4>>, [usize; 3]) {
        let [_, _, d, h, w] = x.dims();
        let s = self.stride;
        let extra = |n: usize| n.div_ceil(s) * s - n;
        let depth_pad = if self.spatial_dims == 3 { extra(d) } else { 0 };
        let x = x.pad(
            [(0, depth_pad), (0, extra(h)), (0, extra(w))],
            PadMode::Constant(0.0),
        );
        let skips = self.stem.forward(x);
        let deepest = skips
            .last()
            .cloned()
            .expect("the stem has at least one stage (validated)");
        let encoded = self.vit.forward_with_attention(deepest);
        let [_, _, td, th, tw] = encoded.features.dims();
        (encoded.attention, [td, th, tw])
    }

    /// Forward for a 2D batch `[B, C, H, W]` → logits `[B, K, H, W]`.
    ///
    /// # Shapes
    /// - `x`: `[B, C_in, H, W]` → `[B, K, H, W]`
    pub fn forward_2d(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let out = self.forward(x.reshape([b, c, 1, h, w])).logits;
        let k = out.dims()[1];
        out.reshape([b, k, h, w])
    }
}

/// Picks the compute device by name: `cpu` (the `flex` backend), `wgpu` or `cuda` when the build
/// has that feature.
pub fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" | "flex" => Ok(Device::flex()),
        #[cfg(feature = "wgpu")]
        "wgpu" => Ok(Device::wgpu(burn::prelude::DeviceKind::DefaultDevice)),
        #[cfg(feature = "cuda")]
        "cuda" => Ok(Device::cuda(0)),
        #[cfg(not(feature = "wgpu"))]
        "wgpu" => Err(missing_backend("wgpu")),
        #[cfg(not(feature = "cuda"))]
        "cuda" => Err(missing_backend("cuda")),
        other => Err(Error::Config {
            reason: format!("unknown device {other:?}; choose cpu, wgpu or cuda"),
        }),
    }
}

#[allow(dead_code)] // unused when both GPU backends are compiled in
fn missing_backend(name: &str) -> Error {
    Error::Config {
        reason: format!(
            "this medseg was built without the {name} backend; rebuild with `cargo build --release --features {name}`"
        ),
    }
}

/// Saves the config (`model.json`) and weights (`weights.bpk`) into `dir`, both atomically.
pub fn save(config: &HybridSegNetConfig, model: &HybridSegNet, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let files = Checkpoint::new(dir);
    crate::io::write_json_atomically(&files.model_config(), config)?;
    save_weights(model, &files.weights())
}

/// Writes `model`'s weights alone to `path` (a `.bpk` file).
pub fn save_weights(model: &HybridSegNet, path: &Path) -> Result<()> {
    model.clone().save_file(path).map_err(|e| Error::Write {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// `model` with its weights read from `path` (written by [`save_weights`]); the architecture
/// must match.
pub fn load_weights(model: HybridSegNet, path: &Path) -> Result<HybridSegNet> {
    model.try_load_file(path).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Rebuilds a model from a directory written by [`save`]: the config alone defines the network.
pub fn load(dir: &Path, device: &Device) -> Result<(HybridSegNetConfig, HybridSegNet)> {
    let files = Checkpoint::new(dir);
    let path = files.model_config();
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let config: HybridSegNetConfig =
        serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    let model = load_weights(config.init(device)?, &files.weights())?;
    Ok((config, model))
}
