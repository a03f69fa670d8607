//! Two sets of predictions of the same cases against the same truth, paired by case: each class's
//! mean Dice, HD95 and NSD and each lesion class's F1, sensitivity, precision and false positives
//! per scan, for both, their difference, and the difference's 95 % interval over case resamples.
//! Both sets are scored on the same resampled cases (a paired bootstrap), so what a case does to
//! both cancels: the interval is that of the difference, narrower than either score's own.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::lesions::detection_scores;
use super::CaseResult;
use crate::error::Result;
use crate::infer::operating_point::case_resamples;
use crate::io::{write_atomically, write_json_atomically};
use crate::transforms::intensity::percentile;

/// A compared quantity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Mean Dice over cases.
    Dice,
    /// Mean 95th-percentile Hausdorff distance (mm) over the cases where both sets have one (it
    /// is undefined where a mask is empty).
    Hd95,
    /// Mean normalised surface Dice over the cases where both sets have one.
    Nsd,
    /// Lesion F1 of the counts summed over cases.
    LesionF1,
    /// Detected truth lesions over truth lesions.
    Sensitivity,
    /// True findings over findings.
    Precision,
    /// False positives per scan.
    FpPerScan,
}

impl Metric {
    fn higher_is_better(self) -> bool {
        !matches!(self, Metric::FpPerScan | Metric::Hd95)
    }

    /// A surface distance: compared on the cases where both sets have it, so that a set is not
    /// rewarded for the cases where its mask is empty and the distance undefined.
    fn surface(self) -> bool {
        matches!(self, Metric::Hd95 | Metric::Nsd)
    }

    /// How the report names it.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Dice => "Dice",
            Metric::Hd95 => "HD95 (mm)",
            Metric::Nsd => "NSD",
            Metric::LesionF1 => "lesion F1",
            Metric::Sensitivity => "sensitivity",
            Metric::Precision => "precision",
            Metric::FpPerScan => "FP per scan",
        }
    }
}

/// What the interval says about the difference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The interval lies wholly on the better side of 0.
    Better,
    /// Wholly on the worse side.
    Worse,
    /// It holds 0: the cases cannot tell the two apart.
    WithinNoise,
}

impl Verdict {
    /// How the report says it (of A, the evaluated predictions).
    pub fn describe(self) -> &'static str {
        match self {
            Verdict::Better => "better",
            Verdict::Worse => "worse",
            Verdict::WithinNoise => "within the noise",
        }
    }
}

/// One metric of one class for both sets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricComparison {
    /// The class's label value.
    pub class: u32,
    /// Its name.
    pub label: String,
    /// The quantity.
    pub metric: Metric,
    /// The evaluated predictions' value (`--pred`).
    pub pred: f64,
    /// The other predictions' value (`--compare`).
    pub other: f64,
    /// `pred - other`.
    pub difference: f64,
    /// The 2.5th and 97.5th percentiles of the difference over the case resamples (null with
    /// fewer than two cases).
    pub interval: Option<[f64; 2]>,
    /// For `pred` against `other`, by the interval.
    pub verdict: Verdict,
}

/// `comparison.json`: the paired comparison of `--pred` with `--compare`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// Cases scored in both sets.
    pub cases: usize,
    /// Cases scored in only one of them (one failed), left out of every figure.
    pub unpaired: Vec<String>,
    /// Case resamples behind each interval.
    pub resamples: usize,
    /// Every class and metric.
    pub metrics: Vec<MetricComparison>,
}

/// One case's figures for one class: Dice, HD95 and NSD (when the class is scored by overlap,
/// each `None` where undefined) and lesion counts (TP, FP, FN; when it is scored by lesions).
#[derive(Clone, Copy)]
struct CaseFigures {
    dice: Option<f64>,
    hd95: Option<f64>,
    nsd: Option<f64>,
    counts: Option<(usize, usize, usize)>,
}

