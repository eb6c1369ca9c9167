//! ResNets: CIFAR ResNet-20/32/56 (16/32/64 channels, 1×1-conv shortcuts) and ResNet-18/50
//! with a CIFAR or ImageNet stem, named as in torchvision.

use super::graph::{Graph, Op, Value};
use super::layers::{path_for, ConvLayer, ConvSpec, LayerFactory, LinearSpec};
use super::{Arch, ModelConfig, ModelError, Network, Stem};
use tch::nn::{self, ModuleT};
use tch::Tensor;

/// The ResNets' batch-norm epsilon (PyTorch's default).
const BN_EPS: f64 = 1e-5;

/// Batch norm initialised as PyTorch does (scale 1, shift 0); tch's default draws the scale
/// uniformly from [0, 1], which slows training noticeably.
pub(super) fn batch_norm(path: nn::Path, channels: usize, eps: f64) -> nn::BatchNorm {
    nn::batch_norm2d(
        path,
        channels as i64,
        nn::BatchNormConfig {
            ws_init: nn::Init::Const(1.0),
            bs_init: nn::Init::Const(0.0),
            eps,
            ..Default::default()
        },
    )
}

#[derive(Debug)]
struct ConvBn {
    /// The conv layer's name (its `ConvSpec::name`).
    name: String,
    conv: Box<dyn ConvLayer>,
    bn: nn::BatchNorm,
}

impl ConvBn {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.bn.forward_t(&self.conv.forward_t(xs, train), train)
    }

    fn graph(&self, g: &mut Graph, input: Value) -> Value {
        let conv = g.push(Op::Conv {
            input,
            layer: self.name.clone(),
        });
        g.batch_norm(conv, &self.bn, BN_EPS)
    }
}

#[derive(Debug)]
enum Block {
    Basic {
        a: ConvBn,
        b: ConvBn,
        downsample: Option<ConvBn>,
    },
    Bottleneck {
        a: ConvBn,
        b: ConvBn,
        c: ConvBn,
        downsample: Option<ConvBn>,
    },
}

impl Block {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let (out, downsample) = match self {
            Block::Basic { a, b, downsample } => {
                let h = a.forward_t(xs, train).relu();
                (b.forward_t(&h, train), downsample)
            }
            Block::Bottleneck {
                a,
                b,
                c,
                downsample,
            } => {
                let h = a.forward_t(xs, train).relu();
                let h = b.forward_t(&h, train).relu();
                (c.forward_t(&h, train), downsample)
            }
        };
        let shortcut = match downsample {
            Some(d) => d.forward_t(xs, train),
            None => xs.shallow_clone(),
        };
        (out + shortcut).relu()
    }

    /// [`Self::forward_t`] as graph operations (inference).
    fn graph(&self, g: &mut Graph, input: Value) -> Value {
        let (out, downsample) = match self {
            Block::Basic { a, b, downsample } => {
                let h = a.graph(g, input);
                let h = g.push(Op::Relu { input: h });
                (b.graph(g, h), downsample)
            }
            Block::Bottleneck {
                a,
                b,
                c,
                downsample,
            } => {
                let h = a.graph(g, input);
                let h = g.push(Op::Relu { input: h });
                let h = b.graph(g, h);
                let h = g.push(Op::Relu { input: h });
                (c.graph(g, h), downsample)
            }
        };
        let shortcut = match downsample {
            Some(d) => d.graph(g, input),
            None => input,
        };
        let sum = g.push(Op::Add {
            a: out,
            b: shortcut,
        });
        g.push(Op::Relu { input: sum })
    }
}

/// A ResNet whose conv layers come from a [`LayerFactory`].
#[derive(Debug)]
pub struct ResNet {
    config: ModelConfig,
    stem: ConvBn,
    max_pool: bool,
    blocks: Vec<Block>,
    fc: nn::Linear,
    convs: Vec<ConvSpec>,
    fc_spec: LinearSpec,
}

