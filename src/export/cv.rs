//! What a cross-validation run writes beside its folds: the out-of-fold predictions (every
//! training case segmented by the one fold that did not train on it, on its own grid) and the
//! postprocessing chosen on them, stored in the parent's `[segment]` settings.

use crate::config::{MinConfidence, RunConfig};
use crate::data::dataset::{LabelMap, Split};
use crate::data::manifest::Manifest;
use crate::error::{Error, Result};
use crate::eval::search::{
    read_oof_cases, search_postprocessing, Objective, Postprocessing, SearchSpace, Setting,
};
use crate::infer::batch::{run_batch, BatchEvent, BatchInput, BatchOptions, CaseInput};
use crate::infer::postprocess::LesionFilter;
use crate::infer::predictor::Predictor;
use crate::io::layout::{BatchSummary, CaseOutputs, CvRun};
use crate::io::{read_json, write_atomically, write_json_atomically};

use super::dicom::DicomExport;
use super::segment_case;

/// The training cases the run's `[data]` names.
fn read_manifest(config: &RunConfig) -> Result<Manifest> {
    Ok(crate::data::dataset::read_manifest(&config.data)?.1)
}

/// Segments fold `fold`'s validation cases with its own model into `cv.oof()`: masks before any
/// component filtering (the search applies it) and foreground (and finding class)
/// probabilities. Cases already written are skipped, so an interrupted run resumes.
pub fn segment_out_of_fold(
    cv: &CvRun,
    fold: usize,
    on_event: &mut dyn FnMut(BatchEvent),
) -> Result<BatchSummary> {
    let run = cv.fold(fold);
    let split: Split = read_json(&run.split())?;
    let config = RunConfig::load(Some(&run.config()), &[])?;
    let cases: Vec<BatchInput> = read_manifest(&config)?
        .cases
        .into_iter()
        .filter(|c| split.validation.contains(&c.id))
        .map(|c| BatchInput {
            origin: c
                .images
                .first()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            name: c.id,
            input: CaseInput::Channels(c.images),
        })
        .collect();
    let unfiltered = [
        "segment.min_lesion_mm3=0".into(),
        "segment.keep_largest=[]".into(),
        // Every finding with its confidence: the search chooses the ensemble's cut-off.
        "segment.min_confidence=0".into(),
    ];
    let predictor = Predictor::load(&run.root, None, &unfiltered)?;
    let filter = predictor.lesion_filter()?;
    let dicom = DicomExport::new(
        &predictor.labels,
        &predictor.config.data.label_codes,
        predictor.config.segment.rtstruct_rois,
        &format!("fold_{fold}"),
        None,
    );
    let dir = cv.oof();
    let outputs = |name: &str| CaseOutputs::new(&dir, name, true, false);
    let total = cases.len();
    run_batch(
        cases,
        total,
        &dir,
        &BatchOptions {
            skip_existing: true,
            ..BatchOptions::default()
        },
        &|case| outputs(&case.name).complete(false),
        &mut |case, scan, stages| {
            let out = outputs(&case.name);
            segment_case(&predictor, &filter, &out, case, &scan, &dicom, stages)
        },
        on_event,
    )
}

/// How each foreground class of `config` is scored: organs (by their DICOM category) by Dice,
/// findings by lesion F1.
pub fn objectives(config: &RunConfig) -> Vec<Objective> {
    let findings = config.data.finding_classes();
    (1..config.data.labels.len() as u32)
        .map(|c| {
            if findings.contains(&c) {
                Objective::LesionF1
            } else {
                Objective::Dice
            }
        })
        .collect()
}

/// Searches the postprocessing on every out-of-fold prediction of `cv`, writes the result to
/// `postprocessing.json` and the chosen setting into the parent's `[segment]`, which `medseg
/// segment --model PARENT` then uses.
pub fn choose_postprocessing(cv: &CvRun) -> Result<Postprocessing> {
    let mut config = RunConfig::load(Some(&cv.config()), &[])?;
    let truth: Vec<(String, std::path::PathBuf)> = read_manifest(&config)?
        .cases
        .into_iter()
        .filter(|c| {
            CaseOutputs::new(&cv.oof(), &c.id, false, false)
                .mask
                .is_file()
        })
        .filter_map(|c| Some((c.id, c.label?)))
        .collect();
    if truth.is_empty() {
        return Err(Error::NothingFound {
            path: cv.oof(),
            detail: " (no out-of-fold predictions of a labelled case)".into(),
        });
    }
    let labels = LabelMap::new(config.data.labels.len(), &config.data.label_values);
    let segment = &config.segment;
    let space = SearchSpace::default();
    let floor = space
        .thresholds
        .iter()
        .copied()
        .fold(segment.threshold, f64::min);
    let findings = config.data.finding_classes();
    let cases = read_oof_cases(&cv.oof(), &truth, &labels, &findings, floor)?;
    // A rerun starts where the first search did, not from what it chose: the search prefers
    // settings near its start.
    #[derive(serde::Deserialize)]
    struct Earlier {
        before: Setting,
    }
    let start = match read_json::<Earlier>(&cv.postprocessing()) {
        Ok(earlier) => earlier.before,
        Err(_) => Setting {
            threshold: segment.threshold,
            min_lesion_mm3: segment.min_lesion_mm3,
            keep_largest: segment.keep_largest.clone(),
            // A fold ensemble has no fitted operating point of its own: no cut-off to start from.
            min_confidence: match segment.min_confidence {
                MinConfidence::Value(c) => c,
                MinConfidence::Named(_) => 0.0,
            },
        },
    };
    let filter = LesionFilter::from_config(segment, &config.data.labels)?;
    let found = search_postprocessing(
        &cases,
        &config.data.labels,
        &objectives(&config),
        &filter,
        &start,
        &space,
    )?;
    write_json_atomically(&cv.postprocessing(), &found)?;
    config.segment.threshold = found.chosen.threshold;
    config.segment.min_lesion_mm3 = found.chosen.min_lesion_mm3;
    config.segment.keep_largest = found.chosen.keep_largest.clone();
    config.segment.min_confidence = MinConfidence::Value(found.chosen.min_confidence);
    write_atomically(&cv.config(), config.to_toml()?.as_bytes())?;
    Ok(found)
}
