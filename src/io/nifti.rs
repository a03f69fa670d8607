//! NIfTI-1 and NIfTI-2 reading (`.nii`, `.nii.gz`) and NIfTI-1 writing, with nibabel's affine rules.
//!
//! NIfTI-1 headers are parsed by the `nifti` crate; NIfTI-2 (540-byte header, which `nifti` 0.18
//! rejects) by `parse_nifti2` below. Voxels are decoded here in parallel straight into
//! `[channel, k, j, i]` order, which is the file's own order (x fastest), so no transpose is needed.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use flate2::read::MultiGzDecoder;

use super::gzip;
use ndarray::Array4;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::geometry::{Affine, Geometry, IDENTITY};
use crate::volume::{DataType, PatientIdentifiers, SourceKind, Volume, VolumeInfo};

/// NIfTI xform codes (`NIFTI_XFORM_*`).
const XFORM_SCANNER_ANAT: i16 = 1;

/// The header fields medseg uses, common to NIfTI-1 and NIfTI-2.
#[derive(Debug, Clone, PartialEq)]
pub struct NiftiHeader {
    /// 1 or 2.
    pub version: u8,
    /// `dim[1..=dim[0]]`.
    pub dims: Vec<usize>,
    /// `NIFTI_TYPE_*` code.
    pub datatype: i16,
    /// `pixdim[0]` is qfac (its sign flips `k` in the qform); `pixdim[1..=3]` the voxel sizes.
    pub pixdim: [f64; 8],
    /// Byte offset of the voxel data in the (decompressed) file.
    pub vox_offset: u64,
    /// Multiplier applied to stored values; 0 or non-finite means no scaling.
    pub scl_slope: f64,
    /// Offset added after `scl_slope`.
    pub scl_inter: f64,
    /// `NIFTI_XFORM_*` code of the qform; 0: no qform.
    pub qform_code: i32,
    /// `NIFTI_XFORM_*` code of the sform; 0: no sform.
    pub sform_code: i32,
    /// `quatern_b, quatern_c, quatern_d`.
    pub quatern: [f64; 3],
    /// `qoffset_x, qoffset_y, qoffset_z`.
    pub qoffset: [f64; 3],
    /// `srow_x, srow_y, srow_z`: the first three rows of the sform affine.
    pub srow: [[f64; 4]; 3],
    /// The file is big-endian.
    pub big_endian: bool,
}

fn invalid(path: &Path, reason: impl Into<String>) -> Error {
    Error::InvalidNifti {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// True when the name ends in `.nii` or `.nii.gz` (case-insensitive).
pub fn is_nifti_path(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    name.ends_with(".nii") || name.ends_with(".nii.gz")
}

/// Reads the whole file, inflating it when it starts with the gzip magic (whatever its name says).
fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if is_gzip(&bytes) {
        inflate(path, &bytes)
    } else {
        Ok(bytes)
    }
}

/// Whether `bytes` start with the gzip magic.
pub(crate) fn is_gzip(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0x1f, 0x8b])
}

/// Inflates a gzipped NIfTI file's `bytes`; `path` names it in the error.
pub(crate) fn inflate(path: &Path, bytes: &[u8]) -> Result<Vec<u8>> {
    gzip::decompress(bytes)
        .map_err(|e| invalid(path, format!("gzip stream is truncated or corrupt ({e})")))
}

/// Parses a NIfTI-1 or NIfTI-2 header from the start of `bytes`.
pub fn parse_header(path: &Path, bytes: &[u8]) -> Result<NiftiHeader> {
    if bytes.len() < 4 {
        return Err(invalid(
            path,
            format!("only {} bytes, too short for a header", bytes.len()),
        ));
    }
    let raw = [bytes[0], bytes[1], bytes[2], bytes[3]];
    let (le, be) = (i32::from_le_bytes(raw), i32::from_be_bytes(raw));
    match (le, be) {
        (348, _) | (_, 348) => parse_nifti1(path, bytes),
        (540, _) => parse_nifti2(path, bytes, false),
        (_, 540) => parse_nifti2(path, bytes, true),
        _ => Err(invalid(
            path,
            format!("sizeof_hdr is {le} (expected 348 for NIfTI-1 or 540 for NIfTI-2)"),
        )),
    }
}

