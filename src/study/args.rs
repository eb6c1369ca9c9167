//! The command-line form of a study, and what it does: run it (all of it, one run of a job
//! array, or only its tables) or write its job-array script.

use super::{StudyConfig, StudyError};
use crate::pipeline::RunEvents;
use clap::Args;
use std::path::{Path, PathBuf};

#[derive(Debug, Args)]
pub struct StudyArgs {
    /// The study's JSON configuration (e.g. studies/fmnist.json).
    pub config: PathBuf,
    /// Study folder (teachers, one folder per run, results).
    #[arg(long, default_value = "runs/study")]
    pub out: PathBuf,
    /// Run only these pairs (comma-separated names from CONFIG), e.g. to run two pairs in
    /// two processes; the tables still cover every run on disk.
    #[arg(long, value_delimiter = ',')]
    pub pair: Vec<String>,
    /// Only rewrite results.csv/json and study.html from the runs on disk (safe beside a
    /// running study); train and search nothing.
    #[arg(long)]
    pub tables_only: bool,
    /// Run only the study's run N (0-based; `--sbatch` prints how many there are) and the
    /// teachers it needs: one task of a job array.
    #[arg(long, value_name = "N", conflicts_with_all = ["array", "tables_only", "pair"])]
    pub run: Option<usize>,
    /// As --run, with N from the scheduler: SLURM_ARRAY_TASK_ID (a Slurm job array) or
    /// JOB_COMPLETION_INDEX (a Kubernetes indexed Job).
    #[arg(long, conflicts_with_all = ["tables_only", "pair"])]
    pub array: bool,
    /// Print a bash script that submits the study as a Slurm job array (one task per run,
    /// requeued before its time limit, resumed where it stopped) and a job that writes the
    /// tables when all have ended; runs nothing.
    #[arg(long, conflicts_with_all = ["run", "array", "tables_only", "pair"])]
    pub sbatch: bool,
    /// With --sbatch: the time limit of one task (Slurm's --time).
    #[arg(long, default_value = "12:00:00", requires = "sbatch")]
    pub slurm_time: String,
    /// With --sbatch: at most this many tasks at once (0: no limit).
    #[arg(long, default_value_t = 0, requires = "sbatch")]
    pub slurm_concurrency: usize,
}

/// What `gmpq study` did.
#[derive(Debug)]
pub enum StudyOutcome {
    /// The bash script that submits the study as a Slurm job array (nothing run).
    Script(String),
    /// The tables rewritten from the runs on disk: their Markdown and the page.
    Tables { markdown: String, page: PathBuf },
    /// The runs selected, run or resumed; the results page.
    Ran { page: PathBuf },
}

impl StudyArgs {
    /// Runs what the flags select; `threads` goes into a job array's script, `command` into
    /// each run's record.
    pub fn run(
        &self,
        threads: usize,
        command: &str,
        device: tch::Device,
        events: &dyn RunEvents,
    ) -> Result<StudyOutcome, StudyError> {
        let config = StudyConfig::load(&self.config)?;
        let invalid = |what: &str, e: std::io::Error| StudyError::Invalid(format!("{what}: {e}"));
        if self.sbatch {
            let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.into());
            let exe = std::env::current_exe().map_err(|e| invalid("finding the gmpq binary", e))?;
            let workdir =
                std::env::current_dir().map_err(|e| invalid("finding the current folder", e))?;
            return Ok(StudyOutcome::Script(super::sbatch_script(
                &super::ArraySettings {
                    exe: &exe,
                    workdir: &workdir,
                    config: &absolute(&self.config),
                    out: &absolute(&self.out),
                    runs: config.runs(&self.out).len(),
                    threads,
                    time: &self.slurm_time,
                    concurrency: self.slurm_concurrency,
                },
            )));
        }
        if self.tables_only {
            let page = super::tables_only(&config, &self.out)?;
            let tables = self.out.join("results.md");
            let markdown =
                std::fs::read_to_string(&tables).map_err(|source| StudyError::Write {
                    path: tables,
                    source,
                })?;
            return Ok(StudyOutcome::Tables { markdown, page });
        }
        let only = match (self.run, self.array) {
            (Some(i), _) => Some(i),
            (None, true) => Some(super::array_index_from_env()?.ok_or_else(|| {
                StudyError::Invalid(
                    "--array: neither SLURM_ARRAY_TASK_ID nor JOB_COMPLETION_INDEX is set".into(),
                )
            })?),
            (None, false) => None,
        };
        let page = super::run_selected(
            &config, &self.out, &self.pair, only, command, device, events,
        )?;
        Ok(StudyOutcome::Ran { page })
    }
}
