//! DICOM input: single-frame files, classic and enhanced multi-frame objects, and series directories.
//!
//! Voxel axes: `i` = column, `j` = row, `k` = slice (or frame) ordered along the slice normal
//! `n = row direction × column direction` (ImageOrientationPatient's two vectors), so the affine's
//! columns are `row_dir · PixelSpacing[1]`, `col_dir · PixelSpacing[0]` and the step between
//! successive slice positions. Positions and directions are converted from DICOM's LPS to RAS+.
//!
//! Slices are sorted by their position along the normal, never by InstanceNumber, and the slice step
//! comes from the positions (SpacingBetweenSlices is often wrong or absent).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dicom_core::Tag;
use dicom_dictionary_std::{tags, uids};
use dicom_object::{DefaultDicomObject, InMemDicomObject, OpenFileOptions};
use dicom_pixeldata::{
    DecodedPixelData, PhotometricInterpretation, PixelDecoder, PixelRepresentation,
};
use ndarray::Array4;
use rayon::prelude::*;

use crate::error::{Error, Result, SeriesChoice};
use crate::geometry::{cross, dot, matmul, norm, Affine, Geometry, IDENTITY, LPS_TO_RAS};
use crate::io::tolerant;
use crate::volume::{DataType, PatientIdentifiers, SourceKind, Volume, VolumeInfo};

/// What medseg reads from a DICOM file's header to group and order slices (pixel data not loaded).
#[derive(Debug, Clone)]
pub struct SliceHeader {
    /// The file.
    pub path: PathBuf,
    /// SeriesInstanceUID, or [`NO_UID`] when empty or missing.
    pub series_uid: String,
    /// Modality (`CT`, `MR`, …); `OT` when missing.
    pub modality: String,
    /// SeriesDescription; empty when missing.
    pub description: String,
    /// Rows: image height in pixels (size along `j`).
    pub rows: u32,
    /// Columns: image width in pixels (size along `i`).
    pub columns: u32,
    /// NumberOfFrames; 1 for single-frame objects.
    pub frames: u32,
    /// SamplesPerPixel: 1 for greyscale, 3 for RGB.
    pub samples_per_pixel: u16,
    /// BitsAllocated per sample (16 when missing).
    pub bits_allocated: u16,
    /// PixelRepresentation is 1: samples are two's-complement signed.
    pub signed: bool,
    /// ImageOrientationPatient (LPS): row direction then column direction.
    pub orientation: Option<[f64; 6]>,
    /// ImagePositionPatient (LPS).
    pub position: Option<[f64; 3]>,
    /// PixelSpacing: `[between rows, between columns]` in mm.
    pub pixel_spacing: Option<[f64; 2]>,
    /// SliceThickness in mm (nominal; the slice step comes from the positions).
    pub slice_thickness: Option<f64>,
    /// SpacingBetweenSlices in mm, when the file states it.
    pub spacing_between_slices: Option<f64>,
    /// InstanceNumber.
    pub instance_number: Option<i64>,
    /// EchoNumbers; slices of different echoes go to separate stacks.
    pub echo_number: Option<i64>,
    /// Transfer syntax UID from the file meta group.
    pub transfer_syntax: String,
    /// The object carries per-frame functional groups (enhanced multi-frame).
    pub enhanced: bool,
    /// Per-frame (position, orientation) in LPS from the functional groups; empty when not enhanced.
    pub frame_geometry: Vec<FrameGeometry>,
    /// Patient name, ID, birth date and accession number.
    pub identifiers: PatientIdentifiers,
    /// SOPClassUID, else the file meta's MediaStorageSOPClassUID (anonymisers blank the former).
    pub sop_class_uid: Option<String>,
    /// SOPInstanceUID, else the file meta's MediaStorageSOPInstanceUID.
    pub sop_instance_uid: Option<String>,
}

/// Stands in for an empty or missing SeriesInstanceUID.
pub const NO_UID: &str = "(no-series-uid)";

pub(crate) fn dicom_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::InvalidDicom {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

pub(crate) fn string(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    let v = obj.element_opt(tag).ok()??.to_str().ok()?;
    let v = v.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    (!v.is_empty()).then(|| v.to_string())
}

pub(crate) fn floats(obj: &InMemDicomObject, tag: Tag) -> Option<Vec<f64>> {
    obj.element_opt(tag).ok()??.to_multi_float64().ok()
}

pub(crate) fn fixed<const N: usize>(obj: &InMemDicomObject, tag: Tag) -> Option<[f64; N]> {
    let v = floats(obj, tag)?;
    (v.len() >= N && v.iter().take(N).all(|x| x.is_finite())).then(|| std::array::from_fn(|i| v[i]))
}

pub(crate) fn int(obj: &InMemDicomObject, tag: Tag) -> Option<i64> {
    obj.element_opt(tag).ok()??.to_int::<i64>().ok()
}

/// Items of a sequence element.
pub(crate) fn items(obj: &InMemDicomObject, tag: Tag) -> &[InMemDicomObject] {
    obj.element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| e.items())
        .unwrap_or(&[])
}

/// A value from a functional-group macro: `group` item → `sequence` → first item → `tag`.
pub(crate) fn from_group<T>(
    group: Option<&InMemDicomObject>,
    sequence: Tag,
    get: impl Fn(&InMemDicomObject) -> Option<T>,
) -> Option<T> {
    items(group?, sequence).first().and_then(get)
}

/// Opens a DICOM file, reading its header only (up to Pixel Data) when `header_only`.
/// Gzip-compressed files (`.dcm.gz`, common in research archives) are inflated in memory first.
pub fn open(path: &Path, header_only: bool) -> Result<DefaultDicomObject> {
    open_noted(path, header_only).map(|(obj, _)| obj)
}

/// [`open`], and what had to be read around: a file the strict parser refuses is read a second
/// time by [`tolerant::reread`] (bytes after the last element, a VR encoding other than the
/// file meta's), whose notes are returned; when that does not explain it, the strict error stands.
pub fn open_noted(path: &Path, header_only: bool) -> Result<(DefaultDicomObject, Vec<String>)> {
    let strict = open_strict(path, header_only);
    let Err(error) = strict else {
        return strict.map(|obj| (obj, Vec::new()));
    };
    // Only a file that is DICOM by its magic is worth reading whole a second time.
    let head = file_head(path);
    let gzip = head.starts_with(&[0x1f, 0x8b]);
    if !(gzip || head.starts_with(b"DICM") || head.get(128..132) == Some(b"DICM".as_slice())) {
        return Err(error);
    }
    let bytes = if gzip {
        inflate(path)?
    } else {
        std::fs::read(path).map_err(|e| Error::io(path, e))?
    };
    tolerant::reread(&bytes).ok_or(error)
}

