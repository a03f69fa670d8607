//! The review page (`segment --review`, `evaluate --review`): `review/index.html`, a sortable list
//! of the cases, and one page per case (`review/cases/NNNN.html`) that shows the scan, the
//! prediction, the truth's outline and a probability, uncertainty or attention map in NiiVue, with
//! the lesion table beside it.
//!
//! It opens from the file system with no server. Browsers refuse `fetch` and module scripts from
//! `file://` pages, so each case's volumes travel base64-encoded in a classic script of its own
//! (`cases/NNNN.js`, loaded only by that case's page), and NiiVue comes as a classic script
//! (`scripts/fetch-viewer.sh` makes it from the pinned npm tarball). Without the viewer or without
//! JavaScript the pages still show each case's static picture and its tables.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use ndarray::{Array3, ArrayView3, Axis};
use serde::Serialize;

use super::lesions::LesionMatch;
use super::{case_scan, lesion_table, CasePair, CaseResult, EvalConfig};
use crate::error::{Error, Result};
use crate::infer::batch::BatchInput;
use crate::io::gzip;
use crate::io::layout::{
    BatchSummary, CaseOutputs, CaseStatus, LabelsSidecar, Lesion, LesionTable,
};
use crate::io::nifti::{
    inflate, is_gzip, parse_header, read_nifti_bytes, write_label_map, NiftiHeader,
};
use crate::io::plot::{overlay_tile, plot_err};
use crate::io::ScanSource;
use crate::io::{read_json, read_nifti, write_atomically, write_nifti, write_parts_atomically};
use crate::transforms::intensity::display_window;
use crate::volume::{DataType, Volume};

/// File name of the classic-script NiiVue (npm `@niivue/niivue` 0.69.0, BSD-2-Clause) that
/// `scripts/fetch-viewer.sh` writes and the review folder carries (`review/viewer/`).
pub const VIEWER_FILE: &str = "niivue-0.69.0.js";

const CASE_SCRIPT: &str = include_str!("review/case.js");
const SORT_SCRIPT: &str = include_str!("review/sort.js");
const STYLE: &str = include_str!("review/review.css");

/// Where a case's scan comes from.
pub enum ReviewScan {
    /// A NIfTI file, embedded as it is (gzipped when it is not).
    Nifti(PathBuf),
    /// Anything else (a DICOM series, channels from several files): read, then written as NIfTI.
    Load(Box<dyn Fn() -> Result<Volume>>),
}

/// A map shown as the optional third layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReviewMap {
    /// `NAME_probabilities.nii.gz`: the foreground probability.
    Probabilities,
    /// `NAME_uncertainty.nii.gz`: the entropy (first volume; the variance is the second).
    Uncertainty,
    /// `NAME_attention.nii.gz`: the Transformer's attention.
    Attention,
}

/// How a lesion fared against the truth (`evaluate --review`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Finding {
    /// A predicted lesion matched by a truth lesion.
    Tp,
    /// A predicted lesion with no truth lesion.
    Fp,
    /// A truth lesion that no prediction found (its row comes from the truth).
    Fn,
}

/// One row of a case's lesion table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReviewLesion {
    /// The class name.
    pub label: String,
    /// Against the truth, when there is one.
    pub finding: Option<Finding>,
    /// Mean voxel-centre position, RAS mm (where the crosshair goes).
    pub centroid_mm: [f64; 3],
    /// Volume, mm³.
    pub volume_mm3: f64,
    /// 3D Feret diameter, mm (from medseg's lesion table).
    pub diameter_mm: Option<f64>,
    /// Detection confidence.
    pub confidence: Option<f64>,
    /// Whether it reaches the region of interest, with an ROI stage.
    pub inside_roi: Option<bool>,
}

/// A case's scores against the truth (`evaluate --review`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReviewScores {
    /// Mean Dice over the evaluated classes; `None` when no class was evaluated.
    pub dice: Option<f64>,
    /// Mean HD95 over the classes where it is defined, mm (NaN when none is).
    pub hd95_mm: f64,
    /// Lesions found.
    pub tp: usize,
    /// Predicted lesions with no truth.
    pub fp: usize,
    /// Truth lesions missed.
    pub fn_: usize,
}

/// Everything one case's page shows.
pub struct ReviewCase {
    /// The case name.
    pub name: String,
    /// The scan; without one the prediction is shown on its own.
    pub scan: Option<ReviewScan>,
    /// The predicted label map.
    pub prediction: Option<PathBuf>,
    /// The truth label map.
    pub truth: Option<PathBuf>,
    /// Optional maps on the scan's grid.
    pub maps: Vec<(ReviewMap, PathBuf)>,
    /// Class names by label value (`[0]` is the background).
    pub labels: Vec<String>,
    /// Label values outlined in the static picture (the lesion classes); empty: every class.
    pub outlined: Vec<u32>,
    /// The lesion table, in the order shown.
    pub lesions: Vec<ReviewLesion>,
    /// Scores against the truth.
    pub scores: Option<ReviewScores>,
    /// What the reader should know that the page cannot show (a lesion table that cannot be
    /// read, a mask written only as DICOM).
    pub warnings: Vec<String>,
}

