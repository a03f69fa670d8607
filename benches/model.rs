//! Model step benchmarks on CPU (`flex`): forward and forward+backward for the `tiny` and `small`
//! presets, 2D 1×224×224 and 3D 1×96×96×96, batch 1. Criterion's throughput is set to the FLOPs of
//! the step (2 per multiply-add; ×3 for forward+backward), so "elem/s" reads as FLOP/s and the time
//! per iteration is the time per sample.
//!
//! `cargo bench --bench model` (filter, e.g. `-- tiny/2d`)

use std::time::Duration;

use burn::prelude::*;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use medseg::model::{summary, HybridSegNetConfig};
use medseg::train::loss::dice_ce_loss;

fn model(c: &mut Criterion) {
    let mut g = c.benchmark_group("model");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8));
    for preset in ["tiny", "small"] {
        for dims in [2usize, 3] {
            let cfg = HybridSegNetConfig::preset(preset, dims, 1, 2).unwrap();
            let size = cfg.patch_size.clone();
            let macs: u64 = summary::summarize(&cfg, &size).iter().map(|r| r.macs).sum();
            let shape = if dims == 2 {
                [1, 1, 1, size[0], size[1]]
            } else {
                [1, 1, size[0], size[1], size[2]]
            };
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
                    let loss = dice_ce_loss(net.forward(x.clone()).logits, y.clone(), 1.0, 1.0);
                    loss.backward()
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, model);
criterion_main!(benches);
