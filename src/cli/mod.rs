//! Argument parsing and command dispatch.

mod commands;

/// While alive, whatever is written to stdout (stage lines, the nested commands' output)
/// goes to stderr, so a `--json` command prints exactly one JSON document on stdout.
pub(crate) struct StdoutToStderr {
    saved: libc::c_int,
}

impl StdoutToStderr {
    pub(crate) fn new() -> Option<Self> {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        // SAFETY: plain descriptor duplication on the process's own stdout/stderr.
        let saved = unsafe { libc::dup(1) };
        if saved < 0 || unsafe { libc::dup2(2, 1) } < 0 {
            return None;
        }
        Some(Self { saved })
    }
}

impl Drop for StdoutToStderr {
    fn drop(&mut self) {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        // SAFETY: restores the descriptor saved in `new`.
        unsafe {
            libc::dup2(self.saved, 1);
            libc::close(self.saved);
        }
    }
}

/// The error and its causes on one line, outermost first, leaving out a cause whose text the
/// line already ends with (a typed error that shows its source, e.g. `PATH: OS error`, and
/// the same OS error as its cause), and a cause's leading `X: ` when the line already ends
/// with X (`loading PATH` then `PATH: reason`).
pub fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let mut text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        // "loading X" then "X: reason": say X once.
        if let Some((head, rest)) = text.split_once(": ") {
            if !head.is_empty() && line.ends_with(head) {
                text = rest.to_string();
            }
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}
mod deploy;
mod pipeline;
mod progress;
mod search;
mod study;

use clap::builder::TypedValueParser as _;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

pub use commands::run;

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
    #[arg(long, global = true, help_heading = "Global options", value_parser = positive(), allow_negative_numbers = true)]
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
    /// Convert pretrained weights (.safetensors state dict) to a gmpq checkpoint: torchvision
    /// ResNet-18/50 or MobileNetV2, efficientnet_pytorch EfficientNet-Lite0.
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
    /// so an interrupted pipeline resumes; --baseline adds comparison arms.
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
    /// Take a policy again from a finished search's saved α, under another rule or budget,
    /// without searching again.
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

/// Export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// ONNX (opset 21): the integer graph, or QDQ for a fake-quant checkpoint.
    Onnx,
    /// safetensors with bit-packed kernels (`gmpq eval` and `gmpq export` read it).
    Packed,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The fine-tuned (fixed-policy) checkpoint, or a packed one.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// What to write.
    #[arg(long, value_enum, default_value = "onnx")]
    pub format: ExportFormat,
    /// With --format onnx: the float network, quantizers left out (for comparison).
    #[arg(long)]
    pub fp: bool,
    /// Output file (.onnx or .safetensors).
    #[arg(long)]
    pub out: PathBuf,
}

/// `--method`'s values, with their help, from the library's list.
fn method_names() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(
        gmpq::search::method::METHOD_NAMES
            .iter()
            .map(|(name, help)| clap::builder::PossibleValue::new(*name).help(*help)),
    )
}

/// The search defaults, defined once in the library (`SearchConfig::default()`).
/// The library's training recipe, whose values are the flags' defaults.
fn train_defaults() -> gmpq::train::TrainConfig {
    gmpq::train::TrainConfig::default()
}

fn search_defaults() -> gmpq::search::SearchConfig {
    gmpq::search::SearchConfig::default()
}

/// The bit candidates of a supernet search (or a HAWQ allocation).
#[derive(Debug, Clone, Args)]
pub struct BitCandidateArgs {
    /// Weight bit candidates, comma-separated.
    #[arg(long, value_delimiter = ',', value_parser = bit_width(), default_values_t = gmpq::policy::DEFAULT_CANDIDATES)]
    pub w_bits: Vec<u32>,
    /// Activation bit candidates, comma-separated.
    #[arg(long, value_delimiter = ',', value_parser = bit_width(), default_values_t = gmpq::policy::DEFAULT_CANDIDATES)]
    pub a_bits: Vec<u32>,
}

impl BitCandidateArgs {
    /// The candidate sets, sorted and without repeats.
    pub fn candidates(&self) -> Result<gmpq::policy::Candidates, gmpq::policy::PolicyError> {
        gmpq::policy::Candidates::new(&self.w_bits, &self.a_bits)
    }
}

/// A `--baseline` arm: any arm but GMPQ, which always runs.
fn baseline_arm() -> impl clap::builder::TypedValueParser<Value = gmpq::pipeline::Arm> {
    use gmpq::pipeline::Arm;
    clap::builder::PossibleValuesParser::new(Arm::BASELINES.map(Arm::name))
        .try_map(|s| s.parse::<Arm>())
}

