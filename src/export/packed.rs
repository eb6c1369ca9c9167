//! The packed checkpoint: a safetensors file whose quantized kernels are bit-packed at their
//! policy bitwidth, so its size on disk is the policy's model size plus the float parts.
//!
//! Two tensors, laid out by the network the metadata describes (so no per-tensor index is
//! stored, which would be most of a small model's file):
//! - `kernels` (U8): every quantized layer's integers `q ∈ ±(2^(b−1) − 1)`, in policy order,
//!   as b-bit two's complement, least significant bit first, each layer starting on a byte;
//! - `floats` (F32): every other model tensor (batch norm, activation clips, weight
//!   thresholds `T`, the FP stem and classifier), in name order, concatenated.
//!
//! Metadata: the checkpoint's (`gmpq`, without its training history, calibration record and
//! search details, which stay in the original) and `gmpq.packed` (the format version).
//! Unpacking recomputes each scale `T/(2^(b−1) − 1)` with the quantizer's own operations and
//! sets `NAME.weight = q·s`, the quantizer's output, which it maps to itself: the unpacked
//! network computes exactly what the fine-tuned one did.

use super::weight_integers;
use super::ExportError;
use crate::checkpoint::{self, Checkpoint, CheckpointError, CheckpointMeta};
use crate::model::kernel_name;
use crate::quant::{Numerics, Precision, QuantizerTensor};
use onnx_protobuf::{Message, ModelProto};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tch::{Kind, Tensor};

pub use crate::checkpoint::PACKED_KEY;
const PACKED_FORMAT: u32 = 1;
const KERNELS: &str = "kernels";
const FLOATS: &str = "floats";

/// The packed form of an integer-numerics checkpoint: its ONNX graph (see
/// [`pack_integer`]).
const PACKED_INTEGER_FORMAT: u32 = 2;
const ONNX_GRAPH: &str = "onnx";

#[derive(Debug, Serialize, Deserialize)]
struct PackedHeader {
    format: u32,
}

/// `values` as `bits`-bit two's complement, least significant bit first.
pub fn pack_bits(values: &[i8], bits: u32) -> Vec<u8> {
    let mut out = vec![0u8; (values.len() * bits as usize).div_ceil(8)];
    let mask = (1u16 << bits) - 1;
    for (i, &v) in values.iter().enumerate() {
        let u = (v as i16 as u16) & mask;
        let bit = i * bits as usize;
        let (byte, shift) = (bit / 8, bit % 8);
        let word = u << shift;
        out[byte] |= word as u8;
        if shift + bits as usize > 8 {
            out[byte + 1] |= (word >> 8) as u8;
        }
    }
    out
}

/// The inverse of [`pack_bits`] for `count` values; `None` when `bytes` has the wrong length.
pub fn unpack_bits(bytes: &[u8], bits: u32, count: usize) -> Option<Vec<i8>> {
    if !(1..=8).contains(&bits) || bytes.len() != (count * bits as usize).div_ceil(8) {
        return None;
    }
    let mask = (1u16 << bits) - 1;
    let sign = 1u16 << (bits - 1);
    Some(
        (0..count)
            .map(|i| {
                let bit = i * bits as usize;
                let (byte, shift) = (bit / 8, bit % 8);
                let lo = bytes[byte] as u16;
                let hi = bytes.get(byte + 1).copied().unwrap_or(0) as u16;
                let u = ((lo | hi << 8) >> shift) & mask;
                // Sign-extend from `bits`.
                (if u & sign != 0 {
                    u as i16 - (1 << bits)
                } else {
                    u as i16
                }) as i8
            })
            .collect(),
    )
}

/// The names and shapes of a network's tensors, in name order, and its quantized layers'
/// `(name, w_bits)` in policy order.
type Layout = (BTreeMap<String, Vec<i64>>, Vec<(String, u32)>);

fn layout(meta: &CheckpointMeta) -> Result<Layout, String> {
    let precision = meta.precision.clone().unwrap_or(Precision::Full);
    let Precision::Fixed { policy, .. } = &precision else {
        return Err("only a fixed-policy (fine-tuned) checkpoint can be packed".into());
    };
    let layers = policy
        .layers
        .iter()
        .map(|l| (l.name.clone(), l.w_bits))
        .collect();
    let net = crate::quant::build(&meta.model, precision.clone(), tch::Device::Cpu)
        .map_err(|e| e.to_string())?;
    let shapes = net
        .vs
        .variables()
        .into_iter()
        .map(|(n, t)| (n, t.size()))
        .collect();
    Ok((shapes, layers))
}

