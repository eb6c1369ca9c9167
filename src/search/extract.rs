//! Extraction: how a policy is taken from the search's final α under a budget. Each rule is a
//! type behind one trait ([`Extraction`]), chosen by name ([`ExtractionRule`]), so the next
//! rule is a new type rather than a new branch (the shape of NNCF's `precision_init`).
//!
//! - [`Knapsack`]: the exact multiple-choice knapsack. One `(w, a)` pair per layer maximising
//!   `Σ_l log π_w,l(w) + log π_a,l(a)` (π = softmax of the final α) subject to the budget.
//! - [`ArgmaxRepair`]: per-layer argmax, then the greedy repair of [`super::repair`] (the
//!   reference-style extraction gmpq used before).

use super::budget::{repair, Geometry, Preferences, Target};
use crate::model::ConvSpec;
use crate::policy::{Candidates, Policy};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// The extraction rules, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum ExtractionRule {
    /// Exact multiple-choice knapsack over the softmax log-probabilities.
    #[default]
    Knapsack,
    /// Argmax per layer, then the greedy single-step repair toward the budget.
    ArgmaxRepair,
}

impl ExtractionRule {
    pub fn strategy(self) -> Box<dyn Extraction> {
        match self {
            ExtractionRule::Knapsack => Box::new(Knapsack),
            ExtractionRule::ArgmaxRepair => Box::new(ArgmaxRepair),
        }
    }
}

impl std::fmt::Display for ExtractionRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ExtractionRule::Knapsack => "knapsack",
            ExtractionRule::ArgmaxRepair => "argmax-repair",
        })
    }
}

impl std::str::FromStr for ExtractionRule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "knapsack" => Ok(Self::Knapsack),
            "argmax-repair" => Ok(Self::ArgmaxRepair),
            _ => Err(format!(
                "unknown extraction rule {s:?} (knapsack or argmax-repair)"
            )),
        }
    }
}

/// Why no policy could be extracted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExtractionError {
    /// The budget is below the cheapest policy the candidates allow.
    #[error(
        "budget {target} cannot be met: the cheapest policy (every layer at w{w}a{a}) costs {cheapest}"
    )]
    Infeasible {
        target: Target,
        w: u32,
        a: u32,
        /// The cheapest cost, in the target's own terms (e.g. "0.0611 G BOPs, 520.3× compression").
        cheapest: String,
    },
    #[error("{0}")]
    Invalid(String),
}

/// A rule that turns final architecture preferences into a policy meeting a budget.
pub trait Extraction {
    fn rule(&self) -> ExtractionRule;
    /// `template` names the layers and candidates; its bits are replaced.
    fn extract(
        &self,
        template: &Policy,
        geometry: &Geometry,
        target: Option<&Target>,
        prefs: &Preferences,
    ) -> Result<Policy, ExtractionError>;
}

/// The argmax of α per layer (ties to the lowest bitwidth), repaired toward the budget.
pub struct ArgmaxRepair;

impl Extraction for ArgmaxRepair {
    fn rule(&self) -> ExtractionRule {
        ExtractionRule::ArgmaxRepair
    }

    fn extract(
        &self,
        template: &Policy,
        geometry: &Geometry,
        target: Option<&Target>,
        prefs: &Preferences,
    ) -> Result<Policy, ExtractionError> {
        let mut policy = argmax_policy(template, prefs);
        if let Some(t) = target {
            check_feasible(geometry, t, &template.candidates)?;
            repair(&mut policy, geometry, t, prefs);
        }
        Ok(policy)
    }
}