fn parse_nifti1(path: &Path, bytes: &[u8]) -> Result<NiftiHeader> {
    if bytes.len() < 348 {
        return Err(invalid(
            path,
            format!("header truncated at {} of 348 bytes", bytes.len()),
        ));
    }
    let h =
        nifti::NiftiHeader::from_reader(&bytes[..348]).map_err(|e| invalid(path, e.to_string()))?;
    let ndim = h.dim[0] as usize;
    if !(1..=7).contains(&ndim) {
        return Err(invalid(path, format!("dim[0] = {ndim} (must be 1 to 7)")));
    }
    let f = |v: f32| v as f64;
    Ok(NiftiHeader {
        version: 1,
        dims: h.dim[1..=ndim].iter().map(|&d| d as usize).collect(),
        datatype: h.datatype,
        pixdim: h.pixdim.map(f),
        vox_offset: if h.vox_offset.is_finite() && h.vox_offset >= 0.0 {
            h.vox_offset as u64
        } else {
            return Err(invalid(path, format!("vox_offset = {}", h.vox_offset)));
        },
        scl_slope: f(h.scl_slope),
        scl_inter: f(h.scl_inter),
        qform_code: h.qform_code as i32,
        sform_code: h.sform_code as i32,
        quatern: [f(h.quatern_b), f(h.quatern_c), f(h.quatern_d)],
        qoffset: [f(h.quatern_x), f(h.quatern_y), f(h.quatern_z)],
        srow: [h.srow_x.map(f), h.srow_y.map(f), h.srow_z.map(f)],
        big_endian: h.endianness == nifti::Endianness::Big,
    })
}

/// NIfTI-2: same fields as NIfTI-1 but 64-bit, at the offsets of the NIfTI-2 standard (nifti2.h).
fn parse_nifti2(path: &Path, bytes: &[u8], big_endian: bool) -> Result<NiftiHeader> {
    if bytes.len() < 540 {
        return Err(invalid(
            path,
            format!("NIfTI-2 header truncated at {} of 540 bytes", bytes.len()),
        ));
    }
    if &bytes[4..8] != b"n+2\0" && &bytes[4..8] != b"ni2\0" {
        return Err(invalid(
            path,
            "sizeof_hdr is 540 but the NIfTI-2 magic is missing",
        ));
    }
    let b8 = |o: usize| -> [u8; 8] { bytes[o..o + 8].try_into().unwrap_or([0; 8]) };
    let b4 = |o: usize| -> [u8; 4] { bytes[o..o + 4].try_into().unwrap_or([0; 4]) };
    let i64_at = |o: usize| {
        if big_endian {
            i64::from_be_bytes(b8(o))
        } else {
            i64::from_le_bytes(b8(o))
        }
    };
    let f64_at = |o: usize| {
        if big_endian {
            f64::from_be_bytes(b8(o))
        } else {
            f64::from_le_bytes(b8(o))
        }
    };
    let i32_at = |o: usize| {
        if big_endian {
            i32::from_be_bytes(b4(o))
        } else {
            i32::from_le_bytes(b4(o))
        }
    };
    let i16_at = |o: usize| {
        let b = [bytes[o], bytes[o + 1]];
        if big_endian {
            i16::from_be_bytes(b)
        } else {
            i16::from_le_bytes(b)
        }
    };
    let dim: Vec<i64> = (0..8).map(|n| i64_at(16 + 8 * n)).collect();
    let ndim = dim[0];
    if !(1..=7).contains(&ndim) {
        return Err(invalid(path, format!("dim[0] = {ndim} (must be 1 to 7)")));
    }
    let mut dims = Vec::with_capacity(ndim as usize);
    for &d in &dim[1..=ndim as usize] {
        if d < 0 {
            return Err(invalid(
                path,
                format!("negative dimension {d} in dim = {dim:?}"),
            ));
        }
        dims.push(d as usize);
    }
    let vox_offset = i64_at(168);
    if vox_offset < 0 {
        return Err(invalid(path, format!("vox_offset = {vox_offset}")));
    }
    let row = |o: usize| [f64_at(o), f64_at(o + 8), f64_at(o + 16), f64_at(o + 24)];
    Ok(NiftiHeader {
        version: 2,
        dims,
        datatype: i16_at(12),
        pixdim: std::array::from_fn(|n| f64_at(104 + 8 * n)),
        vox_offset: vox_offset as u64,
        scl_slope: f64_at(176),
        scl_inter: f64_at(184),
        qform_code: i32_at(344),
        sform_code: i32_at(348),
        quatern: [f64_at(352), f64_at(360), f64_at(368)],
        qoffset: [f64_at(376), f64_at(384), f64_at(392)],
        srow: [row(400), row(432), row(464)],
        big_endian,
    })
}

