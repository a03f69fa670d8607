//! Lesion-wise detection metrics: connected components of truth and prediction matched one to one
//! by overlap, then sensitivity, precision, F1, per-lesion Dice and FROC.

use std::collections::HashMap;

use serde::Serialize;

use crate::geometry::{to_voxel_order, Affine, Geometry};
pub use crate::io::layout::Polarity;
pub use crate::transforms::post::VoxelBox;
use crate::transforms::post::{connected_components, Components};

/// One lesion of a case: a connected component of the truth or the prediction.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LesionRecord {
    /// Case name.
    pub case: String,
    /// Label value of the class the lesion belongs to.
    pub class: u32,
    /// `truth` or `pred`.
    pub source: &'static str,
    /// Component id within its mask (1-based, raster order).
    pub id: u32,
    /// Size in voxels.
    pub voxels: usize,
    /// Volume in mm³ (voxels × voxel volume).
    pub volume_mm3: f64,
    /// Inclusive bounding box `[[i, j, k] min, [i, j, k] max]` (voxel order).
    pub bbox_voxel: VoxelBox,
    /// Mean voxel-centre position, RAS mm (the review page's crosshair goes there).
    pub centroid_mm: [f64; 3],
    /// Contrast-to-noise ratio of a synthetic truth lesion, from `medseg synth`'s `lesions.json`.
    pub contrast_to_noise: Option<f64>,
    /// Polarity of a synthetic truth lesion (domain-randomised datasets).
    pub polarity: Option<Polarity>,
    /// Id of the matched component in the other mask, if any.
    pub matched: Option<u32>,
    /// IoU with the matched component; 0 when unmatched.
    pub iou: f64,
    /// Dice with the matched component; 0 when unmatched.
    pub dice: f64,
    /// Detection confidence (predicted lesions only; 1 when the prediction carries none).
    pub confidence: f64,
}

/// Lesions of one class in one case, matched.
#[derive(Debug, Clone, Default)]
pub struct LesionMatch {
    /// Truth lesions, by component id.
    pub truth: Vec<LesionRecord>,
    /// Predicted lesions, by component id.
    pub pred: Vec<LesionRecord>,
}

impl LesionMatch {
    /// True positives: truth lesions matched by a prediction.
    pub fn tp(&self) -> usize {
        self.truth.iter().filter(|l| l.matched.is_some()).count()
    }
    /// False negatives: truth lesions left unmatched.
    pub fn fn_(&self) -> usize {
        self.truth.len() - self.tp()
    }
    /// False positives: predicted lesions left unmatched.
    pub fn fp(&self) -> usize {
        self.pred.iter().filter(|l| l.matched.is_none()).count()
    }
}

/// The grid lesions are found on: `[nk, nj, ni]`, the volume of one voxel and the voxel-to-world
/// affine.
#[derive(Debug, Clone, Copy)]
pub struct LesionGrid {
    /// Mask shape `[nk, nj, ni]` (array order).
    pub dims: [usize; 3],
    /// Volume of one voxel in mm³.
    pub voxel_mm3: f64,
    /// Voxel `(i, j, k)` to RAS mm.
    pub affine: Affine,
}