fn inflate(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    flate2::read::MultiGzDecoder::new(std::io::BufReader::new(file))
        .read_to_end(&mut bytes)
        .map_err(|e| dicom_err(path, format!("gzip stream is truncated or corrupt ({e})")))?;
    Ok(bytes)
}

fn open_strict(path: &Path, header_only: bool) -> Result<DefaultDicomObject> {
    if is_gzip(path) {
        return open_bytes(path, &inflate(path)?, header_only);
    }
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(u64::MAX);
    check_declared_lengths(path, std::io::BufReader::new(file), size, header_only)?;
    let opts = OpenFileOptions::new();
    let opts = if header_only {
        opts.read_until(tags::PIXEL_DATA)
    } else {
        opts
    };
    opts.open_file(path)
        .map_err(|e| dicom_err(path, e.to_string()))
}

/// Parses a DICOM file held in memory (with or without its 128-byte preamble); `path` only names
/// it in errors.
pub fn open_bytes(path: &Path, bytes: &[u8], header_only: bool) -> Result<DefaultDicomObject> {
    check_declared_lengths(path, bytes, bytes.len() as u64, header_only)?;
    let opts = OpenFileOptions::new().read_preamble(dicom_object::file::ReadPreamble::Never);
    let opts = if header_only {
        opts.read_until(tags::PIXEL_DATA)
    } else {
        opts
    };
    let body = match bytes.get(128..132) {
        Some(m) if m == b"DICM" => &bytes[128..],
        _ => bytes,
    };
    opts.from_reader(std::io::Cursor::new(body))
        .map_err(|e| dicom_err(path, e.to_string()))
}

/// Refuses an object whose elements (or encapsulated fragments) declare more bytes than the whole
/// file holds, walking up to Pixel Data when only the header will be read, else the whole object. dicom-parser reserves and zero-fills a value's declared length before reading it, so one
/// corrupt length in a 10 KB file costs 4 GB and seconds (found by fuzzing); a batch on a small
/// machine must not pay that. Anything this walk cannot parse is left to the real parser to report.
fn check_declared_lengths(
    path: &Path,
    source: impl std::io::Read,
    file_size: u64,
    header_only: bool,
) -> Result<()> {
    use dicom_encoding::TransferSyntaxIndex;
    use std::io::Read;
    let mut source = source;
    // The file meta group is a few hundred bytes; its elements are checked in this window first,
    // since the meta reader zero-fills declared lengths too.
    let mut head = Vec::new();
    let _ = (&mut source).take(64 * 1024).read_to_end(&mut head);
    // With a preamble the meta group follows "DICM" at 128; without one the bytes start with it.
    let start = if head.get(128..132) == Some(b"DICM".as_slice()) {
        128
    } else {
        0
    };
    let head = head.split_off(start);
    if let Some(meta) = head.strip_prefix(b"DICM") {
        check_meta_lengths(path, meta, file_size)?;
    }
    let chained = std::io::Cursor::new(head).chain(source);
    let mut reader = std::io::BufReader::new(chained);
    let Ok(meta) = dicom_object::FileMetaTable::from_reader(&mut reader) else {
        return Ok(());
    };
    let uid = meta.transfer_syntax();
    let registry = dicom_transfer_syntax_registry::TransferSyntaxRegistry;
    if is_deflated(uid) {
        // Declared lengths count inflated bytes: walk those (deflate expands at most 1032:1, so
        // this is bounded by the file). A corrupt stream is walked as far as it inflates, which
        // is as far as the parser will get too.
        let mut raw = Vec::new();
        let _ = reader.read_to_end(&mut raw);
        let Some(ts) = registry.get(uids::EXPLICIT_VR_LITTLE_ENDIAN) else {
            return Ok(());
        };
        // Two streaming passes, so only the compressed bytes are held: the size, then the walk.
        let size = std::io::copy(&mut Inflating::new(&raw), &mut std::io::sink()).unwrap_or(0);
        let inflated = Inflating::new(&raw);
        return check_tokens(
            path,
            inflated,
            ts,
            size,
            "the inflated data set",
            header_only,
        );
    }
    let Some(ts) = registry.get(uid) else {
        return Ok(());
    };
    check_tokens(path, reader, ts, file_size, "the file", header_only)
}

/// The file meta group's elements (always explicit VR little endian) hold at most the file.
fn check_meta_lengths(path: &Path, meta: &[u8], file_size: u64) -> Result<()> {
    match oversized_meta_element(meta, file_size) {
        None => Ok(()),
        Some((tag, len)) => Err(dicom_err(
            path,
            format!("file meta element {tag} declares {len} bytes but the file has {file_size}"),
        )),
    }
}

/// The first file meta element in `meta` (the bytes after "DICM") that declares more than
/// `file_size` bytes. The meta reader reads every element within the group length that the
/// first element gives, whatever its tag, so those are walked too.
pub(crate) fn oversized_meta_element(mut meta: &[u8], file_size: u64) -> Option<(Tag, u32)> {
    use dicom_encoding::decode::{explicit_le::ExplicitVRLittleEndianDecoder, Decode};
    let decoder = ExplicitVRLittleEndianDecoder::default();
    let mut group: Option<(u64, u64)> = None; // (group length, bytes read of it)
    while let Ok((header, read)) = decoder.decode_header(&mut meta) {
        let len = header.len.get()?;
        let within = group.is_some_and(|(length, done)| done < length);
        if header.tag.group() != 0x0002 && !within {
            return None;
        }
        if u64::from(len) > file_size {
            return Some((header.tag, len));
        }
        match &mut group {
            Some((_, done)) => *done += (read + len as usize) as u64,
            None if header.tag == tags::FILE_META_INFORMATION_GROUP_LENGTH => {
                let value = meta.get(..4)?;
                group = Some((u64::from(u32::from_le_bytes(value.try_into().ok()?)), 0));
            }
            None => {}
        }
        meta = meta.get(len as usize..).unwrap_or_default();
    }
    None
}

