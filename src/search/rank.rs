//! Candidates ranked by where fine-tuning starts.
//!
//! The supernet never sees the network that fine-tuning starts from: a policy that gives a
//! sensitive layer 2-bit weights can be the most probable under α and still calibrate to
//! chance. So instead of taking the single best knapsack solution, the ranking takes a few
//! feasible candidates — the knapsack's best under α, the best solutions that differ from it
//! in one layer's weight or activation bits, the best uniform policy and any others given
//! (uniform-fill) — builds each from the teacher's full-precision weights, calibrates it
//! without training, and scores its top-1 on held-out proxy images. The search's own policy
//! (α's best) is kept unless another candidate beats it by more than those images can
//! resolve ([`resolvable_gain`]): at budgets where every candidate calibrates to chance the
//! scores are noise, and choosing by them would trade the search's preference for a coin
//! toss. Every candidate and its score go into the policy's provenance (`meta.ranking`).
//!
//! The held-out images come from the proxy (its test split), not the target: the method's
//! premise is that the search sees only the proxy and its teacher, and the ranking is part of
//! the search. The target's training data is for the fine-tuned models' validation (the
//! pipeline's chosen model); its test set is never used to choose anything.

use super::budget::{Geometry, Preferences, Target};
use super::extract::{knapsack_policy, log_softmax, spend_budget, ExtractionError};
pub use super::provenance::RankedCandidate;
use super::{Result, SearchError};
use crate::checkpoint::Checkpoint;
use crate::data::{DataLoader, ImageSource, LoaderConfig};
use crate::policy::Policy;
use crate::quant::{self, CalibrationMethod, Precision};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// Candidates from α besides the knapsack's best.
pub const ALPHA_ALTERNATIVES: usize = 5;
/// Proxy training images each candidate is calibrated on.
pub const CALIBRATION_IMAGES: usize = 256;

/// The knapsack's best policy under `target` and up to `alternatives` of the best policies
/// that differ from it in one layer's weight or in one layer's activation bits (the second
/// best is always among them: it differs from the best somewhere). Each solved at the same
/// price on unused budget as the best, so each spends the budget as the best does.
pub fn alpha_candidates(
    template: &Policy,
    geometry: &Geometry,
    target: &Target,
    prefs: &Preferences,
    alternatives: usize,
) -> std::result::Result<Vec<(String, Policy)>, ExtractionError> {
    prefs
        .check(&geometry.layers, &template.candidates)
        .map_err(ExtractionError::Invalid)?;
    let cands = &template.candidates;
    let values = |name: &str, table: &BTreeMap<String, Vec<f64>>| {
        log_softmax(
            table.get(name).map_or(&[][..], Vec::as_slice),
            prefs.temperature,
        )
    };
    // Excluded (layer, weights?, bits): that option gets a value no solution takes.
    let solve = |price: f64, excluded: Option<(&str, bool, u32)>| {
        knapsack_policy(template, geometry, target, price, |layer| {
            let mut vw = values(&layer.name, &prefs.alpha_w);
            let mut va = values(&layer.name, &prefs.alpha_a);
            if let Some((name, weights, bits)) = excluded {
                if name == layer.name {
                    let (v, set) = if weights {
                        (&mut vw, &cands.weight)
                    } else {
                        (&mut va, &cands.activation)
                    };
                    if let Some(i) = set.iter().position(|&b| b == bits) {
                        v[i] = -1e12;
                    }
                }
            }
            Ok((vw, va))
        })
    };
    let (best, price) = spend_budget(geometry, target, cands, |p| solve(p, None))?;
    let score = |p: &Policy| alpha_log_prob(p, prefs);
    let mut others: Vec<(f64, String, Policy)> = Vec::new();
    for l in &best.layers {
        if !geometry.layers.iter().any(|g| g.name == l.name) {
            continue;
        }
        for (weights, bits, kind) in [
            (true, l.w_bits, "weights"),
            (false, l.a_bits, "activations"),
        ] {
            // A layer whose only candidate is this one has no alternative.
            let Ok(p) = solve(price, Some((&l.name, weights, bits))) else {
                continue;
            };
            let changed = p.layers.iter().zip(&best.layers).any(|(a, b)| a != b);
            if changed && geometry.policy_cost(target, &p) <= geometry.limit(target) * (1.0 + 1e-9)
            {
                others.push((score(&p), format!("alpha, {} {kind} ≠ {bits}", l.name), p));
            }
        }
    }
    // The most preferred first; the same policy reached twice counts once.
    others.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut out = vec![("alpha".to_string(), best)];
    for (_, source, p) in others {
        if out.len() > alternatives {
            break;
        }
        if !out.iter().any(|(_, q)| q.layers == p.layers) {
            out.push((source, p));
        }
    }
    Ok(out)
}

