//! `HybridSegNet`: CNN stem → Vision-Transformer encoder → U-shaped decoder (TransUNet; UNETR
//! skips and Primus-style coarse tokens as options), for 2D slices, 2.5D slice stacks and 3D patches.
//!
//! The whole architecture is one serialisable [`HybridSegNetConfig`]; it is saved beside the
//! weights and is all that inference needs to rebuild the network.

pub mod blocks;
pub mod decoder;
pub mod stem;
pub mod summary;
pub mod vit;

use crate::io::layout::Checkpoint;
use std::path::Path;

use burn::prelude::*;
use burn::tensor::ops::PadMode;

use crate::error::{Error, Result};
pub use blocks::NormKind;
use decoder::{Decoder, DecoderConfig};
use stem::{Stem, StemConfig};
pub use vit::PositionEmbedding;
use vit::{Vit, VitConfig};

#[derive(Config, Debug)]
pub struct HybridSegNetConfig {
    /// 2 (slices, or 2.5D stacks) or 3 (patches).
    pub spatial_dims: usize,
    /// Image channels (MR sequences, CT = 1).
    pub in_channels: usize,
    /// Output classes including background.
    pub num_classes: usize,
    /// 2.5D: neighbouring slices on each side stacked as extra input channels (0 = plain 2D).
    #[config(default = 0)]
    pub context_slices: usize,
    /// Training patch size, spatial (`[H, W]` or `[D, H, W]`); sizes the learned position grid.
    pub patch_size: Vec<usize>,
    /// Stem stage widths; stage `i` works at 1/2^i resolution.
    pub stem_widths: Vec<usize>,
    #[config(default = 1)]
    pub blocks_per_stage: usize,
    /// Stem voxels per token edge; total stride = 2^(stages-1) · token_patch.
    #[config(default = 2)]
    pub token_patch: usize,
    pub embed_dim: usize,
    pub depth: usize,
    pub heads: usize,
    #[config(default = 4)]
    pub mlp_ratio: usize,
    #[config(default = 0.0)]
    pub dropout: f64,
    #[config(default = "PositionEmbedding::Learned")]
    pub position: PositionEmbedding,
    #[config(default = "NormKind::Instance")]
    pub norm: NormKind,
    #[config(default = false)]
    pub transformer_skips: bool,
    #[config(default = false)]
    pub deep_supervision: bool,
}

/// Model size presets.
pub const PRESETS: [&str; 3] = ["tiny", "small", "base"];

impl HybridSegNetConfig {
    /// A preset for `spatial_dims` with its default patch size (2D 224², 3D 96³).
    ///
    /// - `tiny`: stem 8-16-32, ViT 64 × 2 layers × 2 heads (trains in minutes on 2 CPU cores)
    /// - `small`: stem 16-32-64, ViT 192 × 4 × 3 (the scale DESIGN.md's PyTorch timing used)
    /// - `base`: stem 64-128-256-512 with 2 blocks per stage, ViT-B 768 × 12 × 12 on 16× coarse
    ///   tokens (TransUNet R50-ViT-B/16 scale, about 10^8 parameters)
    pub fn preset(
        name: &str,
        spatial_dims: usize,
        in_channels: usize,
        num_classes: usize,
    ) -> Result<Self> {
        if spatial_dims != 2 && spatial_dims != 3 {
            return Err(Error::Config {
                reason: format!("spatial_dims must be 2 or 3, not {spatial_dims}"),
            });
        }
        let patch = if spatial_dims == 2 {
            vec![224, 224]
        } else {
            vec![96, 96, 96]
        };
        let base = |widths: Vec<usize>, e, depth, heads| {
            HybridSegNetConfig::new(
                spatial_dims,
                in_channels,
                num_classes,
                patch.clone(),
                widths,
                e,
                depth,
                heads,
            )
        };
        Ok(match name {
            "tiny" => base(vec![8, 16, 32], 64, 2, 2).with_mlp_ratio(2),
            "small" => base(vec![16, 32, 64], 192, 4, 3),
            "base" => base(vec![64, 128, 256, 512], 768, 12, 12)
                .with_blocks_per_stage(2)
                .with_norm(NormKind::Group),
            other => {
                return Err(Error::Config {
                    reason: format!(
                        "unknown preset {other:?}; choose one of {}",
                        PRESETS.join(", ")
                    ),
                })
            }
        })
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
        if self.spatial_dims != 2 && self.spatial_dims != 3 {
            return bad(format!(
                "spatial_dims must be 2 or 3, not {}",
                self.spatial_dims
            ));
        }
        if self.patch_size.len() != self.spatial_dims {
            return bad(format!(
                "patch_size {:?} needs {} sizes for spatial_dims = {}",
                self.patch_size, self.spatial_dims, self.spatial_dims
            ));
        }
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
        if self.context_slices > 0 && self.spatial_dims != 2 {
            return bad("context_slices (2.5D) needs spatial_dims = 2".into());
        }
        Ok(())
    }

    /// Token grid `[d, h, w]` for a spatial input size (after padding to the total stride).
    pub fn token_grid(&self, spatial: &[usize]) -> [usize; 3] {
        let s = self.total_stride();
        let up = |n: usize| n.div_ceil(s);
        if self.spatial_dims == 2 {
            [1, up(spatial[0]), up(spatial[1])]
        } else {
            [up(spatial[0]), up(spatial[1]), up(spatial[2])]
        }
    }

    pub fn init(&self, device: &Device) -> Result<HybridSegNet> {
        self.validate()?;
        let s = self.spatial_dims;
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
                self.token_grid(&self.patch_size),
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
    model
        .clone()
        .save_file(files.weights())
        .map_err(|e| Error::Write {
            path: files.weights(),
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
    let weights = files.weights();
    let model = config
        .init(device)?
        .try_load_file(&weights)
        .map_err(|e| Error::Checkpoint {
            path: weights.clone(),
            reason: e.to_string(),
        })?;
    Ok((config, model))
}
