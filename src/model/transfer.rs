//! Fine-tuning: a network's parameters taken from another checkpoint's wherever the name (the
//! module path, e.g. `vit.blocks.0.attention.qkv.weight`) and the shape match; two kinds that
//! differ in shape are adapted so that the network starts as the source computes (the learned
//! position embedding resampled to another token grid, as ViT fine-tuning at a new resolution
//! does; the input convolutions' 2.5D slices centred, the others zero); the rest keep their
//! fresh initialisation (e.g. the class head when the classes differ).

use std::collections::BTreeMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::prelude::*;
use burn::tensor::TensorData;

use super::{HybridSegNet, HybridSegNetConfig};

/// One parameter by name, with its shape here and in the source.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamEntry {
    /// Module path.
    pub name: String,
    /// Shape in the network being trained (`None` for a source parameter it lacks).
    pub shape: Option<Vec<usize>>,
    /// Shape in the source checkpoint (`None` when it has no parameter of that name).
    pub source_shape: Option<Vec<usize>>,
}

/// What [`transfer_parameters`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Transfer {
    /// Taken from the source.
    pub loaded: Vec<ParamEntry>,
    /// Taken from the source through another shape: the position embedding on another token
    /// grid, an input convolution over other 2.5D slices.
    pub adapted: Vec<ParamEntry>,
    /// Kept at their fresh initialisation: no source parameter of that name, or another shape.
    pub reinitialised: Vec<ParamEntry>,
    /// Source parameters with no counterpart of that name here.
    pub ignored: Vec<ParamEntry>,
}

/// Module paths, as a visitor or mapper walks the tree.
#[derive(Default)]
struct Path(Vec<String>);

impl Path {
    fn name(&self) -> String {
        self.0.join(".")
    }
}

/// Every float parameter of a module, by path.
#[derive(Default)]
struct Collect {
    path: Path,
    params: BTreeMap<String, TensorData>,
}

impl ModuleVisitor for Collect {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.0.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.0.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.params
            .insert(self.path.name(), param.val().into_data());
    }
}

/// Replaces each parameter whose path and shape the source has, or adapts it.
struct Assign {
    path: Path,
    source: BTreeMap<String, TensorData>,
    seen: Vec<String>,
    report: Transfer,
    adapt: Adapt,
}

/// What adapting a source parameter of another shape needs.
struct Adapt {
    /// The source's position embedding resampled to the target's token grid.
    position: Option<TensorData>,
    /// Input channels (modalities), when source and target have the same.
    channels: Option<usize>,
    /// 2.5D slices on each side, `(source, target)`.
    context: (usize, usize),
}

impl Adapt {
    fn adapt(&self, name: &str, data: &TensorData, shape: &[usize]) -> Option<TensorData> {
        if name == "vit.position" {
            return self
                .position
                .clone()
                .filter(|p| p.shape().to_vec() == shape);
        }
        self.slices(data, shape)
    }

    /// An input convolution's weight `[O, C·S_source, ...]` onto `[O, C·S_target, ...]`: each
    /// source slice onto the target slice at the same offset from the centre (the outermost
    /// when the target has fewer, summed there), other slices zero.
    fn slices(&self, data: &TensorData, shape: &[usize]) -> Option<TensorData> {
        let c = self.channels?;
        let (cs, ct) = self.context;
        let (ss, st) = (2 * cs + 1, 2 * ct + 1);
        let from = data.shape().to_vec();
        let fits = from.len() == shape.len()
            && from.len() >= 2
            && from[0] == shape[0]
            && from[2..] == shape[2..]
            && from[1] == c * ss
            && shape[1] == c * st
            && ss != st;
        if !fits {
            return None;
        }
        let values = data.try_to_vec::<f32>().ok()?;
        let rest: usize = shape[2..].iter().product();
        let mut out = vec![0f32; shape.iter().product()];
        for o in 0..shape[0] {
            for ch in 0..c {
                for s in 0..ss {
                    let t = (s + ct).saturating_sub(cs).min(st - 1);
                    let src = (o * c * ss + ch * ss + s) * rest;
                    let dst = (o * c * st + ch * st + t) * rest;
                    for k in 0..rest {
                        out[dst + k] += values[src + k];
                    }
                }
            }
        }
        Some(TensorData::new(out, shape.to_vec()))
    }
}

impl ModuleMapper for Assign {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.0.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.0.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let name = self.path.name();
        let shape = param.val().dims().to_vec();
        let source = self.source.get(&name);
        let entry = ParamEntry {
            name: name.clone(),
            shape: Some(shape.clone()),
            source_shape: source.map(|d| d.shape().to_vec()),
        };
        self.seen.push(name);
        let data = match source {
            Some(data) if data.shape().to_vec() == shape => {
                self.report.loaded.push(entry);
                data.clone()
            }
            Some(data) => match self.adapt.adapt(&entry.name, data, &shape) {
                Some(adapted) => {
                    self.report.adapted.push(entry);
                    adapted
                }
                None => {
                    self.report.reinitialised.push(entry);
                    return param;
                }
            },
            None => {
                self.report.reinitialised.push(entry);
                return param;
            }
        };
        param.map(|t| {
            let grad = t.is_require_grad();
            Tensor::from_data(data, &t.device()).set_require_grad(grad)
        })
    }
}