/// Σ over layers of log softmax(α/T) at the policy's bits (0 where α is missing).
pub fn alpha_log_prob(policy: &Policy, prefs: &Preferences) -> f64 {
    let c = &policy.candidates;
    policy
        .layers
        .iter()
        .map(|l| {
            let pick = |table: &BTreeMap<String, Vec<f64>>, set: &[u32], bits: u32| {
                let lp = log_softmax(
                    table.get(&l.name).map_or(&[][..], Vec::as_slice),
                    prefs.temperature,
                );
                set.iter()
                    .position(|&b| b == bits)
                    .and_then(|i| lp.get(i).copied())
                    .unwrap_or(0.0)
            };
            pick(&prefs.alpha_w, &c.weight, l.w_bits)
                + pick(&prefs.alpha_a, &c.activation, l.a_bits)
        })
        .sum()
}

/// What the candidates are built, calibrated and scored with.
pub struct RankingData<'a> {
    pub teacher_path: &'a Path,
    pub teacher: &'a Checkpoint,
    /// Proxy images: calibration comes from `calib_indices`, the score from `val_indices`.
    pub proxy: Arc<dyn ImageSource>,
    pub calib_indices: &'a [usize],
    pub val_indices: &'a [usize],
    pub calibration: CalibrationMethod,
    pub device: tch::Device,
}

/// The calibration images, decoded and prepared once for every candidate.
fn calibration_batches(data: &RankingData) -> Result<Vec<tch::Tensor>> {
    let loader = DataLoader::new(
        data.proxy.clone(),
        data.calib_indices,
        Arc::new(data.teacher.meta.eval_pipeline.clone()),
        LoaderConfig {
            batch_size: 256,
            ..Default::default()
        },
        0,
    )?;
    Ok(loader
        .map(|b| b.map(|b| b.images))
        .collect::<std::result::Result<_, _>>()?)
}

/// Top-1 of `policy` built from the teacher's weights and calibrated on `batches`, without
/// training.
fn calibrated_top1(policy: &Policy, data: &RankingData, batches: &[tch::Tensor]) -> Result<f64> {
    let network = quant::build(
        &data.teacher.meta.model,
        Precision::Fixed {
            policy: policy.clone(),
            per_channel: false,
            numerics: crate::quant::Numerics::FakeQuant,
        },
        data.device,
    )?;
    network.load_fp_weights(data.teacher, data.teacher_path)?;
    quant::calibrate(&network, batches, data.calibration)?;
    let m = crate::train::evaluate(
        &network.net,
        data.proxy.clone(),
        data.val_indices,
        &data.teacher.meta.eval_pipeline,
        256,
        data.device,
    )?;
    Ok(m.top1)
}

/// z of the one-sided test a candidate's gain over the search's own policy must pass.
pub const RESOLVABLE_Z: f64 = 2.0;

/// The smallest top-1 gain (in points) over a policy scoring `base` % that `images` held-out
/// images resolve: `z·√(2·p(1−p)/n)` for two proportions near `p`, with `p` the mean of the
/// two scores.
pub fn resolvable_gain(base: f64, best: f64, images: usize) -> f64 {
    let p = ((base + best) / 200.0).clamp(0.0, 1.0);
    100.0 * RESOLVABLE_Z * (2.0 * p * (1.0 - p) / images.max(1) as f64).sqrt()
}

/// The candidate to keep from their scores (the first is the search's own): the best (ties:
/// the earlier, i.e. the more preferred by α) when its gain over the first is resolvable on
/// `images` images, else the first.
pub fn choose(scores: &[f64], images: usize) -> usize {
    let best = best_score(scores);
    match scores.first() {
        Some(&base) if scores[best] - base > resolvable_gain(base, scores[best], images) => best,
        _ => 0,
    }
}

/// The index of the best score (ties: the earlier); 0 for none.
fn best_score(scores: &[f64]) -> usize {
    let mut best = 0;
    for (i, s) in scores.iter().enumerate() {
        if *s > scores[best] {
            best = i;
        }
    }
    best
}

