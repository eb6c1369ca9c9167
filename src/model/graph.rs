//! A network's forward pass as a flat list of operations, for exporters (ONNX) that must
//! rebuild the same function outside libtorch, and for networks imported from ONNX, which
//! are nothing but such a list. Each built-in network writes its own graph next to its
//! `forward_t`, from the same layer structs, so the two cannot name different layers.
//!
//! An op holds its tensors as `T`: [`Tensor`]s in a live graph, their var-store names
//! (`Op<String>`) in an imported network's saved description. One table, [`Op::eval`], says
//! what each op computes; the executor, the exporters and the importer all go through it.

use serde::{Deserialize, Serialize};
use tch::Tensor;

/// A value in the graph: 0 is the (normalised) input, `i + 1` is the output of `ops[i]`.
pub type Value = usize;

/// Inference-mode batch norm: `(x − mean)/√(var + eps)·weight + bias`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchNormParams<T = Tensor> {
    pub weight: T,
    pub bias: T,
    pub mean: T,
    pub var: T,
    pub eps: f64,
}

/// A pooling window: square, symmetric padding (what torchvision's CNNs use).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    pub kernel: i64,
    pub stride: i64,
    pub padding: i64,
    /// Output size rounded up (PyTorch's `ceil_mode`).
    #[serde(default)]
    pub ceil: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op<T = Tensor> {
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
    /// A conv's bias, per channel (imported networks: exporters fold batch norm into it).
    Bias {
        input: Value,
        bias: T,
    },
    BatchNorm {
        input: Value,
        params: BatchNormParams<T>,
    },
    Relu {
        input: Value,
    },
    /// `clamp(x, 0, 6)`.
    Relu6 {
        input: Value,
    },
    Clip {
        input: Value,
        min: f64,
        max: f64,
    },
    Sigmoid {
        input: Value,
    },
    /// `x · relu6(x + 3)/6`.
    HardSwish {
        input: Value,
    },
    /// `clamp(alpha·x + beta, 0, 1)`.
    HardSigmoid {
        input: Value,
        alpha: f64,
        beta: f64,
    },
    Add {
        a: Value,
        b: Value,
    },
    Sub {
        a: Value,
        b: Value,
    },
    Mul {
        a: Value,
        b: Value,
    },
    Div {
        a: Value,
        b: Value,
    },
    /// A constant operand (broadcast against the batch).
    Constant {
        tensor: T,
    },
    MaxPool {
        input: Value,
        kernel: i64,
        stride: i64,
        padding: i64,
        #[serde(default)]
        ceil: bool,
    },
    AvgPool {
        input: Value,
        window: Window,
        /// Padding counts towards the divisor.
        count_pad: bool,
    },
    /// Global average pooling to `N×C`.
    GlobalAvgPool {
        input: Value,
    },
    /// Mean over `axes` (never the batch axis).
    ReduceMean {
        input: Value,
        axes: Vec<i64>,
        keep_dims: bool,
    },
    /// `x·Wᵀ + b` on `N×C`.
    Linear {
        input: Value,
        weight: T,
        bias: T,
    },
    Concat {
        inputs: Vec<Value>,
        axis: i64,
    },
    /// `x[start:end]` along `axis` (never the batch axis), step 1.
    Slice {
        input: Value,
        axis: i64,
        start: i64,
        end: i64,
    },
    /// A permutation that keeps the batch axis first.
    Transpose {
        input: Value,
        perm: Vec<i64>,
    },
    /// Each sample to `shape` (the batch axis is kept; one entry may be −1).
    Reshape {
        input: Value,
        shape: Vec<i64>,
    },
}

