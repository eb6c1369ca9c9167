//! The op table's arms for layers and arithmetic: `Conv`, `Gemm`/`MatMul`,
//! `BatchNormalization`, the activations, and `Add`/`Sub`/`Mul`/`Div` (with the lifting of the
//! graph's leading normalisation into the checkpoint's preprocessing).

use super::proto::{float, floats, refuse, Attrs, OnnxImportError};
use super::walk::{Lift, Val, Walk};
use crate::data::Normalize;
use crate::model::graph::{BatchNormParams, Op, Value};
use crate::model::ConvSpec;
use onnx_protobuf::NodeProto;
use tch::{Kind, Tensor};

impl Walk {
    pub(super) fn conv(&mut self, node: &NodeProto, a: &Attrs) -> Result<Val, OnnxImportError> {
        let (x, nonneg) = self.dynamic(node, 0)?;
        let w = self
            .constant(node, 1, "weight")?
            .ok_or_else(|| refuse(node, "has no weight"))?;
        let bias = self.constant(node, 2, "bias")?;
        let [o, i_per_group, kh, kw] = w.size()[..] else {
            return Err(refuse(
                node,
                format!("a {}-d kernel; gmpq imports 2-d convs", w.dim()),
            ));
        };
        if kh != kw {
            return Err(refuse(
                node,
                format!("a {kh}×{kw} kernel; gmpq's conv layers are square"),
            ));
        }
        let strides = a.ints("strides").unwrap_or(vec![1, 1]);
        if strides.len() != 2 || strides[0] != strides[1] {
            return Err(refuse(
                node,
                format!("strides {strides:?}; gmpq's conv layers stride equally"),
            ));
        }
        if a.ints("dilations")
            .is_some_and(|d| d.iter().any(|&d| d != 1))
        {
            return Err(refuse(node, "dilated convs are not supported"));
        }
        let in_shape = self.shape(x);
        let group = a.int("group").unwrap_or(1);
        let c_in = in_shape.get(1).copied().unwrap_or(0);
        if group < 1 || c_in != i_per_group * group || o % group != 0 {
            return Err(refuse(
                node,
                format!(
                    "a kernel {:?} with {group} groups does not fit {c_in} input channels",
                    w.size()
                ),
            ));
        }
        let pads = conv_pads(node, a, &in_shape, kh, strides[0])?;
        let (s, k) = (strides[0], kh);
        let (input, padding) = self.padded(node, x, pads)?;
        let weight_name = node.input.get(1).map(String::as_str);
        let layer = self.names.module(node, weight_name, "conv");
        let in_hw = self.shape(input);
        let out_size = |n: i64| ((n + 2 * padding - k) / s + 1).max(0) as usize;
        let spec = ConvSpec {
            name: layer.clone(),
            in_channels: c_in as usize,
            out_channels: o as usize,
            kernel: k as usize,
            stride: s as usize,
            padding: padding as usize,
            groups: group as usize,
            in_hw: [in_hw[2] as usize, in_hw[3] as usize],
            out_hw: [out_size(in_hw[2]), out_size(in_hw[3])],
            // The conv reading the image is the stem, full precision (METHOD.md).
            quantizable: x != 0,
            signed_input: !nonneg,
        };
        self.convs.push(spec);
        self.kernels.insert(layer.clone(), float(&w));
        let conv = Op::Conv {
            input,
            layer: layer.clone(),
        };
        match bias {
            None => self.push(node, conv, false),
            Some(bias) => {
                let input = self.push_value(node, conv)?;
                let bias = self.tensor(&layer, "bias", bias, true);
                self.push(node, Op::Bias { input, bias }, false)
            }
        }
    }

    /// `x` with ONNX pads `[top, left, bottom, right]`: symmetric ones as the conv's own
    /// padding, others as a `Pad` op before it.
    fn padded(
        &mut self,
        node: &NodeProto,
        x: Value,
        pads: [i64; 4],
    ) -> Result<(Value, i64), OnnxImportError> {
        let [t, l, b, r] = pads;
        if t == l && l == b && b == r {
            return Ok((x, t));
        }
        let pad = Op::Pad {
            input: x,
            pads: [l, r, t, b],
        };
        Ok((self.push_value(node, pad)?, 0))
    }

