//! medseg's own CPU kernels for the model step, wired into burn as backend-extension ops with
//! their own backward ([`ext`]); burn's ops stay the reference path behind [`KernelPath`].
//!
//! The path is process-wide: [`select`] sets it (building a model from its config does), and the
//! kernels run only on the CPU (`Flex`) device; on a GPU device burn's ops run whatever is selected.

pub mod conv;
mod ext;
pub mod gelu;
pub mod norm;
pub mod softmax;
pub mod upsample;

use std::sync::atomic::{AtomicBool, Ordering};

use burn::backend::Dispatch;
use burn::nn::GroupNorm;
use burn::prelude::*;
use burn::tensor::ops::{ConvOptions, ConvTransposeOptions};
use burn::tensor::DType;

pub use crate::config::KernelPath;
use ext::Kernels;

/// Runs `kernel` compiled for the best instruction set this CPU has (AVX2 + FMA where present):
/// the crate itself targets baseline x86-64, for whose SSE2 these loops are not vectorised. Each
/// kernel is a struct whose `with_simd` is inlined whole into pulp's `#[target_feature]` function
/// (a closure would be called, not inlined, and compiled for the baseline).
#[inline(always)]
fn simd<K: pulp::WithSimd>(kernel: K) -> K::Output {
    pulp::Arch::new().dispatch(kernel)
}

static MEDSEG_KERNELS: AtomicBool = AtomicBool::new(true);

/// Chooses the kernels every later convolution in this process runs on.
pub fn select(path: KernelPath) {
    MEDSEG_KERNELS.store(path == KernelPath::Medseg, Ordering::Relaxed);
}

/// The kernels convolutions run on now.
pub fn selected() -> KernelPath {
    if MEDSEG_KERNELS.load(Ordering::Relaxed) {
        KernelPath::Medseg
    } else {
        KernelPath::Burn
    }
}

fn use_medseg(path: KernelPath, device: &Device) -> bool {
    path == KernelPath::Medseg && device.clone().inner() == Device::flex()
}

/// A 3D convolution on the [`selected`] path.
///
/// # Shapes
/// - `x`: `[N, Ci, D, H, W]`, `weight`: `[Co, Ci, kd, kh, kw]`, `bias`: `[Co]`
/// - output: `[N, Co, D', H', W']`
pub fn conv3d(
    x: Tensor<5>,
    weight: Tensor<5>,
    bias: Option<Tensor<1>>,
    options: ConvOptions<3>,
) -> Tensor<5> {
    conv3d_with(selected(), x, weight, bias, options)
}

/// A 2D convolution on the [`selected`] path.
///
/// # Shapes
/// - `x`: `[N, Ci, H, W]`, `weight`: `[Co, Ci, kh, kw]`, `bias`: `[Co]`
/// - output: `[N, Co, H', W']`
pub fn conv2d(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    options: ConvOptions<2>,
) -> Tensor<4> {
    conv2d_with(selected(), x, weight, bias, options)
}

/// A 3D convolution on `path` (medseg's kernels only on the CPU device).
///
/// # Shapes
/// - `x`: `[N, Ci, D, H, W]`, `weight`: `[Co, Ci, kd, kh, kw]`, `bias`: `[Co]`
/// - output: `[N, Co, D', H', W']`
pub fn conv3d_with(
    path: KernelPath,
    x: Tensor<5>,
    weight: Tensor<5>,
    bias: Option<Tensor<1>>,
    options: ConvOptions<3>,
) -> Tensor<5> {
    if !use_medseg(path, &x.device()) {
        return burn::tensor::module::conv3d(x, weight, bias, options);
    }
    let out = Tensor::<5>::from_dispatch(<Dispatch as Kernels>::medseg_conv3d(
        x.into_dispatch(),
        weight.into_dispatch(),
        options,
    ));
    with_bias(out, bias)
}

/// A 2D convolution on `path`: medseg's is the 3D op with depth 1.
///
/// # Shapes
/// - `x`: `[N, Ci, H, W]`, `weight`: `[Co, Ci, kh, kw]`, `bias`: `[Co]`
/// - output: `[N, Co, H', W']`
pub fn conv2d_with(
    path: KernelPath,
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    options: ConvOptions<2>,
) -> Tensor<4> {
    if !use_medseg(path, &x.device()) {
        return burn::tensor::module::conv2d(x, weight, bias, options);
    }
    let [n, ci, h, w] = x.dims();
    let [co, wi, kh, kw] = weight.dims();
    let [(ph0, ph1), (pw0, pw1)] = options.padding;
    let options3 = ConvOptions::new_with_padding(
        [1, options.stride[0], options.stride[1]],
        [(0, 0), (ph0, ph1), (pw0, pw1)],
        [1, options.dilation[0], options.dilation[1]],
        options.groups,
    );
    let y = conv3d_with(
        path,
        x.reshape([n, ci, 1, h, w]),
        weight.reshape([co, wi, 1, kh, kw]),
        bias,
        options3,
    );
    let [_, _, _, oh, ow] = y.dims();
    y.reshape([n, co, oh, ow])
}

