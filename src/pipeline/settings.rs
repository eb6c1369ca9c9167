//! A pipeline run's settings: one typed value, recorded in `pipeline.json` (a resumed run must
//! have the same), from which every stage is built.

use super::{Arm, Result};
use crate::policy::{BitCandidateArgs, Candidates};
use crate::quant::Numerics;
use crate::search::{BudgetArgs, Recipe, SearchConfig, Target};
use serde::Serialize;
use std::path::PathBuf;

/// Everything a pipeline run does: `gmpq pipeline`'s flags. The serialized fields are the
/// run's recorded settings (a resumed run must have the same); the others (`baseline`,
/// `out`, `reuse_from`) say where and what to run.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct PipelineSettings {
    /// resnet20, resnet32, resnet56, resnet18, resnet50 or mobilenetv2; onnx: a network from
    /// `gmpq import --onnx`, given as --teacher and --target-teacher.
    #[cfg_attr(feature = "cli", arg(long, default_value = "resnet20"))]
    pub model: String,
    /// Width multiplier of mobilenetv2 (its teachers' channels; recorded only where it is
    /// not 1).
    #[cfg_attr(
        feature = "cli",
        arg(long, default_value_t = 1.0, allow_negative_numbers = true)
    )]
    #[serde(skip_serializing_if = "is_unit")]
    pub width: f64,
    /// Proxy data for the search, KIND:PATH[:N]; N keeps a stratified subset of N training
    /// images (e.g. idx:../shared/datasets/fashion-mnist:2000).
    #[cfg_attr(feature = "cli", arg(long))]
    pub proxy: String,
    /// Target data, KIND:PATH: the target teacher and the fine-tuned networks train on its
    /// train split; results are on its test split.
    #[cfg_attr(feature = "cli", arg(long))]
    pub target: String,
    /// Train on a stratified subset of this many target images.
    #[cfg_attr(feature = "cli", arg(long, value_parser = crate::flags::positive(), allow_negative_numbers = true))]
    pub target_limit: Option<usize>,
    /// Evaluate on at most this many target test images (stratified).
    #[cfg_attr(feature = "cli", arg(long, value_parser = crate::flags::positive(), allow_negative_numbers = true))]
    pub target_test_limit: Option<usize>,
    /// Target training images held out for validation (a fixed stratified draw): the target
    /// teacher and the fine-tunings never train on them, and the run's model is chosen on
    /// them (test top-1 is reported, never used to choose). Default: what a resumed run
    /// recorded, else a tenth of the target's training images within 1,000..=5,000 (see
    /// `target_holdout_for`). 0: none (as runs recorded before it existed, which do not
    /// record it).
    #[cfg_attr(feature = "cli", arg(long, allow_negative_numbers = true))]
    #[serde(skip_serializing_if = "no_holdout")]
    pub target_holdout: Option<usize>,
    #[cfg_attr(feature = "cli", command(flatten))]
    #[serde(flatten)]
    pub budget: BudgetArgs,
    /// An FP teacher for the search (instead of training one on the proxy).
    #[cfg_attr(feature = "cli", arg(long))]
    pub teacher: Option<PathBuf>,
    /// An FP network to fine-tune from (instead of training one on the target).
    #[cfg_attr(feature = "cli", arg(long))]
    pub target_teacher: Option<PathBuf>,
    /// Comparison arms under the same budget and recipe, comma-separated (the list replaces
    /// the default): uniform (the best uniform policy within the budget), uniform-fill (it,
    /// with the rest of the budget spent where HAWQ's sensitivities fall most), edmips (the
    /// search without the attribution term), edmips-target (EdMIPS searched on the target
    /// data), random (random bits within 2 % under the budget, drawn with --seed), hawq
    /// (Hessian-trace and activation sensitivities of the proxy teacher on 512 proxy images,
    /// minimised by the knapsack), gmpq-ranked (GMPQ's best candidates ranked on held-out
    /// proxy images). The model chosen on validation is one of GMPQ and these: the simplest
    /// policy unless another leads it beyond the noise (docs/PIPELINE.md).
    #[cfg_attr(feature = "cli", arg(long, value_delimiter = ',', value_parser = baseline_arm(), default_value = DEFAULT_BASELINES_FLAG))]
    #[serde(skip)]
    pub baseline: Vec<Arm>,
    /// Epochs of the proxy teacher.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = TEACHER_EPOCHS, value_parser = crate::flags::positive(), allow_negative_numbers = true))]
    pub teacher_epochs: usize,
    /// Epochs of the target teacher.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = TEACHER_EPOCHS, value_parser = crate::flags::positive(), allow_negative_numbers = true))]
    pub target_teacher_epochs: usize,
    /// Epochs of the proxy searches (gmpq, edmips).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = SearchConfig::default().epochs, value_parser = crate::flags::positive(), allow_negative_numbers = true))]
    pub search_epochs: usize,
    /// Epochs of the edmips-target search (default: --search-epochs).
    #[cfg_attr(feature = "cli", arg(long, value_parser = crate::flags::positive(), allow_negative_numbers = true))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_search_epochs: Option<usize>,
    /// Search learning rates ×0.1 every this many epochs.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = SearchConfig::default().step_epochs, value_parser = crate::flags::positive(), allow_negative_numbers = true))]
    pub search_step_epochs: usize,
    /// Fine-tuning epochs of every arm on the target.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = FINETUNE_EPOCHS, value_parser = crate::flags::positive(), allow_negative_numbers = true))]
    pub finetune_epochs: usize,
    /// Fine-tuning learning rate.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = crate::train::FINETUNE_LR, allow_negative_numbers = true))]
    pub finetune_lr: f64,
    /// Weight of the attribution loss in the GMPQ arm.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = SearchConfig::default().attribution_weight, allow_negative_numbers = true))]
    pub attribution_weight: f64,
    /// Fixed attribution exponent p of the GMPQ arm (default: the capacity-aware rule).
    #[cfg_attr(feature = "cli", arg(long, allow_negative_numbers = true))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p: Option<f64>,
    /// Search recipe of the searched arms (gmpq, edmips, edmips-target).
    #[cfg_attr(feature = "cli", arg(long, value_enum, default_value_t = Recipe::Scarce))]
    pub recipe: Recipe,
    #[cfg_attr(feature = "cli", command(flatten))]
    #[serde(flatten)]
    pub bits: BitCandidateArgs,
    /// Random horizontal flips in training and search (not for digits).
    #[cfg_attr(feature = "cli", arg(long))]
    pub hflip: bool,
    /// Flips on the proxy side (proxy teacher, proxy searches): a switch like --hflip
    /// (`--proxy-hflip false` turns them off); default: as --hflip.
    #[cfg_attr(feature = "cli", arg(long, num_args = 0..=1, default_missing_value = "true"))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_hflip: Option<bool>,
    /// Seed of training, search and fine-tuning (the proxy subset has its own).
    #[cfg_attr(
        feature = "cli",
        arg(long, default_value_t = 0, allow_negative_numbers = true)
    )]
    pub seed: u64,
    /// Seed of the proxy subset draw.
    #[cfg_attr(
        feature = "cli",
        arg(long, default_value_t = 0, allow_negative_numbers = true)
    )]
    pub subset_seed: u64,
    /// How the fine-tuned networks compute: integer (batch norm folded, every conv output
    /// and residual sum re-quantized, as the exported integer graph; the default for a new
    /// run) or fake-quant (the reference's; the default where the run folder recorded it).
    /// Recorded only for integer numerics.
    #[cfg_attr(feature = "cli", arg(long, value_parser = crate::policy::parse_numerics))]
    #[serde(skip_serializing_if = "is_fake_quant_or_unset")]
    pub numerics: Option<Numerics>,
    /// Run folder.
    #[cfg_attr(feature = "cli", arg(long, default_value = "runs/pipeline"))]
    #[serde(skip)]
    pub out: PathBuf,
    /// Another run folder (repeatable) whose finished stages that do not depend on the proxy
    /// may be copied: a fine-tuning with the same command (same teacher, data, recipe and seed)
    /// and a byte-identical policy, or the edmips-target search with the same command, is the
    /// same computation, so it is copied instead of run again (pipeline.json says so).
    #[cfg_attr(
        feature = "cli",
        arg(long, value_name = "RUN_DIR", alias = "reuse-finetunes-from")
    )]
    #[serde(skip)]
    pub reuse_from: Vec<PathBuf>,
}

