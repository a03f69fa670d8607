//! Reading scans (NIfTI files, DICOM files, DICOM series directories) and writing NIfTI.
//!
//! [`discover`] finds what a path holds without decoding pixels; [`ScanSource::load`] decodes one
//! volume; [`read_volume`] does both for a path that must hold exactly one volume.

pub mod codestream;
pub mod derived;
pub mod dicom;
pub mod gzip;
pub mod layout;
pub mod manifest;
pub mod nifti;
pub mod plot;
pub mod rtstruct;
pub mod seg;
pub mod tolerant;

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::error::{Error, Result, SeriesChoice};
use crate::volume::Volume;

pub use nifti::{read_nifti, write_nifti};

/// One volume that a path holds, not yet decoded.
#[derive(Debug, Clone)]
pub enum ScanSource {
    /// A NIfTI-1 or NIfTI-2 file (`.nii` or `.nii.gz`).
    Nifti(PathBuf),
    /// A DICOM file read on its own (a multi-frame object, or a slice given by name); `frames`
    /// selects one stack of a multi-frame object, `label` names it (SeriesInstanceUID, `#N` when
    /// one object holds several stacks).
    DicomFile {
        /// The DICOM file.
        path: PathBuf,
        /// Frame indices of the stack; `None`: every frame (or the single slice).
        frames: Option<Vec<usize>>,
        /// Name shown when choosing among stacks.
        label: String,
    },
    /// Single-frame DICOM images grouped into one stack.
    DicomSeries(dicom::SeriesStack),
}

impl ScanSource {
    /// Decodes the volume.
    pub fn load(&self) -> Result<Volume> {
        match self {
            ScanSource::Nifti(p) => read_nifti(p),
            ScanSource::DicomFile { path, frames, .. } => dicom::read_file(path, frames.as_deref()),
            ScanSource::DicomSeries(s) => dicom::read_series(s),
        }
    }

    /// How the source is listed when a choice is needed.
    pub fn choice(&self) -> SeriesChoice {
        match self {
            ScanSource::DicomSeries(s) => s.choice(),
            ScanSource::Nifti(p) => SeriesChoice {
                uid: p.display().to_string(),
                description: String::new(),
                modality: "NIfTI".into(),
                slices: 0,
            },
            ScanSource::DicomFile {
                path,
                frames,
                label,
            } => SeriesChoice {
                uid: label.clone(),
                description: path.display().to_string(),
                modality: "DICOM".into(),
                slices: frames.as_ref().map_or(1, Vec::len),
            },
        }
    }

    /// What reading the scan holds at its peak, from its headers alone (nothing decoded): the
    /// stored values and the float32 volume made from them. `None` when a header cannot be read
    /// (reading then reports why).
    pub fn read_bytes(&self) -> Option<u64> {
        let (voxels, stored) = match self {
            ScanSource::Nifti(p) => return nifti_read_bytes(p).map(|(_, read)| read),
            ScanSource::DicomFile { path, frames, .. } => {
                let h = dicom::SliceHeader::read(path).ok()?;
                let n = frames
                    .as_ref()
                    .map_or(u64::from(h.frames.max(1)), |f| f.len() as u64);
                slice_extent(&h, n)?
            }
            ScanSource::DicomSeries(s) => slice_extent(s.slices.first()?, s.slices.len() as u64)?,
        };
        voxels.checked_mul(stored + 4)
    }

    /// The file, or the directory a series was found in.
    pub fn path(&self) -> &Path {
        match self {
            ScanSource::Nifti(p) | ScanSource::DicomFile { path: p, .. } => p,
            ScanSource::DicomSeries(s) => &s.root,
        }
    }
}

/// Voxels (every channel) of a NIfTI file and what reading it holds at its peak (see
/// [`ScanSource::read_bytes`]), from its header.
pub(crate) fn nifti_read_bytes(path: &Path) -> Option<(u64, u64)> {
    let h = nifti::read_header(path).ok()?;
    let (_, stored) = h.data_type(path).ok()?;
    let voxels = h.voxel_count()? as u64;
    // A compressed file is held whole beside what it inflates to.
    let compressed = match path.extension().is_some_and(|e| e == "gz") {
        true => std::fs::metadata(path).ok()?.len(),
        false => 0,
    };
    let read = voxels
        .checked_mul(stored as u64 + 4)?
        .checked_add(compressed)?;
    Some((voxels, read))
}

/// Voxels and stored bytes per voxel of `planes` DICOM planes shaped like `h`; `None` when a
/// malformed header's product overflows.
fn slice_extent(h: &dicom::SliceHeader, planes: u64) -> Option<(u64, u64)> {
    let samples = u64::from(h.samples_per_pixel.max(1));
    let voxels = u64::from(h.rows)
        .checked_mul(u64::from(h.columns))?
        .checked_mul(planes)?
        .checked_mul(samples)?;
    Some((voxels, u64::from(h.bits_allocated.div_ceil(8).max(1))))
}

