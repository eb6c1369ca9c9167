//! Hard budgets: what a target means in BOPs or bytes, the dual-ascent weight that steers the
//! search toward it, and the deterministic repair of an argmax policy that still overshoots.
//! The algorithm is described in docs/SEARCH.md.

use crate::model::{ConvSpec, LinearSpec};
use crate::policy::{Candidates, Policy};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use tch::Tensor;

/// A budget as the user states it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Policy BOPs (quantized layers) at most this.
    Bops(f64),
    /// FP BOPs / policy BOPs at least this.
    Compression(f64),
    /// Model size (quantized kernels + FP layers) at most this many MB (10^6 bytes).
    SizeMb(f64),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Bops(b) => write!(f, "bops-{:.4}G", b / 1e9),
            Target::Compression(c) => write!(f, "compression-{c}x"),
            Target::SizeMb(s) => write!(f, "size-{s}MB"),
        }
    }
}

impl Target {
    /// The budget of the three ways to state one (at most one given), checked; `None` when
    /// none is. BOPs are a count with an optional G/M/K suffix (`1.2G`, `800M`, `5e8`).
    pub fn from_parts(
        bops: Option<&str>,
        compression: Option<f64>,
        size_mb: Option<f64>,
    ) -> Result<Option<Target>, String> {
        Ok(match (bops, compression, size_mb) {
            (Some(b), _, _) => Some(Target::Bops(parse_bops(b)?)),
            (_, Some(c), _) if c <= 1.0 || !c.is_finite() => {
                return Err(format!("compression target {c} must be above 1"))
            }
            (_, Some(c), _) => Some(Target::Compression(c)),
            (_, _, Some(s)) if s <= 0.0 || !s.is_finite() => {
                return Err(format!("size target {s} MB must be positive"))
            }
            (_, _, Some(s)) => Some(Target::SizeMb(s)),
            (None, None, None) => None,
        })
    }

    /// The budget as `gmpq search`'s flag and value.
    pub fn flag(&self) -> [String; 2] {
        match *self {
            Target::Bops(b) => ["--target-bops".into(), format!("{b}")],
            Target::Compression(c) => ["--target-compression".into(), format!("{c}")],
            Target::SizeMb(s) => ["--target-size-mb".into(), format!("{s}")],
        }
    }
}

