//! Layer descriptions and the factory through which networks create their conv layers.
//! Quantized networks plug in a different factory; the network code stays the same.

use super::ModelError;
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::Tensor;

/// Geometry of one conv layer at the model's configured input size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvSpec {
    pub name: String,
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub groups: usize,
    pub in_hw: [usize; 2],
    pub out_hw: [usize; 2],
    /// False for the full-precision stem (as in the paper); true for every other conv.
    pub quantizable: bool,
    /// The input can be negative (it follows a linear bottleneck, not a ReLU), so its
    /// activation quantizer must be signed.
    #[serde(default)]
    pub signed_input: bool,
}

/// The var-store name of conv layer `layer`'s kernel: `LAYER.weight`, as tch's conv module names
/// it. Every reader of a kernel by name (exports, HAWQ, the integer executor) asks here.
pub fn kernel_name(layer: &str) -> String {
    format!("{layer}.weight")
}

impl ConvSpec {
    /// Its kernel's var-store name ([`kernel_name`]).
    pub fn kernel_name(&self) -> String {
        kernel_name(&self.name)
    }

    /// `C_in · C_out · k² · H_out · W_out / groups` (METHOD.md).
    pub fn macs(&self) -> u64 {
        (self.in_channels * self.out_channels * self.kernel * self.kernel) as u64
            * (self.out_hw[0] * self.out_hw[1]) as u64
            / self.groups as u64
    }
    pub fn params(&self) -> u64 {
        (self.in_channels / self.groups * self.out_channels * self.kernel * self.kernel) as u64
    }
}

/// The classifier after global pooling (always full precision): one linear layer, or an
/// MLP (an imported network's `Linear → HardSwish → Linear`) with `hidden` widths between.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinearSpec {
    pub name: String,
    pub in_features: usize,
    pub out_features: usize,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hidden: Vec<usize>,
}

impl LinearSpec {
    /// Each linear layer's `(in, out)`, in order.
    fn layers(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let widths: Vec<usize> = std::iter::once(self.in_features)
            .chain(self.hidden.iter().copied())
            .chain(std::iter::once(self.out_features))
            .collect();
        (0..widths.len() - 1).map(move |i| (widths[i], widths[i + 1]))
    }
    pub fn macs(&self) -> u64 {
        self.layers().map(|(i, o)| (i * o) as u64).sum()
    }
    /// Weights and biases.
    pub fn params(&self) -> u64 {
        self.layers().map(|(i, o)| (i * o + o) as u64).sum()
    }
}

/// A conv layer as the network sees it.
pub trait ConvLayer: std::fmt::Debug + Send {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor;
}

/// Creates the conv layers of a network, one call per layer, with its full spec.
pub trait LayerFactory {
    /// Fails when the factory has no way to build `spec` (e.g. a policy that lacks the layer).
    fn conv(&self, path: nn::Path, spec: &ConvSpec) -> Result<Box<dyn ConvLayer>, ModelError>;
}

/// Resolves a dotted layer name (`layer1.0.conv1`) to a var-store path.
pub fn path_for<'a>(root: &nn::Path<'a>, name: &str) -> nn::Path<'a> {
    name.split('.').fold(root.clone(), |p, part| p / part)
}

/// Plain full-precision convolutions (bias-free, as every conv here is followed by BN).
#[derive(Debug, Clone, Copy, Default)]
pub struct FullPrecisionConvs;

#[derive(Debug)]
struct FpConv(nn::Conv2D);

impl ConvLayer for FpConv {
    fn forward_t(&self, xs: &Tensor, _train: bool) -> Tensor {
        self.0.forward(xs)
    }
}

impl LayerFactory for FullPrecisionConvs {
    fn conv(&self, path: nn::Path, spec: &ConvSpec) -> Result<Box<dyn ConvLayer>, ModelError> {
        Ok(Box::new(FpConv(fp_conv(path, spec))))
    }
}

/// A bias-free conv with torchvision's ResNet init, registered at `path` as `weight`.
pub fn fp_conv(path: nn::Path, spec: &ConvSpec) -> nn::Conv2D {
    let cfg = nn::ConvConfig {
        stride: spec.stride as i64,
        padding: spec.padding as i64,
        groups: spec.groups as i64,
        bias: false,
        // torchvision's ResNet init: Kaiming normal, fan-out, ReLU gain.
        ws_init: nn::Init::Kaiming {
            dist: nn::init::NormalOrUniform::Normal,
            fan: nn::init::FanInOut::FanOut,
            non_linearity: nn::init::NonLinearity::ReLU,
        },
        ..Default::default()
    };
    nn::conv2d(
        path,
        spec.in_channels as i64,
        spec.out_channels as i64,
        spec.kernel as i64,
        cfg,
    )
}

/// Global average pooling then the linear classifier: the head every network here ends in
/// (and why CAM applies to all of them).
pub fn gap_linear(fc: &nn::Linear, features: &Tensor) -> Tensor {
    fc.forward(&features.mean_dim([2i64, 3].as_slice(), false, features.kind()))
}
