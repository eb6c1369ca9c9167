//! GMPQ search: a mixed-precision supernet trained on a small proxy dataset with
//! `L = CE + aw·L_attr + λ·L_complexity`, guided by a frozen full-precision teacher's
//! attribution, with λ adapted toward a hard budget (dual ascent) and the policy extracted from
//! the final α under that budget (`extract`: the exact knapsack, or argmax + repair).
//! `aw = 0` is the EdMIPS baseline on the same code path.

mod budget;
mod extract;
pub mod fill;
pub mod hawq;
pub mod method;
mod provenance;
pub mod rank;
mod state;

pub use budget::{
    parse_bops, random_policy, repair, BudgetMode, DualWeight, Geometry, Preferences, Target,
};
pub use extract::{
    argmax_policy, check_feasible, solve as solve_knapsack, ArgmaxRepair, Choice, Extraction,
    ExtractionError, ExtractionRule, Item, Knapsack, SPEND_FLOOR,
};
pub use method::{Allocator, Method};
pub use provenance::{ExtractionRecord, PolicyMeta, RankingRecord};
pub use state::remove_snapshots;

use crate::attribution::{self, capacity_aware_p};
use crate::checkpoint::{self, Checkpoint};
use crate::data::{DataLoader, ImageSource, LoaderConfig, Pipeline, Shard};
use crate::policy::{Candidates, Policy};
use crate::quant::{self, expected_bits_from, Network, Precision, QuantError, QuantizerTensor};
use crate::train::{evaluate, pipelines, Adam, Augment, Sgd, TrainError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    #[error(transparent)]
    Quant(#[from] QuantError),
    #[error(transparent)]
    Dist(#[from] crate::dist::DistError),
    #[error(
        "stopped by {signal} in epoch {epoch}; the last finished epoch's state is kept: run the \
         same command again to resume"
    )]
    Stopped { signal: String, epoch: usize },
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    #[error(transparent)]
    Extraction(#[from] ExtractionError),
    #[error("loss became {value} at epoch {epoch}: the search diverged (try a lower --lr)")]
    NonFiniteLoss { epoch: usize, value: f64 },
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, SearchError>;

/// How the student's attribution is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttributionMethod {
    /// `g_k = W_fc[c,k]` (exact for GAP → linear heads; no second backward).
    Cam,
    /// Gradient of the class logit w.r.t. the feature map, with `create_graph`.
    GradCam,
}

/// The optimizer of the architecture parameters α.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AlphaOptimizer {
    /// SGD with the search's momentum (the reference).
    #[default]
    Sgd,
    /// Adam, β = (0.5, 0.999), as DARTS-style searches train α.
    Adam,
}

/// The softmax temperature over the search: `start` at the first epoch, `end` at the last,
/// geometric in between. (1, 1) is the reference's plain softmax.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TemperatureSchedule {
    pub start: f64,
    pub end: f64,
}

impl Default for TemperatureSchedule {
    fn default() -> Self {
        Self {
            start: 1.0,
            end: 1.0,
        }
    }
}

impl TemperatureSchedule {
    /// T during `epoch` (0-based) of `epochs`.
    pub fn at(&self, epoch: usize, epochs: usize) -> f64 {
        if epochs <= 1 || self.start == self.end {
            return self.end;
        }
        let f = epoch.min(epochs - 1) as f64 / (epochs - 1) as f64;
        self.start * (self.end / self.start).powf(f)
    }
}

/// Named sets of search settings (`--recipe`), each recorded in full in the policy's meta.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Recipe {
    /// The reference implementation's α dynamics: SGD at lr 0.01 with the weights' step
    /// decay, an upper-bound budget, plain softmax, argmax + repair extraction (the faithful
    /// reproduction and the ablation baseline).
    #[default]
    Reference,
    /// α that move on small proxies and a budget that is spent: Adam for α at lr 0.03
    /// without decay or weight decay, α frozen for the first 20 % of the epochs, the budget
    /// as an equality held by the penalty `μ·(E[cost]/limit − 1)²` (μ = 10), the temperature
    /// annealed 1 → 0.2, and the exact knapsack extraction (docs/SEARCH.md).
    Scarce,
}

impl Recipe {
    /// The recipe's name, as `--recipe` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Recipe::Reference => "reference",
            Recipe::Scarce => "scarce",
        }
    }

    /// Sets this recipe's levers in `cfg` (other settings stay).
    pub fn apply(self, cfg: &mut SearchConfig) {
        cfg.recipe = self;
        match self {
            Recipe::Reference => {
                // The reference's values are the config defaults, defined once there.
                let d = SearchConfig::default();
                cfg.alpha_optimizer = d.alpha_optimizer;
                cfg.alpha_lr = d.alpha_lr;
                cfg.alpha_weight_decay = d.alpha_weight_decay;
                cfg.alpha_lr_decay = d.alpha_lr_decay;
                cfg.alpha_frozen_epochs = d.alpha_frozen_epochs;
                cfg.budget_mode = d.budget_mode;
                cfg.dual_rate = d.dual_rate;
                cfg.budget_penalty = d.budget_penalty;
                cfg.temperature = d.temperature;
                cfg.extraction = d.extraction;
            }
            Recipe::Scarce => {
                cfg.alpha_optimizer = AlphaOptimizer::Adam;
                // ~375 α steps on a 2,000-image proxy: DARTS' 3e-4 over ~20k steps scaled
                // to the step count (3e-3 moved α too slowly to follow the budget).
                cfg.alpha_lr = 0.03;
                cfg.alpha_weight_decay = 0.0;
                cfg.alpha_lr_decay = false;
                cfg.alpha_frozen_epochs = cfg.epochs / 5;
                cfg.budget_mode = BudgetMode::Penalty;
                cfg.budget_penalty = default_budget_penalty();
                cfg.temperature = TemperatureSchedule {
                    start: 1.0,
                    end: 0.2,
                };
                cfg.extraction = ExtractionRule::Knapsack;
            }
        }
    }
}