/// Per layer, the candidate with the largest logit; ties go to the first (lowest) bitwidth.
pub fn argmax_policy(template: &Policy, prefs: &Preferences) -> Policy {
    let pick = |set: &[u32], logits: Option<&Vec<f64>>| -> u32 {
        let Some(v) = logits else { return set[0] };
        let i = (0..v.len().min(set.len())).fold(0, |b, i| if v[i] > v[b] { i } else { b });
        set[i]
    };
    let mut p = template.clone();
    for l in &mut p.layers {
        l.w_bits = pick(&p.candidates.weight, prefs.alpha_w.get(&l.name));
        l.a_bits = pick(&p.candidates.activation, prefs.alpha_a.get(&l.name));
    }
    p
}

/// The exact multiple-choice knapsack over `log softmax(α)`.
pub struct Knapsack;

/// `log softmax(v/T)`, computed stably.
pub(super) fn log_softmax(v: &[f64], temperature: f64) -> Vec<f64> {
    let t = if temperature > 0.0 { temperature } else { 1.0 };
    let v: Vec<f64> = v.iter().map(|x| x / t).collect();
    let m = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = v.iter().map(|x| (x - m).exp()).sum();
    v.iter().map(|x| x - m - z.ln()).collect()
}

impl Extraction for Knapsack {
    fn rule(&self) -> ExtractionRule {
        ExtractionRule::Knapsack
    }

    fn extract(
        &self,
        template: &Policy,
        geometry: &Geometry,
        target: Option<&Target>,
        prefs: &Preferences,
    ) -> Result<Policy, ExtractionError> {
        let Some(target) = target else {
            // No budget: the knapsack's optimum is the per-layer argmax.
            return Ok(argmax_policy(template, prefs));
        };
        // log softmax(α/T) of one layer's table; equal preferences where α is missing.
        let log_probs = |table: &BTreeMap<String, Vec<f64>>, name: &str, n: usize| {
            let alpha = table.get(name).cloned().unwrap_or_else(|| vec![0.0; n]);
            log_softmax(&alpha, prefs.temperature)
        };
        let cands = &template.candidates;
        let at_price = |price: f64| {
            knapsack_policy(template, geometry, target, price, |layer| {
                Ok((
                    log_probs(&prefs.alpha_w, &layer.name, cands.weight.len()),
                    log_probs(&prefs.alpha_a, &layer.name, cands.activation.len()),
                ))
            })
        };
        spend_budget(geometry, target, cands, at_price).map(|(p, _)| p)
    }
}

/// The share of a binding budget the knapsack policy spends at least (when a policy can).
pub const SPEND_FLOOR: f64 = 0.99;

/// The budget is a target to spend, not only a ceiling (issue: "the search must spend the
/// budget; the losses decide where"). The most probable policy under the budget can fall well
/// short of it when α leans to the lowest bits (at 171× on ResNet-20 it stopped at 182×). So
/// unused budget gets a price κ: the knapsack maximises Σ log π + κ·cost/limit, with the
/// smallest κ (found by doubling, then bisection) whose policy spends at least
/// [`SPEND_FLOOR`] of the budget. The extra bits go where they cost the least probability.
/// A budget above the costliest policy does not bind, and κ stays 0.
pub(super) fn spend_budget(
    geometry: &Geometry,
    target: &Target,
    cands: &Candidates,
    at_price: impl Fn(f64) -> Result<Policy, ExtractionError>,
) -> Result<(Policy, f64), ExtractionError> {
    let limit = geometry.limit(target);
    let (w_max, a_max) = (
        cands.weight.iter().copied().max().unwrap_or(2) as f64,
        cands.activation.iter().copied().max().unwrap_or(2) as f64,
    );
    let costliest = geometry.measure(target, &vec![(w_max, a_max); geometry.layers.len()]);
    let floor = SPEND_FLOOR * limit;
    let spends = |p: &Policy| geometry.policy_cost(target, p) >= floor;
    let first = at_price(SPEND_TIE_BREAK)?;
    if costliest <= limit || spends(&first) {
        return Ok((first, SPEND_TIE_BREAK));
    }
    // Double κ until the policy spends enough (or κ dwarfs any log-probability gap).
    let (mut lo, mut hi) = (0.0, 1.0);
    let mut best = at_price(hi)?;
    while !spends(&best) && hi < 1e9 {
        lo = hi;
        hi *= 2.0;
        best = at_price(hi)?;
    }
    if !spends(&best) {
        return Ok((best, hi));
    }
    for _ in 0..40 {
        let mid = 0.5 * (lo + hi);
        let p = at_price(mid)?;
        if spends(&p) {
            hi = mid;
            best = p;
        } else {
            lo = mid;
        }
    }
    Ok((best, hi))
}