/// Parses `1.2G`, `800M`, `5e8` as a (positive) BOPs count.
pub fn parse_bops(s: &str) -> Result<f64, String> {
    let (num, mult) = match s.chars().last() {
        Some('G' | 'g') => (&s[..s.len() - 1], 1e9),
        Some('M' | 'm') => (&s[..s.len() - 1], 1e6),
        Some('K' | 'k') => (&s[..s.len() - 1], 1e3),
        _ => (s, 1.0),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a BOPs count"))?;
    if v <= 0.0 || !v.is_finite() {
        return Err("BOPs target must be positive".into());
    }
    Ok(v * mult)
}

/// The model geometry a budget is measured on.
#[derive(Debug, Clone)]
pub struct Geometry {
    /// Quantized layers, in forward order.
    pub layers: Vec<ConvSpec>,
    pub fp_bops: f64,
    /// Size in bits of the full-precision layers (stem, head).
    pub fp_layer_bits: f64,
}

impl Geometry {
    pub fn new(convs: &[ConvSpec], fc: &LinearSpec) -> Self {
        let fp_macs: u64 = convs.iter().map(|c| c.macs()).sum::<u64>() + fc.macs();
        let fp_layer_params: u64 = convs
            .iter()
            .filter(|c| !c.quantizable)
            .map(|c| c.params())
            .sum::<u64>()
            + (fc.in_features * fc.out_features + fc.out_features) as u64;
        Self {
            layers: convs.iter().filter(|c| c.quantizable).cloned().collect(),
            fp_bops: fp_macs as f64 * 1024.0,
            fp_layer_bits: fp_layer_params as f64 * 32.0,
        }
    }

    /// The budgeted quantity for per-layer (possibly expected) bits, in the target's units:
    /// [`Self::fixed_cost`] plus every layer's [`Self::layer_cost`].
    pub fn measure(&self, target: &Target, bits: &[(f64, f64)]) -> f64 {
        self.fixed_cost(target)
            + self
                .layers
                .iter()
                .zip(bits)
                .map(|(l, &(w, a))| self.layer_cost(target, l, w, a))
                .sum::<f64>()
    }

    /// BOPs of the quantized layers at per-layer (possibly expected) bits: the measure of
    /// BOPs and compression budgets.
    pub fn bops(&self, bits: &[(f64, f64)]) -> f64 {
        self.layers
            .iter()
            .zip(bits)
            .map(|(l, &(w, a))| l.macs() as f64 * w * a)
            .sum()
    }

    /// [`Self::measure`] of a policy's bits (layers matched by name; a layer the policy
    /// lacks counts at 32/32 bits).
    pub fn policy_cost(&self, target: &Target, policy: &Policy) -> f64 {
        let bits = policy.bits_by_layer();
        let per_layer: Vec<(f64, f64)> = self
            .layers
            .iter()
            .map(|l| {
                bits.get(&l.name)
                    .map_or((32.0, 32.0), |&(w, a)| (w as f64, a as f64))
            })
            .collect();
        self.measure(target, &per_layer)
    }

    /// One quantized layer's share of the budgeted quantity at `(w, a)` bits: its BOPs
    /// (MACs·w·a) for BOPs and compression budgets, its kernel's MB for size budgets.
    pub fn layer_cost(&self, target: &Target, layer: &ConvSpec, w: f64, a: f64) -> f64 {
        match Self::cost_factor(target, layer) {
            (c, true) => c * w * a,
            (c, false) => c * w,
        }
    }

    /// A layer's cost is `factor·w·a` (`true`) or `factor·w` (`false`).
    fn cost_factor(target: &Target, layer: &ConvSpec) -> (f64, bool) {
        match target {
            Target::Bops(_) | Target::Compression(_) => (layer.macs() as f64, true),
            Target::SizeMb(_) => (layer.params() as f64 / 8e6, false),
        }
    }

    /// [`Self::measure`] of per-layer expected-bit tensors, differentiable in α.
    pub fn measure_tensor(&self, target: &Target, bits: &[(Tensor, Tensor)]) -> Tensor {
        let fixed = self.fixed_cost(target);
        let terms =
            self.layers
                .iter()
                .zip(bits)
                .map(|(l, (w, a))| match Self::cost_factor(target, l) {
                    (c, true) => w * a * c,
                    (c, false) => w * c,
                });
        match terms.reduce(|x, y| x + y) {
            Some(t) => t + fixed,
            None => Tensor::from(fixed),
        }
    }

    /// The part of the budgeted quantity no policy changes: the FP layers' size (MB) for
    /// size budgets; nothing for BOPs (they count quantized layers only).
    pub fn fixed_cost(&self, target: &Target) -> f64 {
        match target {
            Target::Bops(_) | Target::Compression(_) => 0.0,
            Target::SizeMb(_) => self.fp_layer_bits / 8e6,
        }
    }

    /// The limit the measure must not exceed.
    pub fn limit(&self, target: &Target) -> f64 {
        match *target {
            Target::Bops(b) => b,
            Target::Compression(c) => self.fp_bops / c,
            Target::SizeMb(s) => s,
        }
    }
}

/// How the budget acts on the search.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum BudgetMode {
    /// An upper bound (the reference-style default): λ > 0 only pushes the expected cost
    /// down, and decays while the cost is under budget.
    #[default]
    UpperBound,
    /// An equality target: λ may turn negative, pulling the expected cost up to the budget
    /// when it is under, so the search spends the budget and the losses decide where.
    Equality,
    /// An equality target held by a quadratic penalty `μ·(E[cost]/limit − 1)²` on the
    /// relative deviation (μ = `budget_penalty`). Nothing is integrated, so an early
    /// overshoot (the even mixture costs far more than a scarce budget) leaves no lag
    /// behind it; the pull grows with the deviation in either direction.
    Penalty,
}

/// The complexity weight λ, adapted toward the budget every step.
///
/// - [`BudgetMode::UpperBound`]: `λ ← λ·exp(η·clamp(M/limit − 1, ±1))`, λ ∈ [1e-9, 1e3].
/// - [`BudgetMode::Equality`]: `λ ← λ + η·scale·clamp(M/limit − 1, ±1)`, |λ| ≤ 1e3·scale,
///   with `scale` the starting weight, so λ changes sign when the cost crosses the budget.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct DualWeight {
    pub lambda: f64,
    pub rate: f64,
    #[serde(default)]
    pub mode: BudgetMode,
    /// The additive step unit of the equality mode (the starting λ).
    #[serde(default)]
    pub scale: f64,
}

impl DualWeight {
    pub fn update(&mut self, measure: f64, limit: f64) {
        let ratio = (measure / limit - 1.0).clamp(-1.0, 1.0);
        self.lambda = match self.mode {
            // The penalty weight is fixed: the deviation itself sets the pull.
            BudgetMode::Penalty => self.lambda,
            BudgetMode::UpperBound => (self.lambda * (self.rate * ratio).exp()).clamp(1e-9, 1e3),
            BudgetMode::Equality => {
                let bound = 1e3 * self.scale.abs();
                (self.lambda + self.rate * self.scale.abs() * ratio).clamp(-bound, bound)
            }
        };
    }
}