impl std::fmt::Display for Recipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Recipe::Reference => "reference",
            Recipe::Scarce => "scarce",
        })
    }
}

/// The α optimizer a search runs with.
pub enum AlphaOpt {
    Sgd(Sgd),
    Adam(Adam),
}

impl AlphaOpt {
    pub fn new(cfg: &SearchConfig, alphas: Vec<(String, Tensor)>) -> Self {
        match cfg.alpha_optimizer {
            AlphaOptimizer::Sgd => {
                Self::Sgd(Sgd::new(alphas, cfg.momentum, cfg.alpha_weight_decay))
            }
            AlphaOptimizer::Adam => {
                Self::Adam(Adam::new(alphas, 0.5, 0.999, cfg.alpha_weight_decay))
            }
        }
    }
    pub fn zero_grad(&mut self) {
        match self {
            Self::Sgd(o) => o.zero_grad(),
            Self::Adam(o) => o.zero_grad(),
        }
    }
    /// Averages the α gradients over the ranks of `group`.
    pub fn average_grads(
        &mut self,
        group: &crate::dist::Group,
    ) -> std::result::Result<(), crate::dist::DistError> {
        match self {
            Self::Sgd(o) => o.average_grads(group),
            Self::Adam(o) => o.average_grads(group),
        }
    }

    pub fn step(&mut self, lr: f64) {
        match self {
            Self::Sgd(o) => o.step(lr),
            Self::Adam(o) => o.step(lr),
        }
    }
    pub fn state(&self) -> BTreeMap<String, Tensor> {
        match self {
            Self::Sgd(o) => o.state(),
            Self::Adam(o) => o.state(),
        }
    }
    pub fn load_state(&mut self, state: BTreeMap<String, Tensor>) {
        match self {
            Self::Sgd(o) => o.load_state(state),
            Self::Adam(o) => o.load_state(state),
        }
    }
}

/// Search hyper-parameters (saved into every policy the search writes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchConfig {
    pub candidates: Candidates,
    pub epochs: usize,
    /// Epochs of the shared warm-up (no complexity term) before per-target search in a
    /// Pareto run; 0 for a single target.
    pub warmup_epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub alpha_lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub alpha_weight_decay: f64,
    /// Both learning rates ×0.1 every this many epochs.
    pub step_epochs: usize,
    pub attribution_weight: f64,
    /// Fixed attribution exponent; `None`: the capacity-aware rule.
    pub p: Option<f64>,
    /// Complexity weight: fixed without a target, the starting λ with one.
    pub complexity_weight: f64,
    /// Dual-ascent rate of λ (per step).
    pub dual_rate: f64,
    pub attribution: AttributionMethod,
    pub augment: Augment,
    pub seed: u64,
    /// How the policy is taken from the final α under the budget.
    #[serde(default)]
    pub extraction: ExtractionRule,
    /// The preset these settings started from (`--recipe`).
    #[serde(default)]
    pub recipe: Recipe,
    #[serde(default)]
    pub alpha_optimizer: AlphaOptimizer,
    /// Whether α's learning rate follows the weights' ×0.1 step decay.
    #[serde(default = "yes")]
    pub alpha_lr_decay: bool,
    /// Epochs at the start with α frozen (weights only) before α starts moving.
    #[serde(default)]
    pub alpha_frozen_epochs: usize,
    #[serde(default)]
    pub budget_mode: BudgetMode,
    #[serde(default)]
    pub temperature: TemperatureSchedule,
    /// μ of [`BudgetMode::Penalty`]: the loss `μ·(E[cost]/limit − 1)²`.
    #[serde(default = "default_budget_penalty")]
    pub budget_penalty: f64,
}

fn default_budget_penalty() -> f64 {
    10.0
}

fn yes() -> bool {
    true
}

impl Default for SearchConfig {
    fn default() -> Self {
        Self {
            candidates: Candidates {
                weight: crate::policy::DEFAULT_CANDIDATES.to_vec(),
                activation: crate::policy::DEFAULT_CANDIDATES.to_vec(),
            },
            epochs: 25,
            warmup_epochs: 0,
            batch_size: 128,
            lr: 0.1,
            alpha_lr: 0.01,
            momentum: 0.9,
            weight_decay: 1e-4,
            alpha_weight_decay: 1e-4,
            step_epochs: 10,
            attribution_weight: 20.0,
            p: None,
            complexity_weight: 3e-4,
            dual_rate: 0.05,
            attribution: AttributionMethod::Cam,
            augment: Augment {
                crop_padding: 2,
                hflip: false,
            },
            seed: 0,
            extraction: ExtractionRule::ArgmaxRepair,
            recipe: Recipe::Reference,
            alpha_optimizer: AlphaOptimizer::Sgd,
            alpha_lr_decay: true,
            alpha_frozen_epochs: 0,
            budget_mode: BudgetMode::UpperBound,
            temperature: TemperatureSchedule::default(),
            budget_penalty: default_budget_penalty(),
        }
    }
}

