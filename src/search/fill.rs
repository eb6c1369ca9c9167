//! The uniform baselines: the best uniform policy under a budget, and `uniform-fill`, which
//! starts from it and spends what the uniform policy leaves of the budget.
//!
//! A uniform policy meets only a few budgets exactly (the grid: w4a2 is 128× on ResNet-20,
//! w3a2 171×); between them it rounds down and leaves budget unused (w2a2 is 29 % under 200×).
//! `uniform-fill` keeps every layer at or above the best uniform bits and raises single
//! layers' weight or activation bits where that lowers the summed sensitivity most per unit of
//! budget, by the exact multiple-choice knapsack. The sensitivities are HAWQ's
//! ([`super::hawq`]): the Hessian-trace estimate of the loss increase from quantizing a layer's
//! weights, and the measured loss increase from quantizing its input, on proxy images. At a
//! grid budget nothing is left to spend, so the policy is the uniform one.

use super::budget::{Geometry, Target};
use super::extract::{knapsack_policy, spend_budget, ExtractionError};
use super::sensitivity::Sensitivities;
use crate::policy::{Candidates, Policy};

/// The uniform `(w, a)` with the most BOPs within `target`, both widths from the bits that
/// both candidate sets hold; `None` when none fits. Pairs with equal BOPs (w6a2 and w4a3) go
/// to the one whose narrower width is wider, then to more weight bits: a 2-bit tensor is what
/// costs accuracy (MobileNetV2 fine-tunes to 78 % at w6a2), and of w4a2 and w2a4 the 2-bit
/// weights are the ones that calibrate to chance.
pub fn best_uniform(
    geometry: &Geometry,
    target: &Target,
    cands: &Candidates,
) -> Option<(u32, u32)> {
    let limit = geometry.limit(target);
    let widths: Vec<u32> = cands
        .weight
        .iter()
        .copied()
        .filter(|b| cands.activation.contains(b))
        .collect();
    // Ordered by BOPs, then the narrower width, then weight bits.
    let rank = |bops: f64, w: u32, a: u32| (bops, w.min(a), w);
    let mut best: Option<(f64, u32, u32)> = None;
    for &w in &widths {
        for &a in &widths {
            let bits = vec![(w as f64, a as f64); geometry.layers.len()];
            let cost = geometry.measure(target, &bits);
            let bops = geometry.bops(&bits);
            if cost <= limit * (1.0 + 1e-9)
                && best.is_none_or(|(s, bw, ba)| rank(bops, w, a) > rank(s, bw, ba))
            {
                best = Some((bops, w, a));
            }
        }
    }
    best.map(|(_, w, a)| (w, a))
}

/// Value of a candidate below the uniform start: never chosen while the start fits.
const EXCLUDED: f64 = -1e12;

