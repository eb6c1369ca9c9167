//! Why a search stopped or could not start.

use super::extract::ExtractionError;
use crate::quant::QuantError;
use crate::train::TrainError;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    #[error(transparent)]
    Quant(#[from] QuantError),
    #[error(transparent)]
    Dist(#[from] crate::dist::DistError),
    #[error(
        "stopped by {signal} in epoch {epoch}; the last finished epoch's state is kept: run the \
         same command again to resume"
    )]
    Stopped { signal: String, epoch: usize },
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    #[error(transparent)]
    Extraction(#[from] ExtractionError),
    #[error("loss became {value} at epoch {epoch}: the search diverged (try a lower --lr)")]
    NonFiniteLoss { epoch: usize, value: f64 },
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error(transparent)]
    Lock(#[from] crate::files::LockError),
    #[error(transparent)]
    Report(Box<crate::report::ReportError>),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, SearchError>;

impl From<crate::report::ReportError> for SearchError {
    fn from(e: crate::report::ReportError) -> Self {
        SearchError::Report(Box::new(e))
    }
}
