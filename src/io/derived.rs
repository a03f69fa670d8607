//! What a derived DICOM object (Segmentation, RT Structure Set) takes from the series it was
//! computed from, and what the writers share: new UIDs, DS formatting, code items, the copied
//! Patient and General Study modules, medseg's equipment, and atomic writing.
//!
//! Nothing about the patient is changed or added: the Patient and Study elements are copied as the
//! source holds them. Anonymised sources often blank their UIDs; SOP Class and Instance UIDs are
//! then taken from the file meta group, and a missing Study or Series Instance UID is derived from
//! the Frame of Reference UID (the same value for every object written from that series, with a
//! warning). A source with no Frame of Reference UID, or an instance with no UID anywhere, is refused.

use std::path::{Path, PathBuf};

use dicom_core::value::{DataSetSequence, PrimitiveValue};
use dicom_core::{DataElement, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use sha2::{Digest, Sha256};

use crate::config::Code;
use crate::error::{Error, Result};
use crate::geometry::{cross, dot, lps_to_ras, Geometry};
use crate::io::dicom::{self, frame_layout, order_slices, plane_steps, SliceHeader, NO_UID};
use crate::io::{write_atomically, ScanSource};

/// medseg's implementation class UID in the file meta group: a fixed `2.25.` UID.
const IMPLEMENTATION_CLASS_UID: &str = "2.25.262427718316424557209262936391651218713";

/// One source image plane, in the volume's slice order.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceSlice {
    /// SOP Class UID of the image.
    pub sop_class_uid: String,
    /// SOP Instance UID of the image.
    pub sop_instance_uid: String,
    /// 1-based frame number for multi-frame source objects.
    pub frame: Option<u32>,
    /// Image Position (Patient), LPS mm.
    pub position: [f64; 3],
}

impl SourceSlice {
    /// The image reference item (Referenced SOP Class and Instance UIDs, and the frame number for
    /// multi-frame sources) that SEG frames and RTSTRUCT contours carry.
    pub fn reference(&self) -> InMemDicomObject {
        let mut item = InMemDicomObject::from_element_iter([
            text(tags::REFERENCED_SOP_CLASS_UID, VR::UI, &self.sop_class_uid),
            text(
                tags::REFERENCED_SOP_INSTANCE_UID,
                VR::UI,
                &self.sop_instance_uid,
            ),
        ]);
        if let Some(f) = self.frame {
            item.put(text(tags::REFERENCED_FRAME_NUMBER, VR::IS, &f.to_string()));
        }
        item
    }
}

/// The source series of a segmentation: identity, grid and the elements copied into derived objects.
#[derive(Debug, Clone)]
pub struct SourceSeries {
    /// The series directory or file (for messages).
    pub path: PathBuf,
    /// Specific Character Set, Patient and General Study elements as the source holds them.
    pub copied: InMemDicomObject,
    /// Study Instance UID (the source's, else derived).
    pub study_uid: String,
    /// Series Instance UID of the source (the source's, else derived).
    pub series_uid: String,
    /// Frame of Reference UID.
    pub frame_of_reference_uid: String,
    /// Image Orientation (Patient): row direction then column direction, LPS.
    pub orientation: [f64; 6],
    /// Pixel Spacing: between rows, between columns (mm).
    pub pixel_spacing: [f64; 2],
    /// Slice Thickness when the source gives one.
    pub slice_thickness: Option<f64>,
    /// Rows and columns of every plane.
    pub rows: u32,
    /// Columns of every plane.
    pub columns: u32,
    /// The planes, in the order of the volume's `k` axis.
    pub slices: Vec<SourceSlice>,
    /// What the writer had to make up (UIDs) and why.
    pub warnings: Vec<String>,
}

/// Elements copied from the source: character set, Patient and General Study modules (PS3.3
/// C.7.1.1, C.7.2.1), and de-identification flags so an anonymised source stays marked.
const COPIED: [Tag; 16] = [
    tags::SPECIFIC_CHARACTER_SET,
    tags::PATIENT_NAME,
    tags::PATIENT_ID,
    tags::ISSUER_OF_PATIENT_ID,
    tags::PATIENT_BIRTH_DATE,
    tags::PATIENT_SEX,
    tags::PATIENT_IDENTITY_REMOVED,
    tags::DEIDENTIFICATION_METHOD,
    tags::STUDY_DATE,
    tags::STUDY_TIME,
    tags::REFERRING_PHYSICIAN_NAME,
    tags::STUDY_ID,
    tags::ACCESSION_NUMBER,
    tags::STUDY_DESCRIPTION,
    tags::CLINICAL_TRIAL_PROTOCOL_ID,
    tags::CLINICAL_TRIAL_SUBJECT_ID,
];

