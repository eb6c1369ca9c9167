//! Reading an ONNX file into an [`ImportedGraph`]: its tensors (inline or in an external data
//! file), its nodes through the op table in [`super::ops`], and the head attribution needs.
//!
//! The reader walks the nodes in order (ONNX requires topological order) with a traced
//! sample: every value gets a real tensor, so shapes come from running the ops themselves,
//! and nodes whose inputs are all constant (shape arithmetic such as ShuffleNet's channel
//! shuffle: `Shape → Gather → Div → Reshape`) are folded into constants on the spot.

use super::proto::{Attrs, External, OnnxImportError, OnnxNetwork};
use super::walk::{Val, Walk};
use onnx_protobuf::{
    tensor_proto::DataType, tensor_shape_proto::dimension, type_proto, Message, ModelProto,
};
use std::collections::HashMap;
use std::path::Path;
use tch::Tensor;

/// What the flags add to the file: sizes the graph leaves dynamic, a name.
#[derive(Debug, Clone, Default)]
pub struct OnnxOptions {
    pub name: Option<String>,
    /// The square input resolution, where the graph's height and width are dynamic.
    pub input_size: Option<usize>,
    /// The input channels, where the graph leaves them dynamic.
    pub channels: Option<usize>,
}

/// Reads `path` (and its external data, beside it).
pub fn read(path: &Path, opts: &OnnxOptions) -> Result<OnnxNetwork, OnnxImportError> {
    let bytes = std::fs::read(path).map_err(|source| OnnxImportError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut opts = opts.clone();
    if opts.name.is_none() {
        opts.name = path.file_stem().map(|s| s.to_string_lossy().into_owned());
    }
    parse(&bytes, Some(dir), &opts)
}

/// Reads an ONNX model from `bytes`; external data is looked up in `dir` (none: refused).
pub fn parse(
    bytes: &[u8],
    dir: Option<&Path>,
    opts: &OnnxOptions,
) -> Result<OnnxNetwork, OnnxImportError> {
    let model =
        ModelProto::parse_from_bytes(bytes).map_err(|e| OnnxImportError::Corrupt(e.to_string()))?;
    let graph = model
        .graph
        .as_ref()
        .ok_or_else(|| OnnxImportError::Corrupt("the model has no graph".into()))?;
    if graph.node.is_empty() {
        return Err(OnnxImportError::Corrupt("the graph has no nodes".into()));
    }
    let mut external = External::new(dir);
    let mut consts: HashMap<String, Tensor> = HashMap::new();
    for t in &graph.initializer {
        consts.insert(t.name.clone(), external.tensor(t)?);
    }
    let input = graph_input(&model, &consts, opts)?;
    let mut walk = Walk::new(input.channels, input.size, input.batch, &graph.node);
    walk.vals.insert(input.name.clone(), Val::INPUT);
    for (name, t) in consts {
        walk.vals.insert(name, Val::Const(t));
    }
    for node in &graph.node {
        let (op, attrs) = (node.op_type.as_str(), Attrs::of(node, &mut external)?);
        walk.node(node, op, &attrs)?;
    }
    let out_name = match graph.output.as_slice() {
        [one] => one.name.clone(),
        outputs => {
            return Err(OnnxImportError::Invalid(format!(
                "the graph has {} outputs; a classifier has one (N×classes)",
                outputs.len()
            )))
        }
    };
    let name = opts
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| graph.name.clone());
    walk.finish(&out_name, name)
}

/// The graph's one image input.
struct Input {
    name: String,
    channels: usize,
    size: usize,
    batch: i64,
}

fn graph_input(
    model: &ModelProto,
    consts: &HashMap<String, Tensor>,
    opts: &OnnxOptions,
) -> Result<Input, OnnxImportError> {
    let graph = model.graph.as_ref().expect("checked by the caller");
    // Old exporters list initializers among the inputs too.
    let inputs: Vec<_> = graph
        .input
        .iter()
        .filter(|i| !consts.contains_key(&i.name))
        .collect();
    let [input] = inputs.as_slice() else {
        return Err(OnnxImportError::Invalid(format!(
            "the graph has {} inputs; gmpq imports a network with one image input",
            inputs.len()
        )));
    };
    let dims: Vec<Option<i64>> = match input.type_.as_ref().and_then(|t| t.value.as_ref()) {
        Some(type_proto::Value::TensorType(t)) => {
            if t.elem_type != DataType::FLOAT as i32 {
                return Err(OnnxImportError::Invalid(format!(
                    "input '{}' is not float32",
                    input.name
                )));
            }
            t.shape
                .as_ref()
                .map(|s| {
                    s.dim
                        .iter()
                        .map(|d| match d.value {
                            Some(dimension::Value::DimValue(v)) if v > 0 => Some(v),
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default()
        }
        _ => Vec::new(),
    };
    if dims.len() != 4 {
        return Err(OnnxImportError::Invalid(format!(
            "input '{}' has {} dimensions; gmpq imports CNNs on N×C×H×W images",
            input.name,
            dims.len()
        )));
    }
    let given = |d: Option<i64>, flag: Option<usize>, what: &str, name: &str| {
        match (d, flag) {
            (Some(d), Some(f)) if d as usize != f => Err(OnnxImportError::Invalid(format!(
                "{what} {f} contradicts the graph's {d}; {name} applies only where the graph leaves it open"
            ))),
            (Some(d), _) => Ok(d as usize),
            (None, Some(f)) => Ok(f),
            (None, None) => Err(OnnxImportError::Invalid(format!(
                "the graph leaves the input's {what} open: give it with {name}"
            ))),
        }
    };
    let channels = given(dims[1], opts.channels, "channels", "--channels")?;
    let h = given(dims[2], opts.input_size, "height", "--input-size")?;
    let w = given(dims[3], opts.input_size, "width", "--input-size")?;
    if h != w {
        return Err(OnnxImportError::Invalid(format!(
            "the input is {h}×{w}; gmpq imports square inputs"
        )));
    }
    if channels > 64 || h > 4096 {
        return Err(OnnxImportError::Invalid(format!(
            "the input is {channels}×{h}×{w}: not an image"
        )));
    }
    Ok(Input {
        name: input.name.clone(),
        channels,
        size: h,
        batch: dims[0].unwrap_or(1),
    })
}
