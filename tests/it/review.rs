//! Issue 18: `medseg evaluate --review` on a real scan given an oblique, anisotropic affine, with
//! spherical truth and predicted lesions placed in voxels and their world positions computed here
//! from the affine. (The browser side, NiiVue reading the page, is `scripts/check-review.sh`.)

use std::path::Path;
use std::process::Command;

use base64::Engine as _;
use medseg::io::{gzip, read_nifti, write_nifti};
use medseg::DataType;

use crate::common::{affine_diff, bin, cache};

/// Voxels `(k, j, i)` within `r` voxels of `centre` `[i, j, k]`.
fn ball(centre: [f64; 3], r: f64) -> impl Fn(usize, usize, usize) -> bool {
    move |k, j, i| {
        let d = [
            i as f64 - centre[0],
            j as f64 - centre[1],
            k as f64 - centre[2],
        ];
        d.iter().map(|x| x * x).sum::<f64>() <= r * r
    }
}

/// What a reader that stops after the first gzip member gets.
pub fn one_member(gz: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn world(a: &[[f64; 4]; 4], v: [f64; 3]) -> [f64; 3] {
    std::array::from_fn(|r| a[r][0] * v[0] + a[r][1] * v[1] + a[r][2] * v[2] + a[r][3])
}

/// The base64 volumes of a case script, in the order of its `volumes` list, with their roles.
pub fn case_volumes(js: &str) -> Vec<(String, Vec<u8>)> {
    let meta = js
        .strip_prefix("window.MEDSEG_CASE = ")
        .and_then(|s| s.split_once(";\nwindow.MEDSEG_VOLUMES = "))
        .unwrap();
    let data: serde_json::Value = serde_json::from_str(meta.0).unwrap();
    let list = meta
        .1
        .trim_end()
        .trim_end_matches("];")
        .trim_start_matches('[');
    let blobs: Vec<Vec<u8>> = list
        .split(",\n")
        .map(|s| s.trim().trim_matches('"'))
        .filter(|s| !s.is_empty())
        .map(|s| base64::engine::general_purpose::STANDARD.decode(s).unwrap())
        .collect();
    let roles: Vec<String> = data["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["role"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(roles.len(), blobs.len());
    roles.into_iter().zip(blobs).collect()
}

fn evaluate(dir: &Path, out: &str, niivue: &std::ffi::OsStr) -> std::process::Output {
    Command::new(bin())
        .args(["evaluate", "--review", "--pred"])
        .arg(dir.join("pred"))
        .arg("--truth")
        .arg(dir.join("truth"))
        .arg("--images")
        .arg(dir.join("images"))
        .arg("--output")
        .arg(dir.join(out))
        .env("MEDSEG_NIIVUE", niivue)
        .output()
        .unwrap()
}

#[test]
fn evaluate_review_lists_cases_and_places_lesions_in_world_mm() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for d in ["images", "truth", "pred"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    let mut scan = read_nifti(&cache("itk/KmeansTest_T1UCharRaw.nii.gz")).unwrap();
    // Oblique and anisotropic: rotated 30° about z, 0.9 × 1.3 × 2.5 mm.
    let (c, s) = (30f64.to_radians().cos(), 30f64.to_radians().sin());
    let affine = [
        [0.9 * c, -1.3 * s, 0.0, -40.0],
        [0.9 * s, 1.3 * c, 0.0, 12.0],
        [0.0, 0.0, 2.5, -70.0],
        [0.0, 0.0, 0.0, 1.0],
    ];
    scan.geometry.affine = affine;
    let (found, missed, false_pos) = ([40.0, 60.0, 30.0], [90.0, 70.0, 20.0], [64.0, 30.0, 40.0]);
    let label = |f: &dyn Fn(usize, usize, usize) -> bool| {
        let mut v = scan.clone();
        for ((_, k, j, i), x) in v.voxels.indexed_iter_mut() {
            *x = if f(k, j, i) { 1.0 } else { 0.0 };
        }
        v
    };
    let (tf, tm) = (ball(found, 5.0), ball(missed, 4.0));
    let truth = label(&|k, j, i| tf(k, j, i) || tm(k, j, i));
    let (pf, pp) = (ball(found, 5.0), ball(false_pos, 3.0));
    let pred = label(&|k, j, i| pf(k, j, i) || pp(k, j, i));
    // Case a: one of each finding; case b: the truth predicted exactly (Dice 1).
    write_nifti(&scan, &dir.join("images/a_0000.nii.gz"), DataType::Uint8).unwrap();
    write_nifti(&scan, &dir.join("images/b_0000.nii.gz"), DataType::Uint8).unwrap();
    write_nifti(&truth, &dir.join("truth/a.nii.gz"), DataType::Uint8).unwrap();
    write_nifti(&truth, &dir.join("truth/b.nii.gz"), DataType::Uint8).unwrap();
    write_nifti(&pred, &dir.join("pred/a.nii.gz"), DataType::Uint8).unwrap();
    write_nifti(&truth, &dir.join("pred/b.nii.gz"), DataType::Uint8).unwrap();

    let fake_viewer = dir.join("viewer.js");
    std::fs::write(&fake_viewer, "/* a stand-in for NiiVue */").unwrap();
    let out = evaluate(dir, "eval", fake_viewer.as_os_str());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let review = dir.join("eval/review");
    assert!(String::from_utf8_lossy(&out.stdout).contains("review page:"));
    assert_eq!(
        std::fs::read(review.join("viewer/niivue-0.69.0.js")).unwrap(),
        std::fs::read(&fake_viewer).unwrap()
    );
    // The index lists both cases, worst (a) first, each linking to its own page.
    let index = std::fs::read_to_string(review.join("index.html")).unwrap();
    let (pa, pb) = (index.find(">a</a>").unwrap(), index.find(">b</a>").unwrap());
    assert!(pa < pb, "worst case first");
    assert!(
        index.contains("href=\"cases/0001.html\"") && index.contains("href=\"cases/0002.html\"")
    );
    let page = std::fs::read_to_string(review.join("cases/0001.html")).unwrap();
    assert!(page.contains("<script src=\"0001.js\">") && !page.contains("0002.js"));
    assert!(page.contains("../viewer/niivue-0.69.0.js"));
    assert!(review.join("cases/0001.png").is_file());

    // Rows: the found lesion (TP), the false one (FP), the missed one (FN), each at its sphere's
    // centre in world mm.
    let rows: Vec<(&str, [f64; 3])> = page
        .split("<tr class=\"lesion ")
        .skip(1)
        .map(|r| {
            let finding = r.split('"').next().unwrap();
            let mm = r
                .split("data-mm=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap();
            let v: Vec<f64> = mm.split(',').map(|x| x.parse().unwrap()).collect();
            (finding, [v[0], v[1], v[2]])
        })
        .collect();
    // (The affine as stored: NIfTI keeps it in float32.)
    let stored = read_nifti(&dir.join("truth/a.nii.gz"))
        .unwrap()
        .geometry
        .affine;
    let expect = [("tp", found), ("fp", false_pos), ("fn", missed)];
    assert_eq!(rows.len(), 3, "{rows:?}");
    for (finding, centre) in expect {
        let want = world(&stored, centre);
        let row = rows.iter().find(|r| r.0 == finding).unwrap();
        let err = (0..3)
            .map(|a| (row.1[a] - want[a]).abs())
            .fold(0.0, f64::max);
        assert!(err < 1e-6, "{finding}: {:?} vs {want:?}", row.1);
    }
    assert!(
        rows[0].0 == "tp" || rows[0].0 == "fp",
        "predictions before misses"
    );
    assert_eq!(rows[2].0, "fn");

    // The page carries the files medseg read, with the same bytes inside one gzip member (NiiVue's
    // browser inflater stops after the first member of medseg's blocked gzip), and the truth's
    // outline on its grid.
    let volumes = case_volumes(&std::fs::read_to_string(review.join("cases/0001.js")).unwrap());
    let roles: Vec<&str> = volumes.iter().map(|v| v.0.as_str()).collect();
    assert_eq!(roles, ["scan", "prediction", "truth"]);
    for (n, file) in [(0, "images/a_0000.nii.gz"), (1, "pred/a.nii.gz")] {
        assert_eq!(
            one_member(&volumes[n].1),
            gzip::decompress(&std::fs::read(dir.join(file)).unwrap()).unwrap()
        );
    }
    let outline_path = dir.join("outline.nii");
    std::fs::write(&outline_path, one_member(&volumes[2].1)).unwrap();
    let outline = read_nifti(&outline_path).unwrap();
    assert_eq!(outline.geometry.dims, truth.geometry.dims);
    assert!(affine_diff(&outline.geometry.affine, &stored) < 1e-9);
    let (mut surface, mut inside) = (0, 0);
    for (o, t) in outline.voxels.iter().zip(truth.voxels.iter()) {
        assert!(*o == 0.0 || *t == 1.0, "outline outside the truth");
        surface += (*o == 1.0) as usize;
        inside += (*t == 1.0) as usize;
    }
    assert!(surface > 0 && surface < inside, "{surface} of {inside}");

    // Without the viewer: the static page, a warning with the fix; a wrong path is an error.
    let out = evaluate(dir, "eval-plain", std::ffi::OsStr::new(""));
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("scripts/fetch-viewer.sh"));
    let page = std::fs::read_to_string(dir.join("eval-plain/review/cases/0001.html")).unwrap();
    assert!(
        !page.contains("../viewer/")
            && !page.contains("case.js")
            && page.contains("0001.png")
            && page.contains("fetch-viewer.sh")
    );
    let out = evaluate(
        dir,
        "eval-bad",
        std::ffi::OsStr::new("/nonexistent/niivue.js"),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(!dir.join("eval-bad").exists(), "stopped before any work");
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/niivue.js"));
}
