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

use super::builder::{attr_int, attr_ints, Builder};
use super::ExportError;
use crate::checkpoint::Checkpoint;
use crate::model::graph::{Op, Value};
use crate::model::kernel_name;
use crate::model::ConvSpec;
use crate::quant::{Network, Numerics, Precision, QuantizerTensor};
use onnx_protobuf::{
    tensor_proto::DataType, tensor_shape_proto, type_proto, Message, ModelProto,
    OperatorSetIdProto, StringStringEntryProto, TensorShapeProto, TypeProto, ValueInfoProto,
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
                let weight = var(&kernel_name(layer))?;
                let x = name_of(*input);
                let (x, w) = match quant.get(layer.as_str()) {
                    Some(&(w_bits, a_bits)) if spec.quantizable => {
                        let clip = var(&QuantizerTensor::ActClip.of(layer))?;
                        let threshold = var(&QuantizerTensor::WeightThreshold.of(layer))?;
                        let x = b.activation_qdq(layer, &x, &clip, a_bits, spec.signed_input)?;
                        let w = b.weight_qdq(layer, &weight, &threshold, w_bits)?;
                        (x, w)
                    }
                    _ => (x, b.tensor_f32(&kernel_name(layer), &weight)?),
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