/// The packed safetensors bytes of a fixed-policy checkpoint.
pub fn pack(ck: &Checkpoint) -> Result<Vec<u8>, ExportError> {
    if let Some(Precision::Fixed {
        numerics: Numerics::Integer,
        ..
    }) = &ck.meta.precision
    {
        return pack_integer(ck);
    }
    let (shapes, layers) = layout(&ck.meta).map_err(ExportError::Unsupported)?;
    let get = |name: &str| {
        ck.tensors
            .get(name)
            .ok_or_else(|| ExportError::Unsupported(format!("the checkpoint has no '{name}'")))
    };
    let mut kernels: Vec<u8> = Vec::new();
    let mut thresholds: HashMap<String, Tensor> = HashMap::new();
    for (name, bits) in &layers {
        if !(2..=8).contains(bits) {
            return Err(ExportError::Unsupported(format!(
                "layer '{name}' has {bits}-bit weights: the packed format holds 2 to 8 bits"
            )));
        }
        let t_name = QuantizerTensor::WeightThreshold.of(name);
        // An unset threshold becomes max|w|, as the quantizer's first forward pass sets it.
        let (q, _, threshold) = weight_integers(get(&kernel_name(name))?, get(&t_name)?, *bits);
        kernels.extend(pack_bits(&q, *bits));
        thresholds.insert(t_name, threshold);
    }
    let quantized: std::collections::HashSet<String> =
        layers.iter().map(|(n, _)| kernel_name(n)).collect();
    let mut floats: Vec<f32> = Vec::new();
    for name in shapes.keys().filter(|n| !quantized.contains(*n)) {
        let t = match thresholds.get(name) {
            Some(t) => t,
            None => get(name)?,
        };
        floats.extend(super::floats(t)?);
    }
    let tensors: BTreeMap<String, Tensor> = [
        (KERNELS.to_string(), Tensor::from_slice(&kernels)),
        (FLOATS.to_string(), Tensor::from_slice(&floats)),
    ]
    .into();
    packed_bytes(&tensors, &ck.meta, PACKED_FORMAT)
}

/// The packed file's bytes: `tensors`, the checkpoint's metadata without its training
/// history, calibration record and search details (they stay in the original), the format.
fn packed_bytes(
    tensors: &BTreeMap<String, Tensor>,
    meta: &CheckpointMeta,
    format: u32,
) -> Result<Vec<u8>, ExportError> {
    let mut meta = meta.clone();
    meta.history.clear();
    meta.calibration = None;
    meta.train = None;
    if let Some(Precision::Fixed { policy, .. }) = &mut meta.precision {
        policy.meta = None;
    }
    let meta_json = serde_json::to_string(&meta)
        .map_err(|e| ExportError::Unsupported(format!("metadata: {e}")))?;
    let header_json = serde_json::to_string(&PackedHeader { format })
        .map_err(|e| ExportError::Unsupported(format!("metadata: {e}")))?;
    let extra: HashMap<String, String> = [(PACKED_KEY.to_string(), header_json)].into();
    Ok(checkpoint::tensors_to_bytes_with(
        tensors, meta_json, extra,
    )?)
}

/// The name stem of an int8 kernel initializer in the integer ONNX graph.
const KERNEL_STEM: &str = ".weight_int8";

/// The layer an int8 kernel initializer (`LAYER.weight_int8.N`) belongs to.
fn kernel_layer(initializer: &str) -> Option<&str> {
    initializer
        .rsplit_once('.')
        .and_then(|(stem, _)| stem.strip_suffix(KERNEL_STEM))
}

/// Weight bits of each integer-graph layer's packed kernel: the policy's, 8 for the stem (its
/// 7-bit kernel, and a layer narrowed by the saturation rule, fit 8 bits).
fn kernel_bits(meta: &CheckpointMeta) -> HashMap<String, u32> {
    match &meta.precision {
        Some(Precision::Fixed { policy, .. }) => policy
            .layers
            .iter()
            .map(|l| (l.name.clone(), l.w_bits))
            .collect(),
        _ => HashMap::new(),
    }
}