/// What [`write_review`] wrote.
#[derive(Debug, Clone)]
pub struct ReviewWritten {
    /// `review/index.html`.
    pub index: PathBuf,
    /// Cases with a page.
    pub cases: usize,
    /// Cases whose page shows an error instead of the viewer, with the reason.
    pub failed: Vec<(String, String)>,
    /// Cases whose page carries a warning, with it.
    pub warnings: Vec<(String, String)>,
    /// Whether the interactive viewer was bundled.
    pub viewer: bool,
}

/// The maps `medseg segment` wrote beside case `name`'s label map in `dir`.
pub fn maps_beside(dir: &Path, name: &str) -> Vec<(ReviewMap, PathBuf)> {
    let o = CaseOutputs::new(dir, name, true, false).with_maps(dir, name, true, true);
    [
        (ReviewMap::Probabilities, o.probabilities),
        (ReviewMap::Uncertainty, o.uncertainty),
        (ReviewMap::Attention, o.attention),
    ]
    .into_iter()
    .filter_map(|(kind, path)| path.filter(|p| p.is_file()).map(|p| (kind, p)))
    .collect()
}

/// The cases of a `medseg segment` batch in `dir` that have a label map (segmented now or
/// before), in the batch's order: their scans read from `inputs`, with the lesion tables and maps
/// written beside them. `labels` names the model's classes; `max_read_bytes` bounds a scan's read
/// as `--max-memory` bounded the batch's.
pub fn segmentation_cases(
    dir: &Path,
    inputs: &[BatchInput],
    summary: &BatchSummary,
    labels: &[String],
    max_read_bytes: Option<u64>,
) -> Vec<ReviewCase> {
    // Batches run to thousands of cases: find each one's input by name, not by a scan.
    let by_name: HashMap<&str, &BatchInput> = inputs.iter().map(|i| (i.name.as_str(), i)).collect();
    summary
        .cases
        .iter()
        .filter(|c| matches!(c.status, CaseStatus::Segmented | CaseStatus::Skipped))
        .filter_map(|c| {
            let input = *by_name.get(c.case.as_str())?;
            let outputs = CaseOutputs::new(dir, &c.case, false, false);
            let mut warnings = Vec::new();
            let table: Option<LesionTable> = match read_json(&outputs.lesions_json) {
                Ok(t) => Some(t),
                Err(e) => {
                    warnings.push(format!("no lesion table: {e}"));
                    None
                }
            };
            if !outputs.mask.is_file() {
                warnings.push(format!(
                    "no NIfTI label map ({}): segment with --format nifti (beside the DICOM formats) to see the mask here",
                    outputs.mask.display()
                ));
            }
            let lesions = table.as_ref().map(table_lesions).unwrap_or_default();
            // With a region-of-interest stage, the organ's own rows carry no `inside_roi`: the
            // lesion classes are the others.
            let rows = table.as_ref().map_or(&[][..], |t| &t.lesions[..]);
            let roi_stage = rows.iter().any(|l| l.inside_roi.is_some());
            let mut outlined: Vec<u32> = rows
                .iter()
                .filter(|l| !roi_stage || l.inside_roi.is_some())
                .map(|l| l.class)
                .collect();
            outlined.sort_unstable();
            outlined.dedup();
            let scan = match input.source() {
                Some(ScanSource::Nifti(p)) => ReviewScan::Nifti(p.clone()),
                _ => {
                    let input = input.clone();
                    ReviewScan::Load(Box::new(move || input.load_within(max_read_bytes)))
                }
            };
            Some(ReviewCase {
                name: c.case.clone(),
                scan: Some(scan),
                prediction: outputs.mask.is_file().then_some(outputs.mask),
                truth: None,
                maps: maps_beside(dir, &c.case),
                labels: labels.to_vec(),
                outlined,
                lesions,
                scores: None,
                warnings,
            })
        })
        .collect()
}

/// A medseg lesion table's rows, in its order (most confident first).
pub fn table_lesions(table: &LesionTable) -> Vec<ReviewLesion> {
    table
        .lesions
        .iter()
        .map(|l| ReviewLesion {
            label: l.label.clone(),
            finding: None,
            centroid_mm: l.centroid_mm,
            volume_mm3: l.volume_mm3,
            diameter_mm: Some(l.diameter_mm),
            confidence: l.confidence.or(Some(l.max_probability)),
            inside_roi: l.inside_roi,
        })
        .collect()
}

