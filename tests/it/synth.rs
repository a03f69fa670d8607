//! Synthetic lesion insertion into a real CT (work in progress for issue 7): the host's noise
//! survives under the lesion, edges carry partial volume, values stay in the host's range.

use crate::common::cache;
use medseg::io::read_nifti;
use medseg::synth::{insert, lesion::LesionShape, local_noise, LesionSpec};
use medseg::Volume;
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
    // No texture here, so the noise comparison below sees the host's noise alone.
    let spec = LesionSpec {
        shape,
        delta: -40.0,
        core: None,
        texture: 0.0,
        halo: None,
        min_cnr: 1.0,
    };
    let (fraction, record) = insert(&mut ct, &spec, &mut rng).expect("visible lesion");
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

/// Lung nodules placed in the eroded lungs of the real 1.5 mm CT stay inside the lungs, do not
/// overlap, and are solid against the lung (about +800 HU over aerated parenchyma).
#[test]
fn lung_nodules_stay_inside_the_lungs() {
    use medseg::synth::organ::{erode_mm, lung_mask, place};
    let mut ct =
        medseg::io::read_nifti(&cache("totalsegmentator/aorta_example_ct.nii.gz")).unwrap();
    let lungs = lung_mask(ct.voxels.index_axis(Axis(0), 0));
    let s = ct.geometry.spacing();
    let lung_ml = lungs.iter().filter(|v| **v).count() as f64 * s[0] * s[1] * s[2] / 1000.0;
    assert!(lung_ml > 500.0, "lungs {lung_ml} ml");
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut taken = Vec::new();
    let mut labels = Vec::new();
    for diameter in [5.0, 7.0, 9.0] {
        // The erosion is a box, so half the diameter keeps a lobulated nodule inside.
        let allowed = erode_mm(&lungs, &ct.geometry, diameter * 0.5);
        let reach = diameter * 0.75;
        let centre =
            place(&allowed, &ct.geometry, reach, &taken, 5.0, &mut rng).expect("room in the lungs");
        taken.push((centre, reach));
        let shape = LesionShape::random(centre, diameter, 0, &mut rng);
        // A solid nodule (about 0 HU) over aerated lung (about −800 HU).
        let spec = LesionSpec {
            shape,
            delta: 800.0,
            core: None,
            texture: 0.1,
            halo: None,
            min_cnr: 1.0,
        };
        let (f, record) = insert(&mut ct, &spec, &mut rng).expect("visible nodule");
        assert!(record.contrast_to_noise > 5.0, "{record:?}");
        labels.push(f);
    }
    let label = medseg::synth::label_volume(ct.geometry.dims, &labels);
    let outside = label
        .iter()
        .zip(lungs.iter())
        .filter(|(l, m)| **l == 1 && !**m)
        .count();
    let total = label.iter().filter(|l| **l == 1).count();
    assert!(
        total > 0 && outside == 0,
        "{outside} of {total} label voxels outside the lungs"
    );
}

