//! A static check of an exported graph: no integer conv whose pairs of u8×s8 products can
//! leave int16.
//!
//! On x86 CPUs without VNNI (AVX2, AVX-512BW), ONNX Runtime's u8s8 convolution adds pairs of
//! products with `vpmaddubsw`, which saturates at ±32767 ([`PAIR_SUM_LIMIT`]); VNNI, AMX and
//! ARM sum in int32. A conv whose largest input code times its largest weight, twice, passes
//! the limit returns another answer on those CPUs than on the others and than gmpq computes.
//! The check reads only the graph (the codes its clips and quantizers allow, the int8 kernels),
//! so it fails on any machine, including one that never saturates. Depthwise convs are exempt:
//! their integer kernels (`MlasConvDepthwiseKernel`) widen to int16 and sum in int32.

use super::ExportError;
use crate::quant::integer::PAIR_SUM_LIMIT;
use onnx_protobuf::{tensor_proto::DataType, Message, ModelProto, NodeProto, TensorProto};
use std::collections::HashMap;

/// An integer conv of an exported graph whose pair sums can saturate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairSumRisk {
    /// The conv node's output (gmpq names nodes by what they compute).
    pub conv: String,
    /// The weight initializer's name.
    pub kernel: String,
    /// The largest uint8 code the conv's input can take (signed codes shifted by 128, as the
    /// u8s8 kernels read them).
    pub input_max: i64,
    /// The largest |int8| of its kernel.
    pub weight_max: i64,
}

impl PairSumRisk {
    /// The gmpq layer the kernel belongs to (`LAYER.weight_int8.N`), else the conv node.
    pub fn layer(&self) -> &str {
        self.kernel
            .split_once(".weight_int")
            .map_or(self.conv.as_str(), |(layer, _)| layer)
    }
}

impl std::fmt::Display for PairSumRisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "conv '{}' (kernel {}): input codes up to {} against weights up to ±{}: 2·{}·{} = \
             {} > {} (int16 pair sums of CPUs without VNNI saturate)",
            self.layer(),
            self.kernel,
            self.input_max,
            self.weight_max,
            self.input_max,
            self.weight_max,
            2 * self.input_max * self.weight_max,
            PAIR_SUM_LIMIT
        )
    }
}

/// The integer convs of the ONNX model `bytes` whose pair sums can saturate (none: the graph
/// computes the same on every CPU).
pub fn pair_sum_risks(bytes: &[u8]) -> Result<Vec<PairSumRisk>, ExportError> {
    let model = ModelProto::parse_from_bytes(bytes)
        .map_err(|e| ExportError::Unsupported(format!("not an ONNX model: {e}")))?;
    Ok(risks_of(&model))
}

/// [`pair_sum_risks`] of a parsed model.
pub fn risks_of(model: &ModelProto) -> Vec<PairSumRisk> {
    let g = Graph::new(model);
    let mut risks = Vec::new();
    for node in &model.graph.node {
        let operands = match node.op_type.as_str() {
            // A QDQ unit: DequantizeLinear on the input and on an int8 kernel.
            "Conv" => match (
                node.input.first().and_then(|x| g.dequantized(x)),
                node.input.get(1).and_then(|w| g.dequantized(w)),
            ) {
                (Some(x), Some(w)) => Some((x, w)),
                _ => None,
            },
            "QLinearConv" => match (node.input.first(), node.input.get(3)) {
                (Some(x), Some(w)) => Some((x.as_str(), w.as_str())),
                _ => None,
            },
            _ => None,
        };
        let Some((x, w)) = operands else { continue };
        let Some(kernel) = g
            .initializers
            .get(w)
            .filter(|t| t.data_type == DataType::INT8 as i32)
        else {
            continue;
        };
        if depthwise(node, kernel) {
            continue;
        }
        let weight_max = int8_values(kernel)
            .map(|v| (v as i64).abs())
            .max()
            .unwrap_or(0);
        let input_max = g.code_max(x);
        if 2 * input_max * weight_max > PAIR_SUM_LIMIT {
            risks.push(PairSumRisk {
                conv: node.output.first().cloned().unwrap_or_default(),
                kernel: w.to_string(),
                input_max,
                weight_max,
            });
        }
    }
    risks
}

