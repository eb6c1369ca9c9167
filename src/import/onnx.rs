//! Reading an ONNX file into an [`ImportedGraph`]: its tensors (inline or in an external data
//! file), its nodes through the op table in [`super::ops`], and the head attribution needs.
//!
//! The reader walks the nodes in order (ONNX requires topological order) with a traced
//! sample: every value gets a real tensor, so shapes come from running the ops themselves,
//! and nodes whose inputs are all constant (shape arithmetic such as ShuffleNet's channel
//! shuffle: `Shape → Gather → Div → Reshape`) are folded into constants on the spot.

use super::walk::{Val, Walk};
use crate::data::Normalize;
use crate::model::ImportedGraph;
use onnx_protobuf::{
    attribute_proto::AttributeType, tensor_proto::DataLocation, tensor_proto::DataType,
    tensor_shape_proto::dimension, type_proto, AttributeProto, Message, ModelProto, NodeProto,
    TensorProto,
};
use protobuf::Enum;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum OnnxImportError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("not a readable ONNX model: {0}")]
    Corrupt(String),
    /// One node the op table cannot take.
    #[error("node '{node}' ({op}): {reason}")]
    Node {
        node: String,
        op: String,
        reason: String,
    },
    #[error("{0}")]
    Invalid(String),
}

/// What the flags add to the file: sizes the graph leaves dynamic, a name.
#[derive(Debug, Clone, Default)]
pub struct OnnxOptions {
    pub name: Option<String>,
    /// The square input resolution, where the graph's height and width are dynamic.
    pub input_size: Option<usize>,
    /// The input channels, where the graph leaves them dynamic.
    pub channels: Option<usize>,
}

/// An ONNX model read into gmpq's form.
#[derive(Debug)]
pub struct OnnxNetwork {
    pub graph: ImportedGraph,
    /// Every tensor by var-store name: conv kernels (`LAYER.weight`) and those the graph lists.
    pub tensors: BTreeMap<String, Tensor>,
    pub in_channels: usize,
    pub input_size: usize,
    pub num_classes: usize,
    /// The normalisation the graph began with (`Sub` a per-channel mean, `Div` a std), taken
    /// out of the graph into the checkpoint's preprocessing.
    pub normalize: Option<Normalize>,
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

/// External data files, read once each.
struct External<'a> {
    dir: Option<&'a Path>,
    files: HashMap<String, Vec<u8>>,
}

impl<'a> External<'a> {
    fn new(dir: Option<&'a Path>) -> Self {
        Self {
            dir,
            files: HashMap::new(),
        }
    }

    fn bytes(&mut self, t: &TensorProto) -> Result<&[u8], OnnxImportError> {
        let entry = |key: &str| {
            t.external_data
                .iter()
                .find(|e| e.key == key)
                .map(|e| e.value.clone())
        };
        let bad = |m: String| OnnxImportError::Corrupt(format!("tensor '{}': {m}", t.name));
        let location =
            entry("location").ok_or_else(|| bad("external data without a location".into()))?;
        let number = |key: &str| -> Result<Option<usize>, OnnxImportError> {
            entry(key)
                .map(|v| {
                    v.parse()
                        .map_err(|_| bad(format!("external data {key} '{v}'")))
                })
                .transpose()
        };
        let (offset, length) = (number("offset")?.unwrap_or(0), number("length")?);
        let dir = self.dir.ok_or_else(|| {
            bad("its data is in an external file, and no directory was given".into())
        })?;
        if Path::new(&location).is_absolute() || location.split(['/', '\\']).any(|p| p == "..") {
            return Err(bad(format!(
                "external data location '{location}' leaves the model's folder"
            )));
        }
        if !self.files.contains_key(&location) {
            let path = dir.join(&location);
            let data =
                std::fs::read(&path).map_err(|source| OnnxImportError::Io { path, source })?;
            self.files.insert(location.clone(), data);
        }
        let data = &self.files[&location];
        let end = match length {
            Some(l) => offset.checked_add(l),
            None => Some(data.len()),
        };
        match end {
            Some(end) if end <= data.len() && offset <= end => Ok(&data[offset..end]),
            _ => Err(bad(format!(
                "its external data ({location}, offset {offset}) runs past the file's {} bytes",
                data.len()
            ))),
        }
    }

