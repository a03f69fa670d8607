//! Segmentation losses: soft Dice + cross-entropy, the combination nnU-Net trains with.

use burn::prelude::*;
use burn::tensor::activation;

/// Smoothing of the soft Dice ratio (nnU-Net uses 1e-5), so empty classes do not divide by zero.
const DICE_SMOOTH: f64 = 1e-5;

/// Mean over classes of `1 - soft Dice`, computed over the whole batch (nnU-Net's batch Dice).
///
/// # Shapes
/// - `logits`, `onehot` (the target one-hot on axis 1): `[B, K, D, H, W]` → `[1]`
fn soft_dice(logits: Tensor<5>, onehot: Tensor<5>) -> Tensor<1> {
    let probs = activation::softmax(logits, 1);
    let dims = [0usize, 2, 3, 4];
    let inter = (probs.clone() * onehot.clone()).sum_dims(&dims);
    let denom = probs.sum_dims(&dims) + onehot.sum_dims(&dims);
    let dice = (inter * 2.0 + DICE_SMOOTH) / (denom + DICE_SMOOTH);
    (dice.neg() + 1.0).mean()
}

/// Mean voxel-wise cross-entropy.
///
/// # Shapes
/// - `logits`, `onehot` (the target one-hot on axis 1): `[B, K, D, H, W]` → `[1]`
fn cross_entropy(logits: Tensor<5>, onehot: Tensor<5>) -> Tensor<1> {
    let log_probs = activation::log_softmax(logits, 1);
    (log_probs * onehot).sum_dim(1).mean().neg()
}

/// `dice_weight · Dice + ce_weight · CE`.
///
/// # Shapes
/// - `logits`: `[B, K, D, H, W]`, `target`: `[B, D, H, W]` → `[1]`
pub fn dice_ce_loss(
    logits: Tensor<5>,
    target: Tensor<4, Int>,
    dice_weight: f64,
    ce_weight: f64,
) -> Tensor<1> {
    // One one-hot for both terms (it is a scatter over the whole volume).
    let k = logits.dims()[1];
    let onehot = target.one_hot_fill(k, 1.0, 0.0, 1).float();
    soft_dice(logits.clone(), onehot.clone()) * dice_weight
        + cross_entropy(logits, onehot) * ce_weight
}