/// Scores every candidate (the first is the search's own) and returns the one [`choose`]
/// keeps, with the record of every candidate, in the order given.
pub fn rank(
    candidates: Vec<(String, Policy)>,
    prefs: &Preferences,
    geometry: &Geometry,
    data: &RankingData,
) -> Result<(Policy, super::RankingRecord)> {
    let model = &data.teacher.meta.model;
    let net = quant::build(model, Precision::Full, tch::Device::Cpu)?;
    let batches = calibration_batches(data)?;
    let mut records = Vec::new();
    for (source, policy) in &candidates {
        policy.validate(model, net.net.convs())?;
        let top1 = calibrated_top1(policy, data, &batches)?;
        let p = policy
            .clone()
            .with_totals(net.net.convs(), net.net.fc_spec());
        let totals = p
            .totals
            .as_ref()
            .ok_or_else(|| SearchError::Invalid("a candidate has no totals".into()))?;
        records.push(RankedCandidate {
            source: source.clone(),
            bops: totals.bops,
            compression: totals.compression,
            val_top1: top1,
            alpha_log_prob: alpha_log_prob(policy, prefs),
            bits: p
                .layers
                .iter()
                .filter(|l| geometry.layers.iter().any(|g| g.name == l.name))
                .map(|l| format!("{}/{}", l.w_bits, l.a_bits))
                .collect(),
        });
    }
    if records.is_empty() {
        return Err(SearchError::Invalid("no candidate to rank".into()));
    }
    let scores: Vec<f64> = records.iter().map(|r| r.val_top1).collect();
    let i = choose(&scores, data.val_indices.len());
    Ok((
        candidates[i].1.clone(),
        super::RankingRecord {
            candidates: records,
            chosen: i,
            val_images: data.val_indices.len(),
            calib_images: data.calib_indices.len(),
            min_gain: Some(resolvable_gain(
                scores[0],
                scores[best_score(&scores)],
                data.val_indices.len(),
            )),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Arch, ConvSpec, LinearSpec, ModelConfig};
    use crate::policy::Candidates;

    fn setup() -> (Policy, Geometry, Preferences) {
        let conv = |name: &str, c: usize, q: bool| ConvSpec {
            name: name.into(),
            in_channels: c,
            out_channels: c,
            kernel: 3,
            stride: 1,
            padding: 1,
            groups: 1,
            in_hw: [8, 8],
            out_hw: [8, 8],
            quantizable: q,
            signed_input: false,
        };
        let convs = vec![
            conv("stem", 8, false),
            conv("a", 8, true),
            conv("b", 16, true),
        ];
        let fc = LinearSpec {
            name: "fc".into(),
            in_features: 16,
            out_features: 10,
            hidden: Vec::new(),
        };
        let cfg = ModelConfig::new(Arch::ResNet20, 1, 10, 8);
        let mut template = Policy::uniform(&cfg, &convs, 2, 2);
        template.candidates = Candidates::new(&[2, 4], &[2, 4]).unwrap();
        let alpha: BTreeMap<String, Vec<f64>> = [
            ("a".to_string(), vec![0.0, 2.0]),
            ("b".to_string(), vec![0.0, 1.0]),
        ]
        .into();
        let prefs = Preferences {
            alpha_w: alpha.clone(),
            alpha_a: alpha,
            temperature: 1.0,
            bits: None,
        };
        (template, Geometry::new(&convs, &fc), prefs)
    }

    /// Scores the held-out images cannot tell apart keep the search's own policy; a gain
    /// beyond the noise takes the better candidate.
    #[test]
    fn the_ranking_moves_only_on_a_resolvable_gain() {
        // Every candidate near chance (the 2-bit budgets of the studies): noise.
        assert_eq!(choose(&[9.8, 12.0, 9.8, 9.6], 500), 0);
        assert_eq!(choose(&[11.6, 11.0, 11.2, 9.8, 12.4], 500), 0);
        // One that calibrates: taken.
        assert_eq!(choose(&[4.6, 10.6, 57.2, 55.2], 500), 2);
        assert_eq!(choose(&[21.8, 27.0, 30.8], 500), 2);
        // The margin shrinks with more images.
        assert!(resolvable_gain(10.0, 12.0, 500) > 3.0);
        assert!(resolvable_gain(10.0, 12.0, 50_000) < 0.5);
        assert_eq!(choose(&[10.0, 12.0], 50_000), 1);
        assert_eq!(choose(&[], 500), 0);
    }

    #[test]
    fn alternatives_are_feasible_distinct_and_led_by_the_best() {
        let (template, geometry, prefs) = setup();
        let n = geometry.layers.len();
        // Room for 4-bit weights and activations in one of the two layers.
        let target = Target::Bops(
            geometry
                .bops(&[(4.0, 4.0), (2.0, 2.0)][..n])
                .max(geometry.bops(&[(2.0, 2.0), (4.0, 4.0)][..n])),
        );
        let c = alpha_candidates(&template, &geometry, &target, &prefs, 5).unwrap();
        assert_eq!(c[0].0, "alpha");
        assert!(
            c.len() >= 2,
            "{:?}",
            c.iter().map(|x| &x.0).collect::<Vec<_>>()
        );
        for (i, (_, p)) in c.iter().enumerate() {
            assert!(geometry.policy_cost(&target, p) <= geometry.limit(&target) * (1.0 + 1e-9));
            for (_, q) in &c[..i] {
                assert_ne!(p.layers, q.layers);
            }
        }
        // The best is the most preferred among the policies that spend as much (the price on
        // unused budget may trade preference for spending).
        let best = alpha_log_prob(&c[0].1, &prefs);
        let spent = geometry.policy_cost(&target, &c[0].1);
        assert!(c[1..]
            .iter()
            .all(|(_, p)| alpha_log_prob(p, &prefs) <= best + 1e-12
                || geometry.policy_cost(&target, p) < spent));
    }
}
