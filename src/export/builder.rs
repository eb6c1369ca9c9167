//! An ONNX graph under construction: nodes and initializers with unique names, and the
//! attributes and float ops both exporters (QDQ and integer) write.

use super::{floats, weight_integers, ExportError};
use crate::model::graph::Op;
use crate::quant::activation_levels;
use onnx_protobuf::{
    attribute_proto::AttributeType, tensor_proto::DataType, AttributeProto, GraphProto, NodeProto,
    TensorProto,
};
use tch::Tensor;

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
    pub(super) graph: GraphProto,
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
    pub(super) fn activation_qdq(
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
    pub(super) fn weight_qdq(
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