/// A `--baseline` arm: any arm but GMPQ, which always runs.
#[cfg(feature = "cli")]
fn baseline_arm() -> impl clap::builder::TypedValueParser<Value = Arm> {
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(Arm::BASELINES.map(Arm::name))
        .try_map(|s| s.parse::<Arm>())
}

fn no_holdout(h: &Option<usize>) -> bool {
    h.is_none_or(|h| h == 0)
}

/// The arms `gmpq pipeline` runs beside GMPQ without `--baseline`: with them the model chosen
/// on validation is never one the best uniform policy beats clearly (at a grid budget), nor
/// one that a uniform policy spending the whole budget beats (between grid budgets).
pub const DEFAULT_BASELINES: [Arm; 2] = [Arm::Uniform, Arm::UniformFill];
/// [`DEFAULT_BASELINES`] as `--baseline` takes and `--help` shows them (comma-separated);
/// `recorded_settings_are_typed_values` parses it back.
pub const DEFAULT_BASELINES_FLAG: &str = "uniform,uniform-fill";
/// Teacher epochs of `gmpq pipeline` (proxy and target).
pub const TEACHER_EPOCHS: usize = 30;
/// The fewest target training images `gmpq pipeline` holds out for validation by default.
pub const TARGET_HOLDOUT: usize = 1000;
/// The most it holds out by default.
pub const TARGET_HOLDOUT_MAX: usize = 5000;

