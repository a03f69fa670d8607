//! A trained model with its preprocessing, rebuilt from a checkpoint alone, predicting label maps
//! on the exact grid of the scan they came from.

use std::path::{Path, PathBuf};

use ndarray::{Array3, Array4, Axis};

use super::sliding_window::SlidingWindow;
use crate::config::RunConfig;
use crate::data::dataset::SpatialPlan;
use crate::error::{Error, Result};
use crate::geometry::Geometry;
use crate::model::HybridSegNet;
use crate::transforms::intensity::Normalization;
use crate::transforms::spatial::resample_labels_onto;
use crate::volume::Volume;

/// A model and everything needed to apply it to a scan.
pub struct Predictor {
    pub config: RunConfig,
    pub model: HybridSegNet,
    pub device: burn::prelude::Device,
    pub plan: SpatialPlan,
    pub normalization: Vec<Normalization>,
    pub window: SlidingWindow,
}

/// A prediction: class labels on the source grid, probabilities on the preprocessed grid.
pub struct Prediction {
    /// `[k, j, i]` on `geometry`, the scan's own grid.
    pub labels: Array3<u8>,
    pub geometry: Geometry,
    /// `[K, D, H, W]` softmax probabilities on `grid`.
    pub probabilities: Array4<f32>,
    pub grid: Geometry,
}

/// The checkpoint a path names: a checkpoint directory itself, or a run directory's best
/// (else last) checkpoint.
pub fn checkpoint_dir(path: &Path) -> Result<PathBuf> {
    if path.join("model.json").is_file() {
        return Ok(path.to_path_buf());
    }
    for name in ["best", "last"] {
        let dir = path.join("checkpoints").join(name);
        if dir.join("model.json").is_file() {
            return Ok(dir);
        }
    }
    Err(Error::Checkpoint {
        path: path.to_path_buf(),
        reason: "neither a checkpoint (model.json) nor a run directory with checkpoints/best or checkpoints/last".into(),
    })
}

impl Predictor {
    /// Loads the model and its preprocessing from `path` (see [`checkpoint_dir`]) onto `device`
    /// (`cpu`, `wgpu`, `cuda`; default: the one it was trained on).
    pub fn load(path: &Path, device: Option<&str>) -> Result<Self> {
        let dir = checkpoint_dir(path)?;
        let config_path = dir.join(crate::config::CONFIG_FILE);
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let config = RunConfig::from_toml(&text, &config_path.display().to_string())?;
        let device = crate::model::device(device.unwrap_or(&config.train.device))?;
        let (model_config, model) = crate::model::load(&dir, &device)?;
        let s = &config.preprocess.spacing;
        if s.len() != 3 {
            return Err(Error::Checkpoint {
                path: config_path,
                reason: "the saved config has no resolved [preprocess] spacing".into(),
            });
        }
        let normalization = config
            .preprocess
            .intensity
            .iter()
            .map(|ic| Normalization::resolve(ic, None, config.preprocess.crop_to_nonzero))
            .collect::<Result<Vec<_>>>()?;
        let p = &model_config.patch_size;
        let window = SlidingWindow {
            window: if p.len() == 3 {
                [p[0], p[1], p[2]]
            } else {
                [1, p[0], p[1]]
            },
            overlap: config.validate.overlap,
            batch_size: config.validate.batch_size,
            mirror: false,
            context: model_config.context_slices,
        };
        Ok(Predictor {
            plan: SpatialPlan {
                spacing: [s[0], s[1], s[2]],
                reorient: config.preprocess.reorient,
                crop_to_nonzero: config.preprocess.crop_to_nonzero,
            },
            config,
            model,
            device,
            normalization,
            window,
        })
    }

    /// Segments one scan: preprocess as in training, sliding window, argmax, and the label map
    /// mapped back onto the scan's grid (nearest neighbour through the voxel→world affines).
    pub fn predict(&self, volume: &Volume) -> Result<Prediction> {
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
            .plan
            .apply(volume.voxels.view(), None, &volume.geometry);
        for (c, n) in self.normalization.iter().enumerate() {
            n.apply(spatial.image.index_axis_mut(Axis(0), c));
        }
        let probabilities = self
            .window
            .predict(&self.model, spatial.image.view(), &self.device)?;
        let argmax = probabilities.map_axis(Axis(0), |p| {
            p.iter()
                .enumerate()
                .fold((0u8, f32::NEG_INFINITY), |best, (c, &v)| {
                    if v > best.1 {
                        (c as u8, v)
                    } else {
                        best
                    }
                })
                .0
        });
        let labels = resample_labels_onto(argmax.view(), &spatial.geometry, &volume.geometry);
        Ok(Prediction {
            labels,
            geometry: volume.geometry.clone(),
            probabilities,
            grid: spatial.geometry,
        })
    }
}
