//! A run's record (`pipeline.json`: every stage's command, identity, status and wall time)
//! and what it lets a run reuse: a stage finished in another run, or a fine-tuning of the
//! same policy by another arm of this run.

use super::layout::training_done;
use super::{Arm, PipelineError, Result, RunLayout, Stage};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const RECORD_FORMAT: u32 = 1;

/// The part of a run's recorded settings the library reads back.
#[derive(Deserialize)]
pub(super) struct RecordedTeachers {
    /// The `--target-teacher` checkpoint, when the run was given one.
    #[serde(default)]
    pub(super) target_teacher: Option<PathBuf>,
}

/// How one stage went the last time the pipeline passed it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageRecord {
    pub name: String,
    /// The exact `gmpq …` command line the stage ran (empty for in-process steps).
    pub command: String,
    /// Wall seconds of the run that produced the output (kept when a later pass skips it).
    pub seconds: f64,
    pub status: StageStatus,
    /// Where the output was copied from instead of being computed (see [`reusable_stage`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reused_from: Option<PathBuf>,
    /// The stage's typed identity ([`Stage::identity`]); records written before identities
    /// were have none and are matched by their command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<serde_json::Value>,
}

/// What identifies a stage's computation when looking for it in another run.
#[derive(Debug, Clone, PartialEq)]
pub struct StageKey {
    pub command: String,
    pub identity: serde_json::Value,
}

impl StageKey {
    pub fn of(stage: &dyn Stage) -> Self {
        Self {
            command: stage.command(),
            identity: stage.identity(),
        }
    }

    /// Whether `record` is this computation: by identity, or by command for a record written
    /// before identities were (the committed studies' runs).
    pub fn matches(&self, record: &StageRecord) -> bool {
        match &record.identity {
            Some(id) => *id == self.identity,
            None => record.command == self.command,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageStatus {
    Running,
    Done,
}

/// `pipeline.json`: the settings a run was started with and its stages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub format: u32,
    /// The pipeline's own command line, as last run.
    pub command: String,
    /// Settings that must not change within one run directory (arms may be added).
    pub settings: serde_json::Value,
    pub arms: Vec<Arm>,
    pub stages: Vec<StageRecord>,
}

impl RunRecord {
    pub fn load(path: &Path) -> Result<Option<Self>> {
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(path).map_err(|e| PipelineError::Read {
            path: path.into(),
            reason: e.to_string(),
        })?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| PipelineError::Read {
                path: path.into(),
                reason: format!("not a pipeline record: {e}"),
            })
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| PipelineError::Read {
            path: path.into(),
            reason: e.to_string(),
        })?;
        crate::files::write_atomic(path, &bytes).map_err(|source| PipelineError::Write {
            path: path.into(),
            source,
        })
    }

    /// Refuses to continue a run whose settings differ from `settings`, naming the fields.
    pub fn check_settings(&self, dir: &Path, settings: &serde_json::Value) -> Result<()> {
        if &self.settings == settings {
            return Ok(());
        }
        let fields = crate::fields::changed_fields_of(&self.settings, settings);
        Err(PipelineError::SettingsChanged {
            dir: dir.into(),
            fields,
        })
    }

    pub fn stage(&self, name: &str) -> Option<&StageRecord> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// Inserts or replaces the record of a stage, keeping first-run order.
    pub fn set_stage(&mut self, record: StageRecord) {
        match self.stages.iter_mut().find(|s| s.name == record.name) {
            Some(s) => *s = record,
            None => self.stages.push(record),
        }
    }
}

/// A stage finished in another run folder that is the very computation `layout` is about to
/// run: the stage `stage` is done there with the same command line once each run's own paths are
/// put in (`command_for`), and `finished` holds there (its output is complete, and whatever
/// input the command line does not name — a policy file — is the same). The record returned says
/// where the output is (`output`), to be copied rather than computed again.
pub fn reusable_stage(
    layout: &RunLayout,
    others: &[PathBuf],
    stage: &str,
    key_for: impl Fn(&RunLayout) -> StageKey,
    output: impl Fn(&RunLayout) -> PathBuf,
    finished: impl Fn(&RunLayout) -> Result<bool>,
) -> Result<Option<StageRecord>> {
    for other in others.iter().filter(|o| **o != layout.dir) {
        let theirs = RunLayout::new(other);
        if !finished(&theirs)? {
            continue;
        }
        let Some(record) = RunRecord::load(&theirs.record())? else {
            continue;
        };
        if let Some(done) = record
            .stage(stage)
            .filter(|s| s.status == StageStatus::Done && key_for(&theirs).matches(s))
        {
            return Ok(Some(StageRecord {
                reused_from: Some(output(&theirs)),
                ..done.clone()
            }));
        }
    }
    Ok(None)
}