/// The default validation split of a target with `train_images` training images: a tenth of
/// them, at least [`TARGET_HOLDOUT`] and at most [`TARGET_HOLDOUT_MAX`] (never more than half).
/// Why: the choice's noise band on N images is about `1.96·√(q/N)` for arms that disagree on
/// a share `q` of them (q ≈ 3 % measured on the demo's arms): ±1.1 points at 1,000, ±0.5 at
/// 5,000, where the studies' arms differ by 0.2–1 point; past 5,000 the teachers lose more
/// training images than the band gains.
pub fn target_holdout_for(train_images: usize) -> usize {
    (train_images / 10)
        .clamp(TARGET_HOLDOUT, TARGET_HOLDOUT_MAX)
        .min(train_images / 2)
}
/// Fine-tuning epochs of `gmpq pipeline`.
pub const FINETUNE_EPOCHS: usize = 10;
/// The budget when none is given: 64× BOPs compression (≈ uniform 4 bits).
pub const DEFAULT_BUDGET: Target = Target::Compression(64.0);

impl PipelineSettings {
    /// GMPQ and [`DEFAULT_BASELINES`] from `proxy` to `target` with every default, into `out`.
    pub fn new(proxy: impl Into<String>, target: impl Into<String>, out: PathBuf) -> Self {
        let search = SearchConfig::default();
        Self {
            model: "resnet20".into(),
            width: 1.0,
            proxy: proxy.into(),
            target: target.into(),
            target_limit: None,
            target_test_limit: None,
            target_holdout: None,
            budget: BudgetArgs::default(),
            teacher: None,
            target_teacher: None,
            baseline: DEFAULT_BASELINES.to_vec(),
            teacher_epochs: TEACHER_EPOCHS,
            target_teacher_epochs: TEACHER_EPOCHS,
            search_epochs: search.epochs,
            target_search_epochs: None,
            search_step_epochs: search.step_epochs,
            finetune_epochs: FINETUNE_EPOCHS,
            finetune_lr: crate::train::FINETUNE_LR,
            attribution_weight: search.attribution_weight,
            p: None,
            recipe: Recipe::Scarce,
            bits: BitCandidateArgs::default(),
            hflip: false,
            proxy_hflip: None,
            seed: 0,
            subset_seed: 0,
            numerics: None,
            out,
            reuse_from: Vec::new(),
        }
    }