impl CaseFigures {
    /// The per-case value of a metric averaged over cases.
    fn mean_of(&self, metric: Metric) -> Option<f64> {
        match metric {
            Metric::Dice => self.dice,
            Metric::Hd95 => self.hd95,
            Metric::Nsd => self.nsd,
            _ => None,
        }
    }
}

fn figures(result: &CaseResult, class: u32) -> CaseFigures {
    let metrics = result
        .classes
        .iter()
        .find(|(c, _)| *c == class)
        .map(|(_, m)| m);
    let finite = |f: fn(&crate::eval::metrics::ClassMetrics) -> f64| {
        metrics.map(f).filter(|v| v.is_finite())
    };
    CaseFigures {
        dice: finite(|m| m.dice),
        hd95: finite(|m| m.hd95_mm),
        nsd: finite(|m| m.nsd),
        counts: result
            .lesions
            .iter()
            .find(|(c, _)| *c == class)
            .map(|(_, m)| (m.tp(), m.fp(), m.fn_())),
    }
}

/// `metric` over the cases `pick` (a case may repeat) of one set; `None` where it is undefined
/// (no Dice, HD95 or NSD scored, no truth lesion for the sensitivity, no finding for the
/// precision).
fn value(metric: Metric, per_case: &[CaseFigures], pick: &[usize]) -> Option<f64> {
    let (tp, fp, fn_) = pick
        .iter()
        .filter_map(|&i| per_case[i].counts)
        .fold((0, 0, 0), |a, c| (a.0 + c.0, a.1 + c.1, a.2 + c.2));
    let (sensitivity, precision, f1) = detection_scores(tp, fp, fn_);
    let v = match metric {
        Metric::Dice | Metric::Hd95 | Metric::Nsd => {
            let d: Vec<f64> = pick
                .iter()
                .filter_map(|&i| per_case[i].mean_of(metric))
                .collect();
            if d.is_empty() {
                return None;
            }
            d.iter().sum::<f64>() / d.len() as f64
        }
        // No lesion in the truth and none found (a resample of lesion-free cases) is a perfect
        // score, as the postprocessing search counts it, not an undefined one.
        Metric::LesionF1 if tp + fp + fn_ == 0 => 1.0,
        Metric::LesionF1 => f1,
        Metric::Sensitivity => sensitivity,
        Metric::Precision => precision,
        Metric::FpPerScan => fp as f64 / pick.len().max(1) as f64,
    };
    v.is_finite().then_some(v)
}

