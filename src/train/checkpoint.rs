//! Checkpoints: a directory holding the model (`model.json` + `weights.bpk`, readable by
//! [`crate::model::load`]), the optimizer state, the training state (epoch, step, best metric,
//! history; the RNG is a function of seed and epoch) and the run config.
//!
//! A checkpoint is written whole into `NAME.partial/` and then swapped in by renames, so a process
//! killed at any moment leaves either the previous checkpoint or the new one, never a mix.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::io::layout::{Checkpoint, CheckpointKind, RunDir};
use crate::io::{write_atomically, write_json_atomically};
use crate::model::{HybridSegNet, HybridSegNetConfig};

/// One finished epoch, as written to `metrics.csv`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based.
    pub epoch: usize,
    /// Mean training loss over the epoch's steps.
    pub train_loss: f64,
    /// Learning rate of the epoch's last step.
    pub learning_rate: f64,
    /// Validation Dice per foreground class (empty when this epoch did not validate).
    pub validation_dice: Vec<f64>,
    /// Wall-clock seconds of the epoch, validation included.
    pub seconds: f64,
    /// Seconds the training step waited for the loader.
    pub data_wait_seconds: f64,
    /// Training throughput: patches per second of training (validation excluded).
    pub patches_per_second: f64,
}

impl EpochRecord {
    /// Mean of `validation_dice` over foreground classes; `None` when the epoch did not validate.
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
    /// Optimiser steps taken over the whole run (drives the learning-rate schedule).
    pub global_step: usize,
    /// Seed of initialisation, sampling and augmentation; with `epoch` it fixes every later
    /// random draw.
    pub seed: u64,
    /// Best value so far of the selection metric (`validate.metric`); `None` before any validation.
    pub best_metric: Option<f64>,
    /// Epoch (1-based) of the `best` checkpoint.
    pub best_epoch: Option<usize>,
    /// Validations since the last improvement, for early stopping.
    pub validations_without_improvement: usize,
    /// Training stopped because `validate.patience` ran out.
    pub stopped_early: bool,
    /// One record per finished epoch.
    pub history: Vec<EpochRecord>,
}

/// Writes checkpoint `kind` of the run in `run`: `model` is what inference loads; `training`, when
/// given, the weights the optimiser steps (they differ with a weight average).
#[allow(clippy::too_many_arguments)]
pub fn save(
    run: &RunDir,
    kind: CheckpointKind,
    model_config: &HybridSegNetConfig,
    model: &HybridSegNet,
    training: Option<&HybridSegNet>,
    optimizer: &burn::optim::ModuleOptimizer,
    state: &TrainState,
    run_config: &str,
) -> Result<()> {
    let target = run.checkpoint(kind);
    let (partial_dir, previous) = target.swap_paths();
    if partial_dir.exists() {
        std::fs::remove_dir_all(&partial_dir).map_err(|e| Error::io(&partial_dir, e))?;
    }
    std::fs::create_dir_all(&partial_dir).map_err(|e| Error::io(&partial_dir, e))?;
    let partial = Checkpoint::new(&partial_dir);
    crate::model::save(model_config, model, &partial_dir)?;
    if let Some(training) = training {
        crate::model::save_weights(training, &partial.training_weights())?;
    }
    optimizer
        .save(partial.optimizer())
        .map_err(|e| Error::Write {
            path: partial.optimizer(),
            reason: e.to_string(),
        })?;
    write_json_atomically(&partial.state(), state)?;
    write_atomically(&partial.run_config(), run_config.as_bytes())?;
    // Swap: target → previous, partial → target, drop previous. A crash between the two renames
    // leaves `previous`, which `RunDir::resolve` falls back to.
    let target = &target.dir;
    if target.exists() {
        if previous.exists() {
            std::fs::remove_dir_all(&previous).map_err(|e| Error::io(&previous, e))?;
        }
        std::fs::rename(target, &previous).map_err(|e| Error::io(target, e))?;
    }
    crate::io::abort_point(&format!("checkpoint-swap-{}", kind.name()));
    std::fs::rename(&partial_dir, target).map_err(|e| Error::io(target, e))?;
    if previous.exists() {
        std::fs::remove_dir_all(&previous).map_err(|e| Error::io(&previous, e))?;
    }
    Ok(())
}

/// Reads a checkpoint's training state.
pub fn load_state(checkpoint: &Checkpoint) -> Result<TrainState> {
    let path = checkpoint.state();
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Checkpoint {
        path,
        reason: e.to_string(),
    })
}

/// Loads a checkpoint's optimizer state into `optimizer`.
pub fn load_optimizer(
    checkpoint: &Checkpoint,
    optimizer: burn::optim::ModuleOptimizer,
) -> Result<burn::optim::ModuleOptimizer> {
    let path = checkpoint.optimizer();
    optimizer.load(&path).map_err(|e| Error::Checkpoint {
        path,
        reason: e.to_string(),
    })
}
