//! The ONNX protobuf as gmpq reads it: tensors (inline or in an external data file), node
//! attributes, the one-line refusal of a node, and the error and result types of an import.

use crate::data::Normalize;
use crate::model::ImportedGraph;
use onnx_protobuf::{
    attribute_proto::AttributeType, tensor_proto::DataLocation, tensor_proto::DataType,
    AttributeProto, NodeProto, TensorProto,
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

/// External data files, read once each.
pub(super) struct External<'a> {
    dir: Option<&'a Path>,
    files: HashMap<String, Vec<u8>>,
}

impl<'a> External<'a> {
    pub(super) fn new(dir: Option<&'a Path>) -> Self {
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
    pub(super) fn tensor(&mut self, t: &TensorProto) -> Result<Tensor, OnnxImportError> {
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
    pub(super) fn of(node: &NodeProto, external: &mut External) -> Result<Self, OnnxImportError> {
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

/// One node's refusal.
pub(super) fn refuse(node: &NodeProto, reason: impl Into<String>) -> OnnxImportError {
    OnnxImportError::Node {
        node: node.name.clone(),
        op: node.op_type.clone(),
        reason: reason.into(),
    }
}

/// A tensor's values as i64 (constants of shape arithmetic).
pub(super) fn ints(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(t.to_kind(Kind::Int64).flatten(0, -1)).unwrap_or_default()
}

pub(super) fn floats(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1)).unwrap_or_default()
}

/// Runs `f` and turns a libtorch error (a panic in tch) into the node's refusal.
pub(super) fn guarded<T>(node: &NodeProto, f: impl FnOnce() -> T) -> Result<T, OnnxImportError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|e| {
        let msg = e
            .downcast_ref::<String>()
            .map(|s| s.lines().next().unwrap_or_default().to_string())
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        refuse(node, format!("its inputs do not fit together ({msg})"))
    })
}
