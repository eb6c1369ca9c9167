//! GMPQ search: attribution, loss terms, budgets, and the search end to end.

mod common;

use common::{bundled, gmpq, run, stderr};
use gmpq::attribution::{attribution_loss, cam, grad_cam, top1};
use gmpq::checkpoint::{self, Checkpoint, CheckpointMeta};
use gmpq::data::{Normalize, Pipeline};
use gmpq::model::{Arch, ModelConfig};
use gmpq::policy::{Candidates, Policy};
use gmpq::quant::{self, Precision};
use gmpq::search::{
    complexity_loss, expected_layer_bits, random_policy, repair, ExtractionRule, Geometry,
    Preferences, Target,
};
use tch::{Device, Kind, Tensor};

fn cfg() -> ModelConfig {
    ModelConfig::new(Arch::ResNet20, 1, 10, 28)
}

fn supernet() -> quant::Network {
    let c = Candidates {
        weight: vec![2, 3, 4, 6],
        activation: vec![2, 3, 4, 6],
    };
    quant::build(&cfg(), Precision::Supernet { candidates: c }, Device::Cpu).unwrap()
}

#[test]
fn cam_equals_general_grad_cam_on_resnet() {
    tch::manual_seed(0);
    for precision in [Precision::Full, supernet().precision] {
        let n = quant::build(&cfg(), precision, Device::Cpu).unwrap();
        let x = Tensor::randn([6, 1, 28, 28], tch::kind::FLOAT_CPU);
        let f = n.net.features(&x, false);
        let logits = n.net.head(&f);
        let c = top1(&logits);
        let a = cam(&f, n.net.fc_weight(), &c);
        let b = grad_cam(&f, &logits, &c);
        assert_eq!(a.size(), vec![6, 7, 7]);
        let diff = (&a - &b).abs().max().double_value(&[]);
        let scale = a.abs().max().double_value(&[]).max(1e-6);
        assert!(
            diff <= 1e-5 * scale,
            "CAM and Grad-CAM differ by {diff} (scale {scale})"
        );
        assert!(a.sum(Kind::Float).double_value(&[]) > 0.0, "empty maps");
    }
}

#[test]
fn complexity_loss_hand_worked() {
    // Two layers with 100 and 50 MACs; α = 0 → E[b] = mean of the candidates.
    let set = [2u32, 4];
    let a0 = Tensor::zeros([2], tch::kind::FLOAT_CPU);
    let e = gmpq::quant::expected_bits(&a0, &set); // 3
    let bits = vec![
        (e.shallow_clone(), e.shallow_clone()),
        (e.shallow_clone(), e.shallow_clone()),
    ];
    let l = complexity_loss(&bits, &[100.0, 50.0]).double_value(&[]);
    assert!((l - (9.0 + 9.0 * 0.5)).abs() < 1e-6, "{l}");
    // Softmax([ln 3, 0]) = [0.75, 0.25] over {2, 4} → E[b] = 2.5.
    let a1 = Tensor::from_slice(&[3f32.ln(), 0.0]);
    assert!((gmpq::quant::expected_bits(&a1, &set).double_value(&[]) - 2.5).abs() < 1e-6);
}

