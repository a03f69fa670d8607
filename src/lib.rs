//! medseg: lesion detection and segmentation in CT and MR scans.
//!
//! Scans are read with exact geometry: NIfTI-1/NIfTI-2 files and DICOM (single files,
//! enhanced multi-frame objects, whole series directories), and writes NIfTI whose voxels land on
//! the same world positions. World coordinates are RAS+ millimetres, as nibabel reports them.
//! The segmentation network is [`model::HybridSegNet`] (CNN stem → ViT → U-shaped decoder) on burn.
//!
//! ```no_run
//! use std::path::Path;
//! // A DICOM series directory in, a NIfTI file with the same geometry out.
//! let ct = medseg::io::read_volume(Path::new("datasets/cache/totalsegmentator/example_ct_dicom"), None)?;
//! println!("{:?} voxels, {} mm, {}", ct.shape(), ct.geometry.spacing()[2], ct.geometry.orientation());
//! medseg::io::write_nifti(&ct, Path::new("/tmp/ct.nii.gz"), medseg::DataType::Int16)?;
//! # Ok::<(), medseg::Error>(())
//! ```

pub mod config;
pub mod data;
pub mod error;
pub mod eval;
pub mod export;
pub mod geometry;
pub mod infer;
pub mod io;
pub mod model;
pub mod synth;
pub mod train;
pub mod transforms;
pub mod volume;

pub use error::{Error, Result};
pub use geometry::Geometry;
pub use volume::{DataType, SourceKind, Volume, VolumeInfo};