/// The cases of an evaluation: each pair's scan (from `images`, as the overlay montage finds it),
/// prediction, truth, the maps beside the prediction, and its lesions marked TP, FP or FN (found
/// ones most confident first, then the missed ones, largest first).
pub fn evaluation_cases(
    pairs: &[CasePair],
    results: &[CaseResult],
    images: Option<&Path>,
    config: &EvalConfig,
) -> Vec<ReviewCase> {
    pairs
        .iter()
        .map(|pair| {
            let result = results.iter().find(|r| r.case == pair.case);
            let pred_dir = pair.pred.as_deref().and_then(Path::parent);
            let mut warnings = Vec::new();
            let rows = lesion_table(pair).unwrap_or_else(|e| {
                warnings.push(format!("lesion table: {e}"));
                None
            });
            let maps = pred_dir.map_or_else(Vec::new, |d| maps_beside(d, &pair.case));
            // Without a table or a probability map evaluate scored every lesion as confidence 1:
            // shown as unknown, not as certain.
            let confident = rows.is_some() || maps.iter().any(|m| m.0 == ReviewMap::Probabilities);
            let labels = if config.labels.is_empty() {
                table_labels(pred_dir, &pair.case)
            } else {
                config.labels.clone()
            };
            let judge = Judge {
                rows: rows.as_deref().unwrap_or_default(),
                labels: &labels,
                config,
                confident,
            };
            let mut lesions: Vec<ReviewLesion> = result
                .map(|r| r.lesions.iter().flat_map(|(_, m)| judge.rows(m)).collect())
                .unwrap_or_default();
            let rank = |l: &ReviewLesion| (l.finding == Some(Finding::Fn)) as u8;
            lesions.sort_by(|a, b| {
                rank(a).cmp(&rank(b)).then(
                    b.confidence
                        .unwrap_or(-1.0)
                        .total_cmp(&a.confidence.unwrap_or(-1.0))
                        .then(b.volume_mm3.total_cmp(&a.volume_mm3)),
                )
            });
            ReviewCase {
                name: pair.case.clone(),
                scan: images
                    .and_then(|dir| case_scan(dir, &pair.case))
                    .map(ReviewScan::Nifti),
                prediction: pair.pred.clone(),
                truth: Some(pair.truth.clone()),
                maps,
                labels,
                outlined: config.lesion_classes.clone().unwrap_or_default(),
                lesions,
                scores: result.map(scores),
                warnings,
            }
        })
        .collect()
}

/// Class names from segment's `NAME_labels.json` beside the prediction, when there is one.
fn table_labels(pred_dir: Option<&Path>, case: &str) -> Vec<String> {
    pred_dir
        .map(|d| CaseOutputs::new(d, case, false, false).labels)
        .and_then(|p| read_json::<LabelsSidecar>(&p).ok())
        .map(|s| s.names())
        .unwrap_or_default()
}

/// How a case's matched lesions become rows.
struct Judge<'a> {
    /// medseg's lesion table beside the prediction (diameter, ROI, confidence by class and box).
    rows: &'a [Lesion],
    /// Class names by label value.
    labels: &'a [String],
    config: &'a EvalConfig,
    /// Whether the evaluation's confidences came from a table or a probability map.
    confident: bool,
}

impl Judge<'_> {
    fn label(&self, class: u32) -> String {
        self.labels
            .get(class as usize)
            .cloned()
            .unwrap_or_else(|| self.config.label_name(class))
    }

    /// A class's matched lesions: predictions (TP or FP), then missed truth lesions (FN).
    fn rows(&self, m: &LesionMatch) -> Vec<ReviewLesion> {
        let pred = m.pred.iter().map(|l| {
            let row = self
                .rows
                .iter()
                .find(|r| r.class == l.class && r.bbox_voxel == l.bbox_voxel);
            ReviewLesion {
                label: self.label(l.class),
                finding: Some(if l.matched.is_some() {
                    Finding::Tp
                } else {
                    Finding::Fp
                }),
                centroid_mm: l.centroid_mm,
                volume_mm3: l.volume_mm3,
                diameter_mm: row.map(|r| r.diameter_mm),
                confidence: (self.confident && l.confidence.is_finite()).then_some(l.confidence),
                inside_roi: row.and_then(|r| r.inside_roi),
            }
        });
        let missed = m
            .truth
            .iter()
            .filter(|l| l.matched.is_none())
            .map(|l| ReviewLesion {
                label: self.label(l.class),
                finding: Some(Finding::Fn),
                centroid_mm: l.centroid_mm,
                volume_mm3: l.volume_mm3,
                diameter_mm: None,
                confidence: None,
                inside_roi: None,
            });
        pred.chain(missed).collect()
    }
}

/// A case's scores for the index: mean Dice and HD95 over classes, lesion counts summed.
fn scores(r: &CaseResult) -> ReviewScores {
    let hd: Vec<f64> = r
        .classes
        .iter()
        .map(|(_, m)| m.hd95_mm)
        .filter(|v| v.is_finite())
        .collect();
    ReviewScores {
        dice: r.mean_dice(),
        hd95_mm: if hd.is_empty() {
            f64::NAN
        } else {
            hd.iter().sum::<f64>() / hd.len() as f64
        },
        tp: r.lesions.iter().map(|(_, m)| m.tp()).sum(),
        fp: r.lesions.iter().map(|(_, m)| m.fp()).sum(),
        fn_: r.lesions.iter().map(|(_, m)| m.fn_()).sum(),
    }
}

/// One embedded volume of a case page.
#[derive(Serialize)]
struct EmbeddedVolume<'a> {
    role: &'a str,
    name: String,
}

/// What a case page's script reads besides the volumes (the lesion rows are in the page).
#[derive(Serialize)]
struct CaseData<'a> {
    modality: &'a str,
    labels: &'a [String],
    /// Drawn opaque; other classes (an organ, the region of interest) faintly.
    lesion_classes: &'a [u32],
    volumes: Vec<EmbeddedVolume<'a>>,
    voxels: usize,
}

