use std::path::PathBuf;

use medseg::Volume;

/// A file under `datasets/cache/`; fails with the fix when the data was not fetched.
pub fn cache(rel: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("datasets/cache")
        .join(rel);
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-data.sh first",
        p.display()
    );
    p
}

pub fn reference(name: &str) -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

pub fn json_affine(v: &serde_json::Value) -> [[f64; 4]; 4] {
    std::array::from_fn(|r| std::array::from_fn(|c| v[r][c].as_f64().unwrap()))
}

/// Largest entry-wise difference of two affines.
pub fn affine_diff(a: &[[f64; 4]; 4], b: &[[f64; 4]; 4]) -> f64 {
    (0..4)
        .flat_map(|r| (0..4).map(move |c| (r, c)))
        .map(|(r, c)| (a[r][c] - b[r][c]).abs())
        .fold(0.0, f64::max)
}

/// Sum of all voxels in f64.
pub fn sum(v: &Volume) -> f64 {
    v.voxels.iter().map(|&x| x as f64).sum()
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_medseg"))
}
