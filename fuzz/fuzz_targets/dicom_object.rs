//! DICOM object parsing, header extraction and pixel decoding from arbitrary bytes: must error,
//! never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use medseg::io::dicom;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.dcm");
    if let Ok(obj) = dicom::open_bytes(path, data, false) {
        let _ = dicom::SliceHeader::from_object(path, &obj);
        let _ = dicom::read_object(path, &obj, None);
    }
});
