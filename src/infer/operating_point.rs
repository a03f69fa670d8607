//! The findings' operating point: the lowest confidence (a finding's highest probability) that a
//! reported finding must reach, chosen at the end of training where lesion F1 on the validation
//! cases is highest beyond their noise (the one-standard-error rule). The sliding window's softmax of small models is often confident on a few
//! true lesions and lukewarm on many false positives; a cut-off on the confidence trades the two,
//! and validation, not the test set, says where.

use serde::{Deserialize, Serialize};

use crate::transforms::post::connected_components;

/// The cut-offs tried: none, then 0.50 to 0.95 in steps of 0.05 (a two-class model's findings
/// reach 0.5 by construction, and an argmax of more classes rarely yields one below it).
pub const CANDIDATES: [f64; 11] = [0.0, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95];

/// What the findings of the validation cases were, for choosing the cut-off.
#[derive(Debug, Clone, Default)]
pub struct Findings {
    /// Per predicted finding: its confidence and whether it touches a truth lesion.
    pub predicted: Vec<(f64, bool)>,
    /// Per truth lesion: the highest confidence of the findings touching it (`None`: missed).
    pub truth: Vec<Option<f64>>,
    /// Where each case's findings and lesions start in `predicted` and `truth`, for resampling
    /// cases.
    pub starts: Vec<(usize, usize)>,
}

/// Case resamples behind the noise of a score difference.
const BOOTSTRAP: usize = 500;

/// [`BOOTSTRAP`] resamples of `n` cases with replacement, seeded so a rerun chooses the same;
/// none for fewer than two cases, which have no noise to estimate. The postprocessing search of
/// a cross-validation (`eval::search`) draws the same.
pub fn case_resamples(n: usize) -> Vec<Vec<usize>> {
    use rand::{RngExt, SeedableRng};
    if n < 2 {
        return Vec::new();
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    (0..BOOTSTRAP)
        .map(|_| (0..n).map(|_| rng.random_range(0..n)).collect())
        .collect()
}

/// The sample standard deviation (0 for fewer than two values).
pub fn standard_deviation(v: &[f64]) -> f64 {
    if v.len() < 2 {
        return 0.0;
    }
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
}

/// Lesion detection at one cut-off.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    /// The cut-off.
    pub min_confidence: f64,
    /// Truth lesions touched by a finding at or above it.
    pub detected: usize,
    /// Findings at or above it.
    pub findings: usize,
    /// Of those, findings touching no truth lesion.
    pub false_positives: usize,
    /// Lesion F1: the harmonic mean of sensitivity and precision (0 when either is).
    pub f1: f64,
}

/// `operating_point.json` in a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperatingPoint {
    /// The chosen cut-off (`segment.min_confidence = "fitted"`).
    pub min_confidence: f64,
    /// Validation cases scored.
    pub cases: usize,
    /// Truth lesions in them.
    pub truth_lesions: usize,
    /// Every cut-off tried, the chosen one among them; the first is no cut-off.
    pub tried: Vec<Detection>,
}

impl OperatingPoint {
    /// Detection at the chosen cut-off.
    pub fn chosen(&self) -> Option<&Detection> {
        self.tried
            .iter()
            .find(|d| d.min_confidence == self.min_confidence)
    }

    /// Detection with no cut-off.
    pub fn without(&self) -> Option<&Detection> {
        self.tried.first()
    }
}

impl Findings {
    /// Adds one case's class: `truth` and `pred` (after every other filter) are masks of
    /// `dims` (`[k, j, i]`), `probability` the class's probability per voxel. Findings and
    /// lesions are 26-connected components; a finding touching a lesion detects it.
    pub fn add(&mut self, truth: &[bool], pred: &[bool], probability: &[f32], dims: [usize; 3]) {
        let t = connected_components(truth, dims);
        let p = connected_components(pred, dims);
        let mut confidence = vec![0f32; p.count()];
        let mut hits = vec![false; p.count()];
        let mut touching: Vec<Vec<usize>> = vec![Vec::new(); t.count()];
        for (v, &id) in p.labels.iter().enumerate() {
            if id == 0 {
                continue;
            }
            let f = id as usize - 1;
            confidence[f] = confidence[f].max(probability[v]);
            if t.labels[v] > 0 {
                hits[f] = true;
                touching[t.labels[v] as usize - 1].push(f);
            }
        }
        self.predicted
            .extend(confidence.iter().zip(&hits).map(|(c, h)| (*c as f64, *h)));
        self.truth.extend(touching.iter().map(|fs| {
            fs.iter()
                .map(|f| confidence[*f] as f64)
                .max_by(f64::total_cmp)
        }));
    }