/// `target` (built from `target_config`) with every parameter of `source` whose path and shape
/// match or adapt, and the report.
pub fn transfer_parameters(
    target: HybridSegNet,
    target_config: &HybridSegNetConfig,
    source: &HybridSegNet,
    source_config: &HybridSegNetConfig,
) -> (HybridSegNet, Transfer) {
    let mut collect = Collect::default();
    source.visit(&mut collect);
    let adapt = Adapt {
        position: source
            .vit
            .position_on(target.vit.grid())
            .map(|p| p.into_data()),
        channels: (source_config.in_channels == target_config.in_channels)
            .then_some(target_config.in_channels),
        context: (source_config.context_slices, target_config.context_slices),
    };
    let mut assign = Assign {
        path: Path::default(),
        source: collect.params,
        seen: Vec::new(),
        report: Transfer::default(),
        adapt,
    };
    let model = target.map(&mut assign);
    let mut report = assign.report;
    report.ignored = assign
        .source
        .iter()
        .filter(|(name, _)| !assign.seen.contains(name))
        .map(|(name, data)| ParamEntry {
            name: name.clone(),
            shape: None,
            source_shape: Some(data.shape().to_vec()),
        })
        .collect();
    (model, report)
}

impl HybridSegNet {
    /// The encoder's parameters (the convolutional stem and the Transformer), which fine-tuning
    /// may freeze or train at a lower learning rate.
    pub fn encoder_params(&self) -> Vec<ParamId> {
        let mut ids = burn::module::list_param_ids(&self.stem);
        ids.extend(burn::module::list_param_ids(&self.vit));
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelPreset;
    use crate::geometry::PatchSize;
    use crate::model::HybridSegNetConfig;

    fn values(model: &HybridSegNet) -> BTreeMap<String, Vec<f32>> {
        let mut c = Collect::default();
        model.visit(&mut c);
        c.params
            .into_iter()
            .map(|(k, d)| (k, d.try_to_vec::<f32>().unwrap()))
            .collect()
    }

    #[test]
    fn takes_matching_parameters_and_reinitialises_a_head_of_other_classes() {
        let device = Device::flex();
        let patch = PatchSize::new(&[32, 32]).unwrap();
        device.seed(1);
        let source_config = HybridSegNetConfig::preset(ModelPreset::Tiny, patch, 2);
        let source = source_config.init(&device).unwrap();
        device.seed(2);
        let target_config = HybridSegNetConfig::preset(ModelPreset::Tiny, patch, 3);
        let target = target_config.init(&device).unwrap();
        let fresh = values(&target);
        let (model, report) = transfer_parameters(target, &target_config, &source, &source_config);
        let (src, got) = (values(&source), values(&model));
        assert!(!report.loaded.is_empty());
        // Everything loaded equals the source; everything re-initialised is the class head
        // (shapes differ with 3 classes) and keeps its fresh values.
        for p in &report.loaded {
            assert_eq!(got[&p.name], src[&p.name], "{}", p.name);
        }
        assert!(!report.reinitialised.is_empty());
        for p in &report.reinitialised {
            assert_ne!(p.shape, p.source_shape, "{}", p.name);
            assert_eq!(got[&p.name], fresh[&p.name], "{}", p.name);
        }
        assert_eq!(
            report.loaded.len() + report.reinitialised.len(),
            got.len(),
            "every parameter is accounted for"
        );
        assert!(report.ignored.is_empty());

        // Nothing of another family's widths matches.
        let other_config = HybridSegNetConfig::preset(ModelPreset::Tiny, patch, 3)
            .with_stem_widths(vec![4, 12, 20])
            .with_embed_dim(40);
        let other = other_config.init(&device).unwrap();
        let (_, report) = transfer_parameters(other, &other_config, &source, &source_config);
        assert!(report.loaded.is_empty(), "{:?}", report.loaded);
        // Same names, other shapes: re-initialised, none ignored.
        assert_eq!(report.reinitialised.len(), got.len());
        assert!(report.ignored.is_empty());
    }

    #[test]
    fn a_2d_source_starts_a_2_5d_model_of_another_patch_as_it_computes() {
        // 2D at 32² (a 2 x 2 token grid) into 2.5D (one slice each side) at 48² (3 x 3 tokens).
        let device = Device::flex();
        device.seed(3);
        let source_config =
            HybridSegNetConfig::preset(ModelPreset::Tiny, PatchSize::new(&[32, 32]).unwrap(), 2);
        let source = source_config.init(&device).unwrap();
        device.seed(4);
        let mut target_config =
            HybridSegNetConfig::preset(ModelPreset::Tiny, PatchSize::new(&[48, 48]).unwrap(), 2);
        target_config.context_slices = 1;
        let target = target_config.init(&device).unwrap();
        let (model, report) = transfer_parameters(target, &target_config, &source, &source_config);
        let adapted: Vec<&str> = report.adapted.iter().map(|p| p.name.as_str()).collect();
        assert!(adapted.contains(&"vit.position"), "{adapted:?}");
        assert!(
            adapted.iter().any(|n| n.starts_with("stem.")),
            "{adapted:?}"
        );
        assert!(
            report.reinitialised.is_empty(),
            "{:?}",
            report.reinitialised
        );
        // The centre slice sees what the source saw; the neighbours count for nothing, so the
        // model computes what the source computes on the centre slice.
        let x = Tensor::<5>::random(
            [1, 1, 1, 48, 48],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &device,
        );
        let noise = Tensor::<5>::random(
            [1, 1, 1, 48, 48],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &device,
        );
        let stacked = Tensor::cat(vec![noise.clone(), x.clone(), noise], 1);
        let want = source.forward(x).logits;
        let got = model.forward(stacked).logits;
        let worst = (want - got).abs().max().into_scalar::<f32>();
        assert!(worst < 1e-4, "{worst}");
    }
}
