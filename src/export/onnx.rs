//! ONNX export in QDQ form: the fine-tuned fake-quantized network as a graph any ONNX runtime
//! executes, computing the same function.
//!
//! - Input: the image as float32 NCHW, pixel values in [0, 1]; the checkpoint's normalisation
//!   is the graph's first operation.
//! - A quantized conv's input: `Clip(0, r)` (signed inputs: `Clip(−r, r)`), then
//!   `QuantizeLinear`/`DequantizeLinear` with scale `r/(2^b − 1)` (signed: `r/(2^(b−1) − 1)`),
//!   zero point 0, uint8 (signed: int8). The explicit clip puts values above `r` on `2^b − 1`,
//!   not on 255.
//! - Its kernel: int8 initializer in `±(2^(b−1) − 1)` and a `DequantizeLinear` with the
//!   layer's scale `T/(2^(b−1) − 1)` (per channel along axis 0 for per-channel thresholds).
//! - Batch norm is kept as `BatchNormalization` (ONNX Runtime folds it into the conv).
//! - The FP stem and the classifier stay float, as in training.
//!
//! 8-bit containers are used for every bitwidth: ONNX Runtime's QDQ fusion and its integer
//! conv kernels (QLinearConv) take 8-bit types; its 4-bit types are supported only for
//! weight-only MatMul, which no layer here is.

use super::{floats, weight_integers, ExportError};
use crate::checkpoint::Checkpoint;
use crate::model::graph::{Op, Value};
use crate::model::ConvSpec;
use crate::quant::{activation_levels, Network, Numerics, Precision, QuantizerTensor};
use onnx_protobuf::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto,
    AttributeProto, GraphProto, Message, ModelProto, NodeProto, OperatorSetIdProto,
    StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use std::collections::HashMap;
use tch::Tensor;

/// The ONNX opset of exported graphs (ONNX Runtime 1.31 runs it).
pub const OPSET: i64 = 21;
/// The IR version that goes with [`OPSET`].
const IR_VERSION: i64 = 10;

/// Metadata keys of an exported model.
pub const META_POLICY: &str = "gmpq.policy";
pub const META_MODEL: &str = "gmpq.model";
pub const META_PREPROCESSING: &str = "gmpq.preprocessing";
pub const META_VERSION: &str = "gmpq.version";
pub const META_PRECISION: &str = "gmpq.precision";
/// [`crate::checkpoint::weights_digest`] of the exported network's weights.
pub const META_WEIGHTS: &str = "gmpq.weights";
/// The class names by label (a JSON list), when the checkpoint records them.
pub const META_CLASS_NAMES: &str = "gmpq.class_names";

/// The graph's input and output names.
pub const INPUT: &str = "image";
pub const OUTPUT: &str = "logits";

/// What to export.
#[derive(Debug, Clone, Copy, Default)]
pub struct OnnxOptions {
    /// Export the network's float weights without quantizers (for comparison).
    pub full_precision: bool,
}

