//! The preprocessing plan both training and inference apply: the spatial half (reorient to RAS,
//! resample to the target spacing, crop to non-zero; invertible through the geometry it returns)
//! and the intensity half (one [`Normalization`] per channel).
//!
//! Axis order: arrays are `[c, k, j, i]` (channel, then slowest to fastest voxel axis), while
//! spacings and `Geometry::dims` are `[i, j, k]`, as in NIfTI.

use std::ops::Range;

use ndarray::{Array3, Array4, ArrayView4, Axis};

use super::intensity::{normalize_channels, Normalization};
use super::spatial::{
    crop, cropped_geometry, nonzero_box, resample_linear, resample_nearest, resampled_geometry,
    Orientation,
};
use crate::config::PreprocessConfig;
use crate::error::{Error, Result};
use crate::geometry::Geometry;
use crate::volume::Volume;

/// The spatial half of preprocessing: reorient to RAS, resample to `spacing`, crop to non-zero.
#[derive(Debug, Clone, PartialEq)]
pub struct SpatialPlan {
    /// Target spacing along the (reoriented) voxel axes `i, j, k`, mm.
    pub spacing: [f64; 3],
    /// Reorient to RAS first (axis permutation and flips; exact).
    pub reorient: bool,
    /// Crop to the bounding box of non-zero voxels after resampling.
    pub crop_to_nonzero: bool,
}

/// A scan after [`SpatialPlan::apply`]: voxels `[c, k, j, i]` on `geometry`, and where they came
/// from, so predictions can be mapped back.
#[derive(Debug, Clone)]
pub struct SpatialResult {
    /// Voxels `[c, k, j, i]` on `geometry`, linearly resampled.
    pub image: Array4<f32>,
    /// Label map `[k, j, i]` on `geometry`, nearest-neighbour resampled, when one was given.
    pub label: Option<Array3<u8>>,
    /// The preprocessed grid (voxel → RAS+ mm).
    pub geometry: Geometry,
}

impl SpatialPlan {
    /// The grid before resampling: the source grid, reoriented if asked.
    pub fn oriented(&self, source: &Geometry) -> Geometry {
        if self.reorient {
            Orientation::of(source).apply_to_geometry(source)
        } else {
            source.clone()
        }
    }

    /// The grid `apply` resamples a scan on `source` to (before any crop), in the source's axis
    /// order: to check its size before doing the work.
    pub fn resampled_grid(&self, source: &Geometry) -> Geometry {
        let orientation = if self.reorient {
            Orientation::of(source)
        } else {
            Orientation::IDENTITY
        };
        let mut source_spacing = [0.0; 3];
        for w in 0..3 {
            source_spacing[orientation.axis[w]] = self.spacing[w];
        }
        resampled_geometry(source, source_spacing)
    }

    /// Why a scan on `source` is too large to preprocess (`None`: its resampled grid holds at most
    /// `limit` voxels), naming the source and target spacings, the grid, the `setting` that sets
    /// the limit, and a likely unit error (a voxel of 10 mm or more in-plane).
    pub fn size_problem(&self, source: &Geometry, limit: u64, setting: &str) -> Option<String> {
        let grid = self.resampled_grid(source);
        let voxels = grid.voxel_count() as u64;
        if voxels <= limit {
            return None;
        }
        let spacing = source.spacing();
        let hint = if spacing[..2].iter().any(|s| *s >= 10.0) {
            format!(
                "; an in-plane voxel of {:.1} mm is unusual: is the header's unit cm instead of mm?",
                spacing[0].max(spacing[1])
            )
        } else {
            String::new()
        };
        Some(format!(
            "resampling {:?} voxels of {:.3?} mm to {:.3?} mm gives a {:?} grid ({voxels} voxels, about {:.1} GiB per channel and class); the limit is {setting} = {limit}{hint}",
            source.dims,
            spacing,
            self.spacing,
            grid.dims,
            voxels as f64 * 4.0 / (1u64 << 30) as f64
        ))
    }

    /// Applies the plan to an image (and its label map on the same grid).
    pub fn apply(
        &self,
        image: ArrayView4<f32>,
        label: Option<ArrayView4<u8>>,
        source: &Geometry,
    ) -> SpatialResult {
        // Resample in the source's own axis order first, then reorient the (usually much
        // smaller) result: the same voxels as the other order, without a full-size copy of a
        // CT-sized scan. Corner-aligned linear resampling commutes with axis permutations and
        // flips.
        let orientation = if self.reorient {
            Orientation::of(source)
        } else {
            Orientation::IDENTITY
        };
        let resampled = self.resampled_grid(source);
        let image = resample_linear(image, source, &resampled);
        let label = label.map(|l| {
            resample_nearest(l.index_axis(Axis(0), 0), source, &resampled).insert_axis(Axis(0))
        });
        let (image, label, target) = if orientation.is_identity() {
            (image, label, resampled)
        } else {
            (
                orientation.apply(image.view()),
                label.map(|l| orientation.apply(l.view())),
                orientation.apply_to_geometry(&resampled),
            )
        };
        let label = label.map(|l| l.index_axis_move(Axis(0), 0));
        if self.crop_to_nonzero {
            if let Some(bbox) = nonzero_box(image.view()) {
                return crop_all(image, label, &target, &bbox);
            }
        }
        SpatialResult {
            image,
            label,
            geometry: target,
        }
    }
}

fn crop_all(
    image: Array4<f32>,
    label: Option<Array3<u8>>,
    g: &Geometry,
    bbox: &[Range<usize>; 3],
) -> SpatialResult {
    let label =
        label.map(|l| crop(l.insert_axis(Axis(0)).view(), bbox).index_axis_move(Axis(0), 0));
    SpatialResult {
        image: crop(image.view(), bbox),
        label,
        geometry: cropped_geometry(g, bbox),
    }
}

/// The whole preprocessing of a scan: spatial plan, then per-channel normalisation.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocessing {
    /// Reorient, resample, crop.
    pub spatial: SpatialPlan,
    /// One per channel.
    pub normalization: Vec<Normalization>,
}

impl Preprocessing {
    /// The preprocessing a resolved config describes (a run's saved config: spacing and intensity
    /// statistics filled in from its training data).
    pub fn from_config(config: &PreprocessConfig) -> Result<Self> {
        let s = &config.spacing;
        if s.len() != 3 {
            return Err(Error::Config {
                reason: "[preprocess] spacing is not resolved (three values in mm)".into(),
            });
        }
        let normalization = config
            .intensity
            .iter()
            .map(|ic| Normalization::resolve(ic, None, config.crop_to_nonzero))
            .collect::<Result<Vec<_>>>()?;
        Ok(Preprocessing {
            spatial: SpatialPlan {
                spacing: [s[0], s[1], s[2]],
                reorient: config.reorient,
                crop_to_nonzero: config.crop_to_nonzero,
            },
            normalization,
        })
    }

    /// Preprocesses a scan: `[C, D, H, W]` voxels on the returned grid, ready for the network.
    pub fn apply(&self, volume: &Volume) -> Result<SpatialResult> {
        if volume.channels() != self.normalization.len() {
            return Err(Error::Unsupported {
                path: volume.info.path.clone(),
                reason: format!(
                    "has {} channel(s); the model takes {}",
                    volume.channels(),
                    self.normalization.len()
                ),
            });
        }
        let mut spatial = self
            .spatial
            .apply(volume.voxels.view(), None, &volume.geometry);
        normalize_channels(&mut spatial.image, &self.normalization);
        Ok(spatial)
    }
}
