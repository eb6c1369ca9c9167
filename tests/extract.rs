//! Policy extraction: the exact knapsack against brute force, infeasible budgets, and both
//! rules on a real model geometry under BOPs, compression and size budgets.

use gmpq::model::{Arch, ModelConfig};
use gmpq::policy::{Candidates, Policy};
use gmpq::quant::{self, Precision};
use gmpq::search::{
    argmax_policy, check_feasible, repair, solve_knapsack, ArgmaxRepair, Extraction,
    ExtractionError, Geometry, Item, Knapsack, Preferences, Target,
};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use tch::Device;

/// Every combination: the best value within the budget, ties to the cheaper.
fn brute_force(groups: &[Vec<Item>], budget: f64) -> Option<(f64, f64)> {
    let mut best: Option<(f64, f64)> = None;
    let mut idx = vec![0usize; groups.len()];
    loop {
        let cost: f64 = idx.iter().zip(groups).map(|(&i, g)| g[i].cost).sum();
        let value: f64 = idx.iter().zip(groups).map(|(&i, g)| g[i].value).sum();
        if cost <= budget + budget.abs() * 1e-9
            && best.is_none_or(|(v, c)| value > v || (value == v && cost < c))
        {
            best = Some((value, cost));
        }
        // Next combination (odometer).
        let mut g = 0;
        loop {
            if g == groups.len() {
                return best;
            }
            idx[g] += 1;
            if idx[g] < groups[g].len() {
                break;
            }
            idx[g] = 0;
            g += 1;
        }
    }
}

#[test]
fn knapsack_equals_brute_force_on_random_instances() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut infeasible = 0;
    for case in 0..400 {
        let n_groups = rng.gen_range(1..=5);
        // Small integer costs and values on a coarse grid make ties in both common.
        let groups: Vec<Vec<Item>> = (0..n_groups)
            .map(|_| {
                (0..rng.gen_range(1..=5))
                    .map(|_| Item {
                        cost: rng.gen_range(1..=8) as f64 * 0.5,
                        value: rng.gen_range(-4..=4) as f64 * 0.25,
                    })
                    .collect()
            })
            .collect();
        let min: f64 = groups
            .iter()
            .map(|g| g.iter().map(|i| i.cost).fold(f64::INFINITY, f64::min))
            .sum();
        // Budgets from below the cheapest (infeasible) to above everything.
        let budget = min * rng.gen_range(0.8..2.5);
        let want = brute_force(&groups, budget);
        let got = solve_knapsack(&groups, budget);
        match (want, &got) {
            (None, None) => infeasible += 1,
            (Some((v, c)), Some(ch)) => {
                assert_eq!(ch.value, v, "case {case}: value");
                assert_eq!(ch.cost, c, "case {case}: cost (ties go to the cheaper)");
                let cost: f64 = ch.picks.iter().zip(&groups).map(|(&i, g)| g[i].cost).sum();
                let value: f64 = ch.picks.iter().zip(&groups).map(|(&i, g)| g[i].value).sum();
                assert_eq!((value, cost), (v, c), "case {case}: picks match the totals");
            }
            _ => panic!("case {case}: brute force {want:?}, knapsack {got:?}"),
        }
    }
    assert!(infeasible > 10, "the cases must include infeasible budgets");
}

fn resnet20() -> (ModelConfig, Geometry, Policy) {
    let cfg = ModelConfig::new(Arch::ResNet20, 1, 10, 28);
    let net = quant::build(&cfg, Precision::Full, Device::Cpu).unwrap();
    let g = Geometry::new(net.net.convs(), net.net.fc_spec());
    let mut p = Policy::uniform(&cfg, net.net.convs(), 2, 2);
    p.candidates = Candidates {
        weight: vec![2, 3, 4, 6],
        activation: vec![2, 3, 4, 6],
    };
    (cfg, g, p)
}

fn random_prefs(p: &Policy, seed: u64, spread: f64) -> Preferences {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut table = || -> BTreeMap<String, Vec<f64>> {
        p.layers
            .iter()
            .map(|l| {
                let v = (0..4).map(|_| rng.gen_range(-spread..spread)).collect();
                (l.name.clone(), v)
            })
            .collect()
    };
    Preferences {
        bits: None,
        alpha_w: table(),
        alpha_a: table(),
        temperature: 1.0,
    }
}

fn log_prob(p: &Policy, prefs: &Preferences) -> f64 {
    let lsm = |v: &Vec<f64>, i: usize| {
        let m = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = v.iter().map(|x| (x - m).exp()).sum();
        v[i] - m - z.ln()
    };
    let pos = |b: u32| [2, 3, 4, 6].iter().position(|&x| x == b).unwrap();
    p.layers
        .iter()
        .map(|l| {
            lsm(&prefs.alpha_w[&l.name], pos(l.w_bits))
                + lsm(&prefs.alpha_a[&l.name], pos(l.a_bits))
        })
        .sum()
}

fn bits(g: &Geometry, p: &Policy) -> Vec<(f64, f64)> {
    g.layers
        .iter()
        .map(|gl| {
            let l = p.layers.iter().find(|l| l.name == gl.name).unwrap();
            (l.w_bits as f64, l.a_bits as f64)
        })
        .collect()
}

