//! Which fine-tuned model a run ships: the simplest policy, unless a searched one is better on
//! the held-out validation images by more than their noise.
//!
//! Every arm's top-1 class on each validation image is recorded (`validation.json`, written by
//! [`ValidateStage`]). The arm best on validation (the challenger) is weighed against the
//! reference, the simplest policy for the budget (uniform-fill between grid points, uniform at
//! a grid budget, where both are the same policy), on the same images: McNemar's exact test
//! on the images exactly one of them classifies right (one-sided, at [`CHOICE_LEVEL`] divided
//! by the number of arms that could have been the challenger, since it is the best of them).
//! A significant lead ships the challenger; anything else ships the reference.

use super::stage::{Stage, StageContext};
use super::{Arm, ArmSummary, PipelineError, Result};
use crate::data::{holdout_indices, DatasetSpec, ImageSource, Split};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The family-wise level of the choice: a searched arm replaces the reference only when the
/// chance that a lead this large arose by noise alone is below it (chosen from the replay of
/// the committed studies, docs/RESULTS.md).
pub const CHOICE_LEVEL: f64 = 0.05;

/// Every arm's top-1 class on each held-out validation image, in the held-out draw's order.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ValidationPredictions {
    pub labels: Vec<i64>,
    /// By arm name: the predicted class of each image.
    pub arms: BTreeMap<String, Vec<i64>>,
    /// The checkpoint each arm's predictions came from.
    #[serde(default)]
    pub checkpoints: BTreeMap<String, PathBuf>,
}

impl ValidationPredictions {
    pub fn read(path: &Path) -> Option<Self> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }

    /// Each checkpoint's top-1 class on the `holdout` validation images of `data`'s train
    /// split (the draw every fine-tuning held out), evaluated as its fine-tuning evaluated
    /// them.
    pub fn evaluate(
        arms: &[(Arm, PathBuf)],
        data: &str,
        holdout: usize,
        device: tch::Device,
    ) -> Result<Self> {
        let what = || format!("validation images of {data}");
        let spec: DatasetSpec = data.parse().map_err(super::context(what()))?;
        let source = spec.load(Split::Train).map_err(super::context(what()))?;
        let indices = holdout_indices(source.as_ref(), holdout).map_err(super::context(what()))?;
        let source: Arc<dyn ImageSource> = source;
        let mut out = ValidationPredictions {
            labels: indices.iter().map(|&i| source.label(i)).collect(),
            ..Default::default()
        };
        for (arm, ck) in arms {
            let (loaded, network) = crate::quant::load(ck, device)?;
            let (_, predicted) = crate::train::evaluate_with_predictions(
                &network,
                source.clone(),
                &indices,
                &loaded.meta.eval_pipeline,
                256,
                device,
            )?;
            out.arms.insert(arm.name().to_string(), predicted);
            out.checkpoints.insert(arm.name().to_string(), ck.clone());
        }
        Ok(out)
    }

    /// The share of images exactly one of `a` and `b` gets right (the pair's discordance).
    pub fn discordance(&self, a: Arm, b: Arm) -> Option<f64> {
        let (x, y) = (self.correct(a)?, self.correct(b)?);
        let n = x.len().max(1) as f64;
        Some(x.iter().zip(&y).filter(|(p, q)| p != q).count() as f64 / n)
    }

    /// Which images `arm` classifies right (`None`: not recorded, or a different length).
    fn correct(&self, arm: Arm) -> Option<Vec<bool>> {
        let p = self.arms.get(arm.name())?;
        (p.len() == self.labels.len())
            .then(|| p.iter().zip(&self.labels).map(|(a, b)| a == b).collect())
    }
}

/// A challenger's lead over the reference on the same validation images.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Lead {
    pub challenger: Arm,
    pub reference: Arm,
    pub images: usize,
    /// Images only the challenger classifies right, and only the reference.
    pub challenger_only: usize,
    pub reference_only: usize,
    /// `(challenger_only − reference_only)/images`, in points.
    pub lead: f64,
    /// Half-width of its 95 % interval (normal approximation of the paired difference), in
    /// points: the noise band of this validation split for these two arms.
    pub band: f64,
    /// One-sided exact McNemar p-value of a lead at least this large by chance.
    pub p_value: f64,
    /// The level it was held to: [`CHOICE_LEVEL`] over the arms that could have led.
    pub level: f64,
}