impl NiftiHeader {
    /// Spatial grid size `(i, j, k)`; missing axes count as 1.
    pub fn spatial_dims(&self) -> [usize; 3] {
        std::array::from_fn(|a| self.dims.get(a).copied().unwrap_or(1))
    }

    /// Product of the axes beyond the third (4D time points, 5D vector components …).
    pub fn channel_count(&self) -> usize {
        // Saturating: an absurd header must reach the size check, not overflow on the way.
        let count = self
            .dims
            .iter()
            .skip(3)
            .fold(1usize, |n, &d| n.saturating_mul(d));
        count.max(1)
    }

    /// Voxels of every channel, `None` when the product overflows.
    pub fn voxel_count(&self) -> Option<usize> {
        self.spatial_dims()
            .iter()
            .try_fold(self.channel_count(), |n, &d| n.checked_mul(d))
    }

    /// Voxel sizes `pixdim[1..=3]` as nibabel uses them (absolute value; missing axes 1).
    fn zooms(&self) -> [f64; 3] {
        std::array::from_fn(|a| {
            if a < self.dims.len() {
                let z = self.pixdim[a + 1].abs();
                if z > 0.0 && z.is_finite() {
                    z
                } else {
                    1.0
                }
            } else {
                1.0
            }
        })
    }

    /// The qform affine: rotation from the quaternion, scaled by pixdim, `qfac` flipping k.
    pub fn qform_affine(&self) -> Affine {
        let [b, c, d] = self.quatern;
        // nibabel's fillpositive: w = sqrt(1 - |bcd|^2), clamped at 0 for rounding noise.
        let a = (1.0 - (b * b + c * c + d * d)).max(0.0).sqrt();
        let r = quaternion_to_rotation([a, b, c, d]);
        let qfac = if self.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
        let z = self.zooms();
        let scale = [z[0], z[1], z[2] * qfac];
        let mut out = IDENTITY;
        for (row, out_row) in out.iter_mut().take(3).enumerate() {
            for col in 0..3 {
                out_row[col] = r[row][col] * scale[col];
            }
            out_row[3] = self.qoffset[row];
        }
        out
    }

    /// The sform affine: `srow_x, srow_y, srow_z` as its first three rows.
    pub fn sform_affine(&self) -> Affine {
        let mut out = IDENTITY;
        out[..3].copy_from_slice(&self.srow);
        out
    }

    /// nibabel's `get_base_affine`: pixdim scaling, x flipped, centred on the grid (Analyze style).
    pub fn base_affine(&self) -> Affine {
        let z = self.zooms();
        let n = self.spatial_dims();
        let mut out = IDENTITY;
        let signs = [-1.0, 1.0, 1.0];
        for a in 0..3 {
            out[a][a] = z[a] * signs[a];
            out[a][3] = -((n[a] as f64 - 1.0) / 2.0) * z[a] * signs[a];
        }
        out
    }

    /// The affine nibabel reports: sform when `sform_code > 0`, else qform when `qform_code > 0`,
    /// else the pixdim-only base affine.
    pub fn affine(&self) -> Affine {
        if self.sform_code > 0 {
            self.sform_affine()
        } else if self.qform_code > 0 {
            self.qform_affine()
        } else {
            self.base_affine()
        }
    }

    pub(crate) fn data_type(&self, path: &Path) -> Result<(DataType, usize)> {
        Ok(match self.datatype {
            2 => (DataType::Uint8, 1),
            256 => (DataType::Int8, 1),
            4 => (DataType::Int16, 2),
            512 => (DataType::Uint16, 2),
            8 => (DataType::Int32, 4),
            768 => (DataType::Uint32, 4),
            1024 => (DataType::Int64, 8),
            1280 => (DataType::Uint64, 8),
            16 => (DataType::Float32, 4),
            64 => (DataType::Float64, 8),
            128 => (DataType::Rgb24, 3),
            other => {
                return Err(Error::Unsupported {
                    path: path.to_path_buf(),
                    reason: format!(
                    "NIfTI datatype code {other} (complex, float128 and RGBA are not supported)"
                ),
                })
            }
        })
    }

