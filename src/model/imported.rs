//! A network imported from ONNX (`gmpq import --onnx`): a [`Graph`] interpreted op by op in
//! libtorch, its convs made by the [`LayerFactory`] like every built-in network's, so the
//! supernet, fixed policies and HAWQ treat it exactly as they treat a ResNet.
//!
//! The graph itself travels in the checkpoint's model configuration ([`ImportedGraph`]: ops
//! naming their tensors), its tensors in the checkpoint's state dict.

use super::graph::{Graph, Op, Value};
use super::layers::{path_for, ConvLayer, ConvSpec, LayerFactory, LinearSpec};
use super::{ModelConfig, ModelError, Network};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use tch::nn;
use tch::Tensor;

/// An imported network's structure, without its weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImportedGraph {
    /// The ONNX graph's name, or the file's.
    pub name: String,
    /// The forward pass; tensors by var-store name.
    pub ops: Vec<Op<String>>,
    /// Every conv layer in forward order, the first (the stem) full precision.
    pub convs: Vec<ConvSpec>,
    /// Every tensor the ops name (conv kernels are the layers' own).
    pub tensors: Vec<TensorSpec>,
    pub head: Head,
}

/// One tensor of an imported graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<i64>,
    /// Learned (a bias, a batch norm's scale); false for running statistics and constants.
    pub trainable: bool,
}

/// Where the classifier starts: the last feature map before global average pooling, and how
/// attribution reads the head after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// The value holding the feature map; the ops from index `features` on are the head.
    pub features: Value,
    pub fc: LinearSpec,
    pub cam: Cam,
}

/// What Grad-CAM's channel weights are for a head (METHOD.md "Attribution").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cam {
    /// GAP → linear: the linear layer's weight (classes × channels), exactly.
    Linear { weight: String },
    /// GAP alone (a conv classifier before it, as SqueezeNet's): the identity, exactly.
    Identity,
    /// Anything else (an MLP head): the gradient, by autograd.
    Gradient,
}

impl ImportedGraph {
    /// The checks that make [`Imported`] safe to run: every op reads values already made, the
    /// head reads nothing from before the feature map, every named tensor and conv exists.
    pub fn validate(&self) -> Result<(), ModelError> {
        let invalid = |m: String| Err(ModelError::Invalid(format!("imported graph: {m}")));
        let tensors: HashMap<&str, &TensorSpec> =
            self.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
        let convs: HashMap<&str, &ConvSpec> =
            self.convs.iter().map(|c| (c.name.as_str(), c)).collect();
        for (i, op) in self.ops.iter().enumerate() {
            let late = op.inputs().into_iter().find(|&v| v > i);
            if let Some(v) = late {
                return invalid(format!(
                    "op {i} ({}) reads value {v} before it exists",
                    op.kind()
                ));
            }
            if i >= self.head.features && op.inputs().iter().any(|&v| v < self.head.features) {
                return invalid(format!(
                    "head op {i} ({}) reads a value from before the feature map",
                    op.kind()
                ));
            }
            if let Op::Conv { layer, .. } = op {
                if !convs.contains_key(layer.as_str()) {
                    return invalid(format!(
                        "op {i} names conv layer '{layer}', which is not listed"
                    ));
                }
            }
            let mut missing = None;
            let _ = op.try_map(|name| {
                if !tensors.contains_key(name.as_str()) {
                    missing = Some(name.clone());
                }
                Ok::<(), ()>(())
            });
            if let Some(name) = missing {
                return invalid(format!(
                    "op {i} ({}) names tensor '{name}', which is not listed",
                    op.kind()
                ));
            }
        }
        if self.head.features == 0 || self.head.features >= self.ops.len() {
            return invalid(format!(
                "the feature map (value {}) is not inside the graph",
                self.head.features
            ));
        }
        if let Cam::Linear { weight } = &self.head.cam {
            if !tensors.contains_key(weight.as_str()) {
                return invalid(format!("the head's weight '{weight}' is not listed"));
            }
        }
        Ok(())
    }
}

/// An imported network, ready to run.
#[derive(Debug)]
pub struct Imported {
    config: ModelConfig,
    graph: Graph,
    layers: HashMap<String, Box<dyn ConvLayer>>,
    convs: Vec<ConvSpec>,
    fc_spec: LinearSpec,
    /// CAM's weights (zeros where [`Cam::Gradient`]).
    fc_weight: Tensor,
    cam_exact: bool,
    features: Value,
    /// The last op that reads each value (values die after it).
    last_read: Vec<usize>,
}

