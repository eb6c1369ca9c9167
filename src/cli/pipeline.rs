//! `gmpq pipeline`, `gmpq demo`: parse, run the library's pipeline, print its summary.

use super::args::{DemoArgs, PipelineArgs};
use super::progress::TrainBars;
use super::search::Bars;
use anyhow::Result;
use gmpq::pipeline::{PipelineSettings, RunEvents, RunLayout, RunSummary};
use gmpq::search::SearchProgress;

/// Prints each stage's command and outcome, and draws training and search progress.
pub(super) struct PrintedEvents {
    train: TrainBars,
    search: Bars,
}

impl PrintedEvents {
    pub(super) fn new() -> Self {
        Self {
            train: TrainBars::new(),
            search: Bars::new(),
        }
    }
}

impl RunEvents for PrintedEvents {
    fn stage_started(&self, name: &str, command: &str) {
        println!("[{name}] {command}");
    }
    fn stage_skipped(&self, name: &str, why: &str) {
        println!("[{name}] {why}");
    }
    fn stage_finished(&self, name: &str, outcome: &str) {
        self.search.finish();
        println!("[{name}] {outcome}");
    }
    fn message(&self, line: &str) {
        println!("{line}");
    }
    fn train_progress(&self) -> &dyn gmpq::train::Progress {
        &self.train
    }
    fn search_progress(&self) -> &dyn SearchProgress {
        &self.search
    }
}

/// Runs `settings`, printing stages as they go (to stderr with `json`) and the summary last.
pub(super) fn run_pipeline(
    settings: &PipelineSettings,
    json: bool,
    device: tch::Device,
) -> Result<()> {
    // --json: the summary is the only thing on stdout.
    let quiet = if json { StdoutToStderr::new() } else { None };
    let events = PrintedEvents::new();
    let command = shell_words::join(std::env::args());
    let outcome = gmpq::pipeline::run(settings, &command, device, &events)?;
    drop(quiet);
    print_summary(
        &outcome.summary,
        &outcome.report,
        &RunLayout::new(&settings.out),
        outcome.seconds,
        json,
    )
}

pub fn pipeline_cmd(a: PipelineArgs, device: tch::Device) -> Result<()> {
    run_pipeline(&a.settings, a.json, device)
}

pub fn demo_cmd(a: DemoArgs, device: tch::Device) -> Result<()> {
    run_pipeline(&PipelineSettings::demo(a.out), a.json, device)
}

fn print_summary(
    s: &RunSummary,
    page: &std::path::Path,
    layout: &RunLayout,
    seconds: f64,
    json: bool,
) -> Result<()> {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "summary": s, "report": page, "seconds": seconds,
            }))?
        );
        return Ok(());
    }
    print!("\n{}", s.table());
    if let Some(arm) = s.chosen {
        println!(
            "\nchosen: {} (on the held-out validation images: the simplest policy unless \
             another leads it beyond the noise; test top-1 is not used to choose)",
            arm.label()
        );
        if layout.chosen_onnx().is_file() {
            println!(
                "exported: {} and {}",
                layout.chosen_onnx().display(),
                layout.chosen_packed().display()
            );
        }
    }
    println!(
        "\nreport: {}\nrun folder: {} (this pass took {:.0} s; stage times in {})",
        page.display(),
        layout.dir.display(),
        seconds,
        layout.record().display()
    );
    Ok(())
}

/// While alive, whatever is written to stdout (stage lines, the nested commands' output)
/// goes to stderr, so a `--json` command prints exactly one JSON document on stdout.
struct StdoutToStderr {
    saved: libc::c_int,
}

impl StdoutToStderr {
    fn new() -> Option<Self> {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        // SAFETY: plain descriptor duplication on the process's own stdout/stderr.
        let saved = unsafe { libc::dup(1) };
        if saved < 0 || unsafe { libc::dup2(2, 1) } < 0 {
            return None;
        }
        Some(Self { saved })
    }
}

impl Drop for StdoutToStderr {
    fn drop(&mut self) {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        // SAFETY: restores the descriptor saved in `new`.
        unsafe {
            libc::dup2(self.saved, 1);
            libc::close(self.saved);
        }
    }
}
