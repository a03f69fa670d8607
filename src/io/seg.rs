//! DICOM Segmentation objects (SOP Class 1.2.840.10008.5.1.4.1.1.66.4, PS3.3 A.51 / C.8.20):
//! writing a label map as a BINARY segmentation of its source series, and reading one back as a
//! label map.
//!
//! Written objects: one segment per label value present (numbered from 1 in the order given), one
//! frame per segment and source plane that holds any of it (empty frames are left out), frames
//! on the source planes with the source's own Image Position, 1 bit per pixel packed least
//! significant bit first across frame boundaries (PS3.5 §8.1.1). Each frame references its source
//! image (and frame, for multi-frame sources). The label value is kept in Segment Description
//! (`label value N`) so [`read_seg`] restores the map exactly when classes were left out.

use std::path::Path;

use dicom_core::value::PrimitiveValue;
use dicom_core::{DataElement, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::InMemDicomObject;
use ndarray::{Array3, Array4, ArrayView3, Axis};

use crate::config::{Code, LabelCode};
use crate::error::{Error, Result};
use crate::geometry::{cross, dot, lps_to_ras, matmul, norm, Geometry, IDENTITY, LPS_TO_RAS};
use crate::io::derived::{
    code_item, dcm_code, derived_object, ds_element, now_date_time, referenced_instances, sequence,
    text, write_object, SourceSeries,
};
use crate::io::dicom::{self, floats, int, items, plane_steps, string};
use crate::volume::{DataType, PatientIdentifiers, SourceKind, Volume, VolumeInfo};

/// Segmentation Storage.
pub const SEG_SOP_CLASS: &str = "1.2.840.10008.5.1.4.1.1.66.4";

/// One class of a label map as a segment.
#[derive(Debug, Clone)]
pub struct Segment {
    /// Its value in the label map.
    pub value: u8,
    /// Segment Label (the class name).
    pub label: String,
    /// Category, type and colour.
    pub code: LabelCode,
}

/// What produced the segmentation: the algorithm identification of every segment.
#[derive(Debug, Clone)]
pub struct Algorithm {
    /// Algorithm Name.
    pub name: String,
    /// Algorithm Version.
    pub version: String,
    /// The model's run name (Algorithm Parameters).
    pub run: String,
}

/// What a written SEG holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegSummary {
    /// Segments written.
    pub segments: usize,
    /// Frames written.
    pub frames: usize,
    /// Nothing was segmented: the first segment was written with one empty frame.
    pub placeholder: bool,
}

/// sRGB to the DICOM PCS CIELab triplet (PS3.3 C.10.7.1.1: D50, L* 0..100 → 0..65535, a*/b*
/// −128..127 → 0..65535), through linear sRGB and the Bradford-adapted sRGB→XYZ(D50) matrix
/// (Lindbloom).
pub fn dicom_lab(rgb: [u8; 3]) -> [u16; 3] {
    let lin = rgb.map(|c| {
        let c = c as f64 / 255.0;
        if c <= 0.04045 {
            c / 12.92
        } else {
            ((c + 0.055) / 1.055).powf(2.4)
        }
    });
    const M: [[f64; 3]; 3] = [
        [0.436_074_7, 0.385_064_9, 0.143_080_4],
        [0.222_504_5, 0.716_878_6, 0.060_616_9],
        [0.013_932_2, 0.097_104_5, 0.714_173_3],
    ];
    const WHITE: [f64; 3] = [0.964_22, 1.0, 0.825_21];
    let xyz: [f64; 3] = std::array::from_fn(|r| (0..3).map(|c| M[r][c] * lin[c]).sum());
    let f = |t: f64| {
        if t > 216.0 / 24389.0 {
            t.cbrt()
        } else {
            (24389.0 / 27.0 * t + 16.0) / 116.0
        }
    };
    let [fx, fy, fz] = std::array::from_fn(|i| f(xyz[i] / WHITE[i]));
    let (l, a, b) = (116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz));
    let scale = |v: f64, lo: f64, hi: f64| {
        (((v - lo) / (hi - lo)).clamp(0.0, 1.0) * 65535.0).round() as u16
    };
    [
        scale(l, 0.0, 100.0),
        scale(a, -128.0, 127.0),
        scale(b, -128.0, 127.0),
    ]
}

