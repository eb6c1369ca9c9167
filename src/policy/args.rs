//! The command-line form of a policy choice and of bit candidates.

use super::{Numerics, Policy, PolicyError, PolicySource};
use crate::model::{ConvSpec, LinearSpec, ModelConfig};
use clap::Args;
use std::path::PathBuf;

/// One bit width of a candidate list, in `BIT_RANGE`.
pub fn bit_width() -> clap::builder::RangedI64ValueParser<u32> {
    let r = super::BIT_RANGE;
    clap::value_parser!(u32).range(i64::from(*r.start())..=i64::from(*r.end()))
}

/// `--numerics`: integer or fake-quant.
pub fn parse_numerics(s: &str) -> Result<Numerics, String> {
    s.parse()
}

#[derive(Debug, Args)]
#[group(required = false, multiple = false)]
pub struct PolicyChoice {
    /// A policy JSON file.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// A uniform policy: w4a4, w8a8, w2a2, …
    #[arg(long)]
    pub uniform: Option<String>,
}

/// Why a chosen policy was not taken: the file could not be read, or it does not fit.
#[derive(Debug, thiserror::Error)]
pub enum ChoiceError {
    #[error(transparent)]
    Read(PolicyError),
    #[error("the policy does not fit the model: {0}")]
    Misfit(PolicyError),
}

impl PolicyChoice {
    /// Where the policy comes from; `None` when neither flag is given.
    pub fn source(&self) -> Result<Option<PolicySource>, PolicyError> {
        PolicySource::from_flags(self.policy.as_deref(), self.uniform.as_deref())
    }

    /// The chosen policy for a network with these layers, checked against it.
    pub fn resolve(
        &self,
        cfg: &ModelConfig,
        convs: &[ConvSpec],
        fc: &LinearSpec,
    ) -> Result<Option<Policy>, ChoiceError> {
        let Some(source) = self.source().map_err(ChoiceError::Read)? else {
            return Ok(None);
        };
        source
            .resolve(cfg, convs, fc)
            .map(Some)
            .map_err(|e| match e {
                // Reading the file failed: its own message says where and why.
                PolicyError::Io { .. } | PolicyError::Parse { .. } => ChoiceError::Read(e),
                e => ChoiceError::Misfit(e),
            })
    }
}