/// A count that must be at least 1 (clap names the flag when it is not).
fn positive() -> impl clap::builder::TypedValueParser<Value = usize> {
    clap::builder::StringValueParser::new().try_map(|s| match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_string()),
        Ok(n) => Ok(n),
        Err(_) => Err("expected a whole number, at least 1".to_string()),
    })
}

/// One bit width of a candidate list, in `policy::BIT_RANGE`.
fn bit_width() -> clap::builder::RangedI64ValueParser<u32> {
    let r = gmpq::policy::BIT_RANGE;
    clap::value_parser!(u32).range(i64::from(*r.start())..=i64::from(*r.end()))
}

/// Dataset splits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SplitArg {
    Train,
    Test,
    /// Image folders' val/ (their test images).
    Val,
}

#[derive(Debug, Args)]
pub struct ExtractArgs {
    /// A search run folder (its policy.json) or a searched policy file.
    pub run: PathBuf,
    /// The extraction rule (default: the one the search used).
    #[arg(long, value_enum)]
    pub rule: Option<gmpq::search::ExtractionRule>,
    /// Budget: policy BOPs at most this (e.g. 1.2e9, 1.2G, 800M). Default: the search's own.
    #[arg(long, group = "budget")]
    pub target_bops: Option<String>,
    /// Budget: FP BOPs / policy BOPs at least this.
    #[arg(long, group = "budget", allow_negative_numbers = true)]
    pub target_compression: Option<f64>,
    /// Budget: model size at most this many MB.
    #[arg(long, group = "budget", allow_negative_numbers = true)]
    pub target_size_mb: Option<f64>,
    /// Where to write the policy (default: RUN/policy-RULE-TARGET.json; with --rank
    /// RUN/policy-ranked-TARGET.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Rank candidates instead of taking α's best: the knapsack's best few under α, the best
    /// uniform policy and any --also policies, each calibrated from the teacher without
    /// training and scored on held-out proxy images; the best is kept, every candidate and
    /// its score recorded in meta.ranking. Needs --data (the search's proxy).
    #[arg(long, requires = "data", conflicts_with = "rule")]
    pub rank: bool,
    /// --rank: the proxy data the search ran on, KIND:PATH (its --limit subset calibrates,
    /// its test split scores).
    #[arg(long)]
    pub data: Option<String>,
    #[command(flatten)]
    pub subset: SubsetArgs,
    /// --rank: held-out proxy images (from the test split) each candidate is scored on.
    #[arg(long = "val-limit", value_name = "N", default_value_t = gmpq::search::VAL_IMAGES, value_parser = positive(), allow_negative_numbers = true)]
    pub val_images: usize,
    /// --rank: the proxy teacher (default: the search's, meta.teacher).
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// --rank: another candidate policy (repeatable), e.g. uniform-fill's.
    #[arg(long)]
    pub also: Vec<PathBuf>,
    /// Print the policy's totals as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SearchArgs {
    /// Full-precision teacher checkpoint of the same architecture (from `gmpq train`).
    #[arg(long)]
    pub teacher: PathBuf,
    /// Proxy data, KIND:PATH (its train split; a stratified subset with --limit).
    #[arg(long)]
    pub data: String,
    #[command(flatten)]
    pub subset: SubsetArgs,
    /// Held-out proxy images (from the test split) for the argmax policy's accuracy.
    #[arg(long = "val-limit", value_name = "N", alias = "val-images", default_value_t = gmpq::search::VAL_IMAGES, value_parser = positive(), allow_negative_numbers = true)]
    pub val_images: usize,
    /// Budget: policy BOPs at most this (e.g. 1.2e9, 1.2G, 800M).
    #[arg(long, group = "budget")]
    pub target_bops: Option<String>,
    /// Budget: FP BOPs / policy BOPs at least this (64 ≈ 4-bit equivalent).
    #[arg(long, group = "budget", allow_negative_numbers = true)]
    pub target_compression: Option<f64>,
    /// Budget: model size at most this many MB.
    #[arg(long, group = "budget", allow_negative_numbers = true)]
    pub target_size_mb: Option<f64>,
    /// Several budgets in one run, as compression ratios (16,32,64) or BOPs (1.2G,600M);
    /// they share the supernet warm-up.
    #[arg(long, group = "budget", value_delimiter = ',')]
    pub pareto: Vec<String>,
    /// Weight of the attribution loss; 0 is the EdMIPS baseline (default: 0 with --method
    /// edmips, else the library's, 20).
    #[arg(long, allow_negative_numbers = true)]
    pub attribution_weight: Option<f64>,
    /// Fixed attribution exponent p (default: capacity-aware, 24·mean 1/(E[b_w]E[b_a])).
    #[arg(long, allow_negative_numbers = true)]
    pub p: Option<f64>,
    /// Complexity weight cd (the starting λ when a budget is given).
    #[arg(long, default_value_t = search_defaults().complexity_weight, allow_negative_numbers = true)]
    pub cd: f64,
    /// Dual-ascent rate of λ per step (default: the recipe's; reference 0.05).
    #[arg(long, allow_negative_numbers = true)]
    pub dual_rate: Option<f64>,
    #[command(flatten)]
    pub bits: BitCandidateArgs,
    /// Search epochs over the proxy.
    #[arg(long, default_value_t = search_defaults().epochs, value_parser = positive(), allow_negative_numbers = true)]
    pub epochs: usize,
    /// Shared warm-up epochs of a --pareto run (default: epochs/3).
    #[arg(long, allow_negative_numbers = true)]
    pub warmup_epochs: Option<usize>,
    /// Images per step (of all ranks together in a data-parallel run: each of N ranks
    /// computes B/N).
    #[arg(long, default_value_t = search_defaults().batch_size, value_parser = positive(), allow_negative_numbers = true)]
    pub batch_size: usize,
    /// Weight learning rate.
    #[arg(long, default_value_t = search_defaults().lr, allow_negative_numbers = true)]
    pub lr: f64,
    /// α learning rate (default: the recipe's; reference 0.01).
    #[arg(long, allow_negative_numbers = true)]
    pub alpha_lr: Option<f64>,
    /// The allocation method: gmpq (the supernet search), edmips (the same without the
    /// attribution term), hawq (the practitioner's baseline: per-layer Hessian-trace weight
    /// sensitivities and measured activation sensitivities of the FP teacher, minimised under
    /// the budget by the exact knapsack; no supernet training), uniform-fill (the best uniform
    /// policy under the budget, then what it leaves of the budget spent where those
    /// sensitivities fall most), uniform or random (no data).
    #[arg(long, default_value = "gmpq", value_parser = method_names())]
    pub method: String,
    /// hawq, uniform-fill: proxy images the sensitivities are measured on (from the --limit
    /// subset).
    #[arg(long, default_value_t = gmpq::search::HAWQ_IMAGES, value_parser = positive(), allow_negative_numbers = true)]
    pub hawq_images: usize,
    /// hawq, uniform-fill: Hutchinson probes per batch for the Hessian traces.
    #[arg(long, default_value_t = gmpq::search::HAWQ_SAMPLES, value_parser = positive(), allow_negative_numbers = true)]
    pub hawq_samples: usize,
    /// Preset α dynamics, recorded in the policy's meta (docs/SEARCH.md); the flags below
    /// override single settings.
    #[arg(long, value_enum, default_value_t = gmpq::search::Recipe::Scarce)]
    pub recipe: gmpq::search::Recipe,
    /// α optimizer (default: the recipe's).
    #[arg(long, value_enum)]
    pub alpha_optimizer: Option<gmpq::search::AlphaOptimizer>,
    /// Epochs with α frozen (weights only) at the start (default: the recipe's).
    #[arg(long, allow_negative_numbers = true)]
    pub alpha_frozen_epochs: Option<usize>,
    /// The budget as an upper bound (multiplicative dual), an equality target (additive
    /// dual) or an equality held by the penalty μ·(E[cost]/limit − 1)² (default: the
    /// recipe's).
    #[arg(long, value_enum)]
    pub budget_mode: Option<gmpq::search::BudgetMode>,
    /// μ of `--budget-mode penalty` (default: the recipe's).
    #[arg(long, allow_negative_numbers = true)]
    pub budget_penalty: Option<f64>,
    /// Softmax temperature START:END over the search, geometric (default: the recipe's;
    /// reference 1:1).
    #[arg(long)]
    pub temperature: Option<String>,
    /// Both learning rates ×0.1 every this many epochs.
    #[arg(long, default_value_t = search_defaults().step_epochs, value_parser = positive(), allow_negative_numbers = true)]
    pub step_epochs: usize,
    /// cam (GAP → linear heads) or grad-cam (general, double backward).
    #[arg(long, value_enum, default_value = "cam")]
    pub attribution: gmpq::search::AttributionMethod,
    /// How the policy is taken from the final α under the budget: knapsack (exact, maximises
    /// Σ log softmax(α/T) within the budget) or argmax-repair (argmax, then greedy repair).
    /// Default: the recipe's (reference: argmax-repair).
    #[arg(long, value_enum)]
    pub extraction: Option<gmpq::search::ExtractionRule>,
    /// Random horizontal flips of the proxy images (not for digits).
    #[arg(long)]
    pub hflip: bool,
    /// Seed of the weights, the batches and the augmentation.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub seed: u64,
    /// Run folder (policy.json, search-log.jsonl, bits.svg, attribution.png).
    #[arg(long, default_value = "runs/search")]
    pub out: PathBuf,
    /// Print only the result, as one JSON document on stdout.
    #[arg(long)]
    pub json: bool,
}

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
    #[arg(long = "limit", value_name = "N", alias = "count", default_value_t = 6, value_parser = positive(), allow_negative_numbers = true)]
    pub count: usize,
    /// Output PNG.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// resnet20, resnet32, resnet56, resnet18, resnet50, mobilenetv2 or efficientnet-lite0
    /// [default: resnet20].
    #[arg(long)]
    pub model: Option<String>,
    /// Square input resolution [default: 32].
    #[arg(long, alias = "input", value_parser = positive(), allow_negative_numbers = true)]
    pub input_size: Option<usize>,
    /// Input channels [default: 3].
    #[arg(long, alias = "in-channels", value_parser = positive(), allow_negative_numbers = true)]
    pub channels: Option<usize>,
    /// Classes the model predicts [default: 10].
    #[arg(long, value_parser = positive(), allow_negative_numbers = true)]
    pub classes: Option<usize>,
    /// Stem of resnet18/50 and mobilenetv2: cifar or imagenet (default: cifar below 64 px).
    #[arg(long)]
    pub stem: Option<String>,
    /// Width multiplier of mobilenetv2 [default: 1].
    #[arg(long, allow_negative_numbers = true)]
    pub width: Option<f64>,
}