/// Tracks the spatial size while the network is laid out, so every [`ConvSpec`] knows its
/// input and output resolution.
struct Builder<'a, 'f> {
    root: nn::Path<'a>,
    factory: &'f dyn LayerFactory,
    hw: [usize; 2],
    convs: Vec<ConvSpec>,
}

pub(super) fn conv_out(size: usize, kernel: usize, stride: usize, padding: usize) -> usize {
    (size + 2 * padding).saturating_sub(kernel) / stride + 1
}

impl Builder<'_, '_> {
    /// Adds conv + BN named `conv_name`/`bn_name`; `advance` moves the tracked resolution.
    #[allow(clippy::too_many_arguments)]
    fn conv_bn(
        &mut self,
        conv_name: &str,
        bn_name: &str,
        in_hw: [usize; 2],
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        quantizable: bool,
    ) -> Result<ConvBn, ModelError> {
        let padding = kernel / 2;
        let out_hw = in_hw.map(|s| conv_out(s, kernel, stride, padding));
        let spec = ConvSpec {
            name: conv_name.to_string(),
            in_channels: c_in,
            out_channels: c_out,
            kernel,
            stride,
            padding,
            groups: 1,
            in_hw,
            out_hw,
            quantizable,
            signed_input: false,
        };
        let conv = self.factory.conv(path_for(&self.root, conv_name), &spec)?;
        self.convs.push(spec);
        self.hw = out_hw;
        Ok(ConvBn {
            name: conv_name.to_string(),
            conv,
            bn: batch_norm(path_for(&self.root, bn_name), c_out, BN_EPS),
        })
    }

    /// The 1×1 conv + BN shortcut (`PREFIX.downsample.{0,1}`) when the shape changes.
    fn shortcut(
        &mut self,
        prefix: &str,
        in_hw: [usize; 2],
        c_in: usize,
        c_out: usize,
        stride: usize,
    ) -> Result<Option<ConvBn>, ModelError> {
        if stride == 1 && c_in == c_out {
            return Ok(None);
        }
        let conv = format!("{prefix}.downsample.0");
        let bn = format!("{prefix}.downsample.1");
        self.conv_bn(&conv, &bn, in_hw, c_in, c_out, 1, stride, true)
            .map(Some)
    }

    fn basic(
        &mut self,
        prefix: &str,
        c_in: usize,
        c_out: usize,
        stride: usize,
    ) -> Result<Block, ModelError> {
        let in_hw = self.hw;
        let a = self.conv_bn(
            &format!("{prefix}.conv1"),
            &format!("{prefix}.bn1"),
            in_hw,
            c_in,
            c_out,
            3,
            stride,
            true,
        )?;
        let mid = self.hw;
        let b = self.conv_bn(
            &format!("{prefix}.conv2"),
            &format!("{prefix}.bn2"),
            mid,
            c_out,
            c_out,
            3,
            1,
            true,
        )?;
        let out_hw = self.hw;
        let downsample = self.shortcut(prefix, in_hw, c_in, c_out, stride)?;
        self.hw = out_hw;
        Ok(Block::Basic { a, b, downsample })
    }

    fn bottleneck(
        &mut self,
        prefix: &str,
        c_in: usize,
        width: usize,
        stride: usize,
    ) -> Result<Block, ModelError> {
        let c_out = width * 4;
        let in_hw = self.hw;
        let p = |s: &str| format!("{prefix}.{s}");
        let a = self.conv_bn(&p("conv1"), &p("bn1"), in_hw, c_in, width, 1, 1, true)?;
        let hw = self.hw;
        // torchvision (v1.5) puts the stride on the 3×3 conv.
        let b = self.conv_bn(&p("conv2"), &p("bn2"), hw, width, width, 3, stride, true)?;
        let hw = self.hw;
        let c = self.conv_bn(&p("conv3"), &p("bn3"), hw, width, c_out, 1, 1, true)?;
        let out_hw = self.hw;
        let downsample = self.shortcut(prefix, in_hw, c_in, c_out, stride)?;
        self.hw = out_hw;
        Ok(Block::Bottleneck {
            a,
            b,
            c,
            downsample,
        })
    }
}

