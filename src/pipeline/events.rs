//! What a run reports as it goes.

use crate::search::SearchProgress;

/// What a run tells its caller as it goes (the CLI prints it and draws progress bars).
pub trait RunEvents {
    /// A stage starts; `command` is its equivalent command line.
    fn stage_started(&self, _name: &str, _command: &str) {}
    /// A stage's output exists, or was copied from another run (`why`).
    fn stage_skipped(&self, _name: &str, _why: &str) {}
    /// A stage finished; `outcome` says what it produced.
    fn stage_finished(&self, _name: &str, _outcome: &str) {}
    /// A line about the work around the stages (a study's progress through its runs).
    fn message(&self, _line: &str) {}
    fn train_progress(&self) -> &dyn crate::train::Progress {
        &crate::train::Silent
    }
    fn search_progress(&self) -> &dyn SearchProgress {
        &crate::search::Quiet
    }
}