    /// `(slope, intercept)` to apply, or `None` when the header asks for no scaling (slope 0 or
    /// not finite, as nibabel treats it).
    fn scaling(&self) -> Option<(f64, f64)> {
        let slope = self.scl_slope;
        if slope == 0.0 || !slope.is_finite() {
            return None;
        }
        let inter = if self.scl_inter.is_finite() {
            self.scl_inter
        } else {
            0.0
        };
        if slope == 1.0 && inter == 0.0 {
            None
        } else {
            Some((slope, inter))
        }
    }
}

/// Rotation matrix of a unit quaternion `(a, b, c, d)` (nibabel's `quat2mat`).
fn quaternion_to_rotation(q: [f64; 4]) -> [[f64; 3]; 3] {
    let [w, x, y, z] = q;
    let n = w * w + x * x + y * y + z * z;
    if n < f64::EPSILON {
        return [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
    }
    let s = 2.0 / n;
    let (xs, ys, zs) = (x * s, y * s, z * s);
    let (wx, wy, wz) = (w * xs, w * ys, w * zs);
    let (xx, xy, xz) = (x * xs, x * ys, x * zs);
    let (yy, yz, zz) = (y * ys, y * zs, z * zs);
    [
        [1.0 - (yy + zz), xy - wz, xz + wy],
        [xy + wz, 1.0 - (xx + zz), yz - wx],
        [xz - wy, yz + wx, 1.0 - (xx + yy)],
    ]
}

/// Quaternion `(b, c, d)` and `qfac` of the rotation part of an affine, for the qform. Shear (if
/// any) is dropped: the sform keeps the exact affine. Follows `nifti_mat44_to_quatern` (nifti1_io.c).
fn affine_to_quaternion(affine: &Affine) -> ([f64; 3], f64) {
    let mut r = [[0.0; 3]; 3];
    for c in 0..3 {
        let n = (0..3)
            .map(|i| affine[i][c] * affine[i][c])
            .sum::<f64>()
            .sqrt();
        for i in 0..3 {
            r[i][c] = if n > 0.0 {
                affine[i][c] / n
            } else if i == c {
                1.0
            } else {
                0.0
            };
        }
    }
    let det = r[0][0] * (r[1][1] * r[2][2] - r[1][2] * r[2][1])
        - r[0][1] * (r[1][0] * r[2][2] - r[1][2] * r[2][0])
        + r[0][2] * (r[1][0] * r[2][1] - r[1][1] * r[2][0]);
    let qfac = if det < 0.0 {
        for row in &mut r {
            row[2] = -row[2];
        }
        -1.0
    } else {
        1.0
    };
    let trace = r[0][0] + r[1][1] + r[2][2] + 1.0;
    let (a, b, c, d);
    if trace > 0.5 {
        a = 0.5 * trace.sqrt();
        b = 0.25 * (r[2][1] - r[1][2]) / a;
        c = 0.25 * (r[0][2] - r[2][0]) / a;
        d = 0.25 * (r[1][0] - r[0][1]) / a;
    } else {
        let xd = 1.0 + r[0][0] - (r[1][1] + r[2][2]);
        let yd = 1.0 + r[1][1] - (r[0][0] + r[2][2]);
        let zd = 1.0 + r[2][2] - (r[0][0] + r[1][1]);
        if xd > 1.0 {
            b = 0.5 * xd.sqrt();
            c = 0.25 * (r[0][1] + r[1][0]) / b;
            d = 0.25 * (r[0][2] + r[2][0]) / b;
            a = 0.25 * (r[2][1] - r[1][2]) / b;
        } else if yd > 1.0 {
            c = 0.5 * yd.sqrt();
            b = 0.25 * (r[0][1] + r[1][0]) / c;
            d = 0.25 * (r[1][2] + r[2][1]) / c;
            a = 0.25 * (r[0][2] - r[2][0]) / c;
        } else {
            d = 0.5 * zd.sqrt();
            b = 0.25 * (r[0][2] + r[2][0]) / d;
            c = 0.25 * (r[1][2] + r[2][1]) / d;
            a = 0.25 * (r[1][0] - r[0][1]) / d;
        }
    }
    // The NIfTI convention keeps a ≥ 0 (a is not stored).
    let sign = if a < 0.0 { -1.0 } else { 1.0 };
    ([b * sign, c * sign, d * sign], qfac)
}

/// Reads only the header of a NIfTI file (inflating as far as needed).
pub fn read_header(path: &Path) -> Result<NiftiHeader> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = BufReader::new(file);
    let mut magic = [0u8; 2];
    reader
        .read_exact(&mut magic)
        .map_err(|_| invalid(path, "file is empty or too short"))?;
    let chained = std::io::Cursor::new(magic).chain(reader);
    let mut head = Vec::with_capacity(540);
    let res = if magic == [0x1f, 0x8b] {
        MultiGzDecoder::new(chained)
            .take(540)
            .read_to_end(&mut head)
    } else {
        chained.take(540).read_to_end(&mut head)
    };
    res.map_err(|e| invalid(path, format!("cannot read header ({e})")))?;
    parse_header(path, &head)
}

