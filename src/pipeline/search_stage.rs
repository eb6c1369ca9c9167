//! The search stages: one `gmpq search` per arm (a supernet, HAWQ, uniform-fill, uniform,
//! random) and the ranking of a supernet's candidates on the proxy.

use super::stage::{bit_list, command_line, parse_spec, path_arg, Stage, StageContext};
use super::Result;
use crate::data::SubsetSpec;
use crate::policy::Candidates;
use crate::search::Method;
use crate::search::{RankRequest, SearchRequest, HAWQ_IMAGES, HAWQ_SAMPLES, VAL_IMAGES};
use crate::search::{Recipe, SearchConfig, Target};
use std::path::PathBuf;

/// How a [`SearchStage`] finds its policy.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SearchKind {
    /// The supernet search; attribution weight 0 is EdMIPS.
    Supernet {
        attribution_weight: f64,
        epochs: usize,
        step_epochs: usize,
        recipe: Recipe,
        p: Option<f64>,
    },
    /// HAWQ's sensitivities with the default images and probes.
    Hawq,
    /// uniform-fill, with HAWQ's sensitivities (default images and probes).
    UniformFill,
    /// The best uniform policy.
    Uniform,
    /// A random policy drawn with the stage's seed.
    Random,
}

/// `gmpq search`: one policy under one budget into `out/policy.json`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SearchStage {
    pub name: String,
    pub teacher: PathBuf,
    pub data: String,
    pub limit: Option<usize>,
    pub subset_seed: u64,
    pub target: Target,
    pub candidates: Candidates,
    pub hflip: bool,
    pub seed: u64,
    pub out: PathBuf,
    pub kind: SearchKind,
    /// A policy whose sensitivity analysis uniform-fill may reuse (see
    /// [`SearchRequest::sensitivities_from`]).
    pub sensitivities_from: Option<PathBuf>,
}

impl SearchStage {
    /// The method `gmpq search --method` runs for this kind.
    fn method(&self) -> Method {
        match self.kind {
            SearchKind::Supernet { .. } => Method::Supernet,
            SearchKind::Hawq => Method::Hawq {
                images: HAWQ_IMAGES,
                samples: HAWQ_SAMPLES,
            },
            SearchKind::UniformFill => Method::UniformFill {
                images: HAWQ_IMAGES,
                samples: HAWQ_SAMPLES,
            },
            SearchKind::Uniform => Method::Uniform,
            SearchKind::Random => Method::Random,
        }
    }

    /// The search settings `gmpq search` takes from the same flags.
    pub(super) fn config(&self) -> SearchConfig {
        let mut config = SearchConfig {
            candidates: self.candidates.clone(),
            seed: self.seed,
            ..SearchConfig::default()
        };
        config.augment.hflip = self.hflip;
        if let SearchKind::Supernet {
            attribution_weight,
            epochs,
            step_epochs,
            recipe,
            p,
        } = self.kind
        {
            config.attribution_weight = attribution_weight;
            config.epochs = epochs;
            config.step_epochs = step_epochs;
            config.p = p;
            recipe.apply(&mut config);
        }
        config
    }
}

