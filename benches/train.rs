//! Training throughput on CPU (`flex`), in patches per second (criterion's elem/s):
//! - `loader/*`: cutting and augmenting one batch from a real prepared CT (TotalSegmentator's
//!   `example_ct`, 3 mm), without the model;
//! - `step/*`: one full optimisation step (forward, Dice + cross-entropy, backward,
//!   AdamW) of the `tiny` and `small` presets, 2D 4×128² and 3D 2×64³.
//!
//! `cargo bench --bench train` (needs `scripts/fetch-data.sh`; filter e.g. `-- loader`)

// criterion_group! generates a public function that cannot carry a doc comment.
#![allow(missing_docs)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use medseg::config::{AugmentConfig, SamplingConfig};
use medseg::data::batcher::{make_batch, EpochPlan};
use medseg::data::dataset::{load_case, prepare, LabelMap, SpatialPlan};
use medseg::data::manifest::CaseEntry;
use medseg::data::sampler::PatchSampler;
use medseg::geometry::PatchSize;
use medseg::model::HybridSegNetConfig;
use medseg::train::loss::{dice_ce_loss, LossTerms};
use medseg::transforms::intensity::Normalization;

fn liver_case() -> medseg::data::PreparedCase {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("datasets/cache/totalsegmentator");
    let entry = CaseEntry {
        id: "abdomen_ct".into(),
        images: vec![root.join("example_ct.nii.gz")],
        label: Some(root.join("example_seg_fast_force_split.nii.gz")),
        group: None,
    };
    let plan = SpatialPlan {
        spacing: [3.0; 3],
        reorient: true,
        crop_to_nonzero: false,
    };
    let s = load_case(&entry, 1, &LabelMap::new(2, &[0, 5]), &plan, u64::MAX)
        .expect("run scripts/fetch-data.sh");
    let ct = Normalization::Ct {
        low: -100.0,
        high: 250.0,
        mean: 100.0,
        std: 40.0,
    };
    prepare(entry.id, s, &[ct], 2)
}

fn train(c: &mut Criterion) {
    let case = Arc::new(liver_case());
    let cases = vec![case];
    let mut g = c.benchmark_group("train");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    let setups: [(&str, &[usize], usize); 2] = [("2d", &[128, 128], 4), ("3d", &[64, 64, 64], 2)];
    for (dims, patch, batch) in &setups {
        let sampling = SamplingConfig {
            patch_size: PatchSize::new(patch).unwrap(),
            ..SamplingConfig::default()
        };
        let sampler = PatchSampler::new(&sampling, &AugmentConfig::default(), 0);
        let plan = EpochPlan::new(1, 1000, *batch, 0, 0, 0);
        g.throughput(Throughput::Elements(*batch as u64));
        let mut step = 0;
        g.bench_function(format!("loader/{dims}"), |b| {
            b.iter(|| {
                step += 1;
                make_batch(&cases, &sampler, &plan, 0, 0, step)
            })
        });
        for preset in ["tiny", "small"] {
            let cfg = HybridSegNetConfig::preset(preset.parse().unwrap(), sampling.patch_size, 2);
            let device = Device::flex().autodiff();
            device.seed(0);
            let mut model = cfg.init(&device).unwrap();
            let mut optim = AdamWConfig::new().init();
            let batch_data = make_batch(&cases, &sampler, &plan, 0, 0, 0);
            g.bench_function(format!("step/{preset}/{dims}"), |b| {
                b.iter(|| {
                    let x = Tensor::<5>::from_data(
                        TensorData::new(batch_data.image.clone(), batch_data.image_shape),
                        &device,
                    );
                    let y: Vec<i64> = batch_data.label.iter().map(|&l| l as i64).collect();
                    let y = Tensor::<4, Int>::from_data(
                        TensorData::new(y, batch_data.label_shape),
                        &device,
                    );
                    let loss = dice_ce_loss(model.forward(x).logits, y, LossTerms::default());
                    let grads = GradientsParams::from_grads(loss.backward(), &model);
                    model = optim.step(1e-3, model.clone(), grads);
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, train);
criterion_main!(benches);
