//! The walk over an ONNX graph's nodes: what each name holds (a constant or a graph value with
//! a traced sample), the op table's dispatch ([`Walk::translate`]), and the finished network.
//! The table's arms are in `ops` (layers, arithmetic) and `layout` (shapes, pooling);
//! constant subgraphs are folded in `fold`.

use super::head::find_head;
use super::names::Names;
use super::proto::{float, guarded, refuse, Attrs, OnnxImportError, OnnxNetwork};
use crate::data::Normalize;
use crate::model::graph::{Op, Value};
use crate::model::kernel_name;
use crate::model::{ConvSpec, ImportedGraph, TensorSpec};
use onnx_protobuf::NodeProto;
use std::collections::{BTreeMap, HashMap};
use tch::{Kind, Tensor};

/// The ONNX op types the table takes (for the refusal of any other).
pub const SUPPORTED: &[&str] = &[
    "Conv",
    "Gemm",
    "MatMul",
    "BatchNormalization",
    "Relu",
    "Clip",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Concat",
    "Split",
    "Slice",
    "Transpose",
    "Reshape",
    "Flatten",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "ReduceMean",
    "Identity",
    "Dropout",
    "Constant",
    "Shape",
    "Gather",
    "Unsqueeze",
    "Squeeze",
    "Cast",
];

/// A named value during the walk: a constant, or a value of the graph.
pub(super) enum Val {
    Const(Tensor),
    Dyn {
        value: Value,
        /// Never negative (after a ReLU, a sigmoid, …): a conv reading it quantizes unsigned.
        nonneg: bool,
    },
}

impl Val {
    /// The graph's (normalised) image: value 0, signed.
    pub(super) const INPUT: Val = Val::Dyn {
        value: 0,
        nonneg: false,
    };
    fn copy(&self) -> Self {
        match self {
            Val::Const(t) => Val::Const(t.shallow_clone()),
            Val::Dyn { value, nonneg } => Val::Dyn {
                value: *value,
                nonneg: *nonneg,
            },
        }
    }
}

/// Taking the graph's leading normalisation (`Sub` mean, `Div` std) into the preprocessing.
pub(super) enum Lift {
    Open,
    Mean { output: String, mean: Vec<f32> },
    Done,
}

/// The walk over the nodes: what each name holds, the ops made so far, a traced sample.
pub(super) struct Walk {
    pub(super) vals: HashMap<String, Val>,
    /// A sample's value for every graph value (shapes, and the folding of `Shape`).
    pub(super) traced: Vec<Tensor>,
    pub(super) ops: Vec<Op<String>>,
    pub(super) convs: Vec<ConvSpec>,
    pub(super) tensors: Vec<(TensorSpec, Tensor)>,
    pub(super) by_name: HashMap<String, Tensor>,
    pub(super) kernels: HashMap<String, Tensor>,
    pub(super) names: Names,
    pub(super) readers: HashMap<String, usize>,
    pub(super) lift: Lift,
    pub(super) normalize: Option<Normalize>,
    pub(super) channels: usize,
    pub(super) size: usize,
    pub(super) batch: i64,
}

impl Walk {
    pub(super) fn new(channels: usize, size: usize, batch: i64, nodes: &[NodeProto]) -> Self {
        let n = batch * (channels * size * size) as i64;
        // A deterministic sample: only shapes and shape arithmetic are read from it.
        let sample = (Tensor::arange(n, (Kind::Float, tch::Device::Cpu)) * 0.37)
            .sin()
            .reshape([batch, channels as i64, size as i64, size as i64]);
        let mut readers = HashMap::new();
        for node in nodes {
            for i in &node.input {
                *readers.entry(i.clone()).or_insert(0) += 1;
            }
        }
        Self {
            vals: HashMap::new(),
            traced: vec![sample],
            ops: Vec::new(),
            convs: Vec::new(),
            tensors: Vec::new(),
            by_name: HashMap::new(),
            kernels: HashMap::new(),
            names: Names::default(),
            readers,
            lift: Lift::Open,
            normalize: None,
            channels,
            size,
            batch,
        }
    }

    pub(super) fn get(&self, node: &NodeProto, i: usize) -> Result<Option<Val>, OnnxImportError> {
        match node.input.get(i).map(String::as_str) {
            None | Some("") => Ok(None),
            Some(name) => self.vals.get(name).map(|v| Some(v.copy())).ok_or_else(|| {
                refuse(
                    node,
                    format!("reads '{name}', which no earlier node or initializer makes"),
                )
            }),
        }
    }

    pub(super) fn dynamic(
        &self,
        node: &NodeProto,
        i: usize,
    ) -> Result<(Value, bool), OnnxImportError> {
        match self.get(node, i)? {
            Some(Val::Dyn { value, nonneg }) => Ok((value, nonneg)),
            Some(Val::Const(_)) => Err(refuse(
                node,
                format!("input {i} is a constant where a feature map was expected"),
            )),
            None => Err(refuse(node, format!("input {i} is missing"))),
        }
    }

