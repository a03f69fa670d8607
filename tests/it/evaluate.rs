//! Evaluation metrics: known answers on analytic shapes (isotropic and anisotropic), agreement
//! with MONAI on real masks (`tests/data/eval_reference.json`), and `medseg evaluate` end to end.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output};

use medseg::eval::metrics::class_metrics;
use medseg::io::{read_nifti, write_nifti};
use medseg::DataType;

use crate::common::{bin, cache, reference};

/// Runs `medseg evaluate` on the given directories.
fn run_evaluate(pred: &Path, truth: &Path, out: &Path, extra: &[&OsStr]) -> Output {
    Command::new(bin())
        .args(["evaluate", "--pred"])
        .arg(pred)
        .arg("--truth")
        .arg(truth)
        .arg("--output")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol
}

/// A `[nk, nj, ni]` mask with the given voxels `(k, j, i)` set.
fn points(dims: [usize; 3], set: &[[usize; 3]]) -> Vec<bool> {
    let mut m = vec![false; dims.iter().product()];
    for p in set {
        m[(p[0] * dims[1] + p[1]) * dims[2] + p[2]] = true;
    }
    m
}

fn boxed(dims: [usize; 3], lo: [usize; 3], hi: [usize; 3]) -> Vec<bool> {
    let mut m = vec![false; dims.iter().product()];
    for k in lo[0]..hi[0] {
        for j in lo[1]..hi[1] {
            for i in lo[2]..hi[2] {
                m[(k * dims[1] + j) * dims[2] + i] = true;
            }
        }
    }
    m
}

#[test]
fn single_voxels_give_their_distance_in_mm() {
    let dims = [8, 8, 8];
    let spacing = [3.0, 2.0, 0.5]; // (k, j, i) mm
    let t = points(dims, &[[1, 1, 1]]);
    let p = points(dims, &[[3, 2, 5]]);
    // |(2·3, 1·2, 4·0.5)| = sqrt(36 + 4 + 4)
    let d = 44f64.sqrt();
    let m = class_metrics(&t, &p, dims, spacing, 2.0);
    assert_eq!(m.dice, 0.0);
    assert!(
        close(m.hd95_mm, d, 1e-12) && close(m.assd_mm, d, 1e-12),
        "{m:?}"
    );
    assert_eq!(m.nsd, 0.0);
    let m = class_metrics(&t, &p, dims, spacing, 7.0);
    assert_eq!(m.nsd, 1.0);
    assert_eq!(m.truth_mm3, 3.0);
}

#[test]
fn two_to_one_voxels_interpolate_the_95th_percentile() {
    let dims = [1, 1, 12];
    let spacing = [1.0, 1.0, 2.0];
    // truth at i = 0 and i = 10, prediction at i = 4: truth→pred 8 and 12 mm, pred→truth 8 mm.
    let t = points(dims, &[[0, 0, 0], [0, 0, 10]]);
    let p = points(dims, &[[0, 0, 4]]);
    let m = class_metrics(&t, &p, dims, spacing, 1.0);
    // NumPy percentile of [8, 12] at 95 = 8 + 0.95·4 = 11.8
    assert!(close(m.hd95_mm, 11.8, 1e-12), "{m:?}");
    assert!(close(m.assd_mm, (8.0 + 8.0 + 12.0) / 3.0, 1e-12), "{m:?}");
}

#[test]
fn shifted_boxes_have_the_hand_computed_overlap_and_distances() {
    let dims = [12, 12, 20];
    let spacing = [2.5, 1.0, 0.8];
    // 4 × 4 × 10 box; the prediction shifted by 3 voxels along i.
    let t = boxed(dims, [4, 4, 5], [8, 8, 15]);
    let p = boxed(dims, [4, 4, 8], [8, 8, 18]);
    let m = class_metrics(&t, &p, dims, spacing, 0.5);
    assert!(close(m.dice, 7.0 / 10.0, 1e-12), "{m:?}"); // overlap 7 of 10 columns
    assert!(close(m.iou, 7.0 / 13.0, 1e-12));
    assert!(close(m.precision, 0.7, 1e-12) && close(m.recall, 0.7, 1e-12));
    assert!(close(m.truth_mm3, 160.0 * 2.0, 1e-9)); // 160 voxels of 2 mm³
    assert_eq!(m.relative_volume_difference, 0.0);
    // Every surface voxel of one box is within 3 voxels (2.4 mm) along i of the other's surface,
    // and the end faces are exactly that far: the largest distance is 2.4 mm.
    assert!(m.hd95_mm <= 2.4 + 1e-12 && m.hd95_mm > 0.0, "{m:?}");
    // Identical masks: perfect.
    let m = class_metrics(&t, &t, dims, spacing, 0.0);
    assert_eq!((m.dice, m.hd95_mm, m.assd_mm, m.nsd), (1.0, 0.0, 0.0, 1.0));
}