/// Whether a conv is depthwise (one input and one output channel per group): ONNX Runtime's
/// integer depthwise kernels widen both operands to int16 and sum products in int32, on every
/// CPU, so no pair sum can saturate there.
fn depthwise(node: &NodeProto, kernel: &TensorProto) -> bool {
    let group = node
        .attribute
        .iter()
        .find(|a| a.name == "group")
        .map_or(1, |a| a.i);
    group > 1 && kernel.dims.first() == Some(&group) && kernel.dims.get(1) == Some(&1)
}

/// The graph's producers and initializers by name.
struct Graph<'a> {
    producers: HashMap<&'a str, &'a NodeProto>,
    initializers: HashMap<&'a str, &'a TensorProto>,
}

impl<'a> Graph<'a> {
    fn new(model: &'a ModelProto) -> Self {
        let mut producers = HashMap::new();
        for n in &model.graph.node {
            for o in &n.output {
                producers.insert(o.as_str(), n);
            }
        }
        let initializers = model
            .graph
            .initializer
            .iter()
            .map(|t| (t.name.as_str(), t))
            .collect();
        Self {
            producers,
            initializers,
        }
    }

    /// The integer tensor a `DequantizeLinear` producing `name` reads.
    fn dequantized(&self, name: &str) -> Option<&'a str> {
        let n = self.producers.get(name)?;
        (n.op_type == "DequantizeLinear")
            .then(|| n.input.first().map(String::as_str))
            .flatten()
    }

    /// A scalar initializer's value as a number (uint8, int8, float).
    fn scalar(&self, name: &str) -> Option<f64> {
        let t = self.initializers.get(name)?;
        let raw = &t.raw_data;
        let is = |d: DataType| t.data_type == d as i32;
        if is(DataType::UINT8) {
            raw.first()
                .copied()
                .or_else(|| t.int32_data.first().map(|&v| v as u8))
                .map(f64::from)
        } else if is(DataType::INT8) {
            raw.first()
                .map(|&b| b as i8)
                .or_else(|| t.int32_data.first().map(|&v| v as i8))
                .map(f64::from)
        } else if is(DataType::FLOAT) {
            raw.get(..4)
                .and_then(|b| b.try_into().ok())
                .map(f32::from_le_bytes)
                .or_else(|| t.float_data.first().copied())
                .map(f64::from)
        } else {
            None
        }
    }

    /// Whether `name` holds int8 (codes read shifted by 128) rather than uint8.
    fn signed(&self, name: &str) -> bool {
        match self.producers.get(name) {
            Some(n) if n.op_type == "QuantizeLinear" => n.input.get(2).is_some_and(|z| {
                self.initializers
                    .get(z.as_str())
                    .is_some_and(|t| t.data_type == DataType::INT8 as i32)
            }),
            Some(n) if n.op_type == "Clip" => n.input.first().is_some_and(|x| self.signed(x)),
            _ => false,
        }
    }

    /// The largest code an integer tensor can hold, as a u8s8 kernel reads it: bounded by an
    /// integer `Clip`, or by the float `Clip` a `QuantizeLinear` reads; 255 otherwise.
    fn code_max(&self, name: &str) -> i64 {
        let shift = if self.signed(name) { 128 } else { 0 };
        let bound = self
            .producers
            .get(name)
            .and_then(|n| match n.op_type.as_str() {
                "Clip" => {
                    let hi = self.scalar(n.input.get(2)?)? as i64 + shift;
                    Some(hi.min(n.input.first().map_or(255, |x| self.code_max(x))))
                }
                "QuantizeLinear" => {
                    let clip = self.producers.get(n.input.first()?.as_str())?;
                    if clip.op_type != "Clip" {
                        return None;
                    }
                    let hi = self.scalar(clip.input.get(2)?)?;
                    let scale = self.scalar(n.input.get(1)?)?;
                    let zero = n.input.get(2).and_then(|z| self.scalar(z)).unwrap_or(0.0);
                    (scale > 0.0).then(|| ((hi / scale).round() + zero) as i64 + shift)
                }
                _ => None,
            });
        bound.unwrap_or(255).clamp(0, 255)
    }
}