    /// A tensor as a libtorch tensor (f32 for floats, i64 for integers).
    fn tensor(&mut self, t: &TensorProto) -> Result<Tensor, OnnxImportError> {
        let bad = |m: String| OnnxImportError::Corrupt(format!("tensor '{}': {m}", t.name));
        if t.dims.iter().any(|&d| d < 0) {
            return Err(bad(format!("negative dimension in {:?}", t.dims)));
        }
        let count = t
            .dims
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d as usize))
            .filter(|&n| n <= 1 << 31)
            .ok_or_else(|| bad(format!("{:?} is too large", t.dims)))?;
        let external = t.data_location.enum_value() == Ok(DataLocation::EXTERNAL);
        let raw: Vec<u8> = if external {
            self.bytes(t)?.to_vec()
        } else {
            t.raw_data.clone()
        };
        let kind = DataType::from_i32(t.data_type).unwrap_or(DataType::UNDEFINED);
        let (values_f32, values_i64): (Option<Vec<f32>>, Option<Vec<i64>>) = match kind {
            DataType::FLOAT if !raw.is_empty() => (Some(le(&raw, f32::from_le_bytes)), None),
            DataType::FLOAT => (Some(t.float_data.clone()), None),
            DataType::DOUBLE if !raw.is_empty() => (
                Some(
                    le(&raw, f64::from_le_bytes)
                        .into_iter()
                        .map(|v| v as f32)
                        .collect(),
                ),
                None,
            ),
            DataType::DOUBLE => (
                Some(t.double_data.iter().map(|&v| v as f32).collect()),
                None,
            ),
            DataType::INT64 if !raw.is_empty() => (None, Some(le(&raw, i64::from_le_bytes))),
            DataType::INT64 => (None, Some(t.int64_data.clone())),
            DataType::INT32 if !raw.is_empty() => (
                None,
                Some(
                    le(&raw, i32::from_le_bytes)
                        .into_iter()
                        .map(i64::from)
                        .collect(),
                ),
            ),
            DataType::INT32 | DataType::BOOL | DataType::INT8 | DataType::UINT8
                if raw.is_empty() =>
            {
                (None, Some(t.int32_data.iter().map(|&v| v as i64).collect()))
            }
            DataType::BOOL | DataType::UINT8 => {
                (None, Some(raw.iter().map(|&b| b as i64).collect()))
            }
            DataType::INT8 => (None, Some(raw.iter().map(|&b| b as i8 as i64).collect())),
            other => return Err(bad(format!("element type {other:?} is not supported"))),
        };
        let len = values_f32
            .as_ref()
            .map(Vec::len)
            .or(values_i64.as_ref().map(Vec::len));
        if len != Some(count) {
            return Err(bad(format!(
                "{:?} needs {count} values, the file holds {}",
                t.dims,
                len.unwrap_or(0)
            )));
        }
        let flat = match (values_f32, values_i64) {
            (Some(v), _) => Tensor::from_slice(&v),
            (_, Some(v)) => Tensor::from_slice(&v),
            _ => unreachable!("one of the two is set above"),
        };
        Ok(flat.reshape(t.dims.as_slice()))
    }
}

/// Little-endian values of `N` bytes each (a trailing partial value is dropped and then
/// caught by the count check).
fn le<const N: usize, T>(raw: &[u8], f: fn([u8; N]) -> T) -> Vec<T> {
    raw.chunks_exact(N)
        .map(|c| f(c.try_into().expect("chunks_exact yields N bytes")))
        .collect()
}

/// A node's attributes by name.
pub(super) struct Attrs {
    map: HashMap<String, AttributeProto>,
    tensor: Option<Tensor>,
}

impl Attrs {
    fn of(node: &NodeProto, external: &mut External) -> Result<Self, OnnxImportError> {
        let mut map = HashMap::new();
        let mut tensor = None;
        for a in &node.attribute {
            if a.type_.enum_value() == Ok(AttributeType::TENSOR) {
                if let Some(t) = a.t.as_ref() {
                    tensor = Some(external.tensor(t)?);
                }
            }
            if matches!(
                a.type_.enum_value(),
                Ok(AttributeType::GRAPH | AttributeType::GRAPHS)
            ) {
                return Err(OnnxImportError::Node {
                    node: node.name.clone(),
                    op: node.op_type.clone(),
                    reason: "control flow (a subgraph) is not supported: export the model in eval \
                             mode with static shapes"
                        .into(),
                });
            }
            map.insert(a.name.clone(), a.clone());
        }
        Ok(Self { map, tensor })
    }
    pub(super) fn int(&self, name: &str) -> Option<i64> {
        self.map.get(name).map(|a| a.i)
    }
    pub(super) fn float(&self, name: &str) -> Option<f32> {
        self.map.get(name).map(|a| a.f)
    }
    pub(super) fn ints(&self, name: &str) -> Option<Vec<i64>> {
        self.map.get(name).map(|a| a.ints.clone())
    }
    pub(super) fn string(&self, name: &str) -> Option<String> {
        self.map
            .get(name)
            .map(|a| String::from_utf8_lossy(&a.s).into_owned())
    }
    /// A `Constant` node's value (`value`, or `value_float(s)` / `value_int(s)`).
    pub(super) fn constant(&self) -> Option<Tensor> {
        if let Some(t) = &self.tensor {
            return Some(t.shallow_clone());
        }
        if let Some(a) = self.map.get("value_float") {
            return Some(Tensor::from(a.f));
        }
        if let Some(a) = self.map.get("value_floats") {
            return Some(Tensor::from_slice(&a.floats));
        }
        if let Some(a) = self.map.get("value_int") {
            return Some(Tensor::from(a.i));
        }
        self.map
            .get("value_ints")
            .map(|a| Tensor::from_slice(&a.ints))
    }
}

/// Ensures `t` is f32 (constants folded from integer shape arithmetic stay i64).
pub(super) fn float(t: &Tensor) -> Tensor {
    if t.kind() == Kind::Float {
        t.shallow_clone()
    } else {
        t.to_kind(Kind::Float)
    }
}