    /// Marks the start of the next case (call before its [`Findings::add`]s).
    pub fn next_case(&mut self) {
        self.starts.push((self.predicted.len(), self.truth.len()));
    }

    /// Cases marked with [`Findings::next_case`].
    pub fn cases(&self) -> usize {
        self.starts.len()
    }

    /// Detection at cut-off `min_confidence`.
    pub fn at(&self, min_confidence: f64) -> Detection {
        let counts = Counts::of(&self.predicted, &self.truth, min_confidence);
        Detection {
            min_confidence,
            detected: counts.detected,
            findings: counts.findings,
            false_positives: counts.findings - counts.true_findings,
            f1: counts.f1(),
        }
    }

    /// The cut-off of [`CANDIDATES`]: the lowest whose lesion F1 is within one bootstrap standard
    /// error (cases resampled) of the best's, so that a few validation cases do not push the
    /// cut-off up for a gain they cannot tell from noise. Without case boundaries, or with fewer
    /// than two cases, the best (the lowest among equals).
    pub fn choose(&self) -> OperatingPoint {
        let tried: Vec<Detection> = CANDIDATES.iter().map(|&c| self.at(c)).collect();
        let best = tried
            .iter()
            .fold(tried[0], |best, d| if d.f1 > best.f1 { *d } else { best });
        let resamples = case_resamples(self.cases());
        let chosen = if resamples.is_empty() {
            best
        } else {
            tried
                .iter()
                .find(|d| {
                    let diffs: Vec<f64> = resamples
                        .iter()
                        .map(|picks| {
                            self.pooled(picks, best.min_confidence).f1()
                                - self.pooled(picks, d.min_confidence).f1()
                        })
                        .collect();
                    d.f1 >= best.f1 - standard_deviation(&diffs)
                })
                .copied()
                .unwrap_or(best)
        };
        OperatingPoint {
            min_confidence: chosen.min_confidence,
            cases: self.cases(),
            truth_lesions: self.truth.len(),
            tried,
        }
    }

    /// The counts at cut-off `cut` pooled over the cases `picks` (repeats counted each time).
    fn pooled(&self, picks: &[usize], cut: f64) -> Counts {
        picks.iter().fold(Counts::default(), |sum, &c| {
            let (p0, t0) = self.starts[c];
            let (p1, t1) = self
                .starts
                .get(c + 1)
                .copied()
                .unwrap_or((self.predicted.len(), self.truth.len()));
            sum.plus(Counts::of(
                &self.predicted[p0..p1],
                &self.truth[t0..t1],
                cut,
            ))
        })
    }
}

/// Pooled detection counts at one cut-off.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    truth: usize,
    detected: usize,
    findings: usize,
    true_findings: usize,
}

impl Counts {
    fn of(predicted: &[(f64, bool)], truth: &[Option<f64>], cut: f64) -> Counts {
        let kept = |c: f64| c >= cut;
        Counts {
            truth: truth.len(),
            detected: truth.iter().filter(|b| b.is_some_and(kept)).count(),
            findings: predicted.iter().filter(|(c, _)| kept(*c)).count(),
            true_findings: predicted.iter().filter(|(c, hit)| kept(*c) && *hit).count(),
        }
    }

    fn plus(self, o: Counts) -> Counts {
        Counts {
            truth: self.truth + o.truth,
            detected: self.detected + o.detected,
            findings: self.findings + o.findings,
            true_findings: self.true_findings + o.true_findings,
        }
    }

