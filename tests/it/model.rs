//! HybridSegNet: shapes for 2D, 2.5D and 3D at odd sizes, gradients reach every parameter, the
//! tiny preset overfits a real labelled slice and a real 3D patch, save → load is exact.

use burn::module::{ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::Gradients;

use medseg::geometry::PatchSize;
use medseg::io::read_nifti;
use medseg::model::{self, summary, HybridSegNetConfig, ModelPreset, PositionEmbedding};
use medseg::train::loss::{dice_ce_loss, LossTerms};

use crate::common::cache;

/// A preset with its default patch (2D 224², 3D 96³).
fn preset(name: &str, dims: usize, channels: usize, classes: usize) -> HybridSegNetConfig {
    let patch = HybridSegNetConfig::default_patch(dims).unwrap();
    HybridSegNetConfig::preset(name.parse().unwrap(), patch, classes).with_in_channels(channels)
}

fn random(shape: [usize; 5], device: &Device) -> Tensor<5> {
    Tensor::random(shape, burn::tensor::Distribution::Normal(0.0, 1.0), device)
}

#[test]
fn output_shapes_for_2d_25d_and_3d_at_odd_sizes() {
    let device = Device::flex();
    // 2D, odd H and W, deep supervision on.
    let cfg = preset("tiny", 2, 1, 3).with_deep_supervision(true);
    let net = cfg.init(&device).unwrap();
    let out = net.forward(random([2, 1, 1, 37, 45], &device));
    assert_eq!(out.logits.dims(), [2, 3, 1, 37, 45]);
    // Deepest first: stem scales 4 and 2 of the padded 40 × 48 input.
    let deep: Vec<_> = out.deep.iter().map(|t| t.dims()).collect();
    assert_eq!(deep, vec![[2, 3, 1, 10, 12], [2, 3, 1, 20, 24]]);

    // 2.5D: two modalities with one neighbour slice on each side = 6 input channels.
    let cfg = preset("tiny", 2, 2, 2).with_context_slices(1);
    assert_eq!(cfg.input_channels(), 6);
    let net = cfg.init(&device).unwrap();
    assert_eq!(
        net.forward(random([1, 6, 1, 33, 50], &device))
            .logits
            .dims(),
        [1, 2, 1, 33, 50]
    );

    // 3D, odd sizes, UNETR skips and sinusoidal positions.
    let cfg = preset("tiny", 3, 1, 2)
        .with_transformer_skips(true)
        .with_position(PositionEmbedding::Sinusoidal);
    let net = cfg.init(&device).unwrap();
    assert_eq!(
        net.forward(random([1, 1, 13, 17, 19], &device))
            .logits
            .dims(),
        [1, 2, 13, 17, 19]
    );
}

#[test]
fn invalid_configs_are_refused_with_the_reason() {
    let err = "huge".parse::<ModelPreset>().unwrap_err();
    assert!(err.contains("tiny, small or base"), "{err}");
    let err = preset("tiny", 3, 1, 2)
        .with_context_slices(1)
        .init(&Device::flex())
        .unwrap_err();
    assert!(err.to_string().contains("2D patch_size"), "{err}");
    let cfg = HybridSegNetConfig {
        heads: 3,
        ..preset("tiny", 2, 1, 2)
    };
    let err = cfg.init(&Device::flex()).unwrap_err();
    assert!(err.to_string().contains("divisible"), "{err}");
    assert!(model::device("cuda").is_err() || cfg!(feature = "cuda"));
}

/// Collects parameters whose gradient is missing or all zero.
struct ZeroGrads<'a> {
    grads: &'a Gradients,
    path: Vec<String>,
    dead: Vec<String>,
    seen: usize,
}

impl ModuleVisitor for ZeroGrads<'_> {
    fn enter_module(&mut self, name: &str, _ty: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _ty: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
        self.seen += 1;
        let magnitude = p
            .val()
            .grad(self.grads)
            .map(|g| g.abs().sum().into_scalar::<f32>());
        if !matches!(magnitude, Some(m) if m > 0.0) {
            self.dead.push(self.path.join("."));
        }
    }
}

