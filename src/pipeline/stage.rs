//! The stages of a run as typed values. Each runs itself and states the `gmpq` command line
//! that does the same (recorded in `pipeline.json`); none goes through flag strings.

use super::{context, training_done, PipelineError, Result, RunEvents};
use crate::data::{stratified_subset, DataLoader, DatasetSpec, LoaderConfig, Split, SubsetSpec};
use crate::policy::Candidates;
use crate::quant::Numerics;
use crate::search::Method;
use crate::search::{RankRequest, SearchRequest, HAWQ_IMAGES, HAWQ_SAMPLES, VAL_IMAGES};
use crate::search::{Recipe, SearchConfig, Target};
use crate::train::{self, Finetune, TrainRequest};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What a stage runs with.
pub struct StageContext<'a> {
    pub device: tch::Device,
    pub events: &'a dyn RunEvents,
}

/// One step of a run.
pub trait Stage {
    /// The stage's name in `pipeline.json` (`teacher-proxy`, `search-gmpq`, …).
    fn name(&self) -> String;
    /// The `gmpq …` command that does the same, or what the step does when no command does.
    fn command(&self) -> String;
    /// What makes two stages the same computation: the typed stage and its inputs (the
    /// command line only states it, so renaming a flag changes no identity). Reuse across
    /// runs compares identities.
    fn identity(&self) -> serde_json::Value;
    /// Whether its output exists (a resumed run skips it).
    fn done(&self) -> Result<bool>;
    /// Runs it; returns a one-line account of what it produced.
    fn run(&self, ctx: &StageContext) -> Result<String>;
}

/// `gmpq ARGS…` as one shell-quoted line.
fn command_line(args: &[String]) -> String {
    shell_words::join(std::iter::once("gmpq").chain(args.iter().map(String::as_str)))
}

fn path_arg(p: &Path) -> String {
    p.display().to_string()
}

/// A candidate list as its flag value: `2,3,4,6`.
fn bit_list(bits: &[u32]) -> String {
    bits.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn parse_spec(what: &str, s: &str) -> Result<DatasetSpec> {
    s.parse::<DatasetSpec>()
        .map_err(context(format!("{what} {s}")))
}

/// Fine-tuning's part of a [`TrainStage`]: the FP weights, the policy, the learning rate.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FinetuneOf {
    pub init: PathBuf,
    pub policy: PathBuf,
    pub lr: f64,
    /// Recorded only for integer numerics (stages recorded before them are fake-quant).
    #[serde(skip_serializing_if = "Numerics::is_fake_quant")]
    pub numerics: Numerics,
}

/// `gmpq train` (an FP teacher) or `gmpq finetune` (a policy from FP weights), resumable.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainStage {
    pub name: String,
    /// The architecture a teacher trains (a fine-tuning takes its init's).
    pub model: String,
    /// Its width multiplier (MobileNetV2; 1 elsewhere).
    pub width: f64,
    pub data: String,
    pub limit: Option<usize>,
    pub subset_seed: u64,
    /// Validation images held out of the training data (0: none).
    pub holdout: usize,
    pub test_limit: Option<usize>,
    pub epochs: usize,
    pub hflip: bool,
    pub seed: u64,
    pub out: PathBuf,
    pub finetune: Option<FinetuneOf>,
}

