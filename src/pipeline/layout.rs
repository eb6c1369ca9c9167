//! A run's arms and its folder: where each stage writes, and what a training stage left there.

use super::error::{PipelineError, Result};
use crate::checkpoint::{self, CheckpointMeta};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The record of what ran, in the run folder.
pub const RECORD_FILE: &str = "pipeline.json";

/// One arm of a run: how its policy is found. All arms share the teachers, the budget and
/// the fine-tuning recipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum Arm {
    /// GMPQ search on the proxy (attribution rank preservation).
    Gmpq,
    /// The same search without the attribution term.
    Edmips,
    /// The uniform policy with the most BOPs within the budget (no search).
    Uniform,
    /// The search without the attribution term, run on the target data itself: the
    /// conventional, expensive route.
    EdmipsTarget,
    /// Per-layer bits drawn at random, cost within 2 % under the budget (seeded by the run).
    Random,
    /// HAWQ-style: the proxy teacher's Hessian-trace and measured activation sensitivities,
    /// minimised under the budget by the knapsack (no supernet).
    Hawq,
    /// The best uniform policy, the rest of the budget spent by HAWQ's sensitivities.
    UniformFill,
    /// GMPQ's search, its policy chosen among candidates (α's best few, uniform,
    /// uniform-fill) by their calibrated accuracy on held-out proxy images.
    GmpqRanked,
    /// Not a policy of its own: in a study's tables, each run's chosen model (the arm best on
    /// the validation split). No pipeline runs it.
    Chosen,
}

impl Arm {
    /// Every arm but GMPQ, which a pipeline always runs: the `--baseline` values.
    pub const BASELINES: [Arm; 7] = [
        Arm::Edmips,
        Arm::Uniform,
        Arm::EdmipsTarget,
        Arm::Random,
        Arm::Hawq,
        Arm::UniformFill,
        Arm::GmpqRanked,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Arm::Gmpq => "gmpq",
            Arm::Edmips => "edmips",
            Arm::Uniform => "uniform",
            Arm::EdmipsTarget => "edmips-target",
            Arm::Random => "random",
            Arm::Hawq => "hawq",
            Arm::UniformFill => "uniform-fill",
            Arm::GmpqRanked => "gmpq-ranked",
            Arm::Chosen => "chosen",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Arm::Gmpq => "GMPQ",
            Arm::Edmips => "EdMIPS",
            Arm::Uniform => "uniform",
            Arm::EdmipsTarget => "EdMIPS on target",
            Arm::Random => "random",
            Arm::Hawq => "HAWQ",
            Arm::UniformFill => "uniform-fill",
            Arm::GmpqRanked => "GMPQ ranked",
            Arm::Chosen => "chosen on validation",
        }
    }

    /// Arms whose policy comes from a search (with a log and heatmaps).
    pub fn searched(self) -> bool {
        matches!(self, Arm::Gmpq | Arm::Edmips | Arm::EdmipsTarget)
    }
}

impl std::fmt::Display for Arm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Arm {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let all = std::iter::once(Arm::Gmpq).chain(Arm::BASELINES);
        all.clone().find(|a| a.name() == s).ok_or_else(|| {
            let names: Vec<&str> = all.map(Arm::name).collect();
            format!("unknown arm '{s}' ({})", names.join(", "))
        })
    }
}

/// Where every stage of a run writes, relative to the run directory.
#[derive(Debug, Clone)]
pub struct RunLayout {
    pub dir: PathBuf,
}

impl RunLayout {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    pub fn record(&self) -> PathBuf {
        self.dir.join(RECORD_FILE)
    }
    /// Full-precision teacher trained on the proxy data (guides the search).
    pub fn proxy_teacher(&self) -> PathBuf {
        self.dir.join("teacher-proxy")
    }
    /// Full-precision teacher trained on the target data (initialises fine-tuning).
    pub fn target_teacher(&self) -> PathBuf {
        self.dir.join("teacher-target")
    }

    pub fn search(&self, arm: Arm) -> PathBuf {
        self.dir.join(format!("search-{}", arm.name()))
    }
    pub fn policy(&self, arm: Arm) -> PathBuf {
        self.search(arm).join("policy.json")
    }
    pub fn finetune(&self, arm: Arm) -> PathBuf {
        self.dir.join(format!("finetune-{}", arm.name()))
    }
    /// Teacher and fine-tuned students' attribution maps on target test images.
    pub fn target_attribution(&self) -> PathBuf {
        self.dir.join("attribution-target.png")
    }
    pub fn summary(&self) -> PathBuf {
        self.dir.join("summary.json")
    }
    /// The chosen model, exported: ONNX, the packed file, and which arm it is.
    /// Every fine-tuned arm's predictions on the validation images (the choice's evidence).
    pub fn validation(&self) -> PathBuf {
        self.dir.join("validation.json")
    }
    pub fn chosen_onnx(&self) -> PathBuf {
        self.dir.join("chosen.onnx")
    }
    pub fn chosen_packed(&self) -> PathBuf {
        self.dir.join("chosen.packed.safetensors")
    }
    pub fn chosen_record(&self) -> PathBuf {
        self.dir.join("chosen.json")
    }
    pub fn report(&self) -> PathBuf {
        self.dir.join("report.html")
    }
    /// Chart files the report embeds.
    pub fn report_assets(&self) -> PathBuf {
        self.dir.join("report")
    }
}

/// The metadata of a training run's last checkpoint (its JSON sidecar), if it exists.
pub fn training_meta(run_dir: &Path) -> Result<Option<CheckpointMeta>> {
    let path = checkpoint::sidecar_path(&crate::train::last_checkpoint(run_dir));
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| PipelineError::Read {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| PipelineError::Read {
            path,
            reason: format!("not a checkpoint sidecar: {e}"),
        })
}

/// Whether a training run has completed `epochs` epochs.
pub fn training_done(run_dir: &Path, epochs: usize) -> Result<bool> {
    Ok(training_meta(run_dir)?.is_some_and(|m| m.epoch >= epochs))
}
