//! Why a quantized network could not be built, loaded or planned.

use crate::checkpoint::CheckpointError;
use crate::model::ModelError;
use crate::policy::PolicyError;

#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("{0}")]
    Invalid(String),
}