/// An int8 tensor's values (raw or `int32_data`).
fn int8_values(t: &TensorProto) -> Box<dyn Iterator<Item = i8> + '_> {
    if !t.raw_data.is_empty() {
        Box::new(t.raw_data.iter().map(|&b| b as i8))
    } else {
        Box::new(t.int32_data.iter().map(|&v| v as i8))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use onnx_protobuf::{AttributeProto, GraphProto};

    fn init(name: &str, kind: DataType, dims: &[i64], raw: Vec<u8>) -> TensorProto {
        TensorProto {
            name: name.into(),
            data_type: kind as i32,
            dims: dims.to_vec(),
            raw_data: raw,
            ..Default::default()
        }
    }

    fn node(op: &str, inputs: &[&str], output: &str, group: Option<i64>) -> NodeProto {
        NodeProto {
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            attribute: group
                .map(|g| AttributeProto {
                    name: "group".into(),
                    i: g,
                    ..Default::default()
                })
                .into_iter()
                .collect(),
            ..Default::default()
        }
    }

    /// `Clip(x, 0, hi) → QuantizeLinear(scale 1/levels, zero) → DequantizeLinear → Conv` with
    /// `channels` output channels of `in_per_group` inputs, every weight at `w`.
    fn qdq_conv(zero_kind: DataType, hi: f32, levels: f32, w: i8, group: i64) -> ModelProto {
        let channels = 4;
        let in_per_group = if group > 1 { 1 } else { 4 };
        let f32s = |v: f32| v.to_le_bytes().to_vec();
        let graph = GraphProto {
            node: vec![
                node("Clip", &["x", "lo", "hi"], "c", None),
                node("QuantizeLinear", &["c", "s", "z"], "q", None),
                node("DequantizeLinear", &["q", "s", "z"], "dq", None),
                node("DequantizeLinear", &["w", "ws", "wz"], "wdq", None),
                node("Conv", &["dq", "wdq"], "y", Some(group)),
            ],
            initializer: vec![
                init("lo", DataType::FLOAT, &[], f32s(0.0)),
                init("hi", DataType::FLOAT, &[], f32s(hi)),
                init("s", DataType::FLOAT, &[], f32s(hi / levels)),
                init("z", zero_kind, &[], vec![0]),
                init(
                    "w",
                    DataType::INT8,
                    &[channels, in_per_group, 1, 1],
                    vec![w as u8; (channels * in_per_group) as usize],
                ),
                init("ws", DataType::FLOAT, &[], f32s(0.1)),
                init("wz", DataType::INT8, &[], vec![0]),
            ],
            ..Default::default()
        };
        ModelProto {
            graph: Some(graph).into(),
            ..Default::default()
        }
    }

    #[test]
    fn input_codes_come_from_the_clip_a_quantizer_reads() {
        // 8-bit unsigned input (codes to 255) against ±127: flagged.
        let r = risks_of(&qdq_conv(DataType::UINT8, 6.0, 255.0, 127, 1));
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!((r[0].input_max, r[0].weight_max), (255, 127));
        // 7-bit unsigned input (codes to 127) against ±127: 2·127·127 fits.
        assert!(risks_of(&qdq_conv(DataType::UINT8, 6.0, 127.0, 127, 1)).is_empty());
        // Signed int8 codes to 63 read as 63 + 128 = 191: 2·191·127 does not fit.
        let r = risks_of(&qdq_conv(DataType::INT8, 6.0, 63.0, 127, 1));
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0].input_max, 191);
        // 7-bit weights against 8-bit inputs fit (the stem's rule).
        assert!(risks_of(&qdq_conv(DataType::UINT8, 6.0, 255.0, 63, 1)).is_empty());
    }

    #[test]
    fn depthwise_convs_are_exempt() {
        assert!(risks_of(&qdq_conv(DataType::UINT8, 6.0, 255.0, 127, 4)).is_empty());
    }

    #[test]
    fn a_non_onnx_file_is_an_error() {
        assert!(pair_sum_risks(b"not a model\xff\xff").is_err());
    }
}
