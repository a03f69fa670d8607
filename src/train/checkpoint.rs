//! Checkpoints: a directory holding the model (`model.json` + `weights.bpk`, readable by
//! [`crate::model::load`]), the optimizer state, the training state (epoch, step, best metric,
//! history; the RNG is a function of seed and epoch) and the run config.
//!
//! A checkpoint is written whole into `NAME.partial/` and then swapped in by renames, so a process
//! killed at any moment leaves either the previous checkpoint or the new one, never a mix.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{HybridSegNet, HybridSegNetConfig};

pub const STATE_FILE: &str = "state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.bpk";
/// The effective run config, so inference can rebuild preprocessing from the checkpoint alone.
pub const CONFIG_FILE: &str = crate::config::CONFIG_FILE;

/// One finished epoch, as written to `metrics.csv`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based.
    pub epoch: usize,
    pub train_loss: f64,
    pub learning_rate: f64,
    /// Validation Dice per foreground class (empty when this epoch did not validate).
    pub validation_dice: Vec<f64>,
    pub seconds: f64,
    /// Seconds the training step waited for the loader.
    pub data_wait_seconds: f64,
    pub patches_per_second: f64,
}

impl EpochRecord {
    pub fn mean_dice(&self) -> Option<f64> {
        (!self.validation_dice.is_empty())
            .then(|| self.validation_dice.iter().sum::<f64>() / self.validation_dice.len() as f64)
    }
}

/// Everything besides weights and optimizer moments that a resumed run needs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Epochs completed.
    pub epoch: usize,
    pub global_step: usize,
    /// Seed of initialisation, sampling and augmentation; with `epoch` it fixes every later
    /// random draw.
    pub seed: u64,
    pub best_metric: Option<f64>,
    pub best_epoch: Option<usize>,
    pub validations_without_improvement: usize,
    pub stopped_early: bool,
    pub history: Vec<EpochRecord>,
}

/// Writes checkpoint `name` (`last`, `best`) under `dir`.
pub fn save(
    dir: &Path,
    name: &str,
    model_config: &HybridSegNetConfig,
    model: &HybridSegNet,
    optimizer: &burn::optim::ModuleOptimizer,
    state: &TrainState,
    run_config: &str,
) -> Result<()> {
    let target = dir.join(name);
    let partial = dir.join(format!("{name}.partial"));
    let previous = dir.join(format!("{name}.previous"));
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(|e| Error::io(&partial, e))?;
    }
    std::fs::create_dir_all(&partial).map_err(|e| Error::io(&partial, e))?;
    crate::model::save(model_config, model, &partial)?;
    optimizer
        .save(partial.join(OPTIMIZER_FILE))
        .map_err(|e| Error::Write {
            path: partial.join(OPTIMIZER_FILE),
            reason: e.to_string(),
        })?;
    let json = serde_json::to_vec_pretty(state).map_err(|e| Error::Write {
        path: partial.join(STATE_FILE),
        reason: e.to_string(),
    })?;
    crate::io::nifti::write_atomically(&partial.join(STATE_FILE), &json)?;
    crate::io::nifti::write_atomically(&partial.join(CONFIG_FILE), run_config.as_bytes())?;
    // Swap: target → previous, partial → target, drop previous. A crash between the two renames
    // leaves `previous`, which `resolve` falls back to.
    if target.exists() {
        if previous.exists() {
            std::fs::remove_dir_all(&previous).map_err(|e| Error::io(&previous, e))?;
        }
        std::fs::rename(&target, &previous).map_err(|e| Error::io(&target, e))?;
    }
    std::fs::rename(&partial, &target).map_err(|e| Error::io(&target, e))?;
    if previous.exists() {
        std::fs::remove_dir_all(&previous).map_err(|e| Error::io(&previous, e))?;
    }
    Ok(())
}

/// The directory of checkpoint `name`, or its previous version when a crash interrupted the swap.
pub fn resolve(dir: &Path, name: &str) -> Option<PathBuf> {
    [dir.join(name), dir.join(format!("{name}.previous"))]
        .into_iter()
        .find(|p| p.join(STATE_FILE).is_file())
}

/// Reads a checkpoint's training state.
pub fn load_state(checkpoint: &Path) -> Result<TrainState> {
    let path = checkpoint.join(STATE_FILE);
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Checkpoint {
        path,
        reason: e.to_string(),
    })
}

/// Loads a checkpoint's optimizer state into `optimizer`.
pub fn load_optimizer(
    checkpoint: &Path,
    optimizer: burn::optim::ModuleOptimizer,
) -> Result<burn::optim::ModuleOptimizer> {
    let path = checkpoint.join(OPTIMIZER_FILE);
    optimizer.load(&path).map_err(|e| Error::Checkpoint {
        path,
        reason: e.to_string(),
    })
}
