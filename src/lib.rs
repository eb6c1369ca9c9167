//! gmpq — generalizable mixed-precision quantization for CNNs, on libtorch.
//!
//! The crate is laid out in layers; each module uses only modules of the layers above it
//! (no import circle: `tests/architecture.rs` reads every `crate::` path and checks):
//!
//! 1. [`model`], [`attribution`], [`files`], [`fields`], [`runtime`]: networks, CAM maps,
//!    atomic writes and locks, field diffs, process-level engine settings.
//! 2. [`data`] (images, loaders), [`policy`] (bits per layer, BOPs, size, and the numeric
//!    form a checkpoint records), [`dist`] (the process group of a data-parallel run).
//! 3. [`report`] (charts only: they draw plain values), [`checkpoint`] (persistence) →
//!    [`quant`] (quantizers, fixed-policy and supernet layers, integer numerics) → [`train`]
//!    and [`export`] → [`search`] (allocation methods: the supernet, HAWQ, uniform-fill,
//!    uniform, random; the search request `gmpq search` runs) and [`engine`] (ONNX Runtime).
//! 4. [`import`], [`predict`], [`bench`].
//! 5. [`pipeline`] (a whole run and its page) → [`study`] (many runs and their tables).
//!
//! The `gmpq` binary is a thin CLI over this library.

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
