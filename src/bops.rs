//! `gmpq bops`: a policy's per-layer MACs, params, bits, BOPs and size on the network it is
//! for, with METHOD.md's totals — from a policy file, a uniform name, or a quantized
//! checkpoint.

use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::model::options::{check_options, ModelOption, ModelSource};
use crate::model::{ModelArgs, ModelConfig, ModelError};
use crate::policy::{ChoiceError, LayerCost, Policy, PolicyChoice, PolicyError, PolicyTotals};
use crate::quant::Precision;
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum BopsError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Choice(#[from] ChoiceError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Train(#[from] crate::train::TrainError),
    #[error("{0}")]
    Invalid(String),
    #[error("writing the chart {path}: {source}")]
    Chart {
        path: PathBuf,
        #[source]
        source: crate::report::ReportError,
    },
}

#[derive(Debug, Args)]
pub struct BopsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub policy: PolicyChoice,
    /// Read model and policy from a quantized checkpoint instead.
    #[arg(long, conflicts_with_all = ["policy", "uniform"])]
    pub checkpoint: Option<PathBuf>,
    /// Also draw the per-layer bit allocation as an SVG chart.
    #[arg(long)]
    pub chart: Option<PathBuf>,
    /// Print the result as one JSON document on stdout.
    #[arg(long)]
    pub json: bool,
}

/// A policy's costs on its network.
#[derive(Debug, serde::Serialize)]
pub struct Costs {
    pub model: ModelConfig,
    pub layers: Vec<LayerCost>,
    pub totals: PolicyTotals,
    /// Set when a policy file records other totals than its model measures here.
    #[serde(skip)]
    pub warning: Option<String>,
}

impl BopsArgs {
    /// The model and policy the flags name, measured (and the chart drawn).
    pub fn measure(&self) -> Result<Costs, BopsError> {
        // The totals a policy file states, to compare with what they measure here.
        let mut recorded: Option<PolicyTotals> = None;
        let (cfg, policy) = if let Some(path) = &self.checkpoint {
            let source = ModelSource::File {
                flag: "--checkpoint",
                path,
            };
            check_options(source, &self.model.given())?;
            let ck = Checkpoint::load(path)?;
            let policy = match ck.meta.precision {
                Some(Precision::Fixed { policy, .. }) => Some(policy),
                _ => None,
            };
            (ck.meta.model, policy)
        } else if let Some(path) = &self.policy.policy {
            let policy = Policy::load(path)?;
            recorded = policy.totals.clone();
            (self.policy_model(path, &policy)?, None)
        } else {
            (self.model.config(None)?, None)
        };
        let (_, net) = crate::train::build_fp(&cfg, tch::Device::Cpu)?;
        let policy = match policy {
            Some(p) => Some(p),
            None => self.policy.resolve(&cfg, net.convs(), net.fc_spec())?,
        };
        // Without a policy, every quantized layer is shown at 32/32 bits.
        let policy = policy.unwrap_or_else(|| Policy::uniform(&cfg, net.convs(), 32, 32));
        let (layers, totals) = policy.cost(net.convs(), net.fc_spec());
        // A file that records its totals but not its model config (older files, hand-written
        // ones) is measured on --channels/--classes: say so when the two disagree.
        let warning = match (&self.policy.policy, &recorded) {
            (Some(path), Some(r)) if r.bops != totals.bops || r.fp_bops != totals.fp_bops => {
                Some(format!(
                    "{} records {:.2}x ({} BOPs of {} FP) but {} at {} channels, {} px, {} \
                     classes gives {:.2}x ({} of {}); the file does not name its model config: \
                     give its --channels and --classes",
                    path.display(),
                    r.compression,
                    r.bops,
                    r.fp_bops,
                    cfg.arch,
                    cfg.in_channels,
                    cfg.input_size,
                    cfg.num_classes,
                    totals.compression,
                    totals.bops,
                    totals.fp_bops
                ))
            }
            _ => None,
        };
        if let Some(chart) = &self.chart {
            self.draw(chart, &policy)?;
        }
        Ok(Costs {
            model: cfg,
            layers,
            totals,
            warning,
        })
    }

    /// A policy file names its model and input size (and, from a search, the whole model
    /// config): its costs are measured on that geometry, not on --model/--input-size.
    fn policy_model(
        &self,
        path: &std::path::Path,
        policy: &Policy,
    ) -> Result<ModelConfig, BopsError> {
        let meta = crate::search::PolicyMeta::of(policy)
            .map_err(|e| BopsError::Invalid(format!("{}: malformed meta: {e}", path.display())))?;
        let source = ModelSource::File {
            flag: "--policy",
            path,
        };
        let given = self.model.given();
        if let Some(cfg) = meta.and_then(|m| m.model_config) {
            check_options(source, &given)?;
            return Ok(cfg);
        }
        // The file names its model and input size but not its channels and classes.
        let named: Vec<ModelOption> = given
            .into_iter()
            .filter(|o| matches!(o, ModelOption::Model | ModelOption::InputSize))
            .collect();
        check_options(source, &named)?;
        let mut args = self.model.clone();
        args.model = None;
        let mut cfg = args.config(Some(policy.model.parse()?))?;
        cfg.input_size = policy.input_size;
        Ok(cfg)
    }

    fn draw(&self, chart: &std::path::Path, policy: &Policy) -> Result<(), BopsError> {
        if let Some(dir) = chart
            .parent()
            .filter(|d| !d.as_os_str().is_empty() && !d.is_dir())
        {
            return Err(BopsError::Invalid(format!(
                "--chart {}: the folder {} does not exist",
                chart.display(),
                dir.display()
            )));
        }
        crate::report::bit_allocation_svg(&[("policy", policy)], chart).map_err(|source| {
            BopsError::Chart {
                path: chart.to_path_buf(),
                source,
            }
        })
    }
}
