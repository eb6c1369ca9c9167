//! Inverted-residual networks with depthwise convs and ReLU6: MobileNetV2 (torchvision names,
//! width multiplier, CIFAR or ImageNet stem) and EfficientNet-Lite0 (efficientnet_pytorch
//! names, TensorFlow "SAME" padding, batch-norm eps 1e-3, no squeeze-and-excitation).

use super::graph::{Graph, Op};
use super::layers::{path_for, ConvSpec, LayerFactory, LinearSpec};
use super::mobile_blocks::{ConvBn, InvertedResidual};
use super::resnet::{batch_norm, conv_out};
use super::{Arch, ModelConfig, ModelError, Network, Stem};
use tch::nn::{self, ModuleT};
use tch::Tensor;

/// Layer names of the two weight layouts.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Naming {
    Torchvision,
    EfficientNetPytorch,
}

/// One stage of inverted residuals: expansion, kernel, output channels, repeats, first stride.
struct Stage {
    expand: usize,
    kernel: usize,
    channels: usize,
    repeats: usize,
    stride: usize,
}

const fn stage(
    expand: usize,
    kernel: usize,
    channels: usize,
    repeats: usize,
    stride: usize,
) -> Stage {
    Stage {
        expand,
        kernel,
        channels,
        repeats,
        stride,
    }
}

const MOBILENET_V2: [Stage; 7] = [
    stage(1, 3, 16, 1, 1),
    stage(6, 3, 24, 2, 2),
    stage(6, 3, 32, 3, 2),
    stage(6, 3, 64, 4, 2),
    stage(6, 3, 96, 3, 1),
    stage(6, 3, 160, 3, 2),
    stage(6, 3, 320, 1, 1),
];

const EFFICIENTNET_LITE0: [Stage; 7] = [
    stage(1, 3, 16, 1, 1),
    stage(6, 3, 24, 2, 2),
    stage(6, 5, 40, 2, 2),
    stage(6, 3, 80, 3, 2),
    stage(6, 5, 112, 3, 1),
    stage(6, 5, 192, 4, 2),
    stage(6, 3, 320, 1, 1),
];

/// torchvision's `_make_divisible`: round to a multiple of 8, never more than 10% down.
fn make_divisible(v: f64) -> usize {
    let d = 8.0;
    let mut n = ((v + d / 2.0) / d).floor() * d;
    n = n.max(d);
    if n < 0.9 * v {
        n += d;
    }
    n as usize
}

/// TF "SAME" padding for one spatial size: output `ceil(in/stride)`, padding split with the
/// extra pixel after.
fn same_padding(size: usize, kernel: usize, stride: usize) -> (usize, usize, usize) {
    let out = size.div_ceil(stride);
    let total = ((out - 1) * stride + kernel).saturating_sub(size);
    (total / 2, total - total / 2, out)
}

struct Builder<'a, 'f> {
    root: nn::Path<'a>,
    factory: &'f dyn LayerFactory,
    hw: [usize; 2],
    convs: Vec<ConvSpec>,
    naming: Naming,
    bn_eps: f64,
}

/// One conv layer to lay out.
struct ConvDef<'n> {
    conv: &'n str,
    bn: &'n str,
    c_in: usize,
    c_out: usize,
    kernel: usize,
    stride: usize,
    groups: usize,
    quantizable: bool,
    signed_input: bool,
}

impl Builder<'_, '_> {
    fn conv_bn(&mut self, d: ConvDef) -> Result<ConvBn, ModelError> {
        let in_hw = self.hw;
        let (padding, out_hw, same_pad) = match self.naming {
            Naming::Torchvision => {
                let p = (d.kernel - 1) / 2;
                (p, in_hw.map(|s| conv_out(s, d.kernel, d.stride, p)), None)
            }
            Naming::EfficientNetPytorch => {
                let (t, b, oh) = same_padding(in_hw[0], d.kernel, d.stride);
                let (l, r, ow) = same_padding(in_hw[1], d.kernel, d.stride);
                if t == b && l == r && t == l {
                    (t, [oh, ow], None)
                } else {
                    (0, [oh, ow], Some([l as i64, r as i64, t as i64, b as i64]))
                }
            }
        };
        let spec = ConvSpec {
            name: d.conv.to_string(),
            in_channels: d.c_in,
            out_channels: d.c_out,
            kernel: d.kernel,
            stride: d.stride,
            padding,
            groups: d.groups,
            in_hw,
            out_hw,
            quantizable: d.quantizable,
            signed_input: d.signed_input,
        };
        let conv = self.factory.conv(path_for(&self.root, d.conv), &spec)?;
        self.convs.push(spec);
        self.hw = out_hw;
        Ok(ConvBn {
            name: d.conv.to_string(),
            conv,
            bn: batch_norm(path_for(&self.root, d.bn), d.c_out, self.bn_eps),
            bn_eps: self.bn_eps,
            same_pad,
        })
    }