    pub(super) fn constant(
        &self,
        node: &NodeProto,
        i: usize,
        what: &str,
    ) -> Result<Option<Tensor>, OnnxImportError> {
        match self.get(node, i)? {
            Some(Val::Const(t)) => Ok(Some(t)),
            Some(Val::Dyn { .. }) => Err(refuse(node, format!("its {what} is computed in the graph, not a constant; gmpq imports fixed weights and shapes"))),
            None => Ok(None),
        }
    }

    fn output(&mut self, node: &NodeProto, i: usize, v: Val) {
        if let Some(name) = node.output.get(i) {
            self.vals.insert(name.clone(), v);
        }
    }

    pub(super) fn shape(&self, v: Value) -> Vec<i64> {
        self.traced[v].size()
    }

    /// Registers a tensor under a fresh name `PREFIX.LEAF`.
    pub(super) fn tensor(
        &mut self,
        prefix: &str,
        leaf: &str,
        t: Tensor,
        trainable: bool,
    ) -> String {
        let name = format!("{prefix}.{leaf}");
        let t = float(&t);
        self.tensors.push((
            TensorSpec {
                name: name.clone(),
                shape: t.size(),
                trainable,
            },
            t.shallow_clone(),
        ));
        self.by_name.insert(name.clone(), t);
        name
    }

    /// Appends `op`, tracing its value; `nonneg` says whether it can be negative.
    pub(super) fn push(
        &mut self,
        node: &NodeProto,
        op: Op<String>,
        nonneg: bool,
    ) -> Result<Val, OnnxImportError> {
        let value = self.push_value(node, op)?;
        Ok(Val::Dyn { value, nonneg })
    }

    /// [`Self::push`], returning the new value.
    pub(super) fn push_value(
        &mut self,
        node: &NodeProto,
        op: Op<String>,
    ) -> Result<Value, OnnxImportError> {
        let live = op
            .try_map(|n| self.by_name.get(n).map(|t| t.shallow_clone()).ok_or(()))
            .map_err(|_| refuse(node, "names a tensor it did not register"))?;
        let inputs: Vec<Tensor> = op
            .inputs()
            .iter()
            .map(|&v| self.traced[v].shallow_clone())
            .collect();
        let traced = match &op {
            Op::Conv { layer, .. } => {
                let spec = self.convs.iter().find(|c| &c.name == layer).cloned();
                let kernel = self.kernels.get(layer).map(|k| k.shallow_clone());
                match (spec, kernel) {
                    (Some(s), Some(k)) => guarded(node, || {
                        inputs[0].conv2d(
                            &k,
                            None::<Tensor>,
                            [s.stride as i64; 2],
                            [s.padding as i64; 2],
                            [1, 1],
                            s.groups as i64,
                        )
                    })?,
                    _ => return Err(refuse(node, "conv registered without its kernel")),
                }
            }
            _ => guarded(node, || tch::no_grad(|| live.eval(&inputs, false)))?,
        };
        self.traced.push(traced);
        self.ops.push(op);
        Ok(self.ops.len())
    }

    /// One node: a constant, a `Shape`, a fold of constants, or an op of the table.
    pub(super) fn node(
        &mut self,
        node: &NodeProto,
        op: &str,
        a: &Attrs,
    ) -> Result<(), OnnxImportError> {
        if !node.domain.is_empty() && node.domain != "ai.onnx" {
            return Err(refuse(
                node,
                format!("custom domain '{}' is not supported", node.domain),
            ));
        }
        if !matches!(op, "Sub" | "Div") {
            self.close_lift();
        }
        let inputs: Vec<Option<Val>> = (0..node.input.len())
            .map(|i| self.get(node, i))
            .collect::<Result<_, _>>()?;
        let constants: Option<Vec<Option<Tensor>>> = inputs
            .iter()
            .map(|v| match v {
                None => Some(None),
                Some(Val::Const(t)) => Some(Some(t.shallow_clone())),
                Some(Val::Dyn { .. }) => None,
            })
            .collect();
        let outputs = match (op, constants) {
            ("Constant", _) => {
                let t = a
                    .constant()
                    .ok_or_else(|| refuse(node, "a Constant without a value"))?;
                vec![Val::Const(t)]
            }
            ("Shape", _) => vec![self.shape_of(node, inputs.first(), a)?],
            (_, Some(c)) if !c.is_empty() => {
                vec![Val::Const(super::fold::fold(node, op, a, &c)?)]
            }
            _ => self.translate(node, op, a)?,
        };
        for (i, v) in outputs.into_iter().enumerate() {
            self.output(node, i, v);
        }
        Ok(())
    }

