//! The command-line form of `gmpq import`.

use crate::flags::positive;
use crate::model::{ModelConfig, ModelError};
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// resnet18, resnet50, mobilenetv2 or efficientnet-lite0.
    #[arg(long)]
    pub model: String,
    /// A .safetensors file with the state dict.
    #[arg(long)]
    pub weights: PathBuf,
    /// Output checkpoint (.safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Classes the model predicts.
    #[arg(long, alias = "num-classes", default_value_t = 1000, value_parser = positive(), allow_negative_numbers = true)]
    pub classes: usize,
    /// Square input resolution (default 224; efficientnet-lite0: 224 only).
    #[arg(long, value_parser = positive(), allow_negative_numbers = true)]
    pub input_size: Option<usize>,
    /// cifar or imagenet (default imagenet; not for efficientnet-lite0).
    #[arg(long)]
    pub stem: Option<String>,
}

impl ImportArgs {
    /// The network the weights are for: 3 channels, 224 px and the ImageNet stem unless the
    /// flags say otherwise.
    pub fn config(&self) -> Result<ModelConfig, ModelError> {
        let mut cfg = ModelConfig::new(
            self.model.parse()?,
            3,
            self.classes,
            self.input_size.unwrap_or(224),
        );
        cfg.stem = self.stem.as_deref().unwrap_or("imagenet").parse()?;
        Ok(cfg)
    }
}