/// On ResNet-20 under every kind of budget: both rules meet it, and the knapsack's policy is
/// at least as probable under α as argmax-repair's (it is the optimum).
#[test]
fn knapsack_meets_every_budget_kind_and_beats_repair() {
    let (_, g, template) = resnet20();
    let fp_bops = g.fp_bops;
    let targets = [
        Target::Compression(128.0),
        Target::Compression(171.0),
        Target::Bops(fp_bops / 100.0),
        Target::SizeMb(0.09),
    ];
    for (s, t) in targets.iter().enumerate() {
        for spread in [0.01, 1.0] {
            let prefs = random_prefs(&template, s as u64, spread);
            let k = Knapsack.extract(&template, &g, Some(t), &prefs).unwrap();
            let r = ArgmaxRepair
                .extract(&template, &g, Some(t), &prefs)
                .unwrap();
            let limit = g.limit(t);
            for (name, p) in [("knapsack", &k), ("argmax-repair", &r)] {
                let cost = g.measure(t, &bits(&g, p));
                assert!(cost <= limit * (1.0 + 1e-9), "{name} {t}: {cost} > {limit}");
            }
            assert!(
                log_prob(&k, &prefs) >= log_prob(&r, &prefs) - 1e-9,
                "{t} spread {spread}: knapsack {} < repair {}",
                log_prob(&k, &prefs),
                log_prob(&r, &prefs)
            );
        }
    }
}

#[test]
fn argmax_repair_rule_is_argmax_then_repair() {
    let (_, g, template) = resnet20();
    let prefs = random_prefs(&template, 9, 1.0);
    let t = Target::Compression(100.0);
    let mut want = argmax_policy(&template, &prefs);
    repair(&mut want, &g, &t, &prefs);
    let got = ArgmaxRepair
        .extract(&template, &g, Some(&t), &prefs)
        .unwrap();
    assert_eq!(got.layers, want.layers);
}

#[test]
fn infeasible_budget_names_the_cheapest_cost() {
    let (_, g, template) = resnet20();
    let cheapest = g.bops(&vec![(2.0, 2.0); g.layers.len()]);
    let max_compression = g.fp_bops / cheapest;
    // Just reachable: every layer at w2a2.
    check_feasible(
        &g,
        &Target::Compression(max_compression * 0.999),
        &template.candidates,
    )
    .unwrap();
    let err = check_feasible(&g, &Target::Compression(100000.0), &template.candidates).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, ExtractionError::Infeasible { w: 2, a: 2, .. }),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("{:.1}× compression", max_compression)),
        "the message names the cheapest cost: {msg}"
    );
    let prefs = random_prefs(&template, 1, 1.0);
    assert!(Knapsack
        .extract(&template, &g, Some(&Target::SizeMb(0.001)), &prefs)
        .is_err());
}

/// One cost model: the search's geometry (float, expected bits) and the policy's cost table
/// (integer, the numbers `gmpq bops` prints) agree on BOPs and size for a mixed policy.
#[test]
fn geometry_and_policy_costs_agree() {
    let cfg = ModelConfig::new(Arch::ResNet20, 1, 10, 28);
    let net = quant::build(&cfg, Precision::Full, Device::Cpu).unwrap();
    let g = Geometry::new(net.net.convs(), net.net.fc_spec());
    let mut p = Policy::uniform(&cfg, net.net.convs(), 2, 2);
    for (i, l) in p.layers.iter_mut().enumerate() {
        (l.w_bits, l.a_bits) = ([2, 3, 4, 6][i % 4], [6, 4, 3, 2][i % 3]);
    }
    let (_, totals) = p.cost(net.net.convs(), net.net.fc_spec());
    let bits: Vec<(f64, f64)> = g
        .layers
        .iter()
        .map(|gl| {
            let l = p.layers.iter().find(|l| l.name == gl.name).unwrap();
            (l.w_bits as f64, l.a_bits as f64)
        })
        .collect();
    assert_eq!(g.bops(&bits), totals.bops as f64);
    assert_eq!(g.measure(&Target::Bops(1.0), &bits), totals.bops as f64);
    let size = g.measure(&Target::SizeMb(1.0), &bits);
    assert!(
        (size - totals.size_mb).abs() < 1e-9,
        "{size} vs {}",
        totals.size_mb
    );
}

/// The knapsack spends a binding budget: with α leaning hard to 2 bits, the most probable
/// policy under 171× sits far below it, and the extraction raises bits (where they cost the
/// least probability) until at least 99 % of the budget is spent. A budget above the costliest
/// policy does not bind: the policy is the argmax.
#[test]
fn knapsack_spends_a_binding_budget() {
    let (_, g, p) = resnet20();
    let mut prefs = random_prefs(&p, 3, 0.5);
    for v in prefs.alpha_w.values_mut().chain(prefs.alpha_a.values_mut()) {
        v[0] += 4.0;
    }
    for c in [128.0, 171.0, 200.0] {
        let t = Target::Compression(c);
        let policy = Knapsack.extract(&p, &g, Some(&t), &prefs).unwrap();
        let (cost, limit) = (g.measure(&t, &bits(&g, &policy)), g.limit(&t));
        assert!(
            cost <= limit * (1.0 + 1e-9) && cost >= gmpq::search::SPEND_FLOOR * limit,
            "{c}x: spent {:.4} of the budget",
            cost / limit
        );
    }
    let loose = Target::Compression(10.0);
    let policy = Knapsack.extract(&p, &g, Some(&loose), &prefs).unwrap();
    assert_eq!(policy, argmax_policy(&p, &prefs));
}
