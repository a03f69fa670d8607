//! The GPU code path checked against the CPU path, on a real CT: the same weights take two AdamW
//! training steps on each device (the losses must agree), then the trained weights segment the
//! whole scan slice by slice with mirror TTA on each device (the masks must agree). Also times a
//! training step and the prediction on the device. Exit status 1 when the paths disagree.
//!
//! ```text
//! cargo run --release --features wgpu --example device_check -- wgpu [DATASETS_CACHE]
//! ```
//!
//! Run by `scripts/gpu-check.sh`; `cpu` as the device compares the CPU path with itself.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use ndarray::{s, Array4, Axis};

use medseg::geometry::PatchSize;
use medseg::infer::sliding_window::SlidingWindow;
use medseg::model::{self, HybridSegNetConfig, ModelPreset};
use medseg::train::loss::{dice_ce_loss, LossTerms};

/// TotalSegmentator v2's liver label.
const LIVER: f32 = 5.0;
/// Slices trained on per step.
const BATCH: usize = 4;

/// The scan windowed to [-200, 300] HU in [0, 1], `[1, K, J, I]`, and the liver mask `[K, J, I]`.
fn scan(cache: &Path) -> anyhow::Result<(Array4<f32>, ndarray::Array3<i32>)> {
    let ts = cache.join("totalsegmentator");
    let ct = medseg::io::read_nifti(&ts.join("example_ct.nii.gz"))?;
    let seg = medseg::io::read_nifti(&ts.join("example_seg_fast_force_split.nii.gz"))?;
    let image = ct.voxels.mapv(|hu| ((hu + 200.0) / 500.0).clamp(0.0, 1.0));
    let liver = seg
        .voxels
        .index_axis(Axis(0), 0)
        .mapv(|v| (v == LIVER) as i32);
    Ok((image, liver))
}

/// The `BATCH` axial slices with the most liver, as a training batch.
fn batch(
    image: &Array4<f32>,
    liver: &ndarray::Array3<i32>,
    device: &Device,
) -> (Tensor<5>, Tensor<4, Int>) {
    let (_, nk, nj, ni) = image.dim();
    let mut order: Vec<usize> = (0..nk).collect();
    order.sort_by_key(|&k| std::cmp::Reverse(liver.index_axis(Axis(0), k).sum()));
    let (mut x, mut y): (Vec<f32>, Vec<i32>) = (Vec::new(), Vec::new());
    for &k in &order[..BATCH.min(nk)] {
        x.extend(image.slice(s![0, k, .., ..]).iter());
        y.extend(liver.slice(s![k, .., ..]).iter());
    }
    let b = x.len() / (nj * ni);
    (
        Tensor::from_data(TensorData::new(x, [b, 1, 1, nj, ni]), device),
        Tensor::from_data(TensorData::new(y, [b, 1, nj, ni]), device),
    )
}

/// Two AdamW steps from the weights in `dir`; the losses before each step and seconds per step.
fn train_two_steps(
    dir: &Path,
    image: &Array4<f32>,
    liver: &ndarray::Array3<i32>,
    device: &Device,
    out: &Path,
) -> anyhow::Result<(Vec<f32>, f64)> {
    let (config, mut net) = model::load(dir, device)?;
    let (x, y) = batch(image, liver, device);
    let mut optimizer = AdamWConfig::new().init();
    let mut losses = Vec::new();
    let start = Instant::now();
    for _ in 0..2 {
        let loss = dice_ce_loss(
            net.forward(x.clone()).logits,
            y.clone(),
            LossTerms::default(),
        );
        let value = loss.clone().try_to_vec_as::<f32>();
        losses.push(value.map_err(|e| anyhow::anyhow!("reading the loss: {e:?}"))?[0]);
        let grads = GradientsParams::from_grads(loss.backward(), &net);
        net = optimizer.step(1e-3, net, grads);
    }
    let per_step = start.elapsed().as_secs_f64() / 2.0;
    model::save(&config, &net, out)?;
    Ok((losses, per_step))
}

/// Foreground probabilities `[K, J, I]` of the whole scan with mirror TTA, and seconds taken.
fn predict(
    dir: &Path,
    image: &Array4<f32>,
    device: &Device,
) -> anyhow::Result<(ndarray::Array3<f32>, f64)> {
    let (config, net) = model::load(dir, device)?;
    let window = SlidingWindow {
        window: config.patch_size.window(),
        overlap: 0.5,
        batch_size: BATCH,
        concurrent: SlidingWindow::concurrency_for(device),
        mirror: true,
        context: 0,
        temperature: 1.0,
    };
    let start = Instant::now();
    let probs = window.predict(&net, image.view(), device)?;
    Ok((
        probs.index_axis(Axis(0), 1).to_owned(),
        start.elapsed().as_secs_f64(),
    ))
}

fn main() -> anyhow::Result<std::process::ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let name = args.first().map_or("wgpu", String::as_str);
    let cache = PathBuf::from(args.get(1).map_or("datasets/cache", String::as_str));
    let gpu = model::device(name)?;
    let cpu = Device::flex();
    let (image, liver) = scan(&cache)?;
    let (_, _, nj, ni) = image.dim();
    let tmp = tempfile::tempdir()?;
    let (init, cpu_run, gpu_run) = (
        tmp.path().join("init"),
        tmp.path().join("cpu"),
        tmp.path().join("gpu"),
    );
    // One set of initial weights, made on the CPU and loaded on both devices.
    let autodiff = cpu.clone().autodiff();
    autodiff.seed(7);
    let config =
        HybridSegNetConfig::preset(ModelPreset::Tiny, PatchSize::new(&[nj, ni]).unwrap(), 2);
    model::save(&config, &config.init(&autodiff)?, &init)?;

    let (cpu_losses, cpu_step) = train_two_steps(&init, &image, &liver, &autodiff, &cpu_run)?;
    let (gpu_losses, gpu_step) =
        train_two_steps(&init, &image, &liver, &gpu.clone().autodiff(), &gpu_run)?;
    println!("training losses  cpu {cpu_losses:?}  {name} {gpu_losses:?}");
    let losses_agree = cpu_losses
        .iter()
        .zip(&gpu_losses)
        .all(|(a, b)| (a - b).abs() <= 1e-3 * a.abs().max(1.0));

    // The CPU-trained weights segment the scan on both devices.
    let (p_cpu, cpu_secs) = predict(&cpu_run, &image, &cpu)?;
    let (p_gpu, gpu_secs) = predict(&cpu_run, &image, &gpu)?;
    let max_diff = p_cpu
        .iter()
        .zip(&p_gpu)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let differ = p_cpu
        .iter()
        .zip(&p_gpu)
        .filter(|(a, b)| (**a >= 0.5) != (**b >= 0.5))
        .count();
    let share = differ as f64 / p_cpu.len() as f64;
    println!("prediction       max |p_cpu - p_{name}| = {max_diff:.2e}, mask voxels that differ: {differ} ({share:.2e})");
    println!("seconds          training step: cpu {cpu_step:.3}  {name} {gpu_step:.3};  prediction (TTA x4): cpu {cpu_secs:.2}  {name} {gpu_secs:.2}");
    let masks_agree = max_diff <= 1e-3 && share <= 1e-4;
    if losses_agree && masks_agree {
        println!("device check: {name} agrees with the CPU");
        Ok(std::process::ExitCode::SUCCESS)
    } else {
        println!("device check: {name} DISAGREES with the CPU (losses agree: {losses_agree}, masks agree: {masks_agree})");
        Ok(std::process::ExitCode::FAILURE)
    }
}