/// One line of the per-epoch search log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochLog {
    pub target: Option<String>,
    pub epoch: usize,
    pub ce: f64,
    pub attribution_loss: f64,
    pub complexity_loss: f64,
    pub p: f64,
    pub lambda: f64,
    pub expected_bops: f64,
    pub argmax_bops: f64,
    /// Top-1 on held-out proxy images of the argmax policy's network (supernet weights,
    /// batch norm re-estimated on 30 training batches, no fine-tuning).
    pub argmax_proxy_top1: f64,
    pub rank_correlation: f64,
    pub seconds: f64,
    pub images: usize,
}

/// Observes the search (the CLI draws a progress bar).
pub trait SearchProgress {
    fn phase(&self, _name: &str, _epochs: usize, _batches_per_epoch: usize) {}
    fn step(&self, _ce: f64, _attr: f64, _expected_bops: f64) {}
    fn epoch(&self, _log: &EpochLog) {}
}

pub struct Quiet;
impl SearchProgress for Quiet {}

/// What a search needs besides its settings.
pub struct SearchJob<'a> {
    pub teacher: PathBuf,
    pub proxy: Arc<dyn ImageSource>,
    pub train_indices: Vec<usize>,
    /// Held-out proxy images for the argmax policy's accuracy and the probe batch.
    pub val_indices: Vec<usize>,
    pub config: SearchConfig,
    /// One target, several (Pareto), or none (the fixed complexity weight).
    pub targets: Vec<Target>,
    pub device: Device,
    pub progress: &'a dyn SearchProgress,
    /// Where each phase snapshots itself after every epoch and resumes from
    /// (`search-state-*.safetensors`); `None`: no snapshots.
    pub state_dir: Option<PathBuf>,
}

/// The result for one target.
pub struct SearchResult {
    pub target: Option<Target>,
    pub policy: Policy,
    /// The argmax policy before repair.
    pub argmax: Policy,
    /// The final α, from which the argmax and the repair were taken.
    pub alpha: Preferences,
    pub log: Vec<EpochLog>,
    pub teacher_val_top1: f64,
    pub seconds: f64,
    pub images: usize,
    /// Probe images with the teacher's and the final supernet's attribution maps.
    pub heatmaps: [Tensor; 3],
}

/// Warns when `target` is above the costliest policy of the candidates: the budget then
/// constrains nothing and the search is free to take the most bits everywhere.
pub fn warn_if_slack(geometry: &Geometry, target: &Target, cands: &Candidates) {
    let (w, a) = (
        cands.weight.iter().copied().max().unwrap_or(2) as f64,
        cands.activation.iter().copied().max().unwrap_or(2) as f64,
    );
    let costliest = geometry.measure(target, &vec![(w, a); geometry.layers.len()]);
    if costliest <= geometry.limit(target) {
        tracing::warn!(
            "the budget {target} is above the costliest policy of the candidates (every layer \
             at w{w}a{a}): it constrains nothing"
        );
    }
}

/// Takes a policy again from a searched policy's saved α (`meta.alpha`) with `rule` under
/// `target` (default: the search's own, `meta.target`), on `model`'s geometry. The result
/// carries fresh totals and its provenance in `meta.extraction`.
pub fn re_extract(
    searched: &Policy,
    model: &crate::model::ModelConfig,
    rule: ExtractionRule,
    target: Option<Target>,
) -> Result<Policy> {
    let mut meta = PolicyMeta::of(searched)
        .map_err(|e| SearchError::Invalid(format!("the policy's meta is malformed: {e}")))?
        .ok_or_else(|| {
            SearchError::Invalid("the policy has no meta: it was not written by gmpq search".into())
        })?;
    let alpha: Preferences = meta.alpha.clone().ok_or_else(|| {
        SearchError::Invalid(
            "the policy's meta.alpha is missing: only policies written by gmpq search keep their α"
                .into(),
        )
    })?;
    let target = target.or(meta.target);
    let fp = quant::build(model, Precision::Full, Device::Cpu)?;
    searched.validate(model, fp.net.convs())?;
    let geometry = Geometry::new(fp.net.convs(), fp.net.fc_spec());
    alpha
        .check(&geometry.layers, &searched.candidates)
        .map_err(|e| SearchError::Invalid(format!("the policy's meta.alpha: {e}")))?;
    let mut policy = rule
        .strategy()
        .extract(searched, &geometry, target.as_ref(), &alpha)?
        .with_totals(fp.net.convs(), fp.net.fc_spec());
    meta.target = target;
    meta.extraction = Some(ExtractionRecord {
        rule: rule.to_string(),
        from: "saved alpha".into(),
    });
    policy.meta = Some(meta.to_value());
    Ok(policy)
}

