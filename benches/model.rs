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
use medseg::train::loss::dice_ce_loss;

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
