//! Building blocks shared by the stem and the decoder, written once for 2D and 3D.
//!
//! Every tensor in the model is 5D `[batch, channels, depth, height, width]`; a 2D model sees
//! `depth = 1` and its layers are true 2D layers (`Conv2d`, `ConvTranspose2d`) applied to the
//! depth-folded tensor, so a 2D model costs what a 2D network costs.

use burn::nn::conv::{
    Conv2d, Conv2dConfig, Conv3d, Conv3dConfig, ConvTranspose2d, ConvTranspose2dConfig,
    ConvTranspose3d, ConvTranspose3dConfig,
};
use burn::nn::{GroupNorm, GroupNormConfig, PaddingConfig2d, PaddingConfig3d};
use burn::prelude::*;
use burn::tensor::ops::{ConvOptions, ConvTransposeOptions};

use super::kernels;

/// Negative slope of the activations, as nnU-Net's LeakyReLU (Isensee et al., 2021).
const LEAKY_SLOPE: f64 = 0.01;

pub use crate::config::NormKind;

impl NormKind {
    fn groups(self, channels: usize) -> usize {
        match self {
            NormKind::Instance => channels,
            NormKind::Group => (1..=8).rev().find(|g| channels % g == 0).unwrap_or(1),
        }
    }
}

/// Folds depth into the batch for a 2D layer: `[B, C, D, H, W]` → `[B·D, C, H, W]`.
fn fold(x: Tensor<5>) -> (Tensor<4>, usize, usize) {
    let [b, c, d, h, w] = x.dims();
    let x = if d == 1 {
        x.reshape([b, c, h, w])
    } else {
        x.swap_dims(1, 2).reshape([b * d, c, h, w])
    };
    (x, b, d)
}

/// Inverse of [`fold`].
fn unfold(x: Tensor<4>, b: usize, d: usize) -> Tensor<5> {
    let [_, c, h, w] = x.dims();
    if d == 1 {
        x.reshape([b, c, 1, h, w])
    } else {
        x.reshape([b, d, c, h, w]).swap_dims(1, 2)
    }
}

/// A [`ConvNd`]: a 2D or 3D convolution with a cubic (square) kernel.
#[derive(Config, Debug)]
pub struct ConvNdConfig {
    /// 2 or 3.
    pub spatial_dims: usize,
    /// `[in, out]`.
    pub channels: [usize; 2],
    /// Kernel edge in voxels, the same along every spatial axis.
    pub kernel: usize,
    /// Stride along every spatial axis (in 2D, not along depth).
    #[config(default = 1)]
    pub stride: usize,
    /// Off when a normalisation follows, which would cancel the bias (and leave it untrained).
    #[config(default = true)]
    pub bias: bool,
    /// `kernel / 2` zero padding (size-preserving for odd kernels); off for patch embeddings.
    #[config(default = true)]
    pub pad: bool,
}

/// A convolution over the spatial axes of a 5D tensor.
#[derive(Module, Debug)]
pub enum ConvNd {
    /// 2D convolution applied to each depth slice (depth folded into the batch).
    Two(Conv2d),
    /// 3D convolution.
    Three(Conv3d),
}

impl ConvNdConfig {
    /// Builds the convolution with freshly initialised weights on `device`.
    pub fn init(&self, device: &Device) -> ConvNd {
        let (k, s) = (self.kernel, self.stride);
        let p = if self.pad { k / 2 } else { 0 };
        if self.spatial_dims == 2 {
            ConvNd::Two(
                Conv2dConfig::new(self.channels, [k, k])
                    .with_stride([s, s])
                    .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
                    .with_bias(self.bias)
                    .init(device),
            )
        } else {
            ConvNd::Three(
                Conv3dConfig::new(self.channels, [k, k, k])
                    .with_stride([s, s, s])
                    .with_padding(PaddingConfig3d::Explicit(p, p, p))
                    .with_bias(self.bias)
                    .init(device),
            )
        }
    }
}