    /// Lesion F1 (0 when sensitivity and precision are).
    fn f1(self) -> f64 {
        let sensitivity = self.detected as f64 / self.truth.max(1) as f64;
        let precision = self.true_findings as f64 / self.findings.max(1) as f64;
        if sensitivity + precision > 0.0 {
            2.0 * sensitivity * precision / (sensitivity + precision)
        } else {
            0.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cut_off_with_the_best_f1_is_chosen_and_ties_keep_the_lower() {
        // Three lesions along i of a 1 × 1 × 20 line: found at 0.9375 and 0.875 (f32-exact), one
        // missed; findings touching none at 0.5625, 0.625 and 0.90625.
        let dims = [1, 1, 20];
        let mut truth = vec![false; 20];
        let mut pred = vec![false; 20];
        let mut prob = vec![0f32; 20];
        for (at, t, p, c) in [
            (0, true, true, 0.9375),
            (3, true, true, 0.875),
            (6, true, false, 0.0),
            (9, false, true, 0.5625),
            (12, false, true, 0.625),
            (15, false, true, 0.90625),
        ] {
            truth[at] = t;
            pred[at] = p;
            prob[at] = c;
        }
        let mut f = Findings::default();
        f.add(&truth, &pred, &prob, dims);
        assert_eq!(f.truth, vec![Some(0.9375), Some(0.875), None]);
        let none = f.at(0.0);
        assert_eq!(
            (none.detected, none.findings, none.false_positives),
            (2, 5, 3)
        );
        assert!((none.f1 - 0.5).abs() < 1e-12);
        // 0.65 drops two false positives: sensitivity 2/3, precision 2/3.
        let cut = f.at(0.65);
        assert_eq!((cut.detected, cut.findings, cut.false_positives), (2, 3, 1));
        assert!((cut.f1 - 2.0 / 3.0).abs() < 1e-12);
        // 0.9 loses a lesion and keeps a false positive.
        let high = f.at(0.9);
        assert_eq!(
            (high.detected, high.findings, high.false_positives),
            (1, 2, 1)
        );
        let chosen = f.choose();
        // 0.65 to 0.85 score the same; the lowest is taken.
        assert!(CANDIDATES[4..=8]
            .iter()
            .all(|c| (f.at(*c).f1 - cut.f1).abs() < 1e-12));
        assert_eq!(chosen.min_confidence, 0.65);
        assert_eq!(chosen.chosen().unwrap(), &cut);
        assert_eq!(chosen.without().unwrap(), &none);
        assert_eq!(
            (chosen.truth_lesions, chosen.tried.len()),
            (3, CANDIDATES.len())
        );
        // No findings at all: no cut-off.
        let empty = Findings {
            truth: vec![None],
            ..Findings::default()
        };
        assert_eq!(empty.choose().min_confidence, 0.0);
    }

    /// One case as a line of voxels: `lesions` (found at these confidences, or missed at 0) and
    /// false positives at these confidences.
    fn case(f: &mut Findings, lesions: &[f32], false_positives: &[f32]) {
        let n = 3 * (lesions.len() + false_positives.len());
        let (mut truth, mut pred, mut prob) = (vec![false; n], vec![false; n], vec![0f32; n]);
        for (k, c) in lesions.iter().chain(false_positives).enumerate() {
            truth[3 * k] = k < lesions.len();
            pred[3 * k] = *c > 0.0;
            prob[3 * k] = *c;
        }
        f.next_case();
        f.add(&truth, &pred, &prob, [1, 1, n]);
    }

    #[test]
    fn a_lead_within_the_noise_of_the_cases_keeps_the_lower_cut_off() {
        // Every case gains alike from dropping its false positive at 0.59: no noise, so the
        // lowest cut-off that drops them all is taken.
        let mut alike = Findings::default();
        for _ in 0..6 {
            case(&mut alike, &[0.9375], &[0.59375]);
        }
        assert_eq!(alike.cases(), 6);
        assert_eq!(alike.choose().min_confidence, 0.6);
        // One case's false positives and another's lesion make 0.7 the best (F1 0.8 against
        // 0.667 with no cut-off), but resampling the three cases swings that lead far more
        // than its size: no cut-off is kept.
        let mut noisy = Findings::default();
        case(&mut noisy, &[0.9375], &[0.6875, 0.6875, 0.6875]);
        case(&mut noisy, &[0.65625], &[]);
        case(&mut noisy, &[0.9375], &[]);
        let best = CANDIDATES
            .iter()
            .map(|c| noisy.at(*c))
            .fold(noisy.at(0.0), |b, d| if d.f1 > b.f1 { d } else { b });
        assert_eq!(best.min_confidence, 0.7);
        assert!((best.f1 - 0.8).abs() < 1e-12 && (noisy.at(0.0).f1 - 2.0 / 3.0).abs() < 1e-12);
        let chosen = noisy.choose();
        assert_eq!(chosen.min_confidence, 0.0);
        assert_eq!(chosen.tried.len(), CANDIDATES.len());
    }
}
