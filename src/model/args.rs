//! The command-line form of a network's shape.

use super::options::{check_options, ModelOption, ModelSource};
use super::{Arch, ModelConfig, ModelError, Stem};
use crate::flags::positive;
use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// resnet20, resnet32, resnet56, resnet18, resnet50, mobilenetv2 or efficientnet-lite0
    /// [default: resnet20].
    #[arg(long)]
    pub model: Option<String>,
    /// Square input resolution [default: 32].
    #[arg(long, alias = "input", value_parser = positive(), allow_negative_numbers = true)]
    pub input_size: Option<usize>,
    /// Input channels [default: 3].
    #[arg(long, alias = "in-channels", value_parser = positive(), allow_negative_numbers = true)]
    pub channels: Option<usize>,
    /// Classes the model predicts [default: 10].
    #[arg(long, value_parser = positive(), allow_negative_numbers = true)]
    pub classes: Option<usize>,
    /// Stem of resnet18/50 and mobilenetv2: cifar or imagenet (default: cifar below 64 px).
    #[arg(long)]
    pub stem: Option<String>,
    /// Width multiplier of mobilenetv2 [default: 1].
    #[arg(long, allow_negative_numbers = true)]
    pub width: Option<f64>,
}

impl ModelArgs {
    /// The shaping options given on the command line.
    pub fn given(&self) -> Vec<ModelOption> {
        use ModelOption as O;
        [
            (self.model.is_some(), O::Model),
            (self.input_size.is_some(), O::InputSize),
            (self.channels.is_some(), O::Channels),
            (self.classes.is_some(), O::Classes),
            (self.stem.is_some(), O::Stem),
            (self.width.is_some(), O::Width),
        ]
        .into_iter()
        .filter_map(|(given, o)| given.then_some(o))
        .collect()
    }

    /// The network these flags describe (`--model`, or `arch` when a file names it), each
    /// flag checked against the table of which options apply to which network.
    pub fn config(&self, arch: Option<Arch>) -> Result<ModelConfig, ModelError> {
        let arch = match arch {
            Some(arch) => arch,
            None => self.model.as_deref().unwrap_or("resnet20").parse()?,
        };
        check_options(ModelSource::Named(arch), &self.given())?;
        let mut cfg = ModelConfig::new(
            arch,
            self.channels.unwrap_or(3),
            self.classes.unwrap_or(10),
            self.input_size.unwrap_or(32),
        );
        if let Some(stem) = &self.stem {
            cfg.stem = stem.parse::<Stem>()?;
        }
        if let Some(w) = self.width {
            cfg.width = w;
        }
        Ok(cfg)
    }
}