/// Type 2 elements of those modules: present in every derived object, empty when the source lacks them.
const REQUIRED_EMPTY: [(Tag, VR); 9] = [
    (tags::PATIENT_NAME, VR::PN),
    (tags::PATIENT_ID, VR::LO),
    (tags::PATIENT_BIRTH_DATE, VR::DA),
    (tags::PATIENT_SEX, VR::CS),
    (tags::STUDY_DATE, VR::DA),
    (tags::STUDY_TIME, VR::TM),
    (tags::REFERRING_PHYSICIAN_NAME, VR::PN),
    (tags::STUDY_ID, VR::SH),
    (tags::ACCESSION_NUMBER, VR::SH),
];

impl SourceSeries {
    /// Reads what derived objects need from a DICOM source (headers only). NIfTI sources have no
    /// DICOM identity and give [`Error::Unsupported`].
    pub fn read(source: &ScanSource) -> Result<Self> {
        match source {
            ScanSource::DicomSeries(stack) => Self::from_stack(stack),
            ScanSource::DicomFile { path, frames, .. } => Self::from_file(path, frames.as_deref()),
            ScanSource::Nifti(p) => Err(Error::Unsupported {
                path: p.clone(),
                reason: "a NIfTI scan has no DICOM series to reference".into(),
            }),
        }
    }

    fn from_stack(stack: &dicom::SeriesStack) -> Result<Self> {
        let first = &stack.slices[0];
        let positions: Vec<_> = stack.slices.iter().map(|s| s.position).collect();
        let sorted = order_slices(
            &first.path,
            first.orientation,
            &positions,
            first.pixel_spacing,
            first.spacing_between_slices.or(first.slice_thickness),
        )?;
        let slices = sorted
            .order
            .iter()
            .map(|&n| source_slice(&stack.slices[n], None, stack.slices[n].position))
            .collect::<Result<Vec<_>>>()?;
        let obj = dicom::open(&first.path, true)?;
        Self::assemble(&stack.root, &obj, first, slices)
    }