impl ConvNd {
    /// # Shapes
    /// - `x`: `[B, C_in, D, H, W]`
    /// - output: `[B, C_out, D', H', W']` (`D' = D` in 2D; others divided by the stride)
    pub fn forward(&self, x: Tensor<5>) -> Tensor<5> {
        match self {
            ConvNd::Two(conv) => {
                let (x, b, d) = fold(x);
                let y = match conv.padding {
                    PaddingConfig2d::Explicit(top, left, bottom, right) => kernels::conv2d(
                        x,
                        conv.weight.val(),
                        conv.bias.as_ref().map(|b| b.val()),
                        ConvOptions::new_with_padding(
                            conv.stride,
                            [(top, bottom), (left, right)],
                            conv.dilation,
                            conv.groups,
                        ),
                    ),
                    _ => conv.forward(x),
                };
                unfold(y, b, d)
            }
            ConvNd::Three(conv) => match conv.padding {
                PaddingConfig3d::Explicit(pd, ph, pw) => kernels::conv3d(
                    x,
                    conv.weight.val(),
                    conv.bias.as_ref().map(|b| b.val()),
                    ConvOptions::new(conv.stride, [pd, ph, pw], conv.dilation, conv.groups),
                ),
                _ => conv.forward(x),
            },
        }
    }
}

/// A burn `ConvTranspose2d` or `ConvTranspose3d` module's weight, bias and options, for
/// [`kernels::conv_transpose2d`] / [`kernels::conv_transpose3d`] (the two types share field names,
/// not a trait).
macro_rules! transpose_parts {
    ($up:expr) => {
        (
            $up.weight.val(),
            $up.bias.as_ref().map(|b| b.val()),
            ConvTransposeOptions::new(
                $up.stride,
                $up.padding,
                $up.padding_out,
                $up.dilation,
                $up.groups,
            ),
        )
    };
}

/// An [`UpsampleNd`]: a transposed convolution that multiplies the spatial size by `factor`.
#[derive(Config, Debug)]
pub struct UpsampleNdConfig {
    /// 2 or 3; in 2D depth is not upsampled.
    pub spatial_dims: usize,
    /// `[in, out]`.
    pub channels: [usize; 2],
    /// Upsampling factor: kernel = stride = factor (no overlap, no checkerboard).
    pub factor: usize,
}

/// Learned upsampling by a transposed convolution (burn has no 3D interpolate).
#[derive(Module, Debug)]
pub enum UpsampleNd {
    /// 2D transposed convolution applied to each depth slice.
    Two(ConvTranspose2d),
    /// 3D transposed convolution.
    Three(ConvTranspose3d),
}

impl UpsampleNdConfig {
    /// Builds the upsampling layer with freshly initialised weights on `device`.
    pub fn init(&self, device: &Device) -> UpsampleNd {
        let f = self.factor;
        if self.spatial_dims == 2 {
            UpsampleNd::Two(
                ConvTranspose2dConfig::new(self.channels, [f, f])
                    .with_stride([f, f])
                    .init(device),
            )
        } else {
            UpsampleNd::Three(
                ConvTranspose3dConfig::new(self.channels, [f, f, f])
                    .with_stride([f, f, f])
                    .init(device),
            )
        }
    }
}

impl UpsampleNd {
    /// # Shapes
    /// - `x`: `[B, C_in, D, H, W]`
    /// - output: `[B, C_out, D·f, H·f, W·f]` (`D` unchanged in 2D)
    pub fn forward(&self, x: Tensor<5>) -> Tensor<5> {
        match self {
            UpsampleNd::Two(up) => {
                let (x, b, d) = fold(x);
                let (weight, bias, options) = transpose_parts!(up);
                unfold(kernels::conv_transpose2d(x, weight, bias, options), b, d)
            }
            UpsampleNd::Three(up) => {
                let (weight, bias, options) = transpose_parts!(up);
                kernels::conv_transpose3d(x, weight, bias, options)
            }
        }
    }
}

