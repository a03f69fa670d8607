//! `medseg segment` and the predictor with a briefly trained liver model: masks on the exact grid
//! of each scan, lesion tables that match an independent count, batches that survive bad files,
//! shards that partition, and resume after a kill.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::common::{affine_diff, bin, cache};

/// A 2D liver model trained once (4 short epochs) for every test here.
pub(crate) fn model() -> &'static Path {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    RUN.get_or_init(|| {
        // Under cargo's per-target temp dir, not /tmp: nothing is left outside target/.
        let run = Path::new(env!("CARGO_TARGET_TMPDIR")).join("segment-test-model");
        let _ = std::fs::remove_dir_all(&run);
        let out = Command::new(bin())
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["train", "--config", "configs/liver-ct-2d.toml", "--quiet"])
            .args(["--set", "train.epochs=4", "--set", "validate.every=0"])
            .args([
                "--set",
                &format!("output.dir={:?}", run.display().to_string()),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        run
    })
}

/// `batch_summary.json` of an output directory.
pub(crate) fn summary_in(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("batch_summary.json")).unwrap()).unwrap()
}

pub(crate) fn segment(args: &[&str]) -> std::process::Output {
    Command::new(bin())
        .arg("segment")
        .args(["--model", model().to_str().unwrap(), "--quiet"])
        .args(args)
        .output()
        .unwrap()
}

/// The predictor's label map has the DICOM series' shape and affine, also after a NIfTI write and
/// read, and overlaps TotalSegmentator's liver far beyond chance.
#[test]
fn prediction_lands_on_the_source_grid() {
    let series = cache("totalsegmentator/example_ct_dicom");
    let predictor = medseg::infer::predictor::Predictor::load(model(), None, &[]).unwrap();
    let scan = medseg::io::read_volume(&series, None).unwrap();
    let p = predictor.predict(&scan).unwrap();
    let [ni, nj, nk] = scan.geometry.dims;
    assert_eq!(p.labels.dim(), (nk, nj, ni));
    assert_eq!(p.geometry, scan.geometry);
    // The preprocessed grid is the RAS 3 mm grid covering the same field of view.
    assert_eq!(p.grid.axis_codes(), "RAS");
    assert_eq!(p.probabilities.shape()[0], 2);

    let tmp = tempfile::tempdir().unwrap();
    let mask = medseg::Volume::new(
        p.labels.mapv(f32::from).insert_axis(ndarray::Axis(0)),
        p.geometry.clone(),
        scan.info.clone(),
    )
    .unwrap();
    let path = tmp.path().join("mask.nii.gz");
    medseg::io::write_nifti(&mask, &path, medseg::DataType::Uint8).unwrap();
    let back = medseg::io::read_nifti(&path).unwrap();
    assert_eq!(back.geometry.dims, scan.geometry.dims);
    assert!(affine_diff(&back.geometry.affine, &scan.geometry.affine) < 1e-5);

    // Against TotalSegmentator's liver on the same voxels (its map is stored j-flipped).
    let truth =
        medseg::io::read_nifti(&cache("totalsegmentator/example_seg_dicom.nii.gz")).unwrap();
    let truth = medseg::transforms::spatial::resample_labels_onto(
        truth
            .voxels
            .index_axis(ndarray::Axis(0), 0)
            .mapv(|v| (v == 5.0) as u8)
            .view(),
        &truth.geometry,
        &scan.geometry,
    );
    let predicted = p.labels.iter().filter(|l| **l == 1).count();
    let actual = truth.iter().filter(|l| **l == 1).count();
    let both = p
        .labels
        .iter()
        .zip(truth.iter())
        .filter(|(a, b)| **a == 1 && **b == 1)
        .count();
    let dice = 2.0 * both as f64 / (predicted + actual) as f64;
    // Liver is 7 % of this scan: a mask placed at random scores a Dice near 0.07.
    eprintln!("liver Dice against TotalSegmentator on the source grid: {dice:.3}");
    assert!(dice > 0.4, "Dice {dice}");
}

