//! A study run as a job array: each task takes one run by index (`--run N`, or `--array` with
//! SLURM_ARRAY_TASK_ID / JOB_COMPLETION_INDEX), a duplicated task is harmless, and the tables
//! equal those of the same study run by one process.

mod common;

use std::path::Path;
use std::process::Stdio;

fn tiny_study(dir: &Path) -> std::path::PathBuf {
    let data = dir.join("fm512");
    let o = common::gmpq()
        .args(["subset", "--data"])
        .arg(format!(
            "idx:{}",
            common::bundled("fashion-mnist").display()
        ))
        .args(["--train", "512", "--test", "200", "--out"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", common::stderr(&o));
    let config = dir.join("study.json");
    let d = data.display();
    std::fs::write(
        &config,
        format!(
            r#"{{"target": {{"data": "idx:{d}", "epochs": 1}},
                "pairs": [{{"name": "fm", "proxy": {{"data": "idx:{d}:128", "epochs": 1}},
                            "budgets": [{{"compression": 64, "seeds": 1}},
                                        {{"compression": 100, "seeds": 1}}]}}],
                "arms": ["gmpq", "uniform"], "search_epochs": 1, "target_search_epochs": 1,
                "finetune_epochs": 1}}"#
        ),
    )
    .unwrap();
    config
}

/// results.csv without its timing column (a search's seconds differ between processes).
fn results_without_timing(out: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let skip = header.iter().position(|h| *h == "search_seconds").unwrap();
    text.lines()
        .map(|l| {
            l.split(',')
                .enumerate()
                .filter(|(i, _)| *i != skip)
                .map(|(_, f)| f)
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect()
}

#[test]
fn a_job_array_with_a_duplicated_task_gives_the_one_process_tables() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_study(dir.path());
    let c = config.to_str().unwrap();
    let one = dir.path().join("one");
    let o = common::gmpq()
        .args(["--threads", "1", "study", c, "--out"])
        .arg(&one)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", common::stderr(&o));

    // Three tasks at once: run 0, run 1, and run 0 again (a duplicated or requeued task), the
    // last taking its index from the scheduler's variable.
    let array = dir.path().join("array");
    let task = |args: &[&str], env: Option<(&str, &str)>| {
        let mut cmd = common::gmpq();
        cmd.args(["--threads", "1", "study", c, "--out"])
            .arg(&array)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        cmd.spawn().unwrap()
    };
    let tasks = [
        task(&["--run", "0"], None),
        task(&["--run", "1"], None),
        task(&["--array"], Some(("SLURM_ARRAY_TASK_ID", "0"))),
    ];
    let outputs: Vec<_> = tasks
        .into_iter()
        .map(|t| t.wait_with_output().unwrap())
        .collect();
    let mut printed = String::new();
    for o in &outputs {
        assert!(o.status.success(), "{}", common::stderr(o));
        printed.push_str(&String::from_utf8_lossy(&o.stdout));
    }
    // Each run's stages ran in exactly one task (the other found it held, or finished).
    for run in ["fm-c64-seed0", "fm-c100-seed0"] {
        let searched = format!("{run}/search-gmpq/policy.json: ");
        assert_eq!(printed.matches(&searched).count(), 1, "{printed}");
    }
    let o = common::gmpq()
        .args(["study", c, "--tables-only", "--out"])
        .arg(&array)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert_eq!(results_without_timing(&one), results_without_timing(&array));
    // --tables-only prints the tables (Markdown) that results.md holds.
    let printed = String::from_utf8_lossy(&o.stdout);
    assert!(
        printed.contains("| arm | seeds | top-1 mean ± std |") && printed.contains("### "),
        "{printed}"
    );
    assert_eq!(
        printed,
        std::fs::read_to_string(array.join("results.md")).unwrap()
    );

    // An index past the study's runs, or --array without a scheduler, is refused.
    let o = common::gmpq()
        .args(["study", c, "--run", "2", "--out"])
        .arg(&array)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        common::stderr(&o).contains("the study has 2 runs"),
        "{}",
        common::stderr(&o)
    );
    let o = common::gmpq()
        .args(["study", c, "--array", "--out"])
        .arg(&array)
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("JOB_COMPLETION_INDEX")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        common::stderr(&o).contains("SLURM_ARRAY_TASK_ID"),
        "{}",
        common::stderr(&o)
    );
}

#[test]
fn sbatch_prints_a_requeueing_job_array_and_a_tables_job() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_study(dir.path());
    let o = common::gmpq()
        .args(["--threads", "2", "study"])
        .arg(&config)
        .args(["--out", "runs/x", "--sbatch", "--slurm-concurrency", "1"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", common::stderr(&o));
    let script = String::from_utf8_lossy(&o.stdout);
    for needle in [
        "#SBATCH --array=0-1%1",
        "#SBATCH --cpus-per-task=2",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@",
        "--threads 2 study",
        "--array &",
        "scontrol requeue",
        "--dependency=afterany:",
        "--tables-only",
    ] {
        assert!(script.contains(needle), "{needle} missing from:\n{script}");
    }
    // It is valid bash.
    let check = std::process::Command::new("bash")
        .args(["-n", "-c", &script])
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", common::stderr(&check));
    // Nothing ran.
    assert!(!Path::new("runs/x").exists());
}
