//! Written → read back: same affine to 1e-5, identical voxels, for every writable type.

use std::path::Path;

use medseg::io::{read_nifti, read_volume, write_nifti};
use medseg::{DataType, Volume};

use crate::common::{affine_diff, cache};

fn round_trip(v: &Volume, dir: &Path, name: &str, dtype: DataType) -> Volume {
    let out = dir.join(name);
    write_nifti(v, &out, dtype).unwrap();
    let back = read_nifti(&out).unwrap();
    assert_eq!(back.info.dtype, dtype, "{name}");
    assert_eq!(back.geometry.dims, v.geometry.dims, "{name}");
    let d = affine_diff(&back.geometry.affine, &v.geometry.affine);
    assert!(d < 1e-5, "{name}: affine moved by {d}");
    assert_eq!(back.voxels, v.voxels, "{name}: voxels changed");
    back
}

#[test]
fn every_writable_type_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    // int16 CT (stored int32 in the source), oblique-free 3 mm grid.
    let ct = read_nifti(&cache("totalsegmentator/example_ct_sm.nii.gz")).unwrap();
    round_trip(&ct, dir.path(), "ct.nii.gz", DataType::Int16);
    round_trip(&ct, dir.path(), "ct.nii", DataType::Float32);
    // uint8 labels.
    let seg = read_nifti(&cache("totalsegmentator/example_seg.nii.gz")).unwrap();
    round_trip(&seg, dir.path(), "seg.nii.gz", DataType::Uint8);
    round_trip(&seg, dir.path(), "seg16.nii.gz", DataType::Uint16);
    // A sheared sform and a 4D file keep their geometry and channels.
    let sheared = read_nifti(&cache("dipy/S0_10slices.nii.gz")).unwrap();
    round_trip(&sheared, dir.path(), "sheared.nii.gz", DataType::Uint16);
    let four_d = read_nifti(&cache("nibabel/example4d.nii.gz")).unwrap();
    let back = round_trip(&four_d, dir.path(), "4d.nii.gz", DataType::Int16);
    assert_eq!(back.channels(), 2);
}

#[test]
fn written_qform_agrees_with_sform() {
    // Viewers differ in which transform they trust (ITK prefers the qform): both must agree.
    let dir = tempfile::tempdir().unwrap();
    for rel in [
        "nibabel/example4d.nii.gz",
        "itk/KmeansTest_T1UCharRaw.nii.gz",
        "dipy/small_64D.nii",
    ] {
        let v = read_nifti(&cache(rel)).unwrap();
        let out = dir.path().join("x.nii.gz");
        write_nifti(&v, &out, DataType::Float32).unwrap();
        let h = medseg::io::nifti::read_header(&out).unwrap();
        assert_eq!((h.sform_code, h.qform_code), (1, 1));
        // The sform is exact; the qform is the nearest rotation (example4d's sform is slightly
        // non-orthogonal), so they agree to well under a micrometre per voxel step.
        let d = affine_diff(&h.qform_affine(), &h.sform_affine());
        assert!(d < 1e-3, "{rel}: qform and sform differ by {d}");
    }
    // A sheared affine has no qform: it is marked unknown and only the sform carries it.
    let v = read_nifti(&cache("dipy/S0_10slices.nii.gz")).unwrap();
    let out = dir.path().join("sheared.nii.gz");
    write_nifti(&v, &out, DataType::Uint16).unwrap();
    let h = medseg::io::nifti::read_header(&out).unwrap();
    assert_eq!((h.sform_code, h.qform_code), (1, 0));
}

#[test]
fn dicom_series_converts_with_its_geometry() {
    let dir = tempfile::tempdir().unwrap();
    let ct = read_volume(&cache("totalsegmentator/example_ct_dicom"), None).unwrap();
    let back = round_trip(&ct, dir.path(), "series.nii.gz", DataType::Int16);
    assert_eq!(back.geometry.orientation(), "LPS");
}

#[test]
fn values_that_do_not_fit_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ct = read_nifti(&cache("totalsegmentator/example_ct_sm.nii.gz")).unwrap();
    let out = dir.path().join("ct.nii.gz");
    let err = write_nifti(&ct, &out, DataType::Uint8).unwrap_err();
    assert!(err.to_string().contains("ct.nii.gz"), "{err}");
    assert!(!out.exists(), "a failed write must leave no file");
    // And nothing half-written stays behind in the directory.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
