//! One search as a typed value: what `gmpq search` and the pipeline's search stages run. It
//! searches (or, for HAWQ, measures sensitivities), then writes each policy with its
//! provenance, the epoch log and the charts into its folder.

use super::method::{Allocation, AllocationInput, Allocator, Evidence, ProxyData, Reads};
use super::{Method, PolicyMeta, SearchConfig, SearchProgress, Target};
use super::{Result, SearchError};
use crate::checkpoint::Checkpoint;
use crate::data::{stratified_subset, ConcatDataset, DatasetSpec, ImageSource, Split, SubsetSpec};
use crate::files::DirLock;
use crate::policy::{PolicyCost, PolicyTotals};
use crate::search;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

/// Held-out proxy images (from its test split) the argmax policy is scored on (`--val-limit`).
pub const VAL_IMAGES: usize = 500;
/// HAWQ: proxy images the sensitivities are measured on (`--hawq-images`).
pub const HAWQ_IMAGES: usize = 512;
/// HAWQ: Hutchinson probes per batch (`--hawq-samples`).
pub const HAWQ_SAMPLES: usize = 16;

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
    pub method: Method,
    pub out: PathBuf,
    /// The command line recorded in each policy's `meta.command`.
    pub command: String,
    /// A policy whose sensitivity analysis (`meta.hawq`) may be reused by HAWQ or
    /// uniform-fill when it measured exactly what this request would (same teacher, data,
    /// images and settings): the pipeline points uniform-fill at its run's HAWQ policy.
    pub sensitivities_from: Option<PathBuf>,
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
            _ if self.images == 0 => line.push_str("; no search (the model's geometry alone)"),
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

pub(super) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> SearchError + '_ {
    move |source| SearchError::Io {
        path: path.into(),
        source,
    }
}

/// The proxy's training images and, after them in one source, `val_images` held-out images
/// of its test split (a stratified draw with `seed`); returns the source and the held-out
/// images' indices into it.
pub(super) fn with_held_out(
    data: &DatasetSpec,
    train: Arc<dyn ImageSource>,
    val_images: usize,
    seed: u64,
) -> Result<(Arc<dyn ImageSource>, Vec<usize>)> {
    let test = data.load(Split::Test)?;
    let val = stratified_subset(
        test.as_ref(),
        &SubsetSpec::limited(Some(val_images.min(test.len())), seed),
    )?;
    // The loader takes indices into one source: the test images come after the train ones.
    let offset = train.len();
    let source: Arc<dyn ImageSource> = Arc::new(ConcatDataset::new(train, test));
    Ok((source, val.into_iter().map(|i| i + offset).collect()))
}

/// Where a search folder records the request it holds.
pub const REQUEST_FILE: &str = "search-request.json";

impl SearchRequest {
    /// What makes two requests the same search: everything but the folder and the command
    /// line that stated it.
    pub fn identity(&self) -> serde_json::Value {
        serde_json::json!({
            "teacher": self.teacher,
            "data": self.data.to_string(),
            "subset": self.subset,
            "val_images": self.val_images,
            "targets": self.targets,
            "config": self.config,
            "method": self.method,
        })
    }

