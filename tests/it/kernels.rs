//! medseg's convolution kernels against burn's reference ops: forward and every gradient, on
//! random shapes (2D and 3D, odd sizes, stride 1 and 2, padding, 1 to 64 channels, batch 1 and 3);
//! the fused group norm + LeakyReLU likewise (instance and group, with and without the activation),
//! the decoder's kernel = stride transposed convolution, the attention's softmax and GELU.

use burn::prelude::*;
use burn::tensor::ops::ConvOptions;
use burn::tensor::TensorData;
use medseg::model::kernels::{self, KernelPath};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// Largest `|a - b| / (1 + |b|)` over the elements: relative for large values, absolute near 0.
fn max_rel_diff(a: TensorData, b: TensorData) -> f32 {
    let (a, b) = (
        a.try_to_vec::<f32>().unwrap(),
        b.try_to_vec::<f32>().unwrap(),
    );
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0.0, f32::max)
}

/// A channel count from 1 to 64.
fn random_channels(rng: &mut StdRng) -> usize {
    *[1, 2, 3, 5, 8, 16, 32, 64]
        .get(rng.random_range(0..8))
        .unwrap()
}

/// Values uniform in ±1, of `shape`.
fn uniform(rng: &mut StdRng, shape: Vec<usize>) -> TensorData {
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    TensorData::new(v, shape)
}

/// One random convolution: `[batch, ci, co, kernel, stride, pad]` and the input size.
#[derive(Debug)]
struct Case {
    dims: usize,
    batch: usize,
    channels: [usize; 2],
    kernel: usize,
    stride: usize,
    pad: usize,
    size: [usize; 3],
}

fn random_case(rng: &mut StdRng, dims: usize) -> Case {
    let kernel = *[1, 2, 3].get(rng.random_range(0..3)).unwrap();
    let edge = |rng: &mut StdRng, max: usize| rng.random_range(kernel.max(3)..=max);
    let size = if dims == 2 {
        [1, edge(rng, 19), edge(rng, 19)]
    } else {
        [edge(rng, 9), edge(rng, 9), edge(rng, 9)]
    };
    Case {
        dims,
        batch: *[1, 3].get(rng.random_range(0..2)).unwrap(),
        channels: [random_channels(rng), random_channels(rng)],
        kernel,
        stride: rng.random_range(1..=2),
        pad: rng.random_range(0..=kernel / 2),
        size,
    }
}

/// Output, input gradient, weight gradient and bias gradient of `sum(conv(x) · probe)`.
fn run(path: Option<KernelPath>, case: &Case, seed: u64) -> [TensorData; 4] {
    let device = Device::flex().autodiff();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut normal = |shape: Vec<usize>| uniform(&mut rng, shape);
    let [ci, co] = case.channels;
    let (k, s, p) = (case.kernel, case.stride, case.pad);
    let [d, h, w] = case.size;
    let x = Tensor::<5>::from_data(normal(vec![case.batch, ci, d, h, w]), &device).require_grad();
    let kd = if case.dims == 2 { 1 } else { k };
    let weight = Tensor::<5>::from_data(normal(vec![co, ci, kd, k, k]), &device).require_grad();
    let bias = Tensor::<1>::from_data(normal(vec![co]), &device).require_grad();
    let y = if case.dims == 2 {
        let x2 = x.clone().reshape([case.batch, ci, h, w]);
        let w2 = weight.clone().reshape([co, ci, k, k]);
        let opts = ConvOptions::new([s, s], [p, p], [1, 1], 1);
        let y = match path {
            Some(path) => kernels::conv2d_with(path, x2, w2, Some(bias.clone()), opts),
            None => burn::tensor::module::conv2d(x2, w2, Some(bias.clone()), opts),
        };
        y.unsqueeze_dim::<5>(2)
    } else {
        let opts = ConvOptions::new([s, s, s], [p, p, p], [1, 1, 1], 1);
        match path {
            Some(path) => {
                kernels::conv3d_with(path, x.clone(), weight.clone(), Some(bias.clone()), opts)
            }
            None => {
                burn::tensor::module::conv3d(x.clone(), weight.clone(), Some(bias.clone()), opts)
            }
        }
    };
    let probe = normal(y.dims().to_vec());
    output_and_gradients(y, probe, &x, &weight, &bias)
}