#[test]
fn alpha_gets_gradient_from_each_loss_term() {
    tch::manual_seed(3);
    let sn = supernet();
    let teacher = quant::build(&cfg(), Precision::Full, Device::Cpu).unwrap();
    let x = Tensor::randn([4, 1, 28, 28], tch::kind::FLOAT_CPU);
    let y = Tensor::from_slice(&[1i64, 2, 3, 4]);
    let vars = sn.vs.variables();
    let macs: Vec<f64> = sn.handles.iter().map(|h| h.spec.macs() as f64).collect();
    type LossFn<'a> = Box<dyn Fn() -> Tensor + 'a>;
    let terms: [(&str, LossFn); 3] = [
        ("CE", Box::new(|| sn.net.forward_t_ce(&x, &y))),
        (
            "L_attr",
            Box::new(|| {
                let ft = teacher.net.features(&x, false);
                let at = cam(&ft, teacher.net.fc_weight(), &top1(&teacher.net.head(&ft)));
                let fs = sn.net.features(&x, true);
                let as_ = cam(&fs, sn.net.fc_weight(), &top1(&sn.net.head(&fs)));
                attribution_loss(&at, &as_, 1.5)
            }),
        ),
        (
            "L_complexity",
            Box::new(|| complexity_loss(&expected_layer_bits(&sn, &vars), &macs)),
        ),
    ];
    for (name, loss) in terms.iter() {
        for (_, a) in sn.alpha_parameters() {
            let mut a = a;
            a.zero_grad();
        }
        loss().backward();
        let with_grad = sn
            .alpha_parameters()
            .iter()
            .filter(|(_, a)| {
                a.grad().defined() && a.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0
            })
            .count();
        assert!(
            with_grad >= 20,
            "{name}: only {with_grad} of 40 α have gradient"
        );
    }
}

trait CeExt {
    fn forward_t_ce(&self, x: &Tensor, y: &Tensor) -> Tensor;
}
impl CeExt for gmpq::model::Model {
    fn forward_t_ce(&self, x: &Tensor, y: &Tensor) -> Tensor {
        tch::nn::ModuleT::forward_t(self, x, true).cross_entropy_for_logits(y)
    }
}