impl ResNet {
    /// Lays out the network under `root` with conv layers from `factory`.
    pub fn new(
        root: &nn::Path,
        config: &ModelConfig,
        factory: &dyn LayerFactory,
    ) -> Result<Self, ModelError> {
        if config.in_channels == 0 || config.num_classes == 0 {
            return Err(ModelError::Invalid(
                "input channels and class count must be positive".into(),
            ));
        }
        let stem = if config.arch.is_cifar_resnet() {
            Stem::Cifar
        } else {
            config.stem
        };
        let min_input = match stem {
            Stem::Cifar => 8,
            Stem::Imagenet => 32,
        };
        if config.input_size < min_input {
            return Err(ModelError::InputTooSmall {
                arch: config.arch.to_string(),
                input: config.input_size,
                min: min_input,
            });
        }
        let mut b = Builder {
            root: root.clone(),
            factory,
            hw: [config.input_size; 2],
            convs: Vec::new(),
        };
        let (stem_width, stem_kernel, stem_stride) = match (config.arch.is_cifar_resnet(), stem) {
            (true, _) => (16, 3, 1),
            (false, Stem::Cifar) => (64, 3, 1),
            (false, Stem::Imagenet) => (64, 7, 2),
        };
        let in_hw = b.hw;
        let stem_layer = b.conv_bn(
            "conv1",
            "bn1",
            in_hw,
            config.in_channels,
            stem_width,
            stem_kernel,
            stem_stride,
            false,
        )?;
        let max_pool = stem == Stem::Imagenet;
        if max_pool {
            b.hw = b.hw.map(|s| conv_out(s, 3, 2, 1));
        }
        // (blocks per stage, stage widths, bottleneck?)
        let (depths, widths, bottleneck): (Vec<usize>, Vec<usize>, bool) = match config.arch {
            Arch::ResNet20 => (vec![3; 3], vec![16, 32, 64], false),
            Arch::ResNet32 => (vec![5; 3], vec![16, 32, 64], false),
            Arch::ResNet56 => (vec![9; 3], vec![16, 32, 64], false),
            Arch::ResNet18 => (vec![2; 4], vec![64, 128, 256, 512], false),
            Arch::ResNet50 => (vec![3, 4, 6, 3], vec![64, 128, 256, 512], true),
            Arch::MobileNetV2 | Arch::EfficientNetLite0 | Arch::Onnx => {
                return Err(ModelError::Invalid(format!(
                    "{} is not a ResNet",
                    config.arch
                )))
            }
        };
        let mut blocks = Vec::new();
        let mut c_in = stem_width;
        for (stage, (&depth, &width)) in depths.iter().zip(&widths).enumerate() {
            for i in 0..depth {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                let prefix = format!("layer{}.{i}", stage + 1);
                if bottleneck {
                    blocks.push(b.bottleneck(&prefix, c_in, width, stride)?);
                    c_in = width * 4;
                } else {
                    blocks.push(b.basic(&prefix, c_in, width, stride)?);
                    c_in = width;
                }
            }
        }
        let fc_spec = LinearSpec {
            name: "fc".into(),
            in_features: c_in,
            out_features: config.num_classes,
            hidden: Vec::new(),
        };
        let fc = nn::linear(
            path_for(root, "fc"),
            c_in as i64,
            config.num_classes as i64,
            Default::default(),
        );
        Ok(ResNet {
            config: config.clone(),
            stem: stem_layer,
            max_pool,
            blocks,
            fc,
            convs: b.convs,
            fc_spec,
        })
    }
}

impl Network for ResNet {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Every conv layer in forward order, stem first.
    fn convs(&self) -> &[ConvSpec] {
        &self.convs
    }