/// A raw deflate stream read as far as it inflates: to its end, or up to the first corrupt
/// byte, keeping what came before it (which is what a streaming parser reads before it fails).
struct Inflating<'a> {
    raw: &'a [u8],
    inflater: flate2::Decompress,
    done: bool,
}

impl<'a> Inflating<'a> {
    fn new(raw: &'a [u8]) -> Self {
        Inflating {
            raw,
            inflater: flate2::Decompress::new(false),
            done: false,
        }
    }
}

impl std::io::Read for Inflating<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use flate2::{FlushDecompress, Status};
        while !self.done && !buf.is_empty() {
            let (read, written) = (self.inflater.total_in(), self.inflater.total_out());
            let input = self.raw.get(read as usize..).unwrap_or_default();
            let status = self.inflater.decompress(input, buf, FlushDecompress::None);
            let out = (self.inflater.total_out() - written) as usize;
            let stalled = out == 0 && self.inflater.total_in() == read;
            if matches!(status, Ok(Status::StreamEnd) | Err(_)) || stalled {
                self.done = true;
            }
            if out > 0 {
                return Ok(out);
            }
        }
        Ok(0)
    }
}

/// [`check_declared_lengths`] past the file meta: every element and item of `source`, a data set
/// in `ts` of `size` bytes (`what`), holds at most `size` bytes.
fn check_tokens(
    path: &Path,
    source: impl std::io::Read,
    ts: &dicom_encoding::TransferSyntax,
    size: u64,
    what: &str,
    header_only: bool,
) -> Result<()> {
    use dicom_parser::dataset::DataToken;
    let Ok(tokens) = dicom_parser::DataSetReader::new_with_ts(source, ts) else {
        return Ok(());
    };
    let too_long = |element: String, len: u32| {
        dicom_err(
            path,
            format!("{element} declares {len} bytes but {what} has {size}"),
        )
    };
    for token in tokens {
        match token {
            Ok(DataToken::ElementHeader(h)) => {
                if let Some(len) = h.len.get() {
                    if u64::from(len) > size {
                        return Err(too_long(format!("element {}", h.tag), len));
                    }
                }
                if header_only && h.tag == tags::PIXEL_DATA {
                    break;
                }
            }
            Ok(DataToken::ItemStart { len }) => {
                if let Some(n) = len.get() {
                    if u64::from(n) > size {
                        return Err(too_long("an item".into(), n));
                    }
                }
            }
            Ok(DataToken::PixelSequenceStart) if header_only => break,
            Err(_) => break,
            Ok(_) => {}
        }
    }
    Ok(())
}

/// Whether a transfer syntax deflates the data set, whose bytes then cannot be walked as stored.
pub(crate) fn is_deflated(uid: &str) -> bool {
    let uid = uid.trim_end_matches('\0');
    uid == uids::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN || uid == uids::JPIP_REFERENCED_DEFLATE
}

/// The LPS steps of one column and one row of an image plane: the row direction times the column
/// spacing (PixelSpacing[1]) and the column direction times the row spacing (PixelSpacing[0]).
pub(crate) fn plane_steps(orientation: [f64; 6], [dr, dc]: [f64; 2]) -> [[f64; 3]; 2] {
    [
        std::array::from_fn(|r| orientation[r] * dc),
        std::array::from_fn(|r| orientation[3 + r] * dr),
    ]
}

/// Up to the first 132 bytes of a file (the DICOM preamble and magic); empty when unreadable.
fn file_head(path: &Path) -> Vec<u8> {
    use std::io::Read;
    let mut head = Vec::with_capacity(132);
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.take(132).read_to_end(&mut head);
    }
    head
}

fn is_gzip(path: &Path) -> bool {
    file_head(path).starts_with(&[0x1f, 0x8b])
}

/// Cheap content check: the 128-byte preamble followed by `DICM`, or a gzip stream to try.
pub fn has_dicom_magic(path: &Path) -> bool {
    let head = file_head(path);
    head.starts_with(&[0x1f, 0x8b]) || head.get(128..132) == Some(b"DICM".as_slice())
}