#[test]
fn empty_masks_follow_the_documented_conventions() {
    let dims = [4, 4, 4];
    let empty = vec![false; 64];
    let one = points(dims, &[[1, 1, 1]]);
    let both = class_metrics(&empty, &empty, dims, [1.0; 3], 1.0);
    assert_eq!((both.dice, both.iou), (1.0, 1.0));
    assert!(both.hd95_mm.is_nan() && both.nsd.is_nan());
    let missed = class_metrics(&one, &empty, dims, [1.0; 3], 1.0);
    assert_eq!((missed.dice, missed.recall, missed.nsd), (0.0, 0.0, 0.0));
    assert!(missed.hd95_mm.is_nan() && missed.assd_mm.is_nan());
    let spurious = class_metrics(&empty, &one, dims, [1.0; 3], 1.0);
    assert_eq!(spurious.precision, 0.0);
    assert!(spurious.relative_volume_difference.is_nan());
}

fn mask(rel: &str, f: impl Fn(f32) -> bool) -> (Vec<bool>, [usize; 3], [f64; 3]) {
    let v = read_nifti(&cache(rel)).unwrap();
    let g = v.geometry.dims;
    let s = v.geometry.spacing();
    (
        v.voxels.iter().map(|&x| f(x)).collect(),
        [g[2], g[1], g[0]],
        [s[2], s[1], s[0]],
    )
}

#[test]
fn agrees_with_monai_on_real_masks() {
    let refs = reference("eval_reference.json");
    let tau = refs["nsd_tolerance_mm"].as_f64().unwrap();
    type Pair = (&'static str, (Vec<bool>, [usize; 3], [f64; 3]), Vec<bool>);
    let pairs: [Pair; 3] = [
        (
            "itk_brain",
            mask("itk/KmeansTest_T1KmeansPrelimSegmentation.nii.gz", |x| {
                x >= 5.0
            }),
            mask("itk/KmeansTest_T1RawSkullStrip.nii.gz", |x| x >= 5.0).0,
        ),
        (
            "itk_class6",
            mask("itk/KmeansTest_T1KmeansPrelimSegmentation.nii.gz", |x| {
                x == 6.0
            }),
            mask("itk/KmeansTest_T1RawSkullStrip.nii.gz", |x| x == 6.0).0,
        ),
        (
            "ch2_brain",
            mask("mricron/ch2bet.nii.gz", |x| x > 0.0),
            mask("mricron/aal.nii.gz", |x| x > 0.0).0,
        ),
    ];
    for (name, (truth, dims, spacing), pred) in pairs {
        let e = &refs["pairs"][name];
        let m = class_metrics(&truth, &pred, dims, spacing, tau);
        for (key, got) in [
            ("dice", m.dice),
            ("hd95_mm", m.hd95_mm),
            ("assd_mm", m.assd_mm),
            ("nsd", m.nsd),
        ] {
            let want = e[key].as_f64().unwrap();
            // MONAI's values pass through float32; 1e-3 (relative for mm) covers that.
            assert!(
                close(got, want, 1e-3 * want.abs().max(1.0)),
                "{name} {key}: medseg {got}, MONAI {want}"
            );
        }
    }
}

/// ITK's k-means label map and its skull-stripped scan's own classes, each with only classes 5
/// (grey matter) and 6 (white matter) kept: a truth and a prediction that differ as real label
/// maps do.
fn grey_white() -> (medseg::Volume, medseg::Volume) {
    let keep = |rel: &str| {
        let mut v = read_nifti(&cache(rel)).unwrap();
        v.voxels.mapv_inplace(|x| if x >= 5.0 { x } else { 0.0 });
        v
    };
    (
        keep("itk/KmeansTest_T1KmeansPrelimSegmentation.nii.gz"),
        keep("itk/KmeansTest_T1RawSkullStrip.nii.gz"),
    )
}

#[test]
fn evaluate_writes_the_report_and_lists_missing_predictions() {
    let dir = tempfile::tempdir().unwrap();
    let (truth, pred, out) = (
        dir.path().join("truth"),
        dir.path().join("pred"),
        dir.path().join("report"),
    );
    std::fs::create_dir_all(&truth).unwrap();
    std::fs::create_dir_all(&pred).unwrap();
    // Classes 5 and 6 in both label maps; a second case whose prediction is missing.
    let (t, p) = grey_white();
    write_nifti(&t, &truth.join("brain_a.nii.gz"), DataType::Uint8).unwrap();
    write_nifti(&p, &pred.join("brain_a.nii.gz"), DataType::Uint8).unwrap();
    write_nifti(&t, &truth.join("brain_b.nii.gz"), DataType::Uint8).unwrap();
    let config = dir.path().join("eval.toml");
    std::fs::write(&config, "[evaluate]\nlabels = [\"background\", \"a\", \"b\", \"c\", \"d\", \"grey\", \"white\"]\nnsd_tolerance_mm = 2.0\n").unwrap();
    let itk = cache("itk");
    let extra = [
        OsStr::new("--config"),
        config.as_os_str(),
        OsStr::new("--images"),
        itk.as_os_str(),
    ];
    let res = run_evaluate(&pred, &truth, &out, &extra);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    for f in [
        "per_case.csv",
        "per_lesion.csv",
        "summary.json",
        "report.md",
        "dice_per_class.png",
        "froc.png",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(
        summary["missing_predictions"],
        serde_json::json!(["brain_b"])
    );
    assert_eq!(summary["classes"]["6"]["label"], "white");
    // brain_a's class-6 Dice equals the direct computation; brain_b's is 0 (empty prediction).
    let (tm, dims, spacing) = mask("itk/KmeansTest_T1KmeansPrelimSegmentation.nii.gz", |x| {
        x == 6.0
    });
    let direct = class_metrics(
        &tm,
        &mask("itk/KmeansTest_T1RawSkullStrip.nii.gz", |x| x == 6.0).0,
        dims,
        spacing,
        2.0,
    );
    let mean = summary["classes"]["6"]["dice"]["mean"].as_f64().unwrap();
    assert!(
        close(mean, direct.dice / 2.0, 1e-9),
        "{mean} vs {}",
        direct.dice / 2.0
    );
    let lesions = &summary["lesions"]["6"];
    assert!(lesions["truth_lesions"].as_u64().unwrap() >= 2);
    assert!(lesions["froc"]["sensitivity"].as_array().unwrap().len() == 7);
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("brain_b") && md.contains("white"));
    assert!(out.join("worst_cases.png").exists());

    // A prediction on another grid is an error naming the case; the others still get evaluated.
    let mut shifted = p.clone();
    shifted.geometry.affine[0][3] += 5.0;
    write_nifti(&shifted, &pred.join("brain_b.nii.gz"), DataType::Uint8).unwrap();
    let res = run_evaluate(&pred, &truth, &out, &[]);
    assert_eq!(res.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&res.stderr).contains("brain_b"));
    assert!(out.join("summary.json").exists());
}

