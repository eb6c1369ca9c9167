//! The command-line form of `gmpq import`.

use crate::checkpoint::Checkpoint;
use crate::flags::positive;
use crate::model::{ModelConfig, ModelError};
use crate::train::TrainError;
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

    /// Reads the weights into a checkpoint and saves it (and its metadata) at `out`.
    pub fn run(&self) -> Result<Checkpoint, TrainError> {
        let ck = super::import_pretrained(&self.weights, &self.config()?)?;
        if let Some(dir) = self.out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| TrainError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        ck.save(&self.out)?;
        Ok(ck)
    }
}
