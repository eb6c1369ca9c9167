//! `gmpq study CONFIG`: parse, run the library's study (all of it, one run of a job array, or
//! only its tables) or print its job-array script, and print where its results are.

use super::pipeline::PrintedEvents;
use super::StudyArgs;
use anyhow::{Context, Result};
use gmpq::study::StudyConfig;

pub fn study_cmd(a: StudyArgs, threads: usize, device: tch::Device) -> Result<()> {
    let config = StudyConfig::load(&a.config)?;
    if a.sbatch {
        let absolute = |p: &std::path::Path| std::path::absolute(p).unwrap_or_else(|_| p.into());
        let exe = std::env::current_exe().context("finding the gmpq binary")?;
        let workdir = std::env::current_dir().context("finding the current folder")?;
        print!(
            "{}",
            gmpq::study::sbatch_script(&gmpq::study::ArraySettings {
                exe: &exe,
                workdir: &workdir,
                config: &absolute(&a.config),
                out: &absolute(&a.out),
                runs: config.runs(&a.out).len(),
                threads,
                time: &a.slurm_time,
                concurrency: a.slurm_concurrency,
            })
        );
        return Ok(());
    }
    if a.tables_only {
        // The tables on stdout (Markdown, as docs/RESULTS.md quotes them), the page's path
        // on stderr.
        let page = gmpq::study::tables_only(&config, &a.out)?;
        let tables = a.out.join("results.md");
        print!(
            "{}",
            std::fs::read_to_string(&tables)
                .with_context(|| format!("reading {}", tables.display()))?
        );
        eprintln!("[study] results: {}", page.display());
        return Ok(());
    }
    let page = {
        let only =
            match (a.run, a.array) {
                (Some(i), _) => Some(i),
                (None, true) => Some(gmpq::study::array_index_from_env()?.context(
                    "--array: neither SLURM_ARRAY_TASK_ID nor JOB_COMPLETION_INDEX is set",
                )?),
                (None, false) => None,
            };
        let command = shell_words::join(std::env::args());
        let events = PrintedEvents::new();
        gmpq::study::run_selected(&config, &a.out, &a.pair, only, &command, device, &events)?
    };
    println!("[study] results: {}", page.display());
    Ok(())
}