/// The policy of greatest total value within `target` (the exact knapsack): one `(w, a)`
/// pair per quantized layer, worth `values_w[i] + values_a[j]` for the candidates
/// `weight[i]`, `activation[j]`, where `layer_values` gives a layer's two value lists. A
/// bonus of `spend`·cost/limit, far below any real difference in value, makes equally
/// valued policies spend more of the budget.
pub(super) fn knapsack_policy(
    template: &Policy,
    geometry: &Geometry,
    target: &Target,
    spend: f64,
    mut layer_values: impl FnMut(&ConvSpec) -> Result<(Vec<f64>, Vec<f64>), ExtractionError>,
) -> Result<Policy, ExtractionError> {
    check_feasible(geometry, target, &template.candidates)?;
    let cands = &template.candidates;
    let limit = geometry.limit(target);
    // One item group per quantized layer, in geometry order: every (w, a) pair with its cost
    // (the layer's share of the budgeted quantity) and value.
    let mut groups = Vec::with_capacity(geometry.layers.len());
    let mut pairs = Vec::with_capacity(geometry.layers.len());
    for layer in &geometry.layers {
        let (vw, va) = layer_values(layer)?;
        let mut items = Vec::new();
        let mut bits = Vec::new();
        for (i, &w) in cands.weight.iter().enumerate() {
            for (j, &a) in cands.activation.iter().enumerate() {
                let cost = geometry.layer_cost(target, layer, w as f64, a as f64);
                let value = vw.get(i).copied().unwrap_or(0.0) + va.get(j).copied().unwrap_or(0.0);
                items.push(Item {
                    cost,
                    value: value + spend * cost / limit,
                });
                bits.push((w, a));
            }
        }
        groups.push(items);
        pairs.push(bits);
    }
    let budget = limit - geometry.fixed_cost(target);
    let choice = solve(&groups, budget)
        .ok_or_else(|| ExtractionError::Invalid(format!("no policy fits {target}")))?;
    let by_name: HashMap<&str, (u32, u32)> = geometry
        .layers
        .iter()
        .zip(&choice.picks)
        .zip(&pairs)
        .map(|((l, &k), b)| (l.name.as_str(), b[k]))
        .collect();
    let mut policy = template.clone();
    for l in &mut policy.layers {
        if let Some(&(w, a)) = by_name.get(l.name.as_str()) {
            l.w_bits = w;
            l.a_bits = a;
        }
    }
    Ok(policy)
}

/// Refuses a budget below the all-minimum-bits policy, naming that cheapest cost.
pub fn check_feasible(
    geometry: &Geometry,
    target: &Target,
    cands: &Candidates,
) -> Result<(), ExtractionError> {
    let (w, a) = (
        cands.weight.iter().copied().min().unwrap_or(2),
        cands.activation.iter().copied().min().unwrap_or(2),
    );
    let cheapest_bits = vec![(w as f64, a as f64); geometry.layers.len()];
    let cheapest = geometry.measure(target, &cheapest_bits);
    let limit = geometry.limit(target);
    if cheapest <= limit * (1.0 + TOLERANCE) {
        return Ok(());
    }
    let described = match target {
        Target::Bops(_) | Target::Compression(_) => format!(
            "{:.4} G BOPs, {:.1}× compression",
            cheapest / 1e9,
            geometry.fp_bops / cheapest
        ),
        Target::SizeMb(_) => format!("{cheapest:.4} MB"),
    };
    Err(ExtractionError::Infeasible {
        target: *target,
        w,
        a,
        cheapest: described,
    })
}