/// Compares `pred` with `other`, case by case; `labels` names the classes. A case in only one of
/// them is listed as unpaired and left out.
pub fn compare(
    pred: &[CaseResult],
    other: &[CaseResult],
    labels: impl Fn(u32) -> String,
) -> Comparison {
    let by_case: BTreeMap<&str, &CaseResult> = other.iter().map(|r| (r.case.as_str(), r)).collect();
    let paired: Vec<(&CaseResult, &CaseResult)> = pred
        .iter()
        .filter_map(|r| by_case.get(r.case.as_str()).map(|o| (r, *o)))
        .collect();
    let in_pred: std::collections::BTreeSet<&str> = pred.iter().map(|r| r.case.as_str()).collect();
    let unpaired: Vec<String> = pred
        .iter()
        .map(|r| r.case.as_str())
        .filter(|c| !by_case.contains_key(c))
        .chain(
            other
                .iter()
                .map(|r| r.case.as_str())
                .filter(|c| !in_pred.contains(c)),
        )
        .map(String::from)
        .collect();
    let mut classes: Vec<u32> = paired
        .iter()
        .flat_map(|(a, b)| {
            a.classes
                .iter()
                .map(|(c, _)| *c)
                .chain(a.lesions.iter().map(|(c, _)| *c))
                .chain(b.classes.iter().map(|(c, _)| *c))
                .chain(b.lesions.iter().map(|(c, _)| *c))
        })
        .collect();
    classes.sort_unstable();
    classes.dedup();
    let resamples = case_resamples(paired.len());
    let all: Vec<usize> = (0..paired.len()).collect();
    let mut metrics = Vec::new();
    for class in classes {
        let mine: Vec<CaseFigures> = paired.iter().map(|(a, _)| figures(a, class)).collect();
        let theirs: Vec<CaseFigures> = paired.iter().map(|(_, b)| figures(b, class)).collect();
        let overlap = mine.iter().chain(&theirs).any(|f| f.dice.is_some());
        let lesions = mine.iter().chain(&theirs).any(|f| f.counts.is_some());
        let wanted = [
            (Metric::Dice, overlap),
            (Metric::Hd95, overlap),
            (Metric::Nsd, overlap),
            (Metric::LesionF1, lesions),
            (Metric::Sensitivity, lesions),
            (Metric::Precision, lesions),
            (Metric::FpPerScan, lesions),
        ];
        for (metric, scored) in wanted {
            if !scored {
                continue;
            }
            // A surface distance is paired on the cases where both sets have it.
            let paired_on = |pick: &[usize]| -> Vec<usize> {
                pick.iter()
                    .copied()
                    .filter(|&i| {
                        !metric.surface()
                            || (mine[i].mean_of(metric).is_some()
                                && theirs[i].mean_of(metric).is_some())
                    })
                    .collect()
            };
            let both = paired_on(&all);
            let (Some(a), Some(b)) = (value(metric, &mine, &both), value(metric, &theirs, &both))
            else {
                continue;
            };
            let mut diffs: Vec<f64> = resamples
                .iter()
                .filter_map(|pick| {
                    let pick = paired_on(pick);
                    Some(value(metric, &mine, &pick)? - value(metric, &theirs, &pick)?)
                })
                .collect();
            let interval = (diffs.len() >= 2)
                .then(|| [percentile(&mut diffs, 2.5), percentile(&mut diffs, 97.5)]);
            let verdict = verdict_of(interval, metric.higher_is_better());
            metrics.push(MetricComparison {
                class,
                label: labels(class),
                metric,
                pred: a,
                other: b,
                difference: a - b,
                interval,
                verdict,
            });
        }
    }
    Comparison {
        cases: paired.len(),
        unpaired,
        resamples: resamples.len(),
        metrics,
    }
}

/// Better or worse when the whole interval lies on one side of 0.
fn verdict_of(interval: Option<[f64; 2]>, higher_is_better: bool) -> Verdict {
    let higher = match interval {
        Some([lo, _]) if lo > 0.0 => true,
        Some([_, hi]) if hi < 0.0 => false,
        _ => return Verdict::WithinNoise,
    };
    if higher == higher_is_better {
        Verdict::Better
    } else {
        Verdict::Worse
    }
}

impl Comparison {
    /// Writes `comparison.json` and `comparison.md` into `dir`, beside the evaluation's report;
    /// `pred` and `other` name the two sets in the table.
    pub fn write(&self, dir: &Path, pred: &str, other: &str) -> Result<()> {
        write_json_atomically(&dir.join("comparison.json"), self)?;
        write_atomically(
            &dir.join("comparison.md"),
            self.markdown(pred, other).as_bytes(),
        )
    }

