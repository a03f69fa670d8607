//! Surface-distance benchmark: HD95, ASSD and NSD (one `class_metrics` call, which also computes
//! the overlap metrics) on a CT-sized 512×512×300 mask pair: two overlapping ellipsoids, the
//! prediction shifted and resized, spacing 1 × 0.8 × 0.8 mm. `scripts/reference/monai_eval_bench.py`
//! times MONAI on the same masks.
//!
//! `cargo bench --bench eval`

// criterion_group! generates a public function that cannot carry a doc comment.
#![allow(missing_docs)]

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use medseg::eval::metrics::class_metrics;

/// Ellipsoid mask on `[nk, nj, ni]` with centre `c` and radii `r` (voxels).
fn ellipsoid(dims: [usize; 3], c: [f64; 3], r: [f64; 3]) -> Vec<bool> {
    let [nk, nj, ni] = dims;
    let mut m = vec![false; nk * nj * ni];
    for k in 0..nk {
        for j in 0..nj {
            for i in 0..ni {
                let d = ((k as f64 - c[0]) / r[0]).powi(2)
                    + ((j as f64 - c[1]) / r[1]).powi(2)
                    + ((i as f64 - c[2]) / r[2]).powi(2);
                m[(k * nj + j) * ni + i] = d <= 1.0;
            }
        }
    }
    m
}

pub const DIMS: [usize; 3] = [300, 512, 512];

fn eval(c: &mut Criterion) {
    let truth = ellipsoid(DIMS, [150.0, 256.0, 256.0], [100.0, 180.0, 160.0]);
    let pred = ellipsoid(DIMS, [153.0, 261.0, 252.0], [97.0, 184.0, 158.0]);
    let mut g = c.benchmark_group("eval");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.bench_function("class_metrics_hd95_assd_nsd_512x512x300", |b| {
        b.iter(|| class_metrics(&truth, &pred, DIMS, [1.0, 0.8, 0.8], 2.0))
    });
    g.finish();
    let m = class_metrics(&truth, &pred, DIMS, [1.0, 0.8, 0.8], 2.0);
    println!(
        "dice {:.6} hd95 {:.4} mm assd {:.4} mm nsd {:.6}",
        m.dice, m.hd95_mm, m.assd_mm, m.nsd
    );
}

criterion_group!(benches, eval);
criterion_main!(benches);
