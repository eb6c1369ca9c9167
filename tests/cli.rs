//! End-to-end CLI behaviour on the bundled data.

mod common;

use common::{bundled, gmpq, run, stderr};

#[test]
fn train_then_eval_on_bundled_data() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let data = format!("idx:{}", bundled("mnist").display());
    let o = run(&[
        "train",
        "--data",
        &data,
        "--limit",
        "1000",
        "--test-limit",
        "500",
        "--epochs",
        "2",
        "--batch-size",
        "50",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["epochs"], 2);
    let top1 = v["final"]["test_top1"].as_f64().unwrap();
    // Two short epochs on 1,000 digits already learn something (chance is 10%).
    assert!(top1 > 50.0, "test top-1 {top1}");

    let ckpt = out.join("last.safetensors");
    assert!(out.join("last.json").is_file());
    let o = run(&[
        "eval",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--data",
        &data,
        "--limit",
        "500",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let m: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(m["images"], 500);
    // The same 500 stratified test images as during training: the same accuracy.
    assert!(
        (m["top1"].as_f64().unwrap() - top1).abs() < 1e-9,
        "{m} vs {top1}"
    );
    assert!(m["top5"].as_f64().unwrap() >= m["top1"].as_f64().unwrap());

    // Calibration-only W8A8 quantization barely moves accuracy; the saved checkpoint carries
    // its policy, so `eval` and `bops` need nothing else.
    let q = dir.path().join("w8a8.safetensors");
    let o = run(&[
        "quantize",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--uniform",
        "w8a8",
        "--calib-data",
        &data,
        "--calib-images",
        "256",
        "--eval-limit",
        "500",
        "--out",
        q.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!((r["fp"]["top1"].as_f64().unwrap() - top1).abs() < 1e-9);
    let drop = r["top1_drop"].as_f64().unwrap();
    assert!(drop.abs() <= 2.0, "W8A8 drop {drop}");
    let o = run(&[
        "eval",
        "--checkpoint",
        q.to_str().unwrap(),
        "--data",
        &data,
        "--limit",
        "500",
        "--json",
    ]);
    let m: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!((m["top1"].as_f64().unwrap() - r["quantized"]["top1"].as_f64().unwrap()).abs() < 1e-9);
    let o = run(&["bops", "--checkpoint", q.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let b: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(b["totals"], r["totals"]);
    assert_eq!(b["layers"][1]["w_bits"], 8);

    // Quantization-aware fine-tuning from the FP checkpoint: the result carries its policy.
    let ft = dir.path().join("ft");
    let o = run(&[
        "finetune",
        "--init",
        ckpt.to_str().unwrap(),
        "--uniform",
        "w4a4",
        "--data",
        &data,
        "--limit",
        "500",
        "--test-limit",
        "500",
        "--epochs",
        "1",
        "--batch-size",
        "50",
        "--out",
        ft.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let f: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let o = run(&[
        "eval",
        "--checkpoint",
        ft.join("last.safetensors").to_str().unwrap(),
        "--data",
        &data,
        "--limit",
        "500",
        "--json",
    ]);
    let m: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!((m["top1"].as_f64().unwrap() - f["final"]["test_top1"].as_f64().unwrap()).abs() < 1e-9);
    let sidecar: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ft.join("last.json")).unwrap()).unwrap();
    assert_eq!(sidecar["precision"]["policy"]["layers"][0]["w_bits"], 4);
    assert_eq!(sidecar["calibration"].as_array().unwrap().len(), 20);

    // A policy for another model is refused, naming the problem.
    let pol = dir.path().join("r56.json");
    std::fs::write(&pol, r#"{"model":"resnet56","input_size":28,"candidates":{"weight":[4],"activation":[4]},"layers":[]}"#).unwrap();
    let o = run(&[
        "quantize",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--policy",
        pol.to_str().unwrap(),
        "--calib-data",
        &data,
        "--out",
        dir.path().join("x.safetensors").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("resnet56"), "{}", stderr(&o));
}

#[test]
fn bops_prints_worked_numbers() {
    let o = run(&[
        "bops",
        "--model",
        "resnet18",
        "--stem",
        "cifar",
        "--input",
        "32",
        "--uniform",
        "w4a4",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("19 layers, 553648128 MACs"), "{text}");
    assert!(text.contains("(8858.4 M)"), "{text}");
    assert!(text.contains("full-precision layers (stem, head"), "{text}");
}

#[test]
fn eval_refuses_non_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("junk.safetensors");
    std::fs::write(&f, b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ").unwrap();
    let o = run(&[
        "eval",
        "--checkpoint",
        f.to_str().unwrap(),
        "--data",
        "bundled:mnist",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("junk.safetensors"), "{}", stderr(&o));
}

#[test]
fn omp_spinning_is_bounded_unless_user_configures_it() {
    let o = run(&["info"]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(text.contains("OMP_WAIT_POLICY: (unset)"), "{text}");
    assert!(text.contains("GOMP_SPINCOUNT: 10000"), "{text}");
    // A user's own choice is left alone.
    let o = gmpq()
        .arg("info")
        .env("OMP_WAIT_POLICY", "ACTIVE")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        text.contains("OMP_WAIT_POLICY: ACTIVE") && text.contains("GOMP_SPINCOUNT: (unset)"),
        "{text}"
    );
    let o = gmpq()
        .arg("info")
        .env("GOMP_SPINCOUNT", "500")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        text.contains("GOMP_SPINCOUNT: 500") && text.contains("OMP_WAIT_POLICY: (unset)"),
        "{text}"
    );
    let o = run(&["--threads", "1", "info"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("threads: 1"));
}

/// `gmpq info` asks the libraries it loaded: the wheel's libtorch version beside the library
/// in this process's memory map, ONNX Runtime's own build description and path.
#[test]
fn info_reports_the_loaded_libraries() {
    let o = run(&["info"]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let torch = text.lines().find(|l| l.starts_with("libtorch: ")).unwrap();
    assert!(
        torch.contains("2.13.0") && torch.contains("libtorch_cpu.so"),
        "{text}"
    );
    let ort = text
        .lines()
        .find(|l| l.starts_with("onnx runtime: "))
        .unwrap();
    assert!(
        ort.contains("ORT Build Info") && ort.contains("libonnxruntime"),
        "{text}"
    );
}

#[test]
fn help_lists_commands() {
    let o = run(&["--help"]);
    let text = String::from_utf8_lossy(&o.stdout);
    for cmd in [
        "train", "finetune", "eval", "import", "bench", "demo", "subset", "pipeline", "report",
        "search", "quantize", "bops",
    ] {
        assert!(text.contains(cmd), "--help lacks {cmd}");
    }
}

#[test]
fn bench_train_reports_throughput() {
    let o = run(&[
        "bench",
        "train",
        "--batch-size",
        "8",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["images_per_second"].as_f64().unwrap() > 0.0);
    assert_eq!(
        v["param_layout"], "channels-last",
        "the default training layout"
    );
    let o = run(&[
        "bench",
        "train",
        "--batch-size",
        "8",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--param-layout",
        "contiguous",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["param_layout"], "contiguous");
}

/// A second process on a folder that a running training holds is refused by name; the lock
/// goes with the process, so once it is killed the folder resumes.
#[test]
fn a_folder_in_use_is_refused_and_freed_when_its_process_dies() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let data = format!("idx:{}", bundled("mnist").display());
    let args = [
        "--threads",
        "1",
        "train",
        "--data",
        &data,
        "--limit",
        "2000",
        "--test-limit",
        "200",
        "--epochs",
        "50",
        "--out",
        out.to_str().unwrap(),
        "--resume",
    ];
    let mut first = gmpq().args(args).spawn().unwrap();
    let lock = out.join(".gmpq.lock");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    // The lock names its holder: "PID on HOST".
    let holder = format!("{} on {}", first.id(), gmpq::files::hostname());
    while std::fs::read_to_string(&lock).unwrap_or_default().trim() != holder {
        assert!(std::time::Instant::now() < deadline, "no lock appeared");
        assert!(first.try_wait().unwrap().is_none(), "training ended early");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let o = run(&args);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("in use by another gmpq process") && err.contains(&first.id().to_string()),
        "{err}"
    );
    first.kill().unwrap();
    first.wait().unwrap();
    let mut resumed = args.to_vec();
    let epochs = resumed.iter().position(|a| *a == "--epochs").unwrap();
    resumed[epochs + 1] = "1";
    let o = run(&resumed);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn study_refuses_an_unknown_pair_and_tables_of_no_study() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("study.json");
    std::fs::write(
        &config,
        r#"{"target": {"data": "idx:x", "epochs": 1},
            "pairs": [{"name": "a-to-b", "proxy": {"data": "idx:y:100", "epochs": 1},
                       "budgets": [{"compression": 64, "seeds": 1}]}],
            "arms": ["gmpq"], "search_epochs": 1, "target_search_epochs": 1,
            "finetune_epochs": 1}"#,
    )
    .unwrap();
    let out = dir.path().join("out");
    let (c, o) = (config.to_str().unwrap(), out.to_str().unwrap());
    let r = run(&["study", c, "--out", o, "--pair", "b-to-c"]);
    assert!(!r.status.success());
    assert!(
        stderr(&r).contains("no such pair (a-to-b)"),
        "{}",
        stderr(&r)
    );
    let r = run(&["study", c, "--out", o, "--tables-only"]);
    assert!(!r.status.success());
    assert!(stderr(&r).contains("holds no study"), "{}", stderr(&r));
    assert!(!out.exists(), "a refused study left a folder behind");
}

#[test]
fn study_skips_a_run_another_process_holds() {
    let dir = tempfile::tempdir().unwrap();
    let fmnist = format!("idx:{}", bundled("fashion-mnist").display());
    let config = dir.path().join("study.json");
    std::fs::write(
        &config,
        format!(
            r#"{{"target": {{"data": "{fmnist}:256", "epochs": 1}},
                "pairs": [{{"name": "a-to-b", "proxy": {{"data": "{fmnist}:128", "epochs": 1}},
                            "budgets": [{{"compression": 64, "seeds": 1}}]}}],
                "arms": ["gmpq"], "search_epochs": 1, "target_search_epochs": 1,
                "finetune_epochs": 1}}"#
        ),
    )
    .unwrap();
    let out = dir.path().join("out");
    let run_dir = out.join("a-to-b-c64-seed0");
    // This test process stands in for a second study working on the run.
    let held = gmpq::files::DirLock::acquire(&run_dir).unwrap();
    let (c, o) = (config.to_str().unwrap(), out.to_str().unwrap());
    let r = run(&["--threads", "1", "study", c, "--out", o]);
    assert!(r.status.success(), "{}", stderr(&r));
    let stdout = String::from_utf8_lossy(&r.stdout);
    assert!(
        stdout.contains("in use by another gmpq process") && stdout.contains("skipping this run"),
        "{stdout}"
    );
    assert!(
        stdout.contains("1 run(s) belonged to another process"),
        "{stdout}"
    );
    assert!(out.join("results.csv").exists());
    let entries: Vec<_> = std::fs::read_dir(&run_dir).unwrap().flatten().collect();
    assert_eq!(
        entries.len(),
        1,
        "the skipped run was written to: {entries:?}"
    );
    drop(held);
}