fn us(tag: dicom_core::Tag, v: &[u16]) -> DataElement<InMemDicomObject> {
    DataElement::new(
        tag,
        VR::US,
        PrimitiveValue::U16(v.iter().copied().collect()),
    )
}

fn segment_item(number: u16, segment: &Segment, algorithm: &Algorithm) -> InMemDicomObject {
    let code = &segment.code;
    let family = dcm_code("123110", "Artificial Intelligence");
    let identification = InMemDicomObject::from_element_iter([
        sequence(
            tags::ALGORITHM_FAMILY_CODE_SEQUENCE,
            vec![code_item(&family)],
        ),
        text(tags::ALGORITHM_NAME, VR::LO, &algorithm.name),
        text(tags::ALGORITHM_VERSION, VR::LO, &algorithm.version),
        text(
            tags::ALGORITHM_PARAMETERS,
            VR::LT,
            &format!("model run: {}", algorithm.run),
        ),
    ]);
    let mut item = InMemDicomObject::from_element_iter([
        us(tags::SEGMENT_NUMBER, &[number]),
        text(tags::SEGMENT_LABEL, VR::LO, &segment.label),
        text(
            tags::SEGMENT_DESCRIPTION,
            VR::ST,
            &format!("label value {}", segment.value),
        ),
        text(tags::SEGMENT_ALGORITHM_TYPE, VR::CS, "AUTOMATIC"),
        text(tags::SEGMENT_ALGORITHM_NAME, VR::LO, &algorithm.name),
        sequence(
            tags::SEGMENTATION_ALGORITHM_IDENTIFICATION_SEQUENCE,
            vec![identification],
        ),
        sequence(
            tags::SEGMENTED_PROPERTY_CATEGORY_CODE_SEQUENCE,
            vec![code_item(&code.category)],
        ),
        sequence(
            tags::SEGMENTED_PROPERTY_TYPE_CODE_SEQUENCE,
            vec![code_item(&code.property)],
        ),
    ]);
    if let Some(rgb) = code.color {
        item.put(us(tags::RECOMMENDED_DISPLAY_CIE_LAB_VALUE, &dicom_lab(rgb)));
    }
    item
}

/// The per-frame functional groups of the frame of segment `number` on plane `k`.
fn frame_item(source: &SourceSeries, number: u16, k: usize) -> InMemDicomObject {
    let slice = &source.slices[k];
    let mut image = slice.reference();
    image.put(sequence(
        tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE,
        vec![code_item(&dcm_code(
            "121322",
            "Source image for image processing operation",
        ))],
    ));
    let derivation = InMemDicomObject::from_element_iter([
        sequence(
            tags::DERIVATION_CODE_SEQUENCE,
            vec![code_item(&dcm_code("113076", "Segmentation"))],
        ),
        sequence(tags::SOURCE_IMAGE_SEQUENCE, vec![image]),
    ]);
    InMemDicomObject::from_element_iter([
        sequence(tags::DERIVATION_IMAGE_SEQUENCE, vec![derivation]),
        sequence(
            tags::FRAME_CONTENT_SEQUENCE,
            vec![InMemDicomObject::from_element_iter([DataElement::new(
                tags::DIMENSION_INDEX_VALUES,
                VR::UL,
                PrimitiveValue::U32([number as u32, k as u32 + 1].into_iter().collect()),
            )])],
        ),
        sequence(
            tags::PLANE_POSITION_SEQUENCE,
            vec![InMemDicomObject::from_element_iter([ds_element(
                tags::IMAGE_POSITION_PATIENT,
                &slice.position,
            )])],
        ),
        sequence(
            tags::SEGMENT_IDENTIFICATION_SEQUENCE,
            vec![InMemDicomObject::from_element_iter([us(
                tags::REFERENCED_SEGMENT_NUMBER,
                &[number],
            )])],
        ),
    ])
}

