//! Inputs are checked before any work starts, and errors name the real problem (issue:
//! no silent wrong answers). One test per case of the table.

mod common;

use common::{bundled, run, stderr};
use gmpq::model::{Arch, ModelConfig};
use gmpq::quant::{self, Precision};
use std::path::Path;

/// A CIFAR-10 binary with `n` records.
fn cifar10(path: &Path, n: usize) {
    let mut b = Vec::new();
    for i in 0..n {
        b.push((i % 10) as u8);
        b.extend(std::iter::repeat_n((i * 7 % 256) as u8, 3072));
    }
    std::fs::write(path, b).unwrap();
}

fn fails_with(args: &[&str], needles: &[&str]) -> String {
    let o = run(args);
    assert!(!o.status.success(), "{args:?} succeeded");
    let e = stderr(&o);
    for n in needles {
        assert!(e.contains(n), "{args:?}: '{n}' not in: {e}");
    }
    assert_eq!(e.trim().lines().count(), 1, "one line: {e}");
    e
}

#[test]
fn bit_names_state_the_valid_range() {
    for u in ["w1a1", "w32a32"] {
        fails_with(
            &["bops", "--model", "resnet20", "--uniform", u],
            &["2..=16", u],
        );
    }
}

#[test]
fn a_missing_file_is_reported_once() {
    let e = fails_with(
        &[
            "eval",
            "--checkpoint",
            "/nonexistent/x.safetensors",
            "--data",
            "bundled:mnist",
        ],
        &["/nonexistent/x.safetensors", "No such file"],
    );
    assert_eq!(e.matches("No such file").count(), 1, "{e}");
    assert_eq!(e.matches("/nonexistent/x.safetensors").count(), 1, "{e}");
}

#[test]
fn a_chart_into_a_missing_folder_names_the_folder() {
    fails_with(
        &[
            "bops",
            "--model",
            "resnet20",
            "--uniform",
            "w4a4",
            "--chart",
            "/nonexistent/x.svg",
        ],
        &["--chart", "/nonexistent", "does not exist"],
    );
}

#[test]
fn model_flags_that_do_not_apply_are_refused() {
    fails_with(
        &["bops", "--model", "resnet20", "--stem", "imagenet"],
        &["--stem", "resnet20"],
    );
    fails_with(
        &["bops", "--model", "resnet18", "--width", "0.5"],
        &["--width", "mobilenetv2"],
    );
    for extra in [["--input-size", "32"], ["--stem", "cifar"]] {
        let mut args = vec![
            "import",
            "--model",
            "efficientnet-lite0",
            "--weights",
            "w",
            "--out",
            "o",
        ];
        args.extend(extra);
        fails_with(&args, &[extra[0], "efficientnet-lite0"]);
    }
}

#[test]
fn pipeline_checks_its_inputs_before_creating_anything() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = out.to_str().unwrap();
    let e = fails_with(
        &[
            "pipeline",
            "--proxy",
            "bogus:x",
            "--target",
            "bundled:mnist",
            "--out",
            o,
        ],
        &["--proxy bogus:x"],
    );
    assert!(!e.contains("--data"), "{e}");
    fails_with(
        &[
            "pipeline",
            "--proxy",
            "bundled:mnist",
            "--target",
            "idx:/nonexistent",
            "--out",
            o,
        ],
        &["--target idx:/nonexistent", "not found"],
    );
    // A budget below the all-2-bit ResNet-20 (256.9×) is refused before any teacher trains.
    fails_with(
        &[
            "pipeline",
            "--proxy",
            "bundled:fashion-mnist:500",
            "--target",
            "bundled:fashion-mnist",
            "--target-compression",
            "1000",
            "--out",
            o,
        ],
        &["cannot be met", "w2a2", "256.9×"],
    );
    assert!(!out.exists(), "a run that cannot start leaves no folder");
}

