//! The command-line form of `gmpq predict`.

use crate::flags::positive;
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct PredictArgs {
    /// The model: a checkpoint or packed file (.safetensors, runs in libtorch) or an ONNX
    /// model exported by gmpq export (.onnx, runs in ONNX Runtime).
    #[arg(long)]
    pub model: PathBuf,
    /// Image files (PNG or JPEG).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// How many classes to show per image.
    #[arg(long, default_value_t = 5, value_parser = positive(), allow_negative_numbers = true)]
    pub top: usize,
    /// Print the predictions as one JSON document on stdout.
    #[arg(long)]
    pub json: bool,
}
