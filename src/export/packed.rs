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

use super::onnx::weight_integers;
use super::ExportError;
use crate::checkpoint::{self, Checkpoint, CheckpointError, CheckpointMeta};
use crate::quant::Precision;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tch::{Kind, Tensor};

/// The safetensors metadata key that marks a packed checkpoint.
pub const PACKED_KEY: &str = "gmpq.packed";
const PACKED_FORMAT: u32 = 1;
const KERNELS: &str = "kernels";
const FLOATS: &str = "floats";

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
        let t_name = format!("{name}.weight_threshold");
        // An unset threshold becomes max|w|, as the quantizer's first forward pass sets it.
        let (q, _, threshold) =
            weight_integers(get(&format!("{name}.weight"))?, get(&t_name)?, *bits);
        kernels.extend(pack_bits(&q, *bits));
        thresholds.insert(t_name, threshold);
    }
    let quantized: std::collections::HashSet<String> =
        layers.iter().map(|(n, _)| format!("{n}.weight")).collect();
    let mut floats: Vec<f32> = Vec::new();
    for name in shapes.keys().filter(|n| !quantized.contains(*n)) {
        let t = match thresholds.get(name) {
            Some(t) => t,
            None => get(name)?,
        };
        floats.extend(super::onnx::floats(t)?);
    }
    let mut meta = ck.meta.clone();
    meta.history.clear();
    meta.calibration = None;
    meta.train = None;
    if let Some(Precision::Fixed { policy, .. }) = &mut meta.precision {
        policy.meta = None;
    }
    let meta_json = serde_json::to_string(&meta)
        .map_err(|e| ExportError::Unsupported(format!("metadata: {e}")))?;
    let header_json = serde_json::to_string(&PackedHeader {
        format: PACKED_FORMAT,
    })
    .map_err(|e| ExportError::Unsupported(format!("metadata: {e}")))?;
    let extra: HashMap<String, String> = [(PACKED_KEY.to_string(), header_json)].into();
    let tensors: BTreeMap<String, Tensor> = [
        (KERNELS.to_string(), Tensor::from_slice(&kernels)),
        (FLOATS.to_string(), Tensor::from_slice(&floats)),
    ]
    .into();
    Ok(checkpoint::tensors_to_bytes_with(
        &tensors, meta_json, extra,
    )?)
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
        layers.iter().map(|(n, _)| format!("{n}.weight")).collect();
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
        let shape = &shapes[&format!("{name}.weight")];
        let count = numel(shape);
        let len = (count * *bits as usize).div_ceil(8);
        let bytes = kernels
            .get(at..at + len)
            .ok_or_else(|| corrupt(format!("the kernels end before layer '{name}'")))?;
        let q = unpack_bits(bytes, *bits, count)
            .ok_or_else(|| corrupt(format!("layer '{name}': bad packed kernel")))?;
        at += len;
        let s = crate::quant::weight_scale(&out[&format!("{name}.weight_threshold")], *bits);
        let qf: Vec<f32> = q.iter().map(|&v| v as f32).collect();
        out.insert(
            format!("{name}.weight"),
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
    checkpoint::write_atomic(path, &bytes).map_err(|source| ExportError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(bytes.len() as u64)
}
