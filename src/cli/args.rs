//! The arguments the CLI itself owns: what it prints and the few commands that are one
//! library call. Each other command's flags are its library settings type (derived with
//! the `cli` feature), e.g. `gmpq::train::TrainArgs`.

use clap::{Args, Parser, Subcommand};
use gmpq::bops::BopsArgs;
use gmpq::data::SubsetCmdArgs;
use gmpq::engine::EvalArgs;
use gmpq::export::ExportArgs;
use gmpq::import::ImportArgs;
use gmpq::predict::PredictArgs;
use gmpq::search::{ExtractArgs, SearchArgs};
use gmpq::study::StudyArgs;
use gmpq::train::{FinetuneArgs, QuantizeArgs, TrainArgs};
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct AttributionArgs {
    /// The network whose attribution maps to draw (a checkpoint of train, finetune, import
    /// or quantize).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// A second checkpoint to show beside the first (e.g. the FP teacher).
    #[arg(long)]
    pub compare: Option<PathBuf>,
    /// Images: KIND:PATH (its test split).
    #[arg(long)]
    pub data: String,
    /// How many images (a stratified subset).
    #[arg(long = "limit", value_name = "N", alias = "count", default_value_t = 6, value_parser = gmpq::flags::positive(), allow_negative_numbers = true)]
    pub count: usize,
    /// Output PNG.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Run folder (an interrupted demo resumes from it).
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// A run folder written by `gmpq pipeline` or `gmpq demo`.
    pub run_dir: PathBuf,
}

/// `gmpq pipeline`: the library's settings, and how to print the summary.
#[derive(Debug, Args)]
pub struct PipelineArgs {
    #[command(flatten)]
    pub settings: gmpq::pipeline::PipelineSettings,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Images/s of the full training step on synthetic data: full precision, a fixed
    /// quantization policy (--policy, --uniform: the QAT step) or the supernet (--supernet).
    Train(gmpq::bench::BenchTrainArgs),
    /// Seconds of one full GMPQ search step on synthetic data: teacher and supernet forward,
    /// attribution, CE + attribution + complexity loss, backward, weight and α updates.
    SearchStep(gmpq::bench::BenchSearchStepArgs),
    /// Inference images/s: gmpq's FP32 libtorch network, its FP32 ONNX export and its QDQ
    /// export through ONNX Runtime (random weights), with the op types ONNX Runtime's
    /// optimized QDQ graph runs (QLinearConv = integer convolutions).
    Infer(gmpq::bench::BenchInferArgs),
}

