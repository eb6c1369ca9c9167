//! Why a pipeline stopped, with what it was doing.

use crate::policy::PolicyError;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("{path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(
        "{dir} holds a pipeline run with different settings ({fields}); use another --out, or \
         delete the folder to start again"
    )]
    SettingsChanged { dir: PathBuf, fields: String },
    #[error(transparent)]
    Train(#[from] crate::train::TrainError),
    #[error(transparent)]
    Search(#[from] crate::search::SearchError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    #[error(transparent)]
    Lock(#[from] crate::files::LockError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Quant(#[from] crate::quant::QuantError),
    #[error(transparent)]
    Export(#[from] crate::export::ExportError),
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error(transparent)]
    Report(Box<crate::report::ReportError>),
    #[error("{0}")]
    Invalid(String),
    /// What was being done when `source` failed (a stage, an input).
    #[error("{what}")]
    Context {
        what: String,
        #[source]
        source: Box<PipelineError>,
    },
}

impl From<crate::report::ReportError> for PipelineError {
    fn from(e: crate::report::ReportError) -> Self {
        PipelineError::Report(Box::new(e))
    }
}

impl PipelineError {
    /// `self` as the cause of `what`.
    pub fn context(self, what: impl Into<String>) -> Self {
        PipelineError::Context {
            what: what.into(),
            source: Box::new(self),
        }
    }

    /// The folder whose lock another process holds, when that is what failed.
    pub fn busy_folder(&self) -> Option<&Path> {
        match self {
            PipelineError::Lock(crate::files::LockError::Busy { dir, .. })
            | PipelineError::Train(crate::train::TrainError::Lock(
                crate::files::LockError::Busy { dir, .. },
            ))
            | PipelineError::Search(crate::search::SearchError::Lock(
                crate::files::LockError::Busy { dir, .. },
            )) => Some(dir),
            PipelineError::Context { source, .. } => source.busy_folder(),
            _ => None,
        }
    }
}

/// `.map_err(context("…"))`: wraps any error the pipeline knows with what was being done.
pub(crate) fn context<E: Into<PipelineError>>(
    what: impl Into<String>,
) -> impl FnOnce(E) -> PipelineError {
    move |e| e.into().context(what)
}

pub type Result<T> = std::result::Result<T, PipelineError>;
