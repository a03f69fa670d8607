//! `medseg train` on real scans: the liver in TotalSegmentator's two sample CTs (one NIfTI file,
//! one DICOM series), validated on the held-out DICOM scan.

use std::path::Path;
use std::process::Command;

use crate::common::{bin, cache};

const CONFIG: &str = "configs/liver-ct-2d.toml";

fn train<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> std::process::Output {
    Command::new(bin())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("train")
        .args(args)
        .output()
        .unwrap()
}

/// `metrics.csv` rows without the timing columns (which differ run to run).
fn metrics(run: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let keep: Vec<usize> = [
        "epoch",
        "train_loss",
        "learning_rate",
        "mean_dice",
        "dice_liver",
    ]
    .iter()
    .map(|c| header.iter().position(|h| h == c).unwrap())
    .collect();
    lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            keep.iter().map(|&i| f[i].to_string()).collect()
        })
        .collect()
}

/// `--config CONFIG`, each of `sets` and the output directory as `--set`, and `--quiet`.
fn run_args<S: AsRef<str>>(dir: &Path, sets: &[S]) -> Vec<String> {
    let output = format!("output.dir={:?}", dir.display().to_string());
    let mut args = vec!["--config".to_string(), CONFIG.into()];
    for set in sets.iter().map(AsRef::as_ref).chain([output.as_str()]) {
        args.extend(["--set".into(), set.to_string()]);
    }
    args.push("--quiet".into());
    args
}

/// Runs `medseg train ARGS`, which dies (abort, as a kill: no cleanup) right after its first
/// epoch is saved, at a named point rather than after a guessed sleep.
fn killed_after_first_epoch(args: &[String]) {
    let died = Command::new(bin())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("train")
        .args(args)
        .env(medseg::io::ABORT_AT_ENV, "train-epoch-saved:1")
        .output()
        .unwrap();
    assert!(!died.status.success(), "the run was not stopped");
}

fn ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Three epochs of the 2D `tiny` model raise validation Dice on the held-out scan; a second run of
/// the same config killed with SIGKILL after its first checkpoint and resumed ends identical to the
/// uninterrupted run, epoch for epoch.
#[test]
fn training_improves_validation_dice_and_resumes_exactly_after_kill() {
    cache("totalsegmentator/example_ct_dicom");
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let set = |dir: &Path| run_args(dir, &["train.epochs=3"]);
    let args_a = set(&a);
    let out = train(&args_a);
    ok(&out);
    let rows = metrics(&a);
    assert_eq!(rows.len(), 3);
    let dice: Vec<f64> = rows.iter().map(|r| r[4].parse().unwrap()).collect();
    eprintln!("validation Dice per epoch: {dice:?}");
    assert!(dice[2] > dice[0] + 0.05, "Dice did not improve: {dice:?}");

    // The run directory holds what a user needs.
    for f in [
        "config.toml",
        "split.json",
        "train.log",
        "training_curve.png",
    ] {
        assert!(a.join(f).is_file(), "{f} missing");
    }
    let png = std::fs::read(a.join("training_curve.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let saved = std::fs::read_to_string(a.join("config.toml")).unwrap();
    // Resolved from the data: median spacing and the CT window from the training foreground.
    assert!(
        saved.contains("spacing = [\n    3.0,") || saved.contains("spacing = [3.0, 3.0, 3.0]"),
        "{saved}"
    );
    assert!(saved.contains("mean = "), "{saved}");
    let best = a.join("checkpoints/best");
    let (config, _) = medseg::model::load(&best, &burn::prelude::Device::flex()).unwrap();
    assert_eq!((config.spatial_dims(), config.num_classes), (2, 2));
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("checkpoints/last/state.json")).unwrap())
            .unwrap();
    assert_eq!(state["epoch"], 3);
    // Without a weight average the stepped weights are the inference weights: no second file.
    assert!(!a.join("checkpoints/last/training_weights.bpk").exists());

    killed_after_first_epoch(&set(&b));
    let state_file = b.join("checkpoints/last/state.json");
    let killed_at: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state_file).unwrap()).unwrap();
    let killed_at = killed_at["epoch"].as_u64().unwrap();
    assert_eq!(killed_at, 1, "the run stopped after the wrong epoch");

    let out = train(&["--resume", b.to_str().unwrap(), "--quiet"]);
    ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("resumed after epoch {killed_at}")),
        "{stdout}"
    );
    assert_eq!(
        metrics(&b),
        rows,
        "resumed run differs from the uninterrupted one"
    );
    let log = std::fs::read_to_string(b.join("train.log")).unwrap();
    assert!(log.contains("resumed from"), "{log}");

    // Training again into a finished run directory is refused rather than overwriting it.
    let out = train(&args_a);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--resume"));
}