/// Shared functional groups (Pixel Measures, Plane Orientation) and the dimension organisation
/// (segment number, then image position).
fn frame_organisation(source: &SourceSeries) -> Vec<DataElement<InMemDicomObject>> {
    let mut measures = InMemDicomObject::from_element_iter([ds_element(
        tags::PIXEL_SPACING,
        &source.pixel_spacing,
    )]);
    let step = source.slice_step();
    if let Some(t) = source.slice_thickness.or(step) {
        measures.put(ds_element(tags::SLICE_THICKNESS, &[t]));
    }
    if let Some(s) = step {
        measures.put(ds_element(tags::SPACING_BETWEEN_SLICES, &[s]));
    }
    let shared = InMemDicomObject::from_element_iter([
        sequence(tags::PIXEL_MEASURES_SEQUENCE, vec![measures]),
        sequence(
            tags::PLANE_ORIENTATION_SEQUENCE,
            vec![InMemDicomObject::from_element_iter([ds_element(
                tags::IMAGE_ORIENTATION_PATIENT,
                &source.orientation,
            )])],
        ),
    ]);
    let organisation = crate::io::derived::new_uid();
    let index = |pointer: dicom_core::Tag, group: dicom_core::Tag, label: &str| {
        InMemDicomObject::from_element_iter([
            text(tags::DIMENSION_ORGANIZATION_UID, VR::UI, &organisation),
            DataElement::new(
                tags::DIMENSION_INDEX_POINTER,
                VR::AT,
                PrimitiveValue::Tags([pointer].into_iter().collect()),
            ),
            DataElement::new(
                tags::FUNCTIONAL_GROUP_POINTER,
                VR::AT,
                PrimitiveValue::Tags([group].into_iter().collect()),
            ),
            text(tags::DIMENSION_DESCRIPTION_LABEL, VR::LO, label),
        ])
    };
    vec![
        sequence(tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE, vec![shared]),
        sequence(
            tags::DIMENSION_ORGANIZATION_SEQUENCE,
            vec![InMemDicomObject::from_element_iter([text(
                tags::DIMENSION_ORGANIZATION_UID,
                VR::UI,
                &organisation,
            )])],
        ),
        sequence(
            tags::DIMENSION_INDEX_SEQUENCE,
            vec![
                index(
                    tags::REFERENCED_SEGMENT_NUMBER,
                    tags::SEGMENT_IDENTIFICATION_SEQUENCE,
                    "Segment Number",
                ),
                index(
                    tags::IMAGE_POSITION_PATIENT,
                    tags::PLANE_POSITION_SEQUENCE,
                    "Image Position Patient",
                ),
            ],
        ),
    ]
}