/// Writes `dir/index.html`, `dir/cases/` and, when `viewer` (the classic-script NiiVue) is
/// given, `dir/viewer/`. Pages are numbered in the index's order (worst Dice first when scored),
/// which previous/next follow. A case whose volumes cannot be read gets a page that says why; the
/// others go on. `on_case(name)` is called after each.
pub fn write_review(
    dir: &Path,
    cases: &[ReviewCase],
    viewer: Option<&Path>,
    title: &str,
    on_case: &mut dyn FnMut(&str),
) -> Result<ReviewWritten> {
    let cases_dir = dir.join("cases");
    std::fs::create_dir_all(&cases_dir).map_err(|e| Error::io(&cases_dir, e))?;
    if let Some(script) = viewer {
        let bytes = std::fs::read(script).map_err(|e| Error::io(script, e))?;
        let viewer_dir = dir.join("viewer");
        std::fs::create_dir_all(&viewer_dir).map_err(|e| Error::io(&viewer_dir, e))?;
        write_atomically(&viewer_dir.join(VIEWER_FILE), &bytes)?;
    }
    write_atomically(&dir.join("review.css"), STYLE.as_bytes())?;
    write_atomically(&dir.join("case.js"), CASE_SCRIPT.as_bytes())?;
    write_atomically(&dir.join("sort.js"), SORT_SCRIPT.as_bytes())?;
    let mut order: Vec<&ReviewCase> = cases.iter().collect();
    if cases.iter().any(|c| c.scores.is_some()) {
        let dice = |c: &ReviewCase| c.scores.and_then(|s| s.dice).unwrap_or(f64::INFINITY);
        order.sort_by(|a, b| dice(a).total_cmp(&dice(b)));
    }
    let mut failed = Vec::new();
    let mut warnings = Vec::new();
    let mut readable = Vec::with_capacity(order.len());
    for (n, case) in order.iter().enumerate() {
        let stem = page_stem(n);
        let built = write_case_data(&cases_dir, &stem, case);
        if let Err(e) = &built {
            failed.push((case.name.clone(), e.to_string()));
        }
        warnings.extend(case.warnings.iter().map(|w| (case.name.clone(), w.clone())));
        let nav = Nav {
            prev: n.checked_sub(1).map(page_stem),
            next: (n + 1 < order.len()).then(|| page_stem(n + 1)),
        };
        let page = case_page(case, &stem, &nav, built.as_ref().err(), viewer.is_some());
        write_atomically(&cases_dir.join(format!("{stem}.html")), page.as_bytes())?;
        readable.push(built.is_ok());
        on_case(&case.name);
    }
    let index = dir.join("index.html");
    write_atomically(&index, index_page(&order, &readable, title).as_bytes())?;
    Ok(ReviewWritten {
        index,
        cases: cases.len(),
        failed,
        warnings,
        viewer: viewer.is_some(),
    })
}

/// A case's page name: its position, so no case name (which may come from a patient's file) has
/// to be escaped into a URL.
fn page_stem(n: usize) -> String {
    format!("{:04}", n + 1)
}

/// Reads a case's volumes, writes its static picture and `STEM.js` (the volumes, base64). Each
/// file is read once, for both the picture and the page.
fn write_case_data(dir: &Path, stem: &str, case: &ReviewCase) -> Result<()> {
    // The scan and the prediction with their page copies (a loaded scan's is written below).
    let (scan, scan_copy) = match &case.scan {
        Some(ReviewScan::Nifti(p)) => {
            let (v, copy) = page_nifti(p, dir, true)?;
            (v, Some(copy))
        }
        Some(ReviewScan::Load(load)) => (Some(load()?), None),
        None => (None, None),
    };
    let (prediction, prediction_copy) = match case.prediction.as_deref() {
        Some(p) => {
            let (v, copy) = page_nifti(p, dir, true)?;
            (v, Some(copy))
        }
        None => (None, None),
    };
    let truth = case.truth.as_deref().map(read_nifti).transpose()?;
    let grid = scan
        .as_ref()
        .or(prediction.as_ref())
        .or(truth.as_ref())
        .ok_or_else(|| Error::NothingFound {
            path: dir.to_path_buf(),
            detail: format!(" (case {}: no scan, prediction or truth)", case.name),
        })?;
    let voxels = grid.geometry.voxel_count();
    let picture = static_picture(scan.as_ref(), prediction.as_ref(), truth.as_ref(), case);
    let png_path = dir.join(format!("{stem}.png"));
    let mut png = Vec::new();
    picture
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| plot_err(&png_path, e))?;
    write_atomically(&png_path, &png)?;
    let modality = match &scan {
        Some(v) if is_ct(v) => "ct",
        Some(_) => "mr",
        None => "labels",
    };
    // Each volume is base64-encoded as soon as it is read, so only the encoded page is held.
    let engine = base64::engine::general_purpose::STANDARD;
    let mut volumes: Vec<(&str, String)> = Vec::new();
    let mut add = |role, bytes: Vec<u8>| volumes.push((role, engine.encode(bytes)));
    match (scan_copy, &scan) {
        (Some(copy), _) => add("scan", copy),
        (None, Some(v)) => add("scan", volume_gz_bytes(v, dir)?),
        (None, None) => {}
    }
    if let Some(copy) = prediction_copy {
        add("prediction", copy);
    }
    if let Some(t) = &truth {
        let outline = outline(t.voxels.index_axis(Axis(0), 0));
        add("truth", labels_gz_bytes(&outline, t, dir)?);
    }
    for (kind, path) in &case.maps {
        let role = match kind {
            ReviewMap::Probabilities => "probabilities",
            ReviewMap::Uncertainty => "uncertainty",
            ReviewMap::Attention => "attention",
        };
        add(role, page_nifti(path, dir, false)?.1);
    }
    let data = CaseData {
        modality,
        labels: &case.labels,
        lesion_classes: &case.outlined,
        volumes: volumes
            .iter()
            .map(|(role, _)| EmbeddedVolume {
                role,
                name: format!("{role}.nii.gz"),
            })
            .collect(),
        voxels,
    };
    let head = format!(
        "window.MEDSEG_CASE = {};\nwindow.MEDSEG_VOLUMES = [\n",
        script_json(&data)
    );
    let parts = std::iter::once(head.as_bytes())
        .chain(
            volumes
                .iter()
                .flat_map(|(_, b64)| [&b"\""[..], b64.as_bytes(), &b"\",\n"[..]]),
        )
        .chain(std::iter::once(&b"];\n"[..]));
    write_parts_atomically(&dir.join(format!("{stem}.js")), parts)
}