#[test]
fn froc_uses_the_lesion_table_confidences() {
    let dir = tempfile::tempdir().unwrap();
    let (truth_dir, pred_dir, out) = (
        dir.path().join("t"),
        dir.path().join("p"),
        dir.path().join("o"),
    );
    std::fs::create_dir_all(&truth_dir).unwrap();
    std::fs::create_dir_all(&pred_dir).unwrap();
    // On a real grid (the ITK T1, 2 × 2 × 3 mm): three truth lesions; the prediction finds two
    // of them and adds two false positives. Cubes of 3 voxels at (k, j, i) corners.
    let base = read_nifti(&cache("itk/KmeansTest_T1KmeansPrelimSegmentation.nii.gz")).unwrap();
    let cube = |v: &mut medseg::Volume, k: usize, j: usize, i: usize| {
        v.voxels
            .slice_mut(ndarray::s![0, k..k + 3, j..j + 3, i..i + 3])
            .fill(1.0);
    };
    let mut truth = base.clone();
    truth.voxels.fill(0.0);
    let mut pred = truth.clone();
    for (k, j, i) in [(10, 20, 20), (20, 60, 60), (40, 100, 30)] {
        cube(&mut truth, k, j, i);
    }
    for (k, j, i) in [(10, 20, 20), (20, 60, 60), (30, 30, 100), (50, 10, 10)] {
        cube(&mut pred, k, j, i);
    }
    write_nifti(&truth, &truth_dir.join("c.nii.gz"), DataType::Uint8).unwrap();
    write_nifti(&pred, &pred_dir.join("c.nii.gz"), DataType::Uint8).unwrap();
    // Confidences: TP 0.9, FP 0.8, TP 0.7, FP 0.6 (bounding boxes in (i, j, k), inclusive).
    let row = |k: usize, j: usize, i: usize, c: f64| serde_json::json!({"class": 1, "bbox_voxel": [[i, j, k], [i + 2, j + 2, k + 2]], "confidence": c});
    let table = serde_json::json!({"lesions": [row(10, 20, 20, 0.9), row(30, 30, 100, 0.8), row(20, 60, 60, 0.7), row(50, 10, 10, 0.6)]});
    std::fs::write(pred_dir.join("c_lesions.json"), table.to_string()).unwrap();
    let res = run_evaluate(&pred_dir, &truth_dir, &out, &[]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let l = &s["lesions"]["1"];
    assert_eq!(
        (l["tp"].as_u64(), l["fp"].as_u64(), l["fn"].as_u64()),
        (Some(2), Some(2), Some(1))
    );
    // One scan: sensitivity 1/3 up to 1/2 FP per scan, 2/3 from 1 FP per scan on.
    let third = 1.0 / 3.0;
    let expected = [
        third,
        third,
        third,
        2.0 * third,
        2.0 * third,
        2.0 * third,
        2.0 * third,
    ];
    let got: Vec<f64> = l["froc"]["sensitivity"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    for (g, e) in got.iter().zip(expected) {
        assert!(close(*g, e, 1e-12), "{got:?}");
    }
    assert!(close(
        l["froc"]["average"].as_f64().unwrap(),
        11.0 / 21.0,
        1e-12
    ));
    // Each lesion is 27 voxels of 12 mm³ = 324 mm³, in the 65–524 mm³ bin.
    let bins = l["by_volume"].as_array().unwrap();
    let bin = bins
        .iter()
        .find(|b| b["truth_lesions"].as_u64() == Some(3))
        .unwrap();
    assert_eq!(bin["bin"], "65-524 mm3");
}

#[test]
fn compare_gives_a_paired_interval_and_refuses_a_directory_without_predictions() {
    let dir = tempfile::tempdir().unwrap();
    let [truth, a, b, empty, out] =
        ["truth", "a", "b", "empty", "report"].map(|d| dir.path().join(d));
    for d in [&truth, &a, &b, &empty] {
        std::fs::create_dir_all(d).unwrap();
    }
    // Truth: ITK's k-means grey and white matter; A predicts it exactly, B is the skull-stripped
    // scan's own classes, off by what the two label maps disagree on. Four copies of the case.
    let (t, p) = grey_white();
    for n in 0..4 {
        let name = format!("brain_{n}.nii.gz");
        write_nifti(&t, &truth.join(&name), DataType::Uint8).unwrap();
        write_nifti(&t, &a.join(&name), DataType::Uint8).unwrap();
        write_nifti(&p, &b.join(&name), DataType::Uint8).unwrap();
    }
    let config = dir.path().join("eval.toml");
    std::fs::write(
        &config,
        "[evaluate]\nlabels = [\"background\", \"a\", \"b\", \"c\", \"d\", \"grey\", \"white\"]\nclasses = [6]\nlesion_classes = [6]\n",
    )
    .unwrap();
    let res = run_evaluate(
        &a,
        &truth,
        &out,
        &[
            OsStr::new("--config"),
            config.as_os_str(),
            OsStr::new("--compare"),
            b.as_os_str(),
        ],
    );
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert!(stdout.contains("compared with"), "{stdout}");
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("comparison.json")).unwrap())
            .unwrap();
    assert_eq!(c["cases"], 4);
    let metric = |name: &str| {
        c["metrics"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["class"] == 6 && m["metric"] == name)
            .unwrap_or_else(|| panic!("no {name} in {c}"))
            .clone()
    };
    let dice = metric("dice");
    let (other, dims, spacing) = mask("itk/KmeansTest_T1RawSkullStrip.nii.gz", |x| x == 6.0);
    let direct = class_metrics(
        &mask("itk/KmeansTest_T1KmeansPrelimSegmentation.nii.gz", |x| {
            x == 6.0
        })
        .0,
        &other,
        dims,
        spacing,
        1.0,
    );
    assert!(close(dice["pred"].as_f64().unwrap(), 1.0, 1e-12), "{dice}");
    assert!(
        close(dice["other"].as_f64().unwrap(), direct.dice, 1e-9),
        "{dice}"
    );
    // The same difference on every case: the interval is that difference, and A is better.
    let lo = dice["interval"][0].as_f64().unwrap();
    assert!(close(lo, 1.0 - direct.dice, 1e-9), "{dice}");
    assert_eq!(dice["verdict"], "better");
    // The surface distances too: A is the truth itself, B as measured directly.
    let hd95 = metric("hd95");
    assert_eq!(hd95["pred"], 0.0);
    assert!(
        close(hd95["other"].as_f64().unwrap(), direct.hd95_mm, 1e-9),
        "{hd95}"
    );
    assert_eq!(metric("nsd")["pred"], 1.0);
    assert_eq!(metric("lesion_f1")["pred"], 1.0);
    assert_eq!(metric("fp_per_scan")["pred"], 0.0);
    assert!(std::fs::read_to_string(out.join("comparison.md"))
        .unwrap()
        .contains("| 6 white | Dice |"));

    // Against a directory holding none of the cases: an error naming it, before any work.
    let fresh = dir.path().join("fresh");
    let res = run_evaluate(
        &a,
        &truth,
        &fresh,
        &[OsStr::new("--compare"), empty.as_os_str()],
    );
    assert_eq!(res.status.code(), Some(3), "{res:?}");
    assert!(!fresh.exists());
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(
        stderr.contains("--compare") && stderr.contains("empty"),
        "{stderr}"
    );
}
