//! GMPQ search: a mixed-precision supernet trained on a small proxy dataset with
//! `L = CE + aw·L_attr + λ·L_complexity`, guided by a frozen full-precision teacher's
//! attribution, with λ adapted toward a hard budget (dual ascent) and the policy extracted from
//! the final α under that budget (`extract`: the exact knapsack, or argmax + repair).
//! `aw = 0` is the EdMIPS baseline on the same code path.

mod alpha;
#[cfg(feature = "cli")]
mod args;
mod budget;
mod budget_args;
mod config;
mod error;
mod extract;
pub mod fill;
pub mod hawq;
pub mod method;
mod phases;
mod provenance;
pub mod rank;
mod rank_request;
mod request;
mod sensitivity;
mod state;
mod step;

pub use alpha::{complexity_loss, expected_layer_bits, fixed_from_supernet, preferences, AlphaOpt};
#[cfg(feature = "cli")]
pub use args::{method_names, ExtractArgs, Extracted, SearchArgs};
pub use budget::{
    parse_bops, random_policy, repair, BudgetMode, DualWeight, Geometry, Preferences, Target,
};
pub use budget_args::BudgetArgs;
pub use config::{AlphaOptimizer, AttributionMethod, Recipe, SearchConfig, TemperatureSchedule};
pub use error::{Result, SearchError};
pub use extract::{
    argmax_policy, check_feasible, solve as solve_knapsack, ArgmaxRepair, Choice, Extraction,
    ExtractionError, ExtractionRule, Item, Knapsack, SPEND_FLOOR,
};
pub use method::{Allocator, Method};
pub use phases::search;
pub use provenance::{ExtractionRecord, PolicyMeta, RankingRecord};
pub use rank_request::RankRequest;
pub use request::{
    SearchOutcome, SearchRequest, SearchedPolicy, HAWQ_IMAGES, HAWQ_SAMPLES, REQUEST_FILE,
    VAL_IMAGES,
};
pub use state::remove_snapshots;
pub use step::{ComplexityTerm, SearchStep, StepOutcome};

use crate::data::ImageSource;
use crate::policy::{Candidates, Policy};
use crate::quant::{self, Precision};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use tch::{Device, Tensor};

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
