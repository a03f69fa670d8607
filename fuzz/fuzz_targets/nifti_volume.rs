//! The NIfTI reader through the file path, data included: plain or gzip-compressed (the first
//! byte chooses), discovered, read, and what was read written and read back unchanged.
//! Must error, never panic; a volume that reads must round-trip.
#![no_main]

use std::io::Write;
use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;
use medseg::io::nifti::{read_nifti, write_nifti};
use medseg::volume::DataType;

fn scratch(name: &str) -> PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    base.join(format!("medseg-fuzz-{}-{name}", std::process::id()))
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let gzip = control & 1 == 1;
    let path = scratch(if gzip { "in.nii.gz" } else { "in.nii" });
    let bytes = if gzip {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(rest).expect("gzip to memory");
        enc.finish().expect("gzip to memory")
    } else {
        rest.to_vec()
    };
    std::fs::write(&path, &bytes).expect("scratch file");
    let _ = medseg::io::discover(&path);
    if let Ok(volume) = read_nifti(&path) {
        let _ = volume.non_finite();
        let _ = volume.value_range();
        let back = scratch("back.nii");
        // float32 holds every stored type's values; the property is about geometry and shape.
        write_nifti(&volume, &back, DataType::Float32)
            .expect("a volume that was read can be written");
        let again = read_nifti(&back).expect("what medseg wrote reads back");
        assert_eq!(again.voxels.dim(), volume.voxels.dim());
        assert_eq!(again.geometry.dims, volume.geometry.dims);
        let _ = std::fs::remove_file(&back);
    }
    let _ = std::fs::remove_file(&path);
});