/// Finds the lesions of `truth` and `pred` (binary masks on `grid`) and
/// matches them one to one, greedily by decreasing IoU, accepting pairs with IoU above
/// `iou_threshold` (0 = any overlap). `confidence(component voxels, inclusive (i, j, k) box)` gives
/// each predicted lesion's confidence.
pub fn match_lesions(
    case: &str,
    class: u32,
    truth: &[bool],
    pred: &[bool],
    grid: LesionGrid,
    iou_threshold: f64,
    confidence: &dyn Fn(&[usize], VoxelBox) -> f64,
) -> LesionMatch {
    let LesionGrid {
        dims, voxel_mm3, ..
    } = grid;
    let ct = connected_components(truth, dims);
    let cp = connected_components(pred, dims);
    let geometry = Geometry::new(to_voxel_order(dims), grid.affine);
    let centres = |c: &Components| -> Vec<[f64; 3]> {
        c.mean_voxels(dims)
            .into_iter()
            .map(|v| geometry.voxel_to_world(v))
            .collect()
    };
    let (truth_centres, pred_centres) = (centres(&ct), centres(&cp));
    let mut overlap: HashMap<(u32, u32), usize> = HashMap::new();
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); cp.count()];
    let truth_boxes = ct.boxes(dims);
    let pred_boxes = cp.boxes(dims);
    for (idx, (&a, &b)) in ct.labels.iter().zip(&cp.labels).enumerate() {
        if b > 0 {
            members[b as usize - 1].push(idx);
            if a > 0 {
                *overlap.entry((a, b)).or_default() += 1;
            }
        }
    }
    let mut pairs: Vec<(f64, u32, u32, usize)> = overlap
        .into_iter()
        .map(|((a, b), inter)| {
            let union = ct.sizes[a as usize - 1] + cp.sizes[b as usize - 1] - inter;
            (inter as f64 / union as f64, a, b, inter)
        })
        .filter(|(iou, ..)| *iou > iou_threshold)
        .collect();
    // Highest IoU first; ties by ids so the result is deterministic.
    pairs.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
    let record = |source, id: u32, size: usize, bbox_voxel, centroid_mm, conf| LesionRecord {
        case: case.to_string(),
        class,
        source,
        id,
        voxels: size,
        volume_mm3: size as f64 * voxel_mm3,
        bbox_voxel,
        centroid_mm,
        contrast_to_noise: None,
        polarity: None,
        matched: None,
        iou: 0.0,
        dice: 0.0,
        confidence: conf,
    };
    let mut m = LesionMatch {
        truth: ct
            .sizes
            .iter()
            .enumerate()
            .map(|(n, &s)| {
                record(
                    "truth",
                    n as u32 + 1,
                    s,
                    truth_boxes[n],
                    truth_centres[n],
                    f64::NAN,
                )
            })
            .collect(),
        pred: cp
            .sizes
            .iter()
            .enumerate()
            .map(|(n, &s)| {
                let conf = confidence(&members[n], pred_boxes[n]);
                record(
                    "pred",
                    n as u32 + 1,
                    s,
                    pred_boxes[n],
                    pred_centres[n],
                    conf,
                )
            })
            .collect(),
    };
    for (iou, a, b, inter) in pairs {
        let (ta, pb) = (a as usize - 1, b as usize - 1);
        if m.truth[ta].matched.is_some() || m.pred[pb].matched.is_some() {
            continue;
        }
        let dice = 2.0 * inter as f64 / (m.truth[ta].voxels + m.pred[pb].voxels) as f64;
        for (r, other) in [(&mut m.truth[ta], b), (&mut m.pred[pb], a)] {
            r.matched = Some(other);
            r.iou = iou;
            r.dice = dice;
        }
    }
    m
}

/// Sensitivity, precision and F1 from counts (NaN when undefined).
pub fn detection_scores(tp: usize, fp: usize, fn_: usize) -> (f64, f64, f64) {
    let div = |a: usize, b: usize| {
        if b == 0 {
            f64::NAN
        } else {
            a as f64 / b as f64
        }
    };
    let sensitivity = div(tp, tp + fn_);
    let precision = div(tp, tp + fp);
    let f1 = div(2 * tp, 2 * tp + fp + fn_);
    (sensitivity, precision, f1)
}

/// False positives per scan at which FROC sensitivity is read (the LUNA16 / CAMELYON points).
pub const FROC_FP_RATES: [f64; 7] = [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0];

/// FROC from all predicted lesions (`(confidence, is_true_positive)`), the number of truth lesions
/// and scans: the curve `(fp_per_scan, sensitivity)` over confidence thresholds, the sensitivity at
/// each of [`FROC_FP_RATES`] (best operating point with at most that many FP per scan), and their
/// mean (the competition performance metric).
pub fn froc(
    predictions: &[(f64, bool)],
    truth_lesions: usize,
    scans: usize,
) -> (Vec<(f64, f64)>, Vec<f64>, f64) {
    let mut sorted: Vec<(f64, bool)> = predictions.to_vec();
    sorted.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut curve = vec![(0.0, 0.0)];
    let (mut tp, mut fp) = (0usize, 0usize);
    let mut i = 0;
    while i < sorted.len() {
        // All predictions at one confidence enter together.
        let c = sorted[i].0;
        while i < sorted.len() && sorted[i].0 == c {
            if sorted[i].1 {
                tp += 1
            } else {
                fp += 1
            }
            i += 1;
        }
        curve.push((
            fp as f64 / scans.max(1) as f64,
            if truth_lesions == 0 {
                f64::NAN
            } else {
                tp as f64 / truth_lesions as f64
            },
        ));
    }
    let at: Vec<f64> = FROC_FP_RATES
        .iter()
        .map(|&rate| {
            curve
                .iter()
                .filter(|(f, _)| *f <= rate)
                .map(|(_, s)| *s)
                .fold(0.0, f64::max)
        })
        .collect();
    let mean = at.iter().sum::<f64>() / at.len() as f64;
    (curve, at, mean)
}

