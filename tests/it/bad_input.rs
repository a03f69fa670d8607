//! Bad input gives an error that names the file, never a panic.

use std::path::Path;

use medseg::io::{discover, read_nifti, read_volume};
use medseg::Error;

use crate::common::cache;

fn assert_names(err: &Error, path: &Path) {
    let name = path.file_name().unwrap().to_string_lossy().to_string();
    assert!(
        err.to_string().contains(&name),
        "error does not name {name}: {err}"
    );
}

#[test]
fn non_dicom_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("notes.txt");
    std::fs::write(&p, "this is not a scan").unwrap();
    let err = read_volume(&p, None).unwrap_err();
    assert!(matches!(err, Error::InvalidDicom { .. }), "{err}");
    assert_names(&err, &p);
}

#[test]
fn empty_directory_finds_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let err = discover(dir.path()).unwrap_err();
    assert!(matches!(err, Error::NothingFound { .. }), "{err}");
    assert!(err.to_string().contains("empty"), "{err}");
}

#[test]
fn truncated_gzip_nifti_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(cache("nibabel/example4d.nii.gz")).unwrap();
    let p = dir.path().join("truncated.nii.gz");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let err = read_nifti(&p).unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");
    assert_names(&err, &p);
}

#[test]
fn an_all_zero_sform_is_refused_not_written_through() {
    // A real file with sform_code 1 and srow_x/y/z all zero, qform_code 0: nibabel would give a
    // zero affine; medseg refuses the file, naming it and the singular affine.
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(cache("nibabel/anatomical.nii")).unwrap();
    // anatomical.nii is big-endian: qform_code (i16) at 252, sform_code at 254, srow at 280..328.
    bytes[252..254].copy_from_slice(&0i16.to_be_bytes());
    bytes[254..256].copy_from_slice(&1i16.to_be_bytes());
    bytes[280..328].fill(0);
    let p = dir.path().join("zero_sform.nii");
    std::fs::write(&p, &bytes).unwrap();
    let err = read_nifti(&p).unwrap_err();
    assert!(err.to_string().contains("singular affine"), "{err}");
    assert_names(&err, &p);
    // With both codes 0 the pixdim fallback (Analyze convention) still applies, as in nibabel.
    bytes[254..256].copy_from_slice(&0i16.to_be_bytes());
    std::fs::write(&p, &bytes).unwrap();
    let v = read_nifti(&p).unwrap();
    assert!(v.geometry.problem().is_none());
    assert!(v.info.warnings.iter().any(|w| w.contains("pixdim")));
}

#[test]
fn dims_that_disagree_with_the_data_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(cache("nibabel/anatomical.nii")).unwrap();
    // anatomical.nii is big-endian: dim[1] at byte 42 as a big-endian i16. Double it.
    let d1 = i16::from_be_bytes([bytes[42], bytes[43]]);
    bytes[42..44].copy_from_slice(&(d1 * 2).to_be_bytes());
    let p = dir.path().join("bad_dims.nii");
    std::fs::write(&p, &bytes).unwrap();
    let err = read_nifti(&p).unwrap_err();
    assert!(err.to_string().contains("data bytes"), "{err}");
    assert_names(&err, &p);
}

#[test]
fn unsupported_transfer_syntax_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(cache("pydicom/MR_small_jp2klossless.dcm")).unwrap();
    // Same length UID: JPEG 2000 lossless (…4.90) → JPIP Referenced (…4.94), which has no codec.
    let from = b"1.2.840.10008.1.2.4.90";
    let at = bytes.windows(from.len()).position(|w| w == from).unwrap();
    bytes[at..at + from.len()].copy_from_slice(b"1.2.840.10008.1.2.4.94");
    let p = dir.path().join("jpip.dcm");
    std::fs::write(&p, &bytes).unwrap();
    let err = read_volume(&p, None).unwrap_err();
    assert_names(&err, &p);
}