/// What a path holds: volumes, and files that were passed over with the reason.
#[derive(Debug, Default)]
pub struct Discovery {
    /// Volumes found, not yet decoded.
    pub sources: Vec<ScanSource>,
    /// Files passed over, each with the reason: not DICOM, or DICOM objects that are not scans.
    pub skipped: Vec<(PathBuf, String)>,
    /// DICOM files (with the preamble and "DICM") whose header cannot be read: corrupt scans,
    /// which a batch reports as failed cases.
    pub unreadable: Vec<(PathBuf, String)>,
}

/// Finds the volumes under `path`: a NIfTI file, a DICOM file, or a directory searched recursively
/// for NIfTI files and DICOM images (single-frame images grouped into series).
pub fn discover(path: &Path) -> Result<Discovery> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_file() {
        let sources = if nifti::is_nifti_path(path) {
            vec![ScanSource::Nifti(path.to_path_buf())]
        } else {
            // Reads the header now so that a non-DICOM file fails here with a clear reason.
            file_sources(dicom::SliceHeader::read(path)?)
        };
        return Ok(Discovery {
            sources,
            skipped: Vec::new(),
            unreadable: Vec::new(),
        });
    }
    let mut files = Vec::new();
    for entry in walkdir::WalkDir::new(path)
        .follow_links(true)
        .sort_by_file_name()
    {
        let entry = entry.map_err(|e| {
            let p = e
                .path()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| path.to_path_buf());
            Error::io(
                p,
                e.into_io_error()
                    .unwrap_or_else(|| std::io::Error::other("directory loop")),
            )
        })?;
        if entry.file_type().is_file() {
            files.push(entry.into_path());
        }
    }
    let mut discovery = Discovery::default();
    let (nifti_files, others): (Vec<_>, Vec<_>) =
        files.into_iter().partition(|p| nifti::is_nifti_path(p));
    discovery
        .sources
        .extend(nifti_files.into_iter().map(ScanSource::Nifti));
    // Header reads are independent: do them in parallel (large PACS exports have 10^4+ files).
    let headers: Vec<(PathBuf, Result<dicom::SliceHeader>)> = others
        .into_par_iter()
        .map(|p| {
            let r = if dicom::has_dicom_magic(&p) {
                dicom::SliceHeader::read(&p)
            } else {
                Err(Error::InvalidDicom {
                    path: p.clone(),
                    reason: "no DICOM preamble".into(),
                })
            };
            (p, r)
        })
        .collect();
    let mut single = Vec::new();
    for (p, h) in headers {
        match h {
            // medseg's own outputs (or a PACS export's) beside the scans are not scans.
            Ok(h) if h.sop_class_uid.as_deref() == Some(seg::SEG_SOP_CLASS) => {
                discovery.skipped.push((
                    p,
                    "a DICOM Segmentation, not a scan (medseg convert reads it as a label map)"
                        .into(),
                ));
            }
            Ok(h) if h.frames > 1 || h.enhanced => discovery.sources.extend(file_sources(h)),
            Ok(h) => single.push(h),
            Err(e) => {
                let corrupt = matches!(e, Error::InvalidDicom { .. }) && dicom::has_dicom_magic(&p);
                let reason = match &e {
                    Error::InvalidDicom { reason, .. } | Error::Unsupported { reason, .. } => {
                        reason.clone()
                    }
                    other => other.to_string(),
                };
                if corrupt {
                    discovery.unreadable.push((p, reason));
                } else {
                    discovery.skipped.push((p, reason));
                }
            }
        }
    }
    discovery.sources.extend(
        dicom::group_series(path, single)
            .into_iter()
            .map(ScanSource::DicomSeries),
    );
    if discovery.sources.is_empty() {
        let passed: Vec<&(PathBuf, String)> = discovery
            .unreadable
            .iter()
            .chain(&discovery.skipped)
            .collect();
        let detail = match passed.first() {
            None => " (the directory is empty)".to_string(),
            Some((p, r)) => format!(
                " ({} files passed over, e.g. {}: {r})",
                passed.len(),
                p.strip_prefix(path).unwrap_or(p).display()
            ),
        };
        return Err(Error::NothingFound {
            path: path.to_path_buf(),
            detail,
        });
    }
    Ok(discovery)
}

/// The volumes of one DICOM file: one, or one per frame orientation of a multi-frame object.
fn file_sources(header: dicom::SliceHeader) -> Vec<ScanSource> {
    let stacks = dicom::frame_stacks(&header);
    let split = stacks.len() > 1;
    stacks
        .into_iter()
        .enumerate()
        .map(|(n, frames)| ScanSource::DicomFile {
            path: header.path.clone(),
            label: if split {
                format!("{}#{}", header.series_uid, n + 1)
            } else {
                header.series_uid.clone()
            },
            frames: split.then_some(frames),
        })
        .collect()
}