    fn fc_spec(&self) -> &LinearSpec {
        &self.fc_spec
    }

    /// The last feature map (N×C×H×W), before global average pooling: where attribution is
    /// taken.
    fn features(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut h = self.stem.forward_t(xs, train).relu();
        if self.max_pool {
            h = h.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        }
        for block in &self.blocks {
            h = block.forward_t(&h, train);
        }
        h
    }

    /// The inference forward pass as graph operations (see [`Graph`]).
    fn graph(&self) -> Graph {
        let mut g = Graph::default();
        let h = self.stem.graph(&mut g, Graph::INPUT);
        let mut h = g.push(Op::Relu { input: h });
        if self.max_pool {
            h = g.push(Op::MaxPool {
                input: h,
                kernel: 3,
                stride: 2,
                padding: 1,
                ceil: false,
            });
        }
        for block in &self.blocks {
            h = block.graph(&mut g, h);
        }
        g.linear(h, &self.fc);
        g
    }

    /// Global average pool + linear head.
    fn head(&self, features: &Tensor) -> Tensor {
        super::layers::gap_linear(&self.fc, features)
    }

    /// The head's weight matrix (num_classes × C): the CAM weights.
    fn fc_weight(&self) -> &Tensor {
        &self.fc.ws
    }
}

impl ModuleT for ResNet {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.head(&self.features(xs, train))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::FullPrecisionConvs;

    fn build(cfg: &ModelConfig) -> (nn::VarStore, ResNet) {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let net = ResNet::new(&vs.root(), cfg, &FullPrecisionConvs).unwrap();
        (vs, net)
    }

    #[test]
    fn resnet20_shapes_names_and_params() {
        let (vs, net) = build(&ModelConfig::new(Arch::ResNet20, 3, 10, 32));
        let out = net.forward_t(&Tensor::zeros([2, 3, 32, 32], tch::kind::FLOAT_CPU), false);
        assert_eq!(out.size(), vec![2, 10]);
        // 19 convs + 2 downsample convs = 21 conv layers, stem first and not quantizable.
        assert_eq!(net.convs().len(), 21);
        assert!(!net.convs()[0].quantizable);
        assert!(net
            .convs()
            .iter()
            .any(|c| c.name == "layer2.0.downsample.0"));
        let vars = vs.variables();
        assert!(vars.contains_key("layer3.2.conv2.weight"));
        assert!(vars.contains_key("layer2.0.downsample.1.running_mean"));
        let bn = &vars["layer1.0.bn1.weight"];
        assert_eq!(bn.min().double_value(&[]), 1.0);
        // ResNet-20 without shortcut convs has 269,722 parameters (3→10); add the 2 1×1 convs + BN.
        let n: i64 = vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum();
        assert_eq!(n, 269_722 + 16 * 32 + 32 * 2 + 32 * 64 + 64 * 2);
    }

    #[test]
    fn resnet18_imagenet_and_cifar_geometry() {
        let (vs, net) = build(&ModelConfig::new(Arch::ResNet18, 3, 1000, 224));
        let n: i64 = vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum();
        assert_eq!(n, 11_689_512); // torchvision resnet18
        assert_eq!(net.convs().last().unwrap().out_hw, [7, 7]);
        let mut cfg = ModelConfig::new(Arch::ResNet18, 3, 10, 32);
        cfg.stem = Stem::Cifar;
        let (_, net) = build(&cfg);
        let quantized: Vec<_> = net.convs().iter().filter(|c| c.quantizable).collect();
        assert_eq!(quantized.len(), 19);
        let macs: u64 = quantized.iter().map(|c| c.macs()).sum();
        assert_eq!(macs, 553_648_128); // METHOD.md's worked number
    }

    #[test]
    fn resnet50_param_count() {
        let (vs, _) = build(&ModelConfig::new(Arch::ResNet50, 3, 1000, 224));
        let n: i64 = vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum();
        assert_eq!(n, 25_557_032); // torchvision resnet50
    }
}
