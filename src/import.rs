//! Importing torchvision-named ResNet-18/50 weights from a `.safetensors` state dict.

use crate::checkpoint::{self, Checkpoint, CheckpointError, CheckpointMeta};
use crate::data::{Normalize, Pipeline, Transform};
use crate::model::{Arch, ModelConfig};
use crate::train::{build_fp, TrainError};
use std::path::Path;

/// ImageNet's channel statistics (torchvision's preprocessing).
pub fn imagenet_normalize() -> Normalize {
    Normalize {
        mean: vec![0.485, 0.456, 0.406],
        std: vec![0.229, 0.224, 0.225],
    }
}

/// Reads `weights` (a torchvision state dict in safetensors) into a gmpq checkpoint for a
/// model of `config`. Missing, unexpected or mis-shaped tensors are all reported by name;
/// torchvision's `num_batches_tracked` counters are ignored.
pub fn import_torchvision(weights: &Path, config: &ModelConfig) -> Result<Checkpoint, TrainError> {
    if !matches!(config.arch, Arch::ResNet18 | Arch::ResNet50) {
        return Err(TrainError::Invalid(format!(
            "import supports torchvision resnet18 and resnet50, not {}",
            config.arch
        )));
    }
    let (_, tensors) = checkpoint::read_safetensors(weights)?;
    let (vs, _) = build_fp(config, tch::Device::Cpu)?;
    checkpoint::load_into_var_store(
        &vs,
        tensors.iter(),
        weights,
        |n| n.ends_with("num_batches_tracked"),
        |_| false,
    )?;
    let size = config.input_size;
    let resize = size * 256 / 224;
    let pipeline = Pipeline {
        transforms: vec![
            Transform::Resize { size: resize },
            Transform::CenterCrop { size },
        ],
        normalize: imagenet_normalize(),
    };
    let mut meta = CheckpointMeta::new(config.clone(), pipeline);
    meta.source = Some(format!("torchvision state dict {}", weights.display()));
    Ok(Checkpoint {
        meta,
        tensors: checkpoint::var_store_tensors(&vs),
    })
}

/// Convenience for tests and scripts: the error names of a failed import.
pub fn mismatch_text(err: &TrainError) -> Option<&str> {
    match err {
        TrainError::Checkpoint(CheckpointError::Mismatch { problems, .. }) => Some(problems),
        _ => None,
    }
}
