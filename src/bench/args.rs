//! The command-line forms of the benchmarks, and what each times.

use super::{BenchResult, InferReport};
use crate::flags::positive;
use crate::model::options::{check_options, ModelOption, ModelSource};
use crate::model::{ModelConfig, Stem};
use crate::policy::{parse_uniform, BitCandidateArgs, Policy};
use crate::quant::{Numerics, Precision};
use crate::train::TrainError;
use clap::Args;
use std::path::PathBuf;
use tch::Device;

#[derive(Debug, Args)]
pub struct BenchTrainArgs {
    /// Network to time (resnet20, resnet32, resnet56, resnet18, resnet50, mobilenetv2).
    #[arg(long, default_value = "resnet20")]
    pub model: String,
    /// Time this checkpoint's network instead of --model (e.g. an imported one, from
    /// `gmpq import --onnx`); its weights are not read (speed does not depend on them).
    #[arg(long, conflicts_with_all = ["model", "channels", "classes", "input_size"])]
    pub checkpoint: Option<PathBuf>,
    /// Images per step.
    #[arg(long, default_value_t = 64, value_parser = positive(), allow_negative_numbers = true)]
    pub batch_size: usize,
    /// Input height and width in pixels.
    #[arg(long, default_value_t = 32, value_parser = positive(), allow_negative_numbers = true)]
    pub input_size: usize,
    /// Input channels (1 for grey images, 3 for colour).
    #[arg(long, default_value_t = 3, value_parser = positive(), allow_negative_numbers = true)]
    pub channels: usize,
    /// Output classes.
    #[arg(long, default_value_t = 10, value_parser = positive(), allow_negative_numbers = true)]
    pub classes: usize,
    /// Untimed steps first (allocator and oneDNN warm-up).
    #[arg(long, default_value_t = 5, allow_negative_numbers = true)]
    pub warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 30, value_parser = positive(), allow_negative_numbers = true)]
    pub steps: usize,
    /// Time the mixed-precision supernet step instead of the full-precision one.
    #[arg(long, conflicts_with_all = ["policy", "uniform"])]
    pub supernet: bool,
    /// Time the quantization-aware training step under this policy file (e.g.
    /// bench/resnet20-mixed.json, every layer cycling through 2/3/4/6 bits).
    #[arg(long, conflicts_with = "uniform")]
    pub policy: Option<PathBuf>,
    /// Time the quantization-aware training step under a uniform policy: w4a4, w2a2, …
    #[arg(long)]
    pub uniform: Option<String>,
    #[command(flatten)]
    pub bits: BitCandidateArgs,
    /// Memory layout of the convolution weights: channels-last (what training uses) or
    /// contiguous (PyTorch's default), to measure the difference.
    #[arg(long, default_value = "channels-last", value_parser = ["channels-last", "contiguous"])]
    pub param_layout: String,
    /// Print the result as one JSON document on stdout.
    #[arg(long)]
    pub json: bool,
}

/// The network a benchmark times: `checkpoint`'s, else `model` at the given shape.
fn network(
    model: &str,
    checkpoint: Option<&std::path::Path>,
    channels: usize,
    classes: usize,
    input_size: usize,
) -> Result<ModelConfig, TrainError> {
    match checkpoint {
        Some(path) => Ok(crate::checkpoint::Checkpoint::load(path)?.meta.model),
        None => Ok(ModelConfig::new(
            model.parse()?,
            channels,
            classes,
            input_size,
        )),
    }
}

/// The uniform policy `name` (`w4a4`, …) of `cfg`'s quantized layers.
fn uniform(cfg: &ModelConfig, name: &str) -> Result<Policy, TrainError> {
    let (w, a) = parse_uniform(name)?;
    let (_, net) = crate::train::build_fp(cfg, Device::Cpu)?;
    Ok(Policy::uniform(cfg, net.convs(), w, a))
}

impl BenchTrainArgs {
    /// Images per second of the full training step.
    pub fn run(&self, device: Device) -> Result<BenchResult, TrainError> {
        let cfg = network(
            &self.model,
            self.checkpoint.as_deref(),
            self.channels,
            self.classes,
            self.input_size,
        )?;
        let policy = match (&self.policy, &self.uniform) {
            (Some(path), _) => Some(Policy::load(path)?),
            (None, Some(u)) => Some(uniform(&cfg, u)?),
            (None, None) => None,
        };
        let precision = match policy {
            _ if self.supernet => Precision::Supernet {
                candidates: self.bits.candidates()?,
            },
            Some(policy) => Precision::Fixed {
                policy,
                per_channel: false,
                numerics: Numerics::FakeQuant,
            },
            None => Precision::Full,
        };
        let layout = self.param_layout.parse().map_err(TrainError::Invalid)?;
        super::bench_train(
            &cfg,
            precision,
            self.batch_size,
            self.warmup,
            self.steps,
            layout,
            device,
        )
    }
}