/// `y` and the gradients of `x`, `weight` and `bias` of `sum(y · probe)`.
fn output_and_gradients(
    y: Tensor<5>,
    probe: TensorData,
    x: &Tensor<5>,
    weight: &Tensor<5>,
    bias: &Tensor<1>,
) -> [TensorData; 4] {
    let probe = Tensor::<5>::from_data(probe, &y.device());
    let grads = (y.clone() * probe).sum().backward();
    let grad = |t: &Tensor<5>| t.grad(&grads).expect("gradient").into_data();
    [
        y.into_data(),
        grad(x),
        grad(weight),
        bias.grad(&grads).expect("bias gradient").into_data(),
    ]
}

/// Asserts that each of medseg's results is within 1e-4 of burn's.
fn assert_close<const N: usize>(
    what: &dyn std::fmt::Debug,
    names: [&str; N],
    ours: [TensorData; N],
    reference: [TensorData; N],
) {
    for (name, (a, b)) in names.iter().zip(ours.into_iter().zip(reference)) {
        let diff = max_rel_diff(a, b);
        assert!(diff <= 1e-4, "{what:?}: {name} differs by {diff}");
    }
}

#[test]
fn medseg_convolution_equals_burn_forward_and_all_gradients() {
    let mut rng = StdRng::seed_from_u64(12);
    for i in 0..24 {
        let case = random_case(&mut rng, if i % 2 == 0 { 2 } else { 3 });
        let ours = run(Some(KernelPath::Medseg), &case, i);
        let reference = run(None, &case, i);
        assert_close(&case, ["output", "dx", "dW", "db"], ours, reference);
    }
}

#[test]
fn the_burn_path_is_burn_itself() {
    let case = Case {
        dims: 3,
        batch: 1,
        channels: [4, 8],
        kernel: 3,
        stride: 2,
        pad: 1,
        size: [5, 6, 7],
    };
    let ours = run(Some(KernelPath::Burn), &case, 5);
    let reference = run(None, &case, 5);
    for (a, b) in ours.into_iter().zip(reference) {
        assert_eq!(max_rel_diff(a, b), 0.0);
    }
}

/// `leaky_relu(x)` and its input gradient under a random probe, on `path` or burn's op.
fn leaky(path: Option<KernelPath>, values: &[f32], transpose: bool) -> [TensorData; 2] {
    let device = Device::flex().autodiff();
    let n = values.len();
    let x = Tensor::<3>::from_data(TensorData::new(values.to_vec(), [2, 3, n / 6]), &device)
        .require_grad();
    // A strided view (transposed) reaches the kernels' copying branch; the plain input is kept
    // for the backward pass, so it is shared and written to a new buffer too.
    let xt = if transpose {
        x.clone().swap_dims(1, 2)
    } else {
        x.clone()
    };
    let y = match path {
        Some(path) => kernels::leaky_relu_with(path, xt, 0.01),
        None => burn::tensor::activation::leaky_relu(xt, 0.01),
    };
    let mut rng = StdRng::seed_from_u64(1);
    let probe: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    let probe = Tensor::<3>::from_data(TensorData::new(probe, y.dims()), &device);
    let grads = (y.clone() * probe).sum().backward();
    [y.into_data(), x.grad(&grads).expect("gradient").into_data()]
}

#[test]
fn medseg_leaky_relu_equals_burn_including_at_zero() {
    let mut rng = StdRng::seed_from_u64(4);
    // Exact zeros and both signs; 6 · 9000 elements spans several parallel chunks.
    let values: Vec<f32> = (0..6 * 9000)
        .map(|i| {
            if i % 7 == 0 {
                0.0
            } else {
                rng.random_range(-3.0..3.0)
            }
        })
        .collect();
    for transpose in [false, true] {
        let ours = leaky(Some(KernelPath::Medseg), &values, transpose);
        let reference = leaky(None, &values, transpose);
        for (name, (a, b)) in ["output", "dx"].iter().zip(ours.into_iter().zip(reference)) {
            assert_eq!(
                max_rel_diff(a, b),
                0.0,
                "leaky_relu {name} (transposed: {transpose})"
            );
        }
    }
}

