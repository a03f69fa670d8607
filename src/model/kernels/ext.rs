//! medseg's kernels as burn backend-extension ops: the trait, its CPU (`Flex`) implementation and
//! the autodiff implementation that owns the backward pass.
//!
//! Replaced on the CPU: the forward convolution, its weight gradient, its stride-1 input gradient
//! (as a forward convolution), LeakyReLU, group norm (with the LeakyReLU fused), the
//! decoder's kernel = stride transposed convolution, the attention's scaled softmax and the
//! MLP's GELU. Backends other
//! than `Flex` never reach this trait (the callers in [`super`] check the device), so a GPU build
//! keeps burn's path.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::backend::flex::FlexTensor;
use burn::backend::ops::{ActivationOps, FloatTensorOps, ModuleOps};
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Backend, Flex, TensorMetadata};
use burn::tensor::ops::{ConvOptions, ConvTransposeOptions};
use burn::tensor::{DType, TensorData};

use rayon::prelude::*;

use super::conv::{self, ConvShape};
use super::gelu;
use super::norm::{self, NormShape};
use super::softmax;
use super::upsample::{self, UpsampleShape};

/// Model ops with medseg's CPU kernels: the convolution ([`conv::forward`]), its weight gradient
/// ([`conv::weight_grad`]), a one-pass LeakyReLU and group norm ([`norm`]). The group norm has no
/// default body: only `Flex` and `Autodiff` implement it, and its callers check the device.
#[backend_extension(Flex, Autodiff)]
pub trait Kernels: Backend {
    /// A bias-free 3D convolution (2D is depth 1); burn's reference unless overridden.
    ///
    /// # Shapes
    /// - `x`: `[N, Ci, D, H, W]`, `weight`: `[Co, Ci, kd, kh, kw]`
    /// - output: `[N, Co, D', H', W']`
    fn medseg_conv3d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        options: ConvOptions<3>,
    ) -> FloatTensor<Self> {
        Self::conv3d(x, weight, None, options)
    }

    /// The weight gradient of [`Kernels::medseg_conv3d`]; burn's reference unless overridden.
    ///
    /// # Shapes
    /// - `x`: `[N, Ci, D, H, W]`, `weight`: `[Co, Ci, kd, kh, kw]`, `grad`: `[N, Co, D', H', W']`
    /// - output: the shape of `weight`
    fn medseg_conv3d_weight_grad(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        options: ConvOptions<3>,
    ) -> FloatTensor<Self> {
        Self::conv3d_weight_backward(x, weight, grad, options)
    }

    /// The input gradient of [`Kernels::medseg_conv3d`]; burn's reference (a transposed
    /// convolution) unless overridden.
    ///
    /// # Shapes
    /// - `x`: `[N, Ci, D, H, W]`, `weight`: `[Co, Ci, kd, kh, kw]`, `grad`: `[N, Co, D', H', W']`
    /// - output: the shape of `x`
    fn medseg_conv3d_x_grad(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        options: ConvOptions<3>,
    ) -> FloatTensor<Self> {
        Self::conv3d_x_backward(x, weight, grad, options)
    }

    /// LeakyReLU in one pass (burn's is a compare, a scale and a masked select).
    ///
    /// # Shapes
    /// - `x`: any; output: the same
    fn medseg_leaky_relu(x: FloatTensor<Self>, slope: f64) -> FloatTensor<Self> {
        Self::leaky_relu(x, slope.into())
    }

    /// The input gradient of [`Kernels::medseg_leaky_relu`]: `slope · grad` where `x < 0`, else
    /// `grad`.
    ///
    /// # Shapes
    /// - `x`, `grad`: the same shape; output: that shape
    fn medseg_leaky_relu_backward(
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        slope: f64,
    ) -> FloatTensor<Self> {
        leaky_relu_backward_reference::<Self>(x, grad, slope)
    }

    /// Group normalisation with affine `gamma`, `beta` and, with a `slope`, LeakyReLU after it;
    /// also returns the per-`(sample, group)` statistics `[mean, 1 / sqrt(var + eps)]`.
    /// Callers pass `f32` tensors whose channels `groups` divides and match `gamma`'s length.
    ///
    /// # Shapes
    /// - `x`: `[N, C, …]`, `gamma`, `beta`: `[C]`
    /// - output: `([N, C, …], [N·G, 2])`
    fn medseg_group_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        groups: usize,
        epsilon: f64,
        slope: Option<f64>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// The gradients `(dx, dgamma, dbeta)` of [`Kernels::medseg_group_norm`] from its input, its
    /// statistics and the output gradient (`groups` as in the forward pass).
    ///
    /// # Shapes
    /// - `x`, `grad`: `[N, C, …]`, `stats`: `[N·G, 2]`, `gamma`, `beta`: `[C]`
    /// - output: the shapes of `x`, `gamma` and `beta`
    fn medseg_group_norm_backward(
        x: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        groups: usize,
        slope: Option<f64>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// A transposed convolution whose kernel equals its stride (no padding, one group), bias
    /// free: the decoder's learned upsampling. The factor is the kernel's size.
    ///
    /// # Shapes
    /// - `x`: `[N, Ci, D, H, W]`, `weight`: `[Ci, Co, fd, fh, fw]`
    /// - output: `[N, Co, D·fd, H·fh, W·fw]`
    fn medseg_upsample3d(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self>;

    /// The gradients `(dx, dweight)` of [`Kernels::medseg_upsample3d`].
    ///
    /// # Shapes
    /// - `x`: `[N, Ci, D, H, W]`, `weight`: `[Ci, Co, fd, fh, fw]`, `grad`: the output's
    /// - output: the shapes of `x` and `weight`
    fn medseg_upsample3d_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// `softmax(scale · x)` over the last axis (`scale > 0`, finite): the attention's weights.
    ///
    /// # Shapes
    /// - `x`: any, the softmax along its last axis; output: the same
    fn medseg_softmax(x: FloatTensor<Self>, scale: f64) -> FloatTensor<Self>;

    /// The input gradient of [`Kernels::medseg_softmax`] from its output `y` and the output
    /// gradient.
    ///
    /// # Shapes
    /// - `y`, `grad`: the same shape; output: that shape
    fn medseg_softmax_backward(
        y: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self>;

    /// GELU with the exact normal CDF, `x·Φ(x)` (burn's `gelu`).
    ///
    /// # Shapes
    /// - `x`: any; output: the same
    fn medseg_gelu(x: FloatTensor<Self>) -> FloatTensor<Self>;

    /// The input gradient of [`Kernels::medseg_gelu`]: `grad · (Φ(x) + x·φ(x))`.
    ///
    /// # Shapes
    /// - `x`, `grad`: the same shape; output: that shape
    fn medseg_gelu_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// burn's ops composed, with burn's convention at 0 (`grad` passes):
/// `grad - (1 - slope) · relu_backward(-x, grad)`.
fn leaky_relu_backward_reference<B: Backend>(
    x: FloatTensor<B>,
    grad: FloatTensor<B>,
    slope: f64,
) -> FloatTensor<B> {
    let negative = B::relu_backward(B::float_neg(x), grad.clone());
    B::float_sub(grad, B::float_mul_scalar(negative, (1.0 - slope).into()))
}

impl Kernels for Flex {
    fn medseg_conv3d(x: FlexTensor, weight: FlexTensor, options: ConvOptions<3>) -> FlexTensor {
        let Some(shape) = forward_shape(&x, &weight, &options) else {
            return Self::conv3d(x, weight, None, options);
        };
        let (x, weight) = (x.to_contiguous(), weight.to_contiguous());
        let (Some(xs), Some(ws)) = (x.as_slice::<f32>(), weight.as_slice::<f32>()) else {
            return Self::conv3d(x, weight, None, options);
        };
        let y = conv::forward(&shape, xs, ws);
        let [od, oh, ow] = shape.output;
        FlexTensor::from_data(TensorData::new(
            y,
            [shape.batch, shape.out_channels, od, oh, ow],
        ))
    }

    fn medseg_conv3d_weight_grad(
        x: FlexTensor,
        weight: FlexTensor,
        grad: FlexTensor,
        options: ConvOptions<3>,
    ) -> FlexTensor {
        let output = <[usize; 5]>::try_from(grad.shape().as_slice()).map(|g| [g[2], g[3], g[4]]);
        let Some(shape) = output
            .ok()
            .and_then(|output| conv_shape(&x, &weight, output, &options))
        else {
            return Self::conv3d_weight_backward(x, weight, grad, options);
        };
        let (x, grad) = (x.to_contiguous(), grad.to_contiguous());
        let (Some(xs), Some(gs)) = (x.as_slice::<f32>(), grad.as_slice::<f32>()) else {
            return Self::conv3d_weight_backward(x, weight, grad, options);
        };
        let dw = conv::weight_grad(&shape, xs, gs);
        FlexTensor::from_data(TensorData::new(dw, weight.shape()))
    }

    /// At stride 1 the input gradient is a forward convolution of `grad` with the kernel flipped
    /// and its channels swapped, padded by `k - 1 - p`: a forward convolution (im2col + gemm) is
    /// several times faster than burn's transposed one on these shapes.
    fn medseg_conv3d_x_grad(
        x: FlexTensor,
        weight: FlexTensor,
        grad: FlexTensor,
        options: ConvOptions<3>,
    ) -> FlexTensor {
        let kernel = <[usize; 5]>::try_from(weight.shape().as_slice()).map(|s| [s[2], s[3], s[4]]);
        let plain = options.stride == [1; 3] && options.dilation == [1; 3] && options.groups == 1;
        let pads = kernel.ok().filter(|_| plain).and_then(|k| {
            let flipped = |a: usize| {
                let (begin, end) = options.padding[a];
                (begin == end && begin < k[a]).then(|| k[a] - 1 - begin)
            };
            Some([flipped(0)?, flipped(1)?, flipped(2)?])
        });
        let Some(pads) = pads else {
            return Self::conv3d_x_backward(x, weight, grad, options);
        };
        let flipped = Self::float_swap_dims(Self::float_flip(weight, &[2, 3, 4]), 0, 1);
        let dx = Self::medseg_conv3d(grad, flipped, ConvOptions::new([1; 3], pads, [1; 3], 1));
        debug_assert_eq!(dx.shape(), x.shape());
        dx
    }

    fn medseg_leaky_relu(x: FlexTensor, slope: f64) -> FlexTensor {
        let s = slope as f32;
        let leaky = move |v: f32| if v < 0.0 { v * s } else { v };
        let mut x = x;
        if let Some(xs) = plain_mut(&mut x) {
            xs.par_chunks_mut(CHUNK)
                .for_each(|c| c.iter_mut().for_each(|v| *v = leaky(*v)));
            return x;
        }
        // Shared (kept for the backward pass while training): write a new buffer.
        let x = x.to_contiguous();
        let Some(xs) = x.as_slice::<f32>() else {
            return Self::leaky_relu(x, slope.into());
        };
        let mut y = vec![0f32; xs.len()];
        y.par_chunks_mut(CHUNK)
            .zip(xs.par_chunks(CHUNK))
            .for_each(|(y, x)| y.iter_mut().zip(x).for_each(|(y, &x)| *y = leaky(x)));
        FlexTensor::from_data(TensorData::new(y, x.shape()))
    }

    fn medseg_leaky_relu_backward(x: FlexTensor, grad: FlexTensor, slope: f64) -> FlexTensor {
        let s = slope as f32;
        let x = x.to_contiguous();
        let Some(xs) = x.as_slice::<f32>() else {
            return leaky_relu_backward_reference::<Self>(x, grad, slope);
        };
        let scale = move |x: f32, g: f32| if x < 0.0 { g * s } else { g };
        let mut grad = grad;
        if let Some(gs) = plain_mut(&mut grad).filter(|gs| gs.len() == xs.len()) {
            gs.par_chunks_mut(CHUNK)
                .zip(xs.par_chunks(CHUNK))
                .for_each(|(g, x)| g.iter_mut().zip(x).for_each(|(g, &x)| *g = scale(x, *g)));
            return grad;
        }
        let grad = grad.to_contiguous();
        let Some(gs) = grad.as_slice::<f32>().filter(|gs| gs.len() == xs.len()) else {
            return leaky_relu_backward_reference::<Self>(x, grad, slope);
        };
        let mut dx = vec![0f32; xs.len()];
        dx.par_chunks_mut(CHUNK)
            .zip(xs.par_chunks(CHUNK).zip(gs.par_chunks(CHUNK)))
            .for_each(|(d, (x, g))| {
                for ((d, &x), &g) in d.iter_mut().zip(x).zip(g) {
                    *d = scale(x, g);
                }
            });
        FlexTensor::from_data(TensorData::new(dx, x.shape()))
    }

    fn medseg_group_norm(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        groups: usize,
        epsilon: f64,
        slope: Option<f64>,
    ) -> (FlexTensor, FlexTensor) {
        let shape = norm_shape(&x, groups);
        let slope = slope.map(|s| s as f32);
        let (gamma, beta) = (gamma.to_contiguous(), beta.to_contiguous());
        let (gs, bs) = (f32s(&gamma), f32s(&beta));
        let mut x = x;
        // Owned (inference): normalise in place.
        if let Some(xs) = plain_mut(&mut x) {
            let stats = norm::statistics(&shape, xs, epsilon);
            norm::apply_in_place(&shape, &stats, gs, bs, slope, xs);
            return (x, stats_tensor(stats));
        }
        let x = x.to_contiguous();
        let xs = f32s(&x);
        let stats = norm::statistics(&shape, xs, epsilon);
        let mut y = vec![0f32; xs.len()];
        norm::apply(&shape, &stats, gs, bs, slope, xs, &mut y);
        (
            FlexTensor::from_data(TensorData::new(y, x.shape())),
            stats_tensor(stats),
        )
    }

    fn medseg_group_norm_backward(
        x: FlexTensor,
        stats: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        grad: FlexTensor,
        groups: usize,
        slope: Option<f64>,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let shape = norm_shape(&x, groups);
        let [x, stats, gamma, beta, grad] =
            [x, stats, gamma, beta, grad].map(|t| t.to_contiguous());
        let pairs: Vec<[f32; 2]> = f32s(&stats).chunks_exact(2).map(|p| [p[0], p[1]]).collect();
        let (dx, dgamma, dbeta) = norm::backward(
            &shape,
            &pairs,
            f32s(&gamma),
            f32s(&beta),
            slope.map(|s| s as f32),
            f32s(&x),
            f32s(&grad),
        );
        (
            FlexTensor::from_data(TensorData::new(dx, x.shape())),
            FlexTensor::from_data(TensorData::new(dgamma, gamma.shape())),
            FlexTensor::from_data(TensorData::new(dbeta, beta.shape())),
        )
    }

    fn medseg_upsample3d(x: FlexTensor, weight: FlexTensor) -> FlexTensor {
        let Some(shape) = upsample_shape(&x, &weight) else {
            let options = upsample_options(&weight);
            return Self::conv_transpose3d(x, weight, None, options);
        };
        let (x, weight) = (x.to_contiguous(), weight.to_contiguous());
        let y = upsample::forward(&shape, f32s(&x), f32s(&weight));
        let [od, oh, ow] = shape.output();
        FlexTensor::from_data(TensorData::new(
            y,
            [shape.batch, shape.out_channels, od, oh, ow],
        ))
    }

    fn medseg_upsample3d_backward(
        x: FlexTensor,
        weight: FlexTensor,
        grad: FlexTensor,
    ) -> (FlexTensor, FlexTensor) {
        let fits = upsample_shape(&x, &weight)
            .filter(|s| grad.dtype() == DType::F32 && dims5(&grad) == Some(output_dims(s)));
        let Some(shape) = fits else {
            let options = upsample_options(&weight);
            let dx =
                Self::conv_transpose3d_x_backward(weight.clone(), grad.clone(), options.clone());
            let dw = Self::conv_transpose3d_weight_backward(x, weight, grad, options);
            return (dx, dw);
        };
        let [x, weight, grad] = [x, weight, grad].map(|t| t.to_contiguous());
        let (dx, dw) = upsample::backward(&shape, f32s(&x), f32s(&weight), f32s(&grad));
        (
            FlexTensor::from_data(TensorData::new(dx, x.shape())),
            FlexTensor::from_data(TensorData::new(dw, weight.shape())),
        )
    }

    fn medseg_softmax(x: FlexTensor, scale: f64) -> FlexTensor {
        let len = x.shape().last().copied().unwrap_or(1);
        let mut x = x;
        // Owned (the scores of a product): softmax in place.
        if let Some(xs) = plain_mut(&mut x) {
            softmax::forward_in_place(len, scale as f32, xs);
            return x;
        }
        let x = x.to_contiguous();
        let mut y = vec![0f32; x.shape().num_elements()];
        softmax::forward(len, scale as f32, f32s(&x), &mut y);
        FlexTensor::from_data(TensorData::new(y, x.shape()))
    }

    fn medseg_softmax_backward(y: FlexTensor, grad: FlexTensor, scale: f64) -> FlexTensor {
        let len = y.shape().last().copied().unwrap_or(1);
        let [y, grad] = [y, grad].map(|t| t.to_contiguous());
        let dx = softmax::backward(len, scale as f32, f32s(&y), f32s(&grad));
        FlexTensor::from_data(TensorData::new(dx, y.shape()))
    }

    fn medseg_gelu(x: FlexTensor) -> FlexTensor {
        let mut x = x;
        if let Some(xs) = plain_mut(&mut x) {
            gelu::forward_in_place(xs);
            return x;
        }
        // Shared (kept for the backward pass while training): write a new buffer.
        let x = x.to_contiguous();
        FlexTensor::from_data(TensorData::new(gelu::forward(f32s(&x)), x.shape()))
    }

    fn medseg_gelu_backward(x: FlexTensor, grad: FlexTensor) -> FlexTensor {
        let x = x.to_contiguous();
        let mut grad = grad;
        if let Some(gs) = plain_mut(&mut grad).filter(|gs| gs.len() == f32s(&x).len()) {
            gelu::backward_in_place(f32s(&x), gs);
            return grad;
        }
        let grad = grad.to_contiguous();
        let mut dx = f32s(&grad).to_vec();
        gelu::backward_in_place(f32s(&x), &mut dx);
        FlexTensor::from_data(TensorData::new(dx, x.shape()))
    }
}

/// The sizes of a group norm's input; the caller ([`super::group_norm`]) has checked them.
fn norm_shape(x: &FlexTensor, groups: usize) -> NormShape {
    let dims = x.shape();
    NormShape {
        batch: dims[0],
        channels: dims[1],
        groups,
        spatial: dims[2..].iter().product(),
    }
}

/// A contiguous `f32` tensor's values; the callers checked the dtype.
fn f32s(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>()
        .expect("kernel tensors are contiguous f32 (dtype checked by the callers)")
}

fn stats_tensor(stats: Vec<[f32; 2]>) -> FlexTensor {
    let n = stats.len();
    FlexTensor::from_data(TensorData::new(stats.concat(), [n, 2]))
}

/// `t`'s `f32` elements for writing in place, when it owns its buffer and is laid out plainly
/// (a fresh buffer per elementwise op costs page faults: a tenth of a step).
fn plain_mut(t: &mut FlexTensor) -> Option<&mut [f32]> {
    let n = t.shape().num_elements();
    let plain = t.dtype() == DType::F32 && t.layout().contiguous_offsets() == Some((0, n));
    if !plain {
        return None;
    }
    t.try_storage_mut::<f32>().filter(|s| s.len() == n)
}

/// Elements per rayon task in elementwise kernels: large enough to amortise the task.
const CHUNK: usize = 1 << 15;

/// The sizes of the forward convolution of `x` by `weight`, its output included.
fn forward_shape(
    x: &FlexTensor,
    weight: &FlexTensor,
    options: &ConvOptions<3>,
) -> Option<ConvShape> {
    let (xs, ws) = (dims5(x)?, dims5(weight)?);
    let axis = |a: usize| {
        let (begin, end) = options.padding[a];
        let padded = xs[2 + a] + begin + end;
        let k = ws[2 + a];
        (padded >= k && options.stride[a] > 0).then(|| (padded - k) / options.stride[a] + 1)
    };
    conv_shape(x, weight, [axis(0)?, axis(1)?, axis(2)?], options)
}

fn dims5(t: &FlexTensor) -> Option<[usize; 5]> {
    <[usize; 5]>::try_from(t.shape().as_slice()).ok()
}

/// The sizes medseg's kernels handle: `f32`, one group, no dilation, a non-empty `output`
/// `[D', H', W']`; `None` sends the rest to burn's reference.
fn conv_shape(
    x: &FlexTensor,
    weight: &FlexTensor,
    output: [usize; 3],
    options: &ConvOptions<3>,
) -> Option<ConvShape> {
    let plain = options.groups == 1 && options.dilation == [1, 1, 1];
    let f32s = [x.dtype(), weight.dtype()] == [DType::F32; 2];
    if !plain || !f32s || output.contains(&0) {
        return None;
    }
    let ([n, ci, d, h, w], [co, wci, kd, kh, kw]) = (dims5(x)?, dims5(weight)?);
    if wci != ci {
        return None;
    }
    let [od, oh, ow] = output;
    Some(ConvShape {
        batch: n,
        in_channels: ci,
        out_channels: co,
        input: [d, h, w],
        kernel: [kd, kh, kw],
        stride: options.stride,
        padding: options.padding.map(|(begin, _)| begin),
        output: [od, oh, ow],
    })
}

/// The sizes medseg's upsampling handles: `f32` input and weight of matching channels; the
/// factor is the kernel's size. `None` sends the rest to burn's transposed convolution.
fn upsample_shape(x: &FlexTensor, weight: &FlexTensor) -> Option<UpsampleShape> {
    let f32s = [x.dtype(), weight.dtype()] == [DType::F32; 2];
    let ([n, ci, d, h, w], [wci, co, fd, fh, fw]) = (dims5(x)?, dims5(weight)?);
    (f32s && wci == ci && !([fd, fh, fw].contains(&0))).then_some(UpsampleShape {
        batch: n,
        in_channels: ci,
        out_channels: co,
        input: [d, h, w],
        factor: [fd, fh, fw],
    })
}

fn output_dims(s: &UpsampleShape) -> [usize; 5] {
    let [od, oh, ow] = s.output();
    [s.batch, s.out_channels, od, oh, ow]
}

/// burn's options for the same layer: stride = kernel, no padding, one group.
fn upsample_options(weight: &FlexTensor) -> ConvTransposeOptions<3> {
    let k = weight.shape();
    let factor = [k[2], k[3], k[4]];
    ConvTransposeOptions::new(factor, [0; 3], [0; 3], [1; 3], 1)
}

impl<B: Backend + Kernels, C: CheckpointStrategy> Kernels for Autodiff<B, C> {
    fn medseg_conv3d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        options: ConvOptions<3>,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Conv3dBackward;

        impl<B: Backend + Kernels> Backward<B, 2> for Conv3dBackward {
            type State = (NodeId, NodeId, ConvOptions<3>);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let [node_x, node_weight] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (x_state, weight_state, options) = ops.state;
                let x = checkpointer.retrieve_node_output::<FloatTensor<B>>(x_state);
                let weight = checkpointer.retrieve_node_output::<FloatTensor<B>>(weight_state);
                if let Some(node) = node_x {
                    let dx = B::medseg_conv3d_x_grad(
                        x.clone(),
                        weight.clone(),
                        grad.clone(),
                        options.clone(),
                    );
                    grads.register::<B>(node.id, dx);
                }
                if let Some(node) = node_weight {
                    let dw = B::medseg_conv3d_weight_grad(x, weight, grad, options);
                    grads.register::<B>(node.id, dw);
                }
            }
        }

        match Conv3dBackward
            .prepare::<C>([x.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let state = (
                    prep.checkpoint(&x),
                    prep.checkpoint(&weight),
                    options.clone(),
                );
                let out = B::medseg_conv3d(x.into_primitive(), weight.into_primitive(), options);
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::medseg_conv3d(
                x.into_primitive(),
                weight.into_primitive(),
                options,
            )),
        }
    }

    fn medseg_leaky_relu(x: FloatTensor<Self>, slope: f64) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct LeakyReluBackward;

        impl<B: Backend + Kernels> Backward<B, 1> for LeakyReluBackward {
            type State = (NodeId, f64);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let [node_x] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (x_state, slope) = ops.state;
                let x = checkpointer.retrieve_node_output::<FloatTensor<B>>(x_state);
                if let Some(node) = node_x {
                    grads.register::<B>(node.id, B::medseg_leaky_relu_backward(x, grad, slope));
                }
            }
        }

        match LeakyReluBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let state = (prep.checkpoint(&x), slope);
                prep.finish(state, B::medseg_leaky_relu(x.into_primitive(), slope))
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::medseg_leaky_relu(x.into_primitive(), slope))
            }
        }
    }

    fn medseg_group_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        groups: usize,
        epsilon: f64,
        slope: Option<f64>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        #[derive(Debug)]
        struct GroupNormBackward;

        impl<B: Backend + Kernels> Backward<B, 3> for GroupNormBackward {
            type State = (NodeId, NodeId, NodeId, FloatTensor<B>, usize, Option<f64>);

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let [node_x, node_gamma, node_beta] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (x_state, gamma_state, beta_state, stats, groups, slope) = ops.state;
                let [x, gamma, beta] = [x_state, gamma_state, beta_state]
                    .map(|id| checkpointer.retrieve_node_output::<FloatTensor<B>>(id));
                let (dx, dgamma, dbeta) =
                    B::medseg_group_norm_backward(x, stats, gamma, beta, grad, groups, slope);
                for (node, g) in [(node_x, dx), (node_gamma, dgamma), (node_beta, dbeta)] {
                    if let Some(node) = node {
                        grads.register::<B>(node.id, g);
                    }
                }
            }
        }

        let kind = GroupNormBackward
            .prepare::<C>([x.node(), gamma.node(), beta.node()])
            .compute_bound()
            .stateful();
        let forward = |x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>| {
            let (x, gamma, beta) = (
                x.into_primitive(),
                gamma.into_primitive(),
                beta.into_primitive(),
            );
            B::medseg_group_norm(x, gamma, beta, groups, epsilon, slope)
        };
        match kind {
            OpsKind::Tracked(mut prep) => {
                let ids = [&x, &gamma, &beta].map(|t| prep.checkpoint(t));
                let (y, stats) = forward(x, gamma, beta);
                let state = (ids[0], ids[1], ids[2], stats.clone(), groups, slope);
                (prep.finish(state, y), FloatTensor::<Self>::new(stats))
            }
            OpsKind::UnTracked(prep) => {
                let (y, stats) = forward(x, gamma, beta);
                (prep.finish(y), FloatTensor::<Self>::new(stats))
            }
        }
    }

    /// Not differentiable again: the gradients come back as constants.
    fn medseg_group_norm_backward(
        x: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        groups: usize,
        slope: Option<f64>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (dx, dgamma, dbeta) = B::medseg_group_norm_backward(
            x.into_primitive(),
            stats.into_primitive(),
            gamma.into_primitive(),
            beta.into_primitive(),
            grad.into_primitive(),
            groups,
            slope,
        );
        (
            FloatTensor::<Self>::new(dx),
            FloatTensor::<Self>::new(dgamma),
            FloatTensor::<Self>::new(dbeta),
        )
    }

    fn medseg_upsample3d(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct UpsampleBackward;

        impl<B: Backend + Kernels> Backward<B, 2> for UpsampleBackward {
            type State = (NodeId, NodeId);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let [node_x, node_weight] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let [x, weight] = [ops.state.0, ops.state.1]
                    .map(|id| checkpointer.retrieve_node_output::<FloatTensor<B>>(id));
                let (dx, dw) = B::medseg_upsample3d_backward(x, weight, grad);
                for (node, g) in [(node_x, dx), (node_weight, dw)] {
                    if let Some(node) = node {
                        grads.register::<B>(node.id, g);
                    }
                }
            }
        }

        match UpsampleBackward
            .prepare::<C>([x.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let state = (prep.checkpoint(&x), prep.checkpoint(&weight));
                let out = B::medseg_upsample3d(x.into_primitive(), weight.into_primitive());
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::medseg_upsample3d(
                x.into_primitive(),
                weight.into_primitive(),
            )),
        }
    }

    /// Not differentiable again: the gradients come back as constants.
    fn medseg_upsample3d_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (dx, dw) = B::medseg_upsample3d_backward(
            x.into_primitive(),
            weight.into_primitive(),
            grad.into_primitive(),
        );
        (FloatTensor::<Self>::new(dx), FloatTensor::<Self>::new(dw))
    }

    fn medseg_softmax(x: FloatTensor<Self>, scale: f64) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct SoftmaxBackward;

        impl<B: Backend + Kernels> Backward<B, 1> for SoftmaxBackward {
            type State = (FloatTensor<B>, f64);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let [node_x] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (y, scale) = ops.state;
                if let Some(node) = node_x {
                    grads.register::<B>(node.id, B::medseg_softmax_backward(y, grad, scale));
                }
            }
        }

        // The backward pass needs only the output, kept by the state.
        match SoftmaxBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = B::medseg_softmax(x.into_primitive(), scale);
                prep.finish((y.clone(), scale), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::medseg_softmax(x.into_primitive(), scale)),
        }
    }

    /// Not differentiable again: the gradient comes back as a constant.
    fn medseg_softmax_backward(
        y: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        FloatTensor::<Self>::new(B::medseg_softmax_backward(
            y.into_primitive(),
            grad.into_primitive(),
            scale,
        ))
    }

    fn medseg_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct GeluBackward;

        impl<B: Backend + Kernels> Backward<B, 1> for GeluBackward {
            type State = NodeId;

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let [node_x] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let x = checkpointer.retrieve_node_output::<FloatTensor<B>>(ops.state);
                if let Some(node) = node_x {
                    grads.register::<B>(node.id, B::medseg_gelu_backward(x, grad));
                }
            }
        }

        match GeluBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let state = prep.checkpoint(&x);
                prep.finish(state, B::medseg_gelu(x.into_primitive()))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::medseg_gelu(x.into_primitive())),
        }
    }

    /// Not differentiable again: the gradient comes back as a constant.
    fn medseg_gelu_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        FloatTensor::<Self>::new(B::medseg_gelu_backward(
            x.into_primitive(),
            grad.into_primitive(),
        ))
    }
}
