//! `Volume`: voxels plus the geometry that places them, plus what the source said about them.

use std::path::PathBuf;

use ndarray::Array4;
use rayon::prelude::*;
use serde::Serialize;

use crate::geometry::Geometry;

/// Where a volume came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// A NIfTI-1 or NIfTI-2 file.
    Nifti,
    /// A DICOM file or series.
    Dicom,
}

impl SourceKind {
    /// Lower-case name (`nifti`, `dicom`), as serialised.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Nifti => "nifti",
            SourceKind::Dicom => "dicom",
        }
    }
}

/// Storage type of the voxels in the source file (before scaling).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DataType {
    /// Unsigned 8-bit integer.
    Uint8,
    /// Signed 8-bit integer.
    Int8,
    /// Unsigned 16-bit integer.
    Uint16,
    /// Signed 16-bit integer (the usual CT storage type).
    Int16,
    /// Unsigned 32-bit integer.
    Uint32,
    /// Signed 32-bit integer.
    Int32,
    /// Unsigned 64-bit integer.
    Uint64,
    /// Signed 64-bit integer.
    Int64,
    /// 32-bit IEEE float.
    Float32,
    /// 64-bit IEEE float.
    Float64,
    /// Three interleaved 8-bit samples per voxel; read as three channels.
    Rgb24,
}

impl DataType {
    /// Lower-case name (`uint8`, `int16`, `float32`, …), as serialised and as `convert --dtype` takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Uint8 => "uint8",
            DataType::Int8 => "int8",
            DataType::Uint16 => "uint16",
            DataType::Int16 => "int16",
            DataType::Uint32 => "uint32",
            DataType::Int32 => "int32",
            DataType::Uint64 => "uint64",
            DataType::Int64 => "int64",
            DataType::Float32 => "float32",
            DataType::Float64 => "float64",
            DataType::Rgb24 => "rgb24",
        }
    }

    /// Parses the names `as_str` gives (used by `convert --dtype`).
    pub fn parse(name: &str) -> Option<Self> {
        [
            DataType::Uint8,
            DataType::Int8,
            DataType::Uint16,
            DataType::Int16,
            DataType::Uint32,
            DataType::Int32,
            DataType::Uint64,
            DataType::Int64,
            DataType::Float32,
            DataType::Float64,
            DataType::Rgb24,
        ]
        .into_iter()
        .find(|d| d.as_str() == name)
    }

    /// The range of values the type can hold.
    pub fn range(self) -> (f64, f64) {
        match self {
            DataType::Uint8 | DataType::Rgb24 => (0.0, u8::MAX as f64),
            DataType::Int8 => (i8::MIN as f64, i8::MAX as f64),
            DataType::Uint16 => (0.0, u16::MAX as f64),
            DataType::Int16 => (i16::MIN as f64, i16::MAX as f64),
            DataType::Uint32 => (0.0, u32::MAX as f64),
            DataType::Int32 => (i32::MIN as f64, i32::MAX as f64),
            DataType::Uint64 => (0.0, u64::MAX as f64),
            DataType::Int64 => (i64::MIN as f64, i64::MAX as f64),
            DataType::Float32 => (f32::MIN as f64, f32::MAX as f64),
            DataType::Float64 => (f64::MIN, f64::MAX),
        }
    }
}

/// Patient identifiers. Kept apart so that nothing prints them unless a user asks (`--show-phi`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PatientIdentifiers {
    /// DICOM PatientName (0010,0010).
    pub patient_name: Option<String>,
    /// DICOM PatientID (0010,0020).
    pub patient_id: Option<String>,
    /// DICOM PatientBirthDate (0010,0030), as stored (`YYYYMMDD`).
    pub birth_date: Option<String>,
    /// DICOM AccessionNumber (0008,0050).
    pub accession_number: Option<String>,
}

