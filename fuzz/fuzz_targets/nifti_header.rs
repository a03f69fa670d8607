//! NIfTI-1/NIfTI-2 header parsing and voxel decoding from arbitrary bytes: must error, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.nii");
    let _ = medseg::io::nifti::read_nifti_bytes(path, data);
});
