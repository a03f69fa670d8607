//! The real `medseg` binary: output format, exit codes, no patient identifiers by default.

use std::path::Path;
use std::process::Command;

use crate::common::{bin, cache};

#[test]
fn inspect_json_describes_the_series() {
    let out = Command::new(bin())
        .args(["inspect", "--json"])
        .arg(cache("totalsegmentator/example_ct_dicom"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let vol = &v["volumes"][0];
    for key in [
        "path",
        "kind",
        "modality",
        "series_uid",
        "shape",
        "dtype",
        "spacing",
        "affine",
        "min",
        "max",
        "warnings",
    ] {
        assert!(vol.get(key).is_some(), "missing key {key}");
    }
    assert_eq!(vol["kind"], "dicom");
    assert_eq!(vol["modality"], "CT");
    assert_eq!(vol["shape"], serde_json::json!([512, 512, 20]));
    assert_eq!(vol["orientation"], "LPS");
    assert_eq!(vol["min"], -1024.0);
    assert_eq!(vol["affine"][2][2], 2.0);
}

#[test]
fn inspect_hides_patient_identifiers_unless_asked() {
    // CT_small.dcm carries a patient name ("CompressedSamples^CT1") and ID.
    let run = |extra: &[&str]| {
        let out = Command::new(bin())
            .arg("inspect")
            .args(extra)
            .arg(cache("pydicom/CT_small.dcm"))
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    for text in [run(&[]), run(&["--json"])] {
        assert!(
            !text.contains("CompressedSamples"),
            "patient name leaked:\n{text}"
        );
    }
    assert!(run(&["--show-phi"]).contains("CompressedSamples"));
}

#[test]
fn inspect_nifti_reports_nibabel_fields() {
    let out = Command::new(bin())
        .args(["inspect", "--json"])
        .arg(cache("nibabel/example4d.nii.gz"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let vol = &v["volumes"][0];
    assert_eq!(vol["kind"], "nifti");
    assert!(vol["series_uid"].is_null());
    assert_eq!(vol["shape"], serde_json::json!([128, 96, 24, 2]));
    assert_eq!(vol["dtype"], "int16");
}

#[test]
fn convert_writes_and_bad_input_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ct.nii.gz");
    let status = Command::new(bin())
        .arg("convert")
        .arg(cache("totalsegmentator/example_ct_dicom"))
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let v = medseg::io::read_nifti(&out).unwrap();
    assert_eq!(v.info.dtype.as_str(), "int16");

    let missing = dir.path().join("nothing-here");
    let res = Command::new(bin())
        .arg("inspect")
        .arg(&missing)
        .output()
        .unwrap();
    assert_eq!(res.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&res.stderr).contains("nothing-here"));
}

#[test]
fn convert_refuses_a_mixed_directory_and_lists_the_series() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(cache("pydicom/CT_small.dcm"), dir.path().join("a.dcm")).unwrap();
    std::fs::copy(cache("pydicom/MR_small.dcm"), dir.path().join("b.dcm")).unwrap();
    let res = Command::new(bin())
        .arg("convert")
        .arg(dir.path())
        .arg(dir.path().join("x.nii.gz"))
        .output()
        .unwrap();
    assert_eq!(res.status.code(), Some(3));
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        err.contains("--series") && err.contains("CT") && err.contains("MR"),
        "{err}"
    );
}

#[test]
fn model_prints_layers_parameters_and_multiply_adds() {
    let out = Command::new(bin())
        .args([
            "model", "--preset", "small", "--dims", "3", "--size", "64,64,64",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("vit.block.3"), "{text}");
    use medseg::{geometry::PatchSize, model::HybridSegNetConfig};
    let cfg = HybridSegNetConfig::preset(
        medseg::model::ModelPreset::Small,
        PatchSize::new(&[96, 96, 96]).unwrap(),
        2,
    );
    let params: usize =
        medseg::model::summary::summarize(&cfg, PatchSize::new(&[64, 64, 64]).unwrap())
            .iter()
            .map(|r| r.params)
            .sum();
    assert!(text.contains(&format!("({params})")), "{text}");

    let bad = Command::new(bin())
        .args(["model", "--preset", "huge"])
        .output()
        .unwrap();
    // A value outside the preset enum is a usage error, refused by the argument parser.
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown preset"));
}

/// The set-up cannot fail halfway: without cmake on the PATH, `scripts/prereqs.sh` (run first by
/// the quickstart and the test command) stops at once, naming it and the command that installs it.
#[test]
fn a_missing_prerequisite_stops_the_set_up_in_seconds() {
    let bin = tempfile::tempdir().unwrap();
    // Everything the script looks for except cmake, plus what it runs itself.
    for tool in [
        "cargo", "rustc", "c++", "unzip", "dpkg-deb", "bash", "awk", "env",
    ] {
        let Some(found) = std::env::split_paths(&std::env::var_os("PATH").unwrap())
            .map(|dir| dir.join(tool))
            .find(|p| p.is_file())
        else {
            continue;
        };
        std::os::unix::fs::symlink(found, bin.path().join(tool)).unwrap();
    }
    let started = std::time::Instant::now();
    let out = Command::new(bin.path().join("bash"))
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/prereqs.sh"))
        .env("PATH", bin.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("missing: cmake"), "{stderr}");
    assert!(stderr.contains("apt-get install -y cmake"), "{stderr}");
    assert!(started.elapsed().as_secs_f64() < 10.0);
    // On this machine, with the full PATH, nothing is missing.
    let ok = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/prereqs.sh"))
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}