impl Imported {
    pub fn new(
        root: &nn::Path,
        config: &ModelConfig,
        factory: &dyn LayerFactory,
    ) -> Result<Self, ModelError> {
        let spec = config.graph.as_deref().ok_or_else(|| {
            ModelError::Invalid(
                "an onnx network is made by `gmpq import --onnx`: pass the checkpoint it wrote"
                    .into(),
            )
        })?;
        spec.validate()?;
        let mut tensors = HashMap::new();
        for t in &spec.tensors {
            let (parent, leaf) = match t.name.rsplit_once('.') {
                Some((p, l)) => (path_for(root, p), l),
                None => (root.clone(), t.name.as_str()),
            };
            // Zeros: an imported network always loads its checkpoint's values.
            let var = if t.trainable {
                parent.zeros(leaf, &t.shape)
            } else {
                parent.zeros_no_train(leaf, &t.shape)
            };
            tensors.insert(t.name.clone(), var);
        }
        let tensor = |name: &String| {
            tensors
                .get(name)
                .map(|t| t.shallow_clone())
                .ok_or_else(|| ModelError::Invalid(format!("no tensor '{name}'")))
        };
        let ops = spec
            .ops
            .iter()
            .map(|op| op.try_map(tensor))
            .collect::<Result<Vec<_>, _>>()?;
        let mut layers = HashMap::new();
        for c in &spec.convs {
            layers.insert(c.name.clone(), factory.conv(path_for(root, &c.name), c)?);
        }
        let mut last_read = vec![0; ops.len() + 1];
        for (i, op) in ops.iter().enumerate() {
            for v in op.inputs() {
                last_read[v] = i;
            }
        }
        let classes = config.num_classes as i64;
        let channels = spec.head.fc.in_features as i64;
        let fc_weight = match &spec.head.cam {
            Cam::Linear { weight } => tensor(weight)?,
            Cam::Identity => Tensor::eye(classes, (tch::Kind::Float, root.device())),
            Cam::Gradient => Tensor::zeros([classes, channels], (tch::Kind::Float, root.device())),
        };
        Ok(Self {
            config: config.clone(),
            fc_weight,
            cam_exact: spec.head.cam != Cam::Gradient,
            graph: Graph { ops },
            layers,
            convs: spec.convs.clone(),
            fc_spec: spec.head.fc.clone(),
            features: spec.head.features,
            last_read,
        })
    }

    /// Runs ops `from..to` on `values` (value `from` set), returning value `to`.
    fn run(&self, mut values: Vec<Option<Tensor>>, from: usize, to: usize, train: bool) -> Tensor {
        for i in from..to {
            let op = &self.graph.ops[i];
            let inputs: Vec<Tensor> = op
                .inputs()
                .into_iter()
                .map(|v| match &values[v] {
                    Some(t) => t.shallow_clone(),
                    // `validate` guarantees every read value exists; a missing one is a bug.
                    None => panic!("imported graph: value {v} read after it was dropped"),
                })
                .collect();
            let out = match op {
                Op::Conv { layer, .. } => self.layers[layer].forward_t(&inputs[0], train),
                _ => op.eval(&inputs, train),
            };
            for v in op.inputs() {
                if self.last_read[v] == i && v != to {
                    values[v] = None;
                }
            }
            values[i + 1] = Some(out);
        }
        values[to]
            .take()
            .unwrap_or_else(|| panic!("imported graph: value {to} not computed"))
    }

    fn values_with(&self, v: Value, t: &Tensor) -> Vec<Option<Tensor>> {
        let mut values: Vec<Option<Tensor>> = (0..=self.graph.ops.len()).map(|_| None).collect();
        values[v] = Some(t.shallow_clone());
        values
    }
}

impl Network for Imported {
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn convs(&self) -> &[ConvSpec] {
        &self.convs
    }
    fn fc_spec(&self) -> &LinearSpec {
        &self.fc_spec
    }
    fn features(&self, xs: &Tensor, train: bool) -> Tensor {
        self.run(self.values_with(0, xs), 0, self.features, train)
    }
    fn head(&self, features: &Tensor) -> Tensor {
        let end = self.graph.ops.len();
        let values = self.values_with(self.features, features);
        self.run(values, self.features, end, false)
    }
    fn fc_weight(&self) -> &Tensor {
        &self.fc_weight
    }
    fn cam_exact(&self) -> bool {
        self.cam_exact
    }
    fn graph(&self) -> Graph {
        let ops = self
            .graph
            .ops
            .iter()
            .map(|op| op.try_map(|t| Ok::<_, std::convert::Infallible>(t.shallow_clone())))
            .collect::<Result<Vec<_>, _>>()
            .unwrap_or_else(|e| match e {});
        Graph { ops }
    }
}