/// Reads a NIfTI-1 or NIfTI-2 file (`.nii` or gzip-compressed) into a [`Volume`].
pub fn read_nifti(path: &Path) -> Result<Volume> {
    read_nifti_bytes(path, &read_bytes(path)?)
}

/// Decodes a whole (already inflated) NIfTI file held in memory; `path` only names it in errors.
pub fn read_nifti_bytes(path: &Path, bytes: &[u8]) -> Result<Volume> {
    let header = parse_header(path, bytes)?;
    let (dtype, bytes_per_voxel) = header.data_type(path)?;
    let dims = header.spatial_dims();
    let channels = header.channel_count();
    if dims.contains(&0) || channels == 0 {
        return Err(invalid(
            path,
            format!("empty image: dim = {:?}", header.dims),
        ));
    }
    let needed = header
        .voxel_count()
        .and_then(|n| n.checked_mul(bytes_per_voxel))
        .ok_or_else(|| invalid(path, format!("dim = {:?} overflows", header.dims)))?;
    let start = header.vox_offset as usize;
    let available = bytes.len().saturating_sub(start);
    if start < if header.version == 1 { 348 } else { 540 } || available < needed {
        return Err(invalid(
            path,
            format!(
                "dim = {:?} of {} need {needed} data bytes after vox_offset {start}, but the file has {available}",
                header.dims,
                dtype.as_str()
            ),
        ));
    }
    let raw = &bytes[start..start + needed];
    let scaling = header.scaling();
    let (data, channels) = decode_voxels(raw, dtype, header.big_endian, scaling, channels);
    let voxels = Array4::from_shape_vec((channels, dims[2], dims[1], dims[0]), data)
        .map_err(|e| invalid(path, e.to_string()))?;

    let mut warnings = Vec::new();
    if header.sform_code > 0 && header.qform_code > 0 {
        let (s, q) = (header.sform_affine(), header.qform_affine());
        let diff = (0..3)
            .flat_map(|r| (0..4).map(move |c| (r, c)))
            .map(|(r, c)| (s[r][c] - q[r][c]).abs())
            .fold(0.0, f64::max);
        if diff > 1e-3 {
            warnings.push(format!(
                "qform and sform disagree (largest difference {diff:.4} mm); the sform is used, as nibabel does"
            ));
        }
    }
    if header.sform_code <= 0 && header.qform_code <= 0 {
        warnings.push(
            "no qform or sform: the affine comes from pixdim alone (Analyze convention)".into(),
        );
    }
    let info = VolumeInfo {
        path: path.to_path_buf(),
        kind: SourceKind::Nifti,
        modality: None,
        series_uid: None,
        series_description: None,
        dtype,
        slices: dims[2],
        warnings,
        identifiers: PatientIdentifiers::default(),
    };
    Volume::new(voxels, Geometry::new(dims, header.affine()), info)
}

