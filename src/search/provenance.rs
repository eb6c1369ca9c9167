//! The provenance every policy producer writes into a policy's `meta`, and every reader (the
//! pipeline's summary, `gmpq extract`, `gmpq bops`) reads back: one typed record instead of
//! JSON keys written in one file and read in another.

use super::{ExtractionRule, Preferences, Target};
use crate::model::ModelConfig;
use crate::policy::{Policy, PolicyCost};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// A policy's `meta`. Every field is optional on reading: policies from older versions, and
/// the uniform and random arms, record less.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PolicyMeta {
    /// gmpq, edmips, hawq, uniform or random.
    #[serde(default)]
    pub method: String,
    /// The budget the policy was taken under.
    #[serde(default)]
    pub target: Option<Target>,
    /// BOPs of the plain argmax of α, before the budget rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argmax_policy_bops: Option<u64>,
    /// The final α, so another rule or budget can be applied without searching again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha: Option<Preferences>,
    /// The search settings, as written (a `SearchConfig`; older policies lack newer fields).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search: Option<serde_json::Value>,
    /// The proxy data and subset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<String>,
    /// The FP teacher the policy was searched or measured with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher: Option<PathBuf>,
    /// The teacher's model: the geometry the policy's costs are measured on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_config: Option<ModelConfig>,
    /// libtorch threads of the search (CPU numerics depend on them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_proxy_val_top1: Option<f64>,
    /// HAWQ's settings and per-layer sensitivities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hawq: Option<serde_json::Value>,
    /// The random arm's seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// What producing the policy cost.
    #[serde(default)]
    pub cost: Option<PolicyCost>,
    /// The command line that produced the policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Set by `gmpq extract`: the rule and where its α came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extraction: Option<ExtractionRecord>,
    /// The candidates a ranked extraction scored, and which it kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranking: Option<RankingRecord>,
}

/// What a ranked extraction ([`super::rank`]) measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RankingRecord {
    /// Every candidate with its calibrated top-1 on the held-out proxy images.
    pub candidates: Vec<RankedCandidate>,
    /// The index of the kept one.
    pub chosen: usize,
    /// Held-out proxy images scored, and training images calibrated on.
    pub val_images: usize,
    pub calib_images: usize,
    /// The gain over the search's own policy (in top-1 points) the best candidate needed to
    /// be kept instead ([`super::rank::resolvable_gain`]); absent in rankings from before the
    /// rule, which kept the best score.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_gain: Option<f64>,
}

/// How `gmpq extract` took a policy again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExtractionRecord {
    pub rule: String,
    pub from: String,
}

impl PolicyMeta {
    /// The record of `method` under `target` at `cost`.
    pub fn new(method: &str, target: Option<Target>, cost: PolicyCost) -> Self {
        Self {
            method: method.into(),
            target,
            cost: Some(cost),
            ..Self::default()
        }
    }

    /// The policy's record: `Ok(None)` when it has none, an error when it is malformed.
    pub fn of(policy: &Policy) -> Result<Option<Self>, serde_json::Error> {
        policy
            .meta
            .as_ref()
            .map(|m| serde_json::from_value(m.clone()))
            .transpose()
    }

    /// The extraction rule the search used (`search.extraction`), if it recorded one.
    pub fn extraction_rule(&self) -> Option<ExtractionRule> {
        let rule = self.search.as_ref()?.get("extraction")?;
        serde_json::from_value(rule.clone()).ok()
    }

    /// As a policy's `meta`.
    pub fn to_value(&self) -> serde_json::Value {
        // Plain data (numbers, strings, paths, nested records): serializing cannot fail.
        serde_json::to_value(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a search records is what the readers get back, and a policy from an older version
    /// (no model config, no cost) still reads.
    #[test]
    fn meta_round_trips_and_reads_older_policies() {
        let mut m = PolicyMeta::new(
            "gmpq",
            Some(Target::Compression(128.0)),
            PolicyCost {
                wall_seconds: 3.0,
                images_processed: 10,
            },
        );
        m.teacher = Some("t.safetensors".into());
        m.search = Some(serde_json::json!({"extraction": "knapsack", "epochs": 25}));
        let back: PolicyMeta = serde_json::from_value(m.to_value()).unwrap();
        assert_eq!(back.target, Some(Target::Compression(128.0)));
        assert_eq!(back.cost.unwrap().images_processed, 10);
        assert_eq!(back.extraction_rule(), Some(ExtractionRule::Knapsack));
        let old: PolicyMeta = serde_json::from_value(serde_json::json!({
            "method": "edmips", "target": {"compression": 64.0}, "search": {"epochs": 25},
        }))
        .unwrap();
        assert!(old.cost.is_none() && old.model_config.is_none());
        assert_eq!(old.extraction_rule(), None);
    }
}

/// One ranked candidate, as the provenance records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankedCandidate {
    /// Where it came from: `alpha` (the knapsack's best), `alpha, LAYER weights ≠ B` (the best
    /// solution with that layer's bits changed), `uniform`, or the file it was read from.
    pub source: String,
    pub bops: u64,
    pub compression: f64,
    /// Top-1 (%) of the calibrated, untrained network on the held-out proxy images.
    pub val_top1: f64,
    /// Σ log softmax(α/T) of its bits: how much the search preferred it.
    pub alpha_log_prob: f64,
    /// Bits per layer, `w/a` in layer order.
    pub bits: Vec<String>,
}
