//! The blocks of the inverted-residual networks: a conv with its batch norm, and an inverted
//! residual (expansion, depthwise, projection, optional skip).

use super::graph::{Graph, Op, Value};
use super::layers::ConvLayer;
use tch::nn::{self, ModuleT};
use tch::Tensor;

/// Conv + BN, with TF "SAME" zero padding `[left, right, top, bottom]` applied before the conv
/// when it is asymmetric (EfficientNet's stride-2 layers).
#[derive(Debug)]
pub(super) struct ConvBn {
    /// The conv layer's name (its `ConvSpec::name`).
    pub(super) name: String,
    pub(super) conv: Box<dyn ConvLayer>,
    pub(super) bn: nn::BatchNorm,
    pub(super) bn_eps: f64,
    pub(super) same_pad: Option<[i64; 4]>,
}

impl ConvBn {
    pub(super) fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let h = match &self.same_pad {
            Some(p) => self
                .conv
                .forward_t(&xs.constant_pad_nd(p.as_slice()), train),
            None => self.conv.forward_t(xs, train),
        };
        self.bn.forward_t(&h, train)
    }

    pub(super) fn graph(&self, g: &mut Graph, input: Value) -> Value {
        let input = match self.same_pad {
            Some(pads) => g.push(Op::Pad { input, pads }),
            None => input,
        };
        let conv = g.push(Op::Conv {
            input,
            layer: self.name.clone(),
        });
        g.batch_norm(conv, &self.bn, self.bn_eps)
    }
}

#[derive(Debug)]
pub(super) struct InvertedResidual {
    pub(super) expand: Option<ConvBn>,
    pub(super) depthwise: ConvBn,
    pub(super) project: ConvBn,
    pub(super) residual: bool,
}

impl InvertedResidual {
    pub(super) fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut h = xs.shallow_clone();
        if let Some(e) = &self.expand {
            h = e.forward_t(&h, train).clamp(0.0, 6.0);
        }
        h = self.depthwise.forward_t(&h, train).clamp(0.0, 6.0);
        // Linear bottleneck: no activation after the projection.
        h = self.project.forward_t(&h, train);
        if self.residual {
            h + xs
        } else {
            h
        }
    }

    /// [`Self::forward_t`] as graph operations (inference).
    pub(super) fn graph(&self, g: &mut Graph, input: Value) -> Value {
        let mut h = input;
        if let Some(e) = &self.expand {
            let x = e.graph(g, h);
            h = g.push(Op::Relu6 { input: x });
        }
        let x = self.depthwise.graph(g, h);
        h = g.push(Op::Relu6 { input: x });
        h = self.project.graph(g, h);
        if self.residual {
            g.push(Op::Add { a: h, b: input })
        } else {
            h
        }
    }
}