impl ModelArgs {
    /// The shaping options given on the command line.
    pub fn given(&self) -> Vec<gmpq::model::options::ModelOption> {
        use gmpq::model::options::ModelOption as O;
        [
            (self.model.is_some(), O::Model),
            (self.input_size.is_some(), O::InputSize),
            (self.channels.is_some(), O::Channels),
            (self.classes.is_some(), O::Classes),
            (self.stem.is_some(), O::Stem),
            (self.width.is_some(), O::Width),
        ]
        .into_iter()
        .filter_map(|(given, o)| given.then_some(o))
        .collect()
    }
}

#[derive(Debug, Args)]
#[group(required = false, multiple = false)]
pub struct PolicyChoice {
    /// A policy JSON file.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// A uniform policy: w4a4, w8a8, w2a2, …
    #[arg(long)]
    pub uniform: Option<String>,
}

#[derive(Debug, Args)]
pub struct BopsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub policy: PolicyChoice,
    /// Read model and policy from a quantized checkpoint instead.
    #[arg(long, conflicts_with_all = ["policy", "uniform"])]
    pub checkpoint: Option<PathBuf>,
    /// Also draw the per-layer bit allocation as an SVG chart.
    #[arg(long)]
    pub chart: Option<PathBuf>,
    /// Print the result as one JSON document on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// Full-precision checkpoint (from `gmpq train` or `gmpq import`).
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[command(flatten)]
    pub policy: PolicyChoice,
    /// Data to calibrate on (its train split), KIND:PATH.
    #[arg(long)]
    pub calib_data: String,
    /// Calibration images (a stratified subset of the train split).
    #[arg(long = "calib-limit", value_name = "N", alias = "calib-images", default_value_t = gmpq::train::CALIBRATION_IMAGES, value_parser = positive(), allow_negative_numbers = true)]
    pub calib_images: usize,
    /// How the activation clips are calibrated.
    #[arg(long, value_enum, default_value = "kl")]
    pub calibration: gmpq::quant::CalibrationMethod,
    /// Per-output-channel weight thresholds (the reference is per tensor).
    #[arg(long)]
    pub per_channel: bool,
    /// integer (default): batch norm folded, int32 biases and every conv output and residual
    /// sum re-quantized, exactly what the exported graph's integer kernels compute;
    /// fake-quant: the reference's float batch norm and residuals (slower to deploy).
    #[arg(long, default_value = "integer", value_parser = parse_numerics)]
    pub numerics: gmpq::quant::Numerics,
    /// Data to evaluate on (its test split; default: --calib-data).
    #[arg(long)]
    pub eval_data: Option<String>,
    /// Evaluate on at most this many test images (stratified).
    #[arg(long = "test-limit", value_name = "N", alias = "eval-limit", value_parser = positive(), allow_negative_numbers = true)]
    pub eval_limit: Option<usize>,
    /// Where to save the quantized checkpoint.
    #[arg(long)]
    pub out: PathBuf,
    /// Print the result as one JSON document on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SubsetCmdArgs {
    /// An IDX dataset, e.g. idx:../shared/datasets/mnist.
    #[arg(long)]
    pub data: String,
    /// Training images to keep (stratified).
    #[arg(long, value_parser = positive(), allow_negative_numbers = true)]
    pub train: usize,
    /// Test images to keep (stratified).
    #[arg(long, value_parser = positive(), allow_negative_numbers = true)]
    pub test: usize,
    /// Seed of the draw.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub seed: u64,
    /// Output folder.
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
pub struct StudyArgs {
    /// The study's JSON configuration (e.g. studies/fmnist.json).
    pub config: PathBuf,
    /// Study folder (teachers, one folder per run, results).
    #[arg(long, default_value = "runs/study")]
    pub out: PathBuf,
    /// Run only these pairs (comma-separated names from CONFIG), e.g. to run two pairs in
    /// two processes; the tables still cover every run on disk.
    #[arg(long, value_delimiter = ',')]
    pub pair: Vec<String>,
    /// Only rewrite results.csv/json and study.html from the runs on disk (safe beside a
    /// running study); train and search nothing.
    #[arg(long)]
    pub tables_only: bool,
    /// Run only the study's run N (0-based; `--sbatch` prints how many there are) and the
    /// teachers it needs: one task of a job array.
    #[arg(long, value_name = "N", conflicts_with_all = ["array", "tables_only", "pair"])]
    pub run: Option<usize>,
    /// As --run, with N from the scheduler: SLURM_ARRAY_TASK_ID (a Slurm job array) or
    /// JOB_COMPLETION_INDEX (a Kubernetes indexed Job).
    #[arg(long, conflicts_with_all = ["tables_only", "pair"])]
    pub array: bool,
    /// Print a bash script that submits the study as a Slurm job array (one task per run,
    /// requeued before its time limit, resumed where it stopped) and a job that writes the
    /// tables when all have ended; runs nothing.
    #[arg(long, conflicts_with_all = ["run", "array", "tables_only", "pair"])]
    pub sbatch: bool,
    /// With --sbatch: the time limit of one task (Slurm's --time).
    #[arg(long, default_value = "12:00:00", requires = "sbatch")]
    pub slurm_time: String,
    /// With --sbatch: at most this many tasks at once (0: no limit).
    #[arg(long, default_value_t = 0, requires = "sbatch")]
    pub slurm_concurrency: usize,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// A run folder written by `gmpq pipeline` or `gmpq demo`.
    pub run_dir: PathBuf,
}

