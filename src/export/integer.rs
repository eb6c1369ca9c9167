//! The integer network ([`crate::quant::integer`]) as ONNX: QDQ units that ONNX Runtime fuses
//! into integer kernels, computing what gmpq trained and evaluated.
//!
//! - A quantized conv: `DequantizeLinear(x: uint8)`, `DequantizeLinear(kernel: int8,
//!   per channel, axis 0)`, `DequantizeLinear(bias: int32, scale s_x·s_w)` → `Conv` →
//!   optional `Relu` → `QuantizeLinear(uint8)`: ONNX Runtime's QLinearConv unit (the Relu is
//!   dropped: a zero point of 0 clamps the same).
//! - A residual add: `DequantizeLinear` on both inputs → `Add` → optional `Relu` →
//!   `QuantizeLinear`: its QLinearAdd unit.
//! - Values held at a conv's input bits (2–6-bit levels in a uint8): the `QuantizeLinear` is
//!   followed by an integer `Clip` to the levels (ReLU6 folded in); an 8-bit value a conv
//!   reads at fewer bits is re-quantized (`DequantizeLinear → QuantizeLinear → Clip`).
//! - Signed values (after MobileNet's linear bottlenecks) are uint8 around zero point 128:
//!   ONNX Runtime's x86 integer kernels take uint8 activations.
//! - The float stem (its batch norm folded) and the classifier (global average pool, Gemm)
//!   stay float; a `Pad` before a conv becomes the conv's padding.

use super::builder::{attr_int, attr_ints, Builder};
use super::floats;
use super::ExportError;
use crate::model::graph::{Graph, Op, Value};
use crate::model::kernel_name;
use crate::model::ConvSpec;
use crate::quant::integer::{
    batch_norm_affine, bias_integers, eight_scale, eight_zero, fold_unit, input_codes, input_scale,
    moves_codes, ConvUnit, Folded, Plan, Step, RANGES,
};
use crate::quant::{weight_scale, Network};
use onnx_protobuf::tensor_proto::DataType;
use std::collections::HashMap;
use tch::Tensor;

/// An emitted value: float, or uint8 with its scale and zero point.
#[derive(Clone)]
enum Emitted {
    Float(String),
    Quant { name: String, scale: f32, zero: u8 },
}

/// A graph value as emitted: as general readers see it, and as each direct reader does.
#[derive(Clone)]
struct Slot {
    general: Emitted,
    direct: HashMap<String, Emitted>,
}

impl Slot {
    fn float(e: Emitted) -> Self {
        Slot {
            general: e,
            direct: HashMap::new(),
        }
    }
}

/// Every quantized layer's activation clip, checked: one positive number each.
fn read_clips(
    plan: &Plan,
    var: &dyn Fn(&str) -> Result<Tensor, ExportError>,
) -> Result<HashMap<String, f64>, ExportError> {
    let mut clips = HashMap::new();
    for name in plan.bits.keys() {
        let clip = var(&crate::quant::QuantizerTensor::ActClip.of(name))?;
        if clip.numel() != 1 {
            return Err(ExportError::Unsupported(format!(
                "layer '{name}': {} activation clips (a supernet layer?)",
                clip.numel()
            )));
        }
        let r = clip.double_value(&[]);
        if !(r.is_finite() && r > 0.0) {
            return Err(ExportError::Unsupported(format!(
                "layer '{name}': activation clip {r} is not a positive number"
            )));
        }
        clips.insert(name.clone(), r);
    }
    Ok(clips)
}