impl SliceHeader {
    /// Reads the grouping and geometry fields of an opened object. Objects without pixel rows and
    /// columns (structured reports, RT structures, DICOMDIR) are rejected.
    pub fn from_object(path: &Path, obj: &DefaultDicomObject) -> Result<Self> {
        let rows = int(obj, tags::ROWS).unwrap_or(0);
        let columns = int(obj, tags::COLUMNS).unwrap_or(0);
        if rows <= 0 || columns <= 0 {
            let sop = string(obj, tags::SOP_CLASS_UID).unwrap_or_default();
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                reason: format!("not an image (no Rows/Columns; SOP class {sop})"),
            });
        }
        let shared = items(obj, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE).first();
        let first_frame = items(obj, tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE).first();
        let enhanced = first_frame.is_some();
        // Enhanced objects keep geometry in functional groups (per frame, else shared).
        let group_value = |seq: Tag, tag: Tag| {
            from_group(first_frame, seq, |o| floats(o, tag))
                .or_else(|| from_group(shared, seq, |o| floats(o, tag)))
        };
        let orientation = fixed::<6>(obj, tags::IMAGE_ORIENTATION_PATIENT).or_else(|| {
            let v = group_value(
                tags::PLANE_ORIENTATION_SEQUENCE,
                tags::IMAGE_ORIENTATION_PATIENT,
            )?;
            (v.len() >= 6).then(|| std::array::from_fn(|i| v[i]))
        });
        let pixel_spacing = fixed::<2>(obj, tags::PIXEL_SPACING)
            .or_else(|| {
                let v = group_value(tags::PIXEL_MEASURES_SEQUENCE, tags::PIXEL_SPACING)?;
                (v.len() >= 2).then(|| [v[0], v[1]])
            })
            .or_else(|| fixed::<2>(obj, tags::IMAGER_PIXEL_SPACING));
        let slice_thickness = floats(obj, tags::SLICE_THICKNESS)
            .and_then(|v| v.first().copied())
            .or_else(|| {
                group_value(tags::PIXEL_MEASURES_SEQUENCE, tags::SLICE_THICKNESS)
                    .and_then(|v| v.first().copied())
            });
        Ok(SliceHeader {
            path: path.to_path_buf(),
            // Anonymisers sometimes blank the UID; a placeholder keeps such series selectable.
            series_uid: string(obj, tags::SERIES_INSTANCE_UID).unwrap_or_else(|| NO_UID.into()),
            modality: string(obj, tags::MODALITY).unwrap_or_else(|| "OT".into()),
            description: string(obj, tags::SERIES_DESCRIPTION).unwrap_or_default(),
            rows: rows as u32,
            columns: columns as u32,
            frames: int(obj, tags::NUMBER_OF_FRAMES).unwrap_or(1).max(1) as u32,
            samples_per_pixel: int(obj, tags::SAMPLES_PER_PIXEL).unwrap_or(1).max(1) as u16,
            bits_allocated: int(obj, tags::BITS_ALLOCATED).unwrap_or(16) as u16,
            signed: int(obj, tags::PIXEL_REPRESENTATION) == Some(1),
            orientation,
            position: fixed::<3>(obj, tags::IMAGE_POSITION_PATIENT),
            pixel_spacing,
            slice_thickness,
            spacing_between_slices: floats(obj, tags::SPACING_BETWEEN_SLICES)
                .and_then(|v| v.first().copied()),
            instance_number: int(obj, tags::INSTANCE_NUMBER),
            echo_number: int(obj, tags::ECHO_NUMBERS),
            transfer_syntax: obj.meta().transfer_syntax().to_string(),
            enhanced,
            frame_geometry: if enhanced {
                enhanced_frame_geometry(obj)
            } else {
                Vec::new()
            },
            identifiers: PatientIdentifiers {
                patient_name: string(obj, tags::PATIENT_NAME),
                patient_id: string(obj, tags::PATIENT_ID),
                birth_date: string(obj, tags::PATIENT_BIRTH_DATE),
                accession_number: string(obj, tags::ACCESSION_NUMBER),
            },
            sop_class_uid: uid_or_meta(
                obj,
                tags::SOP_CLASS_UID,
                obj.meta().media_storage_sop_class_uid(),
            ),
            sop_instance_uid: uid_or_meta(
                obj,
                tags::SOP_INSTANCE_UID,
                obj.meta().media_storage_sop_instance_uid(),
            ),
        })
    }

    /// Reads the header of the file at `path`.
    pub fn read(path: &Path) -> Result<Self> {
        let obj = open(path, true)?;
        Self::from_object(path, &obj)
    }

    fn dtype(&self) -> DataType {
        match (self.samples_per_pixel, self.bits_allocated, self.signed) {
            (3, 8, _) => DataType::Rgb24,
            (_, 8, false) => DataType::Uint8,
            (_, 8, true) => DataType::Int8,
            (_, 16, false) => DataType::Uint16,
            (_, 16, true) => DataType::Int16,
            (_, 32, false) => DataType::Uint32,
            (_, 32, true) => DataType::Int32,
            _ => DataType::Float32,
        }
    }

    /// The slice normal (LPS) of this slice's orientation.
    fn normal(&self) -> Option<[f64; 3]> {
        let o = self.orientation?;
        let n = cross([o[0], o[1], o[2]], [o[3], o[4], o[5]]);
        let len = norm(n);
        (len > 1e-6).then(|| [n[0] / len, n[1] / len, n[2] / len])
    }
}

/// A UID from the data set, else from the file meta group (anonymisers often blank the former).
pub(crate) fn uid_or_meta(obj: &DefaultDicomObject, tag: Tag, meta: &str) -> Option<String> {
    let meta = meta.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    string(obj, tag).or_else(|| (!meta.is_empty()).then(|| meta.to_string()))
}

/// One stack of slices that forms a volume: a series, or part of one when a series mixes
/// orientations, sizes or echoes.
#[derive(Debug, Clone)]
pub struct SeriesStack {
    /// SeriesInstanceUID, with `#N` appended when the UID was split into several stacks.
    pub uid: String,
    /// The directory searched.
    pub root: PathBuf,
    /// Headers of the stack's files, in discovery order (ordered along the normal when read).
    pub slices: Vec<SliceHeader>,
}

impl SeriesStack {
    /// How the stack is listed when a choice is needed (UID, modality, slice count, description).
    pub fn choice(&self) -> SeriesChoice {
        let first = &self.slices[0];
        SeriesChoice {
            uid: self.uid.clone(),
            description: first.description.clone(),
            modality: first.modality.clone(),
            slices: self.slices.len(),
        }
    }
}

/// Groups single-frame image headers into stacks: by SeriesInstanceUID, then split by orientation,
/// image size and echo number so that each stack is one regular grid.
pub fn group_series(root: &Path, headers: Vec<SliceHeader>) -> Vec<SeriesStack> {
    type Key = (String, Vec<i64>, u32, u32, u16, Option<i64>);
    let mut groups: BTreeMap<Key, Vec<SliceHeader>> = BTreeMap::new();
    for h in headers {
        // Orientation rounded to 1e-4 so float noise in the header does not split a series.
        let o = h
            .orientation
            .map(|o| o.iter().map(|v| (v * 1e4).round() as i64).collect())
            .unwrap_or_default();
        let key = (
            h.series_uid.clone(),
            o,
            h.rows,
            h.columns,
            h.samples_per_pixel,
            h.echo_number,
        );
        groups.entry(key).or_default().push(h);
    }
    let mut by_uid: BTreeMap<String, Vec<Vec<SliceHeader>>> = BTreeMap::new();
    for ((uid, ..), slices) in groups {
        by_uid.entry(uid).or_default().push(slices);
    }
    let mut out = Vec::new();
    for (uid, mut parts) in by_uid {
        parts.sort_by_key(|p| std::cmp::Reverse(p.len()));
        let split = parts.len() > 1;
        for (n, slices) in parts.into_iter().enumerate() {
            let uid = if split {
                format!("{uid}#{}", n + 1)
            } else {
                uid.clone()
            };
            out.push(SeriesStack {
                uid,
                root: root.to_path_buf(),
                slices,
            });
        }
    }
    out
}

/// Slice order along the normal, the stack's LPS affine, and what looked wrong.
pub(crate) struct SliceOrder {
    /// Input index of each slice, along the normal.
    pub order: Vec<usize>,
    /// What looked wrong.
    pub warnings: Vec<String>,
    /// LPS affine of the stack.
    pub affine_lps: Affine,
}