    fn from_file(path: &Path, frames: Option<&[usize]>) -> Result<Self> {
        let obj = dicom::open(path, true)?;
        let header = SliceHeader::from_object(path, &obj)?;
        let all: Vec<usize> = (0..header.frames as usize).collect();
        let frames = frames.unwrap_or(&all);
        let layout = frame_layout(path, &header, frames)?;
        let multi = header.frames > 1;
        let slices = layout
            .sorted
            .order
            .iter()
            .map(|&g| {
                let (position, members) = &layout.planes[g];
                // Channels repeated at one position: the first frame stands for the plane.
                let frame = multi.then_some(members[0] as u32 + 1);
                source_slice(&header, frame, *position)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut series = Self::assemble(path, &obj, &header, slices)?;
        // Enhanced objects keep orientation per frame: the stack's own, not the object's first.
        if let Some(o) = header.frame_geometry.get(frames[0]).and_then(|g| g.1) {
            series.orientation = o;
        }
        Ok(series)
    }

    fn assemble(
        path: &Path,
        obj: &InMemDicomObject,
        header: &SliceHeader,
        slices: Vec<SourceSlice>,
    ) -> Result<Self> {
        let refuse = |reason: String| Error::Unsupported {
            path: path.to_path_buf(),
            reason,
        };
        let frame_of_reference_uid =
            dicom::string(obj, tags::FRAME_OF_REFERENCE_UID).ok_or_else(|| {
                refuse(
                    "no Frame of Reference UID: a SEG or RTSTRUCT could not be placed on the scan"
                        .into(),
                )
            })?;
        let orientation = header
            .orientation
            .ok_or_else(|| refuse("no Image Orientation (Patient)".into()))?;
        let pixel_spacing = header
            .pixel_spacing
            .ok_or_else(|| refuse("no Pixel Spacing".into()))?;
        let mut warnings = Vec::new();
        let study_uid = dicom::string(obj, tags::STUDY_INSTANCE_UID).unwrap_or_else(|| {
            warnings.push(
                "the source has no Study Instance UID: one was derived from its Frame of Reference UID"
                    .into(),
            );
            derived_uid(&["study", &frame_of_reference_uid])
        });
        let series_uid = match header.series_uid.as_str() {
            NO_UID => {
                warnings.push(
                    "the source has no Series Instance UID: one was derived from its Frame of Reference UID"
                        .into(),
                );
                derived_uid(&[
                    "series",
                    &frame_of_reference_uid,
                    &slices[0].sop_instance_uid,
                ])
            }
            uid => uid.to_string(),
        };
        let mut copied = InMemDicomObject::new_empty();
        for tag in COPIED {
            if let Ok(e) = obj.element(tag) {
                copied.put(e.clone());
            }
        }
        for (tag, vr) in REQUIRED_EMPTY {
            if copied.element_opt(tag).ok().flatten().is_none() {
                copied.put(DataElement::new(tag, vr, PrimitiveValue::Empty));
            }
        }
        Ok(SourceSeries {
            path: path.to_path_buf(),
            copied,
            study_uid,
            series_uid,
            frame_of_reference_uid,
            orientation,
            pixel_spacing,
            slice_thickness: header.slice_thickness.filter(|t| *t > 0.0),
            rows: header.rows,
            columns: header.columns,
            slices,
            warnings,
        })
    }

    /// Checks that a `[k, j, i]` label map lies on this series' grid.
    pub fn check_grid(&self, shape: [usize; 3]) -> Result<()> {
        let expected = [self.slices.len(), self.rows as usize, self.columns as usize];
        if shape == expected {
            return Ok(());
        }
        Err(Error::Unsupported {
            path: self.path.clone(),
            reason: format!(
                "the mask grid {shape:?} (slices, rows, columns) differs from the series' {expected:?}"
            ),
        })
    }

    /// The patient (LPS) position of continuous pixel coordinates `(x, y)` = (column, row) on
    /// plane `k`, from that plane's own Image Position so uneven spacing stays exact.
    pub fn to_patient(&self, k: usize, x: f64, y: f64) -> [f64; 3] {
        let p = self.slices[k].position;
        let [si, sj] = plane_steps(self.orientation, self.pixel_spacing);
        std::array::from_fn(|r| p[r] + x * si[r] + y * sj[r])
    }

    /// Why a label map on `grid` would not lie on this series' planes (`None`: it does): the grid
    /// must have the series' size, its in-plane axes must be the rows and columns of the images,
    /// and plane `k` must start at image `k`'s position, all within `tolerance_mm`.
    pub fn misfit(&self, grid: &Geometry, tolerance_mm: f64) -> Option<String> {
        let dims = [self.columns as usize, self.rows as usize, self.slices.len()];
        if grid.dims != dims {
            return Some(format!(
                "the series is {dims:?} (columns, rows, planes), the scan {:?}",
                grid.dims
            ));
        }
        let axes = plane_steps(self.orientation, self.pixel_spacing).map(lps_to_ras);
        for (axis, expected) in axes.iter().enumerate() {
            let step = grid.axis_step(axis);
            let off = (0..3)
                .map(|r| (step[r] - expected[r]).abs())
                .fold(0.0, f64::max);
            // Over the whole plane the error grows with the image size.
            if off * dims[axis] as f64 > tolerance_mm {
                return Some(format!(
                    "voxel axis {axis} of the scan is {step:?} mm (RAS), the images' {expected:?}"
                ));
            }
        }
        for (k, slice) in self.slices.iter().enumerate() {
            let at = grid.voxel_to_world([0.0, 0.0, k as f64]);
            let want = lps_to_ras(slice.position);
            let off = (0..3).map(|r| (at[r] - want[r]).abs()).fold(0.0, f64::max);
            if off > tolerance_mm {
                return Some(format!(
                    "plane {k} of the scan starts {off:.4} mm away from its image's position"
                ));
            }
        }
        None
    }

    /// Distance between neighbouring planes along their normal (the median gap).
    pub fn slice_step(&self) -> Option<f64> {
        let o = self.orientation;
        let n = cross([o[0], o[1], o[2]], [o[3], o[4], o[5]]);
        let d: Vec<f64> = self.slices.iter().map(|s| dot(s.position, n)).collect();
        let mut gaps: Vec<f64> = d.windows(2).map(|w| (w[1] - w[0]).abs()).collect();
        gaps.sort_by(f64::total_cmp);
        gaps.get(gaps.len() / 2).copied().filter(|g| *g > 1e-6)
    }
}

fn source_slice(
    header: &SliceHeader,
    frame: Option<u32>,
    position: Option<[f64; 3]>,
) -> Result<SourceSlice> {
    let missing = |what: &str| Error::Unsupported {
        path: header.path.clone(),
        reason: format!(
            "no {what} in the data set or the file meta: the image cannot be referenced"
        ),
    };
    Ok(SourceSlice {
        sop_class_uid: header
            .sop_class_uid
            .clone()
            .ok_or_else(|| missing("SOP Class UID"))?,
        sop_instance_uid: header
            .sop_instance_uid
            .clone()
            .ok_or_else(|| missing("SOP Instance UID"))?,
        frame,
        position: position.ok_or_else(|| missing("Image Position (Patient)"))?,
    })
}

/// A new, unique UID: `2.25.` and a random (version 4) UUID as a decimal integer (PS3.5 B.2).
pub fn new_uid() -> String {
    format!("2.25.{}", uuid::Uuid::new_v4().as_u128())
}

/// A UID that depends only on `parts`: `2.25.` and a UUID (version 8) from their SHA-256, so
/// every object derived from one series agrees on the values it had to make up.
pub fn derived_uid(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    let digest = h.finalize();
    let bytes: [u8; 16] = std::array::from_fn(|i| digest[i]);
    format!("2.25.{}", uuid::Uuid::new_v8(bytes).as_u128())
}

/// `v` with `decimals` decimals, trailing zeros dropped, never "-0".
fn decimal(v: f64, decimals: usize) -> String {
    let s = format!("{v:.decimals$}");
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        &s
    };
    match s {
        "-0" | "" => "0".to_string(),
        s => s.to_string(),
    }
}

/// A Decimal String value: the shortest decimal that round-trips when it fits the standard's 16
/// characters, else rounded to fit.
pub fn ds(v: f64) -> String {
    let s = format!("{}", if v == 0.0 { 0.0 } else { v }); // no "-0"
    if s.len() <= 16 {
        return s;
    }
    (0..=12)
        .rev()
        .map(|d| decimal(v, d))
        .find(|s| s.len() <= 16)
        .unwrap_or_else(|| format!("{v:.6e}"))
}

/// A multi-valued DS element with values rounded to `decimals` (contour points: 0.1 µm is far
/// below any pixel, and halves the size of large structure sets).
pub fn ds_rounded_element(
    tag: Tag,
    values: &[f64],
    decimals: usize,
) -> DataElement<InMemDicomObject> {
    let strs: Vec<String> = values
        .iter()
        .map(|&v| {
            Some(decimal(v, decimals))
                .filter(|s| s.len() <= 16)
                .unwrap_or_else(|| ds(v))
        })
        .collect();
    DataElement::new(tag, VR::DS, PrimitiveValue::Strs(strs.into()))
}

/// A multi-valued DS element.
pub fn ds_element(tag: Tag, values: &[f64]) -> DataElement<InMemDicomObject> {
    let strs: Vec<String> = values.iter().map(|v| ds(*v)).collect();
    DataElement::new(tag, VR::DS, PrimitiveValue::Strs(strs.into()))
}

/// A string element.
pub fn text(tag: Tag, vr: VR, value: &str) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, PrimitiveValue::from(value))
}