/// Writes `net`'s integer graph after `input` (the normalised image); returns the logits.
pub(super) fn emit(b: &mut Builder, net: &Network, input: String) -> Result<String, ExportError> {
    let e = net.integer.as_ref().ok_or_else(|| {
        ExportError::Unsupported("the network does not compute with integer numerics".into())
    })?;
    let plan = &e.plan;
    let graph = net.net.graph();
    let vars = net.vs.variables();
    let var = |name: &str| -> Result<Tensor, ExportError> {
        vars.get(name)
            .map(|t| t.detach().to_device(tch::Device::Cpu))
            .ok_or_else(|| ExportError::Unsupported(format!("the network has no tensor '{name}'")))
    };
    let ranges = floats(&var(RANGES)?)?;
    let specs: HashMap<&str, &ConvSpec> = net
        .net
        .convs()
        .iter()
        .map(|c| (c.name.as_str(), c))
        .collect();
    let mut w = Writer {
        b,
        plan,
        graph: &graph,
        ranges,
        clips: HashMap::new(),
    };
    w.clips = read_clips(plan, &var)?;
    let mut values: Vec<Option<Slot>> = vec![None; graph.ops.len() + 1];
    values[0] = Some(match plan.held[0].eight {
        // The image at 8 bits for the integer stem.
        Some(_) => {
            let mut input = Some(input);
            let mut image = |_: &mut Writer| Ok(input.take().unwrap_or_default());
            w.finish(&mut image, &[], 0)?
        }
        None => Slot::float(Emitted::Float(input)),
    });
    let get = |values: &[Option<Slot>], v: Value| -> Result<Slot, ExportError> {
        values[v].clone().ok_or_else(|| {
            ExportError::Unsupported(format!("graph value {v} used before it is set"))
        })
    };
    for step in &plan.steps {
        match step {
            Step::Conv(u) => {
                let spec = specs.get(u.layer.as_str()).ok_or_else(|| {
                    ExportError::Unsupported(format!("the network has no conv layer '{}'", u.layer))
                })?;
                let weight = var(&kernel_name(&u.layer))?;
                let folded = tch::no_grad(|| fold_unit(&weight, &graph, u));
                let threshold = vars
                    .get(&crate::quant::QuantizerTensor::WeightThreshold.of(&u.layer))
                    .map(|t| t.detach().to_device(tch::Device::Cpu));
                let slot = get(&values, u.input)?;
                let (x, kernel, bias) =
                    w.conv_operands(u, slot, &folded, &weight, threshold.as_ref())?;
                let k = spec.kernel as i64;
                let (s, p) = (spec.stride as i64, spec.padding as i64);
                // ONNX pads: [top, left, bottom, right]; the graph's: [left, right, top, bottom].
                let pads = match u.pads {
                    Some([l, r, t, bt]) => [p + t, p + l, p + bt, p + r],
                    None => [p; 4],
                };
                let groups = spec.groups as i64;
                let mut conv = |w: &mut Writer| {
                    Ok(w.b.node(
                        "Conv",
                        &[&x, &kernel, &bias],
                        vec![
                            attr_ints("kernel_shape", &[k, k]),
                            attr_ints("strides", &[s, s]),
                            attr_ints("pads", &pads),
                            attr_ints("dilations", &[1, 1]),
                            attr_int("group", groups),
                        ],
                    ))
                };
                values[u.output] = Some(w.finish(&mut conv, &u.post, u.output)?);
            }
            Step::Add(u) => {
                let (a, bb) = (get(&values, u.a)?.general, get(&values, u.b)?.general);
                // Each quantization of the sum gets its own Add (ONNX Runtime fuses one
                // Add with one QuantizeLinear).
                let mut add = |w: &mut Writer| {
                    let (a, bb) = (w.float(a.clone()), w.float(bb.clone()));
                    Ok(w.b.node("Add", &[&a, &bb], vec![]))
                };
                values[u.output] = Some(w.finish(&mut add, &u.post, u.output)?);
            }
            Step::Float(i) => {
                let op = &graph.ops[*i];
                if let Some(q) = w.pass_through(op, &values)? {
                    values[i + 1] = Some(Slot::float(q));
                    continue;
                }
                let inputs: Vec<String> = op
                    .inputs()
                    .into_iter()
                    .map(|v| get(&values, v).map(|x| w.float(x.general)))
                    .collect::<Result<_, _>>()?;
                let y = match op {
                    Op::BatchNorm { params, .. } => {
                        let (scale, shift) = tch::no_grad(|| batch_norm_affine(params));
                        let scale = w.b.tensor_f32("bn.scale", &scale.view([1, -1, 1, 1]))?;
                        let shift = w.b.tensor_f32("bn.shift", &shift.view([1, -1, 1, 1]))?;
                        let scaled = w.b.node("Mul", &[&inputs[0], &scale], vec![]);
                        w.b.node("Add", &[&scaled, &shift], vec![])
                    }
                    _ => w.b.float_op(op, &inputs)?,
                };
                values[i + 1] = Some(Slot::float(Emitted::Float(y)));
            }
        }
    }
    let last = get(&values, graph.ops.len())?.general;
    Ok(w.float(last))
}

