//! `gmpq study CONFIG`: parse, run the library's study, print where its results are.

use super::pipeline::PrintedEvents;
use super::StudyArgs;
use anyhow::Result;
use gmpq::study::StudyConfig;

pub fn study_cmd(a: StudyArgs, device: tch::Device) -> Result<()> {
    let config = StudyConfig::load(&a.config)?;
    let page = if a.tables_only {
        gmpq::study::tables_only(&config, &a.out)?
    } else {
        let command = shell_words::join(std::env::args());
        let events = PrintedEvents::new();
        gmpq::study::run(&config, &a.out, &a.pair, &command, device, &events)?
    };
    println!("[study] results: {}", page.display());
    Ok(())
}
