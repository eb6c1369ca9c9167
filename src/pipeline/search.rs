//! One search as a typed value: what `gmpq search` and the pipeline's search stages run. It
//! searches (or, for HAWQ, measures sensitivities), then writes each policy with its
//! provenance, the epoch log and the charts into its folder.

use super::{PipelineError, Result};
use crate::checkpoint::{Checkpoint, DirLock};
use crate::data::{stratified_subset, ConcatDataset, DatasetSpec, ImageSource, Split, SubsetSpec};
use crate::policy::{PolicyCost, PolicyTotals};
use crate::search::{self, PolicyMeta, SearchConfig, SearchJob, SearchProgress, Target};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

/// Held-out proxy images (from its test split) the argmax policy is scored on (`--val-limit`).
pub const VAL_IMAGES: usize = 500;
/// HAWQ: proxy images the sensitivities are measured on (`--hawq-images`).
pub const HAWQ_IMAGES: usize = 512;
/// HAWQ: Hutchinson probes per batch (`--hawq-samples`).
pub const HAWQ_SAMPLES: usize = 16;

/// How the policy is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchMethod {
    /// The differentiable supernet search (GMPQ; EdMIPS with attribution weight 0).
    Supernet,
    /// The teacher's Hessian-trace and activation sensitivities under the knapsack.
    Hawq { images: usize, samples: usize },
}

/// A search: teacher, proxy data, budgets, settings, output folder.
#[derive(Debug, Clone)]
pub struct SearchRequest {
    pub teacher: PathBuf,
    pub data: DatasetSpec,
    pub subset: SubsetSpec,
    pub val_images: usize,
    /// One budget, several (a Pareto run), or none (the fixed complexity weight).
    pub targets: Vec<Target>,
    pub config: SearchConfig,
    pub method: SearchMethod,
    pub out: PathBuf,
    /// The command line recorded in each policy's `meta.command`.
    pub command: String,
}

/// A policy the search wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SearchedPolicy {
    pub policy: PathBuf,
    pub target: Option<Target>,
    pub totals: PolicyTotals,
    pub seconds: f64,
    pub images: usize,
    /// Proxy top-1 of the argmax network before fine-tuning (supernet searches).
    #[serde(skip)]
    pub argmax_proxy_top1: Option<f64>,
    #[serde(skip)]
    pub teacher_val_top1: Option<f64>,
}

impl SearchedPolicy {
    /// `PATH: … G BOPs, compression …x, size … MB …`.
    pub fn one_line(&self) -> String {
        let t = &self.totals;
        let mut line = format!(
            "{}: {:.4} G BOPs, compression {:.2}x, size {:.3} MB",
            self.policy.display(),
            t.bops as f64 / 1e9,
            t.compression,
            t.size_mb
        );
        if let Some(target) = self.target {
            line.push_str(&format!(" (target {target})"));
        }
        match (self.argmax_proxy_top1, self.teacher_val_top1) {
            (Some(s), Some(t)) => line.push_str(&format!(
                "; proxy top-1 (argmax, before fine-tuning) {s:.2}%, teacher {t:.2}%; search {:.0} s, {} images",
                self.seconds, self.images
            )),
            _ => line.push_str(&format!(
                "; analysis {:.0} s on {} images",
                self.seconds, self.images
            )),
        }
        line
    }
}

/// What a search run did: policies it wrote, and those an earlier run had written (kept).
#[derive(Debug, Clone, Default)]
pub struct SearchOutcome {
    pub written: Vec<SearchedPolicy>,
    pub kept: Vec<PathBuf>,
}

fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> PipelineError + '_ {
    move |source| PipelineError::Write {
        path: path.into(),
        source,
    }
}

impl SearchRequest {
    /// `policy.json` for one budget; `policy-BUDGET.json` each in a Pareto run.
    fn policy_path(&self, target: Option<Target>) -> PathBuf {
        match (target, self.targets.len() <= 1) {
            (Some(t), false) => self.out.join(format!("policy-{t}.json")),
            _ => self.out.join("policy.json"),
        }
    }

