//! The search's settings: the attribution method, the α optimizer and temperature, the
//! recipes (α dynamics presets) and [`SearchConfig`], saved into every policy it writes.

use super::budget::BudgetMode;
use super::extract::ExtractionRule;
use crate::policy::Candidates;
use crate::train::Augment;
use serde::{Deserialize, Serialize};

/// How the student's attribution is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum AttributionMethod {
    /// `g_k = W_fc[c,k]` (exact for GAP → linear heads; no second backward).
    Cam,
    /// Gradient of the class logit w.r.t. the feature map, with `create_graph`.
    GradCam,
}

/// The optimizer of the architecture parameters α.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
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
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
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