    /// `gmpq demo`: the method end to end on the bundled Fashion-MNIST subset, sized to finish
    /// in minutes on two cores (GMPQ, uniform and EdMIPS at 64×).
    pub fn demo(out: PathBuf) -> Self {
        Self {
            budget: BudgetArgs {
                target_compression: Some(64.0),
                ..Default::default()
            },
            baseline: vec![Arm::Uniform, Arm::Edmips],
            teacher_epochs: 15,
            target_teacher_epochs: 12,
            search_epochs: 8,
            search_step_epochs: 4,
            finetune_epochs: 3,
            hflip: true,
            ..Self::new("bundled:fashion-mnist:1000", "bundled:fashion-mnist", out)
        }
    }

    /// The budget (64× compression when none is given).
    pub fn budget(&self) -> Result<Target> {
        Ok(self.budget.target()?.unwrap_or(DEFAULT_BUDGET))
    }

    /// The bit candidates, checked.
    pub fn candidates(&self) -> Result<Candidates> {
        Ok(self.bits.candidates()?)
    }

    /// GMPQ, then each baseline once.
    pub fn arms(&self) -> Vec<Arm> {
        let mut arms = vec![Arm::Gmpq];
        for &arm in &self.baseline {
            if !arms.contains(&arm) {
                arms.push(arm);
            }
        }
        arms
    }

    /// The settings as `pipeline.json` records them.
    pub fn record(&self) -> serde_json::Value {
        // Plain numbers, strings and lists: serializing cannot fail.
        serde_json::to_value(self).unwrap_or_default()
    }
}

fn is_unit(w: &f64) -> bool {
    *w == 1.0
}

/// Splits `KIND:PATH:N` into the dataset spec and the subset size.
pub fn split_subset(s: &str) -> (String, Option<usize>) {
    if let Some((head, tail)) = s.rsplit_once(':') {
        if head.contains(':') && !tail.is_empty() && tail.bytes().all(|b| b.is_ascii_digit()) {
            return (head.to_string(), tail.parse().ok());
        }
    }
    (s.to_string(), None)
}