/// JSON for inside a `<script>`: `</` cannot end the element early.
fn script_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value)
        .unwrap_or_else(|_| "null".into())
        .replace("</", "<\\/")
}

/// A scan is CT when it holds air in Hounsfield units.
fn is_ct(v: &Volume) -> bool {
    v.info
        .modality
        .as_deref()
        .map_or_else(|| v.voxels.iter().any(|&x| x < -500.0), |m| m == "CT")
}

/// Whether NiiVue places a NIfTI file where medseg does. medseg, like nibabel, takes the sform
/// when `sform_code > 0`, else the qform; NiiVue takes the qform when `qform_code > sform_code`, and
/// a bare scaling when neither code is set.
fn niivue_agrees(h: &NiftiHeader) -> bool {
    (h.sform_code > 0 && h.sform_code >= h.qform_code) || (h.sform_code <= 0 && h.qform_code > 0)
}

/// A NIfTI file read once for the page: its volume (when `decode`, or when it must be re-written)
/// and its page copy, one gzip member. A gzip file of one member is copied as it is; one of several
/// (medseg's blocked gzip among them), which browsers' inflater, and so NiiVue, stops after the
/// first of, and a plain file are gzipped afresh; a file whose header NiiVue would place elsewhere
/// is re-written with medseg's affine in both forms. (NiiVue tells gzipped from plain by the name
/// it is given.)
fn page_nifti(path: &Path, dir: &Path, decode: bool) -> Result<(Option<Volume>, Vec<u8>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (raw, gzipped) = if is_gzip(&bytes) {
        (inflate(path, &bytes)?, Some(bytes))
    } else {
        (bytes, None)
    };
    let agrees = niivue_agrees(&parse_header(path, &raw)?);
    let volume = if decode || !agrees {
        Some(read_nifti_bytes(path, &raw)?)
    } else {
        None
    };
    let copy = match (&volume, gzipped) {
        (Some(v), _) if !agrees => volume_gz_bytes(v, dir)?,
        (_, Some(gz)) if gzip::is_one_member(&gz, raw.len()) => gz,
        _ => gzip::compress_one_member(&raw).map_err(|e| Error::io(path, e))?,
    };
    Ok((volume, copy))
}

/// A volume written as NIfTI through a temporary file in `dir`, then gzipped as one member: int16
/// when every value is a whole number in its range (CT in HU, labels, most MR), else float32.
fn volume_gz_bytes(volume: &Volume, dir: &Path) -> Result<Vec<u8>> {
    let tmp = temp_nifti(dir)?;
    let whole = volume
        .voxels
        .iter()
        .all(|&x| x.fract() == 0.0 && (-32768.0..=32767.0).contains(&x));
    let dtype = if whole {
        DataType::Int16
    } else {
        DataType::Float32
    };
    write_nifti(volume, tmp.path(), dtype)?;
    plain_to_one_member(tmp.path())
}

/// Labels on `like`'s grid, written as NIfTI through a temporary file in `dir`, gzipped as one
/// member.
fn labels_gz_bytes(labels: &Array3<u8>, like: &Volume, dir: &Path) -> Result<Vec<u8>> {
    let tmp = temp_nifti(dir)?;
    write_label_map(labels, &like.geometry, tmp.path())?;
    plain_to_one_member(tmp.path())
}

/// A plain NIfTI file medseg just wrote, gzipped as one member.
fn plain_to_one_member(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    gzip::compress_one_member(&raw).map_err(|e| Error::io(path, e))
}

fn temp_nifti(dir: &Path) -> Result<tempfile::NamedTempFile> {
    tempfile::Builder::new()
        .prefix(".review-")
        .suffix(".nii")
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, e))
}

