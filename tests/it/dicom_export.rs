//! `medseg segment --format dicom-seg,rtstruct` on the real TotalSegmentator CT series (anonymised:
//! empty Study/Series/SOP Instance UIDs in its data sets) and `medseg convert` of the SEG: the
//! objects reference the right images, copy the patient and study as they are, read back onto the
//! series' grid exactly, and their contours re-rasterise onto the mask (an even-odd rasteriser
//! written here, not medseg's). NIfTI scans, misfitting reference series and series without a
//! Frame of Reference are skipped or refused with the NIfTI mask still written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use dicom_dictionary_std::tags;
use dicom_object::{InMemDicomObject, OpenFileOptions};

use crate::common::{affine_diff, bin, cache};
use crate::segment::segment;

fn text(obj: &InMemDicomObject, tag: dicom_core::Tag) -> String {
    obj.element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_matches(|c: char| c == '\0' || c == ' ').to_string())
        .unwrap_or_default()
}

fn floats(obj: &InMemDicomObject, tag: dicom_core::Tag) -> Vec<f64> {
    obj.element(tag).unwrap().to_multi_float64().unwrap()
}

fn items(obj: &InMemDicomObject, tag: dicom_core::Tag) -> &[InMemDicomObject] {
    obj.element(tag).unwrap().items().unwrap()
}

fn ok(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    stderr
}

fn convert(args: &[&str]) -> Output {
    Command::new(bin())
        .arg("convert")
        .args(args)
        .output()
        .unwrap()
}

/// Source slices: file-meta SOP Instance UID by rounded Image Position (LPS).
fn source_uids(series: &Path) -> BTreeMap<[i64; 3], String> {
    std::fs::read_dir(series)
        .unwrap()
        .map(|e| {
            let obj = OpenFileOptions::new()
                .read_until(tags::PIXEL_DATA)
                .open_file(e.unwrap().path())
                .unwrap();
            let p = floats(&obj, tags::IMAGE_POSITION_PATIENT);
            (
                key(&p),
                obj.meta()
                    .media_storage_sop_instance_uid()
                    .trim_end_matches('\0')
                    .to_string(),
            )
        })
        .collect()
}

/// Positions rounded to 0.01 mm: the affine rebuilds them to far better than that.
fn key(p: &[f64]) -> [i64; 3] {
    [0, 1, 2].map(|a| (p[a] * 1e2).round() as i64)
}

/// Even-odd fill of a plane's contours (pixel coordinates) at pixel centres.
fn fill(contours: &[Vec<[f64; 2]>], ni: usize, nj: usize) -> Vec<bool> {
    let mut out = vec![false; ni * nj];
    for c in contours {
        for j in 0..nj {
            let y = j as f64;
            for t in 0..c.len() {
                let (a, b) = (c[t], c[(t + 1) % c.len()]);
                if (a[1] > y) == (b[1] > y) {
                    continue;
                }
                let x = a[0] + (y - a[1]) / (b[1] - a[1]) * (b[0] - a[0]);
                // Toggle every pixel centre right of the crossing.
                for i in (x.ceil().max(0.0) as usize)..ni {
                    out[j * ni + i] ^= true;
                }
            }
        }
    }
    out
}

/// Dice of two masks.
fn dice(a: &[bool], b: &[bool]) -> f64 {
    let both = a.iter().zip(b).filter(|(x, y)| **x && **y).count();
    let total = a.iter().filter(|x| **x).count() + b.iter().filter(|x| **x).count();
    if total == 0 {
        1.0
    } else {
        2.0 * both as f64 / total as f64
    }
}