/// With a moving average of the weights, the checkpoint's `weights.bpk` (what `segment` loads and
/// validation scores) is the average and the stepped weights are kept apart; a run killed after
/// its first epoch resumes both and ends identical to the uninterrupted one.
#[test]
fn weight_average_is_saved_apart_and_resumes_exactly() {
    cache("totalsegmentator/example_ct_dicom");
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let set = |dir: &Path| {
        run_args(
            dir,
            &[
                "train.epochs=2",
                "train.steps_per_epoch=6",
                "train.ema_decay=0.9",
            ],
        )
    };
    let args_a = set(&a);
    ok(&train(&args_a));
    let rows = metrics(&a);
    assert_eq!(rows.len(), 2);
    let last = a.join("checkpoints/last");
    let average = weights(&last, "weights.bpk");
    let stepped = weights(&last, "training_weights.bpk");
    assert_eq!(average.len(), stepped.len());
    assert!(average != stepped, "the average equals the stepped weights");

    killed_after_first_epoch(&set(&b));
    ok(&train(&["--resume", b.to_str().unwrap(), "--quiet"]));
    assert_eq!(
        metrics(&b),
        rows,
        "resumed run differs from the uninterrupted one"
    );
    assert!(
        weights(&b.join("checkpoints/last"), "weights.bpk") == average,
        "the resumed average differs"
    );
}

/// Every parameter value of the checkpoint at `dir` with its weights taken from `file`.
fn weights(dir: &Path, file: &str) -> Vec<f32> {
    use burn::module::{Module, ModuleVisitor, Param};
    use burn::prelude::Tensor;
    #[derive(Default)]
    struct Values(Vec<f32>);
    impl ModuleVisitor for Values {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0
                .extend(param.val().into_data().try_to_vec::<f32>().unwrap());
        }
    }
    let device = burn::prelude::Device::flex();
    let (_, model) = medseg::model::load(dir, &device).unwrap();
    let model = medseg::model::load_weights(model, &dir.join(file)).unwrap();
    let mut values = Values::default();
    model.visit(&mut values);
    values.0
}

/// 3D patches: a short run trains, validates with the 3D sliding window and checkpoints.
#[test]
fn three_d_training_runs() {
    cache("totalsegmentator/example_ct_dicom");
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run3d");
    let out = train(&run_args(
        &run,
        &[
            "sampling.patch_size=[32, 48, 48]",
            "train.epochs=1",
            "train.steps_per_epoch=3",
            "train.batch_size=2",
        ],
    ));
    ok(&out);
    let rows = metrics(&run);
    assert_eq!(rows.len(), 1);
    let dice: f64 = rows[0][4].parse().unwrap();
    assert!((0.0..=1.0).contains(&dice));
    let (config, _) = medseg::model::load(
        &run.join("checkpoints/last"),
        &burn::prelude::Device::flex(),
    )
    .unwrap();
    assert_eq!(config.spatial_dims(), 3);
    assert_eq!(config.patch_size.as_slice(), [32, 48, 48]);
}

