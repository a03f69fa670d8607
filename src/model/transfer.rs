//! Fine-tuning: a network's parameters taken from another checkpoint's wherever the name (the
//! module path, e.g. `vit.blocks.0.attention.qkv.weight`) and the shape match; the rest keep
//! their fresh initialisation (e.g. the class head when the classes differ).

use std::collections::BTreeMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::prelude::*;
use burn::tensor::TensorData;

use super::HybridSegNet;

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

/// Replaces each parameter whose path and shape the source has.
struct Assign {
    path: Path,
    source: BTreeMap<String, TensorData>,
    seen: Vec<String>,
    report: Transfer,
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
        match source {
            Some(data) if data.shape().to_vec() == shape => {
                let data = data.clone();
                self.report.loaded.push(entry);
                param.map(|t| {
                    let grad = t.is_require_grad();
                    Tensor::from_data(data, &t.device()).set_require_grad(grad)
                })
            }
            _ => {
                self.report.reinitialised.push(entry);
                param
            }
        }
    }
}

/// `target` with every parameter of `source` whose path and shape match, and the report.
pub fn transfer_parameters(
    target: HybridSegNet,
    source: &HybridSegNet,
) -> (HybridSegNet, Transfer) {
    let mut collect = Collect::default();
    source.visit(&mut collect);
    let mut assign = Assign {
        path: Path::default(),
        source: collect.params,
        seen: Vec::new(),
        report: Transfer::default(),
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
        let source = HybridSegNetConfig::preset(ModelPreset::Tiny, patch, 2)
            .init(&device)
            .unwrap();
        device.seed(2);
        let target = HybridSegNetConfig::preset(ModelPreset::Tiny, patch, 3)
            .init(&device)
            .unwrap();
        let fresh = values(&target);
        let (model, report) = transfer_parameters(target, &source);
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
        let other = HybridSegNetConfig::preset(ModelPreset::Tiny, patch, 3)
            .with_stem_widths(vec![4, 12, 20])
            .with_embed_dim(40)
            .init(&device)
            .unwrap();
        let (_, report) = transfer_parameters(other, &source);
        assert!(report.loaded.is_empty(), "{:?}", report.loaded);
        // Same names, other shapes: re-initialised, none ignored.
        assert_eq!(report.reinitialised.len(), got.len());
        assert!(report.ignored.is_empty());
    }
}
