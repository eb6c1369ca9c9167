//! One arm's results, as a run records them.

use super::layout::Arm;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// One arm's results, as far as the run has got.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArmSummary {
    pub arm: Arm,
    /// The policy file (absolute path).
    pub policy: Option<PathBuf>,
    /// The fine-tuned checkpoint (absolute path), once fine-tuning has finished an epoch.
    #[serde(default)]
    pub checkpoint: Option<PathBuf>,
    pub bops: Option<f64>,
    pub compression: Option<f64>,
    pub size_mb: Option<f64>,
    /// Search wall time and images processed (0 for the uniform arm).
    pub search_seconds: Option<f64>,
    pub search_images: Option<u64>,
    pub finetune_epochs: usize,
    pub top1: Option<f64>,
    pub top5: Option<f64>,
    /// Top-1 on the held-out validation images of the target's train split (runs with a
    /// validation split): what the chosen model is chosen by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_top1: Option<f64>,
}

impl ArmSummary {
    /// An arm with nothing recorded yet.
    pub fn new(arm: Arm) -> Self {
        ArmSummary {
            arm,
            policy: None,
            checkpoint: None,
            bops: None,
            compression: None,
            size_mb: None,
            search_seconds: None,
            search_images: None,
            finetune_epochs: 0,
            top1: None,
            top5: None,
            val_top1: None,
        }
    }
}