/// Segments `input` into `out` with the given extra arguments.
fn segment_to(out: &Path, input: &Path, extra: &[&str]) -> Output {
    let mut args = vec![input.to_str().unwrap(), "--output", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    segment(&args)
}

fn case_name(out: &Path) -> String {
    let summary = crate::segment::summary_in(out);
    summary["cases"][0]["case"].as_str().unwrap().to_string()
}

#[test]
fn seg_and_rtstruct_reference_the_series_and_read_back_exactly() {
    let series = cache("totalsegmentator/example_ct_dicom");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let log = ok(&segment_to(
        &out,
        &series,
        &["--format", "nifti,dicom-seg,rtstruct"],
    ));
    assert!(log.contains("no Study Instance UID"), "{log}");
    let name = case_name(&out);
    let mask = medseg::io::read_nifti(&out.join(format!("{name}.nii.gz"))).unwrap();
    let [ni, nj, nk] = mask.geometry.dims;
    let m: Vec<u8> = mask.voxels.iter().map(|v| *v as u8).collect();
    assert!(m.contains(&1), "the liver model finds liver");
    let seg_path = out.join(format!("{name}_seg.dcm"));

    // medseg's reader on the series' grid: identical labels, shape and affine.
    let back = tmp.path().join("back.nii.gz");
    let log = ok(&convert(&[
        seg_path.to_str().unwrap(),
        back.to_str().unwrap(),
        "--reference",
        series.to_str().unwrap(),
    ]));
    assert!(log.contains("segment 1 \"liver\" -> label 1"), "{log}");
    let back = medseg::io::read_nifti(&back).unwrap();
    assert_eq!(back.geometry.dims, mask.geometry.dims);
    assert!(affine_diff(&back.geometry.affine, &mask.geometry.affine) < 1e-5);
    assert_eq!(back.voxels, mask.voxels);

    // Without the series: the planes the SEG holds, each equal to the mask's plane there.
    let partial = tmp.path().join("partial.nii.gz");
    let log = ok(&convert(&[
        seg_path.to_str().unwrap(),
        partial.to_str().unwrap(),
    ]));
    assert!(log.contains("spans only the planes"), "{log}");
    let partial = medseg::io::read_nifti(&partial).unwrap();
    let first = mask
        .geometry
        .world_to_voxel(partial.geometry.voxel_to_world([0.0, 0.0, 0.0]))
        .unwrap();
    assert!(
        first[0].abs() < 1e-4
            && first[1].abs() < 1e-4
            && (first[2] - first[2].round()).abs() < 1e-4
    );
    let k0 = first[2].round() as usize;
    for k in 0..partial.geometry.dims[2] {
        let plane = |v: &medseg::Volume, k: usize| -> Vec<f32> {
            v.voxels
                .slice(ndarray::s![0, k, .., ..])
                .iter()
                .copied()
                .collect()
        };
        assert_eq!(plane(&partial, k), plane(&mask, k0 + k), "plane {k}");
    }

    // Segmentations beside scans are passed over by discovery, with the reason.
    let found = medseg::io::discover(&out).unwrap();
    assert!(found
        .skipped
        .iter()
        .any(|(p, why)| p == &seg_path && why.contains("not a scan")));

    // The SEG: identity copied or derived, frames on the source images.
    let seg = dicom_object::open_file(&seg_path).unwrap();
    let rt = dicom_object::open_file(out.join(format!("{name}_rtstruct.dcm"))).unwrap();
    let first_slice = OpenFileOptions::new()
        .read_until(tags::PIXEL_DATA)
        .open_file(
            std::fs::read_dir(&series)
                .unwrap()
                .next()
                .unwrap()
                .unwrap()
                .path(),
        )
        .unwrap();
    assert_eq!(
        text(&seg, tags::SOP_CLASS_UID),
        "1.2.840.10008.5.1.4.1.1.66.4"
    );
    assert_eq!(text(&seg, tags::MODALITY), "SEG");
    assert_eq!(text(&seg, tags::SEGMENTATION_TYPE), "BINARY");
    for tag in [
        tags::FRAME_OF_REFERENCE_UID,
        tags::PATIENT_NAME,
        tags::PATIENT_ID,
        tags::STUDY_DATE,
    ] {
        assert_eq!(text(&seg, tag), text(&first_slice, tag), "{tag}");
    }
    // One derived study for both objects; new, distinct series.
    let study = text(&seg, tags::STUDY_INSTANCE_UID);
    assert!(study.starts_with("2.25."), "{study}");
    assert_eq!(text(&rt, tags::STUDY_INSTANCE_UID), study);
    assert_ne!(
        text(&seg, tags::SERIES_INSTANCE_UID),
        text(&rt, tags::SERIES_INSTANCE_UID)
    );
    // Nothing about the patient that the source lacks.
    for tag in [
        tags::PATIENT_BIRTH_NAME,
        tags::PATIENT_ADDRESS,
        tags::PATIENT_AGE,
        tags::OTHER_PATIENT_I_DS_SEQUENCE,
    ] {
        assert!(seg.element_opt(tag).unwrap().is_none(), "{tag}");
    }
    let segment_item = &items(&seg, tags::SEGMENT_SEQUENCE)[0];
    assert_eq!(text(segment_item, tags::SEGMENT_LABEL), "liver");
    assert_eq!(
        text(segment_item, tags::SEGMENT_ALGORITHM_TYPE),
        "AUTOMATIC"
    );
    let property = &items(segment_item, tags::SEGMENTED_PROPERTY_TYPE_CODE_SEQUENCE)[0];
    assert_eq!(text(property, tags::CODE_VALUE), "10200004");
    let sources = source_uids(&series);
    let frames = items(&seg, tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE);
    let planes_with_liver = (0..nk)
        .filter(|k| m[k * ni * nj..(k + 1) * ni * nj].contains(&1))
        .count();
    assert_eq!(
        frames.len(),
        planes_with_liver,
        "only frames that hold the segment"
    );
    for f in frames {
        let position = floats(
            &items(f, tags::PLANE_POSITION_SEQUENCE)[0],
            tags::IMAGE_POSITION_PATIENT,
        );
        let derivation = &items(f, tags::DERIVATION_IMAGE_SEQUENCE)[0];
        let source = &items(derivation, tags::SOURCE_IMAGE_SEQUENCE)[0];
        assert_eq!(
            text(source, tags::REFERENCED_SOP_INSTANCE_UID),
            sources[&key(&position)],
            "the frame at {position:?} references the image there"
        );
    }

    // The RTSTRUCT: contours on their images, re-rasterised (even-odd) onto the mask.
    let roi = &items(&rt, tags::ROI_CONTOUR_SEQUENCE)[0];
    let mut per_plane: BTreeMap<usize, Vec<Vec<[f64; 2]>>> = BTreeMap::new();
    for c in items(roi, tags::CONTOUR_SEQUENCE) {
        assert_eq!(text(c, tags::CONTOUR_GEOMETRIC_TYPE), "CLOSED_PLANAR");
        let data = floats(c, tags::CONTOUR_DATA);
        let points: Vec<[f64; 3]> = data
            .chunks(3)
            .map(|p| mask.geometry.world_to_voxel([-p[0], -p[1], p[2]]).unwrap())
            .collect();
        let k = points[0][2].round() as usize;
        assert!(points.iter().all(|p| (p[2] - k as f64).abs() < 1e-4));
        let corner = mask.geometry.voxel_to_world([0.0, 0.0, k as f64]);
        let image = &items(c, tags::CONTOUR_IMAGE_SEQUENCE)[0];
        assert_eq!(
            text(image, tags::REFERENCED_SOP_INSTANCE_UID),
            sources[&key(&[-corner[0], -corner[1], corner[2]])],
            "a contour references the image of its plane"
        );
        per_plane
            .entry(k)
            .or_default()
            .push(points.iter().map(|p| [p[0], p[1]]).collect());
    }
    let mut drawn = vec![false; m.len()];
    for (k, contours) in &per_plane {
        drawn[k * ni * nj..(k + 1) * ni * nj].copy_from_slice(&fill(contours, ni, nj));
    }
    let truth: Vec<bool> = m.iter().map(|v| *v == 1).collect();
    let d = dice(&drawn, &truth);
    assert!(d >= 0.98, "RTSTRUCT re-rasterised Dice {d}");
}

/// A NIfTI scan gets its label map instead of DICOM objects, or objects on a reference series
/// whose planes are its own; a reference series on another grid fails the case after the mask.
#[test]
fn nifti_scans_use_a_matching_reference_series_or_skip() {
    let series = cache("totalsegmentator/example_ct_dicom");
    let tmp = tempfile::tempdir().unwrap();
    let nifti = tmp.path().join("ct.nii.gz");
    ok(&convert(&[
        series.to_str().unwrap(),
        nifti.to_str().unwrap(),
    ]));

    let skipped = tmp.path().join("skipped");
    let log = ok(&segment_to(&skipped, &nifti, &["--format", "dicom-seg"]));
    assert!(
        log.contains("not a DICOM scan: DICOM-SEG/RTSTRUCT skipped"),
        "{log}"
    );
    assert!(
        skipped.join("ct.nii.gz").is_file(),
        "the label map stands in"
    );
    assert!(!skipped.join("ct_seg.dcm").exists());
    // Done means done: a rerun with --skip-existing does nothing.
    let again = segment_to(
        &skipped,
        &nifti,
        &["--format", "dicom-seg", "--skip-existing"],
    );
    assert!(String::from_utf8_lossy(&again.stdout).contains("skipped 1"));

    let placed = tmp.path().join("placed");
    ok(&segment_to(
        &placed,
        &nifti,
        &[
            "--format",
            "dicom-seg,rtstruct",
            "--reference-series",
            series.to_str().unwrap(),
        ],
    ));
    assert!(
        !placed.join("ct.nii.gz").exists(),
        "only the asked-for formats"
    );
    let back = tmp.path().join("back.nii.gz");
    ok(&convert(&[
        placed.join("ct_seg.dcm").to_str().unwrap(),
        back.to_str().unwrap(),
        "--reference",
        nifti.to_str().unwrap(),
    ]));
    let direct = tmp.path().join("direct");
    ok(&segment_to(&direct, &nifti, &[]));
    let back = medseg::io::read_nifti(&back).unwrap();
    let mask = medseg::io::read_nifti(&direct.join("ct.nii.gz")).unwrap();
    assert_eq!(back.voxels, mask.voxels);
    assert!(affine_diff(&back.geometry.affine, &mask.geometry.affine) < 1e-5);

    let misfit = tmp.path().join("misfit");
    let other = cache("totalsegmentator/example_ct_sm.nii.gz");
    let out = segment_to(
        &misfit,
        &other,
        &[
            "--format",
            "dicom-seg",
            "--reference-series",
            series.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("must lie on the scan's planes"), "{stderr}");
    assert!(misfit.join("example_ct_sm.nii.gz").is_file());
}

/// A copy of `series` with `edit` applied to every file's header (pixel data kept as it is).
fn edited_series(
    series: &Path,
    dir: &Path,
    edit: impl Fn(&mut dicom_object::DefaultDicomObject),
) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for e in std::fs::read_dir(series).unwrap() {
        let path = e.unwrap().path();
        let mut obj = dicom_object::open_file(&path).unwrap();
        edit(&mut obj);
        obj.write_to_file(dir.join(path.file_name().unwrap()))
            .unwrap();
    }
    dir.to_path_buf()
}

#[test]
fn a_series_without_frame_of_reference_is_refused_after_its_mask() {
    let tmp = tempfile::tempdir().unwrap();
    let series = edited_series(
        &cache("totalsegmentator/example_ct_dicom"),
        &tmp.path().join("no-for"),
        |o| {
            o.remove_element(tags::FRAME_OF_REFERENCE_UID);
        },
    );
    let out_dir = tmp.path().join("out");
    let out = segment_to(&out_dir, &series, &["--format", "dicom-seg"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no Frame of Reference UID"), "{stderr}");
    let name = case_name(&out_dir);
    assert!(out_dir.join(format!("{name}.nii.gz")).is_file());
    assert!(!out_dir.join(format!("{name}_seg.dcm")).exists());
}

/// Per-lesion ROIs are named and numbered as the lesion table's rows.
#[test]
fn rtstruct_lesion_rois_follow_the_lesion_table() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    ok(&segment_to(
        &out,
        &cache("totalsegmentator/example_ct_dicom"),
        &[
            "--format",
            "rtstruct",
            "--set",
            "segment.rtstruct_rois=lesion",
        ],
    ));
    let name = case_name(&out);
    let table: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join(format!("{name}_lesions.json"))).unwrap())
            .unwrap();
    let expected: Vec<String> = table["lesions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| format!("{} {}", l["label"].as_str().unwrap(), l["id"]))
        .collect();
    assert!(!expected.is_empty());
    let rt = dicom_object::open_file(out.join(format!("{name}_rtstruct.dcm"))).unwrap();
    let names: Vec<String> = items(&rt, tags::STRUCTURE_SET_ROI_SEQUENCE)
        .iter()
        .map(|r| text(r, tags::ROI_NAME))
        .collect();
    assert_eq!(names, expected);
    assert!(items(&rt, tags::ROI_CONTOUR_SEQUENCE)
        .iter()
        .all(|r| !items(r, tags::CONTOUR_SEQUENCE).is_empty()));
}

/// An enhanced multi-frame, oblique MR object: the SEG's frames reference the source frame.
#[test]
fn enhanced_mr_frames_are_referenced_by_number() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let file = std::fs::read_dir(cache("heudiconv"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "dcm"))
        .unwrap();
    ok(&segment_to(
        &out,
        &file,
        &[
            "--format",
            "nifti,dicom-seg",
            "--set",
            "segment.threshold=0.05",
        ],
    ));
    let mut frames_seen = Vec::new();
    for e in std::fs::read_dir(&out).unwrap() {
        let path = e.unwrap().path();
        if !path.to_string_lossy().ends_with("_seg.dcm") {
            continue;
        }
        let seg = dicom_object::open_file(&path).unwrap();
        for f in items(&seg, tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE) {
            let derivation = &items(f, tags::DERIVATION_IMAGE_SEQUENCE)[0];
            let source = &items(derivation, tags::SOURCE_IMAGE_SEQUENCE)[0];
            frames_seen.push(text(source, tags::REFERENCED_FRAME_NUMBER));
        }
        // The frame's orientation is its stack's (oblique), read back onto the mask's grid.
        let name = path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .replace("_seg.dcm", "");
        let mask = medseg::io::read_nifti(&out.join(format!("{name}.nii.gz"))).unwrap();
        assert!(mask.geometry.is_oblique());
        let back = tmp.path().join(format!("{name}-back.nii.gz"));
        ok(&convert(&[
            path.to_str().unwrap(),
            back.to_str().unwrap(),
            "--reference",
            out.join(format!("{name}.nii.gz")).to_str().unwrap(),
        ]));
        assert_eq!(medseg::io::read_nifti(&back).unwrap().voxels, mask.voxels);
    }
    frames_seen.sort();
    frames_seen.dedup();
    assert!(
        !frames_seen.is_empty()
            && frames_seen
                .iter()
                .all(|f| ["1", "2", "3"].contains(&f.as_str())),
        "{frames_seen:?}"
    );
}

/// A SEG written by another tool (pydicom's test file, cut down to one frame but keeping three
/// per-frame groups) reads as a label map with pydicom's count of set bits, with a warning.
#[test]
fn a_third_party_seg_reads_as_a_label_map() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("liver.nii.gz");
    let log = ok(&convert(&[
        cache("pydicom/liver_1frame.dcm").to_str().unwrap(),
        out.to_str().unwrap(),
    ]));
    assert!(log.contains("segment 1 \"Liver\" -> label 1"), "{log}");
    assert!(log.contains("the first 1 were used"), "{log}");
    let v = medseg::io::read_nifti(&out).unwrap();
    assert_eq!(v.geometry.dims, [512, 512, 1]);
    assert_eq!(v.voxels.iter().filter(|x| **x == 1.0).count(), 36233);
}