    /// Block `index` (0-based over all blocks) from `c_in` to `c_out` channels.
    fn block(
        &mut self,
        index: usize,
        c_in: usize,
        c_out: usize,
        st: &Stage,
        stride: usize,
    ) -> Result<InvertedResidual, ModelError> {
        let hidden = match self.naming {
            Naming::Torchvision => (c_in as f64 * st.expand as f64).round() as usize,
            Naming::EfficientNetPytorch => c_in * st.expand,
        };
        // (expand conv/bn, depthwise conv/bn, project conv/bn) names.
        let names: [String; 6] = match self.naming {
            Naming::Torchvision => {
                let p = format!("features.{}.conv", index + 1);
                if st.expand == 1 {
                    [
                        String::new(),
                        String::new(),
                        format!("{p}.0.0"),
                        format!("{p}.0.1"),
                        format!("{p}.1"),
                        format!("{p}.2"),
                    ]
                } else {
                    [
                        format!("{p}.0.0"),
                        format!("{p}.0.1"),
                        format!("{p}.1.0"),
                        format!("{p}.1.1"),
                        format!("{p}.2"),
                        format!("{p}.3"),
                    ]
                }
            }
            Naming::EfficientNetPytorch => {
                let p = format!("_blocks.{index}");
                [
                    format!("{p}._expand_conv"),
                    format!("{p}._bn0"),
                    format!("{p}._depthwise_conv"),
                    format!("{p}._bn1"),
                    format!("{p}._project_conv"),
                    format!("{p}._bn2"),
                ]
            }
        };
        let expand = if st.expand != 1 {
            Some(self.conv_bn(ConvDef {
                conv: &names[0],
                bn: &names[1],
                c_in,
                c_out: hidden,
                kernel: 1,
                stride: 1,
                groups: 1,
                quantizable: true,
                // The block input is the previous block's linear output (plus residual).
                signed_input: true,
            })?)
        } else {
            None
        };
        let depthwise = self.conv_bn(ConvDef {
            conv: &names[2],
            bn: &names[3],
            c_in: hidden,
            c_out: hidden,
            kernel: st.kernel,
            stride,
            groups: hidden,
            quantizable: true,
            // Without expansion the input is the stem's ReLU6 output.
            signed_input: false,
        })?;
        let project = self.conv_bn(ConvDef {
            conv: &names[4],
            bn: &names[5],
            c_in: hidden,
            c_out,
            kernel: 1,
            stride: 1,
            groups: 1,
            quantizable: true,
            signed_input: false,
        })?;
        Ok(InvertedResidual {
            expand,
            depthwise,
            project,
            residual: stride == 1 && c_in == c_out,
        })
    }
}

/// MobileNetV2 or EfficientNet-Lite0 with conv layers from a [`LayerFactory`].
#[derive(Debug)]
pub struct MobileNet {
    config: ModelConfig,
    stem: ConvBn,
    blocks: Vec<InvertedResidual>,
    head_conv: ConvBn,
    fc: nn::Linear,
    convs: Vec<ConvSpec>,
    fc_spec: LinearSpec,
}