/// Reads the one volume `path` holds; with several, `series` picks one by SeriesInstanceUID
/// (or by file path for NIfTI files and multi-frame DICOM files in a directory).
pub fn read_volume(path: &Path, series: Option<&str>) -> Result<Volume> {
    select(path, discover(path)?.sources, series)?.load()
}

/// Reads one volume per path and stacks their channels in order; every file must lie on the first
/// one's grid (affines within `tolerance_mm`). The result keeps the first file's info.
pub fn read_channels(paths: &[PathBuf], tolerance_mm: f64) -> Result<Volume> {
    let mut first: Option<Volume> = None;
    let mut rest = Vec::new();
    for path in paths {
        let v = read_volume(path, None)?;
        if let Some(f) = &first {
            if f.geometry
                .max_affine_difference(&v.geometry)
                .is_none_or(|d| d > tolerance_mm)
            {
                return Err(Error::Unsupported {
                    path: path.clone(),
                    reason: format!(
                        "grid {:?} {:?} differs from the first channel's {:?} {:?} ({})",
                        v.geometry.dims,
                        v.geometry.affine,
                        f.geometry.dims,
                        f.geometry.affine,
                        f.info.path.display()
                    ),
                });
            }
            rest.push(v.voxels);
        } else {
            first = Some(v);
        }
    }
    let mut first = first.ok_or_else(|| Error::NothingFound {
        path: PathBuf::new(),
        detail: ": no image file given".into(),
    })?;
    if !rest.is_empty() {
        let mut views = vec![first.voxels.view()];
        views.extend(rest.iter().map(|r| r.view()));
        let stacked =
            ndarray::concatenate(ndarray::Axis(0), &views).map_err(|e| Error::Unsupported {
                path: first.info.path.clone(),
                reason: e.to_string(),
            })?;
        first.voxels = stacked;
    }
    Ok(first)
}

/// Picks one source among those found under `path`.
pub fn select(
    path: &Path,
    mut sources: Vec<ScanSource>,
    series: Option<&str>,
) -> Result<ScanSource> {
    match series {
        Some(uid) => {
            let pos = sources.iter().position(|s| {
                let c = s.choice();
                c.uid == uid || s.path().ends_with(uid)
            });
            match pos {
                Some(i) => Ok(sources.swap_remove(i)),
                None => Err(Error::SeriesNotFound {
                    path: path.to_path_buf(),
                    uid: uid.to_string(),
                    available: sources.iter().map(ScanSource::choice).collect(),
                }),
            }
        }
        None if sources.len() == 1 => Ok(sources.remove(0)),
        None => Err(Error::AmbiguousSeries {
            path: path.to_path_buf(),
            series: sources.iter().map(ScanSource::choice).collect(),
        }),
    }
}

/// Writes `bytes` to a temporary file beside `path`, then renames it over `path`.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    write_parts_atomically(path, [bytes])
}

/// Writes `parts` one after another to a temporary file beside `path`, then renames it over
/// `path` (a large file from its pieces, without joining them in memory first).
pub fn write_parts_atomically<'a>(
    path: &Path,
    parts: impl IntoIterator<Item = &'a [u8]>,
) -> Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".medseg-")
        .tempfile_in(&dir)
        .map_err(|e| Error::io(&dir, e))?;
    for part in parts {
        tmp.write_all(part).map_err(|e| Error::io(path, e))?;
    }
    tmp.as_file().sync_data().map_err(|e| Error::io(path, e))?;
    // Temp files are created owner-only; outputs get the usual rw-r--r-- so others on a shared
    // server (or a PACS import job) can read them.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(|e| Error::io(path, e))?;
    }
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// Serialises `value` as pretty JSON and writes it atomically to `path`.
pub fn write_json_atomically<T: serde::Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| Error::Write {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    write_atomically(path, &bytes)
}

/// Reads a JSON file written by [`write_json_atomically`] (or by another tool in the same shape).
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Unsupported {
        path: path.to_path_buf(),
        reason: format!("not the expected JSON: {e}"),
    })
}

/// The environment variable that names an [`abort_point`] to die at.
pub const ABORT_AT_ENV: &str = "MEDSEG_ABORT_AT";

/// A crash-safety test hook. When `MEDSEG_ABORT_AT` is `NAME` or `NAME:N`, the process aborts (as
/// a kill would: no unwinding, no cleanup) the first, or `N`th, time it passes point `NAME`. Tests
/// use it to stop a run at a named point instead of sleeping and racing a kill.
pub fn abort_point(name: &str) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static PASSED: AtomicUsize = AtomicUsize::new(0);
    let Ok(wanted) = std::env::var(ABORT_AT_ENV) else {
        return;
    };
    let (point, nth) = match wanted.split_once(':') {
        Some((p, n)) => (p, n.trim().parse::<usize>().unwrap_or(1)),
        None => (wanted.as_str(), 1),
    };
    if point == name && PASSED.fetch_add(1, Ordering::SeqCst) + 1 == nth {
        eprintln!("{ABORT_AT_ENV}: aborting at {name}");
        std::process::abort();
    }
}
