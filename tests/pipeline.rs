//! `gmpq pipeline`: killed in each stage, it resumes without redoing finished stages; it
//! refuses changed settings and mismatched teachers/policies; `gmpq report` renders the run.

mod common;

use common::{bundled, gmpq, run, stderr};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

fn pipeline_args(out: &Path) -> Vec<String> {
    let fmnist = format!("idx:{}", bundled("fashion-mnist").display());
    [
        "--threads",
        "1",
        "pipeline",
        "--proxy",
        &format!("{fmnist}:300"),
        "--target",
        &fmnist,
        "--target-limit",
        "512",
        "--target-test-limit",
        "200",
        "--baseline",
        "uniform",
        "--teacher-epochs",
        "3",
        "--target-teacher-epochs",
        "3",
        "--search-epochs",
        "2",
        "--finetune-epochs",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn record(out: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(out.join("pipeline.json")).ok()?;
    serde_json::from_str(&text).ok()
}

fn stage_status(out: &Path, stage: &str) -> Option<String> {
    let rec = record(out)?;
    rec["stages"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == stage)
        .and_then(|s| s["status"].as_str().map(String::from))
}

/// The file each stage leaves behind when it is done.
fn outputs(out: &Path) -> Vec<(&'static str, PathBuf)> {
    vec![
        ("teacher-proxy", out.join("teacher-proxy/last.safetensors")),
        ("search-gmpq", out.join("search-gmpq/policy.json")),
        ("search-uniform", out.join("search-uniform/policy.json")),
        (
            "teacher-target",
            out.join("teacher-target/last.safetensors"),
        ),
        ("finetune-gmpq", out.join("finetune-gmpq/last.safetensors")),
        (
            "finetune-uniform",
            out.join("finetune-uniform/last.safetensors"),
        ),
        ("validate", out.join("validation.json")),
    ]
}

fn finished_outputs(out: &Path) -> BTreeMap<&'static str, SystemTime> {
    outputs(out)
        .into_iter()
        .filter(|(stage, _)| stage_status(out, stage).as_deref() == Some("done"))
        .filter_map(|(stage, p)| Some((stage, std::fs::metadata(p).ok()?.modified().ok()?)))
        .collect()
}

#[test]
fn pipeline_killed_in_each_stage_resumes_without_redoing_finished_stages() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let args = pipeline_args(&out);
    // Finished outputs and their modification times, as seen at each kill.
    let mut seen: BTreeMap<&'static str, SystemTime> = BTreeMap::new();
    for stage in [
        "teacher-proxy",
        "search-gmpq",
        "teacher-target",
        "finetune-gmpq",
        "finetune-uniform",
    ] {
        let mut child = gmpq()
            .args(&args)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(300);
        while stage_status(&out, stage).as_deref() != Some("running") {
            assert!(Instant::now() < deadline, "stage {stage} never started");
            if let Some(status) = child.try_wait().unwrap() {
                panic!("pipeline exited ({status}) before stage {stage} started");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(400));
        child.kill().unwrap(); // SIGKILL, mid-stage
        child.wait().unwrap();
        let now = finished_outputs(&out);
        for (s, t) in &seen {
            assert_eq!(now.get(s), Some(t), "finished stage {s} was redone");
        }
        assert!(
            !now.contains_key(stage),
            "stage {stage} finished before the kill; the test did not interrupt it"
        );
        seen = now;
    }
    let o = gmpq().args(&args).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    for s in [
        "teacher-proxy",
        "search-gmpq",
        "teacher-target",
        "finetune-gmpq",
    ] {
        assert!(
            stdout.contains(&format!("[{s}] output exists, skipped")),
            "{s} not skipped:\n{stdout}"
        );
    }
    let now = finished_outputs(&out);
    for (s, t) in &seen {
        assert_eq!(now.get(s), Some(t), "finished stage {s} was redone");
    }
    assert_eq!(now.len(), outputs(&out).len(), "not every stage finished");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    for arm in summary["arms"].as_array().unwrap() {
        assert!(arm["top1"].as_f64().is_some(), "no accuracy: {arm}");
        assert!(
            arm["compression"].as_f64().unwrap() >= 64.0 * 0.999,
            "{arm}"
        );
    }
    // Every arm is scored on the held-out validation images (1,000 here), each arm's answer
    // on each recorded; the chosen model is the best there if it leads the simplest policy
    // beyond the noise, else that policy, whatever the test set says; the record says why.
    let arms = summary["arms"].as_array().unwrap();
    let val = |a: &serde_json::Value| a["val_top1"].as_f64().expect("a validation top-1");
    let best = arms.iter().map(val).fold(f64::MIN, f64::max);
    let chosen = arms
        .iter()
        .find(|a| a["arm"] == summary["chosen"])
        .unwrap_or_else(|| panic!("no chosen arm: {summary}"));
    let choice = &summary["choice"];
    assert!(choice["reason"].is_string(), "{summary}");
    let validation: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("validation.json")).unwrap()).unwrap();
    assert_eq!(validation["labels"].as_array().unwrap().len(), 1000);
    match choice["lead"].as_object() {
        Some(lead) if lead["p_value"].as_f64() < lead["level"].as_f64() => {
            assert_eq!(chosen["arm"], lead["challenger"], "{summary}")
        }
        Some(lead) => assert_eq!(chosen["arm"], lead["reference"], "{summary}"),
        None => assert_eq!(val(chosen), best, "{summary}"),
    }
    // ... and it is exported: the QDQ graph, the packed file and which arm they are.
    assert!(out.join("chosen.onnx").is_file() && out.join("chosen.packed.safetensors").is_file());
    let exported: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("chosen.json")).unwrap()).unwrap();
    assert_eq!(exported["arm"], summary["chosen"]);
    // The shipped file itself was run by ONNX Runtime on the test images: its top-1 beside
    // the checkpoint's, and their agreement (the integer graph computes what gmpq does).
    let shipped = &summary["shipped"];
    assert_eq!(shipped["arm"], summary["chosen"], "{summary}");
    assert!(shipped["onnx_top1"].as_f64().is_some(), "{summary}");
    assert!(
        shipped["top1_agreement"].as_f64().unwrap() >= 99.0,
        "{summary}"
    );
    let o = run(&pipeline_args(&out)
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("(chosen)"), "{stdout}");
    assert!(stdout.contains("shipped: chosen.onnx scores"), "{stdout}");

    // The report embeds its charts and heatmaps.
    let o = run(&["report", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    for needle in [
        "<svg",
        "data:image/png;base64,",
        "GMPQ",
        "uniform",
        "gmpq search --teacher",
        "gmpq finetune --init",
        "shipped: chosen.onnx scores",
        "choice: ",
        "the stem is an integer conv with 7-bit weights",
    ] {
        assert!(html.contains(needle), "report lacks {needle}");
    }

    // Every recorded stage command is a gmpq command line the binary accepts: its flags are
    // the binary's (clap stops at --help only after every flag before it parsed).
    let rec = record(&out).unwrap();
    for stage in rec["stages"].as_array().unwrap() {
        let command = stage["command"].as_str().unwrap();
        let Some(rest) = command.strip_prefix("gmpq ") else {
            continue;
        };
        let mut argv = shell_words::split(rest).unwrap();
        argv.push("--help".into());
        let o = gmpq().args(&argv).output().unwrap();
        assert!(o.status.success(), "{command}: {}", stderr(&o));
    }

    // The library runs the same pipeline without the binary: the settings it is given equal
    // the ones the CLI recorded (else the run would refuse them), every stage is skipped.
    let fmnist = format!("idx:{}", bundled("fashion-mnist").display());
    let settings = gmpq::pipeline::PipelineSettings {
        target_limit: Some(512),
        target_test_limit: Some(200),
        baseline: vec![gmpq::pipeline::Arm::Uniform],
        teacher_epochs: 3,
        target_teacher_epochs: 3,
        search_epochs: 2,
        finetune_epochs: 2,
        ..gmpq::pipeline::PipelineSettings::new(format!("{fmnist}:300"), fmnist, out.clone())
    };
    struct Skips(std::sync::Mutex<Vec<String>>);
    impl gmpq::pipeline::RunEvents for Skips {
        fn stage_skipped(&self, name: &str, _why: &str) {
            self.0.lock().unwrap().push(name.into());
        }
    }
    let skips = Skips(Default::default());
    let outcome = gmpq::pipeline::run(&settings, "library test", tch::Device::Cpu, &skips).unwrap();
    assert_eq!(
        skips.0.lock().unwrap().len(),
        outputs(&out).len() + 1,
        "every stage but the attribution grid is skipped (and the chosen model's export)"
    );
    assert!(outcome.summary.arms.iter().all(|a| a.top1.is_some()));

    // Changed settings are refused, naming the setting.
    let mut changed = args.clone();
    let i = changed
        .iter()
        .position(|a| a == "--finetune-epochs")
        .unwrap();
    changed[i + 1] = "5".into();
    let o = gmpq().args(&changed).output().unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("finetune_epochs: was 2, now 5"),
        "{}",
        stderr(&o)
    );
    // So is a fixed attribution exponent on a run that used the capacity rule (an unset --p is
    // not recorded, so runs from before the option existed still resume).
    let mut with_p = args.clone();
    with_p.extend(["--p".into(), "3".into()]);
    let o = gmpq().args(&with_p).output().unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("p: was absent, now 3.0"),
        "{}",
        stderr(&o)
    );

    // A teacher of another architecture is refused.
    let teacher = out.join("teacher-proxy/last.safetensors");
    let o = run(&[
        "pipeline",
        "--model",
        "resnet32",
        "--proxy",
        "bundled:fashion-mnist:300",
        "--target",
        "bundled:fashion-mnist",
        "--teacher",
        teacher.to_str().unwrap(),
        "--out",
        dir.path().join("other").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("is a resnet20 but --model is resnet32"),
        "{}",
        stderr(&o)
    );

    // Fine-tuning with a policy for another model is refused.
    let policy: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("search-gmpq/policy.json")).unwrap(),
    )
    .unwrap();
    let mut other = policy.clone();
    other["model"] = "resnet32".into();
    let other_path = dir.path().join("resnet32-policy.json");
    std::fs::write(&other_path, other.to_string()).unwrap();
    let init = out.join("teacher-target/last.safetensors");
    let o = run(&[
        "finetune",
        "--init",
        init.to_str().unwrap(),
        "--policy",
        other_path.to_str().unwrap(),
        "--epochs",
        "1",
        "--out",
        dir.path().join("ft-other").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("resnet32") && err.contains("resnet20"),
        "unclear error: {err}"
    );

    // Resuming a fine-tuned checkpoint with another policy is refused.
    let o = run(&[
        "finetune",
        "--init",
        init.to_str().unwrap(),
        "--uniform",
        "w2a2",
        "--data",
        &format!("idx:{}", bundled("fashion-mnist").display()),
        "--limit",
        "512",
        "--test-limit",
        "200",
        "--epochs",
        "3",
        "--out",
        out.join("finetune-gmpq").to_str().unwrap(),
        "--resume",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("the precision changed"),
        "{}",
        stderr(&o)
    );

    // A second run with the same teachers and budget: its uniform policy and fine-tuning
    // command are the first run's, so the fine-tuning is copied; GMPQ's policy records its own
    // search folder, so it is fine-tuned afresh. It also searches EdMIPS on the target.
    let with_target_search = |args: &mut Vec<String>| {
        let i = args.iter().position(|a| a == "--baseline").unwrap();
        args[i + 1] = "uniform,edmips-target".into();
    };
    let twin = dir.path().join("twin");
    let mut twin_args = pipeline_args(&twin);
    with_target_search(&mut twin_args);
    twin_args.extend(
        [
            "--teacher",
            teacher.to_str().unwrap(),
            "--target-teacher",
            init.to_str().unwrap(),
            // The flag's former name still works.
            "--reuse-finetunes-from",
            out.to_str().unwrap(),
        ]
        .map(String::from),
    );
    let o = gmpq().args(&twin_args).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let copied = "the same computation (command and inputs) finished in";
    assert!(
        stdout.contains(&format!("[finetune-uniform] {copied}")),
        "{stdout}"
    );
    assert!(stdout.contains("[finetune-gmpq] gmpq finetune"), "{stdout}");
    assert!(
        stdout.contains("[search-edmips-target] gmpq search"),
        "{stdout}"
    );

    // The first run, given the edmips-target arm later, finds the twin's target search (the
    // same command: the target does not depend on the proxy) and then its fine-tuning (the same
    // command and, once copied, the same policy): both are copied, nothing is trained.
    let mut more = args.clone();
    with_target_search(&mut more);
    more.extend(["--reuse-from".into(), twin.to_str().unwrap().into()]);
    let o = gmpq().args(&more).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    for stage in ["search-edmips-target", "finetune-edmips-target"] {
        assert!(stdout.contains(&format!("[{stage}] {copied}")), "{stdout}");
    }
    for file in [
        "search-edmips-target/policy.json",
        "finetune-edmips-target/last.safetensors",
    ] {
        assert_eq!(
            std::fs::read(out.join(file)).unwrap(),
            std::fs::read(twin.join(file)).unwrap(),
            "{file}"
        );
    }
    let weights =
        |run: &Path| std::fs::read(run.join("finetune-uniform/last.safetensors")).unwrap();
    assert_eq!(weights(&twin), weights(&out));
    let stage = record(&twin).unwrap()["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "finetune-uniform")
        .cloned()
        .unwrap();
    assert_eq!(
        stage["reused_from"],
        out.join("finetune-uniform").to_str().unwrap()
    );
    let html = std::fs::read_to_string(twin.join("report.html")).unwrap();
    assert!(
        html.contains("copied from"),
        "report does not say the stage was copied"
    );
}

#[test]
fn report_of_a_folder_that_is_not_a_run_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(&["report", dir.path().to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("is this a `gmpq pipeline` run directory?"),
        "{}",
        stderr(&o)
    );
}

/// `--baseline hawq`: the HAWQ-style arm gets a policy under the budget from the proxy
/// teacher's sensitivities, is fine-tuned like every arm, and appears in the report.
#[test]
fn pipeline_runs_the_hawq_arm() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut args = pipeline_args(&out);
    let i = args.iter().position(|a| a == "--baseline").unwrap();
    args[i + 1] = "hawq,uniform,uniform-fill,gmpq-ranked".into();
    // One epoch of everything: this test is about the arm, not the training.
    for flag in [
        "--finetune-epochs",
        "--teacher-epochs",
        "--target-teacher-epochs",
        "--search-epochs",
    ] {
        let i = args.iter().position(|a| a == flag).unwrap();
        args[i + 1] = "1".into();
    }
    // w4a4's own compression (64.235×): a grid budget, where uniform-fill is uniform.
    args.extend([
        "--target-compression".into(),
        "64.235".into(),
        "--json".into(),
    ]);
    let o = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));
    // --json: stdout is exactly one JSON document (stage lines and logs go to stderr).
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&o.stdout)
        )
    });
    assert!(summary["summary"]["arms"].is_array(), "{summary}");
    // The summary names the model, the data and every file, with absolute paths.
    let s = &summary["summary"];
    assert_eq!(s["model"]["arch"], "resnet20", "{s}");
    assert!(
        s["target_data"].is_string() && s["units"].is_string(),
        "{s}"
    );
    for arm in s["arms"].as_array().unwrap() {
        for key in ["policy", "checkpoint"] {
            let p = arm[key]
                .as_str()
                .unwrap_or_else(|| panic!("{key} missing: {arm}"));
            assert!(
                std::path::Path::new(p).is_absolute() && std::path::Path::new(p).exists(),
                "{p}"
            );
        }
    }
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("pipeline.json")).unwrap()).unwrap();
    for stage in record["stages"].as_array().unwrap() {
        assert!(!stage["command"].as_str().unwrap().is_empty(), "{stage}");
    }
    assert!(
        stderr(&o).contains("[search-hawq]"),
        "stage lines on stderr"
    );
    let p = gmpq::policy::Policy::load(&out.join("search-hawq").join("policy.json")).unwrap();
    let meta = p.meta.clone().unwrap();
    assert_eq!(meta["method"], "hawq");
    assert!(meta["hawq"]["sensitivities"]["weight"].is_object());
    assert!(p.totals.unwrap().compression >= 64.0);
    // uniform-fill took HAWQ's sensitivities instead of measuring them again; at 64.235× (the
    // grid point w4a4) it is the uniform policy.
    let fill = gmpq::policy::Policy::load(&out.join("search-uniform-fill/policy.json")).unwrap();
    let fill_meta = fill.meta.clone().unwrap();
    assert_eq!(fill_meta["method"], "uniform-fill");
    assert!(fill_meta["hawq"]["reused_from"].is_string(), "{fill_meta}");
    assert!(fill.totals.as_ref().unwrap().compression >= 64.0);
    // The ranked arm scored its candidates (uniform-fill's among them) and kept the best
    // when its gain was resolvable.
    let ranked = gmpq::policy::Policy::load(&out.join("search-gmpq-ranked/policy.json")).unwrap();
    let ranking = &ranked.meta.clone().unwrap()["ranking"];
    let candidates = ranking["candidates"].as_array().unwrap();
    assert!(
        candidates.iter().any(|c| c["source"]
            .as_str()
            .unwrap()
            .ends_with("search-uniform-fill/policy.json")),
        "{ranking}"
    );
    let best = candidates
        .iter()
        .map(|c| c["val_top1"].as_f64().unwrap())
        .fold(f64::MIN, f64::max);
    let chosen = ranking["chosen"].as_u64().unwrap() as usize;
    let own = candidates[0]["val_top1"].as_f64().unwrap();
    if best - own > ranking["min_gain"].as_f64().unwrap() {
        assert_eq!(candidates[chosen]["val_top1"].as_f64().unwrap(), best);
    } else {
        assert_eq!(chosen, 0, "{ranking}");
    }
    assert!(out.join("finetune-hawq").join("last.safetensors").is_file());
    // uniform-fill's policy is uniform's (a grid budget): its fine-tuning is uniform's, copied
    // and recorded as such, not computed twice.
    let uniform = gmpq::policy::Policy::load(&out.join("search-uniform/policy.json")).unwrap();
    let bits = |p: &gmpq::policy::Policy| {
        let mut p = p.clone();
        (p.meta, p.totals) = (None, None);
        serde_json::to_string(&p).unwrap()
    };
    assert!(
        fill.same_allocation(&uniform),
        "{}\n{}",
        bits(&fill),
        bits(&uniform)
    );
    let stage = record["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "finetune-uniform-fill")
        .unwrap();
    assert!(
        stage["reused_from"]
            .as_str()
            .is_some_and(|p| p.ends_with("finetune-uniform")),
        "{stage}"
    );
    assert_eq!(
        std::fs::read(out.join("finetune-uniform-fill/last.safetensors")).unwrap(),
        std::fs::read(out.join("finetune-uniform/last.safetensors")).unwrap()
    );
    let report = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(report.contains("HAWQ"), "the report names the arm");

    // The report in a real browser: no console errors, every chart and heatmap drawn with a
    // size, and the results table holding the run's numbers.
    if let Some(browser) = common::chromium("pipeline_runs_the_hawq_arm (browser)") {
        let seen = common::render(&browser, &out.join("report.html"));
        assert_eq!(
            seen["errors"],
            serde_json::json!([]),
            "console errors: {seen}"
        );
        let images = seen["images"].as_array().unwrap();
        let svgs = seen["svgs"].as_array().unwrap();
        assert!(!images.is_empty() && svgs.len() >= 3, "{seen}");
        for img in images {
            assert!(
                img["natural"].as_u64().unwrap() > 0,
                "image not decoded: {img}"
            );
            assert!(
                img["size"][0].as_u64().unwrap() > 0 && img["size"][1].as_u64().unwrap() > 0,
                "{img}"
            );
        }
        for svg in svgs {
            assert!(
                svg[0].as_u64().unwrap() > 0 && svg[1].as_u64().unwrap() > 0,
                "zero-size chart: {seen}"
            );
        }
        let tables = seen["tables"].as_array().unwrap();
        let results = tables[0].as_str().unwrap();
        for arm in s["arms"].as_array().unwrap() {
            let top1 = format!("{:.2}", arm["top1"].as_f64().unwrap());
            assert!(results.contains(&top1), "table lacks {top1}: {results}");
        }
        assert!(results.contains("HAWQ"), "{results}");
    }
}