impl Lead {
    pub fn significant(&self) -> bool {
        self.p_value < self.level
    }
}

/// The decision and why.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Choice {
    pub chosen: Arm,
    /// The simplest policy for the budget, kept unless beaten.
    pub reference: Arm,
    /// The best arm on validation weighed against the reference (none when it is the
    /// reference).
    pub lead: Option<Lead>,
    /// One line: the lead, its band and the verdict.
    pub reason: String,
    /// A warning when the band is wider than the arms' spread on validation: the split cannot
    /// separate them (hold out more images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// `P(X ≥ k)` for `X ~ Binomial(n, 1/2)`, summed in log space (n up to the split's size).
fn binomial_tail(n: usize, k: usize) -> f64 {
    if k == 0 {
        return 1.0;
    }
    if k > n {
        return 0.0;
    }
    let ln_half = (0.5f64).ln() * n as f64;
    // ln C(n, i) built up from i = 0.
    let mut ln_c = 0.0f64;
    let mut total = 0.0f64;
    for i in 0..=n {
        if i > 0 {
            ln_c += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        if i >= k {
            total += (ln_c + ln_half).exp();
        }
    }
    total.min(1.0)
}

/// The order in which simpler policies win ties: uniform, uniform-fill, then the arms' order.
fn simplicity(arm: Arm) -> u8 {
    match arm {
        Arm::Uniform => 0,
        Arm::UniformFill => 1,
        _ => 2,
    }
}

/// The reference: uniform-fill where it differs from uniform (between grid points), else
/// uniform, else uniform-fill; `None` when the run has neither.
pub fn reference_arm(arms: &[Arm], fill_is_uniform: bool) -> Option<Arm> {
    let has = |a: Arm| arms.contains(&a);
    match (has(Arm::Uniform), has(Arm::UniformFill)) {
        (true, true) if fill_is_uniform => Some(Arm::Uniform),
        (_, true) => Some(Arm::UniformFill),
        (true, false) => Some(Arm::Uniform),
        (false, false) => None,
    }
}

/// The paired comparison of `challenger` and `reference` on the recorded images.
pub fn lead(
    predictions: &ValidationPredictions,
    challenger: Arm,
    reference: Arm,
    rivals: usize,
) -> Option<Lead> {
    let (c, r) = (
        predictions.correct(challenger)?,
        predictions.correct(reference)?,
    );
    let n = c.len();
    if n == 0 {
        return None;
    }
    let only_c = c.iter().zip(&r).filter(|(a, b)| **a && !**b).count();
    let only_r = c.iter().zip(&r).filter(|(a, b)| !**a && **b).count();
    let nf = n as f64;
    let d = (only_c as f64 - only_r as f64) / nf;
    let var = ((only_c + only_r) as f64 / nf - d * d).max(0.0) / nf;
    Some(Lead {
        challenger,
        reference,
        images: n,
        challenger_only: only_c,
        reference_only: only_r,
        lead: 100.0 * d,
        band: 100.0 * 1.96 * var.sqrt(),
        p_value: binomial_tail(only_c + only_r, only_c),
        level: CHOICE_LEVEL / rivals.max(1) as f64,
    })
}

/// The arm a run ships ([`Choice`]); `None` when no arm has a validation score. Without
/// recorded predictions (runs made before them) the arm best on validation, ties to the
/// simpler policy.
pub fn choose(
    arms: &[ArmSummary],
    predictions: Option<&ValidationPredictions>,
    fill_is_uniform: bool,
) -> Option<Choice> {
    let scored: Vec<(usize, &ArmSummary, f64)> = arms
        .iter()
        .enumerate()
        .filter_map(|(i, a)| a.val_top1.map(|v| (i, a, v)))
        .collect();
    // Best on validation; ties to the simpler policy, then to the earlier arm.
    let best = scored
        .iter()
        .max_by(|x, y| {
            x.2.total_cmp(&y.2)
                .then(simplicity(y.1.arm).cmp(&simplicity(x.1.arm)))
                .then(y.0.cmp(&x.0))
        })?
        .1
        .arm;
    let names: Vec<Arm> = scored.iter().map(|(_, a, _)| a.arm).collect();
    let reference = reference_arm(&names, fill_is_uniform);
    // A choice made without weighing a lead: `chosen` is the best on validation.
    let unweighed = |chosen: Arm, reference: Arm, why: &str| {
        Some(Choice {
            chosen,
            reference,
            lead: None,
            reason: format!("{} best on validation{why}", chosen.label()),
            warning: None,
        })
    };
    let (Some(reference), Some(p)) = (reference, predictions) else {
        let why = " (no per-image validation predictions recorded: no noise band)";
        return unweighed(best, reference.unwrap_or(best), why);
    };
    if best == reference {
        return unweighed(reference, reference, "");
    }
    let rivals = names.len().saturating_sub(1);
    let Some(l) = lead(p, best, reference, rivals) else {
        let why = " (its per-image predictions are missing: no noise band)";
        return unweighed(best, reference, why);
    };
    let chosen = if l.significant() { best } else { reference };
    let verdict = if l.significant() {
        format!("significant, {} chosen", best.label())
    } else {
        format!("not significant, {} kept", reference.label())
    };
    let reason = format!(
        "{} {:+.2} ± {:.2} points over {} on {} validation images ({} vs {} images only one \
         of them gets right, p = {:.3} {} {:.4}): {verdict}",
        best.label(),
        l.lead,
        l.band,
        reference.label(),
        l.images,
        l.challenger_only,
        l.reference_only,
        l.p_value,
        if l.significant() { "<" } else { "≥" },
        l.level
    );
    let spread = scored.iter().map(|s| s.2).fold(f64::MIN, f64::max)
        - scored.iter().map(|s| s.2).fold(f64::MAX, f64::min);
    let warning = (l.band > spread.max(l.lead.abs())).then(|| {
        format!(
            "the validation band (±{:.2} points) is wider than the arms' spread ({spread:.2}): \
             {} images cannot separate them; hold out more (--target-holdout)",
            l.band, l.images
        )
    });
    Some(Choice {
        chosen,
        reference,
        lead: Some(l),
        reason,
        warning,
    })
}

/// Every fine-tuned arm's top-1 class on the target's held-out validation images, recorded in
/// `validation.json` for the choice. Done when the file holds every arm's predictions from
/// its current checkpoint.
#[derive(Debug, Clone, Serialize)]
pub struct ValidateStage {
    /// Each arm and its fine-tuned checkpoint.
    pub arms: Vec<(Arm, PathBuf)>,
    pub data: String,
    pub holdout: usize,
    pub out: PathBuf,
}

impl Stage for ValidateStage {
    fn identity(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    fn name(&self) -> String {
        "validate".into()
    }

    fn command(&self) -> String {
        format!(
            "(in gmpq) every fine-tuned arm's top-1 class on the {} held-out validation images \
             of {} → {}",
            self.holdout,
            self.data,
            self.out.display()
        )
    }

    fn done(&self) -> Result<bool> {
        Ok(ValidationPredictions::read(&self.out).is_some_and(|p| {
            self.arms.iter().all(|(arm, ck)| {
                p.arms
                    .get(arm.name())
                    .is_some_and(|v| v.len() == self.holdout)
                    && p.checkpoints.get(arm.name()) == Some(ck)
            })
        }))
    }

    fn run(&self, ctx: &StageContext) -> Result<String> {
        let out =
            ValidationPredictions::evaluate(&self.arms, &self.data, self.holdout, ctx.device)?;
        let bytes = serde_json::to_vec(&out)
            .map_err(|e| PipelineError::Invalid(format!("validation.json: {e}")))?;
        crate::files::write_atomic(&self.out, &bytes).map_err(|source| PipelineError::Write {
            path: self.out.clone(),
            source,
        })?;
        Ok(format!(
            "{}: {} arms on {} images",
            self.out.display(),
            out.arms.len(),
            out.labels.len()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(arm: Arm, val: f64) -> ArmSummary {
        ArmSummary {
            val_top1: Some(val),
            ..ArmSummary::new(arm)
        }
    }

    /// `n` images, all of class 0; `arm` gets `right` of them right, starting at `from`.
    fn record(p: &mut ValidationPredictions, arm: Arm, n: usize, from: usize, right: usize) {
        p.labels = vec![0; n];
        let v = (0..n)
            .map(|i| i64::from(!(from..from + right).contains(&i)))
            .collect();
        p.arms.insert(arm.name().to_string(), v);
    }

    #[test]
    fn the_binomial_tail_is_exact() {
        assert_eq!(binomial_tail(0, 0), 1.0);
        assert!((binomial_tail(4, 4) - 1.0 / 16.0).abs() < 1e-12);
        assert!((binomial_tail(4, 3) - 5.0 / 16.0).abs() < 1e-12);
        // 21 discordant images, 12 to the challenger: p ≈ 0.332.
        assert!((binomial_tail(21, 12) - 0.33182).abs() < 1e-4);
        assert!(binomial_tail(2000, 1200) < 1e-15);
    }

    /// A handful of images apart on 1,000: the simpler policy is kept, and the record says why.
    #[test]
    fn a_lead_within_the_noise_keeps_the_simpler_policy() {
        let mut p = ValidationPredictions::default();
        // uniform-fill right on images 0..925, GMPQ on 3..931: 6 images against 3.
        record(&mut p, Arm::UniformFill, 1000, 0, 925);
        record(&mut p, Arm::Gmpq, 1000, 3, 928);
        record(&mut p, Arm::Uniform, 1000, 0, 920);
        let arms = [
            summary(Arm::Gmpq, 92.8),
            summary(Arm::Uniform, 92.0),
            summary(Arm::UniformFill, 92.5),
        ];
        let c = choose(&arms, Some(&p), false).unwrap();
        assert_eq!(c.reference, Arm::UniformFill);
        assert_eq!(c.chosen, Arm::UniformFill, "{}", c.reason);
        let l = c.lead.unwrap();
        assert_eq!(l.challenger, Arm::Gmpq);
        assert!(!l.significant() && l.band > l.lead.abs(), "{l:?}");
        assert!(
            c.reason.contains("not significant, uniform-fill kept"),
            "{}",
            c.reason
        );
    }

    /// 60 images more right and none fewer: the searched arm is chosen.
    #[test]
    fn a_clear_lead_chooses_the_searched_arm() {
        let mut p = ValidationPredictions::default();
        record(&mut p, Arm::UniformFill, 1000, 0, 850);
        record(&mut p, Arm::Gmpq, 1000, 0, 910);
        let arms = [summary(Arm::Gmpq, 91.0), summary(Arm::UniformFill, 85.0)];
        let c = choose(&arms, Some(&p), false).unwrap();
        assert_eq!(c.chosen, Arm::Gmpq, "{}", c.reason);
        assert!(c.lead.unwrap().significant());
        assert!(
            c.reason.contains("significant, GMPQ chosen"),
            "{}",
            c.reason
        );
    }

    /// At a grid budget uniform-fill is uniform: the reference is uniform; ties on validation
    /// go to the simpler policy; without predictions the best arm wins as before.
    #[test]
    fn ties_and_the_reference_follow_the_stated_order() {
        let arms = [
            summary(Arm::Gmpq, 92.0),
            summary(Arm::Uniform, 92.0),
            summary(Arm::UniformFill, 92.0),
        ];
        assert_eq!(
            reference_arm(&[Arm::Gmpq, Arm::Uniform, Arm::UniformFill], true),
            Some(Arm::Uniform)
        );
        assert_eq!(
            reference_arm(&[Arm::Gmpq, Arm::Uniform, Arm::UniformFill], false),
            Some(Arm::UniformFill)
        );
        assert_eq!(reference_arm(&[Arm::Gmpq, Arm::Edmips], false), None);
        let c = choose(&arms, None, true).unwrap();
        assert_eq!(c.chosen, Arm::Uniform);
        let c = choose(
            &[summary(Arm::Gmpq, 93.0), summary(Arm::Uniform, 92.0)],
            None,
            true,
        )
        .unwrap();
        assert_eq!(c.chosen, Arm::Gmpq);
        assert!(c.reason.contains("no noise band"), "{}", c.reason);
        assert!(choose(&[], None, true).is_none());
        // Two searches tied (GMPQ and EdMIPS at 86.90 % in a demo): the arms' order, GMPQ
        // first.
        let tie = [summary(Arm::Gmpq, 86.9), summary(Arm::Edmips, 86.9)];
        assert_eq!(choose(&tie, None, true).unwrap().chosen, Arm::Gmpq);
        let tie = [summary(Arm::Edmips, 86.9), summary(Arm::Gmpq, 86.9)];
        assert_eq!(choose(&tie, None, true).unwrap().chosen, Arm::Edmips);
    }
}