/// 26-connected components of `mask` on `[nk, nj, ni]`, by breadth-first search: voxel lists.
fn components(mask: &[bool], [nk, nj, ni]: [usize; 3]) -> Vec<Vec<[usize; 3]>> {
    let mut seen = vec![false; mask.len()];
    let mut out = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || seen[start] {
            continue;
        }
        seen[start] = true;
        let mut queue = std::collections::VecDeque::from([start]);
        let mut voxels = Vec::new();
        while let Some(at) = queue.pop_front() {
            let (k, j, i) = (at / (nj * ni), at / ni % nj, at % ni);
            voxels.push([i, j, k]);
            for dk in -1..=1isize {
                for dj in -1..=1isize {
                    for di in -1..=1isize {
                        let (kk, jj, ii) = (k as isize + dk, j as isize + dj, i as isize + di);
                        if kk < 0
                            || jj < 0
                            || ii < 0
                            || kk >= nk as isize
                            || jj >= nj as isize
                            || ii >= ni as isize
                        {
                            continue;
                        }
                        let n = (kk as usize * nj + jj as usize) * ni + ii as usize;
                        if mask[n] && !seen[n] {
                            seen[n] = true;
                            queue.push_back(n);
                        }
                    }
                }
            }
        }
        out.push(voxels);
    }
    out
}