/// One random group norm: `[batch, channels, groups]`, the spatial size, the activation.
#[derive(Debug)]
struct NormCase {
    batch: usize,
    channels: usize,
    groups: usize,
    size: Vec<usize>,
    slope: Option<f64>,
    transpose: bool,
}

fn random_norm_case(rng: &mut StdRng, i: usize) -> NormCase {
    let channels = random_channels(rng);
    let divisors: Vec<usize> = (1..=channels).filter(|g| channels % g == 0).collect();
    // Instance norm (a group per channel) half the time, as the model's default.
    let groups = if i % 2 == 0 {
        channels
    } else {
        divisors[rng.random_range(0..divisors.len())]
    };
    let size = if i % 3 == 0 {
        vec![
            rng.random_range(1..=9),
            rng.random_range(1..=9),
            rng.random_range(1..=9),
        ]
    } else {
        vec![1, rng.random_range(1..=40), rng.random_range(1..=40)]
    };
    NormCase {
        batch: *[1, 3].get(rng.random_range(0..2)).unwrap(),
        channels,
        groups,
        size,
        slope: (i % 4 != 1).then_some(0.01),
        transpose: i % 5 == 2,
    }
}

/// Output and the gradients of input, scale and shift of `sum(norm(x) · probe)`, with an input
/// far from zero mean and unit spread, and a random affine map.
fn run_norm(path: Option<KernelPath>, case: &NormCase, seed: u64) -> [TensorData; 4] {
    use burn::module::Param;
    use burn::nn::GroupNormConfig;
    let device = Device::flex().autodiff();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut uniform = |shape: Vec<usize>, centre: f32, spread: f32| {
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| centre + spread * rng.random_range(-1.0..1.0))
            .collect();
        TensorData::new(v, shape)
    };
    let (b, c) = (case.batch, case.channels);
    let mut norm = GroupNormConfig::new(case.groups, c).init(&device);
    norm.gamma = Some(Param::from_tensor(
        Tensor::<1>::from_data(uniform(vec![c], 1.0, 0.8), &device).require_grad(),
    ));
    norm.beta = Some(Param::from_tensor(
        Tensor::<1>::from_data(uniform(vec![c], 0.0, 0.5), &device).require_grad(),
    ));
    let [d, h, w] = [case.size[0], case.size[1], case.size[2]];
    // A transposed tensor arrives as a strided view (the kernels' copying branch).
    let x = if case.transpose {
        Tensor::<5>::from_data(uniform(vec![b, c, d, w, h], 5.0, 3.0), &device)
    } else {
        Tensor::<5>::from_data(uniform(vec![b, c, d, h, w], 5.0, 3.0), &device)
    }
    .require_grad();
    let input = if case.transpose {
        x.clone().swap_dims(3, 4)
    } else {
        x.clone()
    };
    let y = match path {
        Some(path) => kernels::group_norm_with(path, &norm, input, case.slope),
        None => {
            let y = norm.forward(input);
            match case.slope {
                Some(s) => burn::tensor::activation::leaky_relu(y, s),
                None => y,
            }
        }
    };
    let probe = Tensor::<5>::from_data(uniform(y.dims().to_vec(), 0.0, 1.0), &device);
    let grads = (y.clone() * probe).sum().backward();
    let grad = |t: Tensor<1>| t.grad(&grads).expect("affine gradient").into_data();
    [
        y.into_data(),
        x.grad(&grads).expect("input gradient").into_data(),
        grad(norm.gamma.as_ref().unwrap().val()),
        grad(norm.beta.as_ref().unwrap().val()),
    ]
}