/// `L_complexity = Σ_l MACs_l·E[b_a]_l·E[b_w]_l / MACs_0`, `MACs_0` the first quantized
/// layer's MACs.
pub fn complexity_loss(bits: &[(Tensor, Tensor)], macs: &[f64]) -> Tensor {
    let macs0 = macs.first().copied().unwrap_or(1.0);
    bits.iter()
        .zip(macs)
        .map(|((w, a), m)| w * a * (m / macs0))
        .reduce(|x, y| x + y)
        .unwrap_or_else(|| Tensor::zeros([], (Kind::Float, Device::Cpu)))
}

/// Per-layer `(E[b_w], E[b_a])` tensors of a supernet, in forward order.
pub fn expected_layer_bits(net: &Network, vars: &HashMap<String, Tensor>) -> Vec<(Tensor, Tensor)> {
    let Precision::Supernet { candidates } = &net.precision else {
        return Vec::new();
    };
    net.handles
        .iter()
        .map(|h| {
            let n = &h.spec.name;
            let t = &net.temperature;
            (
                expected_bits_from(
                    &t.softmax(&vars[&QuantizerTensor::AlphaW.of(n)]),
                    &candidates.weight,
                ),
                expected_bits_from(
                    &t.softmax(&vars[&QuantizerTensor::AlphaA.of(n)]),
                    &candidates.activation,
                ),
            )
        })
        .collect()
}

fn alpha_table(net: &Network, suffix: &str) -> BTreeMap<String, Vec<f64>> {
    let vars = net.vs.variables();
    net.handles
        .iter()
        .filter_map(|h| {
            let t = vars.get(&format!("{}.{suffix}", h.spec.name))?;
            let v: Vec<f32> = Vec::try_from(&t.detach().to_device(Device::Cpu)).ok()?;
            Some((h.spec.name.clone(), v.into_iter().map(f64::from).collect()))
        })
        .collect()
}

/// The supernet's current α as repair preferences.
pub fn preferences(net: &Network) -> Preferences {
    Preferences {
        alpha_w: alpha_table(net, "alpha_w"),
        alpha_a: alpha_table(net, "alpha_a"),
        temperature: net.temperature.get(),
        bits: match &net.precision {
            Precision::Supernet { candidates } => Some(candidates.clone()),
            _ => None,
        },
    }
}

/// A fixed-policy network carrying the supernet's weights, batch norm and thresholds, and
/// the clip of each layer's chosen activation branch.
pub fn fixed_from_supernet(sn: &Network, policy: &Policy) -> Result<Network> {
    let Precision::Supernet { candidates } = &sn.precision else {
        return Err(SearchError::Invalid("not a supernet".into()));
    };
    let fixed = quant::build(
        sn.net.config(),
        Precision::Fixed {
            policy: policy.clone(),
            per_channel: false,
            numerics: crate::quant::Numerics::FakeQuant,
        },
        sn.vs.device(),
    )?;
    let src = sn.vs.variables();
    let bits = policy.bits_by_layer();
    tch::no_grad(|| {
        for (name, var) in fixed.vs.variables() {
            let value = match QuantizerTensor::ActClip.layer_of(&name) {
                Some(layer) => {
                    let a = bits.get(layer).map_or(0, |b| b.1);
                    let i = candidates
                        .activation
                        .iter()
                        .position(|&b| b == a)
                        .unwrap_or(0);
                    src[&name].get(i as i64)
                }
                None => src[&name].shallow_clone(),
            };
            var.shallow_clone().copy_(&value);
        }
    });
    Ok(fixed)
}

struct Teacher {
    network: Network,
    pipeline: Pipeline,
}

/// Reads the teacher checkpoint once: its tensors seed the supernets, its network attributes.
fn load_teacher(job: &SearchJob) -> Result<(Checkpoint, Teacher)> {
    let (ck, network) = quant::load(&job.teacher, job.device)?;
    if network.precision != Precision::Full {
        return Err(SearchError::Invalid(format!(
            "{}: the teacher must be a full-precision checkpoint",
            job.teacher.display()
        )));
    }
    network.use_channels_last_weights();
    let pipeline = ck.meta.eval_pipeline.clone();
    Ok((ck, Teacher { network, pipeline }))
}

/// A supernet initialised from the teacher's weights (same layer names).
fn supernet_from(teacher_ck: &Checkpoint, job: &SearchJob) -> Result<Network> {
    let sn = quant::build(
        &teacher_ck.meta.model,
        Precision::Supernet {
            candidates: job.config.candidates.clone(),
        },
        job.device,
    )?;
    sn.load_fp_weights(teacher_ck, &job.teacher)?;
    Ok(sn)
}

/// What a phase produced; `resumed_seconds` is the wall time spent before an interruption.
struct PhaseRun {
    logs: Vec<EpochLog>,
    images: usize,
    resumed_seconds: f64,
}

struct Phase<'a> {
    name: String,
    target: Option<Target>,
    epochs: std::ops::Range<usize>,
    lambda: DualWeight,
    complexity: bool,
    geometry: &'a Geometry,
}

impl Phase<'_> {
    /// This phase's complexity term at the current λ.
    fn term(&self, cfg: &SearchConfig) -> ComplexityTerm<'_> {
        match (self.complexity, self.target, cfg.budget_mode) {
            (false, _, _) => ComplexityTerm::Off,
            (true, Some(target), BudgetMode::Penalty) => ComplexityTerm::Penalty {
                weight: cfg.budget_penalty,
                geometry: self.geometry,
                target,
            },
            (true, _, _) => ComplexityTerm::Weighted(self.lambda.lambda),
        }
    }
}