/// `medseg synth` builds a Decathlon dataset whose splits are disjoint by host, reproducibly from
/// the seed, with every labelled lesion visible (contrast-to-noise ≥ 1) and recorded.
#[test]
fn synth_dataset_is_reproducible_and_split_by_host() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("synth.toml");
    std::fs::write(
        &config,
        format!(
            "[synth]\nseed = 5\ncases_per_host = 2\ncontrol_fraction = 0.0\nlesions_per_case = [2, 2]\n\
             [[synth.hosts]]\nimage = {:?}\norgan = \"lung\"\nsplit = \"train\"\n\
             [[synth.hosts]]\nimage = {:?}\norgan = \"mask:{}=10,11,12,13,14\"\nsplit = \"test\"\ncases = 1\n",
            cache("totalsegmentator/aorta_example_ct.nii.gz").display().to_string(),
            cache("totalsegmentator/example_ct.nii.gz").display().to_string(),
            cache("totalsegmentator/example_seg_fast_force_split.nii.gz").display(),
        ),
    )
    .unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    run_synth(&config, &a);
    // One thread makes the cases one after another; the default makes them concurrently.
    run_synth_on(&config, &b, Some(1));
    // A rerun on the same config reuses the finished dataset.
    let again = run_synth(&config, &a);
    assert!(again.contains("already holds"), "{again}");
    for f in [
        "imagesTr/synthTr_000_0000.nii.gz",
        "labelsTr/synthTr_000.nii.gz",
        "imagesTr/synthTr_001_0000.nii.gz",
        "labelsTr/synthTr_001.nii.gz",
        "imagesTs/synthTs_002_0000.nii.gz",
        "labelsTs/synthTs_002.nii.gz",
        "lesions.json",
        "dataset.json",
    ] {
        assert_eq!(
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
            "{f} differs between runs"
        );
    }
    let lesions: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("lesions.json")).unwrap()).unwrap();
    let rows = lesions["lesions"].as_array().unwrap();
    assert!(!rows.is_empty());
    let hosts_of = |prefix: &str| -> std::collections::BTreeSet<String> {
        rows.iter()
            .filter(|r| r["case"].as_str().unwrap().starts_with(prefix))
            .map(|r| r["host"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(hosts_of("synthTr").is_disjoint(&hosts_of("synthTs")));
    assert!(rows
        .iter()
        .all(|r| r["contrast_to_noise"].as_f64().unwrap() >= 1.0));
    // Every nodule sits in aerated lung: just outside its box the deformed host reads about
    // −800 HU (parenchyma), neither soft tissue nor the −1000 HU of bowel or stomach gas.
    for r in rows {
        let case = r["case"].as_str().unwrap();
        let dir = if case.starts_with("synthTr") {
            "imagesTr"
        } else {
            "imagesTs"
        };
        let scan =
            medseg::io::read_nifti(&a.join(dir).join(format!("{case}_0000.nii.gz"))).unwrap();
        let b = &r["bbox_voxel"];
        let at = |c: usize, lo: bool| {
            let v = b[if lo { 0 } else { 1 }][c].as_u64().unwrap() as usize;
            if lo {
                v.saturating_sub(2)
            } else {
                v + 2
            }
        };
        let k = (b[0][2].as_u64().unwrap() + b[1][2].as_u64().unwrap()) as usize / 2;
        let mut ring = Vec::new();
        for j in at(1, true)..=at(1, false) {
            for i in at(0, true)..=at(0, false) {
                let edge =
                    j == at(1, true) || j == at(1, false) || i == at(0, true) || i == at(0, false);
                if edge {
                    ring.push(scan.voxels[[0, k, j, i]]);
                }
            }
        }
        ring.sort_by(f32::total_cmp);
        let median = ring[ring.len() / 2];
        assert!(
            (-950.0..-600.0).contains(&median),
            "{case}: lesion ring median {median} HU"
        );
    }
    // The label map is the α ≥ 0.5 core of the recorded lesions, on the image's grid.
    let image = medseg::io::read_nifti(&a.join("imagesTr/synthTr_000_0000.nii.gz")).unwrap();
    let label = medseg::io::read_nifti(&a.join("labelsTr/synthTr_000.nii.gz")).unwrap();
    assert_eq!(image.geometry, label.geometry);
    let labelled: f64 = label.voxels.iter().filter(|v| **v == 1.0).count() as f64;
    let s = label.geometry.spacing();
    let recorded: f64 = rows
        .iter()
        .filter(|r| r["case"] == "synthTr_000")
        .map(|r| r["volume_mm3"].as_f64().unwrap())
        .sum();
    assert!((labelled * s[0] * s[1] * s[2] - recorded).abs() < 1e-6 * recorded.max(1.0));
    // medseg evaluate finds lesions.json beside labelsTs and reports sensitivity by
    // contrast-to-noise ratio: the truth against itself detects every recorded test lesion.
    let report = tmp.path().join("report");
    let o = std::process::Command::new(crate::common::bin())
        .args(["evaluate", "--pred"])
        .arg(a.join("labelsTs"))
        .arg("--truth")
        .arg(a.join("labelsTs"))
        .arg("--output")
        .arg(&report)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report.join("summary.json")).unwrap()).unwrap();
    let by_cnr = summary["lesions"]["1"]["by_contrast_to_noise"]
        .as_array()
        .unwrap();
    let test_lesions = rows
        .iter()
        .filter(|r| r["case"].as_str().unwrap().starts_with("synthTs"))
        .count() as u64;
    let counted: u64 = by_cnr
        .iter()
        .map(|b| b["truth_lesions"].as_u64().unwrap())
        .sum();
    let detected: u64 = by_cnr.iter().map(|b| b["detected"].as_u64().unwrap()).sum();
    // A lesion's label may split into components; every component gets its lesion's ratio.
    assert!(counted >= test_lesions && detected == counted, "{by_cnr:?}");
    assert_eq!(
        summary["lesions"]["1"]["truth_lesions"].as_u64(),
        Some(counted),
        "every truth component has its lesion's ratio"
    );
    assert_eq!(summary["classes"]["1"]["label"], "nodule");
}

