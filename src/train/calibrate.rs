//! Temperature scaling at the end of training: each finished checkpoint's logits on the
//! validation cases (the same windows validation uses, without blending, since `segment` divides
//! each window's logits before its softmax), sampled per voxel with foreground and background
//! stratified, fit one temperature; it is saved as the checkpoint's `calibration.json`. Then the
//! findings' operating point is chosen on the same cases (`operating_point.json`).

use std::sync::Arc;

use burn::prelude::*;

use crate::data::dataset::PreparedCase;
use crate::error::{Error, Result};
use crate::infer::calibration::{calibrate, Calibration, LogitSamples, StratifiedSampler};
use crate::infer::operating_point::{Findings, OperatingPoint};
use crate::infer::postprocess::{extract_lesions, LesionFilter, Probe};
use crate::infer::sliding_window::SlidingWindow;
use crate::io::layout::{CheckpointKind, RunDir};
use crate::io::write_json_atomically;
use crate::model::HybridSegNet;
use crate::transforms::post::{decide_classes, ClassRule};

/// Validation voxels sampled: background, foreground (a few hundred thousand in all).
const SAMPLES: [usize; 2] = [200_000, 100_000];

/// Logits and labels of validation voxels under `model`, stratified (see [`StratifiedSampler`]).
pub fn sample_logits(
    model: &HybridSegNet,
    cases: &[Arc<PreparedCase>],
    window: &SlidingWindow,
    device: &Device,
    seed: u64,
) -> Result<LogitSamples> {
    let mut sampler: Option<StratifiedSampler> = None;
    let [wd, wh, ww] = window.window;
    for case in cases {
        let tiling = window.tile(case.image.view())?;
        let [nd, nh, nw] = tiling.dims;
        for chunk in tiling.starts.chunks(window.batch_size.max(1)) {
            let logits = model
                .forward(window.window_input(&tiling, chunk, device))
                .logits;
            let k = logits.dims()[1];
            let values: Vec<f32> = logits.try_to_vec_as().map_err(|e| Error::Config {
                reason: format!("reading logits from the device: {e:?}"),
            })?;
            let sampler = sampler
                .get_or_insert_with(|| StratifiedSampler::new(k, SAMPLES[0], SAMPLES[1], seed));
            let plane = wh * ww;
            let per_window = k * wd * plane;
            for (n, &[d, h, w]) in chunk.iter().enumerate() {
                let win = &values[n * per_window..(n + 1) * per_window];
                // Voxels of the window inside the volume (not its padding).
                for z in 0..wd.min(nd.saturating_sub(d)) {
                    for y in 0..wh.min(nh.saturating_sub(h)) {
                        for x in 0..ww.min(nw.saturating_sub(w)) {
                            let at = (z * wh + y) * ww + x;
                            let label = case.label[[d + z, h + y, w + x]];
                            let voxel = (0..k).map(|c| win[c * wd * plane + at]);
                            sampler.offer(voxel, label);
                        }
                    }
                }
            }
        }
    }
    Ok(sampler
        .map(StratifiedSampler::finish)
        .unwrap_or(LogitSamples {
            classes: 0,
            logits: Vec::new(),
            labels: Vec::new(),
            weights: Vec::new(),
        }))
}

/// Fits and saves the temperature of the run's `best` and `last` checkpoints that have none yet
/// (one fit when they hold the same weights). Returns the fit of `best`, when there was one.
pub fn calibrate_checkpoints(
    run: &RunDir,
    cases: &[Arc<PreparedCase>],
    window: &SlidingWindow,
    device: &Device,
    seed: u64,
) -> Result<Option<Calibration>> {
    if cases.is_empty() {
        return Ok(None);
    }
    let mut fitted: Option<(Vec<u8>, Calibration)> = None;
    let mut best = None;
    for kind in [CheckpointKind::Best, CheckpointKind::Last] {
        let checkpoint = run.checkpoint(kind);
        if !checkpoint.is_complete() {
            continue;
        }
        let path = checkpoint.calibration();
        if path.is_file() {
            let c: Calibration = crate::io::read_json(&path)?;
            best = best.or((kind == CheckpointKind::Best).then_some(c));
            continue;
        }
        let weights =
            std::fs::read(checkpoint.weights()).map_err(|e| Error::io(checkpoint.weights(), e))?;
        let calibration = match &fitted {
            Some((w, c)) if *w == weights => c.clone(),
            _ => {
                let (_, model) = crate::model::load(&checkpoint.dir, device)?;
                let samples = sample_logits(&model, cases, window, device, seed)?;
                if samples.is_empty() {
                    continue;
                }
                calibrate(&samples)
            }
        };
        write_json_atomically(&path, &calibration)?;
        if kind == CheckpointKind::Best {
            best = Some(calibration.clone());
        }
        fitted = Some((weights, calibration));
    }
    Ok(best)
}

/// Chooses the findings' operating point of the run's `best` checkpoint on the validation cases
/// and saves it as its `operating_point.json`, unless it has one. Each case is predicted as
/// `segment` would (`[segment]` overlap, mirroring and the fitted temperature), then filtered
/// by `filter` (its `min_confidence` is ignored) with classes decided as `segment` does
/// (`rule`: see `segment.threshold`); the findings are the classes outside the
/// region of interest and `keep_largest`. `None` when there is nothing to choose from: no
/// validation cases, no finding class, or no lesion in the validation cases.
pub fn fit_operating_point(
    run: &RunDir,
    cases: &[Arc<PreparedCase>],
    window: &SlidingWindow,
    filter: &LesionFilter,
    rule: &ClassRule,
    names: &[String],
    device: &Device,
) -> Result<Option<OperatingPoint>> {
    let checkpoint = run.checkpoint(CheckpointKind::Best);
    if cases.is_empty() || !checkpoint.is_complete() {
        return Ok(None);
    }
    let path = checkpoint.operating_point();
    if path.is_file() {
        return Ok(Some(crate::io::read_json(&path)?));
    }
    let roi: Vec<u32> = filter.roi.iter().flat_map(|r| r.classes.clone()).collect();
    let findings: Vec<u32> = (1..names.len() as u32)
        .filter(|c| !roi.contains(c) && !filter.keep_largest.contains(c))
        .collect();
    if findings.is_empty() {
        return Ok(None);
    }
    let (_, model) = crate::model::load(&checkpoint.dir, device)?;
    let filter = LesionFilter {
        min_confidence: 0.0,
        skip_diameters: true,
        ..filter.clone()
    };
    let mut found = Findings::default();
    for case in cases {
        found.next_case();
        let probs = window.predict(&model, case.image.view(), device)?;
        let mut labels = decide_classes(probs.view(), Some(rule));
        extract_lesions(
            &mut labels,
            &case.geometry,
            names,
            &filter,
            0,
            |c, [k, j, i]| Probe {
                probability: probs[[c as usize, k, j, i]],
                uncertainty: None,
            },
        );
        let dims = {
            let (d, h, w) = labels.dim();
            [d, h, w]
        };
        for &class in &findings {
            let is = |l: &u8| *l as u32 == class;
            let truth: Vec<bool> = case.label.iter().map(is).collect();
            let pred: Vec<bool> = labels.iter().map(is).collect();
            let p = probs.index_axis(ndarray::Axis(0), class as usize);
            let probability: Vec<f32> = p.iter().copied().collect();
            found.add(&truth, &pred, &probability, dims);
        }
    }
    if found.truth.is_empty() {
        return Ok(None);
    }
    let point = found.choose();
    write_json_atomically(&path, &point)?;
    Ok(Some(point))
}