/// The surface of each labelled region: labelled voxels with a 6-neighbour of another label (or
/// the grid's edge), set to 1. In a slice this draws the region's outline, and its caps where the
/// slice grazes it.
pub fn outline(t: ArrayView3<f32>) -> Array3<u8> {
    let (nk, nj, ni) = t.dim();
    let label = |k: usize, j: usize, i: usize| t[[k, j, i]].round() as i64;
    Array3::from_shape_fn((nk, nj, ni), |(k, j, i)| {
        let l = label(k, j, i);
        if l <= 0 {
            return 0;
        }
        let differs = |k2: Option<usize>, j2: Option<usize>, i2: Option<usize>| match (k2, j2, i2) {
            (Some(k2), Some(j2), Some(i2)) if k2 < nk && j2 < nj && i2 < ni => {
                label(k2, j2, i2) != l
            }
            _ => true,
        };
        let edge = differs(k.checked_sub(1), Some(j), Some(i))
            || differs(Some(k + 1), Some(j), Some(i))
            || differs(Some(k), j.checked_sub(1), Some(i))
            || differs(Some(k), Some(j + 1), Some(i))
            || differs(Some(k), Some(j), i.checked_sub(1))
            || differs(Some(k), Some(j), Some(i + 1));
        u8::from(edge)
    })
}

/// The axial slice through the first lesion of the table (else the one with the most outlined
/// voxels, else the middle), with the truth (green) and prediction (red) outlines.
fn static_picture(
    scan: Option<&Volume>,
    prediction: Option<&Volume>,
    truth: Option<&Volume>,
    case: &ReviewCase,
) -> image::RgbImage {
    let grid = scan.or(prediction).or(truth).map(|v| &v.geometry);
    let Some(grid) = grid else {
        return image::RgbImage::new(1, 1);
    };
    let dims = grid.shape();
    let mask = |v: Option<&Volume>| -> Vec<bool> {
        match v.filter(|v| v.geometry.dims == grid.dims) {
            Some(v) => v
                .voxels
                .index_axis(Axis(0), 0)
                .iter()
                .map(|&x| {
                    let l = x.round();
                    l > 0.0 && (case.outlined.is_empty() || case.outlined.contains(&(l as u32)))
                })
                .collect(),
            None => vec![false; grid.voxel_count()],
        }
    };
    let (pred, truth_mask) = (mask(prediction), mask(truth));
    let plane = dims[1] * dims[2];
    let k = case
        .lesions
        .first()
        .and_then(|l| grid.world_to_voxel(l.centroid_mm))
        .map(|ijk| ijk[2].round())
        .filter(|&k| k >= 0.0 && (k as usize) < dims[0])
        .map(|k| k as usize)
        .unwrap_or_else(|| {
            (0..dims[0])
                .max_by_key(|&k| {
                    (k * plane..(k + 1) * plane)
                        .filter(|&x| pred[x] || truth_mask[x])
                        .count()
                })
                .filter(|&k| (k * plane..(k + 1) * plane).any(|x| pred[x] || truth_mask[x]))
                .unwrap_or(dims[0] / 2)
        });
    let values: Option<Vec<f32>> =
        scan.map(|s| s.voxels.index_axis(Axis(0), 0).iter().copied().collect());
    let scan = values.as_deref().map(|s| {
        let window = display_window(&s[k * plane..(k + 1) * plane]);
        (s, window)
    });
    overlay_tile(scan, &truth_mask, &pred, None, dims, k)
}

/// Previous and next case pages.
struct Nav {
    prev: Option<String>,
    next: Option<String>,
}

/// Escapes text for HTML content and attribute values.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A number for a table cell (`—` when absent or not finite).
fn cell(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.digits$}"),
        _ => "—".into(),
    }
}

/// The sort key a table cell carries (`data-v`): numbers sort as numbers, absent values last.
fn key(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v}"),
        _ => String::new(),
    }
}

fn head(title: &str, css: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><link rel=\"stylesheet\" href=\"{css}\"></head>\n",
        escape(title)
    )
}