/// Writes `labels` (`[k, j, i]` on `source`'s planes) as a BINARY SEG at `path`, atomically.
/// Segments whose value is absent are left out; when none is present the first segment is
/// written with one empty frame, so the object still records that the scan was segmented.
pub fn write_seg(
    path: &Path,
    source: &SourceSeries,
    labels: ArrayView3<u8>,
    segments: &[Segment],
    algorithm: &Algorithm,
    description: &str,
) -> Result<SegSummary> {
    let (nk, nj, ni) = labels.dim();
    source.check_grid([nk, nj, ni])?;
    if segments.is_empty() {
        return Err(Error::Write {
            path: path.to_path_buf(),
            reason: "no classes to write as segments".into(),
        });
    }
    // Planes holding each value.
    let mut present = vec![[false; 256]; nk];
    for (k, plane) in labels.axis_iter(Axis(0)).enumerate() {
        for &v in plane.iter() {
            present[k][v as usize] = true;
        }
    }
    let mut frames: Vec<(u16, &Segment, usize)> = Vec::new();
    let mut written: Vec<&Segment> = Vec::new();
    for s in segments {
        let planes: Vec<usize> = (0..nk).filter(|&k| present[k][s.value as usize]).collect();
        if planes.is_empty() {
            continue;
        }
        written.push(s);
        let number = written.len() as u16;
        frames.extend(planes.into_iter().map(|k| (number, s, k)));
    }
    let placeholder = written.is_empty();
    if placeholder {
        written.push(&segments[0]);
        frames.push((1, &segments[0], 0));
    }
    let plane = nj * ni;
    let mut bits = vec![0u8; (frames.len() * plane).div_ceil(8).next_multiple_of(2)];
    for (f, (_, s, k)) in frames.iter().enumerate() {
        let start = f * plane;
        for (p, &v) in labels.index_axis(Axis(0), *k).iter().enumerate() {
            if v == s.value {
                let b = start + p;
                bits[b / 8] |= 1 << (b % 8);
            }
        }
    }
    let mut obj = derived_object(source, SEG_SOP_CLASS, "SEG", description);
    let (date, time) = now_date_time();
    for e in [
        text(tags::CONTENT_DATE, VR::DA, &date),
        text(tags::CONTENT_TIME, VR::TM, &time),
        DataElement::new(
            tags::IMAGE_TYPE,
            VR::CS,
            PrimitiveValue::Strs(
                ["DERIVED", "PRIMARY"]
                    .map(String::from)
                    .into_iter()
                    .collect(),
            ),
        ),
        text(tags::CONTENT_LABEL, VR::CS, "MEDSEG"),
        text(tags::CONTENT_DESCRIPTION, VR::LO, description),
        DataElement::new(tags::CONTENT_CREATOR_NAME, VR::PN, PrimitiveValue::Empty),
        text(tags::SEGMENTATION_TYPE, VR::CS, "BINARY"),
        text(tags::SEGMENTS_OVERLAP, VR::CS, "NO"),
        us(tags::SAMPLES_PER_PIXEL, &[1]),
        text(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2"),
        us(tags::ROWS, &[nj as u16]),
        us(tags::COLUMNS, &[ni as u16]),
        us(tags::BITS_ALLOCATED, &[1]),
        us(tags::BITS_STORED, &[1]),
        us(tags::HIGH_BIT, &[0]),
        us(tags::PIXEL_REPRESENTATION, &[0]),
        text(tags::LOSSY_IMAGE_COMPRESSION, VR::CS, "00"),
        text(tags::NUMBER_OF_FRAMES, VR::IS, &frames.len().to_string()),
        sequence(
            tags::SEGMENT_SEQUENCE,
            written
                .iter()
                .enumerate()
                .map(|(n, s)| segment_item(n as u16 + 1, s, algorithm))
                .collect(),
        ),
        sequence(
            tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE,
            frames
                .iter()
                .map(|(number, _, k)| frame_item(source, *number, *k))
                .collect(),
        ),
        sequence(
            tags::REFERENCED_SERIES_SEQUENCE,
            vec![InMemDicomObject::from_element_iter([
                text(tags::SERIES_INSTANCE_UID, VR::UI, &source.series_uid),
                sequence(
                    tags::REFERENCED_INSTANCE_SEQUENCE,
                    referenced_instances(source),
                ),
            ])],
        ),
        DataElement::new(tags::PIXEL_DATA, VR::OB, PrimitiveValue::from(bits)),
    ]
    .into_iter()
    .chain(frame_organisation(source))
    {
        obj.put(e);
    }
    write_object(path, obj, uids::EXPLICIT_VR_LITTLE_ENDIAN)?;
    Ok(SegSummary {
        segments: written.len(),
        frames: frames.len(),
        placeholder,
    })
}

/// Whether the DICOM file at `path` is a Segmentation object (header only).
pub fn is_seg(path: &Path) -> bool {
    dicom::open(path, true).is_ok_and(|o| {
        dicom::uid_or_meta(
            &o,
            tags::SOP_CLASS_UID,
            o.meta().media_storage_sop_class_uid(),
        )
        .as_deref()
            == Some(SEG_SOP_CLASS)
    })
}

/// One segment as read: its number and the label value it is given.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadSegment {
    /// Segment Number.
    pub number: u16,
    /// The label value: from `label value N` in the Segment Description (as medseg writes it),
    /// else the segment number.
    pub value: u8,
    /// Segment Label.
    pub label: String,
    /// Segmented Property Type.
    pub property: Option<Code>,
}

