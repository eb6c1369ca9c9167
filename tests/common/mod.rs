#![allow(dead_code)]
//! Helpers shared by the integration tests.

use std::path::PathBuf;
use std::process::{Command, Output};

pub fn gmpq() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gmpq"));
    c.env("GMPQ_LOG", "warn");
    c
}

pub fn run(args: &[&str]) -> Output {
    gmpq().args(args).output().expect("failed to start gmpq")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `../shared/datasets` beside the repository, when this machine has it. Tests that need it
/// print a SKIPPED line (in CI logs too) instead of passing silently.
pub fn shared_datasets(test: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/datasets");
    if p.is_dir() {
        Some(p)
    } else {
        // Straight to the process's stderr: the test harness captures `eprintln!` of passing
        // tests, and a skip must show in CI logs.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: ../shared/datasets not found"
        );
        None
    }
}

pub fn bundled(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("data")
        .join(name)
}