/// Runs the search for every target. A Pareto run (several targets) shares
/// `warmup_epochs` of supernet training without the complexity term.
pub fn search(job: SearchJob) -> Result<Vec<SearchResult>> {
    let cfg = job.config.clone();
    crate::train::check_run_size(
        cfg.epochs,
        cfg.batch_size,
        job.train_indices.len(),
        "proxy set",
    )
    .map_err(SearchError::Invalid)?;
    if cfg.warmup_epochs >= cfg.epochs && job.targets.len() > 1 {
        return Err(SearchError::Invalid(
            "warm-up must be shorter than the search".into(),
        ));
    }
    // Data-parallel: each rank trains on its share of every batch.
    let shard = crate::dist::shard(cfg.batch_size).map_err(SearchError::Invalid)?;
    tch::manual_seed(cfg.seed as i64);
    let started = Instant::now();
    let (teacher_ck, teacher) = load_teacher(&job)?;
    // The teacher has the supernet's layers: its geometry measures every budget. An
    // unreachable budget fails here, before any training.
    let geometry = Geometry::new(teacher.network.net.convs(), teacher.network.net.fc_spec());
    for t in &job.targets {
        check_feasible(&geometry, t, &cfg.candidates)?;
        warn_if_slack(&geometry, t, &cfg.candidates);
    }
    if let Some(problem) = crate::train::input_mismatch(
        job.proxy.as_ref(),
        &teacher.pipeline,
        &teacher_ck.meta.model,
    ) {
        return Err(SearchError::Invalid(format!(
            "the proxy data {problem}: the teacher does not fit it"
        )));
    }
    let native = job.proxy.native_shape().unwrap_or([
        teacher_ck.meta.model.in_channels,
        teacher_ck.meta.model.input_size,
        teacher_ck.meta.model.input_size,
    ]);
    let (train_pipe, _) = pipelines(
        native,
        &teacher_ck.meta.model,
        cfg.augment,
        teacher.pipeline.normalize.clone(),
    );
    let teacher_val = evaluate(
        &teacher.network.net,
        job.proxy.clone(),
        &job.val_indices,
        &teacher.pipeline,
        256,
        job.device,
    )?;
    // A teacher near chance on the proxy guides the search towards nothing.
    let chance = 100.0 / teacher_ck.meta.model.num_classes.max(1) as f64;
    if !job.val_indices.is_empty() && teacher_val.top1 < 2.0 * chance {
        tracing::warn!(
            "the teacher {} scores {:.2}% on held-out proxy images (chance {chance:.2}%): \
             its attribution guides the search towards nothing; train it longer first",
            job.teacher.display(),
            teacher_val.top1
        );
    }
    let probe = probe_batch(&job, &teacher.pipeline)?;

    let base = supernet_from(&teacher_ck, &job)?;
    let mut base = Some(base);
    let ctx = Ctx {
        job: &job,
        cfg: &cfg,
        teacher: &teacher,
        train_pipe: Arc::new(train_pipe),
        probe,
        shard,
    };
    let mut images_shared = 0usize;
    let mut shared_log = Vec::new();
    let mut warm_resumed = 0.0;
    let shared_state = if job.targets.len() > 1 && cfg.warmup_epochs > 0 {
        let phase = Phase {
            name: "warm-up".into(),
            target: None,
            epochs: 0..cfg.warmup_epochs,
            lambda: DualWeight {
                lambda: 0.0,
                rate: 0.0,
                mode: cfg.budget_mode,
                scale: 0.0,
            },
            complexity: false,
            geometry: &geometry,
        };
        let warm = base
            .as_ref()
            .ok_or_else(|| SearchError::Invalid("no supernet".into()))?;
        let run = ctx.run(warm, phase)?;
        images_shared = run.images;
        shared_log = run.logs;
        warm_resumed = run.resumed_seconds;
        Some(checkpoint::var_store_tensors(&warm.vs))
    } else {
        None
    };
    let warm_secs = started.elapsed().as_secs_f64() + warm_resumed;
    let targets: Vec<Option<Target>> = if job.targets.is_empty() {
        vec![None]
    } else {
        job.targets.iter().copied().map(Some).collect()
    };
    let mut results = Vec::new();
    for target in targets {
        let t0 = Instant::now();
        let sn = match (&shared_state, base.take()) {
            (Some(state), _) => {
                let sn = supernet_from(&teacher_ck, &job)?;
                tch::no_grad(|| {
                    for (name, var) in sn.vs.variables() {
                        var.shallow_clone()
                            .copy_(&state[&name].to_device(job.device));
                    }
                });
                sn
            }
            // The first target of a run without warm-up trains the base supernet itself.
            (None, Some(b)) => b,
            (None, None) => supernet_from(&teacher_ck, &job)?,
        };
        let start = if shared_state.is_some() {
            cfg.warmup_epochs
        } else {
            0
        };
        let phase = Phase {
            name: target.map_or("search".to_string(), |t| format!("search {t}")),
            target,
            epochs: start..cfg.epochs,
            lambda: DualWeight {
                // The log's λ column shows μ under the penalty (it stays fixed).
                lambda: match (cfg.budget_mode, target) {
                    (BudgetMode::Penalty, Some(_)) => cfg.budget_penalty,
                    _ => cfg.complexity_weight,
                },
                rate: if target.is_some() { cfg.dual_rate } else { 0.0 },
                mode: cfg.budget_mode,
                scale: cfg.complexity_weight,
            },
            complexity: true,
            geometry: &geometry,
        };
        let PhaseRun {
            logs: mut log,
            images,
            resumed_seconds,
        } = ctx.run(&sn, phase)?;
        let argmax = sn.argmax_policy()?;
        let alpha = preferences(&sn);
        let policy = cfg
            .extraction
            .strategy()
            .extract(&argmax, &geometry, target.as_ref(), &alpha)?
            .with_totals(sn.net.convs(), sn.net.fc_spec());
        let mut full_log = shared_log.clone();
        full_log.append(&mut log);
        let probe = ctx.probe.narrow(0, 0, ctx.probe.size()[0].min(6));
        let (a_t, a_s, _) = tch::no_grad(|| ctx.maps(&sn, &probe, false));
        results.push(SearchResult {
            target,
            policy,
            argmax,
            alpha,
            log: full_log,
            teacher_val_top1: teacher_val.top1,
            seconds: t0.elapsed().as_secs_f64() + resumed_seconds + warm_secs,
            images: images + images_shared,
            heatmaps: [probe, a_t, a_s],
        });
    }
    Ok(results)
}