/// Refuses a configuration the family cannot lay out.
fn check_config(config: &ModelConfig, lite: bool, cifar: bool) -> Result<(), ModelError> {
    if config.in_channels == 0 || config.num_classes == 0 {
        return Err(ModelError::Invalid(
            "input channels and class count must be positive".into(),
        ));
    }
    if !(config.width > 0.0 && config.width.is_finite()) {
        return Err(ModelError::Invalid(format!(
            "width multiplier {} must be positive",
            config.width
        )));
    }
    if lite && config.width != 1.0 {
        return Err(ModelError::Invalid(
            "efficientnet-lite0 has a fixed width (1.0)".into(),
        ));
    }
    let min_input = if cifar { 8 } else { 32 };
    if config.input_size < min_input {
        return Err(ModelError::InputTooSmall {
            arch: config.arch.to_string(),
            input: config.input_size,
            min: min_input,
        });
    }
    Ok(())
}

/// The head: a 1×1 conv to 1280 channels (more above width 1) and the classifier.
fn head(
    b: &mut Builder<'_, '_>,
    root: &nn::Path,
    config: &ModelConfig,
    c_in: usize,
    n_blocks: usize,
    lite: bool,
) -> Result<(ConvBn, nn::Linear, LinearSpec), ModelError> {
    let naming = b.naming;
    let last = if lite {
        1280
    } else {
        make_divisible(1280.0 * config.width.max(1.0))
    };
    let head_name = format!("features.{}", n_blocks + 1);
    let (head_conv_name, head_bn_name) = match naming {
        Naming::Torchvision => (format!("{head_name}.0"), format!("{head_name}.1")),
        Naming::EfficientNetPytorch => ("_conv_head".to_string(), "_bn1".to_string()),
    };
    let head_conv = b.conv_bn(ConvDef {
        conv: &head_conv_name,
        bn: &head_bn_name,
        c_in,
        c_out: last,
        kernel: 1,
        stride: 1,
        groups: 1,
        quantizable: true,
        signed_input: true,
    })?;
    let fc_name = match naming {
        Naming::Torchvision => "classifier.1",
        Naming::EfficientNetPytorch => "_fc",
    };
    let fc_spec = LinearSpec {
        name: fc_name.into(),
        in_features: last,
        out_features: config.num_classes,
        hidden: Vec::new(),
    };
    // torchvision's classifier init: N(0, 0.01), zero bias.
    let fc = nn::linear(
        path_for(root, fc_name),
        last as i64,
        config.num_classes as i64,
        nn::LinearConfig {
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: 0.01,
            },
            bs_init: Some(nn::Init::Const(0.0)),
            bias: true,
        },
    );
    Ok((head_conv, fc, fc_spec))
}

impl MobileNet {
    pub fn new(
        root: &nn::Path,
        config: &ModelConfig,
        factory: &dyn LayerFactory,
    ) -> Result<Self, ModelError> {
        let lite = config.arch == Arch::EfficientNetLite0;
        // The CIFAR variant runs the stem and the first stride-2 stage at stride 1 (8× down).
        let cifar = !lite && config.stem == Stem::Cifar;
        check_config(config, lite, cifar)?;
        let (stages, naming, bn_eps) = if lite {
            (&EFFICIENTNET_LITE0, Naming::EfficientNetPytorch, 1e-3)
        } else {
            (&MOBILENET_V2, Naming::Torchvision, 1e-5)
        };
        let width = |c: usize| {
            if lite {
                c
            } else {
                make_divisible(c as f64 * config.width)
            }
        };
        let mut b = Builder {
            root: root.clone(),
            factory,
            hw: [config.input_size; 2],
            convs: Vec::new(),
            naming,
            bn_eps,
        };
        let stem_width = width(32);
        let (stem_conv, stem_bn) = match naming {
            Naming::Torchvision => ("features.0.0", "features.0.1"),
            Naming::EfficientNetPytorch => ("_conv_stem", "_bn0"),
        };
        let stem = b.conv_bn(ConvDef {
            conv: stem_conv,
            bn: stem_bn,
            c_in: config.in_channels,
            c_out: stem_width,
            kernel: 3,
            stride: if cifar { 1 } else { 2 },
            groups: 1,
            quantizable: false,
            signed_input: false,
        })?;
        let mut blocks = Vec::new();
        let mut c_in = stem_width;
        for (si, st) in stages.iter().enumerate() {
            let c_out = width(st.channels);
            for r in 0..st.repeats {
                let mut stride = if r == 0 { st.stride } else { 1 };
                if cifar && si == 1 {
                    stride = 1;
                }
                blocks.push(b.block(blocks.len(), c_in, c_out, st, stride)?);
                c_in = c_out;
            }
        }
        let (head_conv, fc, fc_spec) = head(&mut b, root, config, c_in, blocks.len(), lite)?;
        Ok(MobileNet {
            config: config.clone(),
            stem,
            blocks,
            head_conv,
            fc,
            convs: b.convs,
            fc_spec,
        })
    }
}