/// Builds the ONNX model of `net` (loaded from `ck`).
pub fn export(ck: &Checkpoint, net: &Network, opts: OnnxOptions) -> Result<Vec<u8>, ExportError> {
    let (policy, quant) = exported_policy(net, opts)?;
    let vars = net.vs.variables();
    let var = |name: &str| -> Result<Tensor, ExportError> {
        vars.get(name)
            .map(|t| t.detach().to_device(tch::Device::Cpu))
            .ok_or_else(|| ExportError::Unsupported(format!("the network has no tensor '{name}'")))
    };
    let specs: HashMap<&str, &ConvSpec> = net
        .net
        .convs()
        .iter()
        .map(|c| (c.name.as_str(), c))
        .collect();
    let cfg = net.net.config();
    let graph = net.net.graph();
    let mut b = Builder::default();

    // Normalisation: (x − mean)/std, per channel.
    let norm = &ck.meta.eval_pipeline.normalize;
    let c = cfg.in_channels as i64;
    if norm.mean.len() != cfg.in_channels || norm.std.len() != cfg.in_channels {
        return Err(ExportError::Unsupported(format!(
            "the checkpoint's normalisation has {} means for {} input channels",
            norm.mean.len(),
            cfg.in_channels
        )));
    }
    let mean = b.constant_f32("norm.mean", &[1, c, 1, 1], &norm.mean);
    let std = b.constant_f32("norm.std", &[1, c, 1, 1], &norm.std);
    let centred = b.node("Sub", &[INPUT, &mean], vec![]);
    let normalised = b.node("Div", &[&centred, &std], vec![]);
    let integer = !opts.full_precision && net.numerics() == Numerics::Integer;
    let mut names: Vec<String> = vec![normalised.clone()];
    if integer {
        super::integer::emit(&mut b, net, normalised)?;
    }
    for op in graph.ops.iter().filter(|_| !integer) {
        let name_of = |v: Value| names[v].clone();
        let out = match op {
            Op::Conv { input, layer } => {
                let spec = specs.get(layer.as_str()).ok_or_else(|| {
                    ExportError::Unsupported(format!("the network has no conv layer '{layer}'"))
                })?;
                let weight = var(&format!("{layer}.weight"))?;
                let x = name_of(*input);
                let (x, w) = match quant.get(layer.as_str()) {
                    Some(&(w_bits, a_bits)) if spec.quantizable => {
                        let clip = var(&QuantizerTensor::ActClip.of(layer))?;
                        let threshold = var(&QuantizerTensor::WeightThreshold.of(layer))?;
                        let x = b.activation_qdq(layer, &x, &clip, a_bits, spec.signed_input)?;
                        let w = b.weight_qdq(layer, &weight, &threshold, w_bits)?;
                        (x, w)
                    }
                    _ => (x, b.tensor_f32(&format!("{layer}.weight"), &weight)?),
                };
                let k = spec.kernel as i64;
                let (s, p) = (spec.stride as i64, spec.padding as i64);
                b.node(
                    "Conv",
                    &[&x, &w],
                    vec![
                        attr_ints("kernel_shape", &[k, k]),
                        attr_ints("strides", &[s, s]),
                        attr_ints("pads", &[p, p, p, p]),
                        attr_ints("dilations", &[1, 1]),
                        attr_int("group", spec.groups as i64),
                    ],
                )
            }
            other => {
                let inputs: Vec<String> = other.inputs().into_iter().map(name_of).collect();
                b.float_op(other, &inputs)?
            }
        };
        names.push(out);
    }
    // The last value is the output: rename it.
    if let Some(last) = b.graph.node.last_mut() {
        last.output = vec![OUTPUT.to_string()];
    }

    let bytes = encode(b, ck, net, policy.as_ref(), integer)?;
    // The integer graph is built to compute the same on every CPU; a kernel that could
    // saturate on one without VNNI is a bug here, not a property of the checkpoint.
    if integer {
        if let Some(risk) = super::saturation::pair_sum_risks(&bytes)?.first() {
            return Err(ExportError::Unsupported(format!(
                "the integer graph would compute differently on CPUs without VNNI: {risk}"
            )));
        }
    }
    Ok(bytes)
}

/// The policy an export carries and its bits by layer (none for a float export); a supernet
/// or a layer above 8 bits is refused.
#[allow(clippy::type_complexity)]
fn exported_policy(
    net: &Network,
    opts: OnnxOptions,
) -> Result<(Option<crate::policy::Policy>, HashMap<String, (u32, u32)>), ExportError> {
    Ok(match (&net.precision, opts.full_precision) {
        (Precision::Supernet { .. }, _) => {
            return Err(ExportError::Unsupported(
                "a supernet checkpoint cannot be exported: extract its policy and fine-tune it \
                 (gmpq finetune), then export the fine-tuned checkpoint"
                    .into(),
            ))
        }
        (Precision::Fixed { policy, .. }, false) => {
            for l in &policy.layers {
                if l.w_bits > 8 || l.a_bits > 8 {
                    return Err(ExportError::Unsupported(format!(
                        "layer '{}' has w{}a{}: ONNX export supports at most 8 bits (int8/uint8); \
                         use --fp for a float model",
                        l.name, l.w_bits, l.a_bits
                    )));
                }
            }
            (Some(policy.clone()), policy.bits_by_layer())
        }
        _ => (None, HashMap::new()),
    })
}

