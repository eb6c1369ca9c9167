//! Bringing networks in: any CNN from an ONNX file ([`import_onnx`], the user's own network),
//! and pretrained weights from a `.safetensors` state dict for the built-in torchvision
//! ResNet-18/50 and MobileNetV2, and EfficientNet-Lite0 in efficientnet_pytorch's names.

#[cfg(feature = "cli")]
mod args;
mod fold;
mod head;
mod layout;
mod names;
mod onnx;
mod ops;
mod proto;
mod walk;
#[cfg(feature = "cli")]
pub use args::ImportArgs;
pub use onnx::{parse as parse_onnx, read as read_onnx, OnnxOptions};
pub use proto::{OnnxImportError, OnnxNetwork};
pub use walk::SUPPORTED as SUPPORTED_ONNX_OPS;

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

/// EfficientNet-Lite's input scaling: `(x − 127)/128` on 0..255 pixels, i.e. on [0, 1]
/// pixels a mean of 127/255 and a std of 128/255.
pub fn efficientnet_lite_normalize() -> Normalize {
    Normalize {
        mean: vec![127.0 / 255.0; 3],
        std: vec![128.0 / 255.0; 3],
    }
}

/// The evaluation pipeline a pretrained network expects: resize the short side, centre-crop.
fn pretrained_pipeline(config: &ModelConfig) -> Pipeline {
    let size = config.input_size;
    let (resize, normalize) = match config.arch {
        Arch::EfficientNetLite0 => (size, efficientnet_lite_normalize()),
        _ => (size * 256 / 224, imagenet_normalize()),
    };
    Pipeline {
        transforms: vec![
            Transform::Resize { size: resize },
            Transform::CenterCrop { size },
        ],
        normalize,
    }
}

/// Reads `weights` (a state dict in safetensors) into a gmpq checkpoint for a model of
/// `config`: torchvision ResNet-18/50 or MobileNetV2, or efficientnet_pytorch's
/// EfficientNet-Lite0. Missing, unexpected or mis-shaped tensors are all reported by name;
/// `num_batches_tracked` counters are ignored.
pub fn import_pretrained(weights: &Path, config: &ModelConfig) -> Result<Checkpoint, TrainError> {
    let entry = config.arch.entry();
    if !entry.traits.importable {
        return Err(TrainError::Invalid(format!(
            "import supports {}, not {}",
            crate::model::arch_names_where(|e| e.traits.importable),
            config.arch
        )));
    }
    // Weights laid out for one geometry (TF "SAME" padding at 224 px) fix input and stem.
    if entry.traits.fixed_geometry
        && (config.input_size != 224 || config.stem != crate::model::Stem::Imagenet)
    {
        return Err(TrainError::Invalid(format!(
            "{}'s weights fix its input size (224 px) and its stem (imagenet): --input-size and --stem do not apply",
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
    let mut meta = CheckpointMeta::new(config.clone(), pretrained_pipeline(config));
    meta.source = Some(format!("pretrained state dict {}", weights.display()));
    // The pretrained torchvision and EfficientNet-Lite0 weights are ImageNet-1k classifiers.
    if config.num_classes == 1000 {
        meta.class_names = Some(crate::data::imagenet_classes());
    }
    Ok(Checkpoint {
        meta,
        tensors: checkpoint::var_store_tensors(&vs),
    })
}

/// Reads the ONNX model at `path` into a full-precision checkpoint of its own network
/// ([`crate::model::Arch::Onnx`]). `normalize` is the preprocessing where the graph does not
/// begin with its own (`Sub` mean, `Div` std, which is taken out of the graph instead);
/// neither: none (mean 0, std 1).
pub fn import_onnx(
    path: &Path,
    opts: &OnnxOptions,
    normalize: Option<Normalize>,
) -> Result<Checkpoint, TrainError> {
    let net = read_onnx(path, opts).map_err(|e| TrainError::Invalid(e.to_string()))?;
    let normalize = match (net.normalize, normalize) {
        (Some(inside), Some(_)) => {
            return Err(TrainError::Invalid(format!(
                "the graph normalises its input itself (mean {:?}, std {:?}): --mean and --std do not apply",
                inside.mean, inside.std
            )))
        }
        (Some(n), None) | (None, Some(n)) => n,
        (None, None) => Normalize::identity(net.in_channels),
    };
    if normalize.mean.len() != net.in_channels || normalize.std.len() != net.in_channels {
        return Err(TrainError::Invalid(format!(
            "--mean and --std need {} values each (one per input channel)",
            net.in_channels
        )));
    }
    let mut config = ModelConfig::new(Arch::Onnx, net.in_channels, net.num_classes, net.input_size);
    config.graph = Some(std::sync::Arc::new(net.graph));
    let (vs, _) = build_fp(&config, tch::Device::Cpu)?;
    checkpoint::load_into_var_store(&vs, net.tensors.iter(), path, |_| false, |_| false)?;
    let pipeline = Pipeline {
        transforms: Vec::new(),
        normalize,
    };
    let mut meta = CheckpointMeta::new(config, pipeline);
    meta.source = Some(format!("ONNX model {}", path.display()));
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
