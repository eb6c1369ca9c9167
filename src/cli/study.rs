//! `gmpq study CONFIG`: parse, run the library's study, print where its results are.

use super::pipeline::PrintedEvents;
use super::StudyArgs;
use anyhow::{Context, Result};
use gmpq::pipeline::RunEvents;
use gmpq::study::StudyConfig;

/// Prints the study's own lines besides each run's stages.
struct StudyEvents(PrintedEvents);

impl RunEvents for StudyEvents {
    fn stage_started(&self, name: &str, command: &str) {
        self.0.stage_started(name, command)
    }
    fn stage_skipped(&self, name: &str, why: &str) {
        self.0.stage_skipped(name, why)
    }
    fn stage_finished(&self, name: &str, outcome: &str) {
        self.0.stage_finished(name, outcome)
    }
    fn message(&self, line: &str) {
        println!("{line}");
    }
    fn train_progress(&self) -> &dyn gmpq::train::Progress {
        self.0.train_progress()
    }
    fn search_progress(&self) -> &dyn gmpq::search::SearchProgress {
        self.0.search_progress()
    }
}

pub fn study_cmd(a: StudyArgs, device: tch::Device) -> Result<()> {
    let config = StudyConfig::load(&a.config)?;
    let page = if a.tables_only {
        let saved = a.out.join("study.json");
        let started: StudyConfig = serde_json::from_str(
            &std::fs::read_to_string(&saved)
                .with_context(|| format!("{} holds no study (no study.json)", a.out.display()))?,
        )
        .with_context(|| format!("reading {}", saved.display()))?;
        anyhow::ensure!(
            started == config,
            "{} was started with another configuration ({}); use another --out",
            a.out.display(),
            saved.display()
        );
        gmpq::study::write_tables(&config, &a.out, &config.runs(&a.out))?
    } else {
        let command = shell_words::join(std::env::args());
        let events = StudyEvents(PrintedEvents::new());
        gmpq::study::run(&config, &a.out, &a.pair, &command, device, &events)?
    };
    println!("[study] results: {}", page.display());
    Ok(())
}
