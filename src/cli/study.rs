//! `gmpq study CONFIG`: parse, run the library's study, print where its results are.

use super::pipeline::PrintedEvents;
use super::StudyArgs;
use anyhow::{Context, Result};
use gmpq::study::StudyConfig;

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
        let events = PrintedEvents::new();
        gmpq::study::run(&config, &a.out, &a.pair, &command, device, &events)?
    };
    println!("[study] results: {}", page.display());
    Ok(())
}
