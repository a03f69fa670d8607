//! `medseg model (--preset NAME --dims 2|3 | --config FILE) [--size ...]`: layer summary,
//! parameter count and multiply-adds of one forward pass.

use std::path::PathBuf;

use anyhow::Context;

use medseg::geometry::PatchSize;
use medseg::model::{summary, HybridSegNetConfig, KernelPath, ModelPreset};

#[derive(clap::Args)]
pub struct Args {
    /// tiny, small or base.
    #[arg(long, default_value = "tiny", conflicts_with = "config")]
    preset: ModelPreset,
    /// Spatial dimensions of the preset: 2 (slices) or 3 (patches).
    #[arg(long, default_value_t = 3)]
    dims: usize,
    /// A model config: `model.json` saved beside weights, or TOML with the same keys (top level or
    /// under `[model]`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Input patch size, e.g. 96,96,96 (default: the config's patch size).
    #[arg(long, value_delimiter = ',')]
    size: Option<Vec<usize>>,
    #[arg(long, default_value_t = 1)]
    in_channels: usize,
    #[arg(long, default_value_t = 2)]
    classes: usize,
    /// Also build the model on this device (cpu, wgpu, cuda) and time N training steps
    /// (forward + backward, batch 1) after one warm-up step.
    #[arg(long, value_name = "N")]
    time: Option<usize>,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// CPU convolution kernels for --time: medseg (default) or burn (the reference ops).
    #[arg(long)]
    kernels: Option<KernelPath>,
}

/// Peak resident memory of this process (Linux), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Times `steps` forward+backward passes of one random sample.
fn time_steps(
    config: &HybridSegNetConfig,
    size: PatchSize,
    device: &str,
    steps: usize,
    macs: u64,
) -> anyhow::Result<()> {
    use burn::prelude::*;
    let device = medseg::model::device(device)?.autodiff();
    let net = config.init(&device)?;
    let [d, h, w] = size.window();
    let shape = [1, config.input_channels(), d, h, w];
    let x = Tensor::<5>::random(shape, burn::tensor::Distribution::Normal(0.0, 1.0), &device);
    let y = Tensor::<4, Int>::zeros([1, shape[2], shape[3], shape[4]], &device);
    let step = || {
        let loss = medseg::train::loss::dice_ce_loss(
            net.forward(x.clone()).logits,
            y.clone(),
            medseg::train::loss::LossTerms::default(),
        );
        let _ = loss.backward();
    };
    step();
    let start = std::time::Instant::now();
    for _ in 0..steps.max(1) {
        step();
    }
    let per = start.elapsed().as_secs_f64() / steps.max(1) as f64;
    println!(
        "training step: {:.1} ms ({:.2} samples/s, {:.1} GFLOP/s at 6 FLOP per multiply-add), peak RSS {}",
        per * 1e3,
        1.0 / per,
        6.0 * macs as f64 / per / 1e9,
        peak_rss_mib().map_or("unknown".into(), |m| format!("{m:.0} MiB"))
    );
    Ok(())
}

fn load_config(path: &PathBuf) -> anyhow::Result<HybridSegNetConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let is_json = path.extension().is_some_and(|e| e == "json");
    let config = if is_json {
        serde_json::from_str(&text)
            .with_context(|| format!("{}: not a model config", path.display()))?
    } else {
        let value: toml::Value =
            toml::from_str(&text).with_context(|| format!("{}: invalid TOML", path.display()))?;
        let table = value.get("model").cloned().unwrap_or(value);
        table
            .try_into()
            .with_context(|| format!("{}: not a model config", path.display()))?
    };
    Ok(config)
}

fn human(n: f64) -> String {
    match n {
        n if n >= 1e9 => format!("{:.2} G", n / 1e9),
        n if n >= 1e6 => format!("{:.2} M", n / 1e6),
        n if n >= 1e3 => format!("{:.1} k", n / 1e3),
        n => format!("{n:.0}"),
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(path) => load_config(path)?,
        None => HybridSegNetConfig::preset(
            args.preset,
            HybridSegNetConfig::default_patch(args.dims)?,
            args.classes,
        )
        .with_in_channels(args.in_channels),
    };
    let config = match args.kernels {
        Some(k) => config.with_kernels(Some(k)),
        None => config,
    };
    config.validate()?;
    let size = match &args.size {
        Some(s) => match PatchSize::new(s).filter(|p| p.spatial_dims() == config.spatial_dims()) {
            Some(p) => p,
            None => super::usage!(
                "--size {s:?}: needs {} positive values for a {}D model",
                config.spatial_dims(),
                config.spatial_dims()
            ),
        },
        None => config.patch_size,
    };
    let rows = summary::summarize(&config, size);
    println!(
        "{:<28} {:>22} {:>12} {:>12}",
        "layer", "output [C, D, H, W]", "params", "MACs"
    );
    for r in &rows {
        println!(
            "{:<28} {:>22} {:>12} {:>12}",
            r.name,
            format!("{:?}", r.output),
            human(r.params as f64),
            human(r.macs as f64)
        );
    }
    let params: usize = rows.iter().map(|r| r.params).sum();
    let macs: u64 = rows.iter().map(|r| r.macs).sum();
    println!(
        "total: {} parameters ({params}), {} multiply-adds per forward pass at {:?} (total stride {})",
        human(params as f64),
        human(macs as f64),
        size.as_slice(),
        config.total_stride()
    );
    if let Some(steps) = args.time {
        time_steps(&config, size, &args.device, steps, macs)?;
    }
    Ok(())
}
