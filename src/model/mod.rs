//! The CNNs that GMPQ quantizes. Every conv layer has a stable, torchvision-compatible name
//! (`conv1`, `layer1.0.conv1`, `layer2.0.downsample.0`, …) and a [`ConvSpec`] describing its
//! geometry, so quantization policies and BOPs can refer to layers by name.

pub mod graph;
mod layers;
mod mobile;
pub mod options;
mod resnet;

pub use layers::{
    fp_conv, path_for, ConvLayer, ConvSpec, FullPrecisionConvs, LayerFactory, LinearSpec,
};
pub use mobile::MobileNet;
pub use resnet::ResNet;
use tch::nn::{self, ModuleT};
use tch::Tensor;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(
        "unknown model '{0}' (resnet20, resnet32, resnet56, resnet18, resnet50, mobilenetv2, efficientnet-lite0)"
    )]
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
    MobileNetV2,
    #[serde(rename = "efficientnet-lite0")]
    EfficientNetLite0,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::ResNet20 => "resnet20",
            Arch::ResNet32 => "resnet32",
            Arch::ResNet56 => "resnet56",
            Arch::ResNet18 => "resnet18",
            Arch::ResNet50 => "resnet50",
            Arch::MobileNetV2 => "mobilenetv2",
            Arch::EfficientNetLite0 => "efficientnet-lite0",
        }
    }
    /// The CIFAR ResNets (20/32/56) always use the 3×3 stride-1 stem.
    pub fn is_cifar_resnet(self) -> bool {
        matches!(self, Arch::ResNet20 | Arch::ResNet32 | Arch::ResNet56)
    }
    /// Inverted-residual networks with depthwise convs and ReLU6.
    pub fn is_mobile(self) -> bool {
        matches!(self, Arch::MobileNetV2 | Arch::EfficientNetLite0)
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
                "mobilenetv2" => Arch::MobileNetV2,
                "efficientnetlite0" => Arch::EfficientNetLite0,
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
/// MobileNetV2's CIFAR variant runs its stem and its first stride-2 stage at stride 1.
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub in_channels: usize,
    pub num_classes: usize,
    /// Square input resolution the layer geometry (and later BOPs) is computed for.
    pub input_size: usize,
    pub stem: Stem,
    /// Channel width multiplier (MobileNetV2; 1 elsewhere).
    #[serde(default = "unit_width", skip_serializing_if = "is_unit_width")]
    pub width: f64,
}

fn unit_width() -> f64 {
    1.0
}

fn is_unit_width(w: &f64) -> bool {
    *w == 1.0
}

impl ModelConfig {
    pub fn new(arch: Arch, in_channels: usize, num_classes: usize, input_size: usize) -> Self {
        let stem =
            if arch.is_cifar_resnet() || (input_size <= 64 && arch != Arch::EfficientNetLite0) {
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
            width: 1.0,
        }
    }
}

/// Any of the networks, behind one interface: conv geometry, features for attribution,
/// the GAP + linear head.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // a handful per process: boxing would buy nothing
pub enum Model {
    ResNet(ResNet),
    Mobile(MobileNet),
}

impl Model {
    /// Lays out `config`'s network under `root` with conv layers from `factory`.
    pub fn new(
        root: &nn::Path,
        config: &ModelConfig,
        factory: &dyn LayerFactory,
    ) -> Result<Self, ModelError> {
        if config.arch.is_mobile() {
            Ok(Model::Mobile(MobileNet::new(root, config, factory)?))
        } else {
            Ok(Model::ResNet(ResNet::new(root, config, factory)?))
        }
    }

    /// The inference forward pass as graph operations, for exporters.
    pub fn graph(&self) -> graph::Graph {
        match self {
            Model::ResNet(n) => n.graph(),
            Model::Mobile(n) => n.graph(),
        }
    }

    pub fn config(&self) -> &ModelConfig {
        match self {
            Model::ResNet(n) => n.config(),
            Model::Mobile(n) => n.config(),
        }
    }

    /// Every conv layer in forward order, stem first.
    pub fn convs(&self) -> &[ConvSpec] {
        match self {
            Model::ResNet(n) => n.convs(),
            Model::Mobile(n) => n.convs(),
        }
    }

    pub fn fc_spec(&self) -> &LinearSpec {
        match self {
            Model::ResNet(n) => n.fc_spec(),
            Model::Mobile(n) => n.fc_spec(),
        }
    }

    /// The last feature map (N×C×H×W) before global average pooling: where attribution is
    /// taken.
    pub fn features(&self, xs: &Tensor, train: bool) -> Tensor {
        match self {
            Model::ResNet(n) => n.features(xs, train),
            Model::Mobile(n) => n.features(xs, train),
        }
    }

    /// Global average pool + linear head.
    pub fn head(&self, features: &Tensor) -> Tensor {
        match self {
            Model::ResNet(n) => n.head(features),
            Model::Mobile(n) => n.head(features),
        }
    }

    /// The head's weight matrix (num_classes × C): the CAM weights.
    pub fn fc_weight(&self) -> &Tensor {
        match self {
            Model::ResNet(n) => n.fc_weight(),
            Model::Mobile(n) => n.fc_weight(),
        }
    }
}

impl ModuleT for Model {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.head(&self.features(xs, train))
    }
}