/// A transposed convolution on the [`selected`] path ([`conv_transpose3d_with`]).
///
/// # Shapes
/// - `x`: `[N, Ci, D, H, W]`, `weight`: `[Ci, Co, kd, kh, kw]`, `bias`: `[Co]`
/// - output: `[N, Co, D', H', W']`
pub fn conv_transpose3d(
    x: Tensor<5>,
    weight: Tensor<5>,
    bias: Option<Tensor<1>>,
    options: ConvTransposeOptions<3>,
) -> Tensor<5> {
    conv_transpose3d_with(selected(), x, weight, bias, options)
}

/// A 2D transposed convolution on the [`selected`] path ([`conv_transpose2d_with`]).
///
/// # Shapes
/// - `x`: `[N, Ci, H, W]`, `weight`: `[Ci, Co, kh, kw]`, `bias`: `[Co]`
/// - output: `[N, Co, H', W']`
pub fn conv_transpose2d(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    options: ConvTransposeOptions<2>,
) -> Tensor<4> {
    conv_transpose2d_with(selected(), x, weight, bias, options)
}

/// A transposed convolution whose kernel equals its stride (the decoder's learned upsampling) on
/// `path`: medseg's kernel on the CPU device for `f32` tensors when `options` are stride =
/// kernel, no padding, dilation 1 and one group; burn's `conv_transpose3d` otherwise.
///
/// # Shapes
/// - `x`: `[N, Ci, D, H, W]`, `weight`: `[Ci, Co, fd, fh, fw]`, `bias`: `[Co]`
/// - output: `[N, Co, D·fd, H·fh, W·fw]` (the general transposed convolution's size otherwise)
pub fn conv_transpose3d_with(
    path: KernelPath,
    x: Tensor<5>,
    weight: Tensor<5>,
    bias: Option<Tensor<1>>,
    options: ConvTransposeOptions<3>,
) -> Tensor<5> {
    let [_, _, kd, kh, kw] = weight.dims();
    if !upsample_fits(path, &x, &weight, [kd, kh, kw], &options) {
        return burn::tensor::module::conv_transpose3d(x, weight, bias, options);
    }
    upsample3d(x, weight, bias)
}

/// medseg's upsampling kernel, then the bias; the caller checked [`upsample_fits`].
///
/// # Shapes
/// - `x`: `[N, Ci, D, H, W]`, `weight`: `[Ci, Co, fd, fh, fw]`, `bias`: `[Co]`
/// - output: `[N, Co, D·fd, H·fh, W·fw]`
fn upsample3d(x: Tensor<5>, weight: Tensor<5>, bias: Option<Tensor<1>>) -> Tensor<5> {
    let out = Tensor::<5>::from_dispatch(<Dispatch as Kernels>::medseg_upsample3d(
        x.into_dispatch(),
        weight.into_dispatch(),
    ));
    with_bias(out, bias)
}

/// `out` plus the per-channel `bias`, when there is one.
///
/// # Shapes
/// - `out`: `[N, C, D, H, W]`, `bias`: `[C]`; output: as `out`
fn with_bias(out: Tensor<5>, bias: Option<Tensor<1>>) -> Tensor<5> {
    match bias {
        Some(bias) => {
            let co = bias.dims()[0];
            out + bias.reshape([1, co, 1, 1, 1])
        }
        None => out,
    }
}

/// Whether medseg's upsampling kernel runs this transposed convolution: on the CPU device,
/// `f32`, stride = `kernel`, no padding, dilation 1, one group.
fn upsample_fits<const D: usize, const N: usize>(
    path: KernelPath,
    x: &Tensor<D>,
    weight: &Tensor<D>,
    kernel: [usize; N],
    options: &ConvTransposeOptions<N>,
) -> bool {
    options.stride == kernel
        && options.padding == [0; N]
        && options.padding_out == [0; N]
        && options.dilation == [1; N]
        && options.groups == 1
        && use_medseg(path, &x.device())
        && x.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && x.dims()[1] == weight.dims()[0]
}

/// [`conv_transpose3d_with`] in 2D: medseg's kernel at depth 1, burn's `conv_transpose2d`
/// otherwise.
///
/// # Shapes
/// - `x`: `[N, Ci, H, W]`, `weight`: `[Ci, Co, fh, fw]`, `bias`: `[Co]`
/// - output: `[N, Co, H·fh, W·fw]` (the general transposed convolution's size otherwise)
pub fn conv_transpose2d_with(
    path: KernelPath,
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    options: ConvTransposeOptions<2>,
) -> Tensor<4> {
    let [n, ci, h, w] = x.dims();
    let [wi, co, kh, kw] = weight.dims();
    if !upsample_fits(path, &x, &weight, [kh, kw], &options) {
        return burn::tensor::module::conv_transpose2d(x, weight, bias, options);
    }
    let y = upsample3d(
        x.reshape([n, ci, 1, h, w]),
        weight.reshape([wi, co, 1, kh, kw]),
        bias,
    );
    let [_, c, _, oh, ow] = y.dims();
    y.reshape([n, c, oh, ow])
}