impl Stage for TrainStage {
    fn identity(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    fn command(&self) -> String {
        let mut argv: Vec<String> = match &self.finetune {
            Some(f) => vec![
                "finetune".into(),
                "--init".into(),
                path_arg(&f.init),
                "--policy".into(),
                path_arg(&f.policy),
            ],
            None => vec!["train".into(), "--model".into(), self.model.clone()],
        };
        // Recorded only where it differs from 1, so commands recorded before it still match.
        if self.finetune.is_none() && self.width != 1.0 {
            argv.extend(["--width".into(), self.width.to_string()]);
        }
        argv.extend([
            "--data".into(),
            self.data.clone(),
            "--epochs".into(),
            self.epochs.to_string(),
            "--out".into(),
            path_arg(&self.out),
            "--resume".into(),
        ]);
        if let Some(f) = &self.finetune {
            argv.extend(["--lr".into(), f.lr.to_string()]);
            argv.extend(["--numerics".into(), f.numerics.name().into()]);
        }
        if let Some(n) = self.limit {
            argv.extend(["--limit".into(), n.to_string()]);
        }
        if self.subset_seed != 0 {
            argv.extend(["--subset-seed".into(), self.subset_seed.to_string()]);
        }
        if let Some(n) = self.test_limit {
            argv.extend(["--test-limit".into(), n.to_string()]);
        }
        if self.holdout > 0 {
            argv.extend(["--holdout".into(), self.holdout.to_string()]);
        }
        if self.hflip {
            argv.push("--hflip".into());
        }
        argv.extend(["--seed".into(), self.seed.to_string()]);
        command_line(&argv)
    }

    fn done(&self) -> Result<bool> {
        training_done(&self.out, self.epochs)
    }

    fn run(&self, ctx: &StageContext) -> Result<String> {
        let mut r = TrainRequest::new(parse_spec("--data", &self.data)?, self.out.clone());
        r.epochs = self.epochs;
        r.augment.hflip = self.hflip;
        r.seed = self.seed;
        r.subset = SubsetSpec {
            limit: self.limit,
            per_class: None,
            seed: self.subset_seed,
            holdout: self.holdout,
        };
        r.test_limit = self.test_limit;
        r.resume = true;
        match &self.finetune {
            Some(f) => {
                r.lr = Some(f.lr);
                r.finetune = Some(Finetune::from_files(f.init.clone(), &f.policy, f.numerics)?);
            }
            None => {
                r.arch = self.model.parse()?;
                r.width = self.width;
            }
        }
        Ok(r.run(ctx.device, ctx.events.train_progress())?.one_line())
    }
}

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
    fn config(&self) -> SearchConfig {
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

/// CAM heatmaps of the target teacher and every fine-tuned arm on a few target test images.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AttributionStage {
    pub checkpoints: Vec<PathBuf>,
    pub data: String,
    pub count: usize,
    pub out: PathBuf,
}

impl Stage for AttributionStage {
    fn identity(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    fn name(&self) -> String {
        "attribution".into()
    }

    fn command(&self) -> String {
        format!(
            "(in gmpq) CAM heatmaps of the target teacher and every fine-tuned arm on {} test \
             images of {} → {}",
            self.count,
            self.data,
            self.out.display()
        )
    }

    /// Drawn again on every pass (seconds), so the picture shows the arms of this pass.
    fn done(&self) -> Result<bool> {
        Ok(false)
    }

    /// A fine-tuned checkpoint may be absent where only its record was kept (a committed
    /// study keeps `last.json`, not the weights): the picture is then drawn from those
    /// present, or, when one exists already, kept as it is.
    fn run(&self, ctx: &StageContext) -> Result<String> {
        let data = parse_spec("--data", &self.data)?;
        let (present, missing): (Vec<PathBuf>, Vec<PathBuf>) =
            self.checkpoints.iter().cloned().partition(|c| c.is_file());
        if !missing.is_empty() && self.out.is_file() {
            return Ok(format!(
                "{} kept: {} of the checkpoints are not here (only their records are), e.g. {}",
                self.out.display(),
                missing.len(),
                missing[0].display()
            ));
        }
        if present.is_empty() {
            return Err(PipelineError::Invalid(format!(
                "no checkpoint to draw attribution maps of (first missing: {})",
                self.checkpoints
                    .first()
                    .map_or("none".into(), |c| c.display().to_string())
            )));
        }
        let n = attribution_grid(&present, &data, self.count, &self.out, ctx.device)?;
        Ok(format!(
            "{} ({n} images × {} maps)",
            self.out.display(),
            present.len()
        ))
    }
}

/// Writes a PNG grid of CAM heatmaps: one row per test image of `data` (stratified), one
/// column per checkpoint after the image itself. Returns the number of images.
pub fn attribution_grid(
    checkpoints: &[PathBuf],
    data: &DatasetSpec,
    count: usize,
    out: &Path,
    device: tch::Device,
) -> Result<usize> {
    if !out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"))
    {
        return Err(PipelineError::Invalid(format!(
            "--out {}: the maps are written as PNG; name the file .png",
            out.display()
        )));
    }
    let spec = data;
    let data = data.load(Split::Test)?;
    if count > data.len() {
        return Err(PipelineError::Invalid(format!(
            "--limit {count}: the test split of {spec} has {} images",
            data.len()
        )));
    }
    let idx = stratified_subset(data.as_ref(), &SubsetSpec::limited(Some(count), 0))?;
    let nets = checkpoints
        .iter()
        .map(|c| crate::quant::load(c, device).map_err(context(format!("loading {}", c.display()))))
        .collect::<Result<Vec<_>>>()?;
    // Every network sees the same images (prepared by the first's pipeline): each must take
    // them and predict the data's classes.
    for (c, (ck, _)) in checkpoints.iter().zip(&nets) {
        let m = &ck.meta.model;
        if m.num_classes != data.num_classes() {
            return Err(PipelineError::Invalid(format!(
                "{} predicts {} classes but {spec} has {}",
                c.display(),
                m.num_classes,
                data.num_classes()
            )));
        }
        if let Some(problem) = train::input_mismatch(data.as_ref(), &ck.meta.eval_pipeline, m) {
            return Err(PipelineError::Invalid(format!(
                "{spec} {problem} ({})",
                c.display()
            )));
        }
        if ck.meta.eval_pipeline != nets[0].0.meta.eval_pipeline {
            return Err(PipelineError::Invalid(format!(
                "{} prepares its images differently from {}: draw them separately",
                c.display(),
                checkpoints[0].display()
            )));
        }
    }
    let pipeline = nets
        .first()
        .ok_or_else(|| PipelineError::Invalid("no checkpoint".into()))?
        .0
        .meta
        .eval_pipeline
        .clone();
    let mut loader = DataLoader::new(
        data,
        &idx,
        Arc::new(pipeline.clone()),
        LoaderConfig {
            batch_size: idx.len().max(1),
            ..Default::default()
        },
        0,
    )?;
    let x = loader
        .next()
        .ok_or_else(|| PipelineError::Invalid("no images".into()))??
        .images
        .to_device(device);
    let maps: Vec<tch::Tensor> = nets
        .iter()
        .map(|(_, n)| crate::attribution::network_map(&*n.net, &x))
        .collect();
    let refs: Vec<&tch::Tensor> = maps.iter().collect();
    // Each column named by its checkpoint: the run folder (`finetune-gmpq`) of a
    // `last.safetensors`, else the file's stem.
    let mut labels = vec!["image".to_string()];
    labels.extend(checkpoints.iter().map(|c| {
        let stem = c.file_stem().map(|s| s.to_string_lossy().into_owned());
        match (stem.as_deref(), c.parent().and_then(|p| p.file_name())) {
            (Some("last"), Some(dir)) => dir.to_string_lossy().into_owned(),
            (Some(stem), _) => stem.to_string(),
            _ => c.display().to_string(),
        }
    }));
    crate::report::heatmaps_png(&x, &pipeline.normalize, &refs, &labels, out)?;
    Ok(idx.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fine-tuning's command is what finished runs recorded before the stages were typed
    /// (studies/runs/fmnist-lowbit, 128× seed 1): a study reuses another pair's fine-tuning
    /// only when the commands are equal, so the format must not drift.
    #[test]
    fn finetune_command_is_the_recorded_one() {
        let run = "studies/runs/fmnist-lowbit/mnist-to-fmnist-c128-seed1";
        let stage = TrainStage {
            name: "finetune-gmpq".into(),
            model: "resnet20".into(),
            width: 1.0,
            data: "idx:../shared/datasets/fashion-mnist".into(),
            limit: None,
            subset_seed: 0,
            holdout: 0,
            test_limit: None,
            epochs: 1,
            hflip: true,
            seed: 1,
            out: format!("{run}/finetune-gmpq").into(),
            finetune: Some(FinetuneOf {
                init: "studies/runs/fmnist-lowbit/teacher-target/last.safetensors".into(),
                policy: format!("{run}/search-gmpq/policy.json").into(),
                lr: 0.01,
                numerics: Numerics::FakeQuant,
            }),
        };
        assert_eq!(
            stage.command(),
            format!(
                "gmpq finetune --init studies/runs/fmnist-lowbit/teacher-target/last.safetensors \
                 --policy {run}/search-gmpq/policy.json --data idx:../shared/datasets/fashion-mnist \
                 --epochs 1 --out {run}/finetune-gmpq --resume --lr 0.01 --numerics fake-quant \
                 --hflip --seed 1"
            )
        );
    }

    #[test]
    fn search_commands_state_method_budget_and_subset() {
        let stage = SearchStage {
            name: "search-hawq".into(),
            teacher: "t.safetensors".into(),
            data: "idx:m".into(),
            limit: Some(2000),
            subset_seed: 3,
            target: Target::Compression(128.0),
            candidates: Candidates {
                weight: vec![2, 4],
                activation: vec![2, 3],
            },
            hflip: false,
            seed: 1,
            out: "o".into(),
            kind: SearchKind::Hawq,
            sensitivities_from: None,
        };
        assert_eq!(
            stage.command(),
            "gmpq search --method hawq --teacher t.safetensors --data idx:m \
             --target-compression 128 --w-bits 2,4 --a-bits 2,3 --out o --limit 2000 \
             --subset-seed 3 --seed 1"
        );
        let gmpq = SearchStage {
            kind: SearchKind::Supernet {
                attribution_weight: 20.0,
                epochs: 25,
                step_epochs: 10,
                recipe: Recipe::Scarce,
                p: Some(3.0),
            },
            hflip: true,
            ..stage
        };
        assert!(gmpq
            .command()
            .contains("--attribution-weight 20 --epochs 25 --step-epochs 10 --recipe scarce"));
        assert!(gmpq
            .command()
            .ends_with("--p 3 --limit 2000 --subset-seed 3 --hflip --seed 1"));
        // The settings the stage searches with are the recipe's, as `gmpq search` sets them.
        let c = gmpq.config();
        assert_eq!((c.epochs, c.step_epochs, c.p), (25, 10, Some(3.0)));
        assert_eq!(c.recipe, Recipe::Scarce);
        assert!(c.augment.hflip);
    }
}