/// Bad entries are reported together, each naming its case and what is wrong, with exit status 1.
#[test]
fn bad_dataset_entries_name_the_case() {
    let tmp = tempfile::tempdir().unwrap();
    let ts = cache("totalsegmentator");
    let csv = tmp.path().join("bad.csv");
    let run = |manifest: &str, extra: &[&str]| {
        std::fs::write(&csv, manifest).unwrap();
        let mut args = run_args(
            &tmp.path().join("run"),
            &[
                format!("data.root={:?}", ts.display().to_string()),
                format!("data.manifest={:?}", csv.display().to_string()),
                "data.validation_cases=[]".into(),
            ],
        );
        args.extend(extra.iter().map(|s| s.to_string()));
        let out = train(&args);
        assert_eq!(out.status.code(), Some(3));
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    // Missing files and a missing label column are listed case by case, before any decoding.
    let err = run(
        "case,image,label\nok,example_ct.nii.gz,example_seg_fast_force_split.nii.gz\ngone,nowhere.nii.gz,example_seg.nii.gz\n",
        &[],
    );
    assert!(
        err.contains("case gone")
            && err.contains("nowhere.nii.gz")
            && err.contains("does not exist"),
        "{err}"
    );
    // A label on another grid names both shapes; an undeclared label value names the value.
    let err = run(
        "case,image,label\nshifted,example_ct.nii.gz,example_seg.nii.gz\nplain,example_ct_sm.nii.gz,example_seg.nii.gz\n",
        &["--set", "data.label_values=[]", "--set", "data.validation_fraction=0.0"],
    );
    assert!(
        err.contains("case shifted")
            && err.contains("not on the image grid")
            && err.contains("[122, 101, 30]")
            && err.contains("[122, 101, 112]"),
        "{err}"
    );
    assert!(
        err.contains("case plain") && err.contains("is not one of the 2 declared classes"),
        "{err}"
    );
    // A case whose header is in cm (voxels 40× too large) would resample to a grid of 10^11
    // voxels: refused before any resampling, naming the case, the spacings and the likely unit.
    for (name, out) in [
        ("example_ct.nii.gz", "cm_ct.nii.gz"),
        ("example_seg_fast_force_split.nii.gz", "cm_seg.nii.gz"),
    ] {
        let mut v = medseg::io::read_nifti(&ts.join(name)).unwrap();
        for r in 0..3 {
            for c in 0..3 {
                v.geometry.affine[r][c] *= 40.0;
            }
        }
        medseg::io::write_nifti(&v, &tmp.path().join(out), medseg::DataType::Int16).unwrap();
    }
    let cm = |f: &str| tmp.path().join(f).display().to_string();
    let err = run(
        &format!(
            "case,image,label\nok,example_ct.nii.gz,example_seg_fast_force_split.nii.gz\ncm,{},{}\n",
            cm("cm_ct.nii.gz"),
            cm("cm_seg.nii.gz")
        ),
        &["--set", "preprocess.spacing=[1.5, 1.5, 1.5]", "--set", "data.validation_fraction=0.0"],
    );
    assert!(
        err.contains("case cm")
            && err.contains("segment.max_voxels")
            && err.contains("cm instead of mm"),
        "{err}"
    );
}

#[test]
fn config_layers_and_unknown_keys() {
    let out = train(&["--config", CONFIG, "--set", "train.lr=0.5", "--dump-config"]);
    ok(&out);
    let dump = String::from_utf8_lossy(&out.stdout);
    assert!(
        dump.contains("lr = 0.5") && dump.contains("preset = \"tiny\""),
        "{dump}"
    );
    // The dump is itself a valid config.
    let parsed = medseg::config::RunConfig::from_toml(&dump, "dump").unwrap();
    assert_eq!(parsed.sampling.patch_size.as_slice(), [96, 96]);
    let out = train(&[
        "--config",
        CONFIG,
        "--set",
        "train.learning_rate=0.5",
        "--dump-config",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("[train]") && err.contains("learning_rate"),
        "{err}"
    );
    // A best-checkpoint metric naming no class fails before any epoch is trained.
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let out = train(&run_args(&run, &["validate.metric=tumour"]));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("[validate] metric") && err.contains("\"tumour\""),
        "{err}"
    );
    assert!(!err.contains("epoch 1/"), "{err}");
    assert!(!run.join("checkpoints/last").exists());
}

/// Every shipped config parses and names a dataset manifest that exists.
#[test]
fn shipped_configs_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            if text.lines().any(|l| l.trim() == "[synth]") {
                let c = medseg::synth::dataset::SynthConfig::from_file(&path)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                // Hosts and their masks are fetched by scripts/fetch-data.sh.
                let root = Path::new(env!("CARGO_MANIFEST_DIR"));
                for h in &c.hosts {
                    let mask = match h.organ().unwrap() {
                        medseg::synth::dataset::Organ::Mask { path, .. } => Some(path),
                        medseg::synth::dataset::Organ::Lung => None,
                    };
                    for f in std::iter::once(h.image.clone()).chain(mask) {
                        assert!(root.join(&f).is_file(), "{}: {f:?} missing", path.display());
                    }
                }
                seen += 1;
                continue;
            }
            let c = medseg::config::RunConfig::load(Some(&path), &[])
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            medseg::train::model_config(&c).unwrap();
            if c.data.format == medseg::config::DataFormat::Csv {
                let manifest = Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join(&c.data.root)
                    .join(&c.data.manifest);
                assert!(
                    manifest.is_file(),
                    "{}: {} missing",
                    path.display(),
                    manifest.display()
                );
            }
            seen += 1;
        }
    }
    assert!(seen >= 2);
}

