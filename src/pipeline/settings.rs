//! A pipeline run's settings: one typed value, recorded in `pipeline.json` (a resumed run must
//! have the same), from which every stage is built.

use super::{Arm, PipelineError, Result};
use crate::policy::{Candidates, DEFAULT_CANDIDATES};
use crate::quant::Numerics;
use crate::search::{Recipe, SearchConfig, Target};
use serde::Serialize;
use std::path::PathBuf;

/// Everything a pipeline run does. The serialized fields are the run's recorded settings;
/// the others (`baseline`, `out`, `reuse_from`) say where and what to run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PipelineSettings {
    /// resnet20, resnet32, …
    pub model: String,
    /// The width multiplier of mobilenetv2 (recorded only where it is not 1).
    #[serde(skip_serializing_if = "is_unit")]
    pub width: f64,
    /// Proxy data, `KIND:PATH[:N]` (N: a stratified N-image subset of its train split).
    pub proxy: String,
    /// Target data, `KIND:PATH`.
    pub target: String,
    pub target_limit: Option<usize>,
    pub target_test_limit: Option<usize>,
    /// Target training images held out for validation: the target teacher and the
    /// fine-tunings never train on them, and the arm best on them is the run's chosen model.
    /// `None`: no validation split (runs recorded before it existed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_holdout: Option<usize>,
    pub target_compression: Option<f64>,
    pub target_bops: Option<String>,
    pub target_size_mb: Option<f64>,
    /// A proxy teacher to use instead of training one.
    pub teacher: Option<PathBuf>,
    /// A target teacher to use instead of training one.
    pub target_teacher: Option<PathBuf>,
    /// The arms besides GMPQ.
    #[serde(skip)]
    pub baseline: Vec<Arm>,
    pub teacher_epochs: usize,
    pub target_teacher_epochs: usize,
    pub search_epochs: usize,
    /// Epochs of the target search (edmips-target); default: `search_epochs`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_search_epochs: Option<usize>,
    pub search_step_epochs: usize,
    pub finetune_epochs: usize,
    pub finetune_lr: f64,
    pub attribution_weight: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p: Option<f64>,
    pub recipe: Recipe,
    pub w_bits: Vec<u32>,
    pub a_bits: Vec<u32>,
    /// Random flips of the target images.
    pub hflip: bool,
    /// Random flips of the proxy images (default: `hflip`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_hflip: Option<bool>,
    pub seed: u64,
    pub subset_seed: u64,
    /// How the fine-tuned networks compute (recorded only for integer numerics). `None`: as
    /// the run folder recorded it (fake-quant for runs recorded before integer numerics),
    /// integer for a new run.
    #[serde(skip_serializing_if = "is_fake_quant_or_unset")]
    pub numerics: Option<Numerics>,
    #[serde(skip)]
    pub out: PathBuf,
    /// Runs whose finished proxy-independent stages (fine-tunings of the same command and
    /// policy, the edmips-target search of the same command) are copied.
    #[serde(skip)]
    pub reuse_from: Vec<PathBuf>,
}

/// Teacher epochs of `gmpq pipeline` (proxy and target).
pub const TEACHER_EPOCHS: usize = 30;
/// Target training images `gmpq pipeline` holds out for validation.
pub const TARGET_HOLDOUT: usize = 1000;
/// Fine-tuning epochs of `gmpq pipeline`.
pub const FINETUNE_EPOCHS: usize = 10;
/// The budget when none is given: 64× BOPs compression (≈ uniform 4 bits).
pub const DEFAULT_BUDGET: Target = Target::Compression(64.0);

impl PipelineSettings {
    /// GMPQ alone from `proxy` to `target` with every default, into `out`.
    pub fn new(proxy: impl Into<String>, target: impl Into<String>, out: PathBuf) -> Self {
        let search = SearchConfig::default();
        Self {
            model: "resnet20".into(),
            width: 1.0,
            proxy: proxy.into(),
            target: target.into(),
            target_limit: None,
            target_test_limit: None,
            target_holdout: Some(TARGET_HOLDOUT),
            target_compression: None,
            target_bops: None,
            target_size_mb: None,
            teacher: None,
            target_teacher: None,
            baseline: Vec::new(),
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
            w_bits: DEFAULT_CANDIDATES.to_vec(),
            a_bits: DEFAULT_CANDIDATES.to_vec(),
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
            target_compression: Some(64.0),
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
        Ok(Target::from_parts(
            self.target_bops.as_deref(),
            self.target_compression,
            self.target_size_mb,
        )
        .map_err(PipelineError::Invalid)?
        .unwrap_or(DEFAULT_BUDGET))
    }

    /// The bit candidates, checked.
    pub fn candidates(&self) -> Result<Candidates> {
        Ok(Candidates::new(&self.w_bits, &self.a_bits)?)
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
            target_compression: Some(128.0),
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
            target_holdout: None,
            ..PipelineSettings::demo("x".into())
        };
        assert_eq!(s.record(), recorded);
        assert_eq!(s.budget().unwrap(), Target::Compression(128.0));
    }
}