fn read_code(item: &InMemDicomObject, seq: dicom_core::Tag) -> Option<Code> {
    let c = items(item, seq).first()?;
    Some(Code {
        scheme: string(c, tags::CODING_SCHEME_DESIGNATOR)?,
        value: string(c, tags::CODE_VALUE)?,
        meaning: string(c, tags::CODE_MEANING).unwrap_or_default(),
    })
}

/// A geometry value from the frame's functional group, else the shared one.
fn group_floats(
    frame: Option<&InMemDicomObject>,
    shared: Option<&InMemDicomObject>,
    seq: dicom_core::Tag,
    tag: dicom_core::Tag,
) -> Option<Vec<f64>> {
    [frame, shared]
        .into_iter()
        .flatten()
        .find_map(|g| items(g, seq).first().and_then(|o| floats(o, tag)))
}

/// Reads a BINARY (or FRACTIONAL, thresholded at half its maximum) SEG as a label map, each
/// segment's voxels set to its label value. With `reference` (the source series' grid) the map lies
/// on that grid; without it, on a grid spanning only the planes the SEG holds (with a warning).
pub fn read_seg(path: &Path, reference: Option<&Geometry>) -> Result<(Volume, Vec<ReadSegment>)> {
    let obj = dicom::open(path, false)?;
    let bad = |reason: String| Error::InvalidDicom {
        path: path.to_path_buf(),
        reason,
    };
    let kind = string(&obj, tags::SEGMENTATION_TYPE).unwrap_or_default();
    let (rows, cols) = (
        int(&obj, tags::ROWS).unwrap_or(0),
        int(&obj, tags::COLUMNS).unwrap_or(0),
    );
    let frames = int(&obj, tags::NUMBER_OF_FRAMES).unwrap_or(1);
    if rows <= 0 || cols <= 0 || frames <= 0 || rows * cols * frames > 1 << 34 {
        return Err(bad(format!(
            "{rows} rows × {cols} columns × {frames} frames is not a segmentation grid"
        )));
    }
    let (rows, cols, frames) = (rows as usize, cols as usize, frames as usize);
    let plane = rows * cols;
    let segments: Vec<ReadSegment> = items(&obj, tags::SEGMENT_SEQUENCE)
        .iter()
        .map(|s| {
            let number = int(s, tags::SEGMENT_NUMBER).unwrap_or(0) as u16;
            let value = string(s, tags::SEGMENT_DESCRIPTION)
                .and_then(|d| d.strip_prefix("label value ")?.trim().parse::<u8>().ok())
                .unwrap_or(number.min(255) as u8);
            ReadSegment {
                number,
                value,
                label: string(s, tags::SEGMENT_LABEL).unwrap_or_default(),
                property: read_code(s, tags::SEGMENTED_PROPERTY_TYPE_CODE_SEQUENCE),
            }
        })
        .collect();
    let placed = frame_placements(path, &obj, &segments, frames)?;
    let pixels = frame_values(path, &obj, &kind, frames, plane)?;
    let (o, spacing) = (placed[0].1.clone(), placed[0].2.clone());
    if placed
        .iter()
        .any(|p| p.1.iter().zip(&o).any(|(a, b)| (a - b).abs() > 1e-4) || p.2 != spacing)
    {
        return Err(bad("frames differ in orientation or pixel spacing".into()));
    }
    let mut warnings = Vec::new();
    let groups = items(&obj, tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE).len();
    if groups > frames {
        warnings.push(format!(
            "{groups} per-frame functional groups for {frames} frames: the first {frames} were used"
        ));
    }
    let geometry = match reference {
        Some(g) => g.clone(),
        None => {
            warnings.push(
                "no reference series given: the grid spans only the planes the SEG holds".into(),
            );
            span_grid(
                path,
                &placed.iter().map(|p| p.0).collect::<Vec<_>>(),
                &o,
                &spacing,
                rows,
                cols,
            )?
        }
    };
    let [ni, nj, nk] = geometry.dims;
    if (ni, nj) != (cols, rows) {
        return Err(bad(format!(
            "frames are {cols}×{rows} but the reference grid is {ni}×{nj}"
        )));
    }
    let mut labels = Array3::<u8>::zeros((nk, nj, ni));
    let mut overlaps = 0usize;
    for (f, (position, ..)) in placed.iter().enumerate() {
        let k = plane_index(path, &geometry, *position, &o, &spacing)?;
        let mut dst = labels.index_axis_mut(Axis(0), k);
        for (d, &on) in dst.iter_mut().zip(&pixels[f * plane..(f + 1) * plane]) {
            if on {
                overlaps += usize::from(*d != 0 && *d != placed[f].3);
                *d = placed[f].3;
            }
        }
    }
    if overlaps > 0 {
        warnings.push(format!(
            "{overlaps} voxels belong to several segments: the later segment was kept"
        ));
    }
    let voxels: Array4<f32> = labels.mapv(f32::from).insert_axis(Axis(0));
    let info = VolumeInfo {
        path: path.to_path_buf(),
        kind: SourceKind::Dicom,
        modality: Some("SEG".into()),
        series_uid: string(&obj, tags::SERIES_INSTANCE_UID),
        series_description: string(&obj, tags::SERIES_DESCRIPTION),
        dtype: DataType::Uint8,
        slices: nk,
        warnings,
        identifiers: PatientIdentifiers::default(),
    };
    Ok((Volume::new(voxels, geometry, info)?, segments))
}

