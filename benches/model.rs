//! Model step benchmarks on CPU (`flex`): forward and forward+backward for the `tiny` and `small`
//! presets, 2D 1×224×224 and 3D 1×96×96×96, batch 1. Criterion's throughput is set to the FLOPs of
//! the step (2 per multiply-add; ×3 for forward+backward), so "elem/s" reads as FLOP/s and the time
//! per iteration is the time per sample.
//!
//! `cargo bench --bench model` (filter, e.g. `-- tiny/2d`)

// criterion_group! generates a public function that cannot carry a doc comment.
#![allow(missing_docs)]

use std::time::Duration;

use burn::prelude::*;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use medseg::model::{summary, HybridSegNetConfig};
use medseg::train::loss::{dice_ce_loss, LossTerms};

fn model(c: &mut Criterion) {
    let mut g = c.benchmark_group("model");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8));
    for preset in ["tiny", "small"] {
        for dims in [2usize, 3] {
            let patch = HybridSegNetConfig::default_patch(dims).unwrap();
            let cfg = HybridSegNetConfig::preset(preset.parse().unwrap(), patch, 2);
            let macs: u64 = summary::summarize(&cfg, patch).iter().map(|r| r.macs).sum();
            let [d, h, w] = patch.window();
            let shape = [1, 1, d, h, w];
            let label_shape = [shape[0], shape[2], shape[3], shape[4]];

            let device = Device::flex();
            let net = cfg.init(&device).unwrap();
            let x =
                Tensor::<5>::random(shape, burn::tensor::Distribution::Normal(0.0, 1.0), &device);
            g.throughput(Throughput::Elements(2 * macs));
            g.bench_function(format!("{preset}/{dims}d/forward"), |b| {
                b.iter(|| net.forward(x.clone()).logits.sum().into_scalar::<f32>())
            });

            let ad = Device::flex().autodiff();
            let net = cfg.init(&ad).unwrap();
            let x = Tensor::<5>::random(shape, burn::tensor::Distribution::Normal(0.0, 1.0), &ad);
            let y = Tensor::<4, Int>::zeros(label_shape, &ad);
            g.throughput(Throughput::Elements(6 * macs));
            g.bench_function(format!("{preset}/{dims}d/forward_backward"), |b| {
                b.iter(|| {
                    let loss = dice_ce_loss(
                        net.forward(x.clone()).logits,
                        y.clone(),
                        LossTerms::default(),
                    );
                    loss.backward()
                })
            });
        }
    }
    g.finish();
}

/// Instance norm + LeakyReLU, forward and backward, on medseg's kernel and on burn's ops: the
/// shapes of the tiny model's first two levels in 2D 224².
fn norm(c: &mut Criterion) {
    use burn::nn::GroupNormConfig;
    use medseg::model::kernels::{group_norm_with, KernelPath};
    let mut g = c.benchmark_group("norm");
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for (channels, side) in [(8usize, 224usize), (16, 112)] {
        let ad = Device::flex().autodiff();
        let norm = GroupNormConfig::new(channels, channels).init(&ad);
        let x = Tensor::<5>::random(
            [1, channels, 1, side, side],
            burn::tensor::Distribution::Normal(0.5, 2.0),
            &ad,
        )
        .require_grad();
        for path in [KernelPath::Medseg, KernelPath::Burn] {
            g.bench_function(format!("{channels}x{side}/{path:?}"), |b| {
                b.iter(|| {
                    let y = group_norm_with(path, &norm, x.clone(), Some(0.01));
                    (y.clone() * y).sum().backward()
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, model, norm);
criterion_main!(benches);
