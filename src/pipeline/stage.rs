//! The stages of a run as typed values. Each runs itself and states the `gmpq` command line
//! that does the same (recorded in `pipeline.json`); none goes through flag strings.

use super::{context, training_done, Result, RunEvents};
use crate::data::{DatasetSpec, SubsetSpec};
use crate::quant::Numerics;
use crate::train::{Finetune, TrainRequest};
use std::path::{Path, PathBuf};

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
pub(super) fn command_line(args: &[String]) -> String {
    shell_words::join(std::iter::once("gmpq").chain(args.iter().map(String::as_str)))
}

pub(super) fn path_arg(p: &Path) -> String {
    p.display().to_string()
}

/// A candidate list as its flag value: `2,3,4,6`.
pub(super) fn bit_list(bits: &[u32]) -> String {
    bits.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

pub(super) fn parse_spec(what: &str, s: &str) -> Result<DatasetSpec> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{SearchKind, SearchStage};
    use crate::policy::Candidates;
    use crate::search::{Recipe, Target};

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