/// An integer-numerics checkpoint packed as what ONNX Runtime runs: its integer ONNX graph
/// with every int8 kernel taken out and stored bit-packed at its layer's bits (`kernels`,
/// in initializer order; the 7-bit stem at 8), the rest of the graph as bytes (`onnx`).
/// [`integer_onnx`] puts the kernels back in memory.
pub fn pack_integer(ck: &Checkpoint) -> Result<Vec<u8>, ExportError> {
    let net = crate::quant::network_of(ck, Path::new("(checkpoint)"), tch::Device::Cpu)?;
    let onnx = super::onnx::export(ck, &net, super::onnx::OnnxOptions::default())?;
    let mut model = ModelProto::parse_from_bytes(&onnx)
        .map_err(|e| ExportError::Unsupported(format!("the exported graph: {e}")))?;
    let bits = kernel_bits(&ck.meta);
    let mut kernels: Vec<u8> = Vec::new();
    for init in model.graph.mut_or_insert_default().initializer.iter_mut() {
        let Some(layer) = kernel_layer(&init.name) else {
            continue;
        };
        let b = bits.get(layer).copied().unwrap_or(8);
        let q: Vec<i8> = init.raw_data.iter().map(|&v| v as i8).collect();
        kernels.extend(pack_bits(&q, b));
        init.raw_data.clear();
    }
    let graph = model
        .write_to_bytes()
        .map_err(|e| ExportError::Unsupported(format!("cannot encode the ONNX model: {e}")))?;
    let tensors: BTreeMap<String, Tensor> = [
        (KERNELS.to_string(), Tensor::from_slice(&kernels)),
        (ONNX_GRAPH.to_string(), Tensor::from_slice(&graph)),
    ]
    .into();
    packed_bytes(&tensors, &ck.meta, PACKED_INTEGER_FORMAT)
}

/// Whether `bytes` are a packed integer model (from the safetensors header alone).
pub fn is_integer(bytes: &[u8]) -> bool {
    safetensors::SafeTensors::read_metadata(bytes).is_ok_and(|(_, header)| {
        header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(PACKED_KEY))
            .and_then(|h| serde_json::from_str::<PackedHeader>(h).ok())
            .is_some_and(|h| h.format == PACKED_INTEGER_FORMAT)
    })
}

/// The ONNX model of a packed integer file, its int8 kernels unpacked in memory; `None` when
/// `bytes` is not one.
pub fn integer_onnx(path: &Path, bytes: &[u8]) -> Result<Option<Vec<u8>>, CheckpointError> {
    let corrupt = |reason: String| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        reason: format!("packed integer model: {reason}"),
    };
    if !is_integer(bytes) {
        return Ok(None);
    }
    let Ok((_, header)) = safetensors::SafeTensors::read_metadata(bytes) else {
        return Ok(None);
    };
    let meta: CheckpointMeta = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(checkpoint::META_KEY))
        .and_then(|m| serde_json::from_str(m).ok())
        .ok_or_else(|| corrupt("no gmpq metadata".into()))?;
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| corrupt(e.to_string()))?;
    let blob = |name: &str| {
        st.tensor(name)
            .map(|t| t.data().to_vec())
            .map_err(|e| corrupt(format!("'{name}': {e}")))
    };
    let kernels = blob(KERNELS)?;
    let graph = blob(ONNX_GRAPH)?;
    let mut model = ModelProto::parse_from_bytes(&graph).map_err(|e| corrupt(e.to_string()))?;
    let bits = kernel_bits(&meta);
    let mut at = 0usize;
    for init in model.graph.mut_or_insert_default().initializer.iter_mut() {
        let Some(layer) = kernel_layer(&init.name) else {
            continue;
        };
        let b = bits.get(layer).copied().unwrap_or(8);
        let count = init
            .dims
            .iter()
            .try_fold(1usize, |n, &d| {
                usize::try_from(d).ok().and_then(|d| n.checked_mul(d))
            })
            .ok_or_else(|| corrupt(format!("layer '{layer}': bad kernel shape")))?;
        let len = count
            .checked_mul(b as usize)
            .map(|bits| bits.div_ceil(8))
            .ok_or_else(|| corrupt(format!("layer '{layer}': bad kernel shape")))?;
        let q = at
            .checked_add(len)
            .and_then(|end| kernels.get(at..end))
            .and_then(|bytes| unpack_bits(bytes, b, count))
            .ok_or_else(|| corrupt(format!("the kernels end before layer '{layer}'")))?;
        at += len;
        init.raw_data = q.into_iter().map(|v| v as u8).collect();
    }
    if at != kernels.len() {
        return Err(corrupt(format!(
            "{} kernel bytes where the graph needs {at}",
            kernels.len()
        )));
    }
    model
        .write_to_bytes()
        .map(Some)
        .map_err(|e| corrupt(e.to_string()))
}