#[test]
fn eval_names_shape_and_class_mismatches() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("fmnist.safetensors");
    common::fp_checkpoint(&ModelConfig::new(Arch::ResNet20, 1, 10, 28), &ck);
    let bin = dir.path().join("c.bin");
    cifar10(&bin, 40);
    let data = format!("cifar10:{}", bin.display());
    fails_with(
        &[
            "eval",
            "--checkpoint",
            ck.to_str().unwrap(),
            "--data",
            &data,
        ],
        &["3×32×32", "1×28×28"],
    );
    // 1000 classes cannot be scored against 10 labels.
    let big = dir.path().join("big.safetensors");
    common::fp_checkpoint(&ModelConfig::new(Arch::ResNet20, 1, 1000, 28), &big);
    fails_with(
        &[
            "eval",
            "--checkpoint",
            big.to_str().unwrap(),
            "--data",
            "bundled:mnist",
        ],
        &["10 classes", "1000"],
    );
    // A failed search leaves no run folder behind (only its lock would be in it).
    let out = dir.path().join("search");
    fails_with(
        &[
            "search",
            "--teacher",
            ck.to_str().unwrap(),
            "--data",
            &data,
            "--limit",
            "16",
            "--batch-size",
            "4",
            "--val-images",
            "4",
            "--epochs",
            "1",
            "--target-compression",
            "64",
            "--out",
            out.to_str().unwrap(),
        ],
        &["3×32×32", "1×28×28"],
    );
    assert!(!out.exists(), "{} left behind", out.display());
}

#[test]
fn bops_measures_a_policy_on_its_own_geometry() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ModelConfig::new(Arch::ResNet20, 1, 10, 28);
    let g = quant::build(&cfg, Precision::Full, tch::Device::Cpu).unwrap();
    let p = gmpq::policy::Policy::uniform(&cfg, g.net.convs(), 4, 2)
        .with_totals(g.net.convs(), g.net.fc_spec());
    let path = dir.path().join("p.json");
    p.save(&path).unwrap();
    // bops' default --input is 32; the policy says 28.
    let o = run(&[
        "bops",
        "--policy",
        path.to_str().unwrap(),
        "--channels",
        "1",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let c = v["totals"]["compression"].as_f64().unwrap();
    assert!((c - p.totals.unwrap().compression).abs() < 1e-9, "{c}");
    assert_eq!(v["model"]["input_size"], 28);
    assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));
    // Without --channels 1 the file's own totals disagree with the 3-channel stem: a
    // warning names both, instead of a silently different compression.
    let o = run(&["bops", "--policy", path.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("warning") && e.contains("3 channels") && e.contains("--channels"),
        "{e}"
    );
}

#[test]
fn too_many_threads_get_a_warning() {
    let o = common::gmpq()
        .env("GMPQ_LOG", "warn")
        .args(["--threads", "999", "info"])
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(stderr(&o).contains("more than the"), "{}", stderr(&o));
}

#[test]
fn folder_datasets_accept_the_val_split_and_idx_refuses_it() {
    let data = format!("idx:{}", bundled("mnist").display());
    fails_with(
        &[
            "eval",
            "--checkpoint",
            "x.safetensors",
            "--data",
            &data,
            "--split",
            "val",
        ],
        &["val is for image folders"],
    );
}