/// The `uniform-fill` policy: every layer at least the best uniform `(w, a)` under `target`,
/// the rest of the budget spent where it lowers the summed sensitivity most (at least
/// [`super::SPEND_FLOOR`] of a binding budget, as the search's extraction spends it).
pub fn uniform_fill_policy(
    template: &Policy,
    geometry: &Geometry,
    target: &Target,
    sens: &Sensitivities,
) -> Result<Policy, ExtractionError> {
    let cands = &template.candidates;
    let (w0, a0) = best_uniform(geometry, target, cands).ok_or_else(|| {
        ExtractionError::Invalid(format!(
            "no uniform policy with bits in both {:?} and {:?} meets {target}",
            cands.weight, cands.activation
        ))
    })?;
    // −sensitivity for bits at or above the start, excluded below it.
    let values = |bits: &[u32], floor: u32, sens: &[f64]| -> Vec<f64> {
        bits.iter()
            .zip(sens)
            .map(|(&b, s)| if b >= floor { -s } else { EXCLUDED })
            .collect()
    };
    let at_price = |price: f64| {
        knapsack_policy(template, geometry, target, price, |layer| {
            let (sw, sa) = sens.layer(&layer.name)?;
            Ok((
                values(&cands.weight, w0, sw),
                values(&cands.activation, a0, sa),
            ))
        })
    };
    spend_budget(geometry, target, cands, at_price).map(|(p, _)| p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Arch, ModelConfig};
    use crate::model::{ConvSpec, LinearSpec};
    use std::collections::BTreeMap;

    /// Four quantized 3×3 convs of different sizes behind an FP stem, and a head.
    fn net() -> (ModelConfig, Vec<ConvSpec>, LinearSpec) {
        let conv = |name: &str, c_in: usize, c_out: usize, hw: usize, q: bool| ConvSpec {
            name: name.into(),
            in_channels: c_in,
            out_channels: c_out,
            kernel: 3,
            stride: 1,
            padding: 1,
            groups: 1,
            in_hw: [hw, hw],
            out_hw: [hw, hw],
            quantizable: q,
            signed_input: false,
        };
        let convs = vec![
            conv("stem", 1, 16, 32, false),
            conv("l1", 16, 16, 32, true),
            conv("l2", 16, 32, 16, true),
            conv("l3", 32, 64, 8, true),
            conv("l4", 64, 64, 8, true),
        ];
        let fc = LinearSpec {
            name: "fc".into(),
            in_features: 64,
            out_features: 10,
            hidden: Vec::new(),
        };
        let cfg = ModelConfig::new(Arch::ResNet20, 1, 10, 32);
        (cfg, convs, fc)
    }

    /// Sensitivities falling with bits; `l3`'s weights the most sensitive.
    fn sensitivities(convs: &[ConvSpec], cands: &Candidates) -> Sensitivities {
        let mut weight = BTreeMap::new();
        let mut activation = BTreeMap::new();
        for c in convs.iter().filter(|c| c.quantizable) {
            let scale = if c.name == "l3" { 10.0 } else { 1.0 };
            let per = |bits: &[u32], s: f64| bits.iter().map(|&b| s / (b * b) as f64).collect();
            weight.insert(c.name.clone(), per(&cands.weight, scale));
            activation.insert(c.name.clone(), per(&cands.activation, 1.0));
        }
        Sensitivities {
            mean_trace: BTreeMap::new(),
            weight,
            activation,
            fp_loss: 0.0,
        }
    }

    fn setup() -> (Policy, Geometry, Sensitivities) {
        let (cfg, convs, fc) = net();
        let cands = Candidates::new(&[2, 3, 4, 6], &[2, 3, 4, 6]).unwrap();
        let mut template = Policy::uniform(&cfg, &convs, 2, 2);
        template.candidates = cands.clone();
        let geometry = Geometry::new(&convs, &fc);
        let sens = sensitivities(&convs, &cands);
        (template, geometry, sens)
    }

    #[test]
    fn equals_the_best_uniform_policy_at_a_grid_budget() {
        let (template, geometry, sens) = setup();
        let w4a2 = vec![(4.0, 2.0); geometry.layers.len()];
        // The budget w4a2 meets exactly.
        let target = Target::Compression(geometry.fp_bops / geometry.bops(&w4a2));
        assert_eq!(
            best_uniform(&geometry, &target, &template.candidates),
            Some((4, 2))
        );
        let p = uniform_fill_policy(&template, &geometry, &target, &sens).unwrap();
        for l in p
            .layers
            .iter()
            .filter(|l| geometry.layers.iter().any(|g| g.name == l.name))
        {
            assert_eq!((l.w_bits, l.a_bits), (4, 2), "{}", l.name);
        }
    }

    #[test]
    fn equal_bops_go_to_the_wider_narrow_width_then_to_weights() {
        let (template, geometry, _) = setup();
        let n = geometry.layers.len();
        let at = |w: f64, a: f64| Target::Bops(geometry.bops(&vec![(w, a); n]));
        let cands = &template.candidates;
        // w6a2 and w4a3 cost the same: the one without a 2-bit tensor.
        assert_eq!(best_uniform(&geometry, &at(6.0, 2.0), cands), Some((4, 3)));
        assert_eq!(best_uniform(&geometry, &at(2.0, 6.0), cands), Some((4, 3)));
        // w4a2 and w2a4 both have one: more weight bits.
        assert_eq!(best_uniform(&geometry, &at(2.0, 4.0), cands), Some((4, 2)));
        assert_eq!(best_uniform(&geometry, &at(3.0, 2.0), cands), Some((3, 2)));
    }

    #[test]
    fn spends_a_budget_between_grid_points() {
        let (template, geometry, sens) = setup();
        let n = geometry.layers.len();
        // Midway between w2a2 and w3a2 (in BOPs).
        let bops = |w: f64, a: f64| geometry.bops(&vec![(w, a); n]);
        let mid = 0.5 * (bops(2.0, 2.0) + bops(3.0, 2.0));
        let target = Target::Bops(mid);
        assert_eq!(
            best_uniform(&geometry, &target, &template.candidates),
            Some((2, 2))
        );
        let p = uniform_fill_policy(&template, &geometry, &target, &sens).unwrap();
        let cost = geometry.policy_cost(&target, &p);
        assert!(
            cost <= mid * (1.0 + 1e-9),
            "over the budget: {cost} > {mid}"
        );
        assert!(
            cost >= super::super::SPEND_FLOOR * mid,
            "spent {:.3} of it",
            cost / mid
        );
        // Nothing below the uniform start; the most sensitive layer raised first.
        for l in &p.layers {
            if geometry.layers.iter().any(|g| g.name == l.name) {
                assert!(l.w_bits >= 2 && l.a_bits >= 2);
            }
        }
        let l3 = p.layers.iter().find(|l| l.name == "l3").unwrap();
        assert!(l3.w_bits > 2, "l3 kept {} weight bits", l3.w_bits);
    }
}