impl<T> Op<T> {
    /// The values the op reads.
    pub fn inputs(&self) -> Vec<Value> {
        match self {
            Op::Pad { input, .. }
            | Op::Conv { input, .. }
            | Op::Bias { input, .. }
            | Op::BatchNorm { input, .. }
            | Op::Relu { input }
            | Op::Relu6 { input }
            | Op::Clip { input, .. }
            | Op::Sigmoid { input }
            | Op::HardSwish { input }
            | Op::HardSigmoid { input, .. }
            | Op::MaxPool { input, .. }
            | Op::AvgPool { input, .. }
            | Op::GlobalAvgPool { input }
            | Op::ReduceMean { input, .. }
            | Op::Linear { input, .. }
            | Op::Slice { input, .. }
            | Op::Transpose { input, .. }
            | Op::Reshape { input, .. } => vec![*input],
            Op::Add { a, b } | Op::Sub { a, b } | Op::Mul { a, b } | Op::Div { a, b } => {
                vec![*a, *b]
            }
            Op::Concat { inputs, .. } => inputs.clone(),
            Op::Constant { .. } => Vec::new(),
        }
    }

    /// The same op with each tensor replaced by `f(tensor)` (names resolved to tensors, or
    /// tensors to names); the first error stops it.
    pub fn try_map<U, E>(&self, mut f: impl FnMut(&T) -> Result<U, E>) -> Result<Op<U>, E> {
        Ok(match self {
            Op::Bias { input, bias } => Op::Bias {
                input: *input,
                bias: f(bias)?,
            },
            Op::BatchNorm { input, params } => Op::BatchNorm {
                input: *input,
                params: BatchNormParams {
                    weight: f(&params.weight)?,
                    bias: f(&params.bias)?,
                    mean: f(&params.mean)?,
                    var: f(&params.var)?,
                    eps: params.eps,
                },
            },
            Op::Constant { tensor } => Op::Constant { tensor: f(tensor)? },
            Op::Linear {
                input,
                weight,
                bias,
            } => Op::Linear {
                input: *input,
                weight: f(weight)?,
                bias: f(bias)?,
            },
            Op::Pad { input, pads } => Op::Pad {
                input: *input,
                pads: *pads,
            },
            Op::Conv { input, layer } => Op::Conv {
                input: *input,
                layer: layer.clone(),
            },
            Op::Relu { input } => Op::Relu { input: *input },
            Op::Relu6 { input } => Op::Relu6 { input: *input },
            Op::Clip { input, min, max } => Op::Clip {
                input: *input,
                min: *min,
                max: *max,
            },
            Op::Sigmoid { input } => Op::Sigmoid { input: *input },
            Op::HardSwish { input } => Op::HardSwish { input: *input },
            Op::HardSigmoid { input, alpha, beta } => Op::HardSigmoid {
                input: *input,
                alpha: *alpha,
                beta: *beta,
            },
            Op::Add { a, b } => Op::Add { a: *a, b: *b },
            Op::Sub { a, b } => Op::Sub { a: *a, b: *b },
            Op::Mul { a, b } => Op::Mul { a: *a, b: *b },
            Op::Div { a, b } => Op::Div { a: *a, b: *b },
            Op::MaxPool {
                input,
                kernel,
                stride,
                padding,
                ceil,
            } => Op::MaxPool {
                input: *input,
                kernel: *kernel,
                stride: *stride,
                padding: *padding,
                ceil: *ceil,
            },
            Op::AvgPool {
                input,
                window,
                count_pad,
            } => Op::AvgPool {
                input: *input,
                window: *window,
                count_pad: *count_pad,
            },
            Op::GlobalAvgPool { input } => Op::GlobalAvgPool { input: *input },
            Op::ReduceMean {
                input,
                axes,
                keep_dims,
            } => Op::ReduceMean {
                input: *input,
                axes: axes.clone(),
                keep_dims: *keep_dims,
            },
            Op::Concat { inputs, axis } => Op::Concat {
                inputs: inputs.clone(),
                axis: *axis,
            },
            Op::Slice {
                input,
                axis,
                start,
                end,
            } => Op::Slice {
                input: *input,
                axis: *axis,
                start: *start,
                end: *end,
            },
            Op::Transpose { input, perm } => Op::Transpose {
                input: *input,
                perm: perm.clone(),
            },
            Op::Reshape { input, shape } => Op::Reshape {
                input: *input,
                shape: shape.clone(),
            },
        })
    }