/// Teacher and student attribution maps of `x` (student with gradient), and the student's
/// logits.
fn attribution_maps(
    teacher: &crate::model::Model,
    sn: &Network,
    method: AttributionMethod,
    x: &Tensor,
    train: bool,
) -> (Tensor, Tensor, Tensor) {
    let a_t = tch::no_grad(|| {
        let f = teacher.features(x, false);
        let logits = teacher.head(&f);
        attribution::cam(&f, teacher.fc_weight(), &attribution::top1(&logits))
    });
    let f_s = sn.net.features(x, train);
    let logits = sn.net.head(&f_s);
    let classes = attribution::top1(&logits);
    let a_s = match method {
        AttributionMethod::Cam => attribution::cam(&f_s, sn.net.fc_weight(), &classes),
        AttributionMethod::GradCam => attribution::grad_cam(&f_s, &logits, &classes),
    };
    (a_t, a_s, logits)
}

/// What one search step measured.
#[derive(Debug, Clone)]
pub struct StepOutcome {
    pub ce: f64,
    pub attribution_loss: f64,
    pub complexity_loss: f64,
    pub p: f64,
    /// Per-layer `(E[b_w], E[b_a])` before the update.
    pub expected_bits: Vec<(f64, f64)>,
}

/// The complexity term of one search step.
#[derive(Debug, Clone, Copy)]
pub enum ComplexityTerm<'g> {
    /// No complexity term (a shared warm-up).
    Off,
    /// `λ·L_complexity`: the fixed weight, or the dual λ of a budgeted search.
    Weighted(f64),
    /// `μ·(E[cost]/limit − 1)²` ([`BudgetMode::Penalty`]).
    Penalty {
        weight: f64,
        geometry: &'g Geometry,
        target: Target,
    },
}

/// The supernet, its teacher and the two optimizers of one search step.
pub struct SearchStep<'a> {
    pub supernet: &'a Network,
    pub teacher: &'a crate::model::Model,
    pub config: &'a SearchConfig,
    pub weight_opt: &'a mut Sgd,
    pub alpha_opt: &'a mut AlphaOpt,
    /// Per-layer MACs of the quantized layers, in forward order.
    pub macs: &'a [f64],
    /// The supernet's variables by name.
    pub vars: &'a HashMap<String, Tensor>,
    /// Data-parallel: the ranks whose gradients (weights and α) each step averages.
    pub group: Option<&'a crate::dist::Group>,
}