    pub(super) fn linear(
        &mut self,
        node: &NodeProto,
        op: &str,
        a: &Attrs,
    ) -> Result<Val, OnnxImportError> {
        let (x, _) = self.dynamic(node, 0)?;
        let w = self
            .constant(node, 1, "weight")?
            .ok_or_else(|| refuse(node, "has no weight"))?;
        if self.shape(x).len() != 2 || w.dim() != 2 {
            return Err(refuse(
                node,
                format!(
                    "{op} of a {}-d input; gmpq imports a classifier on N×features",
                    self.shape(x).len()
                ),
            ));
        }
        if a.int("transA").unwrap_or(0) != 0 {
            return Err(refuse(node, "transA (the batch is not the first axis)"));
        }
        let (alpha, beta) = (
            a.float("alpha").unwrap_or(1.0) as f64,
            a.float("beta").unwrap_or(1.0) as f64,
        );
        // Gemm's B is K×M unless transB; the layer keeps M×K (PyTorch's Linear).
        let weight = if op == "Gemm" && a.int("transB").unwrap_or(0) != 0 {
            float(&w)
        } else {
            float(&w).tr()
        } * alpha;
        let out = weight.size()[0];
        let bias = match self.constant(node, 2, "bias")? {
            Some(c) if c.numel() as i64 == out => float(&c).reshape([out]) * beta,
            Some(c) => {
                return Err(refuse(
                    node,
                    format!("a bias of {} values for {out} outputs", c.numel()),
                ))
            }
            None => Tensor::zeros([out], (Kind::Float, tch::Device::Cpu)),
        };
        let layer = self
            .names
            .module(node, node.input.get(1).map(String::as_str), "fc");
        let weight = self.tensor(&layer, "weight", weight.contiguous(), true);
        let bias = self.tensor(&layer, "bias", bias, true);
        let v = self.push(
            node,
            Op::Linear {
                input: x,
                weight,
                bias,
            },
            false,
        )?;
        Ok(v)
    }

    pub(super) fn batch_norm(
        &mut self,
        node: &NodeProto,
        a: &Attrs,
    ) -> Result<Val, OnnxImportError> {
        let (x, _) = self.dynamic(node, 0)?;
        if a.int("training_mode").unwrap_or(0) != 0 || node.output.len() > 1 {
            return Err(refuse(
                node,
                "training-mode batch norm: export the model in eval mode",
            ));
        }
        let mut params = Vec::new();
        for (i, what) in [(1, "scale"), (2, "bias"), (3, "mean"), (4, "variance")] {
            params.push(
                self.constant(node, i, what)?
                    .ok_or_else(|| refuse(node, format!("has no {what}")))?,
            );
        }
        let c = self.shape(x).get(1).copied().unwrap_or(0);
        if params.iter().any(|p| p.numel() as i64 != c) {
            return Err(refuse(
                node,
                format!("parameters that do not have {c} channels"),
            ));
        }
        let layer = self
            .names
            .module(node, node.input.get(1).map(String::as_str), "bn");
        let [w, b, m, v] = [0, 1, 2, 3].map(|i| params[i].reshape([c]));
        let params = BatchNormParams {
            weight: self.tensor(&layer, "weight", w, true),
            bias: self.tensor(&layer, "bias", b, true),
            mean: self.tensor(&layer, "running_mean", m, false),
            var: self.tensor(&layer, "running_var", v, false),
            eps: a.float("epsilon").unwrap_or(1e-5) as f64,
        };
        let v = self.push(node, Op::BatchNorm { input: x, params }, false)?;
        Ok(v)
    }

    pub(super) fn activation(
        &mut self,
        node: &NodeProto,
        op: &str,
        a: &Attrs,
    ) -> Result<Val, OnnxImportError> {
        let (x, _) = self.dynamic(node, 0)?;
        let (op, nonneg) = match op {
            "Relu" => (Op::Relu { input: x }, true),
            "Sigmoid" => (Op::Sigmoid { input: x }, true),
            "HardSwish" => (Op::HardSwish { input: x }, false),
            "HardSigmoid" => (
                Op::HardSigmoid {
                    input: x,
                    alpha: a.float("alpha").unwrap_or(0.2) as f64,
                    beta: a.float("beta").unwrap_or(0.5) as f64,
                },
                true,
            ),
            _ => {
                let bound = |i: usize, attr: &str, default: f64| -> Result<f64, OnnxImportError> {
                    Ok(match self.constant(node, i, attr)? {
                        Some(t) => floats(&t).first().copied().unwrap_or(default as f32) as f64,
                        None => a.float(attr).map(f64::from).unwrap_or(default),
                    })
                };
                let (min, max) = (
                    bound(1, "min", f64::NEG_INFINITY)?,
                    bound(2, "max", f64::INFINITY)?,
                );
                match (min, max) {
                    (0.0, 6.0) => (Op::Relu6 { input: x }, true),
                    (0.0, f64::INFINITY) => (Op::Relu { input: x }, true),
                    _ => (Op::Clip { input: x, min, max }, min >= 0.0),
                }
            }
        };
        let v = self.push(node, op, nonneg)?;
        Ok(v)
    }

    /// Ends the lifting of the leading normalisation (any other op comes first).
    pub(super) fn close_lift(&mut self) {
        if let Lift::Mean { mean, .. } = std::mem::replace(&mut self.lift, Lift::Done) {
            self.normalize = Some(Normalize {
                std: vec![1.0; mean.len()],
                mean,
            });
        }
    }