    fn suffix(&self, target: Option<Target>) -> String {
        match (target, self.targets.len() <= 1) {
            (Some(t), false) => format!("-{t}"),
            _ => String::new(),
        }
    }

    /// What every policy of this request records about where it came from.
    fn provenance(
        &self,
        method: &str,
        target: Option<Target>,
        teacher: &Checkpoint,
        seconds: f64,
        images: usize,
    ) -> PolicyMeta {
        PolicyMeta {
            teacher: Some(self.teacher.clone()),
            model_config: Some(teacher.meta.model.clone()),
            threads: Some(tch::get_num_threads()),
            command: Some(self.command.clone()),
            ..PolicyMeta::new(
                method,
                target,
                PolicyCost {
                    wall_seconds: seconds,
                    images_processed: images as u64,
                },
            )
        }
    }

    /// Searches and writes every policy (keeping those an interrupted run already wrote).
    pub fn run(&self, device: tch::Device, progress: &dyn SearchProgress) -> Result<SearchOutcome> {
        let mut config = self.config.clone();
        if config.alpha_frozen_epochs >= config.epochs {
            return Err(PipelineError::Invalid(format!(
                "--alpha-frozen-epochs {} leaves α no epoch to move in a {}-epoch search",
                config.alpha_frozen_epochs, config.epochs
            )));
        }
        let proxy_train = self.data.load(Split::Train)?;
        let train_indices = stratified_subset(proxy_train.as_ref(), &self.subset)?;
        std::fs::create_dir_all(&self.out).map_err(io(&self.out))?;
        let _lock = DirLock::acquire(&self.out)?;
        // HAWQ measures on training images only: no held-out split to load.
        if let SearchMethod::Hawq { images, samples } = self.method {
            return self.run_hawq(proxy_train, &train_indices, images, samples, device);
        }
        let proxy_test = self.data.load(Split::Test)?;
        let val_indices = stratified_subset(
            proxy_test.as_ref(),
            &SubsetSpec::limited(
                Some(self.val_images.min(proxy_test.len())),
                self.subset.seed,
            ),
        )?;
        // One source for both: the loader takes indices into it; test images come after train.
        let offset = proxy_train.len();
        let proxy: Arc<dyn ImageSource> = Arc::new(ConcatDataset::new(proxy_train, proxy_test));
        let val_indices: Vec<usize> = val_indices.into_iter().map(|i| i + offset).collect();
        // Policies already written by an interrupted run of the same command are kept, and only
        // the missing targets are searched again.
        let mut outcome = SearchOutcome::default();
        let mut remaining = Vec::new();
        for t in &self.targets {
            let path = self.policy_path(Some(*t));
            if path.is_file() {
                outcome.kept.push(path);
            } else {
                remaining.push(*t);
            }
        }
        if !self.targets.is_empty() && remaining.is_empty() {
            return Ok(outcome);
        }
        if remaining.len() <= 1 {
            config.warmup_epochs = 0;
        }
        let results = search::search(SearchJob {
            teacher: self.teacher.clone(),
            proxy,
            train_indices: train_indices.clone(),
            val_indices,
            config: config.clone(),
            targets: remaining,
            device,
            progress,
            state_dir: Some(self.out.clone()),
        })?;
        let log_path = self.out.join("search-log.jsonl");
        let mut log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(&log_path))?;
        let teacher_ck = Checkpoint::load(&self.teacher)?;
        let edmips = config.attribution_weight == 0.0;
        for r in &results {
            let suffix = self.suffix(r.target);
            let mut policy = r.policy.clone();
            let totals = policy
                .totals
                .clone()
                .ok_or_else(|| PipelineError::Invalid("the search gave no policy totals".into()))?;
            let meta = PolicyMeta {
                argmax_policy_bops: r.argmax.totals.as_ref().map(|t| t.bops),
                alpha: Some(r.alpha.clone()),
                search: serde_json::to_value(&config).ok(),
                proxy: Some(format!(
                    "{} ({} images, subset seed {})",
                    self.data,
                    train_indices.len(),
                    self.subset.seed
                )),
                teacher_proxy_val_top1: Some(r.teacher_val_top1),
                ..self.provenance(
                    if edmips { "edmips" } else { "gmpq" },
                    r.target,
                    &teacher_ck,
                    r.seconds,
                    r.images,
                )
            };
            policy.meta = Some(meta.to_value());
            let path = self.policy_path(r.target);
            policy.save(&path)?;
            for l in &r.log {
                let line = serde_json::to_string(l)
                    .map_err(|e| PipelineError::Invalid(format!("epoch log: {e}")))?;
                writeln!(log_file, "{line}").map_err(io(&log_path))?;
            }
            crate::report::bit_allocation_svg(
                &[(if edmips { "EdMIPS" } else { "GMPQ" }, &policy)],
                &self.out.join(format!("bits{suffix}.svg")),
            )?;
            let [img, t, s] = &r.heatmaps;
            crate::report::heatmaps_png(
                img,
                &teacher_ck.meta.eval_pipeline.normalize,
                &[t, s],
                &self.out.join(format!("attribution{suffix}.png")),
            )?;
            outcome.written.push(SearchedPolicy {
                policy: path,
                target: r.target,
                totals,
                seconds: r.seconds,
                images: r.images,
                argmax_proxy_top1: Some(r.log.last().map_or(0.0, |l| l.argmax_proxy_top1)),
                teacher_val_top1: Some(r.teacher_val_top1),
            });
        }
        // Every policy is on disk: the per-epoch snapshots have done their job.
        search::remove_snapshots(&self.out);
        Ok(outcome)
    }

    /// HAWQ: sensitivities of the teacher, one knapsack policy per target.
    fn run_hawq(
        &self,
        proxy: Arc<dyn ImageSource>,
        train_indices: &[usize],
        images: usize,
        samples: usize,
        device: tch::Device,
    ) -> Result<SearchOutcome> {
        if self.targets.is_empty() {
            return Err(PipelineError::Invalid(
                "--method hawq needs a budget (--target-compression, --target-bops, \
                 --target-size-mb or --pareto)"
                    .into(),
            ));
        }
        let n = images.clamp(1, train_indices.len().max(1));
        let hawq_cfg = search::hawq::HawqConfig {
            candidates: self.config.candidates.clone(),
            samples,
        };
        let r = search::hawq::run(
            &self.teacher,
            proxy,
            &train_indices[..n.min(train_indices.len())],
            &self.targets,
            &hawq_cfg,
            device,
        )?;
        let teacher_ck = Checkpoint::load(&self.teacher)?;
        let mut outcome = SearchOutcome::default();
        for (t, policy) in &r.policies {
            let mut policy = policy.clone();
            let meta = PolicyMeta {
                hawq: Some(serde_json::json!({
                    "settings": hawq_cfg, "sensitivities": r.sensitivities,
                })),
                ..self.provenance("hawq", Some(*t), &teacher_ck, r.seconds, r.images)
            };
            policy.meta = Some(meta.to_value());
            let path = self.policy_path(Some(*t));
            policy.save(&path)?;
            crate::report::bit_allocation_svg(
                &[("HAWQ", &policy)],
                &self.out.join(format!("bits{}.svg", self.suffix(Some(*t)))),
            )?;
            outcome.written.push(SearchedPolicy {
                policy: path,
                target: Some(*t),
                totals: policy
                    .totals
                    .clone()
                    .ok_or_else(|| PipelineError::Invalid("HAWQ gave no policy totals".into()))?,
                seconds: r.seconds,
                images: r.images,
                argmax_proxy_top1: None,
                teacher_val_top1: None,
            });
        }
        Ok(outcome)
    }
}