pub fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("GMPQ_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

#[derive(Debug, Parser)]
#[command(
    name = "gmpq",
    version,
    about = "Generalizable mixed-precision quantization for CNNs (libtorch engine)",
    long_about = "gmpq finds mixed-precision quantization policies for CNNs (GMPQ): it trains full-precision \
        teachers, searches per-layer weight/activation bitwidths on a small proxy dataset under a BOPs, \
        compression or size budget, and calibrates or fine-tunes the quantized network.\n\n\
        Datasets are given as KIND:PATH, e.g. idx:data/fashion-mnist, cifar10:cifar-10-batches-bin, \
        cifar100:cifar-100-binary, cifar100-fine-only:file.bin, folder:imagenet, imagenet-folder:samples, \
        or bundled:mnist / bundled:fashion-mnist for the subsets shipped with gmpq."
)]
pub struct Cli {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// More log output (-v: debug, -vv: trace).
    #[arg(short, long, global = true, help_heading = "Global options", action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct EngineArgs {
    /// libtorch threads (default: OMP_NUM_THREADS when set, as torchrun sets it for each rank;
    /// else all cores).
    #[arg(long, global = true, help_heading = "Global options", value_parser = gmpq::flags::positive(), allow_negative_numbers = true)]
    pub threads: Option<usize>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        default_value = "auto"
    )]
    pub device: String,
    /// Quantizer implementation: fused one-pass CPU kernels, or the reference's arithmetic
    /// composed from libtorch ops (same values; for comparison and benchmarks).
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        value_enum,
        default_value = "fused"
    )]
    pub quant_kernels: gmpq::quant::QuantKernels,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a full-precision network.
    Train(TrainArgs),
    /// Quantization-aware fine-tuning: a fixed-policy network initialised from FP weights,
    /// calibrated, then trained (the model comes from --init).
    Finetune(FinetuneArgs),
    /// Evaluate a checkpoint on a dataset (top-1/top-5).
    Eval(EvalArgs),
    /// Bring a network in: your own CNN from ONNX (--onnx), or pretrained weights (a
    /// .safetensors state dict) for torchvision ResNet-18/50 or MobileNetV2, or
    /// efficientnet_pytorch EfficientNet-Lite0 (--model, --weights).
    Import(ImportArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Write a stratified, seeded subset of an IDX dataset (both splits) as gzipped IDX.
    Subset(SubsetCmdArgs),
    /// The whole method on the bundled Fashion-MNIST subset in a few minutes: teachers, GMPQ
    /// search on a 1,000-image proxy, fine-tuning, the uniform and EdMIPS baselines, a report
    /// (the README's main job).
    Demo(DemoArgs),
    /// The whole method into one run folder: FP teacher on the proxy → search → FP teacher on
    /// the target → fine-tune with the policy → evaluate → report. Finished stages are skipped,
    /// so an interrupted pipeline resumes; --baseline adds comparison arms. Without a budget,
    /// compression 64.
    Pipeline(PipelineArgs),
    /// Write the HTML report of a pipeline run folder (report.html, charts in report/).
    Report(ReportArgs),
    /// The generalisation study: shared teachers, one pipeline per (proxy → target pair,
    /// budget, seed) with every arm, and one results table (results.csv, results.json,
    /// study.html). Resumes after an interruption.
    Study(StudyArgs),
    /// Engine facts: versions, threads, OpenMP wait policy, CUDA.
    Info,
    /// Per-layer MACs, params, bits, BOPs and size of a model under a policy, with totals.
    Bops(BopsArgs),
    /// Quantize a full-precision checkpoint to a fixed policy by calibration alone (no
    /// training), evaluate it next to the FP model, and save it.
    Quantize(QuantizeArgs),
    /// GMPQ search: find a per-layer bit policy on a small proxy dataset, guided by a
    /// full-precision teacher's attribution, that meets a BOPs / compression / size budget.
    Search(SearchArgs),
    /// Take a policy again from a finished search's saved α, under another rule or budget
    /// (default: the search's own), without searching again.
    Extract(ExtractArgs),
    /// Render attribution (CAM) heatmaps of a checkpoint on some images.
    Attribution(AttributionArgs),
    /// The top classes a model gives image files (PNG or JPEG): a gmpq checkpoint, a packed
    /// file or an exported ONNX model, each with the preprocessing its metadata records.
    Predict(PredictArgs),
    /// Ship a fine-tuned checkpoint: an ONNX graph (integer numerics: QDQ units ONNX Runtime
    /// runs as QLinearConv/QLinearAdd; fake-quant: QDQ around each conv's input, run as float
    /// convs; --fp for the float network; docs/DEPLOY.md) or a packed safetensors file whose
    /// kernels are stored at their policy bitwidth (an integer model's is the ONNX graph).
    Export(ExportArgs),
}

#[cfg(test)]
mod help_tests {
    use super::Cli;
    use clap::CommandFactory;

    fn undescribed(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
        let path = format!("{path} {}", cmd.get_name());
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" || arg.is_hide_set() {
                continue;
            }
            if arg.get_help().is_none() && arg.get_long_help().is_none() {
                out.push(format!("{path} --{}", arg.get_long().unwrap_or(id)));
            }
        }
        for sub in cmd.get_subcommands() {
            undescribed(sub, &path, out);
        }
    }

    /// Every flag of every command says what it does (`--help` is the reference).
    #[test]
    fn every_flag_is_described() {
        let mut missing = Vec::new();
        undescribed(&Cli::command(), "", &mut missing);
        assert!(
            missing.is_empty(),
            "flags without a description:\n{}",
            missing.join("\n")
        );
    }
}