/// One frame as placed: position (LPS), orientation, pixel spacing and label value.
type Placement = ([f64; 3], Vec<f64>, Vec<f64>, u8);

/// Every frame's geometry (per-frame group, else shared) and the label value of its segment.
fn frame_placements(
    path: &Path,
    obj: &InMemDicomObject,
    segments: &[ReadSegment],
    frames: usize,
) -> Result<Vec<Placement>> {
    let bad = |reason: String| Error::InvalidDicom {
        path: path.to_path_buf(),
        reason,
    };
    let shared = items(obj, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE).first();
    let per_frame = items(obj, tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE);
    // Extra items (objects cut down to fewer frames keep them) are ignored by the caller's warning.
    if per_frame.len() < frames {
        return Err(bad(format!(
            "{} per-frame functional groups for {frames} frames",
            per_frame.len()
        )));
    }
    let mut placed = Vec::with_capacity(frames);
    for (f, g) in per_frame.iter().take(frames).enumerate() {
        let get = |seq, tag, n: usize| {
            group_floats(Some(g), shared, seq, tag)
                .filter(|v| v.len() >= n && v.iter().all(|x| x.is_finite()))
                .ok_or_else(|| bad(format!("frame {} has no usable {tag}", f + 1)))
        };
        let position = get(
            tags::PLANE_POSITION_SEQUENCE,
            tags::IMAGE_POSITION_PATIENT,
            3,
        )?;
        let orientation = get(
            tags::PLANE_ORIENTATION_SEQUENCE,
            tags::IMAGE_ORIENTATION_PATIENT,
            6,
        )?;
        let spacing = get(tags::PIXEL_MEASURES_SEQUENCE, tags::PIXEL_SPACING, 2)?;
        let number = items(g, tags::SEGMENT_IDENTIFICATION_SEQUENCE)
            .first()
            .and_then(|s| int(s, tags::REFERENCED_SEGMENT_NUMBER))
            .ok_or_else(|| bad(format!("frame {} names no segment", f + 1)))?;
        let value = segments
            .iter()
            .find(|s| s.number as i64 == number)
            .map(|s| s.value)
            .ok_or_else(|| {
                bad(format!(
                    "frame {} refers to unknown segment {number}",
                    f + 1
                ))
            })?;
        placed.push((
            [position[0], position[1], position[2]],
            orientation,
            spacing,
            value,
        ));
    }
    Ok(placed)
}

