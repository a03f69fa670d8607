//! Every NIfTI file of DATA.md loads with the shape, affine and values nibabel gives
//! (`tests/data/nifti_reference.json`, made by `scripts/reference/nibabel_reference.py`).

use medseg::io::read_nifti;

use crate::common::{affine_diff, cache, json_affine, reference, sum};

#[test]
fn every_reference_file_matches_nibabel() {
    let refs = reference("nifti_reference.json");
    let mut checked = 0;
    for (rel, expected) in refs.as_object().unwrap() {
        if rel.starts_with('_') {
            continue;
        }
        let v = read_nifti(&cache(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
        // Shape: nibabel's full shape; medseg reports spatial then channels (all axes past 3).
        let shape: Vec<usize> = expected["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        let spatial: Vec<usize> = (0..3).map(|a| shape.get(a).copied().unwrap_or(1)).collect();
        assert_eq!(v.geometry.dims.to_vec(), spatial, "{rel}: spatial shape");
        assert_eq!(
            v.channels(),
            shape.iter().skip(3).product::<usize>().max(1),
            "{rel}: channels"
        );
        assert_eq!(
            v.info.dtype.as_str(),
            expected["datatype"].as_str().unwrap(),
            "{rel}: dtype"
        );
        let aff = json_affine(&expected["affine"]);
        let d = affine_diff(&v.geometry.affine, &aff);
        assert!(d < 1e-5, "{rel}: affine differs from nibabel's by {d}");
        let (lo, hi) = v.value_range().unwrap();
        let (elo, ehi) = (
            expected["min"].as_f64().unwrap(),
            expected["max"].as_f64().unwrap(),
        );
        let tol = |x: f64| 1e-5 * x.abs().max(1.0);
        assert!(
            (lo as f64 - elo).abs() <= tol(elo),
            "{rel}: min {lo} vs {elo}"
        );
        assert!(
            (hi as f64 - ehi).abs() <= tol(ehi),
            "{rel}: max {hi} vs {ehi}"
        );
        let (s, es) = (sum(&v), expected["sum"].as_f64().unwrap());
        assert!(
            (s - es).abs() <= 1e-5 * es.abs().max(1.0),
            "{rel}: sum {s} vs {es}"
        );
        for sample in expected["voxel_sample"].as_array().unwrap() {
            let idx: Vec<usize> = sample["index"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect();
            let t = idx.get(3).copied().unwrap_or(0);
            let value = v.voxels[[t, idx.get(2).copied().unwrap_or(0), idx[1], idx[0]]] as f64;
            let e = sample["value"].as_f64().unwrap();
            assert!(
                (value - e).abs() <= tol(e),
                "{rel}: voxel {idx:?} = {value}, nibabel {e}"
            );
        }
        checked += 1;
    }
    assert!(checked >= 25, "only {checked} reference files checked");
}

#[test]
fn nifti2_header_is_parsed_as_version_2() {
    let h = medseg::io::nifti::read_header(&cache("nibabel/example_nifti2.nii.gz")).unwrap();
    assert_eq!(h.version, 2);
    assert_eq!(h.dims, vec![32, 20, 12, 2]);
}

#[test]
fn scaled_file_applies_slope_and_intercept() {
    // functional.nii stores int16 with scl_slope ≈ 0.0754 and scl_inter ≈ 3100.8.
    let v = read_nifti(&cache("nibabel/functional.nii")).unwrap();
    let fractional = v.voxels.iter().filter(|x| x.fract() != 0.0).count();
    assert!(fractional > 0, "scaled values should not all be integers");
    assert_eq!(v.info.dtype.as_str(), "int16");
}

#[test]
fn big_endian_files_decode() {
    for rel in [
        "nibabel/anatomical.nii",
        "nibabel/reoriented_anat_moved.nii",
    ] {
        let v = read_nifti(&cache(rel)).unwrap();
        let (lo, hi) = v.value_range().unwrap();
        assert!(
            hi > lo && hi < 1e6,
            "{rel}: implausible range {lo}..{hi} (byte order wrong?)"
        );
    }
}
