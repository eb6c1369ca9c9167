//! The CNNs that GMPQ quantizes. Every conv layer has a stable, torchvision-compatible name
//! (`conv1`, `layer1.0.conv1`, `layer2.0.downsample.0`, …) and a [`ConvSpec`] describing its
//! geometry, so quantization policies and BOPs can refer to layers by name.

#[cfg(feature = "cli")]
mod args;
pub mod graph;
mod imported;
mod layers;
mod mobile;
mod mobile_blocks;
pub mod options;
mod resnet;

#[cfg(feature = "cli")]
pub use args::ModelArgs;
pub use imported::{Cam, Head, Imported, ImportedGraph, TensorSpec};
pub use layers::{
    fp_conv, kernel_name, path_for, ConvLayer, ConvSpec, FullPrecisionConvs, LayerFactory,
    LinearSpec,
};
pub use mobile::MobileNet;
pub use resnet::ResNet;
use tch::nn::{self, ModuleT};
use tch::Tensor;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("unknown model '{0}' ({names})", names = arch_names())]
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
    /// A network imported from ONNX: its graph is in [`ModelConfig::graph`].
    Onnx,
}

/// One registered network: its name on the command line and in checkpoints, how its
/// family lays it out, and which shaping flags apply to it.
pub struct ArchEntry {
    pub arch: Arch,
    pub name: &'static str,
    build: Build,
    pub traits: ArchTraits,
}

/// What a network allows beyond its family's layout.
#[derive(Debug, Clone, Copy)]
pub struct ArchTraits {
    /// `--stem` chooses between the CIFAR and ImageNet stems.
    pub stem_choice: bool,
    /// `--width` scales its channels.
    pub width_multiplier: bool,
    /// `gmpq import` reads its torchvision / efficientnet_pytorch weights.
    pub importable: bool,
    /// Its pretrained weights fix the input size and the stem (TF "SAME" padding laid out
    /// for 224 px).
    pub fixed_geometry: bool,
}

/// The CIFAR ResNets: one stem, no width multiplier, trained here only.
const CIFAR_RESNET: ArchTraits = ArchTraits {
    stem_choice: false,
    width_multiplier: false,
    importable: false,
    fixed_geometry: false,
};
const IMAGENET_RESNET: ArchTraits = ArchTraits {
    stem_choice: true,
    importable: true,
    ..CIFAR_RESNET
};
const MOBILENET_V2: ArchTraits = ArchTraits {
    width_multiplier: true,
    ..IMAGENET_RESNET
};
const EFFICIENTNET_LITE: ArchTraits = ArchTraits {
    stem_choice: false,
    fixed_geometry: true,
    ..IMAGENET_RESNET
};

impl ArchEntry {
    const fn new(arch: Arch, name: &'static str, build: Build, traits: ArchTraits) -> Self {
        Self {
            arch,
            name,
            build,
            traits,
        }
    }
}

#[cfg(test)]
mod arch_tests {
    use super::*;

    #[test]
    fn every_arch_has_its_row_and_its_name_parses_back() {
        for (i, e) in ARCHS.iter().enumerate() {
            assert_eq!(e.arch as usize, i, "{} out of order in ARCHS", e.name);
            assert_eq!(e.name.parse::<Arch>().unwrap(), e.arch);
            assert_eq!(e.arch.to_string(), e.name);
        }
        assert!("resnet-20".parse::<Arch>().is_ok());
        assert!("vgg16"
            .parse::<Arch>()
            .unwrap_err()
            .to_string()
            .contains("mobilenetv2"));
    }
}

fn resnet(
    r: &nn::Path,
    c: &ModelConfig,
    f: &dyn LayerFactory,
) -> Result<Box<dyn Network>, ModelError> {
    Ok(Box::new(ResNet::new(r, c, f)?))
}

fn mobile(
    r: &nn::Path,
    c: &ModelConfig,
    f: &dyn LayerFactory,
) -> Result<Box<dyn Network>, ModelError> {
    Ok(Box::new(MobileNet::new(r, c, f)?))
}

/// What `gmpq import --onnx` writes: the graph fixes everything.
const IMPORTED: ArchTraits = ArchTraits {
    importable: false,
    ..CIFAR_RESNET
};

fn imported(
    r: &nn::Path,
    c: &ModelConfig,
    f: &dyn LayerFactory,
) -> Result<Box<dyn Network>, ModelError> {
    Ok(Box::new(Imported::new(r, c, f)?))
}

