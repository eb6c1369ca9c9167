//! `gmpq study CONFIG`: run what the flags select and print where the results are.

use super::pipeline::PrintedEvents;
use anyhow::Result;
use gmpq::study::{StudyArgs, StudyOutcome};

pub fn study_cmd(a: StudyArgs, threads: usize, device: tch::Device) -> Result<()> {
    let command = shell_words::join(std::env::args());
    match a.run(threads, &command, device, &PrintedEvents::new())? {
        StudyOutcome::Script(script) => print!("{script}"),
        // The tables on stdout (Markdown, as docs/RESULTS.md quotes them), the page's path on
        // stderr.
        StudyOutcome::Tables { markdown, page } => {
            print!("{markdown}");
            eprintln!("[study] results: {}", page.display());
        }
        StudyOutcome::Ran { page } => println!("[study] results: {}", page.display()),
    }
    Ok(())
}
