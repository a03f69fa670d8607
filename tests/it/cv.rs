//! The nnU-Net-style workflow on real scans (TotalSegmentator's two sample CTs, the liver):
//! `medseg plan` from the fingerprint, `train --folds` with out-of-fold predictions and the
//! postprocessing chosen on them, fold ensembles in `segment`, and fine-tuning with `--init-from`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common::{bin, cache};

const CONFIG: &str = "configs/liver-ct-2d.toml";
const BURN_OPS: &str = "model.kernels=\"burn\"";
/// Runs that only need to start: no validation case, so no validation and no temperature fit.
const NO_VALIDATION: &str = "data.validation_cases=[]";
/// The settings of a run that only needs to start, on burn's own ops.
const START_ONLY: [&str; 6] = [
    "--set",
    NO_VALIDATION,
    "--set",
    "data.validation_fraction=0.0",
    "--set",
    BURN_OPS,
];

fn medseg(args: &[&str]) -> Output {
    Command::new(bin())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The foreground probability map a `segment --save-probabilities` wrote for `example_ct_sm`.
fn probabilities(dir: &Path) -> Vec<f32> {
    let v = medseg::io::read_nifti(&dir.join("example_ct_sm_probabilities.nii.gz")).unwrap();
    v.voxels.iter().copied().collect()
}

fn segment(model: &Path, out: &Path) -> String {
    // TotalSegmentator's smaller sample CT: four segmentations of it stay quick.
    let scan = root().join("datasets/cache/totalsegmentator/example_ct_sm.nii.gz");
    ok(&medseg(&[
        "segment",
        "--model",
        model.to_str().unwrap(),
        scan.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--save-probabilities",
    ]))
}

pub(crate) fn copy_dir(from: &Path, to: &Path) {
    for e in walkdir::WalkDir::new(from) {
        let e = e.unwrap();
        let target = to.join(e.path().strip_prefix(from).unwrap());
        if e.file_type().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// Two folds of one epoch: disjoint validation cases covering the dataset, out-of-fold masks on
/// each case's own grid, postprocessing chosen and stored in the parent, a resumed rerun that
/// redoes nothing; then the ensemble: its probabilities are the mean of the two folds' (the
/// two-pass mean), and an ensemble of two copies of one checkpoint equals that checkpoint alone.
/// Last, fine-tuning from a fold into a model of three classes, and a refusal when nothing fits.
#[test]
fn folds_out_of_fold_predictions_ensembles_and_fine_tuning() {
    cache("totalsegmentator/example_ct_dicom");
    let tmp = tempfile::tempdir().unwrap();
    let cv = tmp.path().join("cv");
    let dir = format!("output.dir={:?}", cv.display().to_string());
    // burn's own ops: this test binary is a debug build, and they are optimised in it (medseg's
    // kernels are not; they have their own tests).
    let args = [
        "train",
        "--config",
        CONFIG,
        "--folds",
        "2",
        "--set",
        "train.epochs=1",
        "--set",
        "train.steps_per_epoch=3",
        "--set",
        &dir,
        "--set",
        BURN_OPS,
        // Each fold still fits its temperature on its validation case; a validation pass more
        // would only slow the test.
        "--set",
        "validate.every=0",
        "--quiet",
    ];
    let said = ok(&medseg(&args));
    assert!(
        said.contains("postprocessing chosen on 2 out-of-fold cases"),
        "{said}"
    );

    let split = |k: usize| -> serde_json::Value {
        let text = std::fs::read(cv.join(format!("fold_{k}/split.json"))).unwrap();
        serde_json::from_slice(&text).unwrap()
    };
    let mut validated: Vec<String> = (0..2)
        .flat_map(|k| {
            let s = split(k);
            let v: Vec<String> = serde_json::from_value(s["validation"].clone()).unwrap();
            let t: Vec<String> = serde_json::from_value(s["train"].clone()).unwrap();
            assert!(
                v.iter().all(|c| !t.contains(c)),
                "fold {k} trains on its validation case"
            );
            v
        })
        .collect();
    validated.sort();
    assert_eq!(validated, ["abdomen_ct", "series_ct"]);

    // Out-of-fold masks lie on the grids of their cases' scans.
    let scans = root().join("datasets/cache/totalsegmentator");
    for (case, scan) in [
        ("abdomen_ct", "example_ct.nii.gz"),
        ("series_ct", "example_ct_dicom"),
    ] {
        let mask = medseg::io::read_nifti(&cv.join(format!("oof/{case}.nii.gz"))).unwrap();
        let scan = medseg::io::read_volume(&scans.join(scan), None).unwrap();
        assert_eq!(mask.geometry.dims, scan.geometry.dims, "{case}");
        let diff = mask.geometry.max_affine_difference(&scan.geometry).unwrap();
        assert!(diff < 1e-4, "{case}: affine differs by {diff} mm");
        assert!(cv
            .join(format!("oof/{case}_probabilities.nii.gz"))
            .is_file());
    }
    let chosen: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cv.join("postprocessing.json")).unwrap()).unwrap();
    let parent = std::fs::read_to_string(cv.join("config.toml")).unwrap();
    let min = chosen["chosen"]["min_lesion_mm3"].as_f64().unwrap();
    assert!(
        parent.contains(&format!("min_lesion_mm3 = {min:?}")),
        "{min}: {parent}"
    );
    assert_eq!(
        chosen["classes"][0]["objective"], "dice",
        "the liver is an organ"
    );

    // A rerun resumes: both folds finished, both out-of-fold cases already written.
    let again = ok(&medseg(&args));
    assert!(again.contains("resumed after epoch 1"), "{again}");
    assert!(
        again.contains("0 out-of-fold case(s) segmented, 1 already done"),
        "{again}"
    );
    let usage = medseg(&[
        "train", "--config", CONFIG, "--folds", "2", "--fold", "2", "--set", &dir,
    ]);
    assert_eq!(usage.status.code(), Some(2));

    // The ensemble's probabilities are the mean of its members'.
    let (e, a, b) = (
        tmp.path().join("e"),
        tmp.path().join("a"),
        tmp.path().join("b"),
    );
    let said = segment(&cv, &e);
    assert!(
        said.contains("ensemble of 2 folds (fold_0, fold_1)"),
        "{said}"
    );
    segment(&cv.join("fold_0"), &a);
    segment(&cv.join("fold_1"), &b);
    let (pe, pa, pb) = (probabilities(&e), probabilities(&a), probabilities(&b));
    let worst = pe
        .iter()
        .zip(pa.iter().zip(&pb))
        .map(|(e, (a, b))| (e - (a + b) / 2.0).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-5, "ensemble vs two-pass mean: {worst}");
    assert!(
        pa.iter().zip(&pb).any(|(a, b)| (a - b).abs() > 1e-3),
        "the folds differ"
    );
    let twins = tmp.path().join("twins");
    std::fs::create_dir_all(&twins).unwrap();
    std::fs::copy(cv.join("config.toml"), twins.join("config.toml")).unwrap();
    copy_dir(&cv.join("fold_0"), &twins.join("fold_0"));
    copy_dir(&cv.join("fold_0"), &twins.join("fold_1"));
    let t = tmp.path().join("t");
    segment(&twins, &t);
    let worst = probabilities(&t)
        .iter()
        .zip(&pa)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst <= 1e-6,
        "two copies of one checkpoint vs the checkpoint: {worst}"
    );
    // With a finding class (the liver's DICOM category made a morphologically abnormal
    // structure's), a fold ensemble matches its threshold per scan
    // (`segment.ensemble_threshold = "matched"`). Two copies of one checkpoint agree, so it stays
    // at the start, the searched `segment.threshold`: the same mask, and the summary records it.
    let renamed = tmp.path().join("renamed");
    copy_dir(&twins, &renamed);
    let parent = std::fs::read_to_string(twins.join("config.toml")).unwrap();
    assert!(parent.contains("\"123037004\""), "{parent}");
    let config = parent.replace("\"123037004\"", "\"49755003\"");
    std::fs::write(renamed.join("config.toml"), config).unwrap();
    let r = tmp.path().join("r");
    let said = segment(&renamed, &r);
    let mask = |dir: &Path| medseg::io::read_nifti(&dir.join("example_ct_sm.nii.gz")).unwrap();
    assert_eq!(mask(&r).voxels, mask(&t).voxels);
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(r.join("batch_summary.json")).unwrap()).unwrap();
    let start = medseg::config::RunConfig::from_toml(&parent, "parent")
        .unwrap()
        .segment
        .threshold;
    assert_eq!(summary["cases"][0]["threshold"], start, "{summary}");
    assert!(
        said.contains(&format!("at the matched threshold {start:.2}")),
        "{said}"
    );
    // An organ is never matched: no threshold recorded.
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(t.join("batch_summary.json")).unwrap()).unwrap();
    assert!(summary["cases"][0].get("threshold").is_none(), "{summary}");

    // Fine-tuning: three classes (liver, spleen) from a two-class fold; the head starts afresh.
    let tuned = tmp.path().join("tuned");
    let tuned_dir = format!("output.dir={:?}", tuned.display().to_string());
    let fold_0 = cv.join("fold_0");
    let tune = [
        "train",
        "--config",
        CONFIG,
        "--init-from",
        fold_0.to_str().unwrap(),
        "--set",
        "data.labels=[\"background\", \"liver\", \"spleen\"]",
        "--set",
        "data.label_values=[0, 5, 1]",
        "--set",
        "train.epochs=1",
        "--set",
        "train.steps_per_epoch=2",
        "--set",
        &tuned_dir,
        "--set",
        "train.freeze_encoder_epochs=1",
    ];
    let said = ok(&medseg(&[&tune[..], &START_ONLY].concat()));
    let log = std::fs::read_to_string(tuned.join("train.log")).unwrap();
    assert!(log.contains("initialised from"), "{said}\n{log}");
    assert!(log.contains("re-initialised decoder."), "{log}");
    assert!(
        !log.contains("ignored "),
        "two-class and three-class share every name: {log}"
    );
    // A source of other widths fits (almost) nothing: refused, naming it.
    let other = tmp.path().join("other");
    let other_dir = format!("output.dir={:?}", other.display().to_string());
    let narrow = [
        "train",
        "--config",
        CONFIG,
        "--set",
        "model.stem_widths=[4, 12, 20]",
        "--set",
        "model.embed_dim=40",
        "--set",
        "train.epochs=1",
        "--set",
        "train.steps_per_epoch=1",
        "--set",
        &other_dir,
    ];
    ok(&medseg(&[&narrow[..], &START_ONLY].concat()));
    let refused = medseg(&[
        "train",
        "--config",
        CONFIG,
        "--init-from",
        other.to_str().unwrap(),
        "--set",
        "train.epochs=1",
        "--set",
        &format!(
            "output.dir={:?}",
            tmp.path().join("x").display().to_string()
        ),
    ]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("too little of it matches"), "{err}");
}