    /// `comparison.md`: one table row per class and metric, `pred` and `other` named by their
    /// directories.
    pub fn markdown(&self, pred: &str, other: &str) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "# Paired comparison\n");
        let _ = writeln!(
            md,
            "A: `{pred}`; B: `{other}`. {} cases scored in both; each interval is the 2.5th to \
             97.5th percentile of A − B over {} resamples of those cases, both sets scored on the \
             same resample (a paired bootstrap). *better* or *worse* (for A) only when the whole \
             interval lies on one side of 0.\n",
            self.cases, self.resamples
        );
        if !self.unpaired.is_empty() {
            let _ = writeln!(
                md,
                "Left out, scored in only one set: {}.\n",
                self.unpaired.join(", ")
            );
        }
        let _ = writeln!(
            md,
            "| class | metric | A | B | A − B | 95 % interval | A is |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|");
        for m in &self.metrics {
            let interval = m
                .interval
                .map_or("-".into(), |[lo, hi]| format!("[{lo:+.3}, {hi:+.3}]"));
            let verdict = m.verdict.describe();
            let _ = writeln!(
                md,
                "| {} {} | {} | {:.3} | {:.3} | {:+.3} | {interval} | {verdict} |",
                m.class,
                m.label,
                m.metric.name(),
                m.pred,
                m.other,
                m.difference
            );
        }
        md
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::lesions::{test_record, LesionMatch};
    use crate::eval::metrics::ClassMetrics;

    /// A case whose class 1 has Dice `dice` and whose lesions of class 1 are `tp` found, `fp`
    /// false and `fn_` missed.
    fn case(name: &str, dice: f64, tp: usize, fp: usize, fn_: usize) -> CaseResult {
        let record = |matched: Option<u32>| test_record(name, "truth", 1, matched);
        let truth = (0..tp)
            .map(|i| record(Some(i as u32 + 1)))
            .chain((0..fn_).map(|_| record(None)))
            .collect();
        let pred = (0..tp)
            .map(|i| record(Some(i as u32 + 1)))
            .chain((0..fp).map(|_| record(None)))
            .collect();
        CaseResult {
            case: name.into(),
            missing_prediction: false,
            classes: vec![(
                1,
                ClassMetrics {
                    dice,
                    iou: f64::NAN,
                    precision: f64::NAN,
                    recall: f64::NAN,
                    truth_mm3: 0.0,
                    pred_mm3: 0.0,
                    volume_difference_mm3: 0.0,
                    relative_volume_difference: f64::NAN,
                    hd95_mm: f64::NAN,
                    assd_mm: f64::NAN,
                    nsd: f64::NAN,
                },
            )],
            lesions: vec![(1, LesionMatch { truth, pred })],
            dims: [1, 1, 1],
            slice_thickness_mm: None,
        }
    }

    /// `case` with class 1's HD95 and NSD set.
    fn surface_case(name: &str, hd95: f64, nsd: f64) -> CaseResult {
        let mut c = case(name, 0.5, 1, 0, 0);
        c.classes[0].1.hd95_mm = hd95;
        c.classes[0].1.nsd = nsd;
        c
    }

    /// HD95 is compared on the cases where both sets have one, lower is better; NSD (0 where one
    /// mask is empty) on every case.
    #[test]
    fn surface_distances_are_paired_where_both_are_defined() {
        let name = |i: usize| format!("c{i:02}");
        let mut a: Vec<CaseResult> = (0..12)
            .map(|i| surface_case(&name(i), 2.0 + 0.1 * (i % 3) as f64, 0.9))
            .collect();
        let mut b: Vec<CaseResult> = (0..12)
            .map(|i| surface_case(&name(i), 5.0 + 0.1 * (i % 3) as f64, 0.6))
            .collect();
        // Case 0: A predicted nothing (no HD95, NSD 0); B is far off there.
        a[0] = surface_case(&name(0), f64::NAN, 0.0);
        b[0] = surface_case(&name(0), 100.0, 0.6);
        let c = compare(&a, &b, |c| format!("class{c}"));
        let hd = find(&c, Metric::Hd95);
        assert!((hd.difference + 3.0).abs() < 1e-9, "{hd:?}");
        assert!(hd.other < 6.0, "B's case 0 was not left out: {hd:?}");
        let [lo, hi] = hd.interval.unwrap();
        assert!((lo + 3.0).abs() < 1e-9 && (hi + 3.0).abs() < 1e-9, "{hd:?}");
        assert_eq!(hd.verdict, Verdict::Better);
        let nsd = find(&c, Metric::Nsd);
        assert!(
            (nsd.difference - (11.0 * 0.3 - 0.6) / 12.0).abs() < 1e-9,
            "{nsd:?}"
        );
        assert_eq!(nsd.verdict, Verdict::Better);
        let back = compare(&b, &a, |c| format!("class{c}"));
        assert_eq!(find(&back, Metric::Hd95).verdict, Verdict::Worse);
        assert!(c.markdown("a", "b").contains("| 1 class1 | HD95 (mm) |"));
    }

    fn find(c: &Comparison, metric: Metric) -> &MetricComparison {
        c.metrics.iter().find(|m| m.metric == metric).unwrap()
    }

    #[test]
    fn a_set_better_on_every_case_is_better_and_identical_sets_are_within_the_noise() {
        let a: Vec<CaseResult> = (0..20)
            .map(|i| case(&format!("c{i:02}"), 0.7 + 0.01 * (i % 5) as f64, 3, 0, 1))
            .collect();
        let b: Vec<CaseResult> = (0..20)
            .map(|i| case(&format!("c{i:02}"), 0.6 + 0.01 * (i % 5) as f64, 2, 1, 2))
            .collect();
        let c = compare(&a, &b, |c| format!("class{c}"));
        assert_eq!(c.cases, 20);
        assert!(c.unpaired.is_empty());
        let dice = find(&c, Metric::Dice);
        assert!((dice.difference - 0.1).abs() < 1e-9, "{dice:?}");
        // Every case is 0.1 ahead: every resample's difference is 0.1.
        let [lo, hi] = dice.interval.unwrap();
        assert!((lo - 0.1).abs() < 1e-9 && (hi - 0.1).abs() < 1e-9);
        assert_eq!(dice.verdict, Verdict::Better);
        // A: 60 TP, 0 FP, 20 FN; B: 40 TP, 20 FP, 40 FN.
        let f1 = find(&c, Metric::LesionF1);
        assert!((f1.pred - 120.0 / 140.0).abs() < 1e-9, "{f1:?}");
        assert!((f1.other - 80.0 / 140.0).abs() < 1e-9, "{f1:?}");
        assert_eq!(f1.verdict, Verdict::Better);
        // Fewer false positives is better, though the difference is negative.
        let fp = find(&c, Metric::FpPerScan);
        assert!((fp.difference + 1.0).abs() < 1e-9);
        assert_eq!(fp.verdict, Verdict::Better);
        // The other way round, every verdict flips.
        let back = compare(&b, &a, |c| format!("class{c}"));
        assert!(back.metrics.iter().all(|m| m.verdict == Verdict::Worse));

        let same = compare(&a, &a, |c| format!("class{c}"));
        for m in &same.metrics {
            assert_eq!(m.difference, 0.0);
            assert_eq!(m.verdict, Verdict::WithinNoise, "{m:?}");
        }
    }

    #[test]
    fn a_lead_from_one_case_is_within_the_noise_and_unpaired_cases_are_left_out() {
        // Equal on 9 cases; A finds 3 more lesions on one: the resamples without that case see
        // no difference.
        let mut a: Vec<CaseResult> = (0..10)
            .map(|i| case(&format!("c{i}"), 0.5, 1, 1, 1))
            .collect();
        a[3] = case("c3", 0.5, 4, 1, 0);
        let mut b: Vec<CaseResult> = (0..10)
            .map(|i| case(&format!("c{i}"), 0.5, 1, 1, 1))
            .collect();
        b[3] = case("c3", 0.5, 1, 1, 3);
        a.push(case("only-a", 1.0, 5, 0, 0));
        b.push(case("only-b", 0.0, 0, 5, 5));
        let c = compare(&a, &b, |c| format!("class{c}"));
        assert_eq!(c.cases, 10);
        assert_eq!(c.unpaired, vec!["only-a".to_string(), "only-b".to_string()]);
        let s = find(&c, Metric::Sensitivity);
        assert!((s.difference - 3.0 / 22.0).abs() < 1e-9, "{s:?}");
        let [lo, hi] = s.interval.unwrap();
        assert!(lo <= 0.0 && hi > 0.0, "{s:?}");
        assert_eq!(s.verdict, Verdict::WithinNoise);
        // Dice is equal everywhere.
        assert_eq!(find(&c, Metric::Dice).difference, 0.0);
        let md = c.markdown("a", "b");
        assert!(md.contains("| 1 class1 | sensitivity |"), "{md}");
        assert!(md.contains("only-a, only-b"), "{md}");
    }
}