/// The graph `b` built, with its input, output, opset and gmpq's metadata, encoded.
fn encode(
    mut b: Builder,
    ck: &Checkpoint,
    net: &Network,
    policy: Option<&crate::policy::Policy>,
    integer: bool,
) -> Result<Vec<u8>, ExportError> {
    let cfg = net.net.config();
    let c = cfg.in_channels as i64;
    let size = cfg.input_size as i64;
    b.graph.name = format!("gmpq-{}", cfg.arch);
    b.graph.input.push(value_info(
        INPUT,
        DataType::FLOAT,
        &[
            Dim::Param("batch"),
            Dim::Value(c),
            Dim::Value(size),
            Dim::Value(size),
        ],
    ));
    b.graph.output.push(value_info(
        OUTPUT,
        DataType::FLOAT,
        &[Dim::Param("batch"), Dim::Value(cfg.num_classes as i64)],
    ));

    let mut model = ModelProto {
        ir_version: IR_VERSION,
        producer_name: "gmpq".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        doc_string:
            "Input: float32 NCHW image with pixel values in [0, 1] (after the resize and \
                     crop in gmpq.preprocessing); the normalisation is the graph's first operation."
                .into(),
        ..Default::default()
    };
    model.opset_import.push(OperatorSetIdProto {
        domain: String::new(),
        version: OPSET,
        ..Default::default()
    });
    let mut meta = vec![
        (META_VERSION, env!("CARGO_PKG_VERSION").to_string()),
        (META_WEIGHTS, crate::checkpoint::weights_digest(&net.vs)),
        (META_MODEL, json(cfg)),
        (META_PREPROCESSING, json(&ck.meta.eval_pipeline)),
        (
            META_PRECISION,
            match (&policy, integer) {
                (_, true) => "integer",
                (Some(_), false) => "qdq",
                (None, false) => "fp32",
            }
            .to_string(),
        ),
    ];
    if let Some(p) = policy {
        meta.push((META_POLICY, json(p)));
    }
    if let Some(names) = &ck.meta.class_names {
        meta.push((META_CLASS_NAMES, json(names)));
    }
    for (key, value) in meta {
        model.metadata_props.push(StringStringEntryProto {
            key: key.into(),
            value,
            ..Default::default()
        });
    }
    model.graph = protobuf::MessageField::some(b.graph);
    model
        .write_to_bytes()
        .map_err(|e| ExportError::Unsupported(format!("cannot encode the ONNX model: {e}")))
}

/// Serialises one of gmpq's own serde types for the metadata (cannot fail for them).
fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

enum Dim {
    Value(i64),
    Param(&'static str),
}

fn value_info(name: &str, elem: DataType, dims: &[Dim]) -> ValueInfoProto {
    let mut shape = TensorShapeProto::new();
    for d in dims {
        let mut dim = tensor_shape_proto::Dimension::new();
        dim.value = Some(match d {
            Dim::Value(v) => tensor_shape_proto::dimension::Value::DimValue(*v),
            Dim::Param(p) => tensor_shape_proto::dimension::Value::DimParam(p.to_string()),
        });
        shape.dim.push(dim);
    }
    let mut tensor = type_proto::Tensor::new();
    tensor.elem_type = elem as i32;
    tensor.shape = protobuf::MessageField::some(shape);
    let mut tp = TypeProto::new();
    tp.value = Some(type_proto::Value::TensorType(tensor));
    ValueInfoProto {
        name: name.into(),
        type_: protobuf::MessageField::some(tp),
        ..Default::default()
    }
}

fn attr(name: &str, kind: AttributeType) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        type_: kind.into(),
        ..Default::default()
    }
}

