//! The command-line forms of a search, of a budget and of extraction from a saved search,
//! and what they state.

use super::{
    BudgetArgs, ExtractionRule, Method, PolicyMeta, RankRequest, RankingRecord, SearchConfig,
    SearchError, SearchRequest, Target, TemperatureSchedule,
};
use crate::data::{parse_spec_flag, SubsetArgs};
use crate::flags::positive;
use crate::policy::{BitCandidateArgs, Policy, PolicyTotals};
use clap::Args;
use std::path::{Path, PathBuf};

/// The search defaults, defined once in the library (`SearchConfig::default()`).
pub fn defaults() -> SearchConfig {
    SearchConfig::default()
}

/// `--method`'s values, with their help, from the library's list.
pub fn method_names() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(
        super::method::METHOD_NAMES
            .iter()
            .map(|(name, help)| clap::builder::PossibleValue::new(*name).help(*help)),
    )
}

/// One `--pareto` budget: a ratio (64) or BOPs (1.2G, 600M).
fn parse_pareto(s: &str) -> Result<Target, SearchError> {
    if s.ends_with(['G', 'g', 'M', 'm', 'K', 'k']) {
        return Ok(Target::Bops(
            super::parse_bops(s).map_err(SearchError::Invalid)?,
        ));
    }
    let v: f64 = s.parse().map_err(|_| {
        SearchError::Invalid(format!("--pareto: '{s}' is neither a ratio nor BOPs"))
    })?;
    Target::from_parts(None, Some(v), None)
        .map_err(SearchError::Invalid)?
        .ok_or_else(|| SearchError::Invalid(format!("--pareto {s}: no compression target")))
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
    #[arg(long = "val-limit", value_name = "N", alias = "val-images", default_value_t = super::VAL_IMAGES, value_parser = positive(), allow_negative_numbers = true)]
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
    #[arg(long, default_value_t = defaults().complexity_weight, allow_negative_numbers = true)]
    pub cd: f64,
    /// Dual-ascent rate of λ per step (default: the recipe's; reference 0.05).
    #[arg(long, allow_negative_numbers = true)]
    pub dual_rate: Option<f64>,
    #[command(flatten)]
    pub bits: BitCandidateArgs,
    /// Search epochs over the proxy.
    #[arg(long, default_value_t = defaults().epochs, value_parser = positive(), allow_negative_numbers = true)]
    pub epochs: usize,
    /// Shared warm-up epochs of a --pareto run (default: epochs/3).
    #[arg(long, allow_negative_numbers = true)]
    pub warmup_epochs: Option<usize>,
    /// Images per step (of all ranks together in a data-parallel run: each of N ranks
    /// computes B/N).
    #[arg(long, default_value_t = defaults().batch_size, value_parser = positive(), allow_negative_numbers = true)]
    pub batch_size: usize,
    /// Weight learning rate.
    #[arg(long, default_value_t = defaults().lr, allow_negative_numbers = true)]
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
    #[arg(long, default_value_t = super::HAWQ_IMAGES, value_parser = positive(), allow_negative_numbers = true)]
    pub hawq_images: usize,
    /// hawq, uniform-fill: Hutchinson probes per batch for the Hessian traces.
    #[arg(long, default_value_t = super::HAWQ_SAMPLES, value_parser = positive(), allow_negative_numbers = true)]
    pub hawq_samples: usize,
    /// Preset α dynamics, recorded in the policy's meta (docs/SEARCH.md); the flags below
    /// override single settings.
    #[arg(long, value_enum, default_value_t = super::Recipe::Scarce)]
    pub recipe: super::Recipe,
    /// α optimizer (default: the recipe's).
    #[arg(long, value_enum)]
    pub alpha_optimizer: Option<super::AlphaOptimizer>,
    /// Epochs with α frozen (weights only) at the start (default: the recipe's).
    #[arg(long, allow_negative_numbers = true)]
    pub alpha_frozen_epochs: Option<usize>,
    /// The budget as an upper bound (multiplicative dual), an equality target (additive
    /// dual) or an equality held by the penalty μ·(E[cost]/limit − 1)² (default: the
    /// recipe's).
    #[arg(long, value_enum)]
    pub budget_mode: Option<super::BudgetMode>,
    /// μ of `--budget-mode penalty` (default: the recipe's).
    #[arg(long, allow_negative_numbers = true)]
    pub budget_penalty: Option<f64>,
    /// Softmax temperature START:END over the search, geometric (default: the recipe's;
    /// reference 1:1).
    #[arg(long)]
    pub temperature: Option<String>,
    /// Both learning rates ×0.1 every this many epochs.
    #[arg(long, default_value_t = defaults().step_epochs, value_parser = positive(), allow_negative_numbers = true)]
    pub step_epochs: usize,
    /// cam (GAP → linear heads) or grad-cam (general, double backward).
    #[arg(long, value_enum, default_value = "cam")]
    pub attribution: super::AttributionMethod,
    /// How the policy is taken from the final α under the budget: knapsack (exact, maximises
    /// Σ log softmax(α/T) within the budget) or argmax-repair (argmax, then greedy repair).
    /// Default: the recipe's (reference: argmax-repair).
    #[arg(long, value_enum)]
    pub extraction: Option<super::ExtractionRule>,
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

impl SearchArgs {
    /// The search these flags state; `command` is recorded with it.
    pub fn request(&self, command: String) -> Result<SearchRequest, SearchError> {
        let mut targets: Vec<Target> = self.budget.target()?.into_iter().collect();
        for p in &self.pareto {
            targets.push(parse_pareto(p)?);
        }
        let (method, method_weight) =
            Method::from_name(&self.method, self.hawq_images, self.hawq_samples)?;
        let config = self.config(method_weight, targets.len())?;
        Ok(SearchRequest {
            teacher: self.teacher.clone(),
            data: parse_spec_flag("--data", &self.data)?,
            subset: self.subset.spec(),
            val_images: self.val_images,
            targets,
            config,
            method,
            out: self.out.clone(),
            command,
            sensitivities_from: None,
        })
    }

    /// The search settings the flags state: the recipe's, then each flag that overrides one.
    fn config(
        &self,
        method_weight: Option<f64>,
        targets: usize,
    ) -> Result<SearchConfig, SearchError> {
        let invalid = |m: String| Err(SearchError::Invalid(m));
        let attribution_weight = match (method_weight, self.attribution_weight) {
            (Some(w), Some(given)) if given != w => {
                return invalid(format!(
                    "--method {} is the supernet search with attribution weight {w}: drop \
                     --attribution-weight {given}, or use --method gmpq",
                    self.method
                ))
            }
            (Some(w), _) | (None, Some(w)) => w,
            (None, None) => defaults().attribution_weight,
        };
        let mut config = SearchConfig {
            candidates: self.bits.candidates()?,
            epochs: self.epochs,
            warmup_epochs: if targets > 1 {
                self.warmup_epochs.unwrap_or(self.epochs / 3)
            } else {
                0
            },
            batch_size: self.batch_size,
            lr: self.lr,
            step_epochs: self.step_epochs,
            attribution_weight,
            p: self.p,
            complexity_weight: self.cd,
            attribution: self.attribution,
            augment: crate::train::Augment {
                crop_padding: 2,
                hflip: self.hflip,
            },
            seed: self.seed,
            ..Default::default()
        };
        self.recipe.apply(&mut config);
        config.alpha_lr = self.alpha_lr.unwrap_or(config.alpha_lr);
        config.dual_rate = self.dual_rate.unwrap_or(config.dual_rate);
        config.alpha_optimizer = self.alpha_optimizer.unwrap_or(config.alpha_optimizer);
        config.alpha_frozen_epochs = self
            .alpha_frozen_epochs
            .unwrap_or(config.alpha_frozen_epochs);
        config.budget_mode = self.budget_mode.unwrap_or(config.budget_mode);
        config.extraction = self.extraction.unwrap_or(config.extraction);
        if let Some(v) = self.budget_penalty {
            if !(v.is_finite() && v > 0.0) {
                return invalid(format!("--budget-penalty {v}: must be a positive number"));
            }
            config.budget_penalty = v;
        }
        if let Some(t) = &self.temperature {
            let Some((start, end)) = t
                .split_once(':')
                .and_then(|(s, e)| Some((s.parse::<f64>().ok()?, e.parse::<f64>().ok()?)))
                .filter(|(s, e)| *s > 0.0 && *e > 0.0)
            else {
                return invalid(format!(
                    "--temperature {t}: expected START:END, both positive (e.g. 1:0.2)"
                ));
            };
            config.temperature = TemperatureSchedule { start, end };
        }
        Ok(config)
    }
}

#[derive(Debug, Args)]
pub struct ExtractArgs {
    /// A search run folder (its policy.json) or a searched policy file.
    pub run: PathBuf,
    /// The extraction rule (default: the one the search used).
    #[arg(long, value_enum)]
    pub rule: Option<super::ExtractionRule>,
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
    #[arg(long = "val-limit", value_name = "N", default_value_t = super::VAL_IMAGES, value_parser = positive(), allow_negative_numbers = true)]
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

/// What `gmpq extract` wrote.
#[derive(Debug, serde::Serialize)]
#[serde(untagged)]
pub enum Extracted {
    /// A policy taken from α by `rule` under `target`.
    Rule {
        policy: PathBuf,
        rule: String,
        target: String,
        totals: PolicyTotals,
    },
    /// The best of the ranked candidates.
    Ranked {
        policy: PathBuf,
        ranking: RankingRecord,
        totals: Option<PolicyTotals>,
    },
}

impl ExtractArgs {
    /// Takes the policy again from the saved search (or ranks its candidates) and writes it.
    pub fn run(&self) -> Result<Extracted, SearchError> {
        let path = if self.run.is_dir() {
            self.run.join("policy.json")
        } else {
            self.run.clone()
        };
        let searched = Policy::load(&path)?;
        let read = |reason: String| SearchError::Read {
            path: path.clone(),
            reason,
        };
        let meta = PolicyMeta::of(&searched)
            .map_err(|e| read(format!("malformed meta: {e}")))?
            .ok_or_else(|| read("no meta (not a gmpq search policy)".into()))?;
        let target = self.budget.target()?;
        if self.rank {
            return self.rank(&path, target);
        }
        // The geometry: recorded by gmpq search since this version; else the teacher's.
        let model = match (&meta.model_config, &meta.teacher) {
            (Some(m), _) => m.clone(),
            (None, Some(teacher)) => crate::checkpoint::Checkpoint::load(teacher)?.meta.model,
            (None, None) => return Err(read("no meta.model_config or meta.teacher".into())),
        };
        // Policies written before the rule was recorded were extracted by argmax + repair.
        let rule = self.rule.unwrap_or_else(|| {
            meta.extraction_rule()
                .unwrap_or(ExtractionRule::ArgmaxRepair)
        });
        let policy = super::re_extract(&searched, &model, rule, target)?;
        let target_name = PolicyMeta::of(&policy)
            .ok()
            .flatten()
            .and_then(|m| m.target)
            .map_or("none".to_string(), |t| t.to_string());
        let out = self
            .out
            .clone()
            .unwrap_or_else(|| sibling(&path, &format!("policy-{rule}-{target_name}.json")));
        policy.save(&out)?;
        Ok(Extracted::Rule {
            policy: out,
            rule: rule.to_string(),
            target: target_name,
            totals: policy
                .totals
                .ok_or_else(|| read("the extracted policy has no totals".into()))?,
        })
    }

    /// `--rank`: the ranked choice among a finished search's candidates.
    fn rank(&self, searched: &Path, target: Option<Target>) -> Result<Extracted, SearchError> {
        let data = self
            .data
            .as_deref()
            .ok_or_else(|| SearchError::Invalid("--rank needs --data".into()))?;
        let name = target.map_or("search".to_string(), |t| t.to_string());
        let request = RankRequest {
            searched: searched.to_path_buf(),
            teacher: self.teacher.clone(),
            data: parse_spec_flag("--data", data)?,
            subset: self.subset.spec(),
            val_images: self.val_images,
            target,
            extra: self.also.clone(),
            out: self
                .out
                .clone()
                .unwrap_or_else(|| sibling(searched, &format!("policy-ranked-{name}.json"))),
        };
        let (policy, ranking) = request.run(tch::Device::Cpu)?;
        Ok(Extracted::Ranked {
            policy: request.out,
            ranking,
            totals: policy.totals,
        })
    }
}

/// `name` in the folder of `path`.
fn sibling(path: &Path, name: &str) -> PathBuf {
    path.parent().unwrap_or(Path::new(".")).join(name)
}