/// The model tensors of a packed file (read from `path`: its `gmpq` metadata `meta`, its
/// [`PACKED_KEY`] header and its two tensors).
pub fn unpack(
    path: &Path,
    meta: &CheckpointMeta,
    header_json: &str,
    packed: &BTreeMap<String, Tensor>,
) -> Result<BTreeMap<String, Tensor>, CheckpointError> {
    let corrupt = |reason: String| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        reason: format!("packed checkpoint: {reason}"),
    };
    let header: PackedHeader =
        serde_json::from_str(header_json).map_err(|e| corrupt(e.to_string()))?;
    if header.format == PACKED_INTEGER_FORMAT {
        return Err(CheckpointError::RunsInOnnxRuntime {
            path: path.to_path_buf(),
        });
    }
    if header.format != PACKED_FORMAT {
        return Err(corrupt(format!(
            "format {} (this gmpq reads {PACKED_FORMAT})",
            header.format
        )));
    }
    let (shapes, layers) = layout(meta).map_err(corrupt)?;
    let blob = |name: &str, kind: Kind| {
        packed
            .get(name)
            .filter(|t| t.kind() == kind && t.dim() == 1)
            .ok_or_else(|| corrupt(format!("no 1-D {kind:?} tensor '{name}'")))
    };
    let kernels =
        Vec::<u8>::try_from(blob(KERNELS, Kind::Uint8)?).map_err(|e| corrupt(e.to_string()))?;
    let floats = blob(FLOATS, Kind::Float)?;
    let numel = |shape: &[i64]| shape.iter().product::<i64>().max(0) as usize;
    let quantized: std::collections::HashSet<String> =
        layers.iter().map(|(n, _)| kernel_name(n)).collect();
    let mut out = BTreeMap::new();
    // Float tensors, in name order.
    let mut offset = 0i64;
    let total = floats.size()[0];
    for (name, shape) in shapes.iter().filter(|(n, _)| !quantized.contains(*n)) {
        let n = numel(shape) as i64;
        if offset + n > total {
            return Err(corrupt(format!("{total} floats are too few for the model")));
        }
        out.insert(
            name.clone(),
            floats.narrow(0, offset, n).reshape(&shape[..]),
        );
        offset += n;
    }
    if offset != total {
        return Err(corrupt(format!(
            "{total} floats where the model has {offset}"
        )));
    }
    // Kernels, in policy order.
    let mut at = 0usize;
    for (name, bits) in &layers {
        let shape = &shapes[&kernel_name(name)];
        let count = numel(shape);
        let len = (count * *bits as usize).div_ceil(8);
        let bytes = kernels
            .get(at..at + len)
            .ok_or_else(|| corrupt(format!("the kernels end before layer '{name}'")))?;
        let q = unpack_bits(bytes, *bits, count)
            .ok_or_else(|| corrupt(format!("layer '{name}': bad packed kernel")))?;
        at += len;
        let s = crate::quant::weight_scale(&out[&QuantizerTensor::WeightThreshold.of(name)], *bits);
        let qf: Vec<f32> = q.iter().map(|&v| v as f32).collect();
        out.insert(
            kernel_name(name),
            Tensor::from_slice(&qf).reshape(&shape[..]) * s,
        );
    }
    if at != kernels.len() {
        return Err(corrupt(format!(
            "{} kernel bytes where the policy needs {at}",
            kernels.len()
        )));
    }
    Ok(out)
}

/// Writes `ck` packed to `path` atomically; returns the file's size in bytes.
pub fn save(ck: &Checkpoint, path: &Path) -> Result<u64, ExportError> {
    let bytes = pack(ck)?;
    crate::files::write_atomic(path, &bytes).map_err(|source| ExportError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(bytes.len() as u64)
}

/// Reads a checkpoint or a packed file (unpacked to the network's tensors).
pub fn read(path: &Path) -> Result<Checkpoint, CheckpointError> {
    let (ck, packed) = Checkpoint::load_raw(path)?;
    match packed {
        None => Ok(ck),
        Some(header) => {
            let tensors = unpack(path, &ck.meta, &header, &ck.tensors)?;
            Ok(Checkpoint {
                meta: ck.meta,
                tensors,
            })
        }
    }
}