/// A sequence element.
pub fn sequence(tag: Tag, items: Vec<InMemDicomObject>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::SQ, DataSetSequence::from(items))
}

/// A code item (Code Value, Coding Scheme Designator, Code Meaning).
pub fn code_item(code: &Code) -> InMemDicomObject {
    InMemDicomObject::from_element_iter([
        text(tags::CODE_VALUE, VR::SH, &code.value),
        text(tags::CODING_SCHEME_DESIGNATOR, VR::SH, &code.scheme),
        text(tags::CODE_MEANING, VR::LO, &code.meaning),
    ])
}

/// A code in the DICOM Controlled Terminology (`DCM`).
pub fn dcm_code(value: &str, meaning: &str) -> Code {
    Code {
        scheme: "DCM".into(),
        value: value.into(),
        meaning: meaning.into(),
    }
}

/// Current UTC date (`YYYYMMDD`) and time (`HHMMSS`) for Content/Series/Instance Creation dates.
pub fn now_date_time() -> (String, String) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant, "chrono-Compatible Low-Level Date Algorithms").
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        format!("{year:04}{month:02}{day:02}"),
        format!("{:02}{:02}{:02}", rem / 3600, rem / 60 % 60, rem % 60),
    )
}

/// What every derived object starts with: SOP Common, the copied Patient and Study elements, a new
/// series of `modality` in the source's Frame of Reference, and medseg as the (enhanced) equipment.
pub fn derived_object(
    source: &SourceSeries,
    sop_class_uid: &str,
    modality: &str,
    series_description: &str,
) -> InMemDicomObject {
    let (date, time) = now_date_time();
    let mut obj = source.copied.clone();
    let version = env!("CARGO_PKG_VERSION");
    for e in [
        text(tags::SOP_CLASS_UID, VR::UI, sop_class_uid),
        text(tags::SOP_INSTANCE_UID, VR::UI, &new_uid()),
        text(tags::INSTANCE_CREATION_DATE, VR::DA, &date),
        text(tags::INSTANCE_CREATION_TIME, VR::TM, &time),
        text(tags::STUDY_INSTANCE_UID, VR::UI, &source.study_uid),
        text(tags::MODALITY, VR::CS, modality),
        text(tags::SERIES_INSTANCE_UID, VR::UI, &new_uid()),
        text(tags::SERIES_NUMBER, VR::IS, "9901"),
        text(tags::SERIES_DATE, VR::DA, &date),
        text(tags::SERIES_TIME, VR::TM, &time),
        text(tags::SERIES_DESCRIPTION, VR::LO, series_description),
        text(
            tags::FRAME_OF_REFERENCE_UID,
            VR::UI,
            &source.frame_of_reference_uid,
        ),
        DataElement::new(
            tags::POSITION_REFERENCE_INDICATOR,
            VR::LO,
            PrimitiveValue::Empty,
        ),
        text(tags::MANUFACTURER, VR::LO, "medseg"),
        text(tags::MANUFACTURER_MODEL_NAME, VR::LO, "medseg"),
        text(tags::DEVICE_SERIAL_NUMBER, VR::LO, "medseg"),
        text(tags::SOFTWARE_VERSIONS, VR::LO, version),
        text(tags::INSTANCE_NUMBER, VR::IS, "1"),
    ] {
        obj.put(e);
    }
    obj
}