/// Frame pixels as on/off: 1-bit data unpacked across frame boundaries, 8-bit FRACTIONAL data
/// thresholded at half of Maximum Fractional Value.
fn frame_values(
    path: &Path,
    obj: &dicom_object::DefaultDicomObject,
    kind: &str,
    frames: usize,
    plane: usize,
) -> Result<Vec<bool>> {
    let bytes = obj
        .element(tags::PIXEL_DATA)
        .ok()
        .and_then(|e| e.to_bytes().ok())
        .ok_or_else(|| Error::InvalidDicom {
            path: path.to_path_buf(),
            reason: "pixel data missing or encapsulated (compressed SEG frames are not read)"
                .into(),
        })?;
    let bits = int(obj, tags::BITS_ALLOCATED).unwrap_or(1);
    let total = frames * plane;
    let short = |have: usize| Error::InvalidDicom {
        path: path.to_path_buf(),
        reason: format!("pixel data holds {have} values, {frames} frames need {total}"),
    };
    match (kind, bits) {
        (_, 1) => {
            let mut on = Vec::with_capacity(total);
            for f in 0..frames {
                on.extend(
                    dicom::bit_plane(path, obj, f, plane)?
                        .iter()
                        .map(|b| *b > 0.5),
                );
            }
            Ok(on)
        }
        ("FRACTIONAL", 8) => {
            if bytes.len() < total {
                return Err(short(bytes.len()));
            }
            let max = int(obj, tags::MAXIMUM_FRACTIONAL_VALUE)
                .unwrap_or(255)
                .max(1) as f64;
            Ok(bytes[..total]
                .iter()
                .map(|&v| v as f64 >= max / 2.0)
                .collect())
        }
        _ => Err(Error::Unsupported {
            path: path.to_path_buf(),
            reason: format!("{kind} segmentation with {bits} bits allocated"),
        }),
    }
}

/// The plane of `geometry` that a frame at `position` (LPS) lies on; a frame off the grid is an error.
fn plane_index(
    path: &Path,
    geometry: &Geometry,
    position: [f64; 3],
    orientation: &[f64],
    spacing: &[f64],
) -> Result<usize> {
    let ras = lps_to_ras(position);
    let off = |reason: String| Error::InconsistentSeries {
        path: path.to_path_buf(),
        reason,
    };
    let v = geometry
        .world_to_voxel(ras)
        .ok_or_else(|| off("the reference grid is degenerate".into()))?;
    // The frame's first row and column directions must be the grid's i and j axes.
    let [si, sj, _] = geometry.spacing();
    let expected = plane_steps(
        std::array::from_fn(|i| orientation[i]),
        [spacing[0], spacing[1]],
    )
    .map(lps_to_ras);
    let axis_off = (0..2)
        .flat_map(|a| {
            let step = geometry.axis_step(a);
            (0..3).map(move |r| (step[r] - expected[a][r]).abs())
        })
        .fold(0.0, f64::max);
    let k = v[2].round();
    let tol = 1e-2;
    if axis_off > 1e-3 * si.max(sj).max(1.0)
        || v[0].abs() > tol
        || v[1].abs() > tol
        || (v[2] - k).abs() > tol
        || k < 0.0
        || k as usize >= geometry.dims[2]
    {
        return Err(off(format!(
            "a frame at {position:?} (LPS) does not lie on a plane of the reference grid (voxel {v:.3?}); is it the series the SEG was made from?"
        )));
    }
    Ok(k as usize)
}