    /// A per-channel constant (`[1,C,1,1]` or `[C,1,1]`) as its values.
    fn per_channel(&self, t: &Tensor) -> Option<Vec<f32>> {
        let c = self.channels as i64;
        let fits = matches!(t.size()[..], [1, n, 1, 1] | [n, 1, 1] if n == c);
        fits.then(|| floats(t))
    }

    /// `Sub` then `Div` of the image by per-channel constants, as the first ops reading it.
    fn lifted(&mut self, node: &NodeProto, op: &str, b: &Option<Val>) -> bool {
        let Some(Val::Const(c)) = b else { return false };
        let Some(values) = self.per_channel(c) else {
            return false;
        };
        let reads = |name: &String| self.readers.get(name).copied().unwrap_or(0);
        let out = node.output.first().cloned().unwrap_or_default();
        match (&self.lift, op) {
            (Lift::Open, "Sub")
                if matches!(
                    self.vals.get(&node.input[0]),
                    Some(Val::Dyn { value: 0, .. })
                ) && reads(&node.input[0]) == 1 =>
            {
                self.lift = Lift::Mean {
                    output: out.clone(),
                    mean: values,
                };
            }
            (Lift::Mean { output, mean }, "Div")
                if *output == node.input[0]
                    && reads(output) == 1
                    && values.iter().all(|&s| s > 0.0) =>
            {
                self.normalize = Some(Normalize {
                    mean: mean.clone(),
                    std: values,
                });
                self.lift = Lift::Done;
            }
            _ => return false,
        }
        true
    }

    pub(super) fn binary(&mut self, node: &NodeProto, op: &str) -> Result<Val, OnnxImportError> {
        let (a, b) = (self.get(node, 0)?, self.get(node, 1)?);
        if matches!(op, "Sub" | "Div") {
            if self.lifted(node, op, &b) {
                return Ok(Val::INPUT);
            }
            self.close_lift();
        }
        let mut operand = |v: Option<Val>, which: &str| -> Result<(Value, bool), OnnxImportError> {
            match v {
                Some(Val::Dyn { value, nonneg }) => Ok((value, nonneg)),
                Some(Val::Const(t)) => {
                    let nonneg = floats(&t).iter().all(|&x| x >= 0.0);
                    let prefix = self.names.module(
                        node,
                        None,
                        &format!("{}_const", op.to_ascii_lowercase()),
                    );
                    let name = self.tensor(&prefix, which, t, false);
                    let value = self.push_value(node, Op::Constant { tensor: name })?;
                    Ok((value, nonneg))
                }
                None => Err(refuse(node, "an input is missing")),
            }
        };
        let (a, an) = operand(a, "a")?;
        let (b, bn) = operand(b, "b")?;
        let (op, nonneg) = match op {
            "Add" => (Op::Add { a, b }, an && bn),
            "Sub" => (Op::Sub { a, b }, false),
            "Mul" => (Op::Mul { a, b }, an && bn),
            _ => (Op::Div { a, b }, an && bn),
        };
        let v = self.push(node, op, nonneg)?;
        // A batch-broadcast constant could widen the batch: refuse what changes it.
        if let Val::Dyn { value, .. } = &v {
            let (out, first) = (self.shape(*value), self.shape(a.max(b)));
            if out.first() != first.first() || out.first() != Some(&self.batch) {
                return Err(refuse(
                    node,
                    format!("its output {out:?} changes the batch axis"),
                ));
            }
        }
        Ok(v)
    }
}

/// A conv's padding `[top, left, bottom, right]` from `pads` or `auto_pad` (TF's "SAME": the
/// odd pixel at the end for `SAME_UPPER`, at the start for `SAME_LOWER`).
fn conv_pads(
    node: &NodeProto,
    a: &Attrs,
    in_shape: &[i64],
    k: i64,
    s: i64,
) -> Result<[i64; 4], OnnxImportError> {
    let pads = match a.string("auto_pad").as_deref() {
        None | Some("NOTSET") => a.ints("pads").unwrap_or(vec![0; 4]),
        Some("VALID") => vec![0; 4],
        Some(same @ ("SAME_UPPER" | "SAME_LOWER")) => {
            let total = |n: i64| (((n + s - 1) / s - 1) * s + k - n).max(0);
            let split = |t: i64| match same {
                "SAME_UPPER" => (t / 2, t - t / 2),
                _ => (t - t / 2, t / 2),
            };
            let ((hb, he), (wb, we)) = (split(total(in_shape[2])), split(total(in_shape[3])));
            vec![hb, wb, he, we]
        }
        Some(other) => return Err(refuse(node, format!("auto_pad {other}"))),
    };
    pads.try_into()
        .map_err(|p: Vec<i64>| refuse(node, format!("pads {p:?}")))
}