#[test]
fn directory_mixing_series_lists_them() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(cache("pydicom/CT_small.dcm"), dir.path().join("a.dcm")).unwrap();
    std::fs::copy(cache("pydicom/MR_small.dcm"), dir.path().join("b.dcm")).unwrap();
    std::fs::write(dir.path().join("README"), "not dicom").unwrap();
    let found = discover(dir.path()).unwrap();
    assert_eq!(found.sources.len(), 2);
    assert_eq!(found.skipped.len(), 1);
    match read_volume(dir.path(), None).unwrap_err() {
        Error::AmbiguousSeries { series, .. } => {
            let modalities: Vec<_> = series.iter().map(|s| s.modality.as_str()).collect();
            assert!(
                modalities.contains(&"CT") && modalities.contains(&"MR"),
                "{series:?}"
            );
        }
        other => panic!("expected the list of series, got {other}"),
    }
    // Picking one by UID works.
    let uid = found.sources[0].choice().uid;
    read_volume(dir.path(), Some(&uid)).unwrap();
}

/// Every prefix of real headers (cut anywhere in the first 600 bytes) errors cleanly.
#[test]
fn truncated_headers_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    for rel in ["nibabel/anatomical.nii", "pydicom/CT_small.dcm"] {
        let bytes = std::fs::read(cache(rel)).unwrap();
        let ext = if rel.ends_with(".nii") { "nii" } else { "dcm" };
        for cut in (0..600).step_by(7) {
            let p = dir.path().join(format!("cut{cut}.{ext}"));
            std::fs::write(&p, &bytes[..cut.min(bytes.len())]).unwrap();
            assert!(
                read_volume(&p, None).is_err(),
                "{rel} cut at {cut} should fail"
            );
        }
    }
}

/// Inputs the fuzzers once found trouble with (`tests/data/fuzz/`): each must fail cleanly, in
/// bounded memory, through the same in-memory entry points the fuzz targets use.
#[test]
fn fuzz_regressions_fail_cleanly() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/fuzz");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("dicom_object") {
            let read = medseg::io::dicom::open_bytes(&path, &bytes, false)
                .and_then(|obj| medseg::io::dicom::read_object(&path, &obj, None));
            let err = read.expect_err(&name);
            assert!(
                err.to_string().contains("fuzz"),
                "error does not name the file: {err}"
            );
            // Declared lengths of gigabytes (in a deflated data set, a corrupt deflate stream or
            // the file meta group) are refused, by the strict and by the tolerant reading,
            // before a parser reserves and zero-fills them.
            if name.contains("deflated") || name.contains("oom-meta") {
                assert!(err.to_string().contains("declares"), "{err}");
                let err = medseg::io::dicom::open(&path, false).expect_err(&name);
                assert!(err.to_string().contains("declares"), "{err}");
            }
            // A 3 KB JPEG 2000 frame declaring a huge image: refused before the decoder
            // allocates it.
            if name.contains("oom-j2k") {
                assert!(
                    err.to_string().contains("compressed frame declares"),
                    "{err}"
                );
            }
        } else {
            assert!(
                medseg::io::nifti::read_nifti_bytes(&path, &bytes).is_err(),
                "{name}"
            );
        }
        n += 1;
    }
    assert!(n > 0);
}

/// Seeded mutations of real files (flipped bytes, huge lengths, truncation, appended garbage) go
/// through the whole file path, the tolerant second reading included: every one gives a volume or
/// an error naming the file, never a panic or a runaway allocation.
#[test]
fn mutated_dicom_files_read_or_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut read, mut refused) = (0, 0);
    for rel in [
        "pydicom/CT_small.dcm",
        "pydicom/MR_small_implicit.dcm",
        "pydicom/liver_1frame.dcm",
        "pydicom/MR_small_RLE.dcm",
    ] {
        let original = std::fs::read(cache(rel)).unwrap();
        for n in 0..150 {
            let mut bytes = original.clone();
            let at = 132 + (next() as usize) % (bytes.len() - 136);
            match n % 4 {
                0 => bytes[at] ^= 1 << (next() % 8),
                1 => bytes[at..at + 4].copy_from_slice(&[0xFF, 0xFF, 0xFF, 0x7F]),
                2 => bytes.truncate(at),
                _ => bytes.extend((0..(next() % 300)).map(|_| next() as u8)),
            }
            let path = dir.path().join(format!("mutant{n}.dcm"));
            std::fs::write(&path, &bytes).unwrap();
            match read_volume(&path, None) {
                Ok(_) => read += 1,
                Err(e) => {
                    assert!(e.to_string().contains(&format!("mutant{n}")), "{rel}: {e}");
                    refused += 1;
                }
            }
        }
    }
    assert!(read > 0 && refused > 0, "read {read}, refused {refused}");
}