/// Decodes raw voxel bytes into `f32` in file order, applying scaling. RGB24 is de-interleaved into
/// three channels (one per colour), so the channel count is returned.
fn decode_voxels(
    raw: &[u8],
    dtype: DataType,
    big_endian: bool,
    scaling: Option<(f64, f64)>,
    channels: usize,
) -> (Vec<f32>, usize) {
    macro_rules! typed {
        ($t:ty) => {{
            const N: usize = std::mem::size_of::<$t>();
            let mut out = vec![0f32; raw.len() / N];
            out.par_chunks_mut(1 << 16)
                .zip(raw.par_chunks(N << 16))
                .for_each(|(dst, src)| {
                    for (d, s) in dst.iter_mut().zip(src.chunks_exact(N)) {
                        let b: [u8; N] = s.try_into().unwrap_or([0; N]);
                        let v = if big_endian {
                            <$t>::from_be_bytes(b)
                        } else {
                            <$t>::from_le_bytes(b)
                        };
                        *d = match scaling {
                            Some((m, c)) => (v as f64 * m + c) as f32,
                            None => v as f32,
                        };
                    }
                });
            out
        }};
    }
    match dtype {
        DataType::Uint8 => (typed!(u8), channels),
        DataType::Int8 => (typed!(i8), channels),
        DataType::Uint16 => (typed!(u16), channels),
        DataType::Int16 => (typed!(i16), channels),
        DataType::Uint32 => (typed!(u32), channels),
        DataType::Int32 => (typed!(i32), channels),
        DataType::Uint64 => (typed!(u64), channels),
        DataType::Int64 => (typed!(i64), channels),
        DataType::Float32 => (typed!(f32), channels),
        DataType::Float64 => (typed!(f64), channels),
        DataType::Rgb24 => {
            // Interleaved RGBRGB… per voxel; each (time) volume becomes three channels.
            let n = raw.len() / 3;
            let per_volume = n / channels;
            let mut out = vec![0f32; n * 3];
            for t in 0..channels {
                for (v, px) in raw[t * per_volume * 3..(t + 1) * per_volume * 3]
                    .chunks_exact(3)
                    .enumerate()
                {
                    for (s, &byte) in px.iter().enumerate() {
                        out[(t * 3 + s) * per_volume + v] = byte as f32;
                    }
                }
            }
            (out, channels * 3)
        }
    }
}

/// Storage types medseg writes.
pub const WRITABLE_TYPES: [DataType; 4] = [
    DataType::Uint8,
    DataType::Uint16,
    DataType::Int16,
    DataType::Float32,
];

/// Writes `volume` as NIfTI-1 (`.nii`, or gzip-compressed when the name ends in `.gz`) with its
/// geometry in both sform and qform (code 1, scanner), atomically: a temporary file in the target
/// directory is renamed into place, so a crash never leaves a torn file. Gzip output is blocked
/// (see [`gzip`]) and compressed on all cores.
///
/// Integer types require every voxel to be an integer within the type's range (so that the written
/// file reads back identical); the error says which value does not fit.
pub fn write_nifti(volume: &Volume, path: &Path, dtype: DataType) -> Result<()> {
    let write_err = |reason: String| Error::Write {
        path: path.to_path_buf(),
        reason,
    };
    check_output_name(path)?;
    let header = nifti1_header(&volume.geometry, volume.channels(), dtype).map_err(write_err)?;
    let voxels = volume
        .voxels
        .as_slice()
        .ok_or_else(|| write_err("voxel array is not contiguous".into()))?;
    let bad_value = |bad: f32| {
        write_err(format!(
            "value {bad} cannot be stored as {} without change; choose another type",
            dtype.as_str()
        ))
    };
    let size = stored_size(dtype);
    if !is_gz(path) {
        // Encoded straight after the header: no second copy of a CT-sized volume.
        let mut bytes = header;
        let start = bytes.len();
        bytes.resize(start + voxels.len() * size, 0);
        encode_as(dtype, voxels, &mut bytes[start..]).map_err(bad_value)?;
        return super::write_atomically(path, &bytes);
    }
    // Gzipped block by block: each block's voxels are encoded and compressed on their own, so
    // neither the encoded volume nor the whole compressed file is held twice.
    let blocks: Vec<Vec<u8>> = voxels
        .par_chunks(gzip::BLOCK_INPUT / size)
        .map(|src| {
            let mut buf = vec![0u8; src.len() * size];
            encode_as(dtype, src, &mut buf).map_err(bad_value)?;
            gzip::block(&buf).map_err(|e| write_err(e.to_string()))
        })
        .collect::<Result<_>>()?;
    let head = gzip::block(&header).map_err(|e| write_err(e.to_string()))?;
    super::write_parts_atomically(
        path,
        std::iter::once(head.as_slice()).chain(blocks.iter().map(Vec::as_slice)),
    )
}

/// Whether `path` names a gzipped file.
fn is_gz(path: &Path) -> bool {
    path.to_string_lossy().to_ascii_lowercase().ends_with(".gz")
}

/// Bytes per voxel stored as `dtype` (float32 for the types medseg does not write).
fn stored_size(dtype: DataType) -> usize {
    match dtype {
        DataType::Uint8 => 1,
        DataType::Uint16 | DataType::Int16 => 2,
        _ => 4,
    }
}