    /// The op's name in messages (its ONNX-like type).
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Pad { .. } => "Pad",
            Op::Conv { .. } => "Conv",
            Op::Bias { .. } => "Bias",
            Op::BatchNorm { .. } => "BatchNormalization",
            Op::Relu { .. } => "Relu",
            Op::Relu6 { .. } => "Relu6",
            Op::Clip { .. } => "Clip",
            Op::Sigmoid { .. } => "Sigmoid",
            Op::HardSwish { .. } => "HardSwish",
            Op::HardSigmoid { .. } => "HardSigmoid",
            Op::Add { .. } => "Add",
            Op::Sub { .. } => "Sub",
            Op::Mul { .. } => "Mul",
            Op::Div { .. } => "Div",
            Op::Constant { .. } => "Constant",
            Op::MaxPool { .. } => "MaxPool",
            Op::AvgPool { .. } => "AveragePool",
            Op::GlobalAvgPool { .. } => "GlobalAveragePool",
            Op::ReduceMean { .. } => "ReduceMean",
            Op::Linear { .. } => "Gemm",
            Op::Concat { .. } => "Concat",
            Op::Slice { .. } => "Slice",
            Op::Transpose { .. } => "Transpose",
            Op::Reshape { .. } => "Reshape",
        }
    }
}

impl Op {
    /// What the op computes on `inputs` (its [`Op::inputs`], in order); batch norm updates
    /// its running statistics when `train`. A conv is its layer's business, not the graph's:
    /// it returns its input unchanged here.
    pub fn eval(&self, inputs: &[Tensor], train: bool) -> Tensor {
        let x = || &inputs[0];
        let per_channel = |t: &Tensor| t.view([1, -1, 1, 1]);
        match self {
            Op::Conv { .. } => x().shallow_clone(),
            Op::Pad { pads, .. } => x().constant_pad_nd(pads.as_slice()),
            Op::Bias { bias, .. } => x() + per_channel(bias),
            Op::BatchNorm { params, .. } => Tensor::batch_norm(
                x(),
                Some(&params.weight),
                Some(&params.bias),
                Some(&params.mean),
                Some(&params.var),
                train,
                0.1,
                params.eps,
                false,
            ),
            Op::Relu { .. } => x().relu(),
            Op::Relu6 { .. } => x().clamp(0.0, 6.0),
            Op::Clip { min, max, .. } => x().clamp(*min, *max),
            Op::Sigmoid { .. } => x().sigmoid(),
            Op::HardSwish { .. } => x().hardswish(),
            Op::HardSigmoid { alpha, beta, .. } => (x() * *alpha + *beta).clamp(0.0, 1.0),
            Op::Add { .. } => x() + &inputs[1],
            Op::Sub { .. } => x() - &inputs[1],
            Op::Mul { .. } => x() * &inputs[1],
            Op::Div { .. } => x() / &inputs[1],
            Op::Constant { tensor } => tensor.shallow_clone(),
            Op::MaxPool {
                kernel,
                stride,
                padding,
                ceil,
                ..
            } => x().max_pool2d(
                [*kernel, *kernel],
                [*stride, *stride],
                [*padding, *padding],
                [1, 1],
                *ceil,
            ),
            Op::AvgPool {
                window, count_pad, ..
            } => x().avg_pool2d(
                [window.kernel; 2],
                [window.stride; 2],
                [window.padding; 2],
                window.ceil,
                *count_pad,
                None,
            ),
            Op::GlobalAvgPool { .. } => x().mean_dim([2i64, 3].as_slice(), false, x().kind()),
            Op::ReduceMean {
                axes, keep_dims, ..
            } => x().mean_dim(axes.as_slice(), *keep_dims, x().kind()),
            Op::Linear { weight, bias, .. } => x().linear(weight, Some(bias)),
            Op::Concat { axis, .. } => Tensor::cat(inputs, *axis),
            Op::Slice {
                axis, start, end, ..
            } => x().slice(*axis, *start, *end, 1),
            Op::Transpose { perm, .. } => x().permute(perm.as_slice()),
            Op::Reshape { shape, .. } => {
                let mut full = vec![x().size()[0]];
                full.extend_from_slice(shape);
                x().reshape(full)
            }
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