#[test]
fn every_parameter_gets_a_gradient() {
    let device = Device::flex().autodiff();
    device.seed(3);
    for dims in [2, 3] {
        let cfg = preset("tiny", dims, 1, 2)
            .with_transformer_skips(true)
            .with_deep_supervision(true);
        let net = cfg.init(&device).unwrap();
        let shape = if dims == 2 {
            [2, 1, 1, 32, 32]
        } else {
            [1, 1, 16, 16, 16]
        };
        let out = net.forward(random(shape, &device));
        let loss = out
            .deep
            .into_iter()
            .fold(out.logits.powi_scalar(2).mean(), |acc, t| {
                acc + t.powi_scalar(2).mean()
            });
        let grads = loss.backward();
        let mut v = ZeroGrads {
            grads: &grads,
            path: Vec::new(),
            dead: Vec::new(),
            seen: 0,
        };
        net.visit(&mut v);
        assert!(v.seen > 20, "only {} parameters visited", v.seen);
        assert!(
            v.dead.is_empty(),
            "{dims}D: parameters without gradient: {:?}",
            v.dead
        );
    }
}

#[test]
fn summary_counts_the_same_parameters_as_burn() {
    let device = Device::flex();
    let configs = [
        preset("tiny", 2, 1, 2),
        preset("tiny", 3, 2, 4)
            .with_transformer_skips(true)
            .with_deep_supervision(true),
        preset("small", 3, 1, 2),
        preset("small", 2, 1, 2).with_context_slices(2),
    ];
    for cfg in configs {
        let rows = summary::summarize(&cfg, cfg.patch_size);
        let counted: usize = rows.iter().map(|r| r.params).sum();
        assert_eq!(counted, cfg.init(&device).unwrap().num_params(), "{cfg}");
        assert!(rows.iter().map(|r| r.macs).sum::<u64>() > 0);
    }
    // The base preset is TransUNet scale: about 10^8 parameters.
    let base = preset("base", 2, 1, 2);
    let n: usize = summary::summarize(&base, base.patch_size)
        .iter()
        .map(|r| r.params)
        .sum();
    assert!(
        (80_000_000..130_000_000).contains(&n),
        "base has {n} parameters"
    );
}

#[test]
fn save_then_load_gives_identical_outputs() {
    let device = Device::flex();
    let cfg = preset("tiny", 3, 1, 3).with_transformer_skips(true);
    let net = cfg.init(&device).unwrap();
    let dir = tempfile::tempdir().unwrap();
    model::save(&cfg, &net, dir.path()).unwrap();
    let (cfg2, net2) = model::load(dir.path(), &device).unwrap();
    assert_eq!(cfg.to_string(), cfg2.to_string(), "config round trip");
    let x = random([1, 1, 16, 20, 24], &device);
    let a: Vec<f32> = net.forward(x.clone()).logits.try_to_vec_as().unwrap();
    let b: Vec<f32> = net2.forward(x).logits.try_to_vec_as().unwrap();
    assert_eq!(a, b);
    // A checkpoint from another architecture is refused with the file named.
    let other = preset("tiny", 3, 1, 5);
    std::fs::write(
        dir.path().join("model.json"),
        serde_json::to_string(&other).unwrap(),
    )
    .unwrap();
    let err = model::load(dir.path(), &device).unwrap_err();
    assert!(err.to_string().contains("weights.bpk"), "{err}");
}

/// Foreground Dice of the argmax prediction.
fn dice(net: &model::HybridSegNet, x: &Tensor<5>, y: &[i32]) -> f64 {
    let pred: Vec<i32> = net
        .forward(x.clone())
        .logits
        .argmax(1)
        .try_to_vec_as()
        .unwrap();
    dice_of(&pred, y)
}

fn dice_of(pred: &[i32], y: &[i32]) -> f64 {
    let (mut inter, mut sum) = (0usize, 0usize);
    for (&p, &t) in pred.iter().zip(y) {
        inter += (p == 1 && t == 1) as usize;
        sum += (p == 1) as usize + (t == 1) as usize;
    }
    2.0 * inter as f64 / sum.max(1) as f64
}

/// Trains on one sample until foreground Dice > 0.95; returns (steps, Dice).
fn overfit(
    cfg: &HybridSegNetConfig,
    x: Vec<f32>,
    y: Vec<i32>,
    shape: [usize; 3],
    max_steps: usize,
) -> (usize, f64) {
    let device = Device::flex().autodiff();
    device.seed(11);
    let [d, h, w] = shape;
    let xt = Tensor::<5>::from_data(TensorData::new(x, [1, 1, d, h, w]), &device);
    let yt = Tensor::<4, Int>::from_data(TensorData::new(y.clone(), [1, d, h, w]), &device);
    // The task must not be trivial: predicting everything as foreground scores well below 0.95.
    let trivial = dice_of(&vec![1; y.len()], &y);
    assert!(trivial < 0.8, "all-foreground Dice is already {trivial:.3}");
    let mut net = cfg.init(&device).unwrap();
    let mut optim = AdamWConfig::new().with_weight_decay(0.0).init();
    let mut best = 0.0;
    for step in 1..=max_steps {
        let loss = dice_ce_loss(
            net.forward(xt.clone()).logits,
            yt.clone(),
            LossTerms::default(),
        );
        let grads = GradientsParams::from_grads(loss.backward(), &net);
        net = optim.step(3e-3, net, grads);
        if step % 10 == 0 {
            best = dice(&net.valid(), &xt.clone().inner(), &y);
            if best > 0.95 {
                eprintln!(
                    "overfit {}D: Dice {best:.3} after {step} steps",
                    cfg.spatial_dims()
                );
                return (step, best);
            }
        }
    }
    (max_steps, best)
}