/// [`encode`] for `dtype`.
fn encode_as(dtype: DataType, voxels: &[f32], out: &mut [u8]) -> std::result::Result<(), f32> {
    match dtype {
        DataType::Uint8 => encode::<u8>(voxels, out),
        DataType::Uint16 => encode::<u16>(voxels, out),
        DataType::Int16 => encode::<i16>(voxels, out),
        _ => encode::<f32>(voxels, out),
    }
}

/// Writes a label map `[k, j, i]` as uint8 NIfTI on `geometry`, straight from its bytes (no
/// float copy of a CT-sized volume).
pub fn write_label_map(
    labels: &ndarray::Array3<u8>,
    geometry: &Geometry,
    path: &Path,
) -> Result<()> {
    let write_err = |reason: String| Error::Write {
        path: path.to_path_buf(),
        reason,
    };
    check_output_name(path)?;
    let [ni, nj, nk] = geometry.dims;
    if labels.dim() != (nk, nj, ni) {
        return Err(write_err(format!(
            "label map {:?} does not match the grid {:?}",
            labels.dim(),
            geometry.dims
        )));
    }
    let mut bytes = nifti1_header(geometry, 1, DataType::Uint8).map_err(write_err)?;
    match labels.as_slice() {
        Some(data) => bytes.extend_from_slice(data),
        None => bytes.extend(labels.iter()),
    }
    finish_write(path, bytes)
}

/// Refuses output names NIfTI readers would not recognise.
fn check_output_name(path: &Path) -> Result<()> {
    if is_nifti_path(path) {
        Ok(())
    } else {
        Err(Error::Write {
            path: path.to_path_buf(),
            reason: "the output name must end in .nii or .nii.gz".into(),
        })
    }
}