fn is_fake_quant_or_unset(n: &Option<Numerics>) -> bool {
    n.is_none_or(|n| n.is_fake_quant())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_validation_split_grows_with_the_target() {
        // The bundled 6,000-image subset keeps the 1,000 it always held out; full
        // Fashion-MNIST holds out 5,000; a small target never gives up more than half.
        assert_eq!(target_holdout_for(6_000), 1_000);
        assert_eq!(target_holdout_for(20_000), 2_000);
        assert_eq!(target_holdout_for(60_000), 5_000);
        assert_eq!(target_holdout_for(1_500), 750);
    }

    #[test]
    fn proxy_subset_suffix() {
        assert_eq!(
            split_subset("idx:data/fmnist:2000"),
            ("idx:data/fmnist".into(), Some(2000))
        );
        assert_eq!(
            split_subset("idx:data/fmnist"),
            ("idx:data/fmnist".into(), None)
        );
        assert_eq!(
            split_subset("bundled:fashion-mnist:1000"),
            ("bundled:fashion-mnist".into(), Some(1000))
        );
        assert_eq!(split_subset("folder:a:b"), ("folder:a:b".into(), None));
    }

    /// The recorded settings of a study run written before the settings were a library type
    /// (studies/runs/fmnist-lowbit, 128× seed 1): a resumed run compares them field by field,
    /// so the same settings must serialize to the same JSON.
    #[test]
    fn settings_record_as_before() {
        let recorded = serde_json::json!({"a_bits": [2, 3, 4, 6], "attribution_weight": 20.0,
            "finetune_epochs": 1, "finetune_lr": 0.01, "hflip": true, "model": "resnet20",
            "proxy": "idx:../shared/datasets/mnist:2000", "proxy_hflip": false,
            "recipe": "scarce", "search_epochs": 25, "search_step_epochs": 10, "seed": 1,
            "subset_seed": 0, "target": "idx:../shared/datasets/fashion-mnist",
            "target_bops": null, "target_compression": 128.0, "target_limit": null,
            "target_search_epochs": 1, "target_size_mb": null,
            "target_teacher": "studies/runs/fmnist-lowbit/teacher-target/last.safetensors",
            "target_teacher_epochs": 12, "target_test_limit": null,
            "teacher": "studies/runs/fmnist-lowbit/teacher-mnist-to-fmnist/last.safetensors",
            "teacher_epochs": 15, "w_bits": [2, 3, 4, 6]});
        let s = PipelineSettings {
            proxy: "idx:../shared/datasets/mnist:2000".into(),
            target: "idx:../shared/datasets/fashion-mnist".into(),
            budget: BudgetArgs {
                target_compression: Some(128.0),
                ..Default::default()
            },
            teacher: Some(
                "studies/runs/fmnist-lowbit/teacher-mnist-to-fmnist/last.safetensors".into(),
            ),
            target_teacher: Some(
                "studies/runs/fmnist-lowbit/teacher-target/last.safetensors".into(),
            ),
            search_epochs: 25,
            target_search_epochs: Some(1),
            search_step_epochs: 10,
            finetune_epochs: 1,
            proxy_hflip: Some(false),
            seed: 1,
            target_holdout: Some(0),
            ..PipelineSettings::demo("x".into())
        };
        assert_eq!(s.record(), recorded);
        assert_eq!(s.budget().unwrap(), Target::Compression(128.0));
    }
}

#[cfg(all(test, feature = "cli"))]
mod flag_tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        settings: PipelineSettings,
    }

    /// pipeline.json records the values used, typed: numbers, lists and arm names; the
    /// defaults of the flags are the library's.
    #[test]
    fn recorded_settings_are_typed_values() {
        let argv = [
            "pipeline",
            "--proxy",
            "bundled:mnist:500",
            "--target",
            "bundled:fashion-mnist",
            "--w-bits",
            "4,2,2",
            "--baseline",
            "uniform,hawq",
        ];
        let Ok(Cli { settings }) = Cli::try_parse_from(argv) else {
            panic!("pipeline arguments did not parse");
        };
        assert_eq!(settings.baseline, vec![Arm::Uniform, Arm::Hawq]);
        let out = settings.out.clone();
        let s = settings.record();
        assert_eq!(s["finetune_lr"], serde_json::json!(0.01));
        assert_eq!(s["w_bits"], serde_json::json!([4, 2, 2]));
        assert_eq!(s["a_bits"], serde_json::json!([2, 3, 4, 6]));
        assert_eq!(s["recipe"], "scarce");
        assert!(s.get("baseline").is_none() && s.get("bits").is_none());
        assert_eq!(settings.candidates().unwrap().weight, vec![2, 4]);
        // Every default of the flags is the library's own.
        let library = PipelineSettings {
            baseline: settings.baseline.clone(),
            bits: BitCandidateArgs {
                w_bits: vec![4, 2, 2],
                ..Default::default()
            },
            ..PipelineSettings::new("bundled:mnist:500", "bundled:fashion-mnist", out)
        };
        assert_eq!(settings, library);
        // Without --baseline: the library's default arms.
        let Ok(Cli { settings }) = Cli::try_parse_from(argv[..5].to_vec()) else {
            panic!("pipeline arguments did not parse");
        };
        assert_eq!(settings.baseline, DEFAULT_BASELINES.to_vec());
        // GMPQ always runs: it is not a baseline; bits outside 2..=16 are refused.
        for bad in [["--baseline", "gmpq"], ["--w-bits", "1,4"]] {
            let mut v = argv[..5].to_vec();
            v.extend(bad);
            assert!(Cli::try_parse_from(v).is_err(), "{bad:?} accepted");
        }
    }
}