/// Orders slices along the normal and derives the stack's LPS affine from their positions.
pub(crate) fn order_slices(
    path: &Path,
    orientation: Option<[f64; 6]>,
    positions: &[Option<[f64; 3]>],
    pixel_spacing: Option<[f64; 2]>,
    fallback_step: Option<f64>,
) -> Result<SliceOrder> {
    let n = positions.len();
    let mut warnings = Vec::new();
    let [dr, dc] = pixel_spacing.unwrap_or_else(|| {
        warnings.push("no PixelSpacing: 1 mm assumed in-plane".into());
        [1.0, 1.0]
    });
    let (row_dir, col_dir) = match orientation {
        Some(o) => ([o[0], o[1], o[2]], [o[3], o[4], o[5]]),
        None => {
            warnings.push(
                "no ImageOrientationPatient/ImagePositionPatient: identity orientation assumed"
                    .into(),
            );
            ([1.0, 0.0, 0.0], [0.0, 1.0, 0.0])
        }
    };
    let normal = {
        let c = cross(row_dir, col_dir);
        let l = norm(c);
        if l < 1e-6 {
            return Err(Error::InconsistentSeries {
                path: path.to_path_buf(),
                reason: format!("ImageOrientationPatient {row_dir:?}/{col_dir:?} is degenerate"),
            });
        }
        [c[0] / l, c[1] / l, c[2] / l]
    };
    let all_positions: Option<Vec<[f64; 3]>> = positions.iter().copied().collect();
    let mut order: Vec<usize> = (0..n).collect();
    let mut affine = IDENTITY;
    let [step_i, step_j] = plane_steps(
        [
            row_dir[0], row_dir[1], row_dir[2], col_dir[0], col_dir[1], col_dir[2],
        ],
        [dr, dc],
    );
    for r in 0..3 {
        affine[r][0] = step_i[r];
        affine[r][1] = step_j[r];
    }
    match all_positions {
        Some(pos) if orientation.is_some() => {
            let d: Vec<f64> = pos.iter().map(|p| dot(*p, normal)).collect();
            order.sort_by(|&a, &b| d[a].total_cmp(&d[b]));
            let first = pos[order[0]];
            let step = if n > 1 {
                let last = pos[order[n - 1]];
                let gaps: Vec<f64> = order.windows(2).map(|w| d[w[1]] - d[w[0]]).collect();
                let mut sorted = gaps.clone();
                sorted.sort_by(f64::total_cmp);
                let median = sorted[sorted.len() / 2];
                if median <= 1e-4 {
                    return Err(Error::InconsistentSeries {
                        path: path.to_path_buf(),
                        reason: format!(
                            "{n} slices but most share one position (several acquisitions or echoes in one series?)"
                        ),
                    });
                }
                let dup = gaps.iter().filter(|g| g.abs() <= 1e-4).count();
                if dup > 0 {
                    warnings.push(format!("{dup} slices share a position with another slice"));
                }
                let missing: Vec<String> = gaps
                    .iter()
                    .enumerate()
                    .filter(|(_, g)| **g > 1.5 * median)
                    .map(|(k, g)| {
                        format!(
                            "{:.2} mm gap after slice {k} (~{} missing)",
                            g,
                            (g / median).round() as i64 - 1
                        )
                    })
                    .collect();
                if !missing.is_empty() {
                    warnings.push(format!(
                        "missing slices (expected spacing {median:.3} mm): {}",
                        missing.join(", ")
                    ));
                } else {
                    let (lo, hi) = (sorted[0], sorted[sorted.len() - 1]);
                    if hi - lo > (0.01 * median).max(1e-3) {
                        warnings.push(format!(
                            "uneven slice spacing: {lo:.4} to {hi:.4} mm (the mean step is used)"
                        ));
                    }
                }
                let step: [f64; 3] = std::array::from_fn(|r| (last[r] - first[r]) / (n - 1) as f64);
                let along = dot(step, normal);
                let tilt = (along / norm(step)).clamp(-1.0, 1.0).acos().to_degrees();
                if tilt > 0.01 {
                    warnings.push(format!(
                        "slices are sheared by {tilt:.2}° against their normal (gantry tilt); the affine keeps the shear"
                    ));
                }
                step
            } else {
                let t = fallback_step.unwrap_or(1.0);
                normal.map(|v| v * t)
            };
            for r in 0..3 {
                affine[r][2] = step[r];
                affine[r][3] = first[r];
            }
        }
        _ => {
            if n > 1 || orientation.is_some() {
                warnings.push("slice positions missing: slices kept in file order".into());
            }
            let t = fallback_step.unwrap_or(1.0);
            for r in 0..3 {
                affine[r][2] = normal[r] * t;
                affine[r][3] = positions
                    .first()
                    .copied()
                    .flatten()
                    .map(|p| p[r])
                    .unwrap_or(0.0);
            }
        }
    }
    Ok(SliceOrder {
        order,
        warnings,
        affine_lps: affine,
    })
}

/// Decoded frames of one object as `f32` planes `[sample][row][col]`, rescaled, MONOCHROME1 inverted.
fn frame_planes(path: &Path, pixels: &DecodedPixelData, frame: u32, ts: &str) -> Result<Vec<f32>> {
    let px_err = |e: dicom_pixeldata::Error| Error::PixelData {
        path: path.to_path_buf(),
        transfer_syntax: transfer_syntax_name(ts),
        reason: e.to_string(),
    };
    let (rows, cols) = (pixels.rows() as usize, pixels.columns() as usize);
    let samples = pixels.samples_per_pixel() as usize;
    if samples > 1 {
        // Colour: keep the stored samples as channels; handle both planar configurations.
        if pixels.bits_allocated() != 8 {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                reason: format!("{}-bit colour pixel data", pixels.bits_allocated()),
            });
        }
        let raw = pixels.frame_data(frame).map_err(px_err)?;
        let plane = rows * cols;
        if raw.len() < plane * samples {
            return Err(dicom_err(
                path,
                "colour frame shorter than Rows × Columns × 3",
            ));
        }
        let planar =
            pixels.planar_configuration() == dicom_pixeldata::PlanarConfiguration::PixelFirst;
        let mut out = vec![0f32; plane * samples];
        for s in 0..samples {
            for p in 0..plane {
                out[s * plane + p] = if planar {
                    raw[s * plane + p]
                } else {
                    raw[p * samples + s]
                } as f32;
            }
        }
        return Ok(out);
    }
    let mut values: Vec<f32> = pixels.to_vec_frame(frame).map_err(px_err)?;
    if *pixels.photometric_interpretation() == PhotometricInterpretation::Monochrome1 {
        // Invert within the rescaled range of the stored bits so that bright means dense again.
        let bits = pixels.bits_stored().clamp(1, 32) as i32;
        let (lo, hi) = if pixels.pixel_representation() == PixelRepresentation::Signed {
            (-(2f64.powi(bits - 1)), 2f64.powi(bits - 1) - 1.0)
        } else {
            (0.0, 2f64.powi(bits) - 1.0)
        };
        let r = pixels
            .rescale()
            .ok()
            .and_then(|r| r.get(frame as usize).or(r.first()).copied());
        let (m, b) = r.map(|r| (r.slope, r.intercept)).unwrap_or((1.0, 0.0));
        let sum = (lo * m + b + hi * m + b) as f32;
        values.iter_mut().for_each(|v| *v = sum - *v);
    }
    Ok(values)
}