struct Writer<'a> {
    b: &'a mut Builder,
    plan: &'a Plan,
    graph: &'a Graph,
    ranges: Vec<f32>,
    clips: HashMap<String, f64>,
}

impl Writer<'_> {
    /// A conv unit's input, kernel and bias: integer for a quantized layer or the stem, the
    /// folded float ones otherwise.
    fn conv_operands(
        &mut self,
        u: &ConvUnit,
        slot: Slot,
        folded: &Folded,
        weight: &Tensor,
        threshold: Option<&Tensor>,
    ) -> Result<(String, String, String), ExportError> {
        let kernel_bits = self.plan.kernel_bits(&u.layer);
        Ok(match (self.plan.bits.get(&u.layer), kernel_bits) {
            (Some(&(_, a_bits, signed)), Some(w_bits)) => {
                let x = match slot.direct.get(&u.layer) {
                    Some(q) => self.float(q.clone()),
                    None => {
                        let f = self.float(slot.general);
                        let q = self.quantize_input(&f, &u.layer, false)?;
                        self.float(q)
                    }
                };
                let s_x = input_scale(self.clip(&u.layer)?, a_bits, signed);
                let (kernel, bias) = self.integer_kernel(
                    &u.layer,
                    folded,
                    threshold.map(|t| (weight, t)),
                    s_x,
                    w_bits,
                )?;
                (x, kernel, bias)
            }
            (None, Some(w_bits)) => {
                let s_x = match &slot.general {
                    Emitted::Quant { scale, .. } => *scale,
                    Emitted::Float(_) => {
                        return Err(ExportError::Unsupported(format!(
                            "stem '{}' reads a float value",
                            u.layer
                        )))
                    }
                };
                let x = self.float(slot.general);
                let (kernel, bias) = self.integer_kernel(&u.layer, folded, None, s_x, w_bits)?;
                (x, kernel, bias)
            }
            _ => {
                let f = self.float(slot.general);
                let kernel = self
                    .b
                    .tensor_f32(&format!("{}.weight_folded", u.layer), &folded.weight)?;
                let bias = self
                    .b
                    .tensor_f32(&format!("{}.bias_folded", u.layer), &folded.bias)?;
                (f, kernel, bias)
            }
        })
    }

    /// An op that only moves codes (slice, transpose, reshape, max-pool, concat) on uint8
    /// inputs of one scale and zero point: written on the codes, its output at the same
    /// quantization (ONNX Runtime runs these ops on uint8). Exact: gmpq computes them on the
    /// dequantized values, which are the codes times the one scale. None for any other op
    /// or where the inputs are float or differ in scale ([`Plan::shared`] makes a concat's
    /// parts share one).
    fn pass_through(
        &mut self,
        op: &Op,
        values: &[Option<Slot>],
    ) -> Result<Option<Emitted>, ExportError> {
        if !moves_codes(op) {
            return Ok(None);
        }
        let mut names = Vec::new();
        let mut quant: Option<(f32, u8)> = None;
        for v in op.inputs() {
            let Some(Slot {
                general: Emitted::Quant { name, scale, zero },
                ..
            }) = values.get(v).and_then(|s| s.as_ref())
            else {
                return Ok(None);
            };
            if quant.is_some_and(|(s, z)| s.to_bits() != scale.to_bits() || z != *zero) {
                return Ok(None);
            }
            quant = Some((*scale, *zero));
            names.push(name.clone());
        }
        let Some((scale, zero)) = quant else {
            return Ok(None);
        };
        let name = self.b.float_op(op, &names)?;
        Ok(Some(Emitted::Quant { name, scale, zero }))
    }

    fn clip(&self, layer: &str) -> Result<f64, ExportError> {
        self.clips.get(layer).copied().ok_or_else(|| {
            ExportError::Unsupported(format!("layer '{layer}' has no activation clip"))
        })
    }

    fn scale_and_zero(&mut self, stem: &str, scale: f32, zero: u8) -> (String, String) {
        let s = self.b.scalar_f32(&format!("{stem}.scale"), scale);
        let z = self.b.initializer(
            &format!("{stem}.zero_point"),
            &[],
            DataType::UINT8,
            vec![zero],
        );
        (s, z)
    }

    fn dequantize(&mut self, name: &str, scale: f32, zero: u8) -> String {
        let (s, z) = self.scale_and_zero("dq", scale, zero);
        self.b.node("DequantizeLinear", &[name, &s, &z], vec![])
    }

    /// A value as float (a `DequantizeLinear` per use, as ONNX Runtime's units want).
    fn float(&mut self, e: Emitted) -> String {
        match e {
            Emitted::Float(name) => name,
            Emitted::Quant { name, scale, zero } => self.dequantize(&name, scale, zero),
        }
    }

    /// `QuantizeLinear` to `layer`'s input quantizer, then the integer clip to its levels
    /// (and to ReLU6's 6 when `relu6`).
    fn quantize_input(
        &mut self,
        x: &str,
        layer: &str,
        relu6: bool,
    ) -> Result<Emitted, ExportError> {
        let &(_, a_bits, signed) =
            self.plan.bits.get(layer).ok_or_else(|| {
                ExportError::Unsupported(format!("layer '{layer}' is not quantized"))
            })?;
        let scale = input_scale(self.clip(layer)?, a_bits, signed);
        // The executor's code range (ReLU6's bound included), moved to the zero point.
        let zero = eight_zero(signed);
        let (lo, hi) = input_codes(a_bits, signed, scale, relu6);
        let (lo, hi) = (lo as i64 + zero as i64, hi as i64 + zero as i64);
        let (s, z) = self.scale_and_zero(&format!("{layer}.input"), scale, zero);
        let q = self.b.node("QuantizeLinear", &[x, &s, &z], vec![]);
        let lo = self.b.initializer(
            &format!("{layer}.input_min"),
            &[],
            DataType::UINT8,
            vec![lo.clamp(0, 255) as u8],
        );
        let hi = self.b.initializer(
            &format!("{layer}.input_max"),
            &[],
            DataType::UINT8,
            vec![hi.clamp(0, 255) as u8],
        );
        let clipped = self.b.node("Clip", &[&q, &lo, &hi], vec![]);
        Ok(Emitted::Quant {
            name: clipped,
            scale,
            zero,
        })
    }

    /// The int8 kernel and int32 bias of a folded conv, each behind its `DequantizeLinear`.
    fn integer_kernel(
        &mut self,
        layer: &str,
        folded: &Folded,
        own_threshold: Option<(&Tensor, &Tensor)>,
        s_x: f32,
        w_bits: u32,
    ) -> Result<(String, String), ExportError> {
        let (q, s_w, q_b, b_scale) = tch::no_grad(|| {
            let t = folded.threshold(own_threshold, s_x, w_bits);
            let s = weight_scale(&t, w_bits);
            let q = (folded.weight.clamp_tensor(Some(&-&t), Some(&t)) / &s).round();
            let (q_b, b_scale) = bias_integers(&folded.bias, s_x, &s);
            (q, s, q_b, b_scale)
        });
        let q = floats(&q)?;
        let s_w = floats(&s_w)?;
        let q_b = floats(&q_b)?;
        let b_scale = floats(&b_scale)?;
        let c = s_w.len() as i64;
        let raw: Vec<u8> = q.iter().map(|&v| (v as i8) as u8).collect();
        let qw = self.b.initializer(
            &format!("{layer}.weight_int8"),
            &folded.weight.size(),
            DataType::INT8,
            raw,
        );
        let sw = self
            .b
            .constant_f32(&format!("{layer}.weight_scale"), &[c], &s_w);
        let zw = self.b.initializer(
            &format!("{layer}.weight_zero_point"),
            &[c],
            DataType::INT8,
            vec![0; c as usize],
        );
        let kernel = self.b.node(
            "DequantizeLinear",
            &[&qw, &sw, &zw],
            vec![attr_int("axis", 0)],
        );
        let raw: Vec<u8> = q_b.iter().flat_map(|&v| (v as i32).to_le_bytes()).collect();
        let qb = self
            .b
            .initializer(&format!("{layer}.bias_int32"), &[c], DataType::INT32, raw);
        let sb = self
            .b
            .constant_f32(&format!("{layer}.bias_scale"), &[c], &b_scale);
        let zb = self.b.initializer(
            &format!("{layer}.bias_zero_point"),
            &[c],
            DataType::INT32,
            vec![0; 4 * c as usize],
        );
        let bias = self.b.node(
            "DequantizeLinear",
            &[&qb, &sb, &zb],
            vec![attr_int("axis", 0)],
        );
        Ok((kernel, bias))
    }

    /// A unit's op (`make`, emitted once per quantization of its output), its post ops, and
    /// the quantizations the plan holds its output in.
    fn finish(
        &mut self,
        make: &mut dyn FnMut(&mut Self) -> Result<String, ExportError>,
        post: &[usize],
        output: Value,
    ) -> Result<Slot, ExportError> {
        let held = self.plan.held[output].clone();
        let relu6 = Plan::has_relu6(self.graph, post);
        let quantized = held.eight.is_some() || !held.direct.is_empty();
        let mut unit = |w: &mut Self| -> Result<String, ExportError> {
            let mut y = make(w)?;
            for &p in post {
                y = match &w.graph.ops[p] {
                    // Quantized outputs: ReLU6's bound is the integer clip or the 8-bit range.
                    Op::Relu6 { .. } if quantized => w.b.node("Relu", &[&y], vec![]),
                    op => w.b.float_op(op, &[y])?,
                };
            }
            Ok(y)
        };
        let mut direct = HashMap::new();
        for layer in &held.direct {
            let y = unit(self)?;
            direct.insert(layer.clone(), self.quantize_input(&y, layer, relu6)?);
        }
        let general = match held.eight {
            Some(signed) => {
                let y = unit(self)?;
                let range = self.ranges.get(output).copied().unwrap_or(0.0);
                if !(range.is_finite() && range > 0.0) {
                    return Err(ExportError::Unsupported(
                        "the integer network's 8-bit ranges are not calibrated".into(),
                    ));
                }
                let scale = eight_scale(range, signed);
                let zero = eight_zero(signed);
                let (s, z) = self.scale_and_zero("q8", scale, zero);
                let q = self.b.node("QuantizeLinear", &[&y, &s, &z], vec![]);
                Emitted::Quant {
                    name: q,
                    scale,
                    zero,
                }
            }
            None => match direct.values().next() {
                Some(d) => d.clone(),
                None => Emitted::Float(unit(self)?),
            },
        };
        Ok(Slot { general, direct })
    }
}
