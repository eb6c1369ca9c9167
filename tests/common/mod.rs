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

/// The switch that makes a check that cannot run a failure (`.ci/run` sets it).
pub const STRICT: &str = "GMPQ_STRICT_TESTS";

/// A test that cannot run on this machine. With `GMPQ_STRICT_TESTS=1` (as in CI) that fails
/// the test; otherwise it prints a SKIPPED line to the process's stderr (the harness captures
/// `eprintln!` of passing tests, and a skip must show in CI logs).
pub fn cannot_run(test: &str, why: &str) {
    if std::env::var(STRICT).is_ok_and(|v| v == "1") {
        panic!("{test} cannot run: {why} ({STRICT}=1: a check that cannot run fails)");
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// ONNX Runtime, which scripts/setup.sh installs; `false` (or a failure, strict) without it.
pub fn onnx_runtime(test: &str) -> bool {
    match gmpq::engine::runtime_available() {
        Ok(()) => true,
        Err(e) => {
            cannot_run(test, &e.to_string());
            false
        }
    }
}

/// `../shared/datasets` beside the repository, when this machine has it.
pub fn shared_datasets(test: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/datasets");
    if p.is_dir() {
        Some(p)
    } else {
        cannot_run(test, "../shared/datasets not found");
        None
    }
}

pub fn bundled(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("data")
        .join(name)
}

/// Chromium for the browser tests (Debian's `chromium`, installed by .ci/run), if present.
pub fn chromium(test: &str) -> Option<PathBuf> {
    let found = ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .map(|n| PathBuf::from("/usr/bin").join(n))
        .find(|p| p.is_file());
    if found.is_none() {
        cannot_run(
            test,
            "chromium not found (apt-get install chromium; .ci/run does)",
        );
    }
    found
}

/// Renders `page` headless in `browser` and returns what a script measured after load: the
/// console errors, every image's and SVG chart's rendered size, and the tables' text.
pub fn render(browser: &std::path::Path, page: &std::path::Path) -> serde_json::Value {
    let html = std::fs::read_to_string(page).unwrap();
    let probe_head = r#"<script>window.__errors=[];
addEventListener('error',e=>__errors.push(String(e.message||e.target&&e.target.src||'error')),true);
const __ce=console.error;console.error=(...a)=>{__errors.push(a.join(' '));__ce(...a)};</script>"#;
    let probe_tail = r#"<script>addEventListener('load',()=>{
const size=e=>{const r=e.getBoundingClientRect();return [Math.round(r.width),Math.round(r.height)]};
const out={errors:__errors,
 images:[...document.images].map(i=>({alt:i.alt,natural:i.naturalWidth,size:size(i)})),
 svgs:[...document.querySelectorAll('svg')].filter(s=>!s.parentElement.closest('svg')).map(s=>size(s)),
 tables:[...document.querySelectorAll('table')].map(t=>t.innerText)};
const pre=document.createElement('pre');pre.id='gmpq-check';pre.textContent=JSON.stringify(out);
document.body.appendChild(pre);});</script>"#;
    let probed = html
        .replacen("<head>", &format!("<head>{probe_head}"), 1)
        .replacen("</body>", &format!("{probe_tail}</body>"), 1);
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("page.html");
    std::fs::write(&copy, probed).unwrap();
    let o = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("file://{}", copy.display()))
        .output()
        .expect("chromium failed to start");
    let dom = String::from_utf8_lossy(&o.stdout);
    let start = dom.find("<pre id=\"gmpq-check\">").unwrap_or_else(|| {
        panic!(
            "the probe did not run; chromium said: {}",
            String::from_utf8_lossy(&o.stderr)
        )
    });
    let rest = &dom[start + "<pre id=\"gmpq-check\">".len()..];
    let json = &rest[..rest.find("</pre>").unwrap()];
    let json = json
        .replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&");
    serde_json::from_str(&json).unwrap()
}

/// A full-precision checkpoint of `cfg` with fresh weights (seeded) at `path`.
pub fn fp_checkpoint(cfg: &gmpq::model::ModelConfig, path: &std::path::Path) {
    use gmpq::checkpoint::{self, Checkpoint, CheckpointMeta};
    use gmpq::data::{Normalize, Pipeline};
    use gmpq::quant::{self, Precision};
    tch::manual_seed(0);
    let net = quant::build(cfg, Precision::Full, tch::Device::Cpu).unwrap();
    Checkpoint {
        meta: CheckpointMeta::new(
            cfg.clone(),
            Pipeline {
                transforms: vec![],
                normalize: Normalize::identity(cfg.in_channels),
            },
        ),
        tensors: checkpoint::var_store_tensors(&net.vs),
    }
    .save(path)
    .unwrap();
}

/// A ResNet-20 teacher trained (one thread) for two epochs on `limit` bundled Fashion-MNIST
/// images into `out`; returns its checkpoint.
pub fn fmnist_teacher(out: &std::path::Path, limit: usize) -> PathBuf {
    let o = gmpq()
        .args(["--threads", "1", "train", "--data", "bundled:fashion-mnist"])
        .args([
            "--limit",
            &limit.to_string(),
            "--test-limit",
            "100",
            "--epochs",
            "2",
        ])
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    out.join("last.safetensors")
}
