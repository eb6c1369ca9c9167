//! What a sensitivity analysis (HAWQ's) measured per layer: read by the HAWQ allocation and
//! by uniform-fill.

use super::extract::ExtractionError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What the sensitivity analysis measured, kept in the policy's meta.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sensitivities {
    /// Per layer: |Hutchinson trace| of the loss Hessian w.r.t. its kernel, over its size.
    pub mean_trace: BTreeMap<String, f64>,
    /// Per layer and weight candidate: `½·tr/n·‖Q_b(W) − W‖²`.
    pub weight: BTreeMap<String, Vec<f64>>,
    /// Per layer and activation candidate: the measured loss increase.
    pub activation: BTreeMap<String, Vec<f64>>,
    /// The FP loss on the analysis batches.
    pub fp_loss: f64,
}

impl Sensitivities {
    /// A layer's weight and activation sensitivities (per candidate).
    pub fn layer(&self, name: &str) -> std::result::Result<(&[f64], &[f64]), ExtractionError> {
        let missing = || ExtractionError::Invalid(format!("no sensitivity for layer {name}"));
        Ok((
            self.weight.get(name).ok_or_else(missing)?,
            self.activation.get(name).ok_or_else(missing)?,
        ))
    }
}
