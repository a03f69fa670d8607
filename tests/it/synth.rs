//! Synthetic lesion insertion into a real CT (work in progress for issue 7): the host's noise
//! survives under the lesion, edges carry partial volume, values stay in the host's range.

use crate::common::cache;
use medseg::synth::{insert, lesion::LesionShape, local_noise};
use ndarray::Axis;
use rand::SeedableRng;

#[test]
fn a_liver_lesion_keeps_the_host_noise_and_has_partial_volume_edges() {
    let series = cache("totalsegmentator/example_ct_dicom");
    let mut ct = medseg::io::read_volume(&series, None).unwrap();
    let before = ct.voxels.clone();
    // The liver's centre from TotalSegmentator's map, reordered onto the series grid.
    let seg = medseg::io::read_nifti(&cache("totalsegmentator/example_seg_dicom.nii.gz")).unwrap();
    let liver = medseg::transforms::spatial::resample_labels_onto(
        seg.voxels
            .index_axis(Axis(0), 0)
            .mapv(|v| (v == 5.0) as u8)
            .view(),
        &seg.geometry,
        &ct.geometry,
    );
    let mut sum = [0.0f64; 3];
    let mut n = 0.0;
    for ((k, j, i), l) in liver.indexed_iter() {
        if *l == 1 {
            sum[0] += i as f64;
            sum[1] += j as f64;
            sum[2] += k as f64;
            n += 1.0;
        }
    }
    let centre = ct.geometry.voxel_to_world(sum.map(|s| s / n));
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let shape = LesionShape::random(centre, 20.0, 0, &mut rng);
    let (fraction, record) = insert(&mut ct, &shape, -40.0).expect("visible lesion");
    assert!(record.contrast_to_noise >= 1.0, "{record:?}");
    // Values stay integers within the host's range.
    let lo = before.iter().copied().fold(f32::INFINITY, f32::min) as f64;
    let hi = before.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    assert!(ct
        .voxels
        .iter()
        .all(|v| v.fract() == 0.0 && (*v as f64) >= lo && (*v as f64) <= hi));
    // Edges are partial, the label is the α ≥ 0.5 core.
    let partial = fraction
        .alpha
        .iter()
        .filter(|a| **a > 0.05 && **a < 0.95)
        .count();
    assert!(partial > 100, "{partial}");
    // Noise under the lesion core matches the same voxels before insertion (contrast is added,
    // never pasted): σ from neighbour differences within 25 %.
    let (dk, dj, di) = fraction.alpha.dim();
    let core = [
        fraction.origin[0] + dk / 3,
        fraction.origin[1] + dj / 3,
        fraction.origin[2] + di / 3,
    ];
    let size = [dk / 3, dj / 3, di / 3];
    let after = local_noise(&ct.voxels.index_axis(Axis(0), 0), core, size);
    let host = local_noise(&before.index_axis(Axis(0), 0), core, size);
    eprintln!(
        "noise σ under the lesion: host {host:.1} HU, after insertion {after:.1} HU; {record:?}"
    );
    assert!(
        host > 1.0 && (after / host - 1.0).abs() < 0.25,
        "host {host}, after {after}"
    );
    // The lesion darkened the liver by about Δ in its core.
    let mean = |v: &ndarray::Array4<f32>| {
        let c = v.index_axis(Axis(0), 0);
        let region = c.slice(ndarray::s![
            core[0]..core[0] + size[0],
            core[1]..core[1] + size[1],
            core[2]..core[2] + size[2]
        ]);
        region.iter().map(|x| *x as f64).sum::<f64>() / region.len() as f64
    };
    let change = mean(&ct.voxels) - mean(&before);
    assert!((-48.0..-30.0).contains(&change), "{change}");
}