/// A Decathlon / nnU-Net v2 layout (`dataset.json`, `imagesTr/CASE_0000.nii.gz`,
/// `labelsTr/CASE.nii.gz`) is read, checked, preprocessed and cached; a second build reads the cache
/// and gives the same cases.
#[test]
fn decathlon_layout_prepares_and_caches_cases() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("Dataset001_Liver");
    std::fs::create_dir_all(root.join("imagesTr")).unwrap();
    std::fs::create_dir_all(root.join("labelsTr")).unwrap();
    let ts = cache("totalsegmentator");
    for (case, image, label) in [
        (
            "liver_001",
            "example_ct.nii.gz",
            "example_seg_fast_force_split.nii.gz",
        ),
        ("liver_002", "example_ct_sm.nii.gz", "example_seg.nii.gz"),
    ] {
        std::fs::copy(
            ts.join(image),
            root.join(format!("imagesTr/{case}_0000.nii.gz")),
        )
        .unwrap();
        std::fs::copy(ts.join(label), root.join(format!("labelsTr/{case}.nii.gz"))).unwrap();
    }
    std::fs::write(
        root.join("dataset.json"),
        r#"{"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1},
            "numTraining": 2, "file_ending": ".nii.gz"}"#,
    )
    .unwrap();
    let overrides = [
        "data.format=decathlon".to_string(),
        format!("data.root={:?}", root.display().to_string()),
        format!(
            "data.cache_dir={:?}",
            tmp.path().join("cache").display().to_string()
        ),
        // TotalSegmentator's liver is value 5 in these maps.
        "data.label_values=[0, 5]".into(),
    ];
    let build = || {
        let mut config = medseg::config::RunConfig::load(None, &overrides).unwrap();
        let data = medseg::data::build(&mut config, &|_, _| {}).unwrap();
        (config, data)
    };
    let (config, data) = build();
    // Channels and labels came from dataset.json; spacing and the CT window from the data.
    assert_eq!(config.data.channels, vec!["CT"]);
    assert_eq!(config.data.labels, vec!["background", "liver"]);
    assert_eq!(config.preprocess.spacing, vec![3.0, 3.0, 3.0]);
    let ct = &config.preprocess.intensity[0];
    assert_eq!(ct.scheme, medseg::config::IntensityScheme::Ct);
    assert!(
        ct.window[0] > -200.0 && ct.window[1] < 400.0,
        "liver window {:?}",
        ct.window
    );
    assert_eq!((data.train.len(), data.validation.len()), (1, 1));
    let cached: Vec<_> = std::fs::read_dir(tmp.path().join("cache"))
        .unwrap()
        .collect();
    assert_eq!(cached.len(), 2);
    let case = &data.train[0];
    assert!(!case.foreground[0].is_empty());
    // Normalised CT: the liver sits near 0 within a few standard deviations.
    let liver: Vec<f32> = case
        .image
        .iter()
        .zip(case.label.iter())
        .filter(|(_, l)| **l == 1)
        .map(|(v, _)| *v)
        .collect();
    let mean = liver.iter().sum::<f32>() / liver.len() as f32;
    assert!(mean.abs() < 1.0, "normalised liver mean {mean}");

    let (_, again) = build();
    assert_eq!(
        std::fs::read_dir(tmp.path().join("cache")).unwrap().count(),
        2
    );
    assert_eq!(again.train[0].image, case.image);
    assert_eq!(again.train[0].label, case.label);
}