/// LeakyReLU with negative `slope` on the [`selected`] path.
///
/// # Shapes
/// - `x`: any; output: the same
pub fn leaky_relu<const D: usize>(x: Tensor<D>, slope: f64) -> Tensor<D> {
    leaky_relu_with(selected(), x, slope)
}

/// LeakyReLU on `path` (medseg's kernel only on the CPU device).
///
/// # Shapes
/// - `x`: any; output: the same
pub fn leaky_relu_with<const D: usize>(path: KernelPath, x: Tensor<D>, slope: f64) -> Tensor<D> {
    if !use_medseg(path, &x.device()) {
        return burn::tensor::activation::leaky_relu(x, slope);
    }
    Tensor::from_dispatch(<Dispatch as Kernels>::medseg_leaky_relu(
        x.into_dispatch(),
        slope,
    ))
}

/// `softmax(x / temperature)` over the last axis on the [`selected`] path: medseg's one-pass
/// kernel on the CPU device for `f32` tensors, burn's `softmax` of `x.div_scalar(temperature)`
/// (as burn's attention computes it) otherwise.
///
/// # Shapes
/// - `x`: any; output: the same
pub fn softmax<const D: usize>(x: Tensor<D>, temperature: f64) -> Tensor<D> {
    softmax_with(selected(), x, temperature)
}

/// [`softmax`] on `path`.
///
/// # Shapes
/// - `x`: any; output: the same
pub fn softmax_with<const D: usize>(path: KernelPath, x: Tensor<D>, temperature: f64) -> Tensor<D> {
    let fits = use_medseg(path, &x.device())
        && x.dtype() == DType::F32
        && temperature.is_finite()
        && temperature > 0.0;
    if !fits {
        return burn::tensor::activation::softmax(x.div_scalar(temperature), D - 1);
    }
    Tensor::from_dispatch(<Dispatch as Kernels>::medseg_softmax(
        x.into_dispatch(),
        1.0 / temperature,
    ))
}

/// GELU (`x·Φ(x)`, the exact normal CDF) on the [`selected`] path: medseg's one-pass kernel on
/// the CPU device for `f32` tensors, burn's `gelu` otherwise.
///
/// # Shapes
/// - `x`: any; output: the same
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    gelu_with(selected(), x)
}

/// [`gelu`] on `path`.
///
/// # Shapes
/// - `x`: any; output: the same
pub fn gelu_with<const D: usize>(path: KernelPath, x: Tensor<D>) -> Tensor<D> {
    if !(use_medseg(path, &x.device()) && x.dtype() == DType::F32) {
        return burn::tensor::activation::gelu(x);
    }
    Tensor::from_dispatch(<Dispatch as Kernels>::medseg_gelu(x.into_dispatch()))
}

/// Group (or instance) normalisation by `norm`, then LeakyReLU with `slope` when given, on the
/// [`selected`] path.
///
/// # Shapes
/// - `x`: `[N, C, …]` with `C = norm.num_channels`; output: the same
pub fn group_norm<const D: usize>(norm: &GroupNorm, x: Tensor<D>, slope: Option<f64>) -> Tensor<D> {
    group_norm_with(selected(), norm, x, slope)
}

/// [`group_norm`] on `path`: medseg's fused kernel on the CPU device for `f32` tensors with an
/// affine map, burn's `GroupNorm` and [`leaky_relu_with`] otherwise.
///
/// # Shapes
/// - `x`: `[N, C, …]` with `C = norm.num_channels`; output: the same
pub fn group_norm_with<const D: usize>(
    path: KernelPath,
    norm: &GroupNorm,
    x: Tensor<D>,
    slope: Option<f64>,
) -> Tensor<D> {
    let fits = D >= 3
        && use_medseg(path, &x.device())
        && x.dtype() == DType::F32
        && x.dims()[1] == norm.num_channels
        && norm.num_groups > 0
        && norm.num_channels % norm.num_groups == 0;
    let affine = norm.gamma.as_ref().zip(norm.beta.as_ref());
    match affine.map(|(g, b)| (g.val(), b.val())) {
        Some((gamma, beta))
            if fits && gamma.dtype() == DType::F32 && beta.dtype() == DType::F32 =>
        {
            let (y, _stats) = <Dispatch as Kernels>::medseg_group_norm(
                x.into_dispatch(),
                gamma.into_dispatch(),
                beta.into_dispatch(),
                norm.num_groups,
                norm.epsilon,
                slope,
            );
            Tensor::from_dispatch(y)
        }
        _ => {
            let y = norm.forward(x);
            match slope {
                Some(slope) => leaky_relu_with(path, y, slope),
                None => y,
            }
        }
    }
}