/// What the source said about a volume, beside its voxels and grid.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VolumeInfo {
    /// The file, or for a DICOM series the directory it was found in.
    pub path: PathBuf,
    /// NIfTI or DICOM.
    pub kind: SourceKind,
    /// DICOM Modality (`CT`, `MR`, …); `None` for NIfTI, which does not record it.
    pub modality: Option<String>,
    /// SeriesInstanceUID (DICOM only).
    pub series_uid: Option<String>,
    /// SeriesDescription (DICOM only).
    pub series_description: Option<String>,
    /// Storage type in the source, before rescale.
    pub dtype: DataType,
    /// Slices (DICOM files or frames) or, for NIfTI, the size of the third axis.
    pub slices: usize,
    /// Things a user should know: missing slices, uneven spacing, qform/sform disagreement …
    pub warnings: Vec<String>,
    /// Patient identifiers (DICOM only); never serialised.
    #[serde(skip)]
    pub identifiers: PatientIdentifiers,
}

/// Voxels with their geometry.
///
/// `voxels` is indexed `[channel, k, j, i]` in standard (C) order, so `i` varies fastest, as in a
/// NIfTI file and in a DICOM frame (columns within a row). Values are after rescale
/// (NIfTI `scl_slope`/`scl_inter`, DICOM Rescale Slope/Intercept), in `f32`.
#[derive(Debug, Clone)]
pub struct Volume {
    /// Voxel values `[c, k, j, i]` (array order), after rescale.
    pub voxels: Array4<f32>,
    /// Grid size and voxel → RAS+ mm affine; `dims` is `[ni, nj, nk]` (voxel order).
    pub geometry: Geometry,
    /// What the source said about the volume.
    pub info: VolumeInfo,
}

impl Volume {
    /// Builds a volume, checking that the voxel array matches the grid.
    pub fn new(voxels: Array4<f32>, geometry: Geometry, info: VolumeInfo) -> crate::Result<Self> {
        let s = voxels.shape();
        let [ni, nj, nk] = geometry.dims;
        if s[1] != nk || s[2] != nj || s[3] != ni {
            return Err(crate::Error::Unsupported {
                path: info.path.clone(),
                reason: format!(
                    "voxel array [c, k, j, i] = {:?} does not match grid (i, j, k) = {:?}",
                    s, geometry.dims
                ),
            });
        }
        if let Some(problem) = geometry.problem() {
            return Err(crate::Error::Unsupported {
                path: info.path.clone(),
                reason: format!("unusable geometry: {problem}"),
            });
        }
        Ok(Volume {
            voxels,
            geometry,
            info,
        })
    }

    /// Voxels that are NaN or infinite, counted `(nan, infinite)`.
    pub fn non_finite(&self) -> (usize, usize) {
        let count = |v: &f32| (v.is_nan() as usize, v.is_infinite() as usize);
        let add = |a: (usize, usize), b: (usize, usize)| (a.0 + b.0, a.1 + b.1);
        // Every scan is checked before segmentation: in parallel, like `value_range`.
        match self.voxels.as_slice_memory_order() {
            Some(data) => data.par_iter().map(count).reduce(|| (0, 0), add),
            None => self.voxels.iter().map(count).fold((0, 0), add),
        }
    }

    /// Number of channels (the first axis of `voxels`; 3 for RGB, else usually 1).
    pub fn channels(&self) -> usize {
        self.voxels.shape()[0]
    }

    /// Shape as reported to users: spatial `(i, j, k)` first, then channels when more than one.
    pub fn shape(&self) -> Vec<usize> {
        let mut s = self.geometry.dims.to_vec();
        if self.channels() > 1 {
            s.push(self.channels());
        }
        s
    }

    /// Smallest and largest finite value (`None` for an empty or all-NaN volume).
    pub fn value_range(&self) -> Option<(f32, f32)> {
        let data = self.voxels.as_slice_memory_order()?;
        data.par_chunks(1 << 16)
            .map(|chunk| {
                chunk
                    .iter()
                    .filter(|v| v.is_finite())
                    .fold(None, |acc: Option<(f32, f32)>, &v| match acc {
                        None => Some((v, v)),
                        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
                    })
            })
            .reduce(
                || None,
                |a, b| match (a, b) {
                    (None, x) | (x, None) => x,
                    (Some(a), Some(b)) => Some((a.0.min(b.0), a.1.max(b.1))),
                },
            )
    }
}
