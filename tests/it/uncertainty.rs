//! Issue 16 with the briefly trained liver model of `segment.rs`: uncertainty and attention maps
//! on the scan's exact grid, per-lesion uncertainty in the table ordered by confidence, the
//! temperature fitted at the end of training and applied (or overridden) by `segment`, and the
//! calibration `medseg evaluate` reports, checked against an independent computation; the
//! findings' operating point chosen on validation and applied by `segment`.

use std::path::Path;
use std::process::Command;

use crate::common::{affine_diff, bin, cache};
use crate::segment::{model, segment};

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Binary entropy in bits.
fn entropy(p: f64) -> f64 {
    let h = |x: f64| if x > 0.0 { -x * x.log2() } else { 0.0 };
    h(p) + h(1.0 - p)
}

#[test]
fn uncertainty_and_attention_maps_lie_on_the_scan_grid() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("out");
    let nifti = cache("totalsegmentator/example_ct_sm.nii.gz");
    // Every map, plus `extra`.
    let run = |extra: &[&str]| {
        let mut args = vec![
            nifti.to_str().unwrap(),
            "--output",
            out_dir.to_str().unwrap(),
            "--uncertainty",
            "--attention",
            "--overlay",
            "--save-probabilities",
        ];
        args.extend_from_slice(extra);
        segment(&args)
    };
    ok(&run(&["--set=segment.min_lesion_mm3=50"]));
    let scan = medseg::io::read_volume(&nifti, None).unwrap();
    let read = |suffix: &str| {
        medseg::io::read_nifti(&out_dir.join(format!("example_ct_sm{suffix}.nii.gz"))).unwrap()
    };
    let (uncertainty, attention, probs) = (
        read("_uncertainty"),
        read("_attention"),
        read("_probabilities"),
    );
    for map in [&uncertainty, &attention, &probs] {
        assert_eq!(map.geometry.dims, scan.geometry.dims);
        assert!(affine_diff(&map.geometry.affine, &scan.geometry.affine) < 1e-5);
    }
    // Two volumes: the entropy of the mean foreground probability (the probability map), then
    // the variance across the 4 mirrored passes (at most 1/4 for values in [0, 1]).
    assert_eq!(uncertainty.voxels.dim().0, 2);
    let h = uncertainty.voxels.index_axis(ndarray::Axis(0), 0);
    let var = uncertainty.voxels.index_axis(ndarray::Axis(0), 1);
    for (&hv, &p) in h.iter().zip(probs.voxels.iter()) {
        assert!(
            (hv as f64 - entropy(p as f64)).abs() < 1e-4,
            "{hv} vs H({p})"
        );
    }
    assert!(var.iter().all(|v| (0.0..=0.2501).contains(v)));
    assert!(
        var.iter().any(|v| *v > 0.0),
        "mirrored passes never disagree"
    );
    // The attention map is scaled to a maximum of 1 and is 0 outside the windows with findings.
    let peak = attention.voxels.iter().copied().fold(0.0f32, f32::max);
    // (Resampled linearly onto the scan's grid, so its peak may fall between grid voxels.)
    assert!(peak > 0.8 && peak <= 1.0001, "{peak}");
    assert!(attention.voxels.iter().all(|v| (0.0..=1.0001).contains(v)));

    // Lesion rows: numbered by decreasing confidence, with the three uncertainty columns.
    let table = json(&out_dir.join("example_ct_sm_lesions.json"));
    let rows = table["lesions"].as_array().unwrap();
    assert!(!rows.is_empty());
    let mut last = f64::INFINITY;
    for (n, row) in rows.iter().enumerate() {
        assert_eq!(row["id"].as_u64().unwrap() as usize, n + 1);
        let c = row["confidence"].as_f64().unwrap();
        assert!(c <= last);
        last = c;
        let agreement = row["detection_agreement"].as_f64().unwrap();
        // Whole members of 4: the lesion's own class map is one of them, so at least one.
        assert!((agreement * 4.0 - (agreement * 4.0).round()).abs() < 1e-9 && agreement >= 0.25);
        assert!((0.0..=1.0).contains(&row["mean_entropy"].as_f64().unwrap()));
        assert!((0.0..=0.5).contains(&row["probability_std"].as_f64().unwrap()));
    }
    let csv = std::fs::read_to_string(out_dir.join("example_ct_sm_lesions.csv")).unwrap();
    assert!(csv
        .lines()
        .next()
        .unwrap()
        .ends_with("mean_entropy,detection_agreement,probability_std"));
    assert!(out_dir.join("example_ct_sm_overlay.png").is_file());
    // The maps are sidecars: a resumed batch with the same flags skips the finished case, and
    // its review page shows it from the files on disk.
    ok(&run(&["--skip-existing", "--review"]));
    assert_eq!(
        crate::segment::summary_in(&out_dir)["skipped"].as_u64(),
        Some(1)
    );
    let review = out_dir.join("review");
    assert!(std::fs::read_to_string(review.join("index.html"))
        .unwrap()
        .contains(">example_ct_sm</a>"));
    let volumes = crate::review::case_volumes(
        &std::fs::read_to_string(review.join("cases/0001.js")).unwrap(),
    );
    let roles: Vec<&str> = volumes.iter().map(|v| v.0.as_str()).collect();
    assert_eq!(
        roles,
        [
            "scan",
            "prediction",
            "probabilities",
            "uncertainty",
            "attention"
        ]
    );
    // The input as it is (one ordinary gzip member); the mask, blocked gzip, as one member.
    assert_eq!(volumes[0].1, std::fs::read(&nifti).unwrap());
    assert_eq!(
        crate::review::one_member(&volumes[1].1),
        medseg::io::gzip::decompress(&std::fs::read(out_dir.join("example_ct_sm.nii.gz")).unwrap())
            .unwrap()
    );
    // One row per lesion, in the table's order, at its centroid.
    let page = std::fs::read_to_string(review.join("cases/0001.html")).unwrap();
    assert_eq!(page.matches("<tr class=\"lesion").count(), rows.len());
    let first: Vec<f64> = page
        .split("data-mm=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .split(',')
        .map(|v| v.parse().unwrap())
        .collect();
    for (a, v) in first.iter().enumerate() {
        assert!((v - rows[0]["centroid_mm"][a].as_f64().unwrap()).abs() < 1e-9);
    }
}