pub(super) fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        i: v,
        ..attr(name, AttributeType::INT)
    }
}

pub(super) fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        ints: v.to_vec(),
        ..attr(name, AttributeType::INTS)
    }
}

pub(super) fn attr_float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        f: v,
        ..attr(name, AttributeType::FLOAT)
    }
}

pub(super) fn attr_str(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        s: v.as_bytes().to_vec(),
        ..attr(name, AttributeType::STRING)
    }
}

/// Accumulates nodes and initializers with unique names.
#[derive(Default)]
pub(super) struct Builder {
    graph: GraphProto,
    count: usize,
    /// The initializers 0 and 6 of every ReLU6's Clip, made once.
    relu6: Option<(String, String)>,
}

impl Builder {
    fn fresh(&mut self, stem: &str) -> String {
        self.count += 1;
        format!("{stem}.{}", self.count)
    }

    pub(super) fn node(
        &mut self,
        op: &str,
        inputs: &[&str],
        attributes: Vec<AttributeProto>,
    ) -> String {
        let out = self.fresh(&op.to_ascii_lowercase());
        self.graph.node.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            name: out.clone(),
            op_type: op.into(),
            attribute: attributes,
            ..Default::default()
        });
        out
    }

    pub(super) fn initializer(
        &mut self,
        stem: &str,
        dims: &[i64],
        kind: DataType,
        raw: Vec<u8>,
    ) -> String {
        let name = self.fresh(stem);
        self.graph.initializer.push(TensorProto {
            name: name.clone(),
            dims: dims.to_vec(),
            data_type: kind as i32,
            raw_data: raw,
            ..Default::default()
        });
        name
    }

    pub(super) fn constant_f32(&mut self, stem: &str, dims: &[i64], v: &[f32]) -> String {
        let raw = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.initializer(stem, dims, DataType::FLOAT, raw)
    }

    pub(super) fn scalar_f32(&mut self, stem: &str, v: f32) -> String {
        self.constant_f32(stem, &[], &[v])
    }

    pub(super) fn relu6_bounds(&mut self) -> (String, String) {
        if self.relu6.is_none() {
            let lo = self.scalar_f32("zero", 0.0);
            let hi = self.scalar_f32("six", 6.0);
            self.relu6 = Some((lo, hi));
        }
        self.relu6.clone().unwrap_or_default()
    }

    /// An op other than a conv, on float inputs (the graph's values it reads, in order).
    pub(super) fn float_op(&mut self, op: &Op, inputs: &[String]) -> Result<String, ExportError> {
        if let Some(out) = self.layout_op(op, inputs) {
            return Ok(out);
        }
        let x = inputs.first().cloned().unwrap_or_default();
        Ok(match op {
            Op::Relu { .. } => self.node("Relu", &[&x], vec![]),
            Op::Relu6 { .. } => {
                let (lo, hi) = self.relu6_bounds();
                self.node("Clip", &[&x, &lo, &hi], vec![])
            }
            Op::Add { .. } => self.node("Add", &[&x, &inputs[1]], vec![]),
            Op::Linear { weight, bias, .. } => {
                let w = self.tensor_f32("fc.weight", weight)?;
                let bias = self.tensor_f32("fc.bias", bias)?;
                self.node("Gemm", &[&x, &w, &bias], vec![attr_int("transB", 1)])
            }
            Op::Pad { pads, .. } => {
                let [l, r, t, bt] = *pads;
                let p = self.constant_i64("pads", &[8], &[0, 0, t, l, 0, 0, bt, r]);
                self.node("Pad", &[&x, &p], vec![attr_str("mode", "constant")])
            }
            Op::BatchNorm { params, .. } => {
                let scale = self.tensor_f32("bn.scale", &params.weight)?;
                let bias = self.tensor_f32("bn.bias", &params.bias)?;
                let mean = self.tensor_f32("bn.mean", &params.mean)?;
                let var = self.tensor_f32("bn.var", &params.var)?;
                self.node(
                    "BatchNormalization",
                    &[&x, &scale, &bias, &mean, &var],
                    vec![attr_float("epsilon", params.eps as f32)],
                )
            }
            Op::Bias { bias, .. } => {
                let b = self.tensor_f32("bias", &bias.view([1, -1, 1, 1]))?;
                self.node("Add", &[&x, &b], vec![])
            }
            Op::Clip { min, max, .. } => {
                let lo = self.scalar_f32("clip.min", *min as f32);
                let hi = self.scalar_f32("clip.max", *max as f32);
                self.node("Clip", &[&x, &lo, &hi], vec![])
            }
            Op::Sigmoid { .. } => self.node("Sigmoid", &[&x], vec![]),
            Op::HardSwish { .. } => self.node("HardSwish", &[&x], vec![]),
            Op::HardSigmoid { alpha, beta, .. } => self.node(
                "HardSigmoid",
                &[&x],
                vec![
                    attr_float("alpha", *alpha as f32),
                    attr_float("beta", *beta as f32),
                ],
            ),
            Op::Sub { .. } => self.node("Sub", &[&x, &inputs[1]], vec![]),
            Op::Mul { .. } => self.node("Mul", &[&x, &inputs[1]], vec![]),
            Op::Div { .. } => self.node("Div", &[&x, &inputs[1]], vec![]),
            Op::Constant { tensor } => self.tensor_f32("constant", tensor)?,
            Op::Conv { layer, .. } => {
                return Err(ExportError::Unsupported(format!(
                    "conv '{layer}' is written with its quantizers, not as a float op"
                )))
            }
            // Written by layout_op above.
            Op::MaxPool { .. }
            | Op::AvgPool { .. }
            | Op::GlobalAvgPool { .. }
            | Op::ReduceMean { .. }
            | Op::Concat { .. }
            | Op::Slice { .. }
            | Op::Transpose { .. }
            | Op::Reshape { .. } => {
                return Err(ExportError::Unsupported(format!(
                    "{} is a layout op",
                    op.kind()
                )))
            }
        })
    }

    /// Pooling and layout ops (none for any other op).
    fn layout_op(&mut self, op: &Op, inputs: &[String]) -> Option<String> {
        let x = inputs.first().cloned().unwrap_or_default();
        Some(match op {
            Op::MaxPool {
                kernel,
                stride,
                padding,
                ceil,
                ..
            } => self.node(
                "MaxPool",
                &[&x],
                vec![
                    attr_ints("kernel_shape", &[*kernel, *kernel]),
                    attr_ints("strides", &[*stride, *stride]),
                    attr_ints("pads", &[*padding; 4]),
                    attr_int("ceil_mode", *ceil as i64),
                ],
            ),
            Op::GlobalAvgPool { .. } => {
                let pooled = self.node("GlobalAveragePool", &[&x], vec![]);
                self.node("Flatten", &[&pooled], vec![attr_int("axis", 1)])
            }
            Op::AvgPool {
                window, count_pad, ..
            } => self.node(
                "AveragePool",
                &[&x],
                vec![
                    attr_ints("kernel_shape", &[window.kernel; 2]),
                    attr_ints("strides", &[window.stride; 2]),
                    attr_ints("pads", &[window.padding; 4]),
                    attr_int("ceil_mode", window.ceil as i64),
                    attr_int("count_include_pad", *count_pad as i64),
                ],
            ),
            Op::ReduceMean {
                axes, keep_dims, ..
            } => {
                let axes = self.constant_i64("axes", &[axes.len() as i64], axes);
                self.node(
                    "ReduceMean",
                    &[&x, &axes],
                    vec![attr_int("keepdims", *keep_dims as i64)],
                )
            }
            Op::Concat { axis, .. } => {
                let all: Vec<&str> = inputs.iter().map(String::as_str).collect();
                self.node("Concat", &all, vec![attr_int("axis", *axis)])
            }
            Op::Slice {
                axis, start, end, ..
            } => {
                let starts = self.constant_i64("starts", &[1], &[*start]);
                let ends = self.constant_i64("ends", &[1], &[*end]);
                let axes = self.constant_i64("axes", &[1], &[*axis]);
                self.node("Slice", &[&x, &starts, &ends, &axes], vec![])
            }
            Op::Transpose { perm, .. } => {
                self.node("Transpose", &[&x], vec![attr_ints("perm", perm)])
            }
            Op::Reshape { shape, .. } => {
                // 0 copies the batch size from the input.
                let full: Vec<i64> = std::iter::once(0).chain(shape.iter().copied()).collect();
                let shape = self.constant_i64("shape", &[full.len() as i64], &full);
                self.node("Reshape", &[&x, &shape], vec![])
            }
            _ => return None,
        })
    }

    pub(super) fn constant_i64(&mut self, stem: &str, dims: &[i64], v: &[i64]) -> String {
        let raw = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.initializer(stem, dims, DataType::INT64, raw)
    }

    pub(super) fn tensor_f32(&mut self, stem: &str, t: &Tensor) -> Result<String, ExportError> {
        let v = floats(t)?;
        Ok(self.constant_f32(stem, &t.size(), &v))
    }

    /// `Clip → QuantizeLinear → DequantizeLinear` of a conv input (see the module docs).
    fn activation_qdq(
        &mut self,
        layer: &str,
        x: &str,
        clip: &Tensor,
        bits: u32,
        signed: bool,
    ) -> Result<String, ExportError> {
        if clip.numel() != 1 {
            return Err(ExportError::Unsupported(format!(
                "layer '{layer}': {} activation clips (a supernet layer?)",
                clip.numel()
            )));
        }
        let r = clip.double_value(&[]);
        if !(r.is_finite() && r > 0.0) {
            return Err(ExportError::Unsupported(format!(
                "layer '{layer}': activation clip {r} is not a positive number"
            )));
        }
        // The quantizer's arithmetic: the scale is computed in double, used in float.
        let (levels, lo, zero_kind) = if signed {
            (activation_levels(bits, true) as f64, -r, DataType::INT8)
        } else {
            (activation_levels(bits, false) as f64, 0.0, DataType::UINT8)
        };
        let scale = (r / levels) as f32;
        let lo = self.scalar_f32(&format!("{layer}.clip_min"), lo as f32);
        let hi = self.scalar_f32(&format!("{layer}.clip_max"), r as f32);
        let clipped = self.node("Clip", &[x, &lo, &hi], vec![]);
        let s = self.scalar_f32(&format!("{layer}.input_scale"), scale);
        let zp = self.initializer(
            &format!("{layer}.input_zero_point"),
            &[],
            zero_kind,
            vec![0],
        );
        let q = self.node("QuantizeLinear", &[&clipped, &s, &zp], vec![]);
        Ok(self.node("DequantizeLinear", &[&q, &s, &zp], vec![]))
    }

    /// The int8 kernel and its `DequantizeLinear` (see the module docs).
    fn weight_qdq(
        &mut self,
        layer: &str,
        w: &Tensor,
        threshold: &Tensor,
        bits: u32,
    ) -> Result<String, ExportError> {
        let (q, scale, _) = weight_integers(w, threshold, bits);
        let raw: Vec<u8> = q.iter().map(|&v| v as u8).collect();
        let qw = self.initializer(
            &format!("{layer}.weight_int"),
            &w.size(),
            DataType::INT8,
            raw,
        );
        let per_channel = scale.len() > 1;
        let dims: Vec<i64> = if per_channel {
            vec![scale.len() as i64]
        } else {
            vec![]
        };
        let s = self.constant_f32(&format!("{layer}.weight_scale"), &dims, &scale);
        let zp = self.initializer(
            &format!("{layer}.weight_zero_point"),
            &dims,
            DataType::INT8,
            vec![0; scale.len()],
        );
        let attrs = if per_channel {
            vec![attr_int("axis", 0)]
        } else {
            vec![]
        };
        Ok(self.node("DequantizeLinear", &[&qw, &s, &zp], attrs))
    }
}
