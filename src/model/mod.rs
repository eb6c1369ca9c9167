//! The CNNs that GMPQ quantizes. Every conv layer has a stable, torchvision-compatible name
//! (`conv1`, `layer1.0.conv1`, `layer2.0.downsample.0`, …) and a [`ConvSpec`] describing its
//! geometry, so quantization policies and BOPs can refer to layers by name.

mod layers;
mod resnet;

pub use layers::{
    fp_conv, path_for, ConvLayer, ConvSpec, FullPrecisionConvs, LayerFactory, LinearSpec,
};
pub use resnet::ResNet;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("unknown model '{0}' (resnet20, resnet32, resnet56, resnet18, resnet50)")]
    UnknownArch(String),
    #[error("input size {input} is too small for {arch} (needs at least {min})")]
    InputTooSmall {
        arch: String,
        input: usize,
        min: usize,
    },
    #[error("no configuration (e.g. policy bits) for layer '{0}'")]
    NoLayerConfig(String),
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    ResNet20,
    ResNet32,
    ResNet56,
    ResNet18,
    ResNet50,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::ResNet20 => "resnet20",
            Arch::ResNet32 => "resnet32",
            Arch::ResNet56 => "resnet56",
            Arch::ResNet18 => "resnet18",
            Arch::ResNet50 => "resnet50",
        }
    }
    /// The CIFAR ResNets (20/32/56) always use the 3×3 stride-1 stem.
    pub fn is_cifar_resnet(self) -> bool {
        matches!(self, Arch::ResNet20 | Arch::ResNet32 | Arch::ResNet56)
    }
}

impl std::str::FromStr for Arch {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, ModelError> {
        Ok(
            match s.to_ascii_lowercase().replace(['-', '_'], "").as_str() {
                "resnet20" => Arch::ResNet20,
                "resnet32" => Arch::ResNet32,
                "resnet56" => Arch::ResNet56,
                "resnet18" => Arch::ResNet18,
                "resnet50" => Arch::ResNet50,
                _ => return Err(ModelError::UnknownArch(s.to_string())),
            },
        )
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The stem of ResNet-18/50: CIFAR (3×3 stride 1, no max-pool) or ImageNet (7×7/2 + max-pool).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stem {
    Cifar,
    Imagenet,
}

impl std::str::FromStr for Stem {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, ModelError> {
        match s {
            "cifar" => Ok(Stem::Cifar),
            "imagenet" => Ok(Stem::Imagenet),
            _ => Err(ModelError::Invalid(format!(
                "unknown stem '{s}' (cifar, imagenet)"
            ))),
        }
    }
}

/// Hyper-parameters of a network, separate from its weights (saved with every checkpoint).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub in_channels: usize,
    pub num_classes: usize,
    /// Square input resolution the layer geometry (and later BOPs) is computed for.
    pub input_size: usize,
    pub stem: Stem,
}

impl ModelConfig {
    pub fn new(arch: Arch, in_channels: usize, num_classes: usize, input_size: usize) -> Self {
        let stem = if arch.is_cifar_resnet() || input_size <= 64 {
            Stem::Cifar
        } else {
            Stem::Imagenet
        };
        Self {
            arch,
            in_channels,
            num_classes,
            input_size,
            stem,
        }
    }
}