/// Every `--flag` that `gmpq CMD --help` shows, for every command and bench subcommand.
fn visible_flags() -> Vec<(String, String)> {
    let help = |args: &[&str]| {
        let o = run(args);
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let commands = |text: &str| -> Vec<String> {
        text.split("Commands:")
            .nth(1)
            .unwrap_or("")
            .split("Options:")
            .next()
            .unwrap_or("")
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .filter(|c| c != "help")
            .collect()
    };
    let mut out = Vec::new();
    let mut push_flags = |cmd: &str, text: &str| {
        for word in text.split(|c: char| c.is_whitespace() || c == ',' || c == '=') {
            if let Some(flag) = word.strip_prefix("--") {
                let flag = flag.trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
                if !flag.is_empty() && flag.chars().all(|c| c.is_ascii_lowercase() || c == '-') {
                    out.push((cmd.to_string(), flag.to_string()));
                }
            }
        }
    };
    for cmd in commands(&help(&["--help"])) {
        let text = help(&[&cmd, "--help"]);
        if cmd == "bench" {
            for sub in commands(&text) {
                push_flags(&format!("bench {sub}"), &help(&["bench", &sub, "--help"]));
            }
        } else {
            push_flags(&cmd, &text);
        }
    }
    out
}

#[test]
fn no_two_commands_spell_the_same_option_differently() {
    let flags = visible_flags();
    assert!(flags.len() > 100, "parsed only {} flags", flags.len());
    // Options with a fixed set of values list them (clap value enums).
    for (cmd, flag) in [
        ("eval", "split"),
        ("search", "attribution"),
        ("quantize", "calibration"),
    ] {
        let o = run(&[cmd, &format!("--{flag}"), "bogus"]);
        let e = stderr(&o);
        assert!(e.contains("possible values"), "{cmd} --{flag}: {e}");
    }
    // finetune's model is --init's.
    let o = run(&[
        "finetune",
        "--init",
        "x",
        "--uniform",
        "w4a4",
        "--model",
        "resnet20",
    ]);
    assert!(
        stderr(&o).contains("--model does not apply with --init"),
        "{}",
        stderr(&o)
    );
    // Synonyms: one spelling per group may be shown (others stay as hidden aliases).
    for group in [
        ["input-size", "input"],
        ["channels", "in-channels"],
        ["classes", "num-classes"],
        ["limit", "count"],
        ["test-limit", "eval-limit"],
        ["calib-limit", "calib-images"],
        ["val-limit", "val-images"],
    ] {
        let used: std::collections::BTreeSet<&str> = flags
            .iter()
            .filter(|(_, f)| group.contains(&f.as_str()))
            .map(|(_, f)| f.as_str())
            .collect();
        assert!(used.len() <= 1, "{group:?} spelled {used:?}");
    }
}

/// `study` checks every pair's data and every budget before a teacher trains, and leaves no
/// folder behind when it cannot start.
#[test]
fn study_checks_its_inputs_before_creating_anything() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("study");
    let config = dir.path().join("study.json");
    let write = |proxy_b: &str, budget_a: u32| {
        let c = serde_json::json!({
            "target": { "data": "bundled:fashion-mnist", "epochs": 1 },
            "pairs": [
                { "name": "a", "proxy": { "data": "bundled:mnist:500", "epochs": 1 },
                  "budgets": [ { "compression": budget_a, "seeds": 1 } ] },
                { "name": "b", "proxy": { "data": proxy_b, "epochs": 1 },
                  "budgets": [ { "compression": 64, "seeds": 1 } ] }
            ],
            "arms": ["gmpq"], "search_epochs": 1, "target_search_epochs": 1, "finetune_epochs": 1
        });
        std::fs::write(&config, c.to_string()).unwrap();
    };
    let args = [
        "study",
        config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    write("idx:/nonexistent:500", 64);
    fails_with(&args, &["pair b", "/nonexistent", "not found"]);
    write("bundled:mnist:500", 300);
    fails_with(&args, &["pair a", "300", "w2a2", "256.9×"]);
    assert!(!out.exists(), "a study that cannot start leaves no folder");
}

/// `--method edmips` is the supernet search without the attribution term: a contradicting
/// `--attribution-weight` is refused before anything is read.
#[test]
fn edmips_refuses_an_attribution_weight() {
    fails_with(
        &[
            "search",
            "--method",
            "edmips",
            "--attribution-weight",
            "5",
            "--teacher",
            "/nonexistent/t.safetensors",
            "--data",
            "bundled:mnist",
            "--target-compression",
            "32",
        ],
        &["--method edmips", "--attribution-weight 5"],
    );
    // clap's own message lists the methods.
    let o = run(&[
        "search",
        "--method",
        "hawk",
        "--teacher",
        "x",
        "--data",
        "bundled:mnist",
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("'hawk'") && e.contains("uniform-fill"), "{e}");
}

#[test]
fn a_zero_batch_size_blames_the_batch_sizes_alone() {
    // clap's own message (its usage lines follow).
    let o = run(&["bench", "infer", "--batch-sizes", "0"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("'0' for '--batch-sizes"), "{e}");
    assert!(!e.contains("--steps"), "{e}");
}

/// List defaults show as the flags take them: comma-separated.
#[test]
fn help_shows_list_defaults_comma_separated() {
    let o = run(&["pipeline", "--help"]);
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(help.contains("[default: 2,3,4,6]"), "{help}");
    assert!(help.contains("[default: uniform,uniform-fill]"), "{help}");
    assert!(!help.contains("[default: 2 3 4 6]"), "{help}");
    // Which engine runs which file, as the commands do it: an integer packed file runs in
    // ONNX Runtime, and export does not read one.
    let predict = String::from_utf8_lossy(&run(&["predict", "--help"]).stdout).into_owned();
    assert!(predict.contains("integer packed file"), "{predict}");
    assert!(
        !predict.contains("packed file (.safetensors, runs in libtorch)"),
        "{predict}"
    );
    let export = String::from_utf8_lossy(&run(&["export", "--help"]).stdout).into_owned();
    assert!(
        !export.contains("`gmpq eval` and `gmpq export` read it"),
        "{export}"
    );
    assert!(export.contains("fake-quant packed file"), "{export}");
}
