//! Leaving gmpq: the fine-tuned fake-quantized network as an ONNX QDQ graph (integer
//! inference in any ONNX runtime) or as a bit-packed safetensors file whose size is the
//! policy's.

mod integer;
pub mod onnx;
pub mod packed;

use crate::checkpoint::CheckpointError;
use crate::quant::QuantError;
use std::path::PathBuf;

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
