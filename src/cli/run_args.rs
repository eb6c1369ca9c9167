//! The arguments of the search, the whole-run commands (pipeline, study, demo, report) and
//! the benchmarks.

use super::args::*;
use clap::builder::TypedValueParser as _;
use clap::{Args, Subcommand};
use std::path::PathBuf;

/// `--method`'s values, with their help, from the library's list.
pub(super) fn method_names() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(
        gmpq::search::method::METHOD_NAMES
            .iter()
            .map(|(name, help)| clap::builder::PossibleValue::new(*name).help(*help)),
    )
}

/// The search defaults, defined once in the library (`SearchConfig::default()`).
pub(super) fn search_defaults() -> gmpq::search::SearchConfig {
    gmpq::search::SearchConfig::default()
}

/// A `--baseline` arm: any arm but GMPQ, which always runs.
pub(super) fn baseline_arm() -> impl clap::builder::TypedValueParser<Value = gmpq::pipeline::Arm> {
    use gmpq::pipeline::Arm;
    clap::builder::PossibleValuesParser::new(Arm::BASELINES.map(Arm::name))
        .try_map(|s| s.parse::<Arm>())
}

#[derive(Debug, Args)]
pub struct ExtractArgs {
    /// A search run folder (its policy.json) or a searched policy file.
    pub run: PathBuf,
    /// The extraction rule (default: the one the search used).
    #[arg(long, value_enum)]
    pub rule: Option<gmpq::search::ExtractionRule>,
    #[command(flatten)]
    pub budget: BudgetArgs,
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
    #[command(flatten)]
    pub budget: BudgetArgs,
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
    #[command(flatten)]
    pub budget: BudgetArgs,
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