/// A NIfTI scan and a DICOM series are segmented next to a corrupt file: both masks lie exactly
/// on their scans' grids (shape, affine to 1e-5), the lesion tables agree with an independent
/// count, and the corrupt file is reported by name with exit status 1.
#[test]
fn batch_writes_aligned_masks_and_lesion_tables_past_a_bad_file() {
    let tmp = tempfile::tempdir().unwrap();
    let corrupt = tmp.path().join("broken.nii.gz");
    let bytes = std::fs::read(cache("totalsegmentator/example_ct_sm.nii.gz")).unwrap();
    std::fs::write(&corrupt, &bytes[..bytes.len() / 3]).unwrap();
    let out_dir = tmp.path().join("out");
    let nifti = cache("totalsegmentator/example_ct_sm.nii.gz");
    let series = cache("totalsegmentator/example_ct_dicom");
    let out = segment(&[
        nifti.to_str().unwrap(),
        corrupt.to_str().unwrap(),
        series.to_str().unwrap(),
        "--output",
        out_dir.to_str().unwrap(),
        "--save-probabilities",
        "--set",
        "segment.min_lesion_mm3=50",
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("broken.nii.gz") && stderr.contains("FAILED"),
        "{stderr}"
    );
    let summary = summary_in(&out_dir);
    assert_eq!(
        (summary["segmented"].as_u64(), summary["failed"].as_u64()),
        (Some(2), Some(1))
    );

    let names: Vec<String> = summary["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["status"] == "segmented")
        .map(|c| c["case"].as_str().unwrap().to_string())
        .collect();
    assert!(names.contains(&"example_ct_sm".to_string()));
    // The series is named by its description and a hash of its UID, never by patient data.
    let dicom_name = names.iter().find(|n| *n != "example_ct_sm").unwrap();
    assert!(dicom_name.starts_with("CT_Body"), "{dicom_name}");

    for (name, source) in [
        ("example_ct_sm".to_string(), nifti.clone()),
        (dicom_name.clone(), series.clone()),
    ] {
        let scan = medseg::io::read_volume(&source, None).unwrap();
        let mask = medseg::io::read_nifti(&out_dir.join(format!("{name}.nii.gz"))).unwrap();
        assert_eq!(mask.geometry.dims, scan.geometry.dims, "{name}");
        assert!(
            affine_diff(&mask.geometry.affine, &scan.geometry.affine) < 1e-5,
            "{name}"
        );
        let probs =
            medseg::io::read_nifti(&out_dir.join(format!("{name}_probabilities.nii.gz"))).unwrap();
        assert_eq!(probs.geometry.dims, scan.geometry.dims);
        assert!(probs.voxels.iter().all(|p| (0.0..=1.0001).contains(p)));

        // Independent lesion count and measurements from the written mask.
        let [ni, nj, nk] = mask.geometry.dims;
        let fg: Vec<bool> = mask.voxels.iter().map(|v| *v == 1.0).collect();
        let mut truth = components(&fg, [nk, nj, ni]);
        truth.sort_by_key(|c| c.iter().map(|v| (v[2], v[1], v[0])).min().unwrap());
        let table: serde_json::Value = serde_json::from_slice(
            &std::fs::read(out_dir.join(format!("{name}_lesions.json"))).unwrap(),
        )
        .unwrap();
        let rows = table["lesions"].as_array().unwrap();
        assert_eq!(rows.len(), truth.len(), "{name}: lesion count");
        assert!(!rows.is_empty());
        let s = mask.geometry.spacing();
        let voxel_mm3 = s[0] * s[1] * s[2];
        // Rows are ordered by confidence: each is paired with its component by its box corner.
        for voxels in &truth {
            let corner: Vec<usize> = (0..3)
                .map(|a| voxels.iter().map(|v| v[a]).min().unwrap())
                .collect();
            let row = rows
                .iter()
                .find(|r| (0..3).all(|a| r["bbox_voxel"][0][a].as_u64() == Some(corner[a] as u64)))
                .expect("a row for every component");
            assert_eq!(row["voxels"].as_u64().unwrap() as usize, voxels.len());
            assert!(row["volume_mm3"].as_f64().unwrap() >= 50.0);
            assert!(
                (row["volume_mm3"].as_f64().unwrap() - voxels.len() as f64 * voxel_mm3).abs()
                    < 1e-6 * voxel_mm3 * voxels.len() as f64
            );
            let mut centroid = [0.0; 3];
            for v in voxels {
                let w = mask
                    .geometry
                    .voxel_to_world([v[0] as f64, v[1] as f64, v[2] as f64]);
                for a in 0..3 {
                    centroid[a] += w[a] / voxels.len() as f64;
                }
            }
            for a in 0..3 {
                assert!(
                    (row["centroid_mm"][a].as_f64().unwrap() - centroid[a]).abs() < 1e-3,
                    "{name} centroid"
                );
                let lo = voxels.iter().map(|v| v[a]).min().unwrap();
                let hi = voxels.iter().map(|v| v[a]).max().unwrap();
                assert_eq!(row["bbox_voxel"][0][a].as_u64().unwrap() as usize, lo);
                assert_eq!(row["bbox_voxel"][1][a].as_u64().unwrap() as usize, hi);
            }
            let p = row["max_probability"].as_f64().unwrap();
            assert!(
                (0.5..=1.0).contains(&p),
                "a lesion's peak probability reaches the threshold: {p}"
            );
            let extent = (0..3)
                .map(|a| {
                    (row["bbox_mm"][1][a].as_f64().unwrap()
                        - row["bbox_mm"][0][a].as_f64().unwrap())
                    .powi(2)
                })
                .sum::<f64>()
                .sqrt();
            assert!(row["diameter_mm"].as_f64().unwrap() <= extent + 1e-6);
        }
        let csv = std::fs::read_to_string(out_dir.join(format!("{name}_lesions.csv"))).unwrap();
        assert_eq!(csv.lines().count(), rows.len() + 1);
        let labels: serde_json::Value = serde_json::from_slice(
            &std::fs::read(out_dir.join(format!("{name}_labels.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(labels["labels"]["1"], "liver");
    }
}

/// Every case of an archive lands in exactly one of N shards.
#[test]
fn shards_partition_the_inputs() {
    let dir = cache("nibabel");
    let list = |shard: Option<&str>| -> Vec<String> {
        // --list stops before the model is loaded: no training needed.
        let mut args = vec![
            "segment",
            "--model",
            "/nonexistent",
            dir.to_str().unwrap(),
            "--output",
            "/nonexistent",
            "--list",
        ];
        if let Some(s) = shard {
            args.extend(["--shard", s]);
        }
        let out = Command::new(bin()).args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.split('\t').next().unwrap().to_string())
            .collect()
    };
    let all: BTreeSet<String> = list(None).into_iter().collect();
    assert!(all.len() >= 5, "{all:?}");
    let mut union = BTreeSet::new();
    let mut total = 0;
    for i in 0..3 {
        let part = list(Some(&format!("{i}/3")));
        total += part.len();
        union.extend(part);
    }
    assert_eq!(total, all.len(), "a case fell in two shards");
    assert_eq!(union, all);
    let out = Command::new(bin())
        .args(["segment", "--model", "/x", dir.to_str().unwrap()])
        .args(["--output", "/x", "--list", "--shard", "3/3"])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
}

/// `n` copies of TotalSegmentator's small CT in `dir`, `scan0.nii.gz`, `scan1.nii.gz`, …
fn scan_copies(dir: &Path, n: usize) -> Vec<PathBuf> {
    let scan = cache("totalsegmentator/example_ct_sm.nii.gz");
    (0..n)
        .map(|i| {
            let p = dir.join(format!("scan{i}.nii.gz"));
            std::fs::copy(&scan, &p).unwrap();
            p
        })
        .collect()
}

/// A batch killed mid-way leaves only whole files; `--skip-existing` finishes it without redoing
/// finished cases.
#[test]
fn killed_batch_resumes_with_skip_existing() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = scan_copies(tmp.path(), 4);
    let out_dir = tmp.path().join("out");
    let mut args: Vec<String> = vec![
        "segment".into(),
        "--model".into(),
        model().display().to_string(),
        "--quiet".into(),
    ];
    args.extend(inputs.iter().map(|p| p.display().to_string()));
    args.extend(["--output".into(), out_dir.display().to_string()]);
    // The batch dies (abort, as a kill) right after its second case, at a named point.
    let died = Command::new(bin())
        .args(&args)
        .env(medseg::io::ABORT_AT_ENV, "segment-case-written:2")
        .output()
        .unwrap();
    assert!(!died.status.success(), "the batch was not stopped");
    let finished: Vec<&PathBuf> = inputs
        .iter()
        .filter(|p| out_dir.join(p.file_name().unwrap()).exists())
        .collect();
    assert_eq!(finished.len(), 2, "the batch stopped after the wrong case");
    for p in &finished {
        // Whole files only: every mask present reads back.
        medseg::io::read_nifti(&out_dir.join(p.file_name().unwrap())).unwrap();
    }
    let mut resume = args.clone();
    resume.push("--skip-existing".into());
    let out = Command::new(bin()).args(&resume).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "segmented {}, skipped {}",
            4 - finished.len(),
            finished.len()
        )),
        "{stdout}"
    );
    for p in &inputs {
        medseg::io::read_nifti(&out_dir.join(p.file_name().unwrap())).unwrap();
    }
}

/// A real CT with one NaN and one +inf voxel is refused with the count (exit 1); with
/// `segment.non_finite = "fill"` it is segmented and the filling is recorded in the summary. A
/// 48³ scan with 40 mm voxels (a header in cm) is refused before any resampling, with the grid
/// and the likely unit error named.
#[test]
fn non_finite_voxels_and_absurd_grids_are_refused_or_filled() {
    use medseg::io::nifti::write_nifti;
    let tmp = tempfile::tempdir().unwrap();
    let mut ct = medseg::io::read_nifti(&cache("totalsegmentator/example_ct.nii.gz")).unwrap();
    ct.voxels[[0, 10, 20, 30]] = f32::NAN;
    ct.voxels[[0, 11, 20, 30]] = f32::INFINITY;
    let poisoned = tmp.path().join("poisoned.nii.gz");
    write_nifti(&ct, &poisoned, medseg::DataType::Float32).unwrap();
    let out = tmp.path().join("refused");
    let o = segment(&[
        poisoned.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let summary = summary_in(&out);
    let reason = summary["cases"][0]["reason"].as_str().unwrap().to_string();
    assert!(reason.contains("1 NaN and 1 infinite"), "{reason}");
    assert!(!out.join("poisoned.nii.gz").exists());

    let out = tmp.path().join("filled");
    let o = segment(&[
        poisoned.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--set",
        "segment.non_finite=fill",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary = summary_in(&out);
    let warning = summary["cases"][0]["warnings"][0]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        warning.contains("replaced by the scan's finite minimum"),
        "{warning}"
    );
    // The fill gives the same liver as the clean scan, not a volume of NaN.
    let filled = medseg::io::read_nifti(&out.join("poisoned.nii.gz")).unwrap();
    assert!(filled.voxels.iter().any(|v| *v > 0.0));

    let mut affine = medseg::geometry::IDENTITY;
    for (a, row) in affine.iter_mut().enumerate().take(3) {
        row[a] = 40.0;
    }
    let huge = medseg::Volume::new(
        ndarray::Array4::from_elem((1, 48, 48, 48), -500.0),
        medseg::Geometry::new([48, 48, 48], affine),
        ct.info.clone(),
    )
    .unwrap();
    let in_cm = tmp.path().join("in_cm.nii.gz");
    write_nifti(&huge, &in_cm, medseg::DataType::Int16).unwrap();
    let out = tmp.path().join("huge");
    let started = std::time::Instant::now();
    let o = segment(&[in_cm.to_str().unwrap(), "--output", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let summary = summary_in(&out);
    let reason = summary["cases"][0]["reason"].as_str().unwrap().to_string();
    assert!(
        reason.contains("segment.max_voxels") && reason.contains("cm instead of mm"),
        "{reason}"
    );
    // Refused before resampling: far quicker than building a 640³ grid.
    eprintln!("refused in {:.1} s", started.elapsed().as_secs_f64());

    // A constant scan is segmented, with a warning that any finding is an artefact.
    let mut flat_affine = medseg::geometry::IDENTITY;
    for (a, row) in flat_affine.iter_mut().enumerate().take(3) {
        row[a] = 3.0;
    }
    let constant = medseg::Volume::new(
        ndarray::Array4::from_elem((1, 20, 40, 40), 40.0),
        medseg::Geometry::new([40, 40, 20], flat_affine),
        ct.info.clone(),
    )
    .unwrap();
    let path = tmp.path().join("constant.nii.gz");
    write_nifti(&constant, &path, medseg::DataType::Int16).unwrap();
    let out = tmp.path().join("constant");
    let o = segment(&[path.to_str().unwrap(), "--output", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary = summary_in(&out);
    let warning = summary["cases"][0]["warnings"][0]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(warning.contains("constant"), "{summary}");
}

/// Exit statuses: 3 when nothing could be done (no model), 2 for a usage error, 1 when cases
/// failed; `--fail-fast` stops at the first failed case.
#[test]
fn exit_statuses_and_fail_fast() {
    let tmp = tempfile::tempdir().unwrap();
    let scan = cache("totalsegmentator/example_ct.nii.gz");
    let no_model = Command::new(bin())
        .args(["segment", "--model"])
        .arg(tmp.path().join("no-such-run"))
        .arg(&scan)
        .args(["--output", tmp.path().join("o").to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(
        no_model.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&no_model.stderr)
    );
    let bad_set = segment(&[
        scan.to_str().unwrap(),
        "--output",
        tmp.path().join("o").to_str().unwrap(),
        "--set",
        "segment.overlap=2",
    ]);
    assert_eq!(bad_set.status.code(), Some(2));
    // A broken file first, then a good scan: with --fail-fast the good one is never started.
    let broken = tmp.path().join("broken.nii.gz");
    std::fs::write(&broken, b"not a scan").unwrap();
    let out = tmp.path().join("fast");
    let o = segment(&[
        broken.to_str().unwrap(),
        scan.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--fail-fast",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let summary = summary_in(&out);
    assert_eq!(summary["cases"].as_array().unwrap().len(), 1, "{summary}");
    assert_eq!(summary["failed"], 1);
    assert!(!out.join("example_ct.nii.gz").exists());
}

/// Shards of one batch write their own summaries; `--merge-summaries` makes one of them, names the
/// shards that are missing (exit 1), and refuses summaries of different splits.
#[test]
fn shard_summaries_merge_into_one() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs: Vec<String> = scan_copies(tmp.path(), 4)
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let out = tmp.path().join("out");
    let out_s = out.to_str().unwrap();
    for shard in ["0/2", "1/2"] {
        let mut args: Vec<&str> = inputs.iter().map(String::as_str).collect();
        args.extend(["--output", out_s, "--shard", shard]);
        let o = segment(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let merge = || {
        Command::new(bin())
            .args(["segment", "--merge-summaries", out_s])
            .output()
            .unwrap()
    };
    let o = merge();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let merged = summary_in(&out);
    assert_eq!(merged["inputs"], 4);
    assert_eq!(merged["segmented"], 4);
    assert_eq!(merged["shards"], 2);
    let names: BTreeSet<&str> = merged["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["case"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 4, "every case once");

    std::fs::remove_file(out.join("batch_summary_shard-1-of-2.json")).unwrap();
    let o = merge();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("missing shards: [1]"));

    std::fs::write(
        out.join("batch_summary_shard-0-of-3.json"),
        r#"{"inputs": 4, "segmented": 0, "skipped": 0, "failed": 0, "cases": []}"#,
    )
    .unwrap();
    let o = merge();
    assert_ne!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stderr).contains("different splits"));
}

/// A corrupt DICOM file in a scanned directory is a failed case with its reason (the soak found it
/// passed over in silence); a non-DICOM file there is not a case.
#[test]
fn corrupt_dicom_in_a_directory_is_a_failed_case() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("archive");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(
        cache("totalsegmentator/example_ct_sm.nii.gz"),
        dir.join("good.nii.gz"),
    )
    .unwrap();
    let mut garbage = vec![0u8; 128];
    garbage.extend(b"DICM");
    garbage.extend((0..500u32).map(|i| (i * 37 % 251) as u8));
    std::fs::write(dir.join("garbage.dcm"), garbage).unwrap();
    std::fs::write(dir.join("README.txt"), "notes").unwrap();
    let found = medseg::io::discover(&dir).unwrap();
    assert_eq!(found.unreadable.len(), 1);
    assert!(found.skipped.iter().any(|(p, _)| p.ends_with("README.txt")));

    let out = tmp.path().join("out");
    let o = segment(&[dir.to_str().unwrap(), "--output", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let summary = summary_in(&out);
    let cases = summary["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 2, "{cases:?}");
    let bad = cases.iter().find(|c| c["case"] == "garbage").unwrap();
    assert_eq!(bad["status"], "failed");
    assert!(bad["reason"]
        .as_str()
        .unwrap()
        .contains("not a readable DICOM file"));
}

/// `--max-memory`: a generous budget keeps `segment.batch_size` windows per pass, a tighter one
/// fewer with the same mask, one the scan cannot fit fails that case naming what it needs, and
/// one below the model's own needs is a usage error. The figures are measured on the model.
#[test]
fn max_memory_fits_the_windows_to_the_budget_or_refuses() {
    use medseg::infer::memory::HEADROOM;
    let tmp = tempfile::tempdir().unwrap();
    let scan = cache("totalsegmentator/example_ct.nii.gz");
    let run = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let mut args = vec![scan.to_str().unwrap(), "--output", out.to_str().unwrap()];
        args.extend(extra);
        let o = segment(&args);
        let summary: Option<serde_json::Value> = std::fs::read(out.join("batch_summary.json"))
            .ok()
            .map(|b| serde_json::from_slice(&b).unwrap());
        (o, summary, out.join("example_ct.nii.gz"))
    };
    let labels = |path: &Path| medseg::io::read_nifti(path).unwrap().voxels;

    let (o, _, free_mask) = run("free", &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (o, summary, wide_mask) = run("wide", &["--max-memory", "16GiB"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let memory = summary.unwrap()["cases"][0]["memory"].clone();
    assert_eq!(memory["windows_per_pass"], 4, "{memory}");
    let peak = memory["predicted_peak_bytes"].as_u64().unwrap();
    let window = memory["bytes_per_window"].as_u64().unwrap();
    let case = memory["case_bytes"].as_u64().unwrap();
    let passes = memory["passes_in_flight"].as_u64().unwrap();
    let pass = memory["bytes_per_pass"].as_u64().unwrap();
    assert!(passes >= 1, "{memory}");
    assert!(peak < 16 << 30 && window > 0 && case > 0, "{memory}");
    assert_eq!(labels(&wide_mask), labels(&free_mask));

    // A budget whose usable part (less the headroom) is `usable`.
    let limit = |usable: u64| usable * HEADROOM / (HEADROOM - 1) + 1;
    // Room for two windows per pass less than the free run's four: each pass still holds one to
    // three when the resident baseline moves between runs by less than two windows per pass in
    // flight either way (about 11 MiB here; one CI run moved it by 6 MiB).
    let tight_limit = limit(peak - 2 * passes * window);
    let tight = tight_limit.to_string();
    let (o, summary, tight_mask) = run("tight", &["--max-memory", &tight]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let memory = summary.unwrap()["cases"][0]["memory"].clone();
    let windows = memory["windows_per_pass"].as_u64().unwrap();
    assert!((1..=3).contains(&windows), "{memory}");
    // The most windows that fit this run's own figures: one more would not.
    let usable = tight_limit - tight_limit / HEADROOM;
    let figure = |key: &str| memory[key].as_u64().unwrap();
    let predicted = figure("predicted_peak_bytes");
    assert!(predicted <= usable, "{memory}");
    assert!(
        predicted + figure("passes_in_flight") * figure("bytes_per_window") > usable,
        "{memory}"
    );
    // The promise itself: the resident peak stayed within the budget.
    let measured = memory["measured_peak_bytes"]
        .as_u64()
        .expect("a measured peak");
    assert!(measured <= tight_limit, "{memory}");
    let (a, b) = (labels(&tight_mask), labels(&free_mask));
    let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    assert!(
        same as f64 >= 0.9999 * a.len() as f64,
        "{same} of {}",
        a.len()
    );

    // The model fits, the scan does not: the case fails before any work, naming its needs.
    let model_only = peak - passes * (pass + 4 * window) - case;
    let short = limit(model_only + pass + window + case / 2).to_string();
    let (o, summary, short_mask) = run("short", &["--max-memory", &short]);
    assert_eq!(o.status.code(), Some(1));
    let reason = summary.unwrap()["cases"][0]["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        reason.contains("needs about") && reason.contains("--max-memory"),
        "{reason}"
    );
    assert!(!short_mask.exists());

    // Each case's peak is its own: a small scan after the large one reports a smaller peak
    // (the resident peak is reset, and what the large case freed is handed back, per case).
    let ct = medseg::io::read_nifti(&scan).unwrap();
    let crop = ct
        .voxels
        .slice(ndarray::s![.., 0..20, 0..40, 0..40])
        .to_owned();
    let small = medseg::Volume::new(
        crop,
        medseg::Geometry::new([40, 40, 20], ct.geometry.affine),
        ct.info.clone(),
    )
    .unwrap();
    let small_path = tmp.path().join("small.nii.gz");
    medseg::io::write_nifti(&small, &small_path, medseg::DataType::Int16).unwrap();
    let out = tmp.path().join("two");
    let o = segment(&[
        scan.to_str().unwrap(),
        small_path.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--max-memory",
        "16GiB",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary = summary_in(&out);
    let peak_of = |name: &str| {
        let case = summary["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["case"] == name)
            .unwrap();
        case["memory"]["measured_peak_bytes"].as_u64().unwrap()
    };
    assert!(peak_of("small") < peak_of("example_ct"), "{summary}");

    // A scan whose reading alone would not fit is refused from its header, before it is read:
    // int32 voxels and their float32 copy, beside the compressed file.
    let case = medseg::infer::batch::expand(std::slice::from_ref(&scan)).remove(0);
    let need = case.read_bytes().unwrap();
    let voxels = 122 * 101 * 112;
    let file = std::fs::metadata(&scan).unwrap().len();
    assert_eq!(need, voxels * (4 + 4) + file);
    let err = case.load_within(Some(need - 1)).unwrap_err().to_string();
    assert!(err.contains("reading it needs about"), "{err}");
    assert!(case.load_within(Some(need)).is_ok());

    let (o, _, _) = run("tiny", &["--max-memory", "10MiB"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--max-memory") && err.contains("is below what"),
        "{err}"
    );
    let (o, _, _) = run("garbage", &["--max-memory", "lots"]);
    assert_eq!(o.status.code(), Some(2));
}