/// ECE of 15 equal-width bins over (probability, foreground) pairs, computed here independently.
fn ece(pairs: impl Iterator<Item = (f64, bool)>) -> (f64, u64) {
    let mut n = [0u64; 15];
    let mut p = [0f64; 15];
    let mut y = [0f64; 15];
    for (prob, fg) in pairs {
        let b = ((prob * 15.0) as usize).min(14);
        n[b] += 1;
        p[b] += prob;
        y[b] += fg as u8 as f64;
    }
    let total: u64 = n.iter().sum();
    let e = (0..15).map(|b| (p[b] - y[b]).abs()).sum::<f64>() / total as f64;
    (e, total)
}

#[test]
fn the_fitted_temperature_is_applied_and_evaluate_reports_calibration() {
    // Training fitted a temperature on the validation voxels; scaling did not worsen their ECE.
    let calibration = json(&model().join("checkpoints/best/calibration.json"));
    let t = calibration["temperature"].as_f64().unwrap();
    assert!(t > 0.05 && t < 20.0, "{t}");
    assert!(calibration["ece_after"].as_f64() <= calibration["ece_before"].as_f64());
    assert!(calibration["nll_after"].as_f64() <= calibration["nll_before"].as_f64());

    let tmp = tempfile::tempdir().unwrap();
    let nifti = cache("totalsegmentator/example_ct_sm.nii.gz");
    let run = |dir: &Path, extra: &[&str]| {
        let mut args = vec![
            nifti.to_str().unwrap(),
            "--output",
            dir.to_str().unwrap(),
            "--save-probabilities",
        ];
        args.extend_from_slice(extra);
        segment(&args)
    };
    let (fitted, plain) = (tmp.path().join("fitted"), tmp.path().join("plain"));
    ok(&run(&fitted, &[]));
    ok(&run(&plain, &["--set", "segment.temperature=1"]));
    let temperature =
        |dir: &Path| json(&dir.join("example_ct_sm_lesions.json"))["temperature"].as_f64();
    assert_eq!(temperature(&fitted), Some(t));
    assert_eq!(temperature(&plain), Some(1.0));
    let bad = run(
        &tmp.path().join("bad"),
        &["--set", "segment.temperature=-2"],
    );
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("temperature"));

    // Evaluate the fitted predictions against their own mask as truth: the ECE must equal an
    // independent count over the written probability map.
    let truth = tmp.path().join("truth");
    std::fs::create_dir_all(&truth).unwrap();
    std::fs::copy(
        fitted.join("example_ct_sm.nii.gz"),
        truth.join("example_ct_sm.nii.gz"),
    )
    .unwrap();
    let report = tmp.path().join("report");
    let out = Command::new(bin())
        .args(["evaluate", "--pred"])
        .arg(&fitted)
        .arg("--truth")
        .arg(&truth)
        .arg("--output")
        .arg(&report)
        .arg("--compare-calibration")
        .arg(&plain)
        .output()
        .unwrap();
    ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("calibration at temperature"), "{stdout}");
    let summary = json(&report.join("summary.json"));
    let c = &summary["calibration"];
    let mask = medseg::io::read_nifti(&truth.join("example_ct_sm.nii.gz")).unwrap();
    let probs = medseg::io::read_nifti(&fitted.join("example_ct_sm_probabilities.nii.gz")).unwrap();
    let (want, voxels) = ece(probs
        .voxels
        .iter()
        .zip(mask.voxels.iter())
        .map(|(&p, &m)| (p as f64, m > 0.0)));
    assert!((c["ece"].as_f64().unwrap() - want).abs() < 1e-9, "{c}");
    let counted: u64 = c["bins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["count"].as_u64().unwrap())
        .sum();
    assert_eq!(counted, voxels);
    assert_eq!(c["temperature"].as_f64(), Some(t));
    assert_eq!(c["baseline"]["temperature"].as_f64(), Some(1.0));
    for key in ["ece_boundary", "brier", "lesion_ece"] {
        assert!(c[key].as_f64().is_some(), "{key}: {c}");
    }
    assert!(report.join("reliability.png").is_file());
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    assert!(md.contains("## Calibration"));
}

