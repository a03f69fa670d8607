//! DICOM object parsing, header extraction and pixel decoding from arbitrary bytes: must error,
//! never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use medseg::io::dicom;

fuzz_target!(|data: &[u8]| {
    // medseg turns decoder panics into errors (catch_unwind); libfuzzer-sys's hook would abort on
    // them first, so keep the default hook: a panic that escapes still aborts and is reported.
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let _ = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
    });
    let path = std::path::Path::new("fuzz.dcm");
    if let Ok(obj) = dicom::open_bytes(path, data, false) {
        let _ = dicom::SliceHeader::from_object(path, &obj);
        let _ = dicom::read_object(path, &obj, None);
    }
});
