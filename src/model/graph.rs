//! A network's forward pass as a flat list of operations, for exporters (ONNX) that must
//! rebuild the same function outside libtorch. Each network writes its own graph next to its
//! `forward_t`, from the same layer structs, so the two cannot name different layers.

use tch::Tensor;

/// A value in the graph: 0 is the (normalised) input, `i + 1` is the output of `ops[i]`.
pub type Value = usize;

/// Inference-mode batch norm: `(x − mean)/√(var + eps)·weight + bias`.
#[derive(Debug)]
pub struct BatchNormParams {
    pub weight: Tensor,
    pub bias: Tensor,
    pub mean: Tensor,
    pub var: Tensor,
    pub eps: f64,
}

#[derive(Debug)]
pub enum Op {
    /// Zero padding `[left, right, top, bottom]` (TF "SAME" convs).
    Pad {
        input: Value,
        pads: [i64; 4],
    },
    /// The conv layer of this name (its geometry is the network's `ConvSpec`; its kernel
    /// and quantizer state are in the var store under the name).
    Conv {
        input: Value,
        layer: String,
    },
    BatchNorm {
        input: Value,
        params: BatchNormParams,
    },
    Relu {
        input: Value,
    },
    /// `clamp(x, 0, 6)`.
    Relu6 {
        input: Value,
    },
    Add {
        a: Value,
        b: Value,
    },
    MaxPool {
        input: Value,
        kernel: i64,
        stride: i64,
        padding: i64,
    },
    /// Global average pooling to `N×C`.
    GlobalAvgPool {
        input: Value,
    },
    /// `x·Wᵀ + b` on `N×C`.
    Linear {
        input: Value,
        weight: Tensor,
        bias: Tensor,
    },
}

impl Op {
    /// The values the op reads.
    pub fn inputs(&self) -> Vec<Value> {
        match self {
            Op::Pad { input, .. }
            | Op::Conv { input, .. }
            | Op::BatchNorm { input, .. }
            | Op::Relu { input }
            | Op::Relu6 { input }
            | Op::MaxPool { input, .. }
            | Op::GlobalAvgPool { input }
            | Op::Linear { input, .. } => vec![*input],
            Op::Add { a, b } => vec![*a, *b],
        }
    }
}

/// The forward pass; its output is the last op's value.
#[derive(Debug, Default)]
pub struct Graph {
    pub ops: Vec<Op>,
}

impl Graph {
    /// The input value.
    pub const INPUT: Value = 0;

    /// Appends `op`, returning its output value.
    pub fn push(&mut self, op: Op) -> Value {
        self.ops.push(op);
        self.ops.len()
    }

    /// `eps` as the layer was built with (tch keeps its config private).
    pub fn batch_norm(&mut self, input: Value, bn: &tch::nn::BatchNorm, eps: f64) -> Value {
        // Shallow clones: the integer executor trains through these (scale and shift).
        let one = |t: &Option<Tensor>, fill: f64| match t {
            Some(t) => t.shallow_clone(),
            None => bn.running_mean.ones_like() * fill,
        };
        let params = BatchNormParams {
            weight: one(&bn.ws, 1.0),
            bias: one(&bn.bs, 0.0),
            mean: bn.running_mean.shallow_clone(),
            var: bn.running_var.shallow_clone(),
            eps,
        };
        self.push(Op::BatchNorm { input, params })
    }

    pub fn linear(&mut self, input: Value, fc: &tch::nn::Linear) -> Value {
        let pooled = self.push(Op::GlobalAvgPool { input });
        let bias = match &fc.bs {
            Some(b) => b.shallow_clone(),
            None => Tensor::zeros([fc.ws.size()[0]], (fc.ws.kind(), fc.ws.device())),
        };
        self.push(Op::Linear {
            input: pooled,
            weight: fc.ws.shallow_clone(),
            bias,
        })
    }
}
