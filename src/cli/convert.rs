//! `medseg convert INPUT OUTPUT.nii[.gz] [--series UID] [--dtype TYPE] [--spacing X,Y,Z]
//! [--reference SERIES]`

use std::path::PathBuf;

use medseg::io::seg::{is_seg, read_seg};
use medseg::io::{nifti::WRITABLE_TYPES, read_volume, write_nifti};
use medseg::transforms::spatial::{resample_linear, resampled_geometry};
use medseg::{DataType, Volume};

#[derive(clap::Args)]
pub struct Args {
    /// A NIfTI file, a DICOM file, or a directory holding DICOM series.
    input: PathBuf,
    /// Output .nii or .nii.gz (gzip when the name ends in .gz).
    output: PathBuf,
    /// SeriesInstanceUID to convert when INPUT holds several series.
    #[arg(long)]
    series: Option<String>,
    /// Storage type: uint8, uint16, int16 or float32. Default: the source's type when it can hold
    /// the values exactly, else int16 for integer values, else float32.
    #[arg(long)]
    dtype: Option<String>,
    /// Resample (trilinear) to this voxel spacing in mm, `X,Y,Z` along the voxel axes i, j, k,
    /// keeping the field of view; integer sources are rounded back to integers.
    #[arg(long, value_delimiter = ',')]
    spacing: Option<Vec<f64>>,
    /// For a DICOM Segmentation INPUT: the series it was made from (a directory or file), whose
    /// grid the label map is written on. Without it the grid spans only the planes the SEG holds.
    #[arg(long, value_name = "SERIES")]
    reference: Option<PathBuf>,
}

/// The smallest faithful type among the writable ones, preferring the source's own.
fn choose_dtype(v: &Volume) -> DataType {
    let src = v.info.dtype;
    let data = v.voxels.as_slice_memory_order().unwrap_or(&[]);
    let integral = data.iter().all(|x| x.fract() == 0.0);
    let (lo, hi) = v.value_range().unwrap_or((0.0, 0.0));
    let fits = |t: DataType| {
        let (a, b) = t.range();
        t == DataType::Float32 || (integral && lo as f64 >= a && hi as f64 <= b)
    };
    let src = if src == DataType::Rgb24 {
        DataType::Uint8
    } else {
        src
    };
    if WRITABLE_TYPES.contains(&src) && fits(src) {
        src
    } else if fits(DataType::Int16) {
        DataType::Int16
    } else if fits(DataType::Uint16) {
        DataType::Uint16
    } else {
        DataType::Float32
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut volume = if args.input.is_file() && is_seg(&args.input) {
        let reference = match &args.reference {
            Some(r) => Some(read_volume(r, args.series.as_deref())?.geometry),
            None => None,
        };
        let (volume, segments) = read_seg(&args.input, reference.as_ref())?;
        for s in &segments {
            eprintln!("segment {} {:?} -> label {}", s.number, s.label, s.value);
        }
        volume
    } else {
        if args.reference.is_some() {
            super::usage!("--reference is for DICOM Segmentation inputs only");
        }
        read_volume(&args.input, args.series.as_deref())?
    };
    if let Some(s) = &args.spacing {
        if s.len() != 3 || s.iter().any(|v| v.is_nan() || *v <= 0.0) {
            super::usage!("--spacing needs three positive mm values X,Y,Z");
        }
        let target = resampled_geometry(&volume.geometry, [s[0], s[1], s[2]]);
        let mut voxels = resample_linear(volume.voxels.view(), &volume.geometry, &target);
        if !matches!(volume.info.dtype, DataType::Float32 | DataType::Float64) {
            voxels.mapv_inplace(f32::round);
        }
        volume = Volume::new(voxels, target, volume.info.clone())?;
    }
    let dtype = match args.dtype.as_deref() {
        Some(name) => match DataType::parse(name) {
            Some(t) if WRITABLE_TYPES.contains(&t) => t,
            _ => super::usage!("--dtype {name}: choose uint8, uint16, int16 or float32"),
        },
        None => choose_dtype(&volume),
    };
    write_nifti(&volume, &args.output, dtype)?;
    let shape: Vec<String> = volume.shape().iter().map(|s| s.to_string()).collect();
    eprintln!(
        "wrote {} ({}, {}, {})",
        args.output.display(),
        shape.join("x"),
        dtype.as_str(),
        volume.geometry.orientation()
    );
    for w in &volume.info.warnings {
        eprintln!("warning: {w}");
    }
    Ok(())
}
