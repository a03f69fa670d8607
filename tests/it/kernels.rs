//! medseg's convolution kernels against burn's reference ops: forward and every gradient, on
//! random shapes (2D and 3D, odd sizes, stride 1 and 2, padding, 1 to 64 channels, batch 1 and 3).

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

/// One random convolution: `[batch, ci, co, kernel, stride, pad]` and the input size.
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
    let channel = |rng: &mut StdRng| {
        *[1, 2, 3, 5, 8, 16, 32, 64]
            .get(rng.random_range(0..8))
            .unwrap()
    };
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
        channels: [channel(rng), channel(rng)],
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
    let mut normal = |shape: Vec<usize>| {
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        TensorData::new(v, shape)
    };
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
    let probe = Tensor::<5>::from_data(normal(y.dims().to_vec()), &device);
    let grads = (y.clone() * probe).sum().backward();
    let grad = |t: &Tensor<5>| t.grad(&grads).expect("gradient").into_data();
    [
        y.into_data(),
        grad(&x),
        grad(&weight),
        bias.grad(&grads).expect("bias gradient").into_data(),
    ]
}

#[test]
fn medseg_convolution_equals_burn_forward_and_all_gradients() {
    let mut rng = StdRng::seed_from_u64(12);
    for i in 0..24 {
        let case = random_case(&mut rng, if i % 2 == 0 { 2 } else { 3 });
        let ours = run(Some(KernelPath::Medseg), &case, i);
        let reference = run(None, &case, i);
        for (name, (a, b)) in ["output", "dx", "dW", "db"]
            .iter()
            .zip(ours.into_iter().zip(reference))
        {
            let diff = max_rel_diff(a, b);
            assert!(
                diff <= 1e-4,
                "{}D batch {} channels {:?} kernel {} stride {} pad {} size {:?}: {name} differs by {diff}",
                case.dims, case.batch, case.channels, case.kernel, case.stride, case.pad, case.size
            );
        }
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
