//! A run's headline numbers (`summary.json`): every arm next to the full-precision teacher,
//! and the arm chosen on the validation split.

use super::arms::ArmSummary;
use super::{training_meta, Arm, Result, RunLayout};
use crate::policy::Policy;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

fn summary_units() -> String {
    "top1/top5: % of the target test images; val_top1: % of the held-out validation images of \
     the target's train split; bops: bit operations of the quantized layers; size_mb: 10^6 \
     bytes; search_seconds: wall time"
        .into()
}

/// The arm whose fine-tuned model scores best on validation, without a noise band (the rule
/// of runs that recorded no per-image predictions, [`super::choice::choose`]). Ties go to the
/// uniform policy, then uniform-fill (the simpler policies), then the arms' order. `None` when
/// no arm has a validation score.
pub fn chosen_arm(arms: &[ArmSummary]) -> Option<Arm> {
    super::choice::choose(arms, None, true).map(|c| c.chosen)
}

/// An absolute form of `p` (as given when it cannot be resolved).
fn absolute(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The headline numbers of a run: every arm next to the full-precision target teacher.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunSummary {
    /// The model every arm fine-tunes (the target teacher's).
    #[serde(default)]
    pub model: Option<crate::model::ModelConfig>,
    /// The target data the accuracies are measured on.
    #[serde(default)]
    pub target_data: Option<String>,
    /// Units of the numbers below.
    #[serde(default = "summary_units")]
    pub units: String,
    pub fp_top1: Option<f64>,
    pub fp_top5: Option<f64>,
    pub fp_bops: Option<f64>,
    pub fp_size_mb: Option<f64>,
    pub arms: Vec<ArmSummary>,
    /// The arm best on the validation split ([`chosen_arm`]); chosen without the test set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chosen: Option<Arm>,
    /// Why the chosen arm was chosen: the best arm's lead over the simplest policy on the
    /// validation images, its noise band and the verdict ([`super::Choice`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub choice: Option<super::Choice>,
    /// The chosen model's exported file and its own scores in ONNX Runtime (`chosen.json`),
    /// once exported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shipped: Option<super::Shipped>,
}

impl RunSummary {
    /// Reads whatever outputs exist in the run directory.
    pub fn collect(layout: &RunLayout, arms: &[Arm]) -> Result<Self> {
        let teacher = training_meta(&layout.used_target_teacher())?;
        let last = teacher.as_ref().and_then(|m| m.history.last());
        let mut summary = RunSummary {
            model: teacher.as_ref().map(|m| m.model.clone()),
            target_data: teacher.as_ref().and_then(|m| m.dataset.clone()),
            units: summary_units(),
            fp_top1: last.map(|m| m.test_top1),
            fp_top5: last.map(|m| m.test_top5),
            fp_bops: None,
            fp_size_mb: None,
            arms: Vec::new(),
            chosen: None,
            choice: None,
            shipped: None,
        };
        for &arm in arms {
            let path = layout.policy(arm);
            let policy = if path.exists() {
                Some(Policy::load(&path)?)
            } else {
                None
            };
            let totals = policy.as_ref().and_then(|p| p.totals.clone());
            if let Some(t) = &totals {
                summary.fp_bops = Some(t.fp_bops as f64);
                summary.fp_size_mb = Some(t.fp_size_mb);
            }
            let cost = policy
                .as_ref()
                .and_then(|p| crate::search::PolicyMeta::of(p).ok().flatten())
                .and_then(|m| m.cost);
            let ft = training_meta(&layout.finetune(arm))?;
            let ft_last = ft.as_ref().and_then(|m| m.history.last());
            summary.arms.push(ArmSummary {
                arm,
                policy: policy.is_some().then(|| absolute(&path)),
                checkpoint: ft
                    .is_some()
                    .then(|| absolute(&crate::train::last_checkpoint(&layout.finetune(arm)))),
                bops: totals.as_ref().map(|t| t.bops as f64),
                compression: totals.as_ref().map(|t| t.compression),
                size_mb: totals.as_ref().map(|t| t.size_mb),
                search_seconds: cost.map(|c| c.wall_seconds),
                search_images: cost.map(|c| c.images_processed),
                finetune_epochs: ft.as_ref().map_or(0, |m| m.epoch),
                top1: ft_last.map(|m| m.test_top1),
                top5: ft_last.map(|m| m.test_top5),
                val_top1: ft_last.and_then(|m| m.val_top1),
            });
        }
        let predictions = super::ValidationPredictions::read(&layout.validation());
        let fill_is_uniform = match (
            Policy::load(&layout.policy(Arm::Uniform)),
            Policy::load(&layout.policy(Arm::UniformFill)),
        ) {
            (Ok(u), Ok(f)) => u.same_allocation(&f),
            _ => false,
        };
        summary.choice =
            super::choice::choose(&summary.arms, predictions.as_ref(), fill_is_uniform);
        summary.chosen = summary.choice.as_ref().map(|c| c.chosen);
        summary.read_shipped(layout);
        Ok(summary)
    }

    /// Reads `chosen.json` into [`Self::shipped`] when it is the chosen arm's export.
    pub fn read_shipped(&mut self, layout: &RunLayout) {
        self.shipped =
            super::Shipped::read(&layout.chosen_record()).filter(|r| Some(r.arm) == self.chosen);
    }
}

impl RunSummary {
    /// The printed table: one row per arm (BOPs, compression, size, search time, test top-1
    /// and, with a validation split, val top-1), the FP model first, the chosen arm marked.
    pub fn table(&self) -> String {
        use std::fmt::Write as _;
        let s = self;
        let mut out = String::new();
        let pct = |v: Option<f64>| v.map_or("—".to_string(), |v| format!("{v:.2}%"));
        let validated = s.arms.iter().any(|a| a.val_top1.is_some());
        let val_column = |v: Option<f64>| {
            if validated {
                format!(" {:>9}", pct(v))
            } else {
                String::new()
            }
        };
        writeln!(
            out,
            "{:<20} {:>10} {:>12} {:>10} {:>10} {:>9}{}",
            "arm",
            "BOPs (G)",
            "compression",
            "size MB",
            "search",
            "top-1",
            if validated { "   val top-1" } else { "" }
        )
        .ok();
        writeln!(
            out,
            "{:<20} {:>10} {:>12} {:>10} {:>10} {:>9}",
            "FP",
            s.fp_bops.map_or("—".into(), |b| format!("{:.4}", b / 1e9)),
            "1.00x",
            s.fp_size_mb.map_or("—".into(), |v| format!("{v:.3}")),
            "—",
            pct(s.fp_top1)
        )
        .ok();
        for a in &s.arms {
            let label = if s.chosen == Some(a.arm) {
                format!("{} (chosen)", a.arm.label())
            } else {
                a.arm.label().to_string()
            };
            writeln!(
                out,
                "{:<20} {:>10} {:>12} {:>10} {:>10} {:>9}{}",
                label,
                a.bops.map_or("—".into(), |b| format!("{:.4}", b / 1e9)),
                a.compression.map_or("—".into(), |c| format!("{c:.2}x")),
                a.size_mb.map_or("—".into(), |v| format!("{v:.3}")),
                a.search_seconds.map_or("—".into(), |v| format!("{v:.0} s")),
                pct(a.top1),
                val_column(a.val_top1)
            )
            .ok();
        }
        if let Some(c) = &s.choice {
            writeln!(out, "choice: {}", c.reason).ok();
            if let Some(w) = &c.warning {
                writeln!(out, "warning: {w}").ok();
            }
        }
        if let Some(shipped) = &s.shipped {
            writeln!(out, "{}", shipped.line()).ok();
        }
        out
    }
}
