//! Leaving gmpq: the fine-tuned fake-quantized network as an ONNX QDQ graph (integer
//! inference in any ONNX runtime) or as a bit-packed safetensors file whose size is the
//! policy's.

#[cfg(feature = "cli")]
mod args;
mod builder;
mod integer;
pub mod onnx;
pub mod packed;
pub mod saturation;

#[cfg(feature = "cli")]
pub use args::{ExportArgs, ExportFormat, Exported};

/// The formats a fine-tuned network ships in, behind one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// ONNX: the integer graph (integer numerics) or QDQ (fake-quant), see [`onnx`].
    Onnx,
    /// ONNX of the float network, quantizers left out (for comparison).
    OnnxFloat,
    /// The kernels bit-packed at their policy widths, see [`packed`].
    Packed,
}

impl Format {
    /// The bytes of `net` (loaded from `ck`) in this format.
    pub fn write(self, ck: &Checkpoint, net: &Network) -> Result<Vec<u8>, ExportError> {
        match self {
            Format::Onnx | Format::OnnxFloat => onnx::export(
                ck,
                net,
                onnx::OnnxOptions {
                    full_precision: self == Format::OnnxFloat,
                },
            ),
            Format::Packed => packed::pack(ck),
        }
    }
}

use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::quant::{Network, QuantError};
use std::path::PathBuf;
use tch::{Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The checkpoint holds something the format cannot express (names the layer).
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Quant(#[from] QuantError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Loads a checkpoint or a packed file (unpacked) and builds its network on `device`.
pub fn load(
    path: &std::path::Path,
    device: tch::Device,
) -> Result<(crate::checkpoint::Checkpoint, crate::quant::Network), ExportError> {
    let ck = packed::read(path)?;
    let network = crate::quant::network_of(&ck, path, device)?;
    Ok((ck, network))
}

/// A float tensor's values (any layout), row-major.
pub(crate) fn floats(t: &Tensor) -> Result<Vec<f32>, ExportError> {
    Vec::<f32>::try_from(t.to_kind(Kind::Float).contiguous().flatten(0, -1))
        .map_err(|e| ExportError::Unsupported(format!("cannot read a tensor: {e}")))
}

/// The weight quantizer's integers `round(clamp(w, −T, T)/s)` and scales `s = T/(2^(b−1)−1)`
/// (one per tensor, or one per output channel), computed with the quantizer's own float
/// operations so `q·s` is its output exactly. An unset threshold (0) is `max|w|`, as the
/// quantizer's first forward pass sets it.
/// Also returns the threshold used.
pub(crate) fn weight_integers(
    w: &Tensor,
    threshold: &Tensor,
    bits: u32,
) -> (Vec<i8>, Vec<f32>, Tensor) {
    tch::no_grad(|| {
        let w = w.to_kind(Kind::Float);
        let t = if threshold.min().double_value(&[]) > 0.0 {
            threshold.to_kind(Kind::Float)
        } else {
            crate::quant::initial_threshold(&w, threshold.dim() != 0)
        };
        let s = crate::quant::weight_scale(&t, bits);
        let q = (w.clamp_tensor(Some(&-&t), Some(&t)) / &s).round();
        let q: Vec<f32> = Vec::try_from(q.flatten(0, -1)).unwrap_or_default();
        let s: Vec<f32> = Vec::try_from(s.flatten(0, -1)).unwrap_or_default();
        (q.into_iter().map(|v| v as i8).collect(), s, t)
    })
}
