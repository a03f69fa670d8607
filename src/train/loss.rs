//! Segmentation losses: soft Dice + cross-entropy, the combination nnU-Net trains with.

use burn::prelude::*;
use burn::tensor::activation;

use crate::config::{DiceClasses, TrainConfig};

/// Smoothing of the soft Dice ratio (nnU-Net uses 1e-5), so empty classes do not divide by zero.
const DICE_SMOOTH: f64 = 1e-5;

/// Mean over `classes` of `1 - soft Dice`, computed over the whole batch (nnU-Net's batch Dice).
///
/// # Shapes
/// - `logits`, `onehot` (the target one-hot on axis 1): `[B, K, D, H, W]` → `[1]`
fn soft_dice(logits: Tensor<5>, onehot: Tensor<5>, classes: DiceClasses) -> Tensor<1> {
    let probs = activation::softmax(logits, 1);
    let dims = [0usize, 2, 3, 4];
    let inter = (probs.clone() * onehot.clone()).sum_dims(&dims);
    let denom = probs.sum_dims(&dims) + onehot.sum_dims(&dims);
    let dice = (inter * 2.0 + DICE_SMOOTH) / (denom + DICE_SMOOTH);
    // `[1, K, 1, 1, 1]`: the sums keep their axes.
    let k = dice.dims()[1];
    let dice = match classes {
        DiceClasses::Foreground if k > 1 => dice.narrow(1, 1, k - 1),
        _ => dice,
    };
    (dice.neg() + 1.0).mean()
}

/// Voxel-wise cross-entropy: the mean, or with `weights` the weighted mean.
///
/// # Shapes
/// - `logits`, `onehot` (the target one-hot on axis 1): `[B, K, D, H, W]`, `weights`:
///   `[B, 1, D, H, W]` → `[1]`
fn cross_entropy(logits: Tensor<5>, onehot: Tensor<5>, weights: Option<Tensor<5>>) -> Tensor<1> {
    let log_probs = activation::log_softmax(logits, 1);
    let per_voxel = (log_probs * onehot).sum_dim(1);
    match weights {
        None => per_voxel.mean().neg(),
        Some(w) => (per_voxel * w.clone()).sum().neg() / w.sum(),
    }
}

/// Cross-entropy weights that give a small lesion about the weight of the batch's largest: every
/// voxel of a connected component (26-connected, per patch) of `classes` gets
/// `clamp(largest / size, 1, max)`, where `largest` is the batch's largest such component; every
/// other voxel 1. Voxel-wise losses let a patch's few small lesions drown in its large ones and
/// the background, and lesion-wise detection counts each lesion once. `None` when nothing would
/// be weighted (`max <= 1`, no class or no component).
///
/// # Shapes
/// - `labels`: `[B, D, H, W]` class indices → weights of the same layout
pub fn lesion_weights(
    labels: &[i64],
    shape: [usize; 4],
    classes: &[usize],
    max: f64,
) -> Option<Vec<f32>> {
    if max <= 1.0 || classes.is_empty() {
        return None;
    }
    let [b, d, h, w] = shape;
    let per = d * h * w;
    let parts: Vec<_> = labels
        .chunks(per)
        .take(b)
        .map(|patch| {
            let mask: Vec<bool> = patch
                .iter()
                .map(|&c| c >= 0 && classes.contains(&(c as usize)))
                .collect();
            crate::transforms::post::connected_components(&mask, [d, h, w])
        })
        .collect();
    let largest = parts.iter().flat_map(|p| p.sizes.iter()).copied().max()?;
    let mut weights = Vec::with_capacity(labels.len());
    for part in &parts {
        weights.extend(part.labels.iter().map(|&id| match id {
            0 => 1.0,
            id => (largest as f64 / part.sizes[id as usize - 1] as f64).clamp(1.0, max) as f32,
        }));
    }
    Some(weights)
}

/// The terms of the training loss and their weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossTerms {
    /// Weight of the soft Dice term.
    pub dice_weight: f64,
    /// Weight of the cross-entropy term.
    pub ce_weight: f64,
    /// The classes the soft Dice averages over.
    pub dice_classes: DiceClasses,
    /// The most a small lesion's voxels weigh in the cross-entropy (see [`lesion_weights`]); 1
    /// weighs every voxel alike.
    pub lesion_weight_max: f64,
}

impl LossTerms {
    /// The terms `[train]` sets.
    pub fn of(t: &TrainConfig) -> Self {
        LossTerms {
            dice_weight: t.dice_weight,
            ce_weight: t.ce_weight,
            dice_classes: t.dice_classes,
            lesion_weight_max: t.lesion_weight_max,
        }
    }
}

impl Default for LossTerms {
    /// `[train]`'s defaults: Dice over every class plus cross-entropy, equally weighted.
    fn default() -> Self {
        LossTerms::of(&TrainConfig::default())
    }
}