/// A [`ConvNormAct`]: bias-free convolution, normalisation, LeakyReLU.
#[derive(Config, Debug)]
pub struct ConvNormActConfig {
    /// 2 or 3.
    pub spatial_dims: usize,
    /// `[in, out]`.
    pub channels: [usize; 2],
    /// Kernel edge in voxels (padded by `kernel / 2`).
    #[config(default = 3)]
    pub kernel: usize,
    /// Stride along every spatial axis (in 2D, not along depth).
    #[config(default = 1)]
    pub stride: usize,
    /// Instance or group normalisation.
    #[config(default = "NormKind::Instance")]
    pub norm: NormKind,
}

/// Convolution → normalisation → LeakyReLU.
#[derive(Module, Debug)]
pub struct ConvNormAct {
    conv: ConvNd,
    norm: GroupNorm,
}

impl ConvNormActConfig {
    /// Builds the layer with freshly initialised weights on `device`.
    pub fn init(&self, device: &Device) -> ConvNormAct {
        let out = self.channels[1];
        ConvNormAct {
            conv: ConvNdConfig::new(self.spatial_dims, self.channels, self.kernel)
                .with_stride(self.stride)
                .with_bias(false)
                .init(device),
            norm: GroupNormConfig::new(self.norm.groups(out), out).init(device),
        }
    }
}

impl ConvNormAct {
    /// # Shapes
    /// - `x`: `[B, C_in, D, H, W]` → `[B, C_out, D', H', W']`
    pub fn forward(&self, x: Tensor<5>) -> Tensor<5> {
        kernels::group_norm(&self.norm, self.conv.forward(x), Some(LEAKY_SLOPE))
    }

    /// Without the activation (the second half of a residual block).
    fn forward_linear(&self, x: Tensor<5>) -> Tensor<5> {
        kernels::group_norm(&self.norm, self.conv.forward(x), None)
    }
}

/// A [`ResidualBlock`].
#[derive(Config, Debug)]
pub struct ResidualBlockConfig {
    /// 2 or 3.
    pub spatial_dims: usize,
    /// `[in, out]`; a 1×1 projection shortcut is added when they differ.
    pub channels: [usize; 2],
    /// Stride of the first convolution (and the shortcut): 2 halves the spatial size.
    #[config(default = 1)]
    pub stride: usize,
    /// Instance or group normalisation.
    #[config(default = "NormKind::Instance")]
    pub norm: NormKind,
}

/// Two 3×3 convolutions with an identity (or 1×1 projected) shortcut, as in ResNet and the
/// residual encoders of nnU-Net ResEnc.
#[derive(Module, Debug)]
pub struct ResidualBlock {
    first: ConvNormAct,
    second: ConvNormAct,
    shortcut: Option<ConvNormAct>,
}

impl ResidualBlockConfig {
    /// Builds the block with freshly initialised weights on `device`.
    pub fn init(&self, device: &Device) -> ResidualBlock {
        let [cin, cout] = self.channels;
        let cna = |channels, kernel, stride| {
            ConvNormActConfig::new(self.spatial_dims, channels)
                .with_kernel(kernel)
                .with_stride(stride)
                .with_norm(self.norm)
                .init(device)
        };
        ResidualBlock {
            first: cna([cin, cout], 3, self.stride),
            second: cna([cout, cout], 3, 1),
            shortcut: (cin != cout || self.stride != 1).then(|| cna([cin, cout], 1, self.stride)),
        }
    }
}

impl ResidualBlock {
    /// # Shapes
    /// - `x`: `[B, C_in, D, H, W]` → `[B, C_out, D/s, H/s, W/s]` (depth kept in 2D)
    pub fn forward(&self, x: Tensor<5>) -> Tensor<5> {
        let skip = match &self.shortcut {
            Some(proj) => proj.forward_linear(x.clone()),
            None => x.clone(),
        };
        let y = self.second.forward_linear(self.first.forward(x));
        kernels::leaky_relu(y + skip, LEAKY_SLOPE)
    }
}