/// The index: one row per case in page order (worst Dice first when scored), sortable by any
/// column.
fn index_page(cases: &[&ReviewCase], readable: &[bool], title: &str) -> String {
    let scored = cases.iter().any(|c| c.scores.is_some());
    let mut html = head(title, "review.css");
    let _ = write!(
        html,
        "<body class=\"index\"><h1>{}</h1>\n<p class=\"hint\">{} cases. Click a column to sort; \
         click a case to open it.</p>\n<table id=\"cases\" class=\"sortable\"><thead><tr>\
         <th data-type=\"text\">case</th><th>lesions found</th><th>largest lesion (mm³)</th>\
         <th>most confident</th>",
        escape(title),
        cases.len()
    );
    if scored {
        html +=
            "<th class=\"sorted-asc\">Dice</th><th>HD95 (mm)</th><th>TP</th><th>FP</th><th>FN</th>";
    }
    html += "</tr></thead><tbody>\n";
    for (n, c) in cases.iter().enumerate() {
        let found_lesions: Vec<&ReviewLesion> = c
            .lesions
            .iter()
            .filter(|l| l.finding != Some(Finding::Fn))
            .collect();
        let largest = found_lesions
            .iter()
            .map(|l| l.volume_mm3)
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
        let confident = found_lesions
            .iter()
            .filter_map(|l| l.confidence)
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
        let mark = if readable[n] {
            ""
        } else {
            " <span class=\"bad\">(unreadable)</span>"
        };
        let _ = write!(
            html,
            "<tr><td data-v=\"{name}\"><a href=\"cases/{stem}.html\">{name}</a>{mark}</td>\
             <td data-v=\"{count}\">{count}</td><td data-v=\"{lk}\">{lc}</td>\
             <td data-v=\"{ck}\">{cc}</td>",
            name = escape(&c.name),
            stem = page_stem(n),
            count = found_lesions.len(),
            lk = key(largest),
            lc = cell(largest, 1),
            ck = key(confident),
            cc = cell(confident, 2),
        );
        if let Some(s) = c.scores {
            let _ = write!(
                html,
                "<td data-v=\"{}\">{}</td><td data-v=\"{}\">{}</td><td data-v=\"{tp}\">{tp}</td>\
                 <td data-v=\"{fp}\">{fp}</td><td data-v=\"{fn_}\">{fn_}</td>",
                key(s.dice),
                cell(s.dice, 3),
                key(Some(s.hd95_mm)),
                cell(Some(s.hd95_mm), 1),
                tp = s.tp,
                fp = s.fp,
                fn_ = s.fn_,
            );
        } else if scored {
            html += "<td data-v=\"\">—</td><td data-v=\"\">—</td><td></td><td></td><td></td>";
        }
        html += "</tr>\n";
    }
    let _ = write!(
        html,
        "</tbody></table>\n<p class=\"hint\">Written by medseg {}.</p>\n\
         <script src=\"sort.js\"></script></body></html>\n",
        env!("CARGO_PKG_VERSION"),
    );
    html
}

/// A case page: the viewer (shown by `case.js` when NiiVue and the volumes load), the static
/// picture (the fallback), the lesion table and the layer controls.
fn case_page(
    case: &ReviewCase,
    stem: &str,
    nav: &Nav,
    error: Option<&Error>,
    viewer: bool,
) -> String {
    let mut html = head(&case.name, "../review.css");
    let link = |to: &Option<String>, text: &str| match to {
        Some(s) => format!("<a href=\"{s}.html\">{text}</a>"),
        None => format!("<span class=\"off\">{text}</span>"),
    };
    let _ = write!(
        html,
        "<body class=\"case\"><nav><a href=\"../index.html\">all cases</a> · {} · {}</nav>\n\
         <h1>{}</h1>\n",
        link(&nav.prev, "previous"),
        link(&nav.next, "next"),
        escape(&case.name)
    );
    if let Some(s) = case.scores {
        let _ = writeln!(
            html,
            "<p class=\"scores\">Dice {} · HD95 {} mm · TP {} · FP {} · FN {}</p>",
            cell(s.dice, 3),
            cell(Some(s.hd95_mm), 1),
            s.tp,
            s.fp,
            s.fn_
        );
    }
    if let Some(e) = error {
        let _ = writeln!(
            html,
            "<p class=\"bad\">This case could not be shown: {}</p>",
            escape(&e.to_string())
        );
    }
    for w in &case.warnings {
        let _ = writeln!(html, "<p class=\"bad\">{}</p>", escape(w));
    }
    html += "<div class=\"layout\"><section class=\"view\">\n";
    if error.is_none() && viewer {
        html += VIEWER_CONTROLS;
    } else if error.is_none() {
        html += "<p class=\"hint\">The 3D viewer was not bundled: run <code>scripts/fetch-viewer.sh</code>, \
                 then write the review again.</p>\n";
    }
    if error.is_none() {
        let _ = writeln!(
            html,
            "<figure id=\"static\"><img src=\"{stem}.png\" alt=\"axial slice of {}\">\
             <figcaption>Axial slice through the first lesion: truth green, prediction red.\
             </figcaption></figure>",
            escape(&case.name)
        );
    }
    html += "</section>\n<section class=\"side\">";
    html += &lesion_rows_html(&case.lesions);
    html += "</section></div>\n<script src=\"../sort.js\"></script>\n";
    if error.is_none() && viewer {
        let _ = writeln!(
            html,
            "<script src=\"../viewer/{VIEWER_FILE}\"></script>\n<script src=\"{stem}.js\"></script>\n\
             <script src=\"../case.js\"></script>"
        );
    }
    html += "</body></html>\n";
    html
}

/// The viewer's canvas and its controls, hidden until `case.js` has loaded the volumes.
const VIEWER_CONTROLS: &str = "<div id=\"viewer\" hidden>\
<div class=\"controls\">\
<label>window <select id=\"preset\"><option value=\"auto\">MR auto</option>\
<option value=\"soft\">CT soft tissue</option><option value=\"lung\">CT lung</option>\
<option value=\"brain\">CT brain</option></select></label> \
<label>prediction opacity <input id=\"opacity\" type=\"range\" min=\"0\" max=\"1\" step=\"0.05\" value=\"0.5\"></label> \
<label id=\"truth-toggle\" hidden><input id=\"truth\" type=\"checkbox\" checked> truth outline</label> \
<label id=\"map-choice\" hidden>map <select id=\"map\"><option value=\"\">none</option></select></label>\
</div>\
<div id=\"canvas-box\"><canvas id=\"gl\"></canvas></div>\
<p id=\"location\" class=\"hint\"></p></div>\n\
<p id=\"loading\" class=\"hint\" hidden>Loading the viewer…</p>\n";