/// CT window [-200, 300] HU scaled to [0, 1] (a soft-tissue window, as for liver).
fn window(hu: f32) -> f32 {
    ((hu + 200.0) / 500.0).clamp(0.0, 1.0)
}

const LIVER: f32 = 5.0; // TotalSegmentator v2 class id

#[test]
fn tiny_overfits_a_real_liver_slice() {
    let ct = read_nifti(&cache("totalsegmentator/example_ct.nii.gz")).unwrap();
    let seg = read_nifti(&cache(
        "totalsegmentator/example_seg_fast_force_split.nii.gz",
    ))
    .unwrap();
    let [ni, nj, nk] = ct.geometry.dims;
    // The axial slice with the most liver.
    let k = (0..nk)
        .max_by_key(|&k| {
            seg.voxels
                .slice(ndarray::s![0, k, .., ..])
                .iter()
                .filter(|&&v| v == LIVER)
                .count()
        })
        .unwrap();
    let x: Vec<f32> = ct
        .voxels
        .slice(ndarray::s![0, k, .., ..])
        .iter()
        .map(|&v| window(v))
        .collect();
    let y: Vec<i32> = seg
        .voxels
        .slice(ndarray::s![0, k, .., ..])
        .iter()
        .map(|&v| (v == LIVER) as i32)
        .collect();
    assert!(
        y.iter().sum::<i32>() > 200,
        "slice {k} has too little liver"
    );
    let cfg = HybridSegNetConfig {
        patch_size: PatchSize::new(&[nj, ni]).unwrap(),
        ..preset("tiny", 2, 1, 2)
    };
    let (steps, d) = overfit(&cfg, x, y, [1, nj, ni], 400);
    assert!(d > 0.95, "Dice {d:.3} after {steps} steps");
}

#[test]
fn tiny_overfits_a_real_3d_liver_patch() {
    let ct = read_nifti(&cache("totalsegmentator/example_ct.nii.gz")).unwrap();
    let seg = read_nifti(&cache(
        "totalsegmentator/example_seg_fast_force_split.nii.gz",
    ))
    .unwrap();
    // A 24 × 32 × 32 patch (k, j, i) centred on the liver's centroid.
    let mut c = [0f64; 3];
    let mut n = 0.0;
    for ((_, k, j, i), &v) in seg.voxels.indexed_iter() {
        if v == LIVER {
            c[0] += k as f64;
            c[1] += j as f64;
            c[2] += i as f64;
            n += 1.0;
        }
    }
    let size = [24usize, 32, 32];
    let dims = [
        ct.geometry.dims[2],
        ct.geometry.dims[1],
        ct.geometry.dims[0],
    ];
    let start: Vec<usize> = (0..3)
        .map(|a| {
            ((c[a] / n) as usize)
                .saturating_sub(size[a] / 2)
                .min(dims[a] - size[a])
        })
        .collect();
    let s = ndarray::s![
        0,
        start[0]..start[0] + size[0],
        start[1]..start[1] + size[1],
        start[2]..start[2] + size[2]
    ];
    let x: Vec<f32> = ct.voxels.slice(s).iter().map(|&v| window(v)).collect();
    let y: Vec<i32> = seg
        .voxels
        .slice(s)
        .iter()
        .map(|&v| (v == LIVER) as i32)
        .collect();
    let fg = y.iter().sum::<i32>() as f64 / y.len() as f64;
    assert!((0.1..0.9).contains(&fg), "patch liver fraction {fg}");
    let cfg = HybridSegNetConfig {
        patch_size: PatchSize::new(&size).unwrap(),
        ..preset("tiny", 3, 1, 2)
    };
    let (steps, d) = overfit(&cfg, x, y, size, 300);
    assert!(d > 0.95, "Dice {d:.3} after {steps} steps");
}