/// `dice_weight · Dice + ce_weight · CE`.
///
/// # Shapes
/// - `logits`: `[B, K, D, H, W]`, `target`: `[B, D, H, W]` → `[1]`
pub fn dice_ce_loss(logits: Tensor<5>, target: Tensor<4, Int>, terms: LossTerms) -> Tensor<1> {
    weighted_dice_ce_loss(logits, target, None, terms)
}

/// [`dice_ce_loss`] with the cross-entropy weighted per voxel (e.g. by [`lesion_weights`]).
///
/// # Shapes
/// - `logits`: `[B, K, D, H, W]`, `target`, `weights`: `[B, D, H, W]` → `[1]`
pub fn weighted_dice_ce_loss(
    logits: Tensor<5>,
    target: Tensor<4, Int>,
    weights: Option<Tensor<4>>,
    terms: LossTerms,
) -> Tensor<1> {
    // One one-hot for both terms (it is a scatter over the whole volume).
    let k = logits.dims()[1];
    let onehot = target.one_hot_fill(k, 1.0, 0.0, 1).float();
    soft_dice(logits.clone(), onehot.clone(), terms.dice_classes) * terms.dice_weight
        + cross_entropy(logits, onehot, weights.map(|w| w.unsqueeze_dim(1))) * terms.ce_weight
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two classes, four voxels: the prediction is certain everywhere and right on three.
    /// Background Dice 2·2/(3+2) = 0.8, foreground Dice 2·1/(1+2) = 2/3.
    #[test]
    fn foreground_dice_leaves_the_background_out() {
        let device = crate::model::device("cpu").unwrap();
        // Logits far apart, so the softmax is 0/1 to well below the tolerance.
        let l = 40.0f32;
        let logits = Tensor::<5>::from_data(
            TensorData::new(vec![l, l, l, 0.0, 0.0, 0.0, 0.0, l], [1, 2, 1, 1, 4]),
            &device,
        );
        let target = Tensor::<4, Int>::from_data(
            TensorData::new(vec![0i64, 0, 1, 1], [1, 1, 1, 4]),
            &device,
        );
        let onehot = target.one_hot_fill(2, 1.0, 0.0, 1).float();
        let value = |classes| {
            soft_dice(logits.clone(), onehot.clone(), classes).into_scalar::<f32>() as f64
        };
        let all = value(DiceClasses::All);
        let fg = value(DiceClasses::Foreground);
        assert!(
            (all - (1.0 - (0.8 + 2.0 / 3.0) / 2.0)).abs() < 1e-4,
            "all classes: {all}"
        );
        assert!((fg - (1.0 - 2.0 / 3.0)).abs() < 1e-4, "foreground: {fg}");
    }

    /// Two patches of 1 × 4 × 4: a 4-voxel lesion in the first, a 1-voxel lesion and a voxel of
    /// another class in the second. The small lesion weighs 4 (the cap permitting), the large one
    /// 1, everything else 1.
    #[test]
    fn small_lesions_weigh_as_much_as_the_largest_up_to_the_cap() {
        #[rustfmt::skip]
        let labels: Vec<i64> = vec![
            1, 1, 0, 0,
            1, 1, 0, 0,
            0, 0, 0, 0,
            0, 0, 0, 0,

            0, 0, 0, 0,
            0, 0, 0, 2,
            0, 1, 0, 0,
            0, 0, 0, 0,
        ];
        let w = lesion_weights(&labels, [2, 1, 4, 4], &[1], 10.0).unwrap();
        assert_eq!(w[16 + 9], 4.0);
        assert_eq!(w[16 + 7], 1.0);
        assert!(w[..4].iter().all(|&x| x == 1.0));
        assert_eq!(w.iter().filter(|&&x| x != 1.0).count(), 1);
        let capped = lesion_weights(&labels, [2, 1, 4, 4], &[1], 2.5).unwrap();
        assert_eq!(capped[16 + 9], 2.5);
        assert!(lesion_weights(&labels, [2, 1, 4, 4], &[1], 1.0).is_none());
        assert!(lesion_weights(&[0; 32], [2, 1, 4, 4], &[1], 10.0).is_none());
    }

    /// Uniform weights give the unweighted loss.
    #[test]
    fn uniform_weights_leave_the_loss_unchanged() {
        let device = crate::model::device("cpu").unwrap();
        let logits = Tensor::<5>::from_data(
            TensorData::new(
                vec![0.3f32, -1.0, 2.0, 0.5, 0.1, 0.7, -0.4, 1.2],
                [1, 2, 1, 1, 4],
            ),
            &device,
        );
        let target = Tensor::<4, Int>::from_data(
            TensorData::new(vec![0i64, 1, 1, 0], [1, 1, 1, 4]),
            &device,
        );
        let ones = Tensor::<4>::ones([1, 1, 1, 4], &device) * 3.0;
        let plain = dice_ce_loss(logits.clone(), target.clone(), LossTerms::default());
        let weighted = weighted_dice_ce_loss(logits, target, Some(ones), LossTerms::default());
        let (a, b) = (plain.into_scalar::<f32>(), weighted.into_scalar::<f32>());
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }
}
