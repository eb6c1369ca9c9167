//! The command-line form of `gmpq predict`.

use crate::flags::positive;
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct PredictArgs {
    /// The model: an ONNX model exported by gmpq export (.onnx) or an integer packed file
    /// (.safetensors of gmpq export --format packed from an integer checkpoint), both run in
    /// ONNX Runtime; or a checkpoint or fake-quant packed file (.safetensors), run in libtorch.
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