#[test]
fn repair_meets_the_budget_and_fills_it() {
    let n = quant::build(&cfg(), Precision::Full, Device::Cpu).unwrap();
    let g = Geometry::new(n.net.convs(), n.net.fc_spec());
    let mut p = Policy::uniform(&cfg(), n.net.convs(), 6, 6);
    p.candidates = Candidates {
        weight: vec![2, 3, 4, 6],
        activation: vec![2, 3, 4, 6],
    };
    // The search preferred 6 bits everywhere but weakly on layer2.*.
    let mut prefs = Preferences {
        bits: None,
        alpha_w: Default::default(),
        alpha_a: Default::default(),
        temperature: 1.0,
    };
    for l in &p.layers {
        let v = if l.name.starts_with("layer2") {
            vec![0.0, 0.0, 0.1, 0.2]
        } else {
            vec![0.0, 0.0, 0.5, 2.0]
        };
        prefs.alpha_w.insert(l.name.clone(), v.clone());
        prefs.alpha_a.insert(l.name.clone(), v);
    }
    let target = Target::Compression(64.0);
    let limit = g.limit(&target);
    let mut a = p.clone();
    repair(&mut a, &g, &target, &prefs);
    let bits = |p: &Policy| {
        p.layers
            .iter()
            .map(|l| (l.w_bits as f64, l.a_bits as f64))
            .collect::<Vec<_>>()
    };
    let got = g.measure(&target, &bits(&a));
    assert!(got <= limit, "{got} > {limit}");
    // As close as single steps allow: no single raise still fits.
    let smallest_step = g
        .layers
        .iter()
        .map(|l| l.macs() as f64)
        .fold(f64::MAX, f64::min)
        * 2.0
        * 2.0;
    assert!(
        limit - got < smallest_step * 6.0,
        "left {} unused",
        limit - got
    );
    // The weakly preferred layers gave up bits first.
    let avg = |pre: &str| {
        let v: Vec<f64> = a
            .layers
            .iter()
            .filter(|l| l.name.starts_with(pre))
            .map(|l| (l.w_bits * l.a_bits) as f64)
            .collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    assert!(
        avg("layer2") < avg("layer1"),
        "{} vs {}",
        avg("layer2"),
        avg("layer1")
    );
    let mut b = p.clone();
    repair(&mut b, &g, &target, &prefs);
    assert_eq!(a, b, "repair must be deterministic");
    let a_totals = a
        .clone()
        .with_totals(n.net.convs(), n.net.fc_spec())
        .totals
        .unwrap();
    assert!(a_totals.compression >= 64.0);
}

fn fp_checkpoint(path: &std::path::Path, seed: i64) {
    tch::manual_seed(seed);
    let n = quant::build(&cfg(), Precision::Full, Device::Cpu).unwrap();
    Checkpoint {
        meta: CheckpointMeta::new(
            cfg(),
            Pipeline {
                transforms: vec![],
                normalize: Normalize {
                    mean: vec![0.13],
                    std: vec![0.3],
                },
            },
        ),
        tensors: checkpoint::var_store_tensors(&n.vs),
    }
    .save(path)
    .unwrap();
}

fn search_args<'a>(teacher: &'a str, out: &'a str, aw: &'a str, p: &'a str) -> Vec<&'a str> {
    vec![
        "--threads",
        "2",
        "search",
        "--teacher",
        teacher,
        "--data",
        "bundled:mnist",
        "--limit",
        "256",
        "--val-images",
        "64",
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--target-compression",
        "64",
        // The faithful recipe: these tests pin its behaviour.
        "--recipe",
        "reference",
        "--attribution-weight",
        aw,
        "--p",
        p,
        "--out",
        out,
        "--json",
    ]
}

#[test]
fn search_meets_target_and_aw0_ignores_attribution() {
    let (dir, t) = mnist_teacher(1);
    let t_s = t.to_str().unwrap().to_string();
    // (attribution weight, p): with aw = 0 the exponent p — which only enters L_attr — must
    // change nothing; with aw = 20 it must.
    let runs = [("0", "1"), ("0", "6"), ("20", "1"), ("20", "6")];
    let mut results = Vec::new();
    for (i, (aw, p)) in runs.iter().enumerate() {
        let o = dir.path().join(format!("o{i}"));
        let out = run(&search_args(&t_s, o.to_str().unwrap(), aw, p));
        assert!(out.status.success(), "{}", stderr(&out));
        for f in [
            "policy.json",
            "search-log.jsonl",
            "bits.svg",
            "attribution.png",
        ] {
            assert!(o.join(f).is_file(), "{f} missing");
        }
        let policy = Policy::load(&o.join("policy.json")).unwrap();
        std::fs::copy(o.join("policy.json"), o.join("policy.before")).unwrap();
        // The final α is kept, per layer and candidate, and repairing it again gives the policy.
        let meta = policy.meta.clone().unwrap();
        let alpha: Preferences = serde_json::from_value(meta["alpha"].clone()).unwrap();
        for l in &policy.layers {
            assert_eq!(alpha.alpha_w[&l.name].len(), 4, "{}", l.name);
            assert_eq!(alpha.alpha_a[&l.name].len(), 4, "{}", l.name);
        }
        let mut argmax = policy.clone();
        for l in &mut argmax.layers {
            let best = |v: &Vec<f64>| {
                // ties to the lowest bitwidth, as the search extracts
                let i = (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b });
                [2, 3, 4, 6][i]
            };
            l.w_bits = best(&alpha.alpha_w[&l.name]);
            l.a_bits = best(&alpha.alpha_a[&l.name]);
        }
        let n = quant::build(&cfg(), Precision::Full, Device::Cpu).unwrap();
        let g = Geometry::new(n.net.convs(), n.net.fc_spec());
        let bits = |p: &Policy| -> Vec<(f64, f64)> {
            g.layers
                .iter()
                .map(|gl| {
                    let l = p.layers.iter().find(|l| l.name == gl.name).unwrap();
                    (l.w_bits as f64, l.a_bits as f64)
                })
                .collect()
        };
        assert_eq!(
            g.bops(&bits(&argmax)),
            meta["argmax_policy_bops"].as_f64().unwrap()
        );
        // The search's extraction rule (recorded; the reference recipe's argmax + repair),
        // taken again from the saved α.
        let rule: ExtractionRule = serde_json::from_value(meta["search"]["extraction"].clone())
            .expect("meta.search.extraction");
        assert_eq!(rule, ExtractionRule::ArgmaxRepair);
        let again = rule
            .strategy()
            .extract(&policy, &g, Some(&Target::Compression(64.0)), &alpha)
            .unwrap();
        assert_eq!(
            again.layers, policy.layers,
            "α does not reproduce the policy"
        );
        if i == 0 {
            // `gmpq extract` on the run gives back the search's own policy, and another rule
            // or budget from the same α without searching again.
            let out = run(&["extract", o.to_str().unwrap(), "--json"]);
            assert!(out.status.success(), "{}", stderr(&out));
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let p = Policy::load(std::path::Path::new(v["policy"].as_str().unwrap())).unwrap();
            assert_eq!(
                p.layers, policy.layers,
                "gmpq extract differs from the search"
            );
            let out = run(&[
                "extract",
                o.to_str().unwrap(),
                "--rule",
                "argmax-repair",
                "--target-compression",
                "128",
                "--json",
            ]);
            assert!(out.status.success(), "{}", stderr(&out));
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let p = Policy::load(std::path::Path::new(v["policy"].as_str().unwrap())).unwrap();
            let mut want = argmax.clone();
            repair(&mut want, &g, &Target::Compression(128.0), &alpha);
            assert_eq!(p.layers, want.layers, "argmax-repair at 128x");
            assert!(p.totals.unwrap().compression >= 128.0);
            let out = run(&[
                "extract",
                o.to_str().unwrap(),
                "--target-compression",
                "100000",
            ]);
            assert!(!out.status.success());
            assert!(
                stderr(&out).contains("cannot be met"),
                "infeasible budget: {}",
                stderr(&out)
            );
        }
        let totals = policy.totals.clone().unwrap();
        assert!(
            totals.compression >= 64.0,
            "target not met: {}",
            totals.compression
        );
        assert!(
            totals.compression < 64.0 * 1.1,
            "far under the budget: {}",
            totals.compression
        );
        let log: Vec<serde_json::Value> = std::fs::read_to_string(o.join("search-log.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(log.len(), 2);
        results.push((policy.layers, log));
        if i == 0 {
            // Re-running finds the policy written and keeps it instead of searching again.
            let again = run(&search_args(&t_s, o.to_str().unwrap(), aw, p));
            assert!(again.status.success(), "{}", stderr(&again));
            // --json: one document naming the kept policy and nothing written.
            let doc: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
            assert_eq!(doc["kept"].as_array().map(Vec::len), Some(1), "{doc}");
            assert_eq!(doc["written"].as_array().map(Vec::len), Some(0), "{doc}");
            assert_eq!(
                Policy::load(&o.join("policy.json")).unwrap(),
                policy_before(&o)
            );
        }
    }
    assert_eq!(results[0].0, results[1].0, "aw = 0: p changed the policy");
    assert_eq!(
        results[0].1[1]["ce"], results[1].1[1]["ce"],
        "aw = 0: p changed the training"
    );
    assert_ne!(
        results[2].1[1]["ce"], results[3].1[1]["ce"],
        "aw = 20: p had no effect"
    );
}

/// A temporary folder holding an FP teacher (`fp_checkpoint` with `seed`), the bundled MNIST
/// subset in place for the searches.
fn mnist_teacher(seed: i64) -> (tempfile::TempDir, std::path::PathBuf) {
    let _ = bundled("mnist");
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("t.safetensors");
    fp_checkpoint(&t, seed);
    (dir, t)
}

fn policy_before(dir: &std::path::Path) -> Policy {
    Policy::load(&dir.join("policy.before")).unwrap()
}

#[test]
fn random_policies_sit_just_under_the_budget_and_follow_the_seed() {
    let n = quant::build(&cfg(), Precision::Full, Device::Cpu).unwrap();
    let g = Geometry::new(n.net.convs(), n.net.fc_spec());
    let mut t = Policy::uniform(&cfg(), n.net.convs(), 2, 2);
    t.candidates = Candidates {
        weight: vec![2, 3, 4, 6],
        activation: vec![2, 3, 4, 6],
    };
    let target = Target::Compression(64.0);
    let limit = g.limit(&target);
    let bits = |p: &Policy| {
        p.layers
            .iter()
            .map(|l| (l.w_bits as f64, l.a_bits as f64))
            .collect::<Vec<_>>()
    };
    let a = random_policy(&t, &g, &target, 0.02, 7, 1_000_000).expect("a draw in the window");
    let cost = g.measure(&target, &bits(&a));
    assert!(cost <= limit && cost >= 0.98 * limit, "{cost} vs {limit}");
    let again = random_policy(&t, &g, &target, 0.02, 7, 1_000_000).unwrap();
    assert_eq!(a.layers, again.layers, "same seed, same policy");
    let other = random_policy(&t, &g, &target, 0.02, 8, 1_000_000).unwrap();
    assert_ne!(a.layers, other.layers, "another seed, another policy");
    // Not uniform: the draw mixes bits.
    assert!(a.layers.iter().any(|l| l.w_bits != a.layers[0].w_bits));
    // An infeasible budget gives None rather than a policy over budget.
    assert!(random_policy(&t, &g, &Target::Compression(1e9), 0.02, 7, 1000).is_none());
    // Tight budgets, where uniform draws almost never land in the window, are walked to it:
    // 171× (w3a2's grid point) and the cheapest feasible budget (every layer at w2a2).
    let cheapest = g.measure(&Target::Bops(0.0), &vec![(2.0, 2.0); g.layers.len()]);
    for target in [Target::Compression(171.0), Target::Bops(cheapest)] {
        let limit = g.limit(&target);
        for seed in 0..3 {
            let p = random_policy(&t, &g, &target, 0.02, seed, 1000)
                .unwrap_or_else(|| panic!("{target}: a feasible budget must get a policy"));
            let cost = g.measure(&target, &bits(&p));
            assert!(
                cost <= limit * (1.0 + 1e-12),
                "{target}: {cost} over {limit}"
            );
            assert!(cost >= 0.98 * limit, "{target}: {cost} far under {limit}");
        }
    }
}

/// A search SIGKILLed after some epochs resumes from its last snapshot and ends exactly where
/// an uninterrupted search ends: same per-epoch log, same policy; the snapshots are removed.
#[test]
fn killed_search_resumes_to_the_same_policy() {
    let (dir, t) = mnist_teacher(2);
    let t_s = t.to_str().unwrap().to_string();
    let args = |out: &std::path::Path| -> Vec<String> {
        let mut a: Vec<String> = search_args(&t_s, out.to_str().unwrap(), "20", "3")
            .into_iter()
            .map(String::from)
            .collect();
        let e = a.iter().position(|x| x == "--epochs").unwrap();
        a[e + 1] = "3".into();
        a
    };
    let full = dir.path().join("full");
    let o = gmpq().args(args(&full)).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));

    let resumed = dir.path().join("resumed");
    let snapshot = resumed.join("search-state-search-compression-64x.safetensors");
    let mut child = gmpq()
        .args(args(&resumed))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while !snapshot.exists() {
        assert!(std::time::Instant::now() < deadline, "no snapshot appeared");
        assert!(child.try_wait().unwrap().is_none(), "search ended early");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL, after at least one epoch
    child.wait().unwrap();
    assert!(
        !resumed.join("policy.json").exists(),
        "the search finished before the kill; the test did not interrupt it"
    );
    let o = gmpq()
        .env("GMPQ_LOG", "info")
        .args(args(&resumed))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    // It continued (a fresh start would reach the same numbers, deterministically).
    assert!(
        stderr(&o).contains("resuming after epoch"),
        "{}",
        stderr(&o)
    );
    let log = |d: &std::path::Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(d.join("search-log.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (a, b) = (log(&full), log(&resumed));
    assert_eq!(b.len(), 3, "every epoch logged once");
    for (x, y) in a.iter().zip(&b) {
        for k in [
            "epoch",
            "ce",
            "attribution_loss",
            "lambda",
            "argmax_bops",
            "images",
        ] {
            assert_eq!(
                x[k], y[k],
                "epoch {}: {k} differs after resuming",
                x["epoch"]
            );
        }
    }
    let layers = |d: &std::path::Path| Policy::load(&d.join("policy.json")).unwrap().layers;
    assert_eq!(layers(&full), layers(&resumed));
    assert!(!snapshot.exists(), "snapshot left behind");
}

/// An unreachable budget is refused before any training, naming the cheapest cost.
#[test]
fn infeasible_search_budget_fails_before_training() {
    let (dir, t) = mnist_teacher(1);
    let o = dir.path().join("o");
    let mut args = search_args(t.to_str().unwrap(), o.to_str().unwrap(), "20", "1");
    let i = args
        .iter()
        .position(|a| *a == "--target-compression")
        .unwrap();
    args[i + 1] = "100000";
    let out = run(&args);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("cannot be met") && err.contains("w2a2") && err.contains("compression"),
        "{err}"
    );
    assert!(
        !o.join("search-log.jsonl").exists(),
        "no epoch may run for an infeasible budget"
    );
}

/// The equality budget lets λ change sign: an expected cost under the budget drives λ below
/// zero (pulling the cost up), one over it drives λ up; the upper bound only shrinks toward 0.
#[test]
fn equality_budget_turns_lambda_negative_under_budget() {
    use gmpq::search::{BudgetMode, DualWeight};
    let mut eq = DualWeight {
        lambda: 3e-4,
        rate: 1.0,
        mode: BudgetMode::Equality,
        scale: 3e-4,
    };
    let mut ub = DualWeight {
        mode: BudgetMode::UpperBound,
        rate: 0.05,
        ..eq
    };
    for _ in 0..20 {
        eq.update(0.8, 1.0);
        ub.update(0.8, 1.0);
    }
    assert!(eq.lambda < 0.0, "equality: {}", eq.lambda);
    assert!(
        ub.lambda > 0.0 && ub.lambda < 3e-4,
        "upper bound: {}",
        ub.lambda
    );
    for _ in 0..40 {
        eq.update(1.2, 1.0);
    }
    assert!(eq.lambda > 0.0, "equality over budget: {}", eq.lambda);
}

#[test]
fn temperature_schedule_is_geometric_between_its_ends() {
    let t = gmpq::search::TemperatureSchedule {
        start: 1.0,
        end: 0.25,
    };
    assert_eq!(t.at(0, 5), 1.0);
    assert!((t.at(2, 5) - 0.5).abs() < 1e-12);
    assert!((t.at(4, 5) - 0.25).abs() < 1e-12);
    assert_eq!(t.at(9, 5), t.at(4, 5));
}

/// The budget penalty `μ·(E[cost]/limit − 1)²` pulls the expected bits down over budget and
/// up under it, and its measure is the geometry's own.
#[test]
fn budget_penalty_pulls_toward_the_budget_from_both_sides() {
    use gmpq::search::Geometry;
    let g = quant::build(&cfg(), Precision::Full, Device::Cpu).unwrap();
    let geometry = Geometry::new(g.net.convs(), g.net.fc_spec());
    let n = geometry.layers.len();
    let at = |b: f64| -> Vec<(f64, f64)> { vec![(b, b); n] };
    let size_at = |b: f64| geometry.measure(&Target::SizeMb(1.0), &at(b));
    let mid_size = (size_at(2.0) + size_at(6.0)) / 2.0;
    for target in [Target::Compression(128.0), Target::SizeMb(mid_size)] {
        let limit = geometry.limit(&target);
        for (bits, over) in [(6.0, true), (2.0, false)] {
            let measured = geometry.measure(&target, &at(bits));
            assert_eq!(measured > limit, over, "{target}: {measured} vs {limit}");
            let w = Tensor::from(bits as f32).set_requires_grad(true);
            let a = Tensor::from(bits as f32).set_requires_grad(true);
            let pairs: Vec<(Tensor, Tensor)> = (0..n)
                .map(|_| (w.shallow_clone(), a.shallow_clone()))
                .collect();
            let m = geometry.measure_tensor(&target, &pairs);
            assert!((m.double_value(&[]) - measured).abs() <= 1e-4 * measured.abs());
            let penalty = (m / limit - 1.0).square() * 10.0;
            penalty.backward();
            let grad = w.grad().double_value(&[]);
            // Gradient descent lowers the bits over budget and raises them under it.
            assert_eq!(grad > 0.0, over, "{target} at {bits} bits: gradient {grad}");
        }
    }
}

/// `--recipe scarce` runs end to end and records every setting it chose in the policy.
#[test]
fn scarce_recipe_records_its_settings_and_meets_the_budget() {
    let (dir, t) = mnist_teacher(1);
    let o = dir.path().join("o");
    let mut args = search_args(t.to_str().unwrap(), o.to_str().unwrap(), "20", "1");
    let i = args.iter().position(|a| *a == "--epochs").unwrap();
    args[i + 1] = "5";
    let r = args.iter().position(|a| *a == "--recipe").unwrap();
    args[r + 1] = "scarce";
    let out = run(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let policy = Policy::load(&o.join("policy.json")).unwrap();
    let meta = policy.meta.clone().unwrap();
    let s = &meta["search"];
    assert_eq!(s["recipe"], "scarce");
    assert_eq!(s["alpha_optimizer"], "adam");
    assert_eq!(s["budget_mode"], "penalty");
    assert_eq!(s["budget_penalty"], 10.0);
    assert_eq!(s["alpha_lr"], 0.03);
    assert_eq!(s["extraction"], "knapsack");
    assert_eq!(s["alpha_frozen_epochs"], 1);
    assert_eq!(s["temperature"]["end"], 0.2);
    assert_eq!(meta["threads"], 2);
    assert!((meta["alpha"]["temperature"].as_f64().unwrap() - 0.2).abs() < 1e-9);
    // Self-describing: the format, the FP layers, the quantizers, and which bits each α is.
    assert_eq!(policy.format, gmpq::policy::POLICY_FORMAT);
    assert_eq!(
        policy.fp_layers,
        vec!["conv1".to_string(), "fc".to_string()]
    );
    assert!(policy.quantizer.activation.contains("clip"));
    assert_eq!(
        meta["alpha"]["bits"]["weight"],
        serde_json::json!([2, 3, 4, 6])
    );
    let totals = policy.totals.unwrap();
    assert!(totals.compression >= 64.0, "{}", totals.compression);
}

/// Hutchinson's estimator on a quadratic with a known Hessian: `L = ½·pᵀAp` over two
/// parameter tensors, whose Hessian blocks have traces A₀₀+A₁₁+A₂₂ and A₃₃+A₄₄.
#[test]
fn hutchinson_trace_of_a_quadratic_is_within_5_percent() {
    tch::manual_seed(0);
    let a = Tensor::from_slice(&[
        4.0f32, 0.5, -0.3, 0.2, 0.1, //
        0.5, 3.0, 0.4, -0.2, 0.3, //
        -0.3, 0.4, 2.0, 0.1, -0.1, //
        0.2, -0.2, 0.1, 5.0, 0.6, //
        0.1, 0.3, -0.1, 0.6, 1.5,
    ])
    .view([5, 5]);
    let p1 = Tensor::from_slice(&[0.3f32, -1.0, 0.7]).set_requires_grad(true);
    let p2 = Tensor::from_slice(&[1.2f32, -0.4]).set_requires_grad(true);
    let p = Tensor::cat(&[&p1, &p2], 0);
    let loss = p.dot(&a.mv(&p)) * 0.5;
    let traces = gmpq::search::hawq::hutchinson_traces(&loss, &[p1, p2], 400);
    for (got, want) in traces.iter().zip([9.0, 6.5]) {
        assert!((got - want).abs() <= 0.05 * want, "trace {got} vs {want}");
    }
}

/// `gmpq --threads 2 search --method hawq` on 256 MNIST images (64 analysed, 2 probes) under
/// `compression`, into `out`, with any `extra` flags.
fn hawq_search(
    teacher: &std::path::Path,
    out: &std::path::Path,
    compression: &str,
    extra: &[&str],
) -> std::process::Output {
    let mut args = vec![
        "--threads",
        "2",
        "search",
        "--method",
        "hawq",
        "--teacher",
        teacher.to_str().unwrap(),
        "--data",
        "bundled:mnist",
        "--limit",
        "256",
        "--hawq-images",
        "64",
        "--hawq-samples",
        "2",
        "--target-compression",
        compression,
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    run(&args)
}

/// `--method hawq`: sensitivities measured on the proxy, the knapsack under the budget.
#[test]
fn hawq_search_meets_the_budget_and_records_its_sensitivities() {
    let (dir, t) = mnist_teacher(1);
    let o = dir.path().join("o");
    let out = hawq_search(&t, &o, "128", &["--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json is JSON");
    assert_eq!(v["written"][0]["target"]["compression"], 128.0);
    let policy = Policy::load(&o.join("policy.json")).unwrap();
    let totals = policy.totals.clone().unwrap();
    assert!(totals.compression >= 128.0, "{}", totals.compression);
    let meta = policy.meta.unwrap();
    assert_eq!(meta["method"], "hawq");
    let s = &meta["hawq"]["sensitivities"];
    for l in &policy.layers {
        let w = s["weight"][&l.name].as_array().unwrap();
        assert_eq!(w.len(), 4);
        // Fewer bits, more weight perturbation: the sensitivity falls with the bitwidth.
        let w: Vec<f64> = w.iter().map(|x| x.as_f64().unwrap()).collect();
        assert!(w.windows(2).all(|p| p[0] >= p[1]), "{}: {w:?}", l.name);
        assert_eq!(s["activation"][&l.name].as_array().unwrap().len(), 4);
    }
}

/// The sensitivity analysis draws its Hutchinson probes from a fixed seed: two runs of the
/// same HAWQ search measure the same sensitivities and write the same policy.
#[test]
fn hawq_search_is_reproducible() {
    let (dir, t) = mnist_teacher(1);
    let policies: Vec<Policy> = ["a", "b"]
        .iter()
        .map(|name| {
            let o = dir.path().join(name);
            let out = hawq_search(&t, &o, "100", &[]);
            assert!(out.status.success(), "{}", stderr(&out));
            Policy::load(&o.join("policy.json")).unwrap()
        })
        .collect();
    let sens = |p: &Policy| p.meta.as_ref().unwrap()["hawq"]["sensitivities"].clone();
    assert_eq!(sens(&policies[0]), sens(&policies[1]));
    assert_eq!(policies[0].layers, policies[1].layers);
}

/// `gmpq search --method uniform|random` is the pipeline's own path for those arms: given the
/// low-bit study's proxy teacher, it writes the study's committed policies byte for byte (so
/// a study still copies their fine-tunings between runs).
#[test]
fn uniform_and_random_come_from_gmpq_search_as_the_study_wrote_them() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let study = root.join("studies/runs/fmnist-lowbit");
    let teacher = study.join("teacher-mnist-to-fmnist/last.safetensors");
    let run = study.join("mnist-to-fmnist-c171-seed0");
    let dir = tempfile::tempdir().unwrap();
    for (method, extra) in [("uniform", vec![]), ("random", vec!["--seed", "0"])] {
        let out = dir.path().join(method);
        let mut args = vec![
            "search",
            "--method",
            method,
            "--teacher",
            teacher.to_str().unwrap(),
            "--data",
            "bundled:mnist",
            "--target-compression",
            "171",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        let o = common::gmpq().args(&args).output().unwrap();
        assert!(o.status.success(), "{}", common::stderr(&o));
        let ours = std::fs::read(out.join("policy.json")).unwrap();
        let theirs = std::fs::read(run.join(format!("search-{method}/policy.json"))).unwrap();
        assert!(
            ours == theirs,
            "{method}: the policy differs from the study's"
        );
    }
}