/// Weight of the budget spent, as a tie-break between equally preferred policies.
const SPEND_TIE_BREAK: f64 = 1e-9;

/// Relative slack on the budget, for float round-off in summed costs.
const TOLERANCE: f64 = 1e-9;

/// One option of a group: its cost and value.
#[derive(Debug, Clone, Copy)]
pub struct Item {
    pub cost: f64,
    pub value: f64,
}

/// The knapsack's solution: one item index per group.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub picks: Vec<usize>,
    pub cost: f64,
    pub value: f64,
}

/// Exact multiple-choice knapsack: one item from every group, total cost ≤ `budget`
/// (with a 1e-9 relative slack for round-off), total value maximal.
///
/// Dynamic programming over Pareto frontiers: after each group only the (cost, value) states
/// that no other state beats on both remain, so the optimum is never pruned. Exact for any
/// costs, with no discretisation error; the frontier holds at most one state per distinct
/// reachable cost, and in practice (tens of layers, 16 pairs) a few thousand. Ties in value
/// go to the cheaper state, then to the earlier items, so the answer is deterministic.
pub fn solve(groups: &[Vec<Item>], budget: f64) -> Option<Choice> {
    let limit = budget + budget.abs() * TOLERANCE;
    // A state: total cost, total value, and how it was reached (for the backtrack).
    #[derive(Clone, Copy)]
    struct State {
        cost: f64,
        value: f64,
        parent: usize,
        item: usize,
    }
    let mut layers: Vec<Vec<State>> = Vec::with_capacity(groups.len());
    let mut frontier = vec![State {
        cost: 0.0,
        value: 0.0,
        parent: 0,
        item: 0,
    }];
    // The cheapest completion of the remaining groups, to drop states that cannot finish.
    let mut min_rest = vec![0.0; groups.len() + 1];
    for g in (0..groups.len()).rev() {
        let cheapest = groups[g]
            .iter()
            .map(|i| i.cost)
            .fold(f64::INFINITY, f64::min);
        min_rest[g] = min_rest[g + 1] + cheapest;
    }
    for (g, items) in groups.iter().enumerate() {
        if items.is_empty() {
            return None;
        }
        let mut next: Vec<State> = Vec::with_capacity(frontier.len() * items.len());
        for (p, s) in frontier.iter().enumerate() {
            for (k, it) in items.iter().enumerate() {
                let cost = s.cost + it.cost;
                if cost + min_rest[g + 1] > limit {
                    continue;
                }
                next.push(State {
                    cost,
                    value: s.value + it.value,
                    parent: p,
                    item: k,
                });
            }
        }
        // Sort by cost, best value first among equal costs, then by origin (deterministic),
        // and keep only states that improve the best value seen at a lower cost.
        next.sort_by(|a, b| {
            a.cost
                .total_cmp(&b.cost)
                .then(b.value.total_cmp(&a.value))
                .then(a.parent.cmp(&b.parent))
                .then(a.item.cmp(&b.item))
        });
        let mut pruned: Vec<State> = Vec::with_capacity(next.len());
        for s in next {
            if pruned.last().is_none_or(|l| s.value > l.value) {
                pruned.push(s);
            }
        }
        if pruned.is_empty() {
            return None;
        }
        layers.push(frontier);
        frontier = pruned;
    }
    // The most valuable final state (the frontier is sorted by cost with rising value).
    let best = frontier.last().copied()?;
    let mut picks = vec![0; groups.len()];
    let mut at = best;
    for g in (0..groups.len()).rev() {
        picks[g] = at.item;
        if g > 0 {
            at = layers[g][at.parent];
        }
    }
    Some(Choice {
        picks,
        cost: best.cost,
        value: best.value,
    })
}
