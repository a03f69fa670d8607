//! The TotalSegmentator CT series assembled by medseg lies on the grid of the label map that
//! TotalSegmentator made from it, and the labels overlay the anatomy.

use medseg::io::{read_nifti, read_volume};

use crate::common::{affine_diff, cache, reference, sum};

#[test]
fn series_lies_on_the_label_grid() {
    let ct = read_volume(&cache("totalsegmentator/example_ct_dicom"), None).unwrap();
    let seg = read_nifti(&cache("totalsegmentator/example_seg_dicom.nii.gz")).unwrap();
    assert_eq!(ct.geometry.dims, [512, 512, 20]);
    assert_eq!(ct.geometry.dims, seg.geometry.dims);
    assert_eq!(ct.geometry.orientation(), "LPS");
    assert_eq!(
        ct.geometry.spacing()[2],
        2.0,
        "slice step comes from positions, not the 3 mm thickness"
    );

    // The label file stores rows bottom-up (j flipped). Map medseg's j onto it exactly:
    // flipping j negates column 1 and moves the origin to the last row.
    let mut flipped = ct.geometry.affine;
    let nj = (ct.geometry.dims[1] - 1) as f64;
    for row in flipped.iter_mut().take(3) {
        row[3] += row[1] * nj;
        row[1] = -row[1];
    }
    let d = affine_diff(&flipped, &seg.geometry.affine);
    assert!(
        d < 1e-3,
        "series affine (j flipped) differs from the label map's by {d} mm"
    );

    // Same expectation from the pydicom-derived affine.
    let refs = reference("dicom_reference.json");
    let expected = crate::common::json_affine(
        &refs["totalsegmentator_series"]["dicom_affine_ras_i_col_j_row_k_slice"],
    );
    assert!(affine_diff(&ct.geometry.affine, &expected) < 1e-6);
    assert_eq!(
        sum(&ct),
        refs["totalsegmentator_series"]["stack"]["sum"]
            .as_f64()
            .unwrap()
    );
}

#[test]
fn labels_overlay_the_anatomy_in_world_space() {
    let ct = read_volume(&cache("totalsegmentator/example_ct_dicom"), None).unwrap();
    let seg = read_nifti(&cache("totalsegmentator/example_seg_dicom.nii.gz")).unwrap();
    // Mean HU of each label, sampling the CT at each label voxel's *world* position.
    let [ni, nj, nk] = seg.geometry.dims;
    let mut stats = std::collections::BTreeMap::<u32, (f64, usize)>::new();
    let mut background = (0.0, 0usize);
    for k in 0..nk {
        for j in 0..nj {
            for i in 0..ni {
                let label = seg.voxels[[0, k, j, i]] as u32;
                let world = seg.geometry.voxel_to_world([i as f64, j as f64, k as f64]);
                let v = ct
                    .geometry
                    .world_to_voxel(world)
                    .unwrap()
                    .map(|x| x.round() as usize);
                let hu = ct.voxels[[0, v[2], v[1], v[0]]] as f64;
                let e = if label == 0 {
                    &mut background
                } else {
                    stats.entry(label).or_default()
                };
                e.0 += hu;
                e.1 += 1;
            }
        }
    }
    let mean = |l: u32| stats[&l].0 / stats[&l].1 as f64;
    // TotalSegmentator v2 classes: 5 liver, 1 spleen (contrast-enhanced soft tissue).
    assert!(
        (40.0..=150.0).contains(&mean(5)),
        "liver mean {} HU",
        mean(5)
    );
    assert!(
        (40.0..=150.0).contains(&mean(1)),
        "spleen mean {} HU",
        mean(1)
    );
    // Outside all organs this slab is mostly air and lung.
    let bg = background.0 / background.1 as f64;
    assert!(bg < -500.0, "background mean {bg} HU");
}