#[test]
fn medseg_group_norm_equals_burn_forward_and_all_gradients() {
    let mut rng = StdRng::seed_from_u64(21);
    for i in 0..32 {
        let case = random_norm_case(&mut rng, i);
        let ours = run_norm(Some(KernelPath::Medseg), &case, i as u64);
        let reference = run_norm(None, &case, i as u64);
        assert_close(&case, ["output", "dx", "dgamma", "dbeta"], ours, reference);
    }
}

#[test]
fn medseg_group_norm_in_place_at_inference_equals_burn() {
    use burn::nn::GroupNormConfig;
    // Without autodiff the input is owned and normalised in place.
    let device = Device::flex();
    let mut rng = StdRng::seed_from_u64(3);
    let v: Vec<f32> = (0..2 * 8 * 7 * 11)
        .map(|_| 100.0 + rng.random_range(-2.0..2.0))
        .collect();
    let x = || Tensor::<4>::from_data(TensorData::new(v.clone(), [2, 8, 7, 11]), &device);
    let norm = GroupNormConfig::new(4, 8).init(&device);
    let ours = kernels::group_norm_with(KernelPath::Medseg, &norm, x(), Some(0.01));
    let reference = burn::tensor::activation::leaky_relu(norm.forward(x()), 0.01);
    let diff = max_rel_diff(ours.into_data(), reference.into_data());
    assert!(diff <= 1e-4, "in-place group norm differs by {diff}");
}

/// One random kernel = stride transposed convolution (the decoder's upsampling).
#[derive(Debug)]
struct UpCase {
    dims: usize,
    batch: usize,
    channels: [usize; 2],
    factor: [usize; 3],
    size: [usize; 3],
}

fn random_up_case(rng: &mut StdRng, dims: usize) -> UpCase {
    let factor = |rng: &mut StdRng| rng.random_range(1..=4);
    let (factor, size) = if dims == 2 {
        (
            [1, factor(rng), factor(rng)],
            [1, rng.random_range(1..=19), rng.random_range(1..=19)],
        )
    } else {
        let f = factor(rng);
        (
            [f, f, rng.random_range(1..=2)],
            [
                rng.random_range(1..=6),
                rng.random_range(1..=6),
                rng.random_range(1..=6),
            ],
        )
    };
    UpCase {
        dims,
        batch: *[1, 3].get(rng.random_range(0..2)).unwrap(),
        channels: [random_channels(rng), random_channels(rng)],
        factor,
        size,
    }
}

/// Output and the gradients of input, weight and bias of `sum(up(x) · probe)`.
fn run_up(path: Option<KernelPath>, case: &UpCase, seed: u64) -> [TensorData; 4] {
    use burn::tensor::ops::ConvTransposeOptions;
    let device = Device::flex().autodiff();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut normal = |shape: Vec<usize>| uniform(&mut rng, shape);
    let [ci, co] = case.channels;
    let [fd, fh, fw] = case.factor;
    let [d, h, w] = case.size;
    let n = case.batch;
    let x = Tensor::<5>::from_data(normal(vec![n, ci, d, h, w]), &device).require_grad();
    let weight = Tensor::<5>::from_data(normal(vec![ci, co, fd, fh, fw]), &device).require_grad();
    let bias = Tensor::<1>::from_data(normal(vec![co]), &device).require_grad();
    let y = if case.dims == 2 {
        let x2 = x.clone().reshape([n, ci, h, w]);
        let w2 = weight.clone().reshape([ci, co, fh, fw]);
        let opts = ConvTransposeOptions::new([fh, fw], [0, 0], [0, 0], [1, 1], 1);
        let y = match path {
            Some(path) => kernels::conv_transpose2d_with(path, x2, w2, Some(bias.clone()), opts),
            None => burn::tensor::module::conv_transpose2d(x2, w2, Some(bias.clone()), opts),
        };
        y.unsqueeze_dim::<5>(2)
    } else {
        let opts = ConvTransposeOptions::new([fd, fh, fw], [0; 3], [0; 3], [1; 3], 1);
        let (xc, wc, bc) = (x.clone(), weight.clone(), Some(bias.clone()));
        match path {
            Some(path) => kernels::conv_transpose3d_with(path, xc, wc, bc, opts),
            None => burn::tensor::module::conv_transpose3d(xc, wc, bc, opts),
        }
    };
    let probe = normal(y.dims().to_vec());
    output_and_gradients(y, probe, &x, &weight, &bias)
}