/// Human name of a transfer syntax, with its UID.
pub fn transfer_syntax_name(uid: &str) -> String {
    use dicom_encoding::TransferSyntaxIndex;
    match dicom_transfer_syntax_registry::TransferSyntaxRegistry.get(uid) {
        Some(ts) => format!("{} ({uid})", ts.name()),
        None => format!("unknown {uid}"),
    }
}

fn decode<'a>(path: &Path, obj: &'a DefaultDicomObject) -> Result<DecodedPixelData<'a>> {
    check_frame_sizes(path, obj)?;
    obj.decode_pixel_data().map_err(|e| Error::PixelData {
        path: path.to_path_buf(),
        transfer_syntax: transfer_syntax_name(obj.meta().transfer_syntax()),
        reason: e.to_string(),
    })
}

/// Refuses compressed frames (JPEG, JPEG-LS, JPEG 2000) that declare more columns, rows or
/// components than the header: decoders allocate by the frame's own size (see
/// [`super::codestream`]).
fn check_frame_sizes(path: &Path, obj: &DefaultDicomObject) -> Result<()> {
    let ts = obj.meta().transfer_syntax().trim_end_matches('\0');
    // JPEG (…4.50–4.70), JPEG-LS (…4.80–81), JPEG 2000 (…4.90–93), HTJ2K (…4.201–203).
    let Some(code) = ts.strip_prefix("1.2.840.10008.1.2.4.") else {
        return Ok(());
    };
    if !matches!(code.parse::<u32>(), Ok(50..=93 | 201..=203)) {
        return Ok(());
    }
    let Some(fragments) = obj
        .element(tags::PIXEL_DATA)
        .ok()
        .and_then(|e| e.value().fragments())
    else {
        return Ok(());
    };
    let rows = int(obj, tags::ROWS).unwrap_or(0);
    let columns = int(obj, tags::COLUMNS).unwrap_or(0);
    let samples = int(obj, tags::SAMPLES_PER_PIXEL).unwrap_or(1).max(1);
    for fragment in fragments {
        let Some(d) = super::codestream::declared_size(fragment) else {
            continue;
        };
        if i64::from(d.columns) > columns
            || i64::from(d.rows) > rows
            || i64::from(d.components) > samples
        {
            return Err(Error::PixelData {
                path: path.to_path_buf(),
                transfer_syntax: transfer_syntax_name(ts),
                reason: format!(
                    "a compressed frame declares {} × {} pixels of {} component(s) but the header {columns} × {rows} of {samples}",
                    d.columns, d.rows, d.components
                ),
            });
        }
    }
    Ok(())
}

/// Assembles a stack of single-frame files into one volume; slices decode in parallel.
pub fn read_series(stack: &SeriesStack) -> Result<Volume> {
    let first = &stack.slices[0];
    let positions: Vec<_> = stack.slices.iter().map(|s| s.position).collect();
    let fallback = first.spacing_between_slices.or(first.slice_thickness);
    let mut sorted = order_slices(
        &first.path,
        first.orientation,
        &positions,
        first.pixel_spacing,
        fallback,
    )?;
    let (rows, cols) = (first.rows as usize, first.columns as usize);
    let channels = if first.samples_per_pixel > 1 {
        first.samples_per_pixel as usize
    } else {
        1
    };
    let plane = rows * cols;
    let decoded: Vec<(Vec<f32>, Vec<String>)> = sorted
        .order
        .par_iter()
        .map(|&n| {
            let s = &stack.slices[n];
            let (obj, notes) = open_noted(&s.path, false)?;
            without_panics(&s.path, &s.transfer_syntax, || {
                let pixels = decode(&s.path, &obj)?;
                if pixels.rows() as usize != rows || pixels.columns() as usize != cols {
                    return Err(dicom_err(
                        &s.path,
                        "pixel data size differs from the series",
                    ));
                }
                Ok((
                    frame_planes(&s.path, &pixels, 0, &s.transfer_syntax)?,
                    notes,
                ))
            })
        })
        .collect::<Result<_>>()?;
    let mut read_notes: BTreeMap<String, usize> = BTreeMap::new();
    for note in decoded.iter().flat_map(|(_, n)| n) {
        *read_notes.entry(note.clone()).or_default() += 1;
    }
    let planes: Vec<Vec<f32>> = decoded.into_iter().map(|(p, _)| p).collect();
    let nk = planes.len();
    for (k, p) in planes.iter().enumerate() {
        if p.len() < channels * plane {
            return Err(dicom_err(
                &stack.slices[sorted.order[k]].path,
                format!(
                    "decoded {} values, Rows × Columns × samples needs {}",
                    p.len(),
                    channels * plane
                ),
            ));
        }
    }
    let mut voxels = Array4::<f32>::zeros((channels, nk, rows, cols));
    for (k, p) in planes.iter().enumerate() {
        for c in 0..channels {
            let dst = voxels.slice_mut(ndarray::s![c, k, .., ..]);
            let src = ndarray::ArrayView2::from_shape((rows, cols), &p[c * plane..(c + 1) * plane])
                .map_err(|e| dicom_err(&stack.slices[sorted.order[k]].path, e.to_string()))?;
            src.assign_to(dst);
        }
    }
    let mut warnings = std::mem::take(&mut sorted.warnings);
    warnings.extend(
        read_notes
            .into_iter()
            .map(|(note, files)| format!("{files} file(s): {note}")),
    );
    let distinct_syntax = stack
        .slices
        .iter()
        .map(|s| s.transfer_syntax.as_str())
        .collect::<std::collections::BTreeSet<_>>();
    if distinct_syntax.len() > 1 {
        warnings.push(format!(
            "{} transfer syntaxes mixed in one series",
            distinct_syntax.len()
        ));
    }
    let info = VolumeInfo {
        path: stack.root.clone(),
        kind: SourceKind::Dicom,
        modality: Some(first.modality.clone()),
        series_uid: Some(stack.uid.clone()),
        series_description: Some(first.description.clone()),
        dtype: first.dtype(),
        slices: nk,
        warnings,
        identifiers: first.identifiers.clone(),
    };
    let geometry = Geometry::new([cols, rows, nk], matmul(&LPS_TO_RAS, &sorted.affine_lps));
    Volume::new(voxels, geometry, info)
}

