//! gmpq — generalizable mixed-precision quantization for CNNs, on libtorch.
//!
//! The crate is laid out as the pipeline: [`data`] → [`model`] → [`quant`] (quantizers,
//! fixed-policy and supernet layers, integer numerics) → [`attribution`] → [`search`] →
//! [`train`] (with [`checkpoint`] persistence) → [`policy`] (bits per layer, BOPs, size) →
//! [`export`] / [`engine`] (ONNX and packed files, ONNX Runtime) → [`pipeline`] (a whole run)
//! → [`report`] → [`study`] (many runs and their tables). Beside them: [`import`] reads foreign
//! weights, [`predict`] classifies images, [`bench`] measures, [`files`] holds atomic writes
//! and folder locks, [`runtime`] process-level engine settings and [`dist`] the process
//! group of a data-parallel run. The `gmpq` binary is a thin CLI over this library.

pub mod attribution;
pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod dist;
pub mod engine;
pub mod export;
pub mod fields;
pub mod files;
pub mod import;
pub mod model;
pub mod pipeline;
pub mod policy;
pub mod predict;
pub mod quant;
pub mod report;
pub mod runtime;
pub mod search;
pub mod study;
pub mod train;

pub use checkpoint::{Checkpoint, CheckpointError, CheckpointMeta};
pub use data::{DataError, DatasetSpec};
pub use model::{Arch, Model, ModelConfig, ResNet, Stem};
