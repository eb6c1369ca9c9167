//! A training run killed with SIGKILL mid-epoch resumes from its last complete epoch, and the
//! checkpoint on disk is always a complete one.

mod common;

use common::{bundled, gmpq};
use gmpq::checkpoint::Checkpoint;
use std::path::Path;
use std::time::{Duration, Instant};

fn train_args(out: &Path, epochs: usize) -> Vec<String> {
    [
        "--threads",
        "1",
        "train",
        "--data",
        &format!("idx:{}", bundled("fashion-mnist").display()),
        "--limit",
        "768",
        "--test-limit",
        "200",
        "--batch-size",
        "32",
        "--epochs",
        &epochs.to_string(),
        "--out",
        out.to_str().unwrap(),
        "--resume",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn completed_epochs(sidecar: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(sidecar).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["epoch"].as_u64().map(|e| e as usize)
}

#[test]
fn sigkill_mid_epoch_then_resume() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let ckpt = out.join("last.safetensors");
    let mut child = gmpq().args(train_args(&out, 3)).spawn().unwrap();
    // Wait for epoch 1 to be saved, then kill during epoch 2.
    let deadline = Instant::now() + Duration::from_secs(300);
    while completed_epochs(&out.join("last.json")) != Some(1) {
        assert!(Instant::now() < deadline, "epoch 1 never finished");
        assert!(child.try_wait().unwrap().is_none(), "training exited early");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(250));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    // Whatever instant the kill hit, the checkpoint on disk is complete and loadable.
    let ck = Checkpoint::load(&ckpt).expect("checkpoint must be complete after SIGKILL");
    let saved = ck.meta.epoch;
    assert!(saved == 1 || saved == 2, "unexpected epoch {saved}");
    assert_eq!(ck.meta.history.len(), saved);
    assert!(ck
        .tensors
        .keys()
        .any(|k| k.starts_with("optimizer.momentum.")));

    let status = gmpq().args(train_args(&out, 3)).status().unwrap();
    assert!(status.success());
    let ck = Checkpoint::load(&ckpt).unwrap();
    assert_eq!(ck.meta.epoch, 3);
    let epochs: Vec<usize> = ck.meta.history.iter().map(|m| m.epoch).collect();
    assert_eq!(
        epochs,
        vec![1, 2, 3],
        "resumed run must continue, not restart"
    );
    // No temp file is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn resume_refuses_changed_settings_and_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut args = train_args(&out, 1);
    assert!(gmpq().args(&args).status().unwrap().success());
    // Without --resume an existing checkpoint is never overwritten.
    args.retain(|a| a != "--resume");
    let o = gmpq().args(&args).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--resume"));
    // A different learning rate is a different run.
    let mut args = train_args(&out, 2);
    args.extend(["--lr".to_string(), "0.05".to_string()]);
    let o = gmpq().args(&args).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("the training settings changed"));
}