/// Plane position and orientation of one frame (LPS).
pub type FrameGeometry = (Option<[f64; 3]>, Option<[f64; 6]>);

/// Per-frame plane position and orientation of an enhanced multi-frame object.
fn enhanced_frame_geometry(obj: &DefaultDicomObject) -> Vec<FrameGeometry> {
    let shared = items(obj, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE).first();
    let shared_orientation = from_group(shared, tags::PLANE_ORIENTATION_SEQUENCE, |o| {
        fixed::<6>(o, tags::IMAGE_ORIENTATION_PATIENT)
    });
    let shared_position = from_group(shared, tags::PLANE_POSITION_SEQUENCE, |o| {
        fixed::<3>(o, tags::IMAGE_POSITION_PATIENT)
    });
    items(obj, tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE)
        .iter()
        .map(|f| {
            let pos = from_group(Some(f), tags::PLANE_POSITION_SEQUENCE, |o| {
                fixed::<3>(o, tags::IMAGE_POSITION_PATIENT)
            })
            .or(shared_position);
            let ori = from_group(Some(f), tags::PLANE_ORIENTATION_SEQUENCE, |o| {
                fixed::<6>(o, tags::IMAGE_ORIENTATION_PATIENT)
            })
            .or(shared_orientation);
            (pos, ori)
        })
        .collect()
}

/// Frames of a multi-frame object that form one grid: one group per frame orientation (a
/// three-plane localizer gives three). Objects without per-frame geometry form one group.
pub fn frame_stacks(header: &SliceHeader) -> Vec<Vec<usize>> {
    let frames = header.frames as usize;
    if header.frame_geometry.len() != frames {
        return vec![(0..frames).collect()];
    }
    let mut groups: Vec<(Option<[f64; 6]>, Vec<usize>)> = Vec::new();
    for (f, (_, o)) in header.frame_geometry.iter().enumerate() {
        let same = |g: &Option<[f64; 6]>| match (g, o) {
            (Some(a), Some(b)) => a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-4),
            (None, None) => true,
            _ => false,
        };
        match groups.iter_mut().find(|(g, _)| same(g)) {
            Some((_, members)) => members.push(f),
            None => groups.push((*o, vec![f])),
        }
    }
    groups.into_iter().map(|(_, m)| m).collect()
}

/// Position key for grouping frames that lie on the same plane (µm resolution).
fn position_key(p: &Option<[f64; 3]>) -> Option<[i64; 3]> {
    p.map(|p| p.map(|v| (v * 1e3).round() as i64))
}

/// Unpacks one frame of 1-bit pixel data (segmentation objects), which dicom-pixeldata refuses.
/// Frames are packed back to back, least significant bit first (PS3.5 §8.1.1).
pub(crate) fn bit_plane(
    path: &Path,
    obj: &DefaultDicomObject,
    frame: usize,
    plane: usize,
) -> Result<Vec<f32>> {
    let bytes = obj
        .element(tags::PIXEL_DATA)
        .ok()
        .and_then(|e| e.to_bytes().ok())
        .ok_or_else(|| dicom_err(path, "1-bit pixel data is missing or encapsulated"))?;
    let start = frame * plane;
    if bytes.len() * 8 < start + plane {
        return Err(dicom_err(
            path,
            format!(
                "1-bit pixel data holds {} bits, frame {frame} needs {}",
                bytes.len() * 8,
                start + plane
            ),
        ));
    }
    Ok((start..start + plane)
        .map(|b| ((bytes[b / 8] >> (b % 8)) & 1) as f32)
        .collect())
}

/// Reads one DICOM file, or the given frames of a multi-frame file, as one volume: a single slice,
/// a classic multi-frame object (frames stacked along the normal in file order), or frames of an
/// enhanced object placed by their per-frame Plane Position. Frames repeated at one position
/// (echoes, time points) become channels.
pub fn read_file(path: &Path, frames: Option<&[usize]>) -> Result<Volume> {
    let (obj, notes) = open_noted(path, false)?;
    let mut volume = read_object(path, &obj, frames)?;
    volume.info.warnings.extend(notes);
    Ok(volume)
}

/// [`read_file`] for an object already parsed (e.g. by [`open_bytes`]).
pub fn read_object(
    path: &Path,
    obj: &DefaultDicomObject,
    frames: Option<&[usize]>,
) -> Result<Volume> {
    without_panics(path, obj.meta().transfer_syntax(), || {
        decode_object(path, obj, frames)
    })
}

/// Third-party decoders can panic on malformed data (fuzzing found an out-of-bounds index in the
/// RLE adapter of dicom-transfer-syntax-registry 0.10.1): turn that into an error naming the file
/// instead of taking a whole batch down.
fn without_panics<T>(
    path: &Path,
    transfer_syntax: &str,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let what = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Err(Error::PixelData {
            path: path.to_path_buf(),
            transfer_syntax: transfer_syntax_name(transfer_syntax),
            reason: format!("the decoder failed on malformed data ({what})"),
        })
    })
}

/// How the frames of one object form a grid: the frames at each plane position (file order of
/// first appearance; several per position become channels), their order along the normal, and
/// the shared orientation.
pub(crate) struct FrameLayout {
    /// Plane position (LPS) and the frames at it.
    pub planes: Vec<(Option<[f64; 3]>, Vec<usize>)>,
    /// `planes` indices along the normal, the LPS affine and what looked wrong.
    pub sorted: SliceOrder,
}