#[derive(Debug, Args)]
pub struct BenchSearchStepArgs {
    /// Network to time (resnet20, resnet32, resnet56, resnet18, resnet50, mobilenetv2).
    #[arg(long, default_value = "resnet18")]
    pub model: String,
    /// Time this checkpoint's network instead of --model (e.g. an imported one, from
    /// `gmpq import --onnx`); its weights are not read (speed does not depend on them).
    #[arg(long, conflicts_with_all = ["model", "channels", "classes", "input_size"])]
    pub checkpoint: Option<PathBuf>,
    /// Images per step.
    #[arg(long, default_value_t = 32, value_parser = positive(), allow_negative_numbers = true)]
    pub batch_size: usize,
    /// Input height and width in pixels.
    #[arg(long, default_value_t = 32, value_parser = positive(), allow_negative_numbers = true)]
    pub input_size: usize,
    /// Input channels (1 for grey images, 3 for colour).
    #[arg(long, default_value_t = 3, value_parser = positive(), allow_negative_numbers = true)]
    pub channels: usize,
    /// Output classes.
    #[arg(long, default_value_t = 10, value_parser = positive(), allow_negative_numbers = true)]
    pub classes: usize,
    /// Untimed steps first (allocator and oneDNN warm-up).
    #[arg(long, default_value_t = 2, allow_negative_numbers = true)]
    pub warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 10, value_parser = positive(), allow_negative_numbers = true)]
    pub steps: usize,
    #[command(flatten)]
    pub bits: BitCandidateArgs,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

impl BenchSearchStepArgs {
    /// Seconds of one full GMPQ search step.
    pub fn run(&self, device: Device) -> Result<BenchResult, TrainError> {
        let cfg = network(
            &self.model,
            self.checkpoint.as_deref(),
            self.channels,
            self.classes,
            self.input_size,
        )?;
        super::bench_search_step(
            &cfg,
            self.bits.candidates()?,
            self.batch_size,
            self.warmup,
            self.steps,
            device,
        )
    }
}

#[derive(Debug, Args)]
pub struct BenchInferArgs {
    /// Network to time (resnet20, resnet32, resnet56, resnet18, resnet50, mobilenetv2).
    #[arg(long, default_value = "resnet20")]
    pub model: String,
    /// Time this checkpoint's network instead of --model (e.g. an imported one, from
    /// `gmpq import --onnx`); its weights are not read (speed does not depend on them).
    #[arg(long, conflicts_with_all = ["model", "channels", "classes", "input_size"])]
    pub checkpoint: Option<PathBuf>,
    /// Input height and width in pixels.
    #[arg(long, default_value_t = 28, value_parser = positive(), allow_negative_numbers = true)]
    pub input_size: usize,
    /// Input channels (1 for grey images, 3 for colour).
    #[arg(long, default_value_t = 1, value_parser = positive(), allow_negative_numbers = true)]
    pub channels: usize,
    /// Output classes.
    #[arg(long, default_value_t = 10, value_parser = positive(), allow_negative_numbers = true)]
    pub classes: usize,
    /// cifar or imagenet (ResNet-18/50, MobileNetV2).
    #[arg(long)]
    pub stem: Option<String>,
    /// Batch sizes to time.
    #[arg(long, value_delimiter = ',', default_value = "1,64", value_parser = positive())]
    pub batch_sizes: Vec<usize>,
    /// The quantized models' policy (uniform).
    #[arg(long, default_value = "w4a4")]
    pub uniform: String,
    /// Instead of --uniform, a mixed policy: layer i gets w[2,3,4,6][i mod 4] and
    /// a[6,4,3,2][i mod 4].
    #[arg(long, conflicts_with = "uniform")]
    pub mixed: bool,
    /// Untimed steps first (allocator and oneDNN warm-up).
    #[arg(long, default_value_t = 3, allow_negative_numbers = true)]
    pub warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 20, value_parser = positive(), allow_negative_numbers = true)]
    pub steps: usize,
    /// Print the result as one JSON document on stdout.
    #[arg(long)]
    pub json: bool,
}

impl BenchInferArgs {
    /// Inference images/s of the libtorch network and its ONNX exports, on `threads`.
    pub fn run(&self, threads: usize) -> Result<InferReport, TrainError> {
        let mut cfg = network(
            &self.model,
            self.checkpoint.as_deref(),
            self.channels,
            self.classes,
            self.input_size,
        )?;
        if let Some(stem) = &self.stem {
            check_options(ModelSource::Named(cfg.arch), &[ModelOption::Stem])?;
            cfg.stem = stem.parse::<Stem>()?;
        }
        let policy = if self.mixed {
            let (_, net) = crate::train::build_fp(&cfg, Device::Cpu)?;
            Policy::cycled(&cfg, net.convs(), &[2, 3, 4, 6], &[6, 4, 3, 2])
        } else {
            uniform(&cfg, &self.uniform)?
        };
        super::bench_infer(
            &cfg,
            policy,
            &self.batch_sizes,
            self.warmup,
            self.steps,
            threads,
        )
    }
}