/// Per-layer architecture logits, to rank repair moves by how little the search preferred
/// the bits given up. Saved in a searched policy's `meta.alpha` (in candidate order), so
/// another extraction rule can be tried on a finished search without running it again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Preferences {
    #[serde(rename = "weight")]
    pub alpha_w: BTreeMap<String, Vec<f64>>,
    #[serde(rename = "activation")]
    pub alpha_a: BTreeMap<String, Vec<f64>>,
    /// The softmax temperature at the end of the search: π = softmax(α/T).
    #[serde(default = "unit_temperature")]
    pub temperature: f64,
    /// The bits each position of the α vectors stands for (weight, activation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bits: Option<Candidates>,
}

fn unit_temperature() -> f64 {
    1.0
}

impl Preferences {
    /// Every layer of `layers` has α for every candidate of `cands`, all finite: an
    /// extraction must not read a missing α as zeros or a short one as a different list.
    pub fn check(&self, layers: &[ConvSpec], cands: &Candidates) -> Result<(), String> {
        for layer in layers {
            for (kind, table, n) in [
                ("weight", &self.alpha_w, cands.weight.len()),
                ("activation", &self.alpha_a, cands.activation.len()),
            ] {
                match table.get(&layer.name) {
                    None => return Err(format!("layer '{}' has no {kind} α", layer.name)),
                    Some(a) if a.len() != n => {
                        return Err(format!(
                            "layer '{}' has {} {kind} α values for {n} candidates",
                            layer.name,
                            a.len()
                        ))
                    }
                    Some(a) if a.iter().any(|v| !v.is_finite()) => {
                        return Err(format!("layer '{}' has a non-finite {kind} α", layer.name))
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(())
    }
}

/// One candidate step of one layer's weight (`weights`) or activation bits: (layer index,
/// weights?, new bits).
type Step = (usize, bool, u32);

/// Every single step down (`down`) or up the candidate sets from `p`'s bits.
fn single_steps(p: &Policy, down: bool) -> Vec<Step> {
    let mut out = Vec::new();
    for (i, l) in p.layers.iter().enumerate() {
        for (weights, bits, set) in [
            (true, l.w_bits, &p.candidates.weight),
            (false, l.a_bits, &p.candidates.activation),
        ] {
            let pos = set.iter().position(|&b| b == bits).unwrap_or(0);
            let next = if down {
                pos.checked_sub(1).map(|j| set[j])
            } else {
                set.get(pos + 1).copied()
            };
            if let Some(b) = next {
                out.push((i, weights, b));
            }
        }
    }
    out
}

fn apply_step(p: &mut Policy, (i, weights, b): Step) {
    if weights {
        p.layers[i].w_bits = b;
    } else {
        p.layers[i].a_bits = b;
    }
}

/// Lowers bits until the policy meets the budget, then raises bits while it still does, so
/// the result is ≤ the limit and as close to it as single-step moves allow. Each move is the
/// single step (one layer, weights or activations, to the neighbouring candidate) with the
/// best ratio of α-preference to cost (α logit lost per unit saved going down; gained per
/// unit added going up); ties go to the earlier layer. Deterministic.
pub fn repair(policy: &mut Policy, geometry: &Geometry, target: &Target, prefs: &Preferences) {
    let limit = geometry.limit(target);
    let cands: Candidates = policy.candidates.clone();
    let index: HashMap<String, usize> = policy
        .layers
        .iter()
        .enumerate()
        .map(|(i, l)| (l.name.clone(), i))
        .collect();
    let bits_vec = |p: &Policy| -> Vec<(f64, f64)> {
        geometry
            .layers
            .iter()
            .map(|l| {
                let b = &p.layers[index[&l.name]];
                (b.w_bits as f64, b.a_bits as f64)
            })
            .collect()
    };
    let logit = |name: &str, weights: bool, bits: u32| -> f64 {
        let (set, table) = if weights {
            (&cands.weight, &prefs.alpha_w)
        } else {
            (&cands.activation, &prefs.alpha_a)
        };
        let i = set.iter().position(|&b| b == bits).unwrap_or(0);
        table
            .get(name)
            .and_then(|v| v.get(i))
            .copied()
            .unwrap_or(0.0)
    };
    let moves = single_steps;
    let apply = apply_step;
    let mut current = geometry.measure(target, &bits_vec(policy));
    while current > limit {
        // Smallest loss of preference per unit of cost saved.
        let mut best: Option<(f64, (usize, bool, u32), f64)> = None;
        for m in moves(policy, true) {
            let mut trial = policy.clone();
            apply(&mut trial, m);
            let after = geometry.measure(target, &bits_vec(&trial));
            let saved = current - after;
            if saved <= 0.0 {
                continue;
            }
            let l = &policy.layers[m.0];
            let old = if m.1 { l.w_bits } else { l.a_bits };
            let lost = logit(&l.name, m.1, old) - logit(&l.name, m.1, m.2);
            let score = lost / saved;
            if best.as_ref().is_none_or(|b| score < b.0) {
                best = Some((score, m, after));
            }
        }
        match best {
            Some((_, m, after)) => {
                apply(policy, m);
                current = after;
            }
            None => break, // everything at the lowest candidate
        }
    }
    loop {
        // Largest gain of preference per unit of cost added, among raises that still fit.
        let mut best: Option<(f64, (usize, bool, u32), f64)> = None;
        for m in moves(policy, false) {
            let mut trial = policy.clone();
            apply(&mut trial, m);
            let after = geometry.measure(target, &bits_vec(&trial));
            if after > limit {
                continue;
            }
            let added = (after - current).max(f64::MIN_POSITIVE);
            let l = &policy.layers[m.0];
            let old = if m.1 { l.w_bits } else { l.a_bits };
            let gained = logit(&l.name, m.1, m.2) - logit(&l.name, m.1, old);
            let score = gained / added;
            if best.as_ref().is_none_or(|b| score > b.0) {
                best = Some((score, m, after));
            }
        }
        match best {
            Some((_, m, after)) => {
                apply(policy, m);
                current = after;
            }
            None => break,
        }
    }
}

/// A random policy whose cost lies in `[(1 − tolerance)·limit, limit]`: per-layer bits drawn
/// uniformly from the candidates (the study's random baseline), by rejection, seeded.
///
/// Tight budgets (a few grid points above the cheapest policy, e.g. 171× on ResNet-20) are
/// rarely hit by uniform draws, so after `max_draws` misses the last draw is walked to the
/// budget instead: random single-step lowerings (one layer's weight or activation bits, one
/// candidate down) until it fits, then random single-step raises that still fit until the
/// cost reaches the window or no raise fits. Any feasible budget thus gets a policy; `None`
/// only when even every layer at the lowest candidates costs more than the limit.
pub fn random_policy(
    template: &Policy,
    geometry: &Geometry,
    target: &Target,
    tolerance: f64,
    seed: u64,
    max_draws: usize,
) -> Option<Policy> {
    use rand::{Rng, SeedableRng};
    let limit = geometry.limit(target);
    let index: HashMap<&str, usize> = template
        .layers
        .iter()
        .enumerate()
        .map(|(i, l)| (l.name.as_str(), i))
        .collect();
    let order: Vec<usize> = geometry
        .layers
        .iter()
        .filter_map(|l| index.get(l.name.as_str()).copied())
        .collect();
    let (w_set, a_set) = (&template.candidates.weight, &template.candidates.activation);
    let cost_of = |p: &Policy| -> f64 {
        let bits: Vec<(f64, f64)> = order
            .iter()
            .map(|&i| (p.layers[i].w_bits as f64, p.layers[i].a_bits as f64))
            .collect();
        geometry.measure(target, &bits)
    };
    let in_window = |c: f64| c <= limit && c >= (1.0 - tolerance) * limit;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut p = template.clone();
    for _ in 0..max_draws.max(1) {
        for l in &mut p.layers {
            l.w_bits = w_set[rng.gen_range(0..w_set.len())];
            l.a_bits = a_set[rng.gen_range(0..a_set.len())];
        }
        if in_window(cost_of(&p)) {
            return Some(p);
        }
    }
    let (steps, apply) = (single_steps, apply_step);
    while cost_of(&p) > limit {
        let down = steps(&p, true);
        if down.is_empty() {
            return None; // every layer at the lowest candidates, still over: infeasible
        }
        let m = down[rng.gen_range(0..down.len())];
        apply(&mut p, m);
    }
    while cost_of(&p) < (1.0 - tolerance) * limit {
        let fitting: Vec<_> = steps(&p, false)
            .into_iter()
            .filter(|&m| {
                let mut trial = p.clone();
                apply(&mut trial, m);
                cost_of(&trial) <= limit
            })
            .collect();
        if fitting.is_empty() {
            break;
        }
        let m = fitting[rng.gen_range(0..fitting.len())];
        apply(&mut p, m);
    }
    Some(p)
}
