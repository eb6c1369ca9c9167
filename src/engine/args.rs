//! The command-line form of `gmpq eval`, and the evaluation it states.

use super::{EngineError, EvalRequest};
use crate::data::{parse_spec_flag, DatasetKind, Split, SubsetArgs, SubsetSpec};
use crate::flags::positive;
use clap::Args;
use std::path::PathBuf;

/// Dataset splits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SplitArg {
    Train,
    Test,
    /// Image folders' val/ (their test images).
    Val,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("model").required(true).multiple(true).args(["checkpoint", "onnx"])))]
pub struct EvalArgs {
    /// A gmpq checkpoint (full precision, fine-tuned, or packed).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// An ONNX model from `gmpq export`, run through ONNX Runtime. With --checkpoint too,
    /// both run on the same batches and their agreement is reported.
    #[arg(long)]
    pub onnx: Option<PathBuf>,
    /// KIND:PATH of the data to evaluate on.
    #[arg(long)]
    pub data: String,
    /// train, test, or val (image folders: their val/ folder, the same as test).
    #[arg(long, value_enum, default_value = "test")]
    pub split: SplitArg,
    #[command(flatten)]
    pub subset: SubsetArgs,
    /// The same as --limit, by the name train, finetune and pipeline give the number of test
    /// images they score: `--test-limit 200` here scores the images they scored.
    #[arg(long, value_parser = positive(), allow_negative_numbers = true, conflicts_with = "limit")]
    pub test_limit: Option<usize>,
    /// With --onnx alone: run the model twice, in ONNX Runtime's optimized session (its
    /// integer kernels) and as written with graph optimizations disabled (every QDQ unit in
    /// float, the same on every CPU), and report how closely the first follows the second.
    #[arg(long, requires = "onnx", conflicts_with = "checkpoint")]
    pub unoptimized: bool,
    /// Images per forward pass.
    #[arg(long, default_value_t = 256, value_parser = positive(), allow_negative_numbers = true)]
    pub batch_size: usize,
    /// Print the result as one JSON document on stdout.
    #[arg(long)]
    pub json: bool,
}

impl EvalArgs {
    /// The evaluation these flags state.
    pub fn request(&self) -> Result<EvalRequest, EngineError> {
        let data = parse_spec_flag("--data", &self.data)?;
        let split = match (self.split, data.kind) {
            (SplitArg::Train, _) => Split::Train,
            (SplitArg::Test, _) => Split::Test,
            // Image folders keep their test images in val/.
            (SplitArg::Val, DatasetKind::Folder | DatasetKind::ImagenetFolder) => Split::Test,
            (SplitArg::Val, _) => {
                return Err(EngineError::Invalid(format!(
                    "{data} has train and test splits (val is for image folders)"
                )))
            }
        };
        Ok(EvalRequest {
            data,
            split,
            subset: SubsetSpec {
                limit: self.subset.limit.or(self.test_limit),
                ..self.subset.spec()
            },
            checkpoint: self.checkpoint.clone(),
            onnx: self.onnx.clone(),
            unoptimized: self.unoptimized,
            batch_size: self.batch_size,
        })
    }
}