impl Network for MobileNet {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn convs(&self) -> &[ConvSpec] {
        &self.convs
    }

    fn fc_spec(&self) -> &LinearSpec {
        &self.fc_spec
    }

    /// The head conv's ReLU6 output, before global average pooling.
    fn features(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut h = self.stem.forward_t(xs, train).clamp(0.0, 6.0);
        for b in &self.blocks {
            h = b.forward_t(&h, train);
        }
        self.head_conv.forward_t(&h, train).clamp(0.0, 6.0)
    }

    /// The inference forward pass as graph operations (see [`Graph`]).
    fn graph(&self) -> Graph {
        let mut g = Graph::default();
        let x = self.stem.graph(&mut g, Graph::INPUT);
        let mut h = g.push(Op::Relu6 { input: x });
        for b in &self.blocks {
            h = b.graph(&mut g, h);
        }
        let x = self.head_conv.graph(&mut g, h);
        let h = g.push(Op::Relu6 { input: x });
        g.linear(h, &self.fc);
        g
    }

    /// Global average pool + linear (the reference's dropout before it is left out).
    fn head(&self, features: &Tensor) -> Tensor {
        super::layers::gap_linear(&self.fc, features)
    }

    fn fc_weight(&self) -> &Tensor {
        &self.fc.ws
    }
}

impl ModuleT for MobileNet {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.head(&self.features(xs, train))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::FullPrecisionConvs;

    fn params(cfg: &ModelConfig) -> (i64, MobileNet) {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let net = MobileNet::new(&vs.root(), cfg, &FullPrecisionConvs).unwrap();
        let n = vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum();
        (n, net)
    }

    #[test]
    fn mobilenet_v2_matches_torchvision() {
        let (n, net) = params(&ModelConfig::new(Arch::MobileNetV2, 3, 1000, 224));
        assert_eq!(n, 3_504_872); // torchvision mobilenet_v2
        assert_eq!(net.convs().len(), 52);
        assert_eq!(net.convs().last().unwrap().out_hw, [7, 7]);
        let dw = net
            .convs()
            .iter()
            .find(|c| c.name == "features.2.conv.1.0")
            .unwrap();
        assert_eq!((dw.groups, dw.in_channels, dw.stride), (96, 96, 2));
        let out = net.forward_t(
            &Tensor::zeros([1, 3, 224, 224], tch::kind::FLOAT_CPU),
            false,
        );
        assert_eq!(out.size(), vec![1, 1000]);
    }

    #[test]
    fn mobilenet_v2_cifar_variant_and_width() {
        let mut cfg = ModelConfig::new(Arch::MobileNetV2, 3, 10, 32);
        assert_eq!(cfg.stem, Stem::Cifar);
        let (_, net) = params(&cfg);
        assert_eq!(net.convs().last().unwrap().out_hw, [4, 4]);
        cfg.width = 0.5;
        let (_, half) = params(&cfg);
        assert_eq!(half.convs()[0].out_channels, 16);
        assert_eq!(half.fc_spec().in_features, 1280);
    }

    #[test]
    fn efficientnet_lite0_geometry() {
        let (n, net) = params(&ModelConfig::new(Arch::EfficientNetLite0, 3, 1000, 224));
        // tensors.txt: 4,694,024 floats, of which BN running stats are not trainable.
        let bn_stats: i64 = 2 * net
            .convs()
            .iter()
            .map(|c| c.out_channels as i64)
            .sum::<i64>();
        assert_eq!(n + bn_stats, 4_694_024);
        assert_eq!(net.convs()[0].out_hw, [112, 112]);
        assert_eq!(net.convs().last().unwrap().out_hw, [7, 7]);
        assert_eq!(same_padding(224, 3, 2), (0, 1, 112));
        assert_eq!(same_padding(28, 5, 2), (1, 2, 14));
        assert_eq!(same_padding(14, 5, 1), (2, 2, 14));
    }
}