/// Every network gmpq knows, in the order help texts list them.
pub const ARCHS: [ArchEntry; 8] = [
    ArchEntry::new(Arch::ResNet20, "resnet20", resnet, CIFAR_RESNET),
    ArchEntry::new(Arch::ResNet32, "resnet32", resnet, CIFAR_RESNET),
    ArchEntry::new(Arch::ResNet56, "resnet56", resnet, CIFAR_RESNET),
    ArchEntry::new(Arch::ResNet18, "resnet18", resnet, IMAGENET_RESNET),
    ArchEntry::new(Arch::ResNet50, "resnet50", resnet, IMAGENET_RESNET),
    ArchEntry::new(Arch::MobileNetV2, "mobilenetv2", mobile, MOBILENET_V2),
    ArchEntry::new(
        Arch::EfficientNetLite0,
        "efficientnet-lite0",
        mobile,
        EFFICIENTNET_LITE,
    ),
    ArchEntry::new(Arch::Onnx, "onnx", imported, IMPORTED),
];

impl Arch {
    pub fn entry(self) -> &'static ArchEntry {
        // ARCHS lists the variants in declaration order (checked by a test).
        &ARCHS[self as usize]
    }
    pub fn name(self) -> &'static str {
        self.entry().name
    }
    /// The CIFAR ResNets (20/32/56) always use the 3×3 stride-1 stem.
    pub fn is_cifar_resnet(self) -> bool {
        matches!(self, Arch::ResNet20 | Arch::ResNet32 | Arch::ResNet56)
    }
}

/// Every network's name, comma-separated (for help and errors).
pub fn arch_names() -> String {
    arch_names_where(|_| true)
}

/// The names of the networks whose row passes `keep`, comma-separated.
pub fn arch_names_where(keep: impl Fn(&ArchEntry) -> bool) -> String {
    let names: Vec<&str> = ARCHS.iter().filter(|e| keep(e)).map(|e| e.name).collect();
    names.join(", ")
}

impl std::str::FromStr for Arch {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, ModelError> {
        let key = |n: &str| n.to_ascii_lowercase().replace(['-', '_'], "");
        ARCHS
            .iter()
            .find(|e| key(e.name) == key(s))
            .map(|e| e.arch)
            .ok_or_else(|| ModelError::UnknownArch(s.to_string()))
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
    /// An imported network's graph (`arch` onnx); none for the built-in networks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graph: Option<std::sync::Arc<ImportedGraph>>,
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
            graph: None,
        }
    }
}

/// A network family: lays out its layers for a [`ModelConfig`] and exposes what
/// quantization, attribution and export read. A new network is one file implementing this
/// plus one row in [`ARCHS`].
pub trait Network: std::fmt::Debug + Send {
    fn config(&self) -> &ModelConfig;
    /// Every conv layer in forward order, stem first.
    fn convs(&self) -> &[ConvSpec];
    fn fc_spec(&self) -> &LinearSpec;
    /// The last feature map (N×C×H×W) before global average pooling: where attribution is
    /// taken.
    fn features(&self, xs: &Tensor, train: bool) -> Tensor;
    /// Global average pool + linear head.
    fn head(&self, features: &Tensor) -> Tensor;
    /// The head's weight matrix (num_classes × C): the CAM weights.
    fn fc_weight(&self) -> &Tensor;
    /// Whether CAM with [`Self::fc_weight`] is Grad-CAM exactly (a GAP → linear head); where
    /// not (an imported MLP head), attribution takes the gradient.
    fn cam_exact(&self) -> bool {
        true
    }
    /// The inference forward pass as graph operations, for exporters.
    fn graph(&self) -> graph::Graph;
}

/// Lays out a family's network under a root with conv layers from a factory.
type Build = fn(&nn::Path, &ModelConfig, &dyn LayerFactory) -> Result<Box<dyn Network>, ModelError>;

/// Any of the networks, behind one interface ([`Network`], reached through `Deref`).
#[derive(Debug)]
pub struct Model(Box<dyn Network>);

impl Model {
    /// Lays out `config`'s network under `root` with conv layers from `factory`.
    pub fn new(
        root: &nn::Path,
        config: &ModelConfig,
        factory: &dyn LayerFactory,
    ) -> Result<Self, ModelError> {
        Ok(Model((config.arch.entry().build)(root, config, factory)?))
    }
}

impl std::ops::Deref for Model {
    type Target = dyn Network;
    fn deref(&self) -> &Self::Target {
        self.0.as_ref()
    }
}

impl ModuleT for Model {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.head(&self.features(xs, train))
    }
}
