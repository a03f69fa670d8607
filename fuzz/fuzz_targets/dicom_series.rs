//! The series assembler: a directory of several fuzzed slices, discovered, grouped, ordered and
//! read as volumes. Must error, never panic.
//!
//! The first byte steers the shape of the directory. When the rest holds one DICOM object, it is
//! written 2–5 times with positions along its normal that may repeat, reverse or jump (what real
//! series get wrong); otherwise the rest is split at `SLICE|` and each part written as it is.
#![no_main]

use std::path::PathBuf;

use dicom_core::value::PrimitiveValue;
use dicom_core::{DataElement, VR};
use dicom_dictionary_std::tags;
use libfuzzer_sys::fuzz_target;
use medseg::io::dicom;

const SEPARATOR: &[u8] = b"SLICE|";

fn scratch() -> PathBuf {
    // One directory per fuzzing process, emptied for every input (tmpfs when there is one).
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    base.join(format!("medseg-fuzz-series-{}", std::process::id()))
}

fn split(data: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let mut rest = data;
    while let Some(at) = rest.windows(SEPARATOR.len()).position(|w| w == SEPARATOR) {
        parts.push(&rest[..at]);
        rest = &rest[at + SEPARATOR.len()..];
    }
    parts.push(rest);
    parts
}

/// Copies of one object with positions `origin + step_i × normal-ish offsets` and their own UIDs.
fn copies(control: u8, bytes: &[u8], dir: &std::path::Path) -> bool {
    let Ok(obj) = dicom::open_bytes(std::path::Path::new("seed.dcm"), bytes, false) else {
        return false;
    };
    let count = 2 + (control & 3) as usize;
    let step = [0.0, 1.0, 2.5, -1.0, 5.0, 1e-7, 1e6, f64::NAN][((control >> 2) & 7) as usize];
    for n in 0..count {
        let mut copy = obj.clone();
        // Every third copy of a "jumping" series skips a slot: a missing slice.
        let slot = if control & 0x20 != 0 && n > 0 && n % 3 == 0 {
            n + 1
        } else {
            n
        };
        let z = step * slot as f64;
        copy.put(DataElement::new(
            tags::IMAGE_POSITION_PATIENT,
            VR::DS,
            PrimitiveValue::from(format!("0\\0\\{z}")),
        ));
        copy.put(DataElement::new(
            tags::INSTANCE_NUMBER,
            VR::IS,
            PrimitiveValue::from(format!("{}", n + 1)),
        ));
        if control & 0x40 == 0 {
            copy.put(DataElement::new(
                tags::SOP_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from(format!("2.25.{}", n + 1)),
            ));
        }
        if copy
            .write_to_file(dir.join(format!("slice{n}.dcm")))
            .is_err()
        {
            return false;
        }
    }
    true
}

fuzz_target!(|data: &[u8]| {
    // medseg turns decoder panics into errors (catch_unwind); keep them quiet, as in dicom_object.
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let _ = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
    });
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let dir = scratch();
    let _ = std::fs::remove_dir_all(&dir);
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    let parts = split(rest);
    if parts.len() > 1 || !copies(control, rest, &dir) {
        for (n, part) in parts.iter().take(8).enumerate() {
            let _ = std::fs::write(dir.join(format!("part{n}.dcm")), part);
        }
    }
    if let Ok(found) = medseg::io::discover(&dir) {
        for source in &found.sources {
            let _ = source.load();
        }
    }
    // MEDSEG_FUZZ_KEEP=1 keeps the directory of the last input, to replay a finding with medseg.
    if std::env::var_os("MEDSEG_FUZZ_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
});
