//! The convolutional stem: residual stages, each halving the resolution after the first, keeping
//! every stage's output as a skip connection for the decoder (TransUNet's CNN part, at small scale).

use burn::prelude::*;

use super::blocks::{NormKind, ResidualBlock, ResidualBlockConfig};

/// A [`Stem`]: its input channels, stage widths and blocks per stage.
#[derive(Config, Debug)]
pub struct StemConfig {
    /// 2 or 3; in 2D only H and W are downsampled.
    pub spatial_dims: usize,
    /// Input channels (image channels × slices of a 2.5D stack).
    pub in_channels: usize,
    /// Channels of each stage; stage 0 keeps full resolution, every later one halves it.
    pub widths: Vec<usize>,
    /// Residual blocks per stage (the first of a stage does the downsampling).
    #[config(default = 1)]
    pub blocks_per_stage: usize,
    /// Normalisation in every block.
    #[config(default = "NormKind::Instance")]
    pub norm: NormKind,
}

/// Stages of residual blocks; every stage's output is kept as a skip for the decoder.
#[derive(Module, Debug)]
pub struct Stem {
    stages: Vec<Vec<ResidualBlock>>,
}

impl StemConfig {
    /// Builds the stem with freshly initialised weights on `device`.
    pub fn init(&self, device: &Device) -> Stem {
        let mut cin = self.in_channels;
        let stages = self
            .widths
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                (0..self.blocks_per_stage.max(1))
                    .map(|b| {
                        let block = ResidualBlockConfig::new(self.spatial_dims, [cin, w])
                            .with_stride(if i > 0 && b == 0 { 2 } else { 1 })
                            .with_norm(self.norm)
                            .init(device);
                        cin = w;
                        block
                    })
                    .collect()
            })
            .collect();
        Stem { stages }
    }
}

impl Stem {
    /// # Shapes
    /// - `x`: `[B, C_in, D, H, W]`, spatial sizes divisible by `2^(stages-1)` (3D) or H, W (2D)
    /// - output: one feature map per stage, stage `i` is `[B, widths[i], D/2^i, H/2^i, W/2^i]`
    ///   (depth kept in 2D)
    pub fn forward(&self, x: Tensor<5>) -> Vec<Tensor<5>> {
        let mut skips = Vec::with_capacity(self.stages.len());
        let mut x = x;
        for stage in &self.stages {
            for block in stage {
                x = block.forward(x);
            }
            skips.push(x.clone());
        }
        skips
    }
}