    /// `Shape` (with its `start`/`end`), a constant: the traced shape.
    fn shape_of(
        &self,
        node: &NodeProto,
        input: Option<&Option<Val>>,
        a: &Attrs,
    ) -> Result<Val, OnnxImportError> {
        let shape = match input.and_then(|v| v.as_ref()) {
            Some(Val::Const(t)) => t.size(),
            Some(Val::Dyn { value, .. }) => self.shape(*value),
            None => return Err(refuse(node, "input 0 is missing")),
        };
        let rank = shape.len() as i64;
        let clamp = |i: i64| (if i < 0 { i + rank } else { i }).clamp(0, rank) as usize;
        let (start, end) = (
            clamp(a.int("start").unwrap_or(0)),
            clamp(a.int("end").unwrap_or(rank)),
        );
        let part = shape.get(start..end.max(start)).unwrap_or(&[]).to_vec();
        Ok(Val::Const(Tensor::from_slice(&part)))
    }

    /// The op table: one arm per ONNX op type on a feature map, its outputs in order.
    fn translate(
        &mut self,
        node: &NodeProto,
        op: &str,
        a: &Attrs,
    ) -> Result<Vec<Val>, OnnxImportError> {
        let one = |v: Result<Val, OnnxImportError>| v.map(|v| vec![v]);
        match op {
            "Identity" | "Dropout" => one(self
                .get(node, 0)?
                .ok_or_else(|| refuse(node, "input 0 is missing"))),
            "Conv" => one(self.conv(node, a)),
            "Gemm" | "MatMul" => one(self.linear(node, op, a)),
            "BatchNormalization" => one(self.batch_norm(node, a)),
            "Relu" | "Sigmoid" | "HardSwish" | "HardSigmoid" | "Clip" => {
                one(self.activation(node, op, a))
            }
            "Add" | "Sub" | "Mul" | "Div" => one(self.binary(node, op)),
            "Concat" => one(self.concat(node, a)),
            "Split" => self.split(node, a),
            "Slice" => one(self.slice(node, a)),
            "Transpose" => one(self.transpose(node, a)),
            "Reshape" => one(self.reshape(node, a)),
            "Flatten" => one(self.flatten(node, a)),
            "MaxPool" | "AveragePool" => one(self.pool(node, op, a)),
            "GlobalAveragePool" | "ReduceMean" => one(self.reduce_mean(node, op, a)),
            "If" | "Loop" | "Scan" => Err(refuse(
                node,
                "control flow is not supported: export the model in eval mode with static shapes",
            )),
            other => Err(refuse(
                node,
                format!(
                    "{other} on a feature map is not supported (gmpq imports {})",
                    SUPPORTED.join(", ")
                ),
            )),
        }
    }

    /// The graph, its tensors and its head, once every node is read.
    pub(super) fn finish(
        mut self,
        output: &str,
        name: String,
    ) -> Result<OnnxNetwork, OnnxImportError> {
        self.close_lift();
        let out = match self.vals.get(output) {
            Some(Val::Dyn { value, .. }) => *value,
            Some(Val::Const(_)) => {
                return Err(OnnxImportError::Invalid(
                    "the output does not depend on the input".into(),
                ))
            }
            None => {
                return Err(OnnxImportError::Invalid(format!(
                    "no node makes the output '{output}'"
                )))
            }
        };
        let out_shape = self.shape(out);
        let [batch, classes] = out_shape[..] else {
            return Err(OnnxImportError::Invalid(format!(
                "the output is {out_shape:?}, not N×classes: gmpq imports classifiers"
            )));
        };
        if batch != self.batch || classes < 2 {
            return Err(OnnxImportError::Invalid(format!(
                "the output is {out_shape:?}, not N×classes"
            )));
        }
        if self.convs.iter().filter(|c| c.quantizable).count() == 0 {
            return Err(OnnxImportError::Invalid(
                "the graph has no conv layer to quantize".into(),
            ));
        }
        let head = find_head(&self.ops, out, &self.tensors).map_err(|why| {
            OnnxImportError::Invalid(format!(
                "no classifier head found ({why}): gmpq needs global average pooling, then \
                 linear layers, at the end"
            ))
        })?;
        let mut tensors = BTreeMap::new();
        for (layer, kernel) in &self.kernels {
            tensors.insert(kernel_name(layer), kernel.shallow_clone());
        }
        for (s, t) in &self.tensors {
            tensors.insert(s.name.clone(), t.shallow_clone());
        }
        let graph = ImportedGraph {
            name,
            ops: self.ops,
            convs: self.convs,
            tensors: self.tensors.into_iter().map(|(s, _)| s).collect(),
            head,
        };
        graph
            .validate()
            .map_err(|e| OnnxImportError::Invalid(e.to_string()))?;
        Ok(OnnxNetwork {
            graph,
            tensors,
            in_channels: self.channels,
            input_size: self.size,
            num_classes: classes as usize,
            normalize: self.normalize,
        })
    }
}