/// The Referenced Instance items of every source instance, once each (no frame numbers).
pub fn referenced_instances(source: &SourceSeries) -> Vec<InMemDicomObject> {
    let mut seen = std::collections::BTreeSet::new();
    source
        .slices
        .iter()
        .filter(|s| seen.insert(s.sop_instance_uid.clone()))
        .map(|s| {
            SourceSlice {
                frame: None,
                ..s.clone()
            }
            .reference()
        })
        .collect()
}

/// Writes `obj` as a DICOM file with `transfer_syntax`, atomically.
pub fn write_object(path: &Path, obj: InMemDicomObject, transfer_syntax: &str) -> Result<()> {
    let write_err = |reason: String| Error::Write {
        path: path.to_path_buf(),
        reason,
    };
    let file = obj
        .with_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax(transfer_syntax)
                .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
                .implementation_version_name(format!("MEDSEG_{}", env!("CARGO_PKG_VERSION"))),
        )
        .map_err(|e| write_err(e.to_string()))?;
    let mut bytes = Vec::new();
    file.write_all(&mut bytes)
        .map_err(|e| write_err(e.to_string()))?;
    write_atomically(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_strings_fit_sixteen_characters() {
        for v in [
            -249.51171875,
            0.9765625,
            1.0 / 3.0,
            -1234567.123456789,
            1e-12,
            -0.0,
            123456789012345678.0,
        ] {
            let s = ds(v);
            assert!(s.len() <= 16, "{v} -> {s}");
            let back: f64 = s.parse().unwrap();
            assert!(
                (back - v).abs() <= 1e-9_f64.max(v.abs() * 1e-6),
                "{v} -> {s}"
            );
        }
        assert_eq!(ds(-249.51171875), "-249.51171875");
        let rounded =
            ds_rounded_element(tags::CONTOUR_DATA, &[47.119140625, -0.00001, 100.0, 5.5], 4);
        assert_eq!(rounded.to_str().unwrap(), "47.1191\\0\\100\\5.5");
        assert_eq!(ds(-0.0), "0");
    }

    #[test]
    fn uids_are_valid_and_derived_ones_repeat() {
        let a = new_uid();
        assert!(a.starts_with("2.25.") && a.len() <= 64 && a != new_uid());
        assert!(a[5..].chars().all(|c| c.is_ascii_digit()) && !a[5..].starts_with('0'));
        assert_eq!(derived_uid(&["x", "y"]), derived_uid(&["x", "y"]));
        assert_ne!(derived_uid(&["x", "y"]), derived_uid(&["xy", ""]));
    }

    #[test]
    fn dates_are_civil() {
        let (d, t) = now_date_time();
        assert_eq!((d.len(), t.len()), (8, 6));
        let year: i32 = d[..4].parse().unwrap();
        assert!((2024..2200).contains(&year));
        assert!((1..=12).contains(&d[4..6].parse::<i32>().unwrap()));
    }
}
