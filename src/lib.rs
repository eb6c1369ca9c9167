//! gmpq — generalizable mixed-precision quantization for CNNs, on libtorch.
//!
//! The crate is laid out in layers; each module uses only modules of the layers above it
//! (no import circle: `tests/architecture.rs` reads every `crate::` path and checks):
//!
//! 1. [`model`], [`attribution`], [`files`], [`fields`], [`runtime`], `flags`: networks, CAM
//!    maps, atomic writes and locks, field diffs, process-level engine settings, the value
//!    parsers of the settings' command-line forms.
//! 2. [`data`] (images, loaders), [`policy`] (bits per layer, BOPs, size, and the numeric
//!    form a checkpoint records), [`dist`] (the process group of a data-parallel run).
//! 3. [`report`] (charts only: they draw plain values), [`checkpoint`] (persistence) →
//!    [`quant`] (quantizers, fixed-policy and supernet layers, integer numerics) → [`train`]
//!    and [`export`] → [`search`] (allocation methods: the supernet, HAWQ, uniform-fill,
//!    uniform, random; the search request `gmpq search` runs) and [`engine`] (ONNX Runtime).
//! 4. [`import`], [`predict`], [`bench`], `bops` (a policy's costs on its network).
//! 5. [`pipeline`] (a whole run and its page) → [`study`] (many runs and their tables).
//!
//! With the default `cli` feature, each command's settings derive their flags (clap) in the
//! module that runs them (`train::TrainArgs`, `search::SearchArgs`, `pipeline::PipelineSettings`,
//! …): a setting, its help and its default are written once. The `gmpq` binary is a thin
//! CLI over this library: it parses, calls one library function per command and prints.

pub mod attribution;
pub mod bench;
#[cfg(feature = "cli")]
pub mod bops;
pub mod checkpoint;
pub mod data;
pub mod dist;
pub mod engine;
pub mod export;
pub mod fields;
pub mod files;
#[cfg(feature = "cli")]
pub mod flags;
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
