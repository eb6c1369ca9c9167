//! What an ONNX file's graph holds: its op types, and which of its ops compute in float (for
//! ONNX Runtime's optimized integer graph: what is left outside its integer kernels).

use super::EngineError;
use onnx_protobuf::tensor_proto::DataType;
use onnx_protobuf::{Message, ModelProto};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Nodes per op type.
pub type OpCounts = BTreeMap<String, usize>;

fn read(path: &Path) -> Result<ModelProto, EngineError> {
    let model_err = |reason: String| EngineError::Model {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| model_err(e.to_string()))?;
    ModelProto::parse_from_bytes(&bytes).map_err(|e| model_err(e.to_string()))
}

/// How many nodes of each op type an ONNX file holds (e.g. the optimized graph ONNX Runtime
/// wrote with [`super::SessionOptions::optimized_model`]).
pub fn op_counts(path: &Path) -> Result<OpCounts, EngineError> {
    Ok(all_ops(&read(path)?))
}

/// [`op_counts`] and [`float_op_counts`] of one file, read once.
pub fn op_and_float_counts(path: &Path) -> Result<(OpCounts, OpCounts), EngineError> {
    let model = read(path)?;
    Ok((all_ops(&model), float_ops(&model)))
}

fn all_ops(model: &ModelProto) -> OpCounts {
    let mut counts = BTreeMap::new();
    for node in &model.graph.node {
        *counts.entry(node.op_type.clone()).or_insert(0) += 1;
    }
    counts
}

/// Ops that move their first input's elements (or pick among them) and keep its type.
const TYPE_KEEPING: &[&str] = &[
    "Transpose",
    "Reshape",
    "Split",
    "Slice",
    "Concat",
    "MaxPool",
    "NhwcMaxPool",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Identity",
    "Clip",
    "Relu",
    "Gather",
];

/// The op types whose output is float32 and that are not a `DequantizeLinear`: the ops of a
/// graph that compute in float (types propagated from the inputs and initializers: the
/// QLinear ops and `QuantizeLinear` write uint8, the ops in `TYPE_KEEPING` keep their
/// input's type, every other op is taken to compute in float).
pub fn float_op_counts(path: &Path) -> Result<OpCounts, EngineError> {
    Ok(float_ops(&read(path)?))
}

fn float_ops(model: &ModelProto) -> OpCounts {
    let graph = &model.graph;
    let float = DataType::FLOAT as i32;
    let mut types: HashMap<&str, i32> = HashMap::new();
    for input in &graph.input {
        let t = input.type_.tensor_type().elem_type;
        types.insert(input.name.as_str(), if t == 0 { float } else { t });
    }
    for t in &graph.initializer {
        types.insert(t.name.as_str(), t.data_type);
    }
    let mut counts = BTreeMap::new();
    for node in &graph.node {
        let op = node.op_type.as_str();
        let first = node
            .input
            .first()
            .and_then(|i| types.get(i.as_str()).copied());
        let out = if op == "QuantizeLinear" || op.starts_with("QLinear") {
            DataType::UINT8 as i32
        } else if TYPE_KEEPING.contains(&op) {
            first.unwrap_or(float)
        } else {
            float
        };
        if out == float && op != "DequantizeLinear" {
            *counts.entry(node.op_type.clone()).or_insert(0) += 1;
        }
        for o in &node.output {
            types.insert(o.as_str(), out);
        }
    }
    counts
}