/// Impossible synthesis settings are refused with the file and the setting named, never a panic.
#[test]
fn bad_synth_settings_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("bad.toml");
    let host = cache("totalsegmentator/example_ct.nii.gz")
        .display()
        .to_string();
    for (setting, named) in [
        ("diameter_median_mm = -2.0", "diameter_median_mm"),
        ("lesions_per_case = [3, 1]", "lesions_per_case"),
        ("control_fraction = 1.5", "control_fraction"),
        (
            "[synth.randomise]\nfield_of_view_prob = 2.0\n[synth.appearance]",
            "field_of_view_prob",
        ),
        (
            "[synth.randomise]\nfield_of_view_mm = [0.0, 900.0]\n[synth.appearance]",
            "field_of_view_mm",
        ),
    ] {
        std::fs::write(
            &path,
            format!("[synth]\n{setting}\n[[synth.hosts]]\nimage = {host:?}\norgan = \"lung\"\nsplit = \"train\"\n"),
        )
        .unwrap();
        let e = medseg::synth::dataset::SynthConfig::from_file(&path)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("bad.toml") && e.contains(named),
            "{setting}: {e}"
        );
    }
    // A malformed organ is refused when the config loads, before any host is built.
    std::fs::write(
        &path,
        format!("[synth]\n[[synth.hosts]]\nimage = {host:?}\norgan = \"mask:x.nii.gz=liver\"\nsplit = \"train\"\n"),
    )
    .unwrap();
    let e = medseg::synth::dataset::SynthConfig::from_file(&path)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("bad.toml") && e.contains("mask:x.nii.gz=liver"),
        "{e}"
    );
}

/// A brain tumour in the real Colin27 T1: an enhancing rim brighter than the tissue around a
/// darker necrotic core, all labelled, inside the brain mask, within uint8's range.
#[test]
fn a_brain_tumour_has_an_enhancing_rim_and_a_necrotic_core() {
    use medseg::synth::organ::{erode_mm, place};
    let mut mr = medseg::io::read_nifti(&cache("mricron/ch2.nii.gz")).unwrap();
    let before = mr.voxels.clone();
    let brain = medseg::io::read_nifti(&cache("mricron/ch2bet.nii.gz"))
        .unwrap()
        .voxels
        .index_axis(Axis(0), 0)
        .mapv(|v| v > 0.0);
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let allowed = erode_mm(&brain, &mr.geometry, 14.0);
    let centre = place(&allowed, &mr.geometry, 14.0, &[], 0.0, &mut rng).expect("room");
    let shape = LesionShape::random(centre, 20.0, 0, &mut rng);
    let spec = LesionSpec {
        shape: shape.clone(),
        delta: 60.0,
        core: Some((0.5, -25.0)),
        texture: 0.1,
        halo: None,
        min_cnr: 1.0,
    };
    let (f, record) = insert(&mut mr, &spec, &mut rng).expect("visible tumour");
    assert_eq!(record.core_delta, Some(-25.0));
    assert!(mr
        .voxels
        .iter()
        .all(|v| v.fract() == 0.0 && (0.0..=255.0).contains(v)));
    // Mean change in the core (radius < 0.3 of the lesion's) and in the rim shell.
    let change = |inside: &dyn Fn(f64) -> bool| {
        let (mut sum, mut n) = (0.0, 0.0);
        let (dk, dj, di) = f.alpha.dim();
        for k in 0..dk {
            for j in 0..dj {
                for i in 0..di {
                    let at = [k + f.origin[0], j + f.origin[1], i + f.origin[2]];
                    let p = mr
                        .geometry
                        .voxel_to_world([at[2] as f64, at[1] as f64, at[0] as f64]);
                    let r = (0..3)
                        .map(|a| (p[a] - centre[a]).powi(2))
                        .sum::<f64>()
                        .sqrt();
                    if inside(r / 10.0) {
                        sum += (mr.voxels[[0, at[0], at[1], at[2]]]
                            - before[[0, at[0], at[1], at[2]]])
                            as f64;
                        n += 1.0;
                    }
                }
            }
        }
        sum / n
    };
    let core = change(&|r| r < 0.3);
    let rim = change(&|r| (0.62..0.75).contains(&r));
    assert!(core < -5.0 && rim > 20.0, "core {core}, rim {rim}");
    // The label covers the core too, and stays inside the brain.
    let label = medseg::synth::label_volume(mr.geometry.dims, &[f]);
    let c = mr.geometry.world_to_voxel(centre).unwrap();
    assert_eq!(
        label[[
            c[2].round() as usize,
            c[1].round() as usize,
            c[0].round() as usize
        ]],
        1
    );
    assert!(label.iter().zip(brain.iter()).all(|(l, b)| *l == 0 || *b));
}