/// Settings of a pipeline run. Everything but the arms, the output folder and `--json` is
/// recorded in the run's pipeline.json and must not change when the run is resumed.
#[derive(Debug, Clone, Args)]
pub struct PipelineArgs {
    /// resnet20, resnet32, resnet56, resnet18, resnet50 or mobilenetv2.
    #[arg(long, default_value = "resnet20")]
    pub model: String,
    /// How the fine-tuned networks compute: integer (batch norm folded, every conv output
    /// and residual sum re-quantized, as the exported integer graph; the default for a new
    /// run) or fake-quant (the reference's; the default where the run folder recorded it).
    #[arg(long, value_parser = parse_numerics)]
    pub numerics: Option<gmpq::quant::Numerics>,
    /// Width multiplier of mobilenetv2 (its teachers' channels).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub width: f64,
    /// Proxy data for the search, KIND:PATH[:N]; N keeps a stratified subset of N training
    /// images (e.g. idx:../shared/datasets/fashion-mnist:2000).
    #[arg(long)]
    pub proxy: String,
    /// Target data, KIND:PATH: the target teacher and the fine-tuned networks train on its
    /// train split; results are on its test split.
    #[arg(long)]
    pub target: String,
    /// Train on a stratified subset of this many target images.
    #[arg(long, value_parser = positive(), allow_negative_numbers = true)]
    pub target_limit: Option<usize>,
    /// Evaluate on at most this many target test images (stratified).
    #[arg(long, value_parser = positive(), allow_negative_numbers = true)]
    pub target_test_limit: Option<usize>,
    /// Target training images held out for validation (a fixed stratified draw): the target
    /// teacher and the fine-tunings never train on them, and the arm with the best top-1 on
    /// them is the run's chosen model (test top-1 is reported, never used to choose). 0: none.
    #[arg(long, default_value_t = gmpq::pipeline::TARGET_HOLDOUT, allow_negative_numbers = true)]
    pub target_holdout: usize,
    /// Budget: FP BOPs / policy BOPs at least this (64 ≈ 4-bit equivalent; the default
    /// when no budget is given).
    #[arg(long, group = "budget", allow_negative_numbers = true)]
    pub target_compression: Option<f64>,
    /// Budget: policy BOPs at most this (e.g. 1.2G, 800M).
    #[arg(long, group = "budget")]
    pub target_bops: Option<String>,
    /// Budget: model size at most this many MB.
    #[arg(long, group = "budget", allow_negative_numbers = true)]
    pub target_size_mb: Option<f64>,
    /// An FP teacher for the search (instead of training one on the proxy).
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// An FP network to fine-tune from (instead of training one on the target).
    #[arg(long)]
    pub target_teacher: Option<PathBuf>,
    /// Comparison arms under the same budget and recipe, comma-separated: edmips (the search
    /// without the attribution term), uniform (the best uniform policy within the budget),
    /// edmips-target (EdMIPS searched on the target data), random (random bits within 2 %
    /// under the budget, drawn with --seed), hawq (Hessian-trace and activation
    /// sensitivities of the proxy teacher on 512 proxy images, minimised by the knapsack).
    #[arg(long, value_delimiter = ',', value_parser = baseline_arm())]
    pub baseline: Vec<gmpq::pipeline::Arm>,
    /// Epochs of the proxy teacher.
    #[arg(long, default_value_t = gmpq::pipeline::TEACHER_EPOCHS, value_parser = positive(), allow_negative_numbers = true)]
    pub teacher_epochs: usize,
    /// Epochs of the target teacher.
    #[arg(long, default_value_t = gmpq::pipeline::TEACHER_EPOCHS, value_parser = positive(), allow_negative_numbers = true)]
    pub target_teacher_epochs: usize,
    /// Epochs of the proxy searches (gmpq, edmips).
    #[arg(long, default_value_t = search_defaults().epochs, value_parser = positive(), allow_negative_numbers = true)]
    pub search_epochs: usize,
    /// Epochs of the edmips-target search (default: --search-epochs).
    #[arg(long, value_parser = positive(), allow_negative_numbers = true)]
    pub target_search_epochs: Option<usize>,
    /// Search learning rates ×0.1 every this many epochs.
    #[arg(long, default_value_t = search_defaults().step_epochs, value_parser = positive(), allow_negative_numbers = true)]
    pub search_step_epochs: usize,
    /// Fine-tuning epochs of every arm on the target.
    #[arg(long, default_value_t = gmpq::pipeline::FINETUNE_EPOCHS, value_parser = positive(), allow_negative_numbers = true)]
    pub finetune_epochs: usize,
    /// Fine-tuning learning rate.
    #[arg(long, default_value_t = gmpq::train::FINETUNE_LR, allow_negative_numbers = true)]
    pub finetune_lr: f64,
    /// Weight of the attribution loss in the GMPQ arm.
    #[arg(long, default_value_t = search_defaults().attribution_weight, allow_negative_numbers = true)]
    pub attribution_weight: f64,
    /// Fixed attribution exponent p of the GMPQ arm (default: the capacity-aware rule).
    #[arg(long, allow_negative_numbers = true)]
    pub p: Option<f64>,
    /// Search recipe of the searched arms (gmpq, edmips, edmips-target).
    #[arg(long, value_enum, default_value_t = gmpq::search::Recipe::Scarce)]
    pub recipe: gmpq::search::Recipe,
    #[command(flatten)]
    pub bits: BitCandidateArgs,
    /// Random horizontal flips in training and search (not for digits).
    #[arg(long)]
    pub hflip: bool,
    /// Flips on the proxy side (proxy teacher, proxy searches): a switch like --hflip
    /// (`--proxy-hflip false` turns them off); default: as --hflip.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub proxy_hflip: Option<bool>,
    /// Seed of training, search and fine-tuning (the proxy subset has its own).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub seed: u64,
    /// Seed of the proxy subset draw.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub subset_seed: u64,
    /// Run folder.
    #[arg(long, default_value = "runs/pipeline")]
    pub out: PathBuf,
    /// Another run folder (repeatable) whose finished stages that do not depend on the proxy
    /// may be copied: a fine-tuning with the same command (same teacher, data, recipe and seed)
    /// and a byte-identical policy, or the edmips-target search with the same command, is the
    /// same computation, so it is copied instead of run again (pipeline.json says so).
    #[arg(long, value_name = "RUN_DIR", alias = "reuse-finetunes-from")]
    pub reuse_from: Vec<PathBuf>,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SubsetArgs {
    /// Use a stratified subset of this many images (proportional per class).
    #[arg(long, value_parser = positive(), allow_negative_numbers = true)]
    pub limit: Option<usize>,
    /// Use at most this many images per class.
    #[arg(long, value_parser = positive(), allow_negative_numbers = true)]
    pub per_class: Option<usize>,
    /// Seed of the subset draw.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub subset_seed: u64,
}

impl TrainArgs {
    /// The shaping options given on the command line.
    pub fn given(&self) -> Vec<gmpq::model::options::ModelOption> {
        use gmpq::model::options::ModelOption as O;
        [
            (self.model.is_some(), O::Model),
            (self.input_size.is_some(), O::InputSize),
            (self.rgb, O::Rgb),
            (self.stem.is_some(), O::Stem),
            (self.width.is_some(), O::Width),
        ]
        .into_iter()
        .filter_map(|(given, o)| given.then_some(o))
        .collect()
    }
}

impl SubsetArgs {
    /// The subset these flags describe (nothing held out).
    pub fn spec(&self) -> gmpq::data::SubsetSpec {
        gmpq::data::SubsetSpec {
            limit: self.limit,
            per_class: self.per_class,
            seed: self.subset_seed,
            holdout: 0,
        }
    }
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// train: resnet20 (default), resnet32, resnet56, resnet18, resnet50, mobilenetv2 or
    /// efficientnet-lite0. finetune takes the model from --init and refuses this flag.
    #[arg(long)]
    pub model: Option<String>,
    /// Training data, KIND:PATH (the test split of the same spec is evaluated each epoch).
    #[arg(long, default_value = "bundled:fashion-mnist")]
    pub data: String,
    /// Separate evaluation data (default: the test split of --data).
    #[arg(long)]
    pub test_data: Option<String>,
    /// Model input resolution (default: the data's own).
    #[arg(long, value_parser = positive(), allow_negative_numbers = true)]
    pub input_size: Option<usize>,
    /// Expand gray images to 3 channels.
    #[arg(long)]
    pub rgb: bool,
    /// Stem of resnet18/50 and mobilenetv2: cifar or imagenet (default: cifar below 64 px).
    #[arg(long)]
    pub stem: Option<String>,
    /// Width multiplier of mobilenetv2 [default: 1].
    #[arg(long, allow_negative_numbers = true)]
    pub width: Option<f64>,
    /// Passes over the training images.
    #[arg(long, default_value_t = train_defaults().epochs, value_parser = positive(), allow_negative_numbers = true)]
    pub epochs: usize,
    /// Images per step (of all ranks together in a data-parallel run: each of N ranks
    /// computes B/N).
    #[arg(long, default_value_t = train_defaults().batch_size, value_parser = positive(), allow_negative_numbers = true)]
    pub batch_size: usize,
    /// Learning rate [default: 0.1; finetune: 0.01].
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f64>,
    /// SGD momentum.
    #[arg(long, default_value_t = train_defaults().momentum, allow_negative_numbers = true)]
    pub momentum: f64,
    /// Weight decay [default: 5e-4; finetune: 4e-5].
    #[arg(long = "wd", value_name = "WD", allow_negative_numbers = true)]
    pub weight_decay: Option<f64>,
    /// cosine, constant, or step:EPOCHS:GAMMA (e.g. step:10:0.1).
    #[arg(long, default_value = "cosine")]
    pub schedule: String,
    /// Random-crop padding in pixels (0 disables random crops).
    #[arg(long, default_value_t = train_defaults().augment.crop_padding, allow_negative_numbers = true)]
    pub crop_padding: usize,
    /// Random horizontal flips (not for digits).
    #[arg(long)]
    pub hflip: bool,
    /// Seed of the weights, the batches and the augmentation.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub seed: u64,
    #[command(flatten)]
    pub subset: SubsetArgs,
    /// Hold out this many training images (a fixed stratified draw, the same for every
    /// seed) for validation: never trained on, evaluated after each epoch (val top-1).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub holdout: usize,
    /// Evaluate on at most this many test images (stratified).
    #[arg(long, value_parser = positive(), allow_negative_numbers = true)]
    pub test_limit: Option<usize>,
    /// Output folder (checkpoint last.safetensors + last.json); default runs/train (train),
    /// runs/finetune (finetune).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue from the last complete epoch in --out.
    #[arg(long)]
    pub resume: bool,
    /// Print the final metrics as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct FinetuneArgs {
    /// Full-precision checkpoint to start from (from `gmpq train` or `gmpq import`).
    #[arg(long)]
    pub init: PathBuf,
    #[command(flatten)]
    pub policy: PolicyChoice,
    /// How the activation clips are calibrated.
    #[arg(long, value_enum, default_value = "kl")]
    pub calibration: gmpq::quant::CalibrationMethod,
    /// Training images used to calibrate before fine-tuning.
    #[arg(long = "calib-limit", value_name = "N", alias = "calib-images", default_value_t = gmpq::train::CALIBRATION_IMAGES, value_parser = positive(), allow_negative_numbers = true)]
    pub calib_images: usize,
    /// Per-output-channel weight thresholds.
    #[arg(long)]
    pub per_channel: bool,
    /// integer (default): batch norm folded, int32 biases and every conv output and residual
    /// sum re-quantized, exactly what the exported graph's integer kernels compute;
    /// fake-quant: the reference's float batch norm and residuals (slower to deploy).
    #[arg(long, default_value = "integer", value_parser = parse_numerics)]
    pub numerics: gmpq::quant::Numerics,
    #[command(flatten)]
    pub train: TrainArgs,
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
    /// Images per forward pass.
    #[arg(long, default_value_t = 256, value_parser = positive(), allow_negative_numbers = true)]
    pub batch_size: usize,
    /// Print the result as one JSON document on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// resnet18, resnet50, mobilenetv2 or efficientnet-lite0.
    #[arg(long)]
    pub model: String,
    /// A .safetensors file with the state dict.
    #[arg(long)]
    pub weights: PathBuf,
    /// Output checkpoint (.safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Classes the model predicts.
    #[arg(long, alias = "num-classes", default_value_t = 1000, value_parser = positive(), allow_negative_numbers = true)]
    pub classes: usize,
    /// Square input resolution (default 224; efficientnet-lite0: 224 only).
    #[arg(long, value_parser = positive(), allow_negative_numbers = true)]
    pub input_size: Option<usize>,
    /// cifar or imagenet (default imagenet; not for efficientnet-lite0).
    #[arg(long)]
    pub stem: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Images/s of the full training step on synthetic data: full precision, a fixed
    /// quantization policy (--policy, --uniform: the QAT step) or the supernet (--supernet).
    Train(BenchTrainArgs),
    /// Seconds of one full GMPQ search step on synthetic data: teacher and supernet forward,
    /// attribution, CE + attribution + complexity loss, backward, weight and α updates.
    SearchStep(BenchSearchStepArgs),
    /// Inference images/s: gmpq's FP32 libtorch network, its FP32 ONNX export and its QDQ
    /// export through ONNX Runtime (random weights), with the op types ONNX Runtime's
    /// optimized QDQ graph runs (QLinearConv = integer convolutions).
    Infer(BenchInferArgs),
}

#[derive(Debug, Args)]
pub struct BenchInferArgs {
    /// Network to time (resnet20, resnet32, resnet56, resnet18, resnet50, mobilenetv2).
    #[arg(long, default_value = "resnet20")]
    pub model: String,
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
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
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

#[derive(Debug, Args)]
pub struct BenchSearchStepArgs {
    /// Network to time (resnet20, resnet32, resnet56, resnet18, resnet50, mobilenetv2).
    #[arg(long, default_value = "resnet18")]
    pub model: String,
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

#[derive(Debug, Args)]
pub struct BenchTrainArgs {
    /// Network to time (resnet20, resnet32, resnet56, resnet18, resnet50, mobilenetv2).
    #[arg(long, default_value = "resnet20")]
    pub model: String,
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

fn parse_numerics(s: &str) -> Result<gmpq::quant::Numerics, String> {
    s.parse()
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