/// `medseg plan` on the liver dataset: a commented config with a reason for each choice that
/// `medseg train` reads as is and trains.
#[test]
fn plan_writes_a_commented_config_that_trains() {
    cache("totalsegmentator/example_ct_dicom");
    let tmp = tempfile::tempdir().unwrap();
    let plan = tmp.path().join("plan.toml");
    let said = ok(&medseg(&[
        "plan",
        "--data",
        "datasets/totalseg-liver.csv",
        "--budget",
        "40s",
        "--folds",
        "2",
        "--set",
        "data.channels=[\"CT\"]",
        "--set",
        "data.labels=[\"background\", \"liver\"]",
        "--set",
        "data.label_values=[0, 5]",
        // burn's own ops: this test binary is a debug build, and they are optimised in it.
        "--set",
        "model.kernels=\"burn\"",
        "--output",
        plan.to_str().unwrap(),
        "--explain",
        "--quiet",
    ]));
    assert!(said.contains("plan written to"), "{said}");
    assert!(
        said.contains("preprocess.spacing"),
        "--explain lists the decisions: {said}"
    );
    let text = std::fs::read_to_string(&plan).unwrap();
    for reason in ["nnU-Net", "measured", "# medseg plan for"] {
        assert!(text.contains(reason), "{reason}: {text}");
    }
    // CT: clipped to the foreground's percentiles and z-scored with its numbers.
    assert!(text.contains("scheme = \"ct\""), "{text}");
    let run = tmp.path().join("run");
    ok(&medseg(&[
        "train",
        "--config",
        plan.to_str().unwrap(),
        "--set",
        "train.epochs=1",
        "--set",
        "train.steps_per_epoch=2",
        "--set",
        NO_VALIDATION,
        "--set",
        "data.validation_fraction=0.0",
        "--set",
        "data.folds=1",
        "--set",
        &format!("output.dir={:?}", run.display().to_string()),
        "--quiet",
    ]));
    assert!(run.join("checkpoints/last/model.json").is_file());
}