impl SearchStep<'_> {
    /// One step of `L = CE + aw·L_attr + complexity`: forward through teacher and
    /// supernet, backward, and both optimizer updates. `alpha_lr`: `None` while α is
    /// frozen. `epoch` only labels a divergence.
    pub fn run(
        &mut self,
        x: &Tensor,
        y: &Tensor,
        complexity: ComplexityTerm,
        lr: f64,
        alpha_lr: Option<f64>,
        epoch: usize,
    ) -> Result<StepOutcome> {
        let cfg = self.config;
        let (a_t, a_s, logits) =
            attribution_maps(self.teacher, self.supernet, cfg.attribution, x, true);
        let ce = logits.cross_entropy_for_logits(y);
        let bits = expected_layer_bits(self.supernet, self.vars);
        let bits_f: Vec<(f64, f64)> = bits
            .iter()
            .map(|(w, a)| (w.double_value(&[]), a.double_value(&[])))
            .collect();
        // p follows the current α but is not itself optimised (no gradient through p).
        let p = cfg.p.unwrap_or_else(|| capacity_aware_p(&bits_f));
        let l_attr = if cfg.attribution_weight != 0.0 {
            attribution::attribution_loss(&a_t, &a_s, p)
        } else {
            Tensor::zeros([], (Kind::Float, x.device()))
        };
        let l_comp = complexity_loss(&bits, self.macs);
        let mut loss = &ce + &l_attr * cfg.attribution_weight;
        match complexity {
            ComplexityTerm::Off => {}
            ComplexityTerm::Weighted(l) => loss += &l_comp * l,
            ComplexityTerm::Penalty {
                weight,
                geometry,
                target,
            } => {
                let deviation =
                    geometry.measure_tensor(&target, &bits) / geometry.limit(&target) - 1.0;
                loss += deviation.square() * weight;
            }
        }
        let mut loss_v = loss.double_value(&[]);
        let stop = crate::runtime::stop_requested();
        let mut stopping = stop.is_some();
        if let Some(g) = self.group {
            // Every rank sees a NaN, or a stop signal, on any rank, and stops with it.
            let all = g.sum_f64(&[loss_v, stop.map_or(0.0, f64::from)])?;
            loss_v = all[0] / g.world as f64;
            stopping = all[1] != 0.0;
        }
        if stopping {
            return Err(SearchError::Stopped {
                signal: crate::runtime::stop_cause(stop),
                epoch,
            });
        }
        if !loss_v.is_finite() {
            return Err(SearchError::NonFiniteLoss {
                epoch,
                value: loss_v,
            });
        }
        self.weight_opt.zero_grad();
        self.alpha_opt.zero_grad();
        loss.backward();
        if let Some(g) = self.group {
            self.weight_opt.average_grads(g)?;
            self.alpha_opt.average_grads(g)?;
        }
        self.weight_opt.step(lr);
        if let Some(alpha_lr) = alpha_lr {
            self.alpha_opt.step(alpha_lr);
        }
        Ok(StepOutcome {
            ce: ce.double_value(&[]),
            attribution_loss: l_attr.double_value(&[]),
            complexity_loss: l_comp.double_value(&[]),
            p,
            expected_bits: bits_f,
        })
    }
}

struct Ctx<'a> {
    job: &'a SearchJob<'a>,
    cfg: &'a SearchConfig,
    teacher: &'a Teacher,
    train_pipe: Arc<Pipeline>,
    probe: Tensor,
    /// This rank's share of every batch (all of it for a lone process).
    shard: Shard,
}

fn probe_batch(job: &SearchJob, pipeline: &Pipeline) -> Result<Tensor> {
    let n = job.val_indices.len().min(64);
    let mut loader = DataLoader::new(
        job.proxy.clone(),
        &job.val_indices[..n],
        Arc::new(pipeline.clone()),
        LoaderConfig {
            batch_size: n.max(1),
            ..Default::default()
        },
        0,
    )?;
    match loader.next() {
        Some(b) => Ok(b?.images.to_device(job.device)),
        None => Err(SearchError::Invalid(
            "the proxy validation set is empty".into(),
        )),
    }
}