/// A lesion record of class 1 with only what the detection counts read set (tests of the
/// modules that pool them).
#[cfg(test)]
pub(crate) fn test_record(
    case: &str,
    source: &'static str,
    id: u32,
    matched: Option<u32>,
) -> LesionRecord {
    LesionRecord {
        case: case.into(),
        class: 1,
        source,
        id,
        voxels: 10,
        volume_mm3: 10.0,
        bbox_voxel: [[0; 3]; 2],
        centroid_mm: [0.0; 3],
        contrast_to_noise: None,
        polarity: None,
        matched,
        iou: 0.0,
        dice: 0.0,
        confidence: 1.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2 mm along i, so a centroid in mm is twice its voxel index, shifted by the origin.
    const GRID: LesionGrid = LesionGrid {
        dims: [1, 1, 10],
        voxel_mm3: 2.0,
        affine: [
            [2.0, 0.0, 0.0, -5.0],
            [0.0, 1.0, 0.0, 3.0],
            [0.0, 0.0, 1.0, 7.0],
            [0.0, 0.0, 0.0, 1.0],
        ],
    };

    #[test]
    fn matching_is_one_to_one_by_best_overlap() {
        // 1 × 1 × 10 line: truth lesions [0..3) and [5..8); prediction [1..4) and [9..10).
        let t: Vec<bool> = (0..10).map(|i| i < 3 || (5..8).contains(&i)).collect();
        let p: Vec<bool> = (0..10).map(|i| (1..4).contains(&i) || i == 9).collect();
        let m = match_lesions("c", 1, &t, &p, GRID, 0.0, &|_, _| 1.0);
        assert_eq!((m.tp(), m.fp(), m.fn_()), (1, 1, 1));
        assert_eq!(m.truth[0].matched, Some(1));
        assert!((m.truth[0].iou - 0.5).abs() < 1e-12); // 2 shared of 4
        assert!((m.truth[0].dice - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(m.truth[1].volume_mm3, 6.0);
        // Boxes in (i, j, k): the line runs along i.
        assert_eq!(m.truth[1].bbox_voxel, [[5, 0, 0], [7, 0, 0]]);
        assert_eq!(m.pred[1].bbox_voxel, [[9, 0, 0], [9, 0, 0]]);
        // Centroids: voxels 5..8 have mean i = 6 → x = 2·6 − 5 = 7; voxel 9 → 13.
        assert_eq!(m.truth[1].centroid_mm, [7.0, 3.0, 7.0]);
        assert_eq!(m.pred[1].centroid_mm, [13.0, 3.0, 7.0]);
        // A higher IoU threshold rejects the pair.
        let m = match_lesions("c", 1, &t, &p, GRID, 0.6, &|_, _| 1.0);
        assert_eq!(m.tp(), 0);
    }

    #[test]
    fn froc_reads_sensitivity_at_fp_rates() {
        // 2 scans, 4 truth lesions; predictions by confidence: TP .9, FP .8, TP .7, FP .6, FP .5
        let preds = [
            (0.9, true),
            (0.8, false),
            (0.7, true),
            (0.6, false),
            (0.5, false),
        ];
        let (curve, at, mean) = froc(&preds, 4, 2);
        assert_eq!(curve.last().unwrap(), &(1.5, 0.5));
        // ≤ 1/8 and 1/4 FP/scan: only the first TP (0.25); ≤ 0.5: up to .8 and .7 → 0.5
        assert_eq!(at, vec![0.25, 0.25, 0.5, 0.5, 0.5, 0.5, 0.5]);
        assert!((mean - 3.0 / 7.0).abs() < 1e-12);
        assert_eq!(detection_scores(2, 3, 2), (0.5, 0.4, 4.0 / 9.0));
    }
}