impl Stage for SearchStage {
    fn identity(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    fn command(&self) -> String {
        let mut argv: Vec<String> = vec!["search".into()];
        // The supernet search is the default method: its recorded commands name none.
        if !matches!(self.kind, SearchKind::Supernet { .. }) {
            argv.extend(["--method".into(), self.method().name(1.0).into()]);
        }
        argv.extend([
            "--teacher".into(),
            path_arg(&self.teacher),
            "--data".into(),
            self.data.clone(),
        ]);
        argv.extend(self.target.flag());
        if let SearchKind::Supernet {
            attribution_weight,
            epochs,
            step_epochs,
            recipe,
            ..
        } = self.kind
        {
            argv.extend([
                "--attribution-weight".into(),
                attribution_weight.to_string(),
                "--epochs".into(),
                epochs.to_string(),
                "--step-epochs".into(),
                step_epochs.to_string(),
                "--recipe".into(),
                recipe.name().into(),
            ]);
        }
        argv.extend([
            "--w-bits".into(),
            bit_list(&self.candidates.weight),
            "--a-bits".into(),
            bit_list(&self.candidates.activation),
            "--out".into(),
            path_arg(&self.out),
        ]);
        if let SearchKind::Supernet { p: Some(p), .. } = self.kind {
            argv.extend(["--p".into(), p.to_string()]);
        }
        if let Some(n) = self.limit {
            argv.extend([
                "--limit".into(),
                n.to_string(),
                "--subset-seed".into(),
                self.subset_seed.to_string(),
            ]);
        }
        if self.hflip {
            argv.push("--hflip".into());
        }
        argv.extend(["--seed".into(), self.seed.to_string()]);
        command_line(&argv)
    }

    fn done(&self) -> Result<bool> {
        Ok(self.out.join("policy.json").is_file())
    }

    fn run(&self, ctx: &StageContext) -> Result<String> {
        let request = SearchRequest {
            teacher: self.teacher.clone(),
            data: parse_spec("--data", &self.data)?,
            subset: SubsetSpec {
                limit: self.limit,
                per_class: None,
                seed: self.subset_seed,
                holdout: 0,
            },
            val_images: VAL_IMAGES,
            targets: vec![self.target],
            config: self.config(),
            method: self.method(),
            out: self.out.clone(),
            command: self.command(),
            sensitivities_from: self.sensitivities_from.clone(),
        };
        let outcome = request.run(ctx.device, ctx.events.search_progress())?;
        Ok(match (outcome.written.first(), outcome.kept.first()) {
            (Some(p), _) => p.one_line(),
            (None, Some(kept)) => format!("{}: exists, kept", kept.display()),
            (None, None) => "no policy".into(),
        })
    }
}

/// `gmpq extract --rank`: GMPQ's policy chosen among candidates by their calibrated accuracy
/// on held-out proxy images ([`RankRequest`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct RankStage {
    pub name: String,
    /// The finished search's policy (its α).
    pub searched: PathBuf,
    pub teacher: PathBuf,
    pub data: String,
    pub limit: Option<usize>,
    pub subset_seed: u64,
    pub target: Target,
    /// More candidates: the run's uniform-fill policy when it has that arm.
    pub extra: Vec<PathBuf>,
    pub out: PathBuf,
}

impl Stage for RankStage {
    fn identity(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    fn command(&self) -> String {
        let mut argv: Vec<String> = vec![
            "extract".into(),
            path_arg(&self.searched),
            "--rank".into(),
            "--teacher".into(),
            path_arg(&self.teacher),
            "--data".into(),
            self.data.clone(),
        ];
        argv.extend(self.target.flag());
        if let Some(n) = self.limit {
            argv.extend([
                "--limit".into(),
                n.to_string(),
                "--subset-seed".into(),
                self.subset_seed.to_string(),
            ]);
        }
        for e in &self.extra {
            argv.extend(["--also".into(), path_arg(e)]);
        }
        argv.extend(["--out".into(), path_arg(&self.out.join("policy.json"))]);
        command_line(&argv)
    }

    fn done(&self) -> Result<bool> {
        Ok(self.out.join("policy.json").is_file())
    }

    fn run(&self, ctx: &StageContext) -> Result<String> {
        let request = RankRequest {
            searched: self.searched.clone(),
            teacher: Some(self.teacher.clone()),
            data: parse_spec("--data", &self.data)?,
            subset: SubsetSpec::limited(self.limit, self.subset_seed),
            val_images: VAL_IMAGES,
            target: Some(self.target),
            extra: self.extra.clone(),
            out: self.out.join("policy.json"),
        };
        let (policy, record) = request.run(ctx.device)?;
        crate::report::bit_allocation_svg(&[("GMPQ ranked", &policy)], &self.out.join("bits.svg"))?;
        let kept = &record.candidates[record.chosen];
        Ok(format!(
            "{}: kept {} of {} candidates ({}, calibrated top-1 {:.2}% on {} held-out proxy images), \
             compression {:.2}x",
            self.out.join("policy.json").display(),
            record.chosen + 1,
            record.candidates.len(),
            kept.source,
            kept.val_top1,
            record.val_images,
            kept.compression
        ))
    }
}