    /// Records this request in its folder, or refuses when the folder holds another one: a
    /// search must never leave a user with the policy of a different request. Returns
    /// whether it recorded the request now.
    fn claim_folder(&self) -> Result<bool> {
        let path = self.out.join(REQUEST_FILE);
        let identity = self.identity();
        match std::fs::read(&path) {
            Ok(bytes) => {
                let recorded: serde_json::Value =
                    serde_json::from_slice(&bytes).map_err(|e| SearchError::Read {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                if recorded != identity {
                    return Err(SearchError::Invalid(format!(
                        "{} holds another search ({}): choose another --out, or delete it to \
                         search there again",
                        self.out.display(),
                        crate::fields::changed_fields_of(&recorded, &identity)
                    )));
                }
                return Ok(false);
            }
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(SearchError::Read {
                    path,
                    reason: e.to_string(),
                })
            }
            Err(_) => {}
        }
        // A folder from before requests were recorded: its policies' budgets must match.
        let found: Vec<Option<Target>> = std::fs::read_dir(&self.out)
            .map_err(io(&self.out))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.extension().is_some_and(|x| x == "json")
                    && p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("policy"))
            })
            .filter_map(|p| crate::policy::Policy::load(&p).ok())
            .map(|p| PolicyMeta::of(&p).ok().flatten().and_then(|m| m.target))
            .collect();
        if let Some(other) = found
            .iter()
            .find(|t| t.is_none_or(|t| !self.targets.contains(&t)))
        {
            return Err(SearchError::Invalid(format!(
                "{} holds a policy for {} (not a budget of this search): choose another --out, \
                 or delete it to search there again",
                self.out.display(),
                other.map_or("no budget".to_string(), |t| t.to_string())
            )));
        }
        let bytes = serde_json::to_vec_pretty(&identity)
            .map_err(|e| SearchError::Invalid(format!("search request: {e}")))?;
        crate::files::write_atomic(&path, &bytes).map_err(io(&path))?;
        Ok(true)
    }

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
        let c = &self.config;
        for (flag, value, ok, range) in [
            (
                "--attribution-weight",
                c.attribution_weight,
                c.attribution_weight >= 0.0,
                "zero or positive",
            ),
            ("--lr", c.lr, c.lr > 0.0, "positive"),
        ] {
            if !(ok && value.is_finite()) {
                return Err(SearchError::Invalid(format!(
                    "{flag} {value}: must be {range}"
                )));
            }
        }
        if c.epochs == 0 {
            return Err(SearchError::Invalid(
                "--epochs 0: must be at least 1".into(),
            ));
        }
        if c.alpha_frozen_epochs >= c.epochs {
            return Err(SearchError::Invalid(format!(
                "--alpha-frozen-epochs {} leaves α no epoch to move in a {}-epoch search",
                c.alpha_frozen_epochs, c.epochs
            )));
        }
        let allocator = self.method.allocator(c);
        // Only the supernet search can run without a budget (a fixed complexity weight).
        if self.targets.is_empty() && self.method != Method::Supernet {
            return Err(SearchError::Invalid(format!(
                "--method {} needs a budget (--target-compression, --target-bops, \
                 --target-size-mb or --pareto)",
                allocator.name()
            )));
        }
        // Data-parallel: every rank trains the supernet; rank 0 owns the folder and writes.
        let main = crate::dist::is_main();
        if crate::dist::current().is_some() && !allocator.data_parallel() {
            return Err(SearchError::Invalid(format!(
                "--method {} runs as one process; only the supernet search runs data-parallel",
                allocator.name()
            )));
        }
        std::fs::create_dir_all(&self.out).map_err(io(&self.out))?;
        let _lock = main.then(|| DirLock::acquire(&self.out)).transpose()?;
        let claimed = main && self.claim_folder()?;
        let result = self.run_claimed(allocator.as_ref(), device, progress);
        // A search that failed before writing anything leaves the folder as it found it.
        if result.is_err() && claimed {
            let _ = std::fs::remove_file(self.out.join(REQUEST_FILE));
        }
        result
    }

    /// What a sensitivity analysis of `images` proxy images would measure: a recorded
    /// analysis with the same key is the same one.
    fn analysis_key(&self, images: usize) -> Option<serde_json::Value> {
        let (Method::Hawq { samples, .. } | Method::UniformFill { samples, .. }) = self.method
        else {
            return None;
        };
        let settings = search::hawq::HawqConfig {
            candidates: self.config.candidates.clone(),
            samples,
        };
        Some(serde_json::json!({
            "teacher": self.teacher, "data": self.data.to_string(), "subset": self.subset,
            "images": images, "settings": settings,
        }))
    }

    /// The sensitivities `sensitivities_from` recorded for exactly the analysis `key`.
    fn reusable_sensitivities(
        &self,
        key: &serde_json::Value,
    ) -> Option<(PathBuf, search::hawq::Sensitivities)> {
        let path = self.sensitivities_from.as_ref()?;
        let p = crate::policy::Policy::load(path).ok()?;
        let hawq = PolicyMeta::of(&p).ok()??.hawq?;
        (hawq.get("analysis")? == key)
            .then(|| serde_json::from_value(hawq.get("sensitivities")?.clone()).ok())
            .flatten()
            .map(|s| (path.clone(), s))
    }

    /// [`Self::run`] once the folder is locked and claimed: loads what the method reads, runs
    /// it for the budgets without a policy yet, writes each policy.
    fn run_claimed(
        &self,
        allocator: &dyn Allocator,
        device: tch::Device,
        progress: &dyn SearchProgress,
    ) -> Result<SearchOutcome> {
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
        let mut analysis = None;
        let proxy = match allocator.reads() {
            Reads::Geometry => None,
            reads => {
                let train = self.data.load(Split::Train)?;
                let train_indices = stratified_subset(train.as_ref(), &self.subset)?;
                if let Reads::ProxyTrain { images } = reads {
                    // The analyses measure on training images only: no held-out split.
                    let key = self
                        .analysis_key(search::method::analysis_images(images, train_indices.len()));
                    let reused = key.as_ref().and_then(|k| self.reusable_sensitivities(k));
                    analysis = key.map(|k| (k, reused));
                    Some(ProxyData {
                        source: train,
                        train_indices,
                        val_indices: Vec::new(),
                    })
                } else {
                    let (source, val_indices) =
                        with_held_out(&self.data, train, self.val_images, self.subset.seed)?;
                    Some(ProxyData {
                        source,
                        train_indices,
                        val_indices,
                    })
                }
            }
        };
        let proxy_note = proxy.as_ref().map(|p| {
            format!(
                "{} ({} images, subset seed {})",
                self.data,
                p.train_indices.len(),
                self.subset.seed
            )
        });
        let allocations = allocator.allocate(AllocationInput {
            teacher: &self.teacher,
            targets: &remaining,
            proxy,
            sensitivities: analysis
                .as_ref()
                .and_then(|(_, reused)| reused.as_ref().map(|(_, s)| s.clone())),
            device,
            progress,
            state_dir: Some(self.out.clone()),
        })?;
        if !crate::dist::is_main() {
            return Ok(outcome);
        }
        // Uniform and random policies name no teacher: see `write_allocation`.
        let teacher = match allocator.reads() {
            Reads::Geometry => None,
            _ => Some(Checkpoint::load(&self.teacher)?),
        };
        for allocation in allocations {
            let written = self.write_allocation(
                allocator,
                allocation,
                teacher.as_ref(),
                proxy_note.as_deref(),
                analysis.as_ref(),
            )?;
            outcome.written.push(written);
        }
        // Every policy is on disk: the supernet's per-epoch snapshots have done their job.
        if allocator.data_parallel() {
            search::remove_snapshots(&self.out);
        }
        Ok(outcome)
    }

    /// Saves one allocation's policy with its provenance, its bits chart and (a supernet
    /// search) its epoch log and attribution maps. Uniform and random policies record only
    /// the method, budget and seed (no teacher or command), so the same policy from two
    /// proxies is the same file and a study copies its fine-tuning between them.
    fn write_allocation(
        &self,
        allocator: &dyn Allocator,
        allocation: Allocation,
        teacher: Option<&Checkpoint>,
        proxy: Option<&str>,
        analysis: Option<&(
            serde_json::Value,
            Option<(PathBuf, search::hawq::Sensitivities)>,
        )>,
    ) -> Result<SearchedPolicy> {
        let Allocation {
            target,
            mut policy,
            seconds,
            images,
            evidence,
        } = allocation;
        let name = allocator.name();
        let provenance = |teacher: Option<&Checkpoint>| match teacher {
            Some(t) => Ok(self.provenance(name, target, t, seconds, images)),
            None => Err(SearchError::Invalid(format!(
                "{name}: no teacher to record"
            ))),
        };
        let mut supernet = None;
        let meta = match evidence {
            Evidence::Geometry { seed } => PolicyMeta {
                seed,
                ..PolicyMeta::new(name, target, PolicyCost::default())
            },
            Evidence::Sensitivities {
                settings,
                sensitivities,
            } => PolicyMeta {
                hawq: Some(serde_json::json!({
                    "settings": settings, "sensitivities": sensitivities,
                    "analysis": analysis.map(|(k, _)| k),
                    "reused_from": analysis.and_then(|(_, r)| r.as_ref().map(|(p, _)| p)),
                })),
                ..provenance(teacher)?
            },
            Evidence::Supernet(r) => {
                let meta = PolicyMeta {
                    argmax_policy_bops: r.argmax.totals.as_ref().map(|t| t.bops),
                    alpha: Some(r.alpha.clone()),
                    search: serde_json::to_value(&self.config).ok(),
                    proxy: proxy.map(str::to_string),
                    teacher_proxy_val_top1: Some(r.teacher_val_top1),
                    ..provenance(teacher)?
                };
                supernet = Some(r);
                meta
            }
        };
        policy.meta = Some(meta.to_value());
        let totals = policy
            .totals
            .clone()
            .ok_or_else(|| SearchError::Invalid(format!("{name} gave no policy totals")))?;
        let path = self.policy_path(target);
        policy.save(&path)?;
        let suffix = self.suffix(target);
        crate::report::bit_allocation_svg(
            &[(allocator.label(), &policy)],
            &self.out.join(format!("bits{suffix}.svg")),
        )?;
        let mut written = SearchedPolicy {
            policy: path,
            target,
            totals,
            seconds,
            images,
            argmax_proxy_top1: None,
            teacher_val_top1: None,
        };
        if let (Some(r), Some(teacher)) = (supernet, teacher) {
            let log_path = self.out.join("search-log.jsonl");
            let mut log_file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .map_err(io(&log_path))?;
            for l in &r.log {
                let line = serde_json::to_string(l)
                    .map_err(|e| SearchError::Invalid(format!("epoch log: {e}")))?;
                writeln!(log_file, "{line}").map_err(io(&log_path))?;
            }
            let [img, t, s] = &r.heatmaps;
            crate::report::heatmaps_png(
                img,
                &teacher.meta.eval_pipeline.normalize,
                &[t, s],
                &["image".into(), "teacher".into(), "supernet".into()],
                &self.out.join(format!("attribution{suffix}.png")),
            )?;
            written.argmax_proxy_top1 = Some(r.log.last().map_or(0.0, |l| l.argmax_proxy_top1));
            written.teacher_val_top1 = Some(r.teacher_val_top1);
        }
        Ok(written)
    }
}