/// Places `frames` of the object described by `header` on one grid.
pub(crate) fn frame_layout(
    path: &Path,
    header: &SliceHeader,
    frames: &[usize],
) -> Result<FrameLayout> {
    let mut warnings = Vec::new();
    // Per-frame geometry: functional groups, else the object's own plane stepped along the normal.
    let enhanced = header.frame_geometry.len() == header.frames as usize;
    let geometry_of = |f: usize| -> FrameGeometry {
        if enhanced {
            let (p, o) = header.frame_geometry[f];
            (p, o.or(header.orientation))
        } else {
            let step = header
                .spacing_between_slices
                .or(header.slice_thickness)
                .unwrap_or(1.0);
            let p = match (header.position, header.normal()) {
                (Some(p0), Some(n)) => {
                    Some(std::array::from_fn(|r| p0[r] + n[r] * step * f as f64))
                }
                (p, _) => p,
            };
            (p, header.orientation)
        }
    };
    if !enhanced && frames.len() > 1 {
        warnings.push(format!(
            "{} frames without per-frame geometry: stacked in file order along the normal",
            frames.len()
        ));
    }
    let orientation = geometry_of(frames[0]).1;
    if let Some(f) = frames.iter().find(|&&f| {
        let o = geometry_of(f).1;
        match (o, orientation) {
            (Some(a), Some(b)) => a.iter().zip(b).any(|(x, y)| (x - y).abs() > 1e-4),
            (a, b) => a.is_some() != b.is_some(),
        }
    }) {
        return Err(Error::InconsistentSeries {
            path: path.to_path_buf(),
            reason: format!(
                "frame {f} has another orientation than frame {}; read the frame stacks separately",
                frames[0]
            ),
        });
    }
    // Group frames by plane position; each group is one slice, its members channels.
    let mut planes: Vec<(Option<[f64; 3]>, Vec<usize>)> = Vec::new();
    for &f in frames {
        let p = geometry_of(f).0;
        let key = position_key(&p);
        match planes
            .iter_mut()
            .find(|(q, _)| key.is_some() && position_key(q) == key)
        {
            Some((_, members)) => members.push(f),
            None => planes.push((p, vec![f])),
        }
    }
    let repeat = planes[0].1.len();
    if planes.iter().any(|(_, m)| m.len() != repeat) {
        return Err(Error::InconsistentSeries {
            path: path.to_path_buf(),
            reason: "frames are not repeated the same number of times at every position".into(),
        });
    }
    if repeat > 1 {
        warnings.push(format!(
            "{repeat} frames at each of {} positions: read as {repeat} channels",
            planes.len()
        ));
    }
    let positions: Vec<_> = planes.iter().map(|(p, _)| *p).collect();
    let fallback = header.spacing_between_slices.or(header.slice_thickness);
    let mut sorted = order_slices(
        path,
        orientation,
        &positions,
        header.pixel_spacing,
        fallback,
    )?;
    warnings.append(&mut sorted.warnings);
    sorted.warnings = warnings;
    Ok(FrameLayout { planes, sorted })
}

fn decode_object(
    path: &Path,
    obj: &DefaultDicomObject,
    frames: Option<&[usize]>,
) -> Result<Volume> {
    let header = SliceHeader::from_object(path, obj)?;
    let all: Vec<usize> = (0..header.frames as usize).collect();
    let frames = frames.unwrap_or(&all);
    if let Some(&bad) = frames.iter().find(|&&f| f >= header.frames as usize) {
        return Err(dicom_err(
            path,
            format!("frame {bad} requested but the object has {}", header.frames),
        ));
    }
    let (rows, cols) = (header.rows as usize, header.columns as usize);
    let plane = rows * cols;
    let samples = header.samples_per_pixel.max(1) as usize;
    let FrameLayout {
        planes: planes_at,
        sorted,
    } = frame_layout(path, &header, frames)?;
    let repeat = planes_at[0].1.len();
    let warnings = sorted.warnings.clone();

    // Decode: 1-bit data (SEG) by hand, everything else through dicom-pixeldata.
    let decoded = if header.bits_allocated == 1 {
        None
    } else {
        Some(decode(path, obj)?)
    };
    let ts = header.transfer_syntax.clone();
    let plane_of = |f: usize| -> Result<Vec<f32>> {
        match &decoded {
            Some(px) => frame_planes(path, px, f as u32, &ts),
            None => bit_plane(path, obj, f, plane),
        }
    };
    let decoded_frames: Vec<(usize, Vec<f32>)> = frames
        .par_iter()
        .map(|&f| plane_of(f).map(|p| (f, p)))
        .collect::<Result<_>>()?;
    let by_frame: std::collections::HashMap<usize, &Vec<f32>> =
        decoded_frames.iter().map(|(f, p)| (*f, p)).collect();
    let channels = samples * repeat;
    let nk = sorted.order.len();
    let mut voxels = Array4::<f32>::zeros((channels, nk, rows, cols));
    for (k, &g) in sorted.order.iter().enumerate() {
        for (rep, f) in planes_at[g].1.iter().enumerate() {
            let data = by_frame[f];
            if data.len() < samples * plane {
                return Err(dicom_err(
                    path,
                    format!(
                        "frame {f} decoded to {} values, Rows × Columns × samples needs {}",
                        data.len(),
                        samples * plane
                    ),
                ));
            }
            for c in 0..samples {
                let src = ndarray::ArrayView2::from_shape(
                    (rows, cols),
                    &data[c * plane..(c + 1) * plane],
                )
                .map_err(|e| dicom_err(path, e.to_string()))?;
                src.assign_to(voxels.slice_mut(ndarray::s![rep * samples + c, k, .., ..]));
            }
        }
    }
    let info = VolumeInfo {
        path: path.to_path_buf(),
        kind: SourceKind::Dicom,
        modality: Some(header.modality.clone()),
        series_uid: Some(header.series_uid.clone()),
        series_description: Some(header.description.clone()),
        dtype: if header.bits_allocated == 1 {
            DataType::Uint8
        } else {
            header.dtype()
        },
        slices: frames.len(),
        warnings,
        identifiers: header.identifiers.clone(),
    };
    let geometry = Geometry::new([cols, rows, nk], matmul(&LPS_TO_RAS, &sorted.affine_lps));
    Volume::new(voxels, geometry, info)
}