/// The liver model's liver made a finding class (no `keep_largest`): finishing its run again fits
/// the operating point on the validation cases, and `segment` with `"fitted"` drops exactly the
/// findings below it; a number does the same, and a cut-off outside [0, 1] is refused.
#[test]
fn the_operating_point_is_chosen_on_validation_and_applied() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    crate::cv::copy_dir(model(), &run);
    let findings = ["--set", "segment.keep_largest=[]"];
    let out = Command::new(bin())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["train", "--resume", run.to_str().unwrap(), "--quiet"])
        .args(findings)
        .output()
        .unwrap();
    ok(&out);
    let log = std::fs::read_to_string(run.join("train.log")).unwrap();
    assert!(
        log.contains("operating point: findings below confidence"),
        "{log}"
    );
    let point = json(&run.join("checkpoints/best/operating_point.json"));
    let cut = point["min_confidence"].as_f64().unwrap();
    let tried = point["tried"].as_array().unwrap();
    assert_eq!(
        tried.len(),
        medseg::infer::operating_point::CANDIDATES.len()
    );
    assert!(point["truth_lesions"].as_u64().unwrap() > 0);
    // The chosen cut-off has the best F1 of those tried, and no cut-off is the first.
    let f1 = |d: &serde_json::Value| d["f1"].as_f64().unwrap();
    let chosen = tried.iter().find(|d| d["min_confidence"] == cut).unwrap();
    assert!(tried.iter().all(|d| f1(d) <= f1(chosen)));
    assert_eq!(tried[0]["min_confidence"].as_f64(), Some(0.0));

    let nifti = cache("totalsegmentator/example_ct_sm.nii.gz");
    let segment = |dir: &Path, min_confidence: &str| {
        Command::new(bin())
            .args(["segment", "--model", run.to_str().unwrap()])
            .arg(&nifti)
            .args(["--output", dir.to_str().unwrap()])
            .args(findings)
            .args(["--set", &format!("segment.min_confidence={min_confidence}")])
            .output()
            .unwrap()
    };
    let confidences = |dir: &Path| -> Vec<f64> {
        json(&dir.join("example_ct_sm_lesions.json"))["lesions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["confidence"].as_f64().unwrap())
            .collect()
    };
    let all = tmp.path().join("all");
    ok(&segment(&all, "0"));
    let every = confidences(&all);
    assert!(!every.is_empty());
    for (dir, setting, cut) in [
        (tmp.path().join("fitted"), "\"fitted\"".to_string(), cut),
        (tmp.path().join("half"), "0.5".to_string(), 0.5),
        (tmp.path().join("high"), "0.999".to_string(), 0.999),
    ] {
        let out = segment(&dir, &setting);
        ok(&out);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if cut > 0.0 {
            assert!(stderr.contains("findings below confidence"), "{stderr}");
        }
        // Exactly the findings at or above the cut-off remain.
        let kept = confidences(&dir);
        let mut want: Vec<f64> = every.iter().copied().filter(|c| *c >= cut).collect();
        let mut got = kept.clone();
        want.sort_by(f64::total_cmp);
        got.sort_by(f64::total_cmp);
        assert_eq!(got, want, "{setting}");
        let mask = medseg::io::read_nifti(&dir.join("example_ct_sm.nii.gz")).unwrap();
        let voxels: usize = json(&dir.join("example_ct_sm_lesions.json"))["lesions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["voxels"].as_u64().unwrap() as usize)
            .sum();
        assert_eq!(mask.voxels.iter().filter(|v| **v > 0.0).count(), voxels);
    }
    let bad = segment(&tmp.path().join("bad"), "1.5");
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("min_confidence"));
}