impl Ctx<'_> {
    /// Re-estimates a fixed network's batch-norm statistics on training batches: the
    /// supernet's statistics describe its softmax-mixed inputs, not one branch's, and make
    /// the argmax network look far worse than it is.
    fn recalibrate_batch_norm(&self, fixed: &Network, epoch: usize) -> Result<()> {
        // Momentum 0.1: after 30 batches the supernet's statistics weigh 0.9^30 ≈ 4%.
        const BATCHES: usize = 30;
        let job = self.job;
        let mut done = 0;
        let mut round = 0u64;
        while done < BATCHES {
            let loader = DataLoader::new(
                job.proxy.clone(),
                &job.train_indices,
                self.train_pipe.clone(),
                LoaderConfig::training(self.cfg.batch_size, self.cfg.seed ^ 0xB4)
                    .sharded(self.shard),
                (epoch as u64) << 8 | round,
            )?;
            let before = done;
            tch::no_grad(|| -> Result<()> {
                for batch in loader.take(BATCHES - done) {
                    let x = batch?.images.to_device(job.device);
                    let _ = tch::nn::ModuleT::forward_t(&fixed.net, &x, true);
                    done += 1;
                }
                Ok(())
            })?;
            if done == before {
                break;
            }
            round += 1;
        }
        Ok(())
    }

    /// Teacher and student attribution maps of `x` (student with gradient).
    fn maps(&self, sn: &Network, x: &Tensor, train: bool) -> (Tensor, Tensor, Tensor) {
        attribution_maps(
            &self.teacher.network.net,
            sn,
            self.cfg.attribution,
            x,
            train,
        )
    }

    fn run(&self, sn: &Network, mut phase: Phase) -> Result<PhaseRun> {
        let cfg = self.cfg;
        let job = self.job;
        let mut w_opt = Sgd::new(sn.weight_parameters(), cfg.momentum, cfg.weight_decay);
        let mut a_opt = AlphaOpt::new(cfg, sn.alpha_parameters());
        let snapshot = job.state_dir.as_ref().map(|d| state::path(d, &phase.name));
        let mut logs = Vec::new();
        let mut images = 0usize;
        let mut resumed_seconds = 0.0;
        let mut first = phase.epochs.start;
        if let Some(path) = &snapshot {
            if let Some(st) = state::load(path, cfg, &phase.name, &sn.vs, &mut w_opt, &mut a_opt)? {
                tracing::info!(
                    "{}: resuming after epoch {} ({})",
                    phase.name,
                    st.epochs_done,
                    path.display()
                );
                first = st.epochs_done.clamp(phase.epochs.start, phase.epochs.end);
                phase.lambda.lambda = st.lambda;
                logs = st.logs;
                images = st.images;
                resumed_seconds = st.seconds;
            }
        }
        let phase_started = Instant::now();
        let vars = sn.vs.variables();
        let macs: Vec<f64> = sn.handles.iter().map(|h| h.spec.macs() as f64).collect();
        let steps = job.train_indices.len() / cfg.batch_size;
        // Data-parallel: rank 0's supernet for all; each rank its share of every batch; rank 0
        // reports and saves.
        let group = crate::dist::current();
        let shard = self.shard;
        if let Some(g) = group {
            g.broadcast_var_store(&sn.vs)?;
        }
        let quiet = Quiet;
        let progress: &dyn SearchProgress = if crate::dist::is_main() {
            job.progress
        } else {
            &quiet
        };
        progress.phase(&phase.name, phase.epochs.end - first, steps);
        for epoch in first..phase.epochs.end {
            let t0 = Instant::now();
            let decay = 0.1f64.powi((epoch / cfg.step_epochs.max(1)) as i32);
            sn.temperature.set(cfg.temperature.at(epoch, cfg.epochs));
            let alpha_moves = epoch >= cfg.alpha_frozen_epochs;
            let alpha_lr =
                alpha_moves.then_some(cfg.alpha_lr * if cfg.alpha_lr_decay { decay } else { 1.0 });
            let loader = DataLoader::new(
                job.proxy.clone(),
                &job.train_indices,
                self.train_pipe.clone(),
                LoaderConfig::training(cfg.batch_size, cfg.seed).sharded(shard),
                epoch as u64,
            )?;
            let (mut ce_sum, mut attr_sum, mut comp_sum, mut p_last, mut n) =
                (0.0, 0.0, 0.0, 0.0, 0);
            let mut expected = 0.0;
            for batch in loader {
                let batch = batch?;
                let x = batch.images.to_device(job.device);
                let y = batch.labels.to_device(job.device);
                let out = SearchStep {
                    supernet: sn,
                    teacher: &self.teacher.network.net,
                    config: cfg,
                    weight_opt: &mut w_opt,
                    alpha_opt: &mut a_opt,
                    macs: &macs,
                    vars: &vars,
                    group,
                }
                .run(
                    &x,
                    &y,
                    phase.term(cfg),
                    cfg.lr * decay,
                    alpha_lr,
                    epoch + 1,
                )?;
                let bits_f = out.expected_bits;
                expected = phase.geometry.bops(&bits_f);
                if let (Some(t), true, true) = (&phase.target, phase.complexity, alpha_moves) {
                    let m = phase.geometry.measure(t, &bits_f);
                    phase.lambda.update(m, phase.geometry.limit(t));
                }
                let (c, at) = (out.ce, out.attribution_loss);
                ce_sum += c;
                attr_sum += at;
                comp_sum += out.complexity_loss;
                p_last = out.p;
                n += 1;
                images += y.size()[0] as usize * shard.world;
                progress.step(c, at, expected);
            }
            if let Some(g) = group {
                // The epoch's mean losses over all ranks' shares; batch norm as their mean.
                let all = g.sum_f64(&[ce_sum, attr_sum, comp_sum])?;
                let w = g.world as f64;
                (ce_sum, attr_sum, comp_sum) = (all[0] / w, all[1] / w, all[2] / w);
                g.average_running_stats(&sn.vs)?;
            }
            let argmax = sn.argmax_policy()?;
            let fixed = fixed_from_supernet(sn, &argmax)?;
            self.recalibrate_batch_norm(&fixed, epoch)?;
            if let Some(g) = group {
                g.average_running_stats(&fixed.vs)?;
            }
            let val = crate::train::evaluate_shared(
                &fixed.net,
                job.proxy.clone(),
                &job.val_indices,
                &self.teacher.pipeline,
                job.device,
                group,
            )?;
            let (a_t, a_s, _) = tch::no_grad(|| self.maps(sn, &self.probe, false));
            let log = EpochLog {
                target: phase.target.map(|t| t.to_string()),
                epoch: epoch + 1,
                ce: ce_sum / n.max(1) as f64,
                attribution_loss: attr_sum / n.max(1) as f64,
                complexity_loss: comp_sum / n.max(1) as f64,
                p: p_last,
                lambda: phase.lambda.lambda,
                expected_bops: expected,
                argmax_bops: argmax.totals.as_ref().map_or(0.0, |t| t.bops as f64),
                argmax_proxy_top1: val.top1,
                rank_correlation: attribution::spearman(&a_t, &a_s),
                seconds: t0.elapsed().as_secs_f64(),
                images,
            };
            progress.epoch(&log);
            logs.push(log);
            if let Some(g) = group {
                g.check_same_var_store(
                    &sn.vs,
                    &format!("{} after epoch {}", phase.name, epoch + 1),
                )?;
            }
            if let (Some(path), true) = (&snapshot, crate::dist::is_main()) {
                let st = state::PhaseState {
                    config: cfg.clone(),
                    phase: phase.name.clone(),
                    epochs_done: epoch + 1,
                    lambda: phase.lambda.lambda,
                    logs: logs.clone(),
                    images,
                    seconds: resumed_seconds + phase_started.elapsed().as_secs_f64(),
                };
                state::save(path, &st, &sn.vs, &w_opt, &a_opt)?;
            }
        }
        Ok(PhaseRun {
            logs,
            images,
            resumed_seconds,
        })
    }
}