/// A deformed host and its organ mask move together: the mask derived from the deformed scan
/// agrees with the deformed mask, and the deformation really moves voxels.
#[test]
fn hosts_and_organ_masks_are_deformed_identically() {
    use medseg::synth::deform::{deform_host, DeformSettings};
    let mr = medseg::io::read_nifti(&cache("mricron/ch2.nii.gz")).unwrap();
    let tissue = mr.voxels.index_axis(Axis(0), 0).mapv(|v| v > 100.0);
    let settings = DeformSettings {
        rotation_degrees: 6.0,
        scale: 0.06,
        elastic_mm: 3.0,
        elastic_wavelength_mm: [80.0, 160.0],
        bias_field: 0.0,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let (moved, masks) = deform_host(&mr, &[&tissue], &settings, &mut rng);
    let mask = &masks[0];
    assert_eq!(moved.geometry, mr.geometry);
    let derived = moved.voxels.index_axis(Axis(0), 0).mapv(|v| v > 100.0);
    let n = tissue.len() as f64;
    let disagree = derived
        .iter()
        .zip(mask.iter())
        .filter(|(a, b)| a != b)
        .count() as f64
        / n;
    let moved_share = tissue
        .iter()
        .zip(mask.iter())
        .filter(|(a, b)| a != b)
        .count() as f64
        / n;
    eprintln!("deformed mask vs mask of the deformed scan: {disagree:.4}; moved {moved_share:.4}");
    assert!(moved_share > 0.01, "{moved_share}");
    assert!(disagree < moved_share / 5.0, "{disagree} vs {moved_share}");
}

/// Runs `medseg synth --config CONFIG --output OUT`, which must succeed; returns its stdout.
fn run_synth(config: &std::path::Path, out: &std::path::Path) -> String {
    run_synth_on(config, out, None)
}

/// `medseg synth` on `threads` rayon threads (`None`: the default).
fn run_synth_on(config: &std::path::Path, out: &std::path::Path, threads: Option<usize>) -> String {
    let mut command = std::process::Command::new(crate::common::bin());
    if let Some(n) = threads {
        command.env("RAYON_NUM_THREADS", n.to_string());
    }
    let o = command
        .args([
            "synth",
            "--config",
            config.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Synthesises two cases of the real ITK T1 brain with the given `[synth.randomise]` body and
/// returns (images, labels, lesions.json) of the training split.
fn randomised(dir: &std::path::Path, randomise: &str) -> (Vec<Volume>, Vec<Volume>, String) {
    let config = dir.join("synth.toml");
    std::fs::write(
        &config,
        format!(
            "[synth]\nseed = 3\nlesion = \"brain_tumour\"\nlabel = \"tumour\"\nroi_label = \"brain\"\n\
             cases_per_host = 2\ncontrol_fraction = 0.0\nlesions_per_case = [3, 3]\n\
             diameter_median_mm = 14.0\nbias_field = 0.1\n\
             [synth.randomise]\n{randomise}\n[synth.appearance]\ncnr = [3.0, 20.0]\n\
             [[synth.hosts]]\nimage = {:?}\norgan = \"mask:{}\"\nsplit = \"train\"\n",
            cache("itk/KmeansTest_T1UCharRaw.nii.gz").display().to_string(),
            cache("itk/KmeansTest_T1RawSkullStrip.nii.gz").display(),
        ),
    )
    .unwrap();
    let out = dir.join("out");
    run_synth(&config, &out);
    let read = |sub: &str, suffix: &str| -> Vec<Volume> {
        (0..2)
            .map(|c| {
                read_nifti(&out.join(sub).join(format!("synthTr_{c:03}{suffix}.nii.gz"))).unwrap()
            })
            .collect()
    };
    let lesions = std::fs::read_to_string(out.join("lesions.json")).unwrap();
    (read("imagesTr", "_0000"), read("labelsTr", ""), lesions)
}

#[test]
fn domain_randomisation_changes_the_look_but_never_the_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let (plain_dir, random_dir) = (tmp.path().join("plain"), tmp.path().join("random"));
    std::fs::create_dir_all(&plain_dir).unwrap();
    std::fs::create_dir_all(&random_dir).unwrap();
    let (plain, plain_labels, _) = randomised(
        &plain_dir,
        "contrast_prob = 0.0\nskull_strip_prob = 0.0\nthick_slice_prob = 0.0\nin_plane_mm = [0.0, 0.0]\nnoise = [0.0, 0.0]\nmin_visible_cnr = 0.0",
    );
    let (random, random_labels, lesions) = randomised(
        &random_dir,
        // Keep every lesion in the label, however faint the thick slices leave it.
        "contrast_prob = 1.0\nskull_strip_prob = 1.0\nthick_slice_prob = 1.0\nslice_thickness_mm = [6.0, 7.0]\nnoise = [0.02, 0.04]\nmin_visible_cnr = 0.0",
    );
    for c in 0..2 {
        // Same geometry: labels voxel for voxel, on the host's grid.
        assert_eq!(plain_labels[c].voxels, random_labels[c].voxels, "case {c}");
        assert_eq!(random[c].geometry, plain[c].geometry);
        let labels = &random_labels[c].voxels;
        assert!(labels.iter().any(|v| *v == 1.0) && labels.iter().any(|v| *v == 2.0));
        // Skull stripped: outside the brain label (2 and 1) nothing is left but noise.
        let outside: Vec<f32> = random[c]
            .voxels
            .iter()
            .zip(labels.iter())
            .filter(|(_, l)| **l == 0.0)
            .map(|(v, _)| *v)
            .collect();
        let brain_mean = mean(
            random[c]
                .voxels
                .iter()
                .zip(labels.iter())
                .filter(|(_, l)| **l == 2.0)
                .map(|(v, _)| *v),
        );
        let outside_median = {
            let mut o = outside.clone();
            o.sort_by(f32::total_cmp);
            o[o.len() / 2] as f64
        };
        assert!(
            outside_median < 0.2 * brain_mean,
            "{outside_median} vs brain {brain_mean}"
        );
        // A different image: not a scaled copy of the plain one.
        let r = correlation(
            &plain[c].voxels.iter().copied().collect::<Vec<_>>(),
            &random[c].voxels.iter().copied().collect::<Vec<_>>(),
        );
        assert!(r < 0.95, "case {c}: correlation {r}");
    }
    // Every lesion records its polarity and the simulated slice thickness.
    let parsed: medseg::io::layout::SynthLesions = serde_json::from_str(&lesions).unwrap();
    assert_eq!(parsed.lesions.len(), 6);
    for l in &parsed.lesions {
        assert!(l.polarity.is_some(), "{l:?}");
        assert!(
            l.slice_thickness_mm
                .is_some_and(|t| (6.0..=7.0).contains(&t)),
            "{l:?}"
        );
        assert!(l.lesion.contrast_to_noise.is_finite() && l.lesion.contrast_to_noise > 0.0);
    }
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(random_dir.join("out/dataset.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(json["labels"]["brain"], 2, "{json}");
}

#[test]
fn widening_the_field_of_view_keeps_every_label_in_place() {
    let tmp = tempfile::tempdir().unwrap();
    let (plain_dir, wide_dir) = (tmp.path().join("plain"), tmp.path().join("wide"));
    std::fs::create_dir_all(&plain_dir).unwrap();
    std::fs::create_dir_all(&wide_dir).unwrap();
    let fixed = "contrast_prob = 0.0\nskull_strip_prob = 0.0\nthick_slice_prob = 0.0\nin_plane_mm = [0.0, 0.0]\nnoise = [0.0, 0.0]\nmin_visible_cnr = 0.0";
    let (plain, plain_labels, plain_lesions) = randomised(&plain_dir, fixed);
    let (wide, wide_labels, wide_lesions) = randomised(
        &wide_dir,
        &format!("{fixed}\nfield_of_view_prob = 1.0\nfield_of_view_mm = [20.0, 40.0]"),
    );
    // The same lesions at the same world positions: the margin draws from its own stream.
    let centres = |json: &str| -> Vec<[f64; 3]> {
        let parsed: medseg::io::layout::SynthLesions = serde_json::from_str(json).unwrap();
        parsed.lesions.iter().map(|l| l.lesion.centre_mm).collect()
    };
    assert_eq!(centres(&plain_lesions), centres(&wide_lesions));
    for c in 0..2 {
        let (p, w) = (&plain_labels[c], &wide_labels[c]);
        assert_eq!(
            w.geometry, wide[c].geometry,
            "case {c}: scan and label share a grid"
        );
        assert_eq!(p.geometry.spacing(), w.geometry.spacing());
        // Only the in-plane axes grow, by 20-40 mm a side; the axis nearest superior-inferior
        // (ITK's T1 has an axis-permuted affine) keeps its size.
        let through = 2 - medseg::synth::randomise::axial_array_axis(&p.geometry);
        let spacing = p.geometry.spacing();
        for (axis, step) in spacing.iter().enumerate() {
            let grown = w.geometry.dims[axis] - p.geometry.dims[axis];
            if axis == through {
                assert_eq!(grown, 0, "case {c}: no margin through-plane");
            } else {
                let mm = grown as f64 * step;
                let slack = *step;
                assert!(
                    (40.0 - slack..=80.0 + slack).contains(&mm),
                    "case {c} axis {axis}: {mm} mm"
                );
            }
        }
        let [pi, pj, pk] = p.geometry.dims;
        // Every voxel of the plain grid is at the same world position in the wide one, with the
        // same label; the rest is background.
        let mut inside = 0usize;
        for k in 0..pk {
            for j in 0..pj {
                for i in 0..pi {
                    let world = p.geometry.voxel_to_world([i as f64, j as f64, k as f64]);
                    let v = w.geometry.world_to_voxel(world).unwrap();
                    let at = v.map(|x| {
                        assert!((x - x.round()).abs() < 1e-6, "off-grid {x}");
                        x.round() as usize
                    });
                    assert_eq!(
                        w.voxels[[0, at[2], at[1], at[0]]],
                        p.voxels[[0, k, j, i]],
                        "case {c} voxel {i},{j},{k}"
                    );
                    inside += 1;
                }
            }
        }
        let labelled = |v: &Volume| v.voxels.iter().filter(|x| **x != 0.0).count();
        assert_eq!(
            labelled(w),
            labelled(p),
            "case {c}: nothing labelled in the margin"
        );
        assert_eq!(inside, pi * pj * pk);
        // The margin is air: the corner voxel is the scan's darkest.
        let darkest = wide[c].voxels.iter().copied().fold(f32::INFINITY, f32::min);
        assert!(wide[c].voxels[[0, 0, 0, 0]] <= darkest + 1e-3);
    }
    assert_ne!(plain[0].geometry, wide[0].geometry);
}

fn mean(values: impl Iterator<Item = f32>) -> f64 {
    let (s, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v as f64, n + 1));
    s / n.max(1) as f64
}

fn correlation(a: &[f32], b: &[f32]) -> f64 {
    let (ma, mb) = (mean(a.iter().copied()), mean(b.iter().copied()));
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (*x as f64 - ma, *y as f64 - mb);
        sab += x * y;
        saa += x * x;
        sbb += y * y;
    }
    sab / (saa * sbb).sqrt().max(1e-12)
}

/// Hypo-intense lesions stronger than their tissue's own signal stay dark: magnitude MR cannot go
/// below zero, so such a lesion is black (plus the Rician floor), never folded back to bright by
/// the noise's magnitude, and its recorded contrast-to-noise ratio is what the image shows.
#[test]
fn strong_hypo_intense_lesions_stay_dark_under_rician_noise() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("synth.toml");
    std::fs::write(
        &config,
        format!(
            "[synth]\nseed = 4\nlesion = \"brain_tumour\"\nlabel = \"tumour\"\nroi_label = \"brain\"\n\
             cases_per_host = 2\ncontrol_fraction = 0.0\nlesions_per_case = [3, 3]\n\
             diameter_median_mm = 14.0\nbias_field = 0.0\n\
             [synth.randomise]\ncontrast_prob = 0.0\nskull_strip_prob = 0.0\nthick_slice_prob = 0.0\n\
             in_plane_mm = [0.0, 0.0]\nnoise = [0.04, 0.05]\nnoise_kind = \"rician\"\n\
             [synth.appearance]\ncnr = [25.0, 30.0]\n\
             [synth.appearance.polarity]\nhyper = 0.0\nhypo = 1.0\nring = 0.0\niso_oedema = 0.0\n\
             [[synth.hosts]]\nimage = {:?}\norgan = \"mask:{}\"\nsplit = \"train\"\n",
            cache("itk/KmeansTest_T1UCharRaw.nii.gz").display().to_string(),
            cache("itk/KmeansTest_T1RawSkullStrip.nii.gz").display(),
        ),
    )
    .unwrap();
    let out = tmp.path().join("out");
    run_synth(&config, &out);
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("lesions.json")).unwrap()).unwrap();
    let noise = |case: &str| {
        record["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["case"] == case)
            .unwrap()["noise_sigma"]
            .as_f64()
            .unwrap()
    };
    let lesions = record["lesions"].as_array().unwrap();
    assert!(lesions.len() >= 4, "{} lesions", lesions.len());
    for l in lesions {
        let case = l["case"].as_str().unwrap();
        let image = read_nifti(&out.join(format!("imagesTr/{case}_0000.nii.gz"))).unwrap();
        let label = read_nifti(&out.join(format!("labelsTr/{case}.nii.gz"))).unwrap();
        let b = &l["bbox_voxel"];
        let corner = |c: usize, a: usize| b[c][a].as_u64().unwrap() as usize;
        let [ni, nj, nk] = image.geometry.dims;
        let (mut inside, mut ring) = (Vec::new(), Vec::new());
        for k in corner(0, 2).saturating_sub(3)..=(corner(1, 2) + 3).min(nk - 1) {
            for j in corner(0, 1).saturating_sub(3)..=(corner(1, 1) + 3).min(nj - 1) {
                for i in corner(0, 0).saturating_sub(3)..=(corner(1, 0) + 3).min(ni - 1) {
                    let v = image.voxels[[0, k, j, i]] as f64;
                    match label.voxels[[0, k, j, i]] as u8 {
                        1 => inside.push(v),
                        2 => ring.push(v),
                        _ => {}
                    }
                }
            }
        }
        if inside.is_empty() || ring.is_empty() {
            continue;
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let (inside, ring) = (mean(&inside), mean(&ring));
        let cnr = l["contrast_to_noise"].as_f64().unwrap();
        let sigma = noise(case);
        // No voxel of magnitude MR is negative.
        assert!(
            image.voxels.iter().all(|v| *v >= 0.0),
            "{case}: a negative voxel"
        );
        // The lesion is darker than the brain around it by at least half of what its record says.
        assert!(
            ring - inside >= 0.5 * cnr * sigma,
            "{case} lesion {}: inside {inside:.1}, around {ring:.1}, recorded CNR {cnr:.1} at noise {sigma:.2}",
            l["id"]
        );
    }
}