/// The lesion table; each row carries its centroid for `case.js`.
fn lesion_rows_html(lesions: &[ReviewLesion]) -> String {
    if lesions.is_empty() {
        return "<p>No lesions.</p>".into();
    }
    let judged = lesions.iter().any(|l| l.finding.is_some());
    let mut html = String::from(
        "<table id=\"lesions\" class=\"sortable\"><thead><tr><th>#</th><th data-type=\"text\">class</th>",
    );
    if judged {
        html += "<th data-type=\"text\">finding</th>";
    }
    html += "<th title=\"volume\">mm³</th><th title=\"longest diameter\">⌀ mm</th>\
             <th>confidence</th></tr></thead><tbody>\n";
    for (n, l) in lesions.iter().enumerate() {
        let [x, y, z] = l.centroid_mm;
        let finding = l.finding.map(|f| match f {
            Finding::Tp => "TP",
            Finding::Fp => "FP",
            Finding::Fn => "FN",
        });
        let roi = if l.inside_roi == Some(false) {
            " <span class=\"off\">(outside ROI)</span>"
        } else {
            ""
        };
        let _ = write!(
            html,
            "<tr class=\"lesion {cls}\" data-index=\"{n}\" data-mm=\"{x},{y},{z}\" tabindex=\"0\" \
             title=\"centroid {x:.1}, {y:.1}, {z:.1} mm (RAS)\">\
             <td data-v=\"{id}\">{id}</td><td data-v=\"{label}\">{label}{roi}</td>",
            cls = finding.unwrap_or("").to_lowercase(),
            id = n + 1,
            label = escape(&l.label),
        );
        if let Some(f) = finding {
            let _ = write!(html, "<td data-v=\"{f}\">{f}</td>");
        } else if judged {
            html += "<td></td>";
        }
        let _ = write!(
            html,
            "<td data-v=\"{}\">{}</td><td data-v=\"{}\">{}</td><td data-v=\"{}\">{}</td></tr>",
            key(Some(l.volume_mm3)),
            cell(Some(l.volume_mm3), 1),
            key(l.diameter_mm),
            cell(l.diameter_mm, 1),
            key(l.confidence),
            cell(l.confidence, 2),
        );
        html.push('\n');
    }
    html += "</tbody></table>\n<p class=\"hint\">Click a lesion to move the crosshair to its \
             centroid (hover for it in RAS mm).</p>\n";
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 3 × 4 × 4 label grid `[k, j, i]` from a rule.
    fn grid(rule: impl Fn(usize, usize, usize) -> f32) -> Array3<f32> {
        Array3::from_shape_fn((3, 4, 4), |(k, j, i)| rule(k, j, i))
    }

    #[test]
    fn outline_keeps_only_surface_voxels() {
        // A 3×3 block in the middle slice of a 3-slice grid, surrounded by background: every
        // voxel of it touches the slices above and below, so all 9 are surface.
        let o = outline(grid(|k, j, i| if k == 1 && j < 3 && i < 3 { 2.0 } else { 0.0 }).view());
        assert_eq!(o.iter().filter(|&&x| x == 1).count(), 9);
        assert_eq!(o[[0, 0, 0]], 0);
        // The block through every slice: its centre column (j, i) = (1, 1) is inside in-plane,
        // and only the grid's edge (first and last slice) makes it surface.
        let o = outline(grid(|_, j, i| if j < 3 && i < 3 { 1.0 } else { 0.0 }).view());
        assert_eq!(o[[1, 1, 1]], 0);
        assert_eq!(o[[0, 1, 1]], 1);
        assert_eq!(o[[1, 0, 1]], 1);
        // Two labels side by side: their shared face is surface for both.
        let o = outline(grid(|_, _, i| if i < 2 { 1.0 } else { 2.0 }).view());
        assert_eq!(o[[1, 1, 1]], 1);
        assert_eq!(o[[1, 1, 2]], 1);
        assert_eq!(o[[1, 1, 0]], 1); // grid edge
        assert_eq!(o[[1, 2, 3]], 1); // grid edge
        assert_eq!(o[[1, 1, 3]], 1); // grid edge along i
        assert_eq!(o.iter().filter(|&&x| x == 0).count(), 0); // 4 wide: nothing is interior
    }

    #[test]
    fn text_is_escaped_into_html_and_scripts() {
        assert_eq!(escape("a<b>&\"c'"), "a&lt;b&gt;&amp;&quot;c&#39;");
        assert_eq!(script_json(&"</script>"), "\"<\\/script>\"");
        assert_eq!(cell(Some(f64::NAN), 2), "—");
        assert_eq!(cell(Some(1.234), 1), "1.2");
        assert_eq!(key(None), "");
    }
}
