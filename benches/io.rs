//! I/O benchmarks on real scans (run `scripts/fetch-data.sh` first):
//! assembling a 20-slice JPEG 2000 CT series, reading a 35 M-voxel gzip NIfTI, and writing a
//! 35 M-voxel uint8 mask as gzip NIfTI.
//!
//! `cargo bench --bench io`

// criterion_group! generates a public function that cannot carry a doc comment.
#![allow(missing_docs)]

use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use medseg::io::{read_nifti, read_volume, write_nifti};
use medseg::DataType;

fn cache(rel: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("datasets/cache")
        .join(rel);
    assert!(
        p.exists(),
        "{} missing: run scripts/fetch-data.sh",
        p.display()
    );
    p
}

fn io(c: &mut Criterion) {
    let mut g = c.benchmark_group("io");
    g.sample_size(10).measurement_time(Duration::from_secs(10));

    let series = cache("totalsegmentator/example_ct_dicom");
    // Throughput in decoded bytes (int16 voxels), the unit pydicom and nibabel comparisons use.
    g.throughput(Throughput::Bytes(512 * 512 * 20 * 2));
    g.bench_function("dicom_series_20x512x512_j2k", |b| {
        b.iter(|| read_volume(&series, None).unwrap())
    });

    let big = cache("mricron/ch2better.nii.gz");
    let brain = read_nifti(&big).unwrap();
    let voxels = brain.geometry.voxel_count() as u64;
    g.throughput(Throughput::Bytes(voxels));
    g.bench_function("nifti_gz_read_ch2better_35M_uint8", |b| {
        b.iter(|| read_nifti(&big).unwrap())
    });

    // A realistic mask: the brain thresholded (about a third of the voxels set).
    let mut mask = brain.clone();
    mask.voxels
        .mapv_inplace(|v| if v > 40.0 { 1.0 } else { 0.0 });
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mask.nii.gz");
    g.bench_function("nifti_gz_write_mask_35M_uint8", |b| {
        b.iter(|| write_nifti(&mask, &out, DataType::Uint8).unwrap())
    });
    g.finish();
}

criterion_group!(benches, io);
criterion_main!(benches);
