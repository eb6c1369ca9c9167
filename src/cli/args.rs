//! The commands' arguments: each command's flags, with their help, defaults and parsers.

use clap::builder::TypedValueParser as _;
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

/// A count that must be at least 1 (clap names the flag when it is not).
pub(super) fn positive() -> impl clap::builder::TypedValueParser<Value = usize> {
    clap::builder::StringValueParser::new().try_map(|s| match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_string()),
        Ok(n) => Ok(n),
        Err(_) => Err("expected a whole number, at least 1".to_string()),
    })
}

/// One bit width of a candidate list, in `policy::BIT_RANGE`.
pub(super) fn bit_width() -> clap::builder::RangedI64ValueParser<u32> {
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

pub(super) fn parse_numerics(s: &str) -> Result<gmpq::quant::Numerics, String> {
    s.parse()
}

/// The library's training recipe, whose values are the flags' defaults.
pub(super) fn train_defaults() -> gmpq::train::TrainConfig {
    gmpq::train::TrainConfig::default()
}

/// A policy's budget, in one of three measures (METHOD.md's BOPs, compression and size).
#[derive(Debug, Clone, Args)]
pub struct BudgetArgs {
    /// Budget: policy BOPs at most this (e.g. 1.2e9, 1.2G, 800M).
    #[arg(long, group = "budget")]
    pub target_bops: Option<String>,
    /// Budget: FP BOPs / policy BOPs at least this (64 ≈ 4-bit equivalent).
    #[arg(long, group = "budget", allow_negative_numbers = true)]
    pub target_compression: Option<f64>,
    /// Budget: model size at most this many MB.
    #[arg(long, group = "budget", allow_negative_numbers = true)]
    pub target_size_mb: Option<f64>,
}