/// A fine-tuning of `arm` finished elsewhere that is ours ([`reusable_stage`]): `epochs` epochs
/// done there from a byte-identical policy file. Used for arms that do not depend on the proxy
/// (uniform, random, edmips-target) when runs of a study differ only in the proxy.
pub fn reusable_training(
    layout: &RunLayout,
    others: &[PathBuf],
    arm: Arm,
    stage: &str,
    epochs: usize,
    key_for: impl Fn(&RunLayout) -> StageKey,
) -> Result<Option<StageRecord>> {
    // A run with nowhere to copy from reads no policy file.
    if others.is_empty() {
        return Ok(None);
    }
    let read = |path: &Path| {
        std::fs::read(path).map_err(|e| PipelineError::Read {
            path: path.into(),
            reason: e.to_string(),
        })
    };
    let ours = read(&layout.policy(arm))?;
    reusable_stage(
        layout,
        others,
        stage,
        key_for,
        |l| l.finetune(arm),
        |theirs| {
            Ok(training_done(&theirs.finetune(arm), epochs)?
                && theirs.policy(arm).exists()
                && read(&theirs.policy(arm))? == ours)
        },
    )
}

/// A fine-tuning of another arm of this run (`done`, in run order) that is `arm`'s own: its
/// policy quantizes the network exactly as `arm`'s does ([`Policy::same_allocation`]; at a
/// grid budget uniform-fill and often the ranked choice are the uniform policy) and it has
/// finished `epochs` epochs. Same data, seed and recipe, so the same computation: copied.
pub fn same_policy_training(
    layout: &RunLayout,
    done: &[Arm],
    arm: Arm,
    stage: &str,
    epochs: usize,
) -> Result<Option<StageRecord>> {
    let ours = crate::policy::Policy::load(&layout.policy(arm))?;
    for &other in done.iter().filter(|&&a| a != arm) {
        let dir = layout.finetune(other);
        if !training_done(&dir, epochs)? {
            continue;
        }
        let Ok(theirs) = crate::policy::Policy::load(&layout.policy(other)) else {
            continue;
        };
        if theirs.same_allocation(&ours) {
            return Ok(Some(StageRecord {
                name: stage.into(),
                command: String::new(),
                seconds: 0.0,
                status: StageStatus::Done,
                reused_from: Some(dir),
                identity: None,
            }));
        }
    }
    Ok(None)
}

/// Copies a finished stage's files into `to` (each atomically, the JSON files last, so that
/// [`training_done`] or a search's `policy.json` turns up only once the rest is in place).
pub fn copy_stage_output(from: &Path, to: &Path) -> Result<()> {
    let io = |path: &Path, e: std::io::Error| PipelineError::Write {
        path: path.into(),
        source: e,
    };
    std::fs::create_dir_all(to).map_err(|e| io(to, e))?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(from)
        .map_err(|e| io(from, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort_by_key(|p| p.extension().is_some_and(|e| e == "json"));
    for f in files {
        let bytes = std::fs::read(&f).map_err(|e| io(&f, e))?;
        let dest = to.join(f.file_name().unwrap_or_default());
        crate::files::write_atomic(&dest, &bytes).map_err(|e| io(&dest, e))?;
    }
    Ok(())
}

impl RunLayout {
    /// The training folder of the target teacher this run used: its own, or the folder of
    /// the `--target-teacher` checkpoint it was given (as recorded in `pipeline.json`).
    pub fn used_target_teacher(&self) -> PathBuf {
        RunRecord::load(&self.record())
            .ok()
            .flatten()
            .and_then(|r| serde_json::from_value::<RecordedTeachers>(r.settings).ok())
            .and_then(|s| s.target_teacher)
            .map(|p| p.parent().unwrap_or(Path::new(".")).to_path_buf())
            .unwrap_or_else(|| self.target_teacher())
    }
}
