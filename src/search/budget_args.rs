//! The budget flags (`--target-bops`, `--target-compression`, `--target-size-mb`) and their
//! check into a [`Target`].

use super::budget::Target;
use super::error::SearchError;

/// A policy's budget, in one of three measures (METHOD.md's BOPs, compression and size).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct BudgetArgs {
    /// Budget: policy BOPs at most this (e.g. 1.2e9, 1.2G, 800M).
    #[cfg_attr(feature = "cli", arg(long, group = "budget"))]
    pub target_bops: Option<String>,
    /// Budget: FP BOPs / policy BOPs at least this (64 ≈ 4-bit equivalent).
    #[cfg_attr(
        feature = "cli",
        arg(long, group = "budget", allow_negative_numbers = true)
    )]
    pub target_compression: Option<f64>,
    /// Budget: model size at most this many MB.
    #[cfg_attr(
        feature = "cli",
        arg(long, group = "budget", allow_negative_numbers = true)
    )]
    pub target_size_mb: Option<f64>,
}

impl BudgetArgs {
    /// The budget given (clap lets at most one of the three through), checked; `None` when
    /// none is given.
    pub fn target(&self) -> Result<Option<Target>, SearchError> {
        Target::from_parts(
            self.target_bops.as_deref(),
            self.target_compression,
            self.target_size_mb,
        )
        .map_err(SearchError::Invalid)
    }
}