/// The smallest regular grid holding every frame position: planes along the normal, the step the
/// smallest gap between distinct planes.
fn span_grid(
    path: &Path,
    positions: &[[f64; 3]],
    o: &[f64],
    spacing: &[f64],
    rows: usize,
    cols: usize,
) -> Result<Geometry> {
    let n = cross([o[0], o[1], o[2]], [o[3], o[4], o[5]]);
    let len = norm(n);
    if len < 1e-6 {
        return Err(Error::InvalidDicom {
            path: path.to_path_buf(),
            reason: "degenerate Image Orientation (Patient)".into(),
        });
    }
    let n = n.map(|v| v / len);
    let mut d: Vec<(f64, [f64; 3])> = positions.iter().map(|p| (dot(*p, n), *p)).collect();
    d.sort_by(|a, b| a.0.total_cmp(&b.0));
    d.dedup_by(|a, b| (a.0 - b.0).abs() < 1e-4);
    let (first, last) = (d[0], d[d.len() - 1]);
    let gap = d
        .windows(2)
        .map(|w| w[1].0 - w[0].0)
        .fold(f64::INFINITY, f64::min);
    let count = if d.len() > 1 {
        (((last.0 - first.0) / gap).round() as usize).saturating_add(1)
    } else {
        1
    };
    // A grid no real series has (frames far apart at a tiny step) is refused before allocation.
    if count.saturating_mul(rows * cols) > 1 << 31 {
        return Err(Error::InvalidDicom {
            path: path.to_path_buf(),
            reason: format!(
                "frames span {count} planes of {cols}×{rows} at a {gap:.4} mm step: not one grid"
            ),
        });
    }
    let step: [f64; 3] = if count > 1 {
        std::array::from_fn(|r| (last.1[r] - first.1[r]) / (count - 1) as f64)
    } else {
        n
    };
    let [step_i, step_j] = plane_steps(std::array::from_fn(|i| o[i]), [spacing[0], spacing[1]]);
    let mut affine = IDENTITY;
    for r in 0..3 {
        affine[r][0] = step_i[r];
        affine[r][1] = step_j[r];
        affine[r][2] = step[r];
        affine[r][3] = first.1[r];
    }
    Ok(Geometry::new(
        [cols, rows, count],
        matmul(&LPS_TO_RAS, &affine),
    ))
}

#[cfg(test)]
mod tests {
    use super::dicom_lab;

    #[test]
    fn lab_of_white_black_and_red() {
        let near = |a: [u16; 3], b: [u16; 3]| a.iter().zip(b).all(|(x, y)| x.abs_diff(y) <= 1);
        assert!(near(dicom_lab([255, 255, 255]), [65535, 32896, 32896]));
        assert!(near(dicom_lab([0, 0, 0]), [0, 32896, 32896]));
        // Red in CIELab D50 is about (54.3, 80.8, 69.9).
        let [l, a, b] = dicom_lab([255, 0, 0]).map(|v| v as f64 / 65535.0);
        assert!((l * 100.0 - 54.3).abs() < 0.5, "{l}");
        assert!((a * 255.0 - 128.0 - 80.8).abs() < 1.0, "{a}");
        assert!((b * 255.0 - 128.0 - 69.9).abs() < 1.0, "{b}");
    }
}
