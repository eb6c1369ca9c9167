//! A ranked extraction from a finished search as a typed value (`gmpq extract --rank`).

use super::request::{io, with_held_out};
use super::{PolicyMeta, Target};
use super::{Result, SearchError};
use crate::checkpoint::Checkpoint;
use crate::data::{stratified_subset, DatasetSpec, Split, SubsetSpec};
use crate::policy::PolicyCost;
use crate::search;
use std::path::PathBuf;

/// A ranked extraction from a finished search (`gmpq extract --rank`): candidates from its
/// saved α, the best uniform policy and the `extra` policy files, each calibrated from the
/// teacher and scored on held-out proxy images; the best is written to `out`
/// (`search::rank`).
#[derive(Debug, Clone)]
pub struct RankRequest {
    /// The searched policy (with `meta.alpha`).
    pub searched: PathBuf,
    /// The proxy teacher (default: the search's, `meta.teacher`).
    pub teacher: Option<PathBuf>,
    /// The proxy data and the subset the search ran on (calibration images come from it).
    pub data: DatasetSpec,
    pub subset: SubsetSpec,
    /// Held-out proxy images (from its test split) the candidates are scored on.
    pub val_images: usize,
    /// The budget (default: the search's).
    pub target: Option<Target>,
    /// More candidates (e.g. the uniform-fill policy); one that does not fit the budget is
    /// left out with a warning.
    pub extra: Vec<PathBuf>,
    pub out: PathBuf,
}

impl RankRequest {
    /// Ranks and writes the kept policy; returns it with its ranking record.
    pub fn run(
        &self,
        device: tch::Device,
    ) -> Result<(crate::policy::Policy, search::RankingRecord)> {
        use crate::policy::Policy;
        let started = std::time::Instant::now();
        let searched = Policy::load(&self.searched)?;
        let meta = PolicyMeta::of(&searched)
            .map_err(|e| SearchError::Invalid(format!("{}: meta: {e}", self.searched.display())))?
            .ok_or_else(|| {
                SearchError::Invalid(format!(
                    "{}: no meta (not a gmpq search policy)",
                    self.searched.display()
                ))
            })?;
        let prefs = meta.alpha.clone().ok_or_else(|| {
            SearchError::Invalid(format!(
                "{}: no meta.alpha to rank candidates from",
                self.searched.display()
            ))
        })?;
        let target = self.target.or(meta.target).ok_or_else(|| {
            SearchError::Invalid("ranking needs a budget (the search had none)".into())
        })?;
        let teacher_path = match (&self.teacher, &meta.teacher) {
            (Some(t), _) | (None, Some(t)) => t.clone(),
            (None, None) => {
                return Err(SearchError::Invalid(format!(
                    "{}: no meta.teacher; give --teacher",
                    self.searched.display()
                )))
            }
        };
        let teacher = Checkpoint::load(&teacher_path)?;
        let model = &teacher.meta.model;
        let fp = crate::quant::build(model, crate::quant::Precision::Full, tch::Device::Cpu)
            .map_err(SearchError::from)?;
        let (convs, fc) = (fp.net.convs(), fp.net.fc_spec());
        searched.validate(model, convs)?;
        let geometry = search::Geometry::new(convs, fc);
        let cands = searched.candidates.clone();
        let mut candidates = search::rank::alpha_candidates(
            &searched,
            &geometry,
            &target,
            &prefs,
            search::rank::ALPHA_ALTERNATIVES,
        )
        .map_err(SearchError::from)?;
        if let Some((w, a)) = search::fill::best_uniform(&geometry, &target, &cands) {
            let mut u = Policy::uniform(model, convs, w, a);
            u.candidates = cands.clone();
            candidates.push((format!("uniform w{w}a{a}"), u));
        }
        let limit = geometry.limit(&target) * (1.0 + 1e-9);
        for path in &self.extra {
            let p = Policy::load(path)?;
            if p.validate(model, convs).is_err() || geometry.policy_cost(&target, &p) > limit {
                tracing::warn!(
                    "{} does not fit the model within {target}: not ranked",
                    path.display()
                );
                continue;
            }
            candidates.push((path.display().to_string(), p));
        }
        // Calibration from the search's proxy subset, scores on its held-out test images.
        let train = self.data.load(Split::Train)?;
        let train_indices = stratified_subset(train.as_ref(), &self.subset)?;
        let step = (train_indices.len() / search::rank::CALIBRATION_IMAGES).max(1);
        let calib: Vec<usize> = train_indices
            .iter()
            .copied()
            .step_by(step)
            .take(search::rank::CALIBRATION_IMAGES)
            .collect();
        let (proxy, val) = with_held_out(&self.data, train, self.val_images, self.subset.seed)?;
        let data = search::rank::RankingData {
            teacher_path: &teacher_path,
            teacher: &teacher,
            proxy,
            calib_indices: &calib,
            val_indices: &val,
            calibration: crate::train::CALIBRATION,
            device,
        };
        let (chosen, record) = search::rank::rank(candidates, &prefs, &geometry, &data)?;
        let mut policy = chosen.with_totals(convs, fc);
        let ranked = PolicyMeta {
            target: Some(target),
            extraction: Some(search::ExtractionRecord {
                rule: "ranked".into(),
                from: self.searched.display().to_string(),
            }),
            ranking: Some(record.clone()),
            cost: Some(PolicyCost {
                wall_seconds: meta.cost.as_ref().map_or(0.0, |c| c.wall_seconds)
                    + started.elapsed().as_secs_f64(),
                images_processed: meta.cost.as_ref().map_or(0, |c| c.images_processed)
                    + ((calib.len() + val.len()) * record.candidates.len()) as u64,
            }),
            ..meta
        };
        policy.meta = Some(ranked.to_value());
        if let Some(dir) = self.out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
        }
        policy.save(&self.out)?;
        Ok((policy, record))
    }
}