/// Gzips (for `.gz` names) and writes atomically.
fn finish_write(path: &Path, bytes: Vec<u8>) -> Result<()> {
    let bytes = if is_gz(path) {
        gzip::compress(&bytes).map_err(|e| Error::Write {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?
    } else {
        bytes
    };
    super::write_atomically(path, &bytes)
}

/// A storage type medseg writes: converts an `f32` voxel exactly, or refuses.
trait StoreAs: Copy + Send + Sync {
    const SIZE: usize;
    fn store(v: f32) -> Option<Self>;
    fn put_le(self, out: &mut [u8]);
}

macro_rules! store_int {
    ($t:ty) => {
        impl StoreAs for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn store(v: f32) -> Option<Self> {
                (v.fract() == 0.0 && v >= <$t>::MIN as f32 && v <= <$t>::MAX as f32)
                    .then_some(v as $t)
            }
            fn put_le(self, out: &mut [u8]) {
                out.copy_from_slice(&self.to_le_bytes());
            }
        }
    };
}
store_int!(u8);
store_int!(u16);
store_int!(i16);

impl StoreAs for f32 {
    const SIZE: usize = 4;
    fn store(v: f32) -> Option<Self> {
        Some(v)
    }
    fn put_le(self, out: &mut [u8]) {
        out.copy_from_slice(&self.to_le_bytes());
    }
}

/// Little-endian bytes of `voxels` as `T` into `out` (`T::SIZE` bytes per voxel), in parallel;
/// `Err(value)` names a voxel that won't fit.
fn encode<T: StoreAs>(voxels: &[f32], out: &mut [u8]) -> std::result::Result<(), f32> {
    out.par_chunks_mut(T::SIZE << 16)
        .zip(voxels.par_chunks(1 << 16))
        .try_for_each(|(dst, src)| {
            for (d, &v) in dst.chunks_exact_mut(T::SIZE).zip(src) {
                T::store(v).ok_or(v)?.put_le(d);
            }
            Ok::<(), f32>(())
        })
}

/// The 348-byte NIfTI-1 header (+ 4-byte empty extension flag) for `geometry`, little endian:
/// sform and qform both code 1 (scanner), spatial unit mm, no scaling. Offsets are nifti1.h's.
fn nifti1_header(
    geometry: &Geometry,
    channels: usize,
    dtype: DataType,
) -> std::result::Result<Vec<u8>, String> {
    let (code, bitpix): (i16, i16) = match dtype {
        DataType::Uint8 => (2, 8),
        DataType::Uint16 => (512, 16),
        DataType::Int16 => (4, 16),
        DataType::Float32 => (16, 32),
        other => {
            return Err(format!(
                "cannot write {}; choose uint8, uint16, int16 or float32",
                other.as_str()
            ))
        }
    };
    let mut dim = [1i16; 8];
    dim[0] = if channels > 1 { 4 } else { 3 };
    for (d, &n) in dim[1..4].iter_mut().zip(&geometry.dims) {
        *d = i16::try_from(n)
            .map_err(|_| format!("axis of {n} voxels exceeds NIfTI-1's limit of 32767"))?;
    }
    dim[4] = i16::try_from(channels)
        .map_err(|_| format!("{channels} channels exceed NIfTI-1's limit"))?;
    let a = &geometry.affine;
    let (quatern, qfac) = affine_to_quaternion(a);
    let spacing = geometry.spacing();
    let mut h = vec![0u8; 352];
    let put = |h: &mut Vec<u8>, at: usize, b: &[u8]| h[at..at + b.len()].copy_from_slice(b);
    put(&mut h, 0, &348i32.to_le_bytes());
    for (n, d) in dim.iter().enumerate() {
        put(&mut h, 40 + 2 * n, &d.to_le_bytes());
    }
    put(&mut h, 70, &code.to_le_bytes());
    put(&mut h, 72, &bitpix.to_le_bytes());
    let pixdim = [
        qfac as f32,
        spacing[0] as f32,
        spacing[1] as f32,
        spacing[2] as f32,
        1.0,
        1.0,
        1.0,
        1.0,
    ];
    for (n, p) in pixdim.iter().enumerate() {
        put(&mut h, 76 + 4 * n, &p.to_le_bytes());
    }
    put(&mut h, 108, &352f32.to_le_bytes()); // vox_offset
    put(&mut h, 112, &1f32.to_le_bytes()); // scl_slope
    h[123] = 2; // xyzt_units: NIFTI_UNITS_MM
    put(&mut h, 148, b"medseg");
    put(&mut h, 252, &XFORM_SCANNER_ANAT.to_le_bytes()); // qform_code
    put(&mut h, 254, &XFORM_SCANNER_ANAT.to_le_bytes()); // sform_code
    let q = [
        quatern[0], quatern[1], quatern[2], a[0][3], a[1][3], a[2][3],
    ];
    for (n, v) in q.iter().enumerate() {
        put(&mut h, 256 + 4 * n, &(*v as f32).to_le_bytes());
    }
    for (r, row) in a.iter().take(3).enumerate() {
        for (c, v) in row.iter().enumerate() {
            put(&mut h, 280 + 16 * r + 4 * c, &(*v as f32).to_le_bytes());
        }
    }
    put(&mut h, 344, b"n+1\0");
    // A qform is a rotation + zooms: a sheared affine has none. Mark it unknown then, so that
    // readers preferring the qform (ITK) fall back to the exact sform.
    let parsed = parse_nifti1(Path::new(""), &h).map_err(|e| e.to_string())?;
    let (qa, sa) = (parsed.qform_affine(), parsed.sform_affine());
    let sheared = (0..3).any(|r| (0..4).any(|c| (qa[r][c] - sa[r][c]).abs() > 1e-3));
    if sheared {
        put(&mut h, 252, &0i16.to_le_bytes());
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quaternion_round_trip_recovers_rotation_and_flip() {
        // LPS-style axial grid (x and y flipped): a rotation by pi about z.
        let a: Affine = [
            [-0.8, 0.0, 0.0, 100.0],
            [0.0, -0.8, 0.0, 120.0],
            [0.0, 0.0, 2.0, -50.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        let g = Geometry::new([4, 4, 4], a);
        let parsed = parse_nifti1(
            Path::new("x"),
            &nifti1_header(&g, 1, DataType::Uint8).unwrap(),
        )
        .unwrap();
        let q = parsed.qform_affine();
        for r in 0..3 {
            for c in 0..4 {
                assert!((q[r][c] - a[r][c]).abs() < 1e-5, "{q:?} vs {a:?}");
            }
        }
        // A left-handed grid needs qfac = -1.
        let mut flipped = a;
        flipped[2][2] = -2.0;
        let bytes = nifti1_header(&Geometry::new([4, 4, 4], flipped), 1, DataType::Uint8).unwrap();
        let parsed = parse_nifti1(Path::new("x"), &bytes).unwrap();
        assert_eq!(parsed.pixdim[0], -1.0);
        assert!((parsed.qform_affine()[2][2] + 2.0).abs() < 1e-5);
    }
}