#[test]
fn medseg_upsampling_equals_burn_transposed_convolution_forward_and_all_gradients() {
    let mut rng = StdRng::seed_from_u64(33);
    for i in 0..24 {
        let case = random_up_case(&mut rng, if i % 2 == 0 { 2 } else { 3 });
        let ours = run_up(Some(KernelPath::Medseg), &case, i);
        let reference = run_up(None, &case, i);
        assert_close(&case, ["output", "dx", "dW", "db"], ours, reference);
    }
}

/// `op(x)` and its input gradient under a random probe, for `x` `shape` with values in
/// `±spread`; a transposed view when `transpose` (the kernels' copying branch).
fn unary(
    op: &dyn Fn(Tensor<4>) -> Tensor<4>,
    shape: [usize; 4],
    spread: f32,
    transpose: bool,
    seed: u64,
) -> [TensorData; 2] {
    let device = Device::flex().autodiff();
    let mut rng = StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let mut values =
        |n: usize, s: f32| -> Vec<f32> { (0..n).map(|_| rng.random_range(-s..s)).collect() };
    let x =
        Tensor::<4>::from_data(TensorData::new(values(n, spread), shape), &device).require_grad();
    let input = if transpose {
        x.clone().swap_dims(2, 3)
    } else {
        x.clone()
    };
    let y = op(input);
    let probe = Tensor::<4>::from_data(TensorData::new(values(n, 1.0), y.dims()), &device);
    let grads = (y.clone() * probe).sum().backward();
    [y.into_data(), x.grad(&grads).expect("gradient").into_data()]
}

/// A unary op's input: shape, value spread, transposed view, seed.
type UnaryInput = ([usize; 4], f32, bool, u64);

/// Asserts that medseg's `ours` equals burn's `reference` within 1e-4 (output and gradient).
fn compare_unary(
    what: &str,
    ours: &dyn Fn(Tensor<4>) -> Tensor<4>,
    reference: &dyn Fn(Tensor<4>) -> Tensor<4>,
    (shape, spread, transpose, seed): UnaryInput,
) {
    let ours = unary(ours, shape, spread, transpose, seed);
    let reference = unary(reference, shape, spread, transpose, seed);
    assert_close(&what, ["output", "dx"], ours, reference);
}

#[test]
fn medseg_softmax_equals_burn_forward_and_gradient() {
    let mut rng = StdRng::seed_from_u64(8);
    for i in 0..16u64 {
        // Rows with and without a SIMD tail, of one value, and as long as 2D attention's.
        let len = *[1, 3, 8, 17, 33, 64, 100, 784].get(i as usize % 8).unwrap();
        let shape = [
            rng.random_range(1..=3),
            rng.random_range(1..=4),
            rng.random_range(1..=9),
            len,
        ];
        let temperature = *[1.0, 4.0, 5.656_854, 0.5]
            .get(rng.random_range(0..4))
            .unwrap();
        let spread = if i % 3 == 0 { 60.0 } else { 4.0 };
        let transpose = i % 4 == 3;
        compare_unary(
            &format!("softmax {shape:?} / {temperature}"),
            &|x| kernels::softmax_with(KernelPath::Medseg, x, temperature),
            &|x| burn::tensor::activation::softmax(x.div_scalar(temperature), 3),
            (shape, spread, transpose, i),
        );
    }
}

#[test]
fn medseg_gelu_equals_burn_forward_and_gradient() {
    for (i, spread) in [1.0f32, 4.0, 12.0].into_iter().enumerate() {
        for transpose in [false, true] {
            compare_unary(
                &format!("gelu ±{spread}"),
                &|x| kernels::gelu_with(KernelPath::Medseg, x),
                &|x| burn::tensor::activation::gelu(x),
                ([2, 3, 37, 41], spread, transpose, i as u64),
            );
        }
    }
}
