//! The plan run in libtorch: integer numerics with straight-through gradients for training,
//! and exactly the exported graph's integer kernels in evaluation.

use super::kernel::{
    batch_norm_affine, bias_integers, eight_codes, eight_scale, eight_zero, exact_conv,
    input_codes, input_scale, quantize_codes, quantize_eight, Exact, Kernel,
};
use super::plan::{fold_unit, AddUnit, ConvUnit, Plan, Step};
use crate::model::graph::{Graph, Op, Value};
use crate::model::ConvSpec;
use crate::quant::fused::{quantize_activation_mix, quantize_weight_mix};
use crate::quant::quantizer::straight_through;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use tch::{Kind, Tensor};

/// Runs a plan in libtorch.
#[derive(Debug)]
pub struct Executor {
    pub plan: Plan,
    /// `[values]`: each 8-bit value's range (var store [`RANGES`]).
    pub ranges: Tensor,
    /// Set while calibrating: 8-bit values pass through unquantized and their maxima are
    /// recorded here.
    observed: Mutex<Option<Vec<f64>>>,
    /// Whether training steps use integer numerics (after the batch-norm freeze); evaluation
    /// always does.
    training_frozen: AtomicBool,
}

/// A layer's tensors the executor reads (shallow clones of var-store variables).
#[derive(Debug)]
pub struct LayerVars {
    pub weight: Tensor,
    /// Absent for full-precision layers.
    pub act_clip: Option<Tensor>,
    /// The weight quantizer's threshold; absent for full-precision layers.
    pub weight_threshold: Option<Tensor>,
}

impl Executor {
    pub fn new(plan: Plan, ranges: Tensor) -> Self {
        Self {
            plan,
            ranges,
            observed: Mutex::new(None),
            training_frozen: AtomicBool::new(false),
        }
    }

    pub fn set_training_frozen(&self, frozen: bool) {
        self.training_frozen.store(frozen, Ordering::Relaxed);
    }
    pub fn training_frozen(&self) -> bool {
        self.training_frozen.load(Ordering::Relaxed)
    }

    /// Sets every 8-bit range from the maxima of `run`'s forward passes (capped at 6 after a
    /// ReLU6, so that the 8-bit range, not a float clip, bounds the value). Two rounds: the
    /// integer stem's scale comes from the image's range, which the first round sets.
    pub fn calibrate(&self, graph: &Graph, run: impl Fn()) {
        for _ in 0..2 {
            self.calibrate_round(graph, &run);
        }
    }

    fn calibrate_round(&self, graph: &Graph, run: &impl Fn()) {
        if let Ok(mut o) = self.observed.lock() {
            *o = Some(vec![0.0; self.plan.held.len()]);
        }
        run();
        let maxima = self
            .observed
            .lock()
            .ok()
            .and_then(|mut o| o.take())
            .unwrap_or_default();
        let mut ranges: Vec<f32> = vec![0.0; self.plan.held.len()];
        if self.plan.held[0].eight.is_some() {
            let r = maxima.first().copied().unwrap_or(0.0);
            ranges[0] = if r > 0.0 { r as f32 } else { 1.0 };
        }
        for step in &self.plan.steps {
            let (output, post) = match step {
                Step::Conv(u) => (u.output, &u.post),
                Step::Add(u) => (u.output, &u.post),
                Step::Float(_) => continue,
            };
            if self.plan.held[output].eight.is_some() {
                let mut r = maxima.get(output).copied().unwrap_or(0.0);
                if Plan::has_relu6(graph, post) {
                    r = r.min(6.0);
                }
                ranges[output] = if r > 0.0 { r as f32 } else { 1.0 };
            }
        }
        for group in &self.plan.shared {
            let r = group.iter().map(|&v| ranges[v]).fold(0.0f32, f32::max);
            group.iter().for_each(|&v| ranges[v] = r);
        }
        tch::no_grad(|| {
            let t = Tensor::from_slice(&ranges).to_device(self.ranges.device());
            self.ranges.shallow_clone().copy_(&t);
        });
    }

    fn range(&self, ranges: &[f32], v: Value) -> f32 {
        ranges.get(v).copied().unwrap_or(1.0)
    }

    /// The value `x` (float, before quantization) held as `held[v]`; `sums`: the integer
    /// kernel that computed it, whose codes the quantized forms take exactly (see [`Exact`]).
    fn hold(
        &self,
        x: Tensor,
        v: Value,
        ranges: &[f32],
        vars: &HashMap<String, LayerVars>,
        exact: Option<&Exact>,
    ) -> Slot {
        let h = &self.plan.held[v];
        let relu6 = exact.is_some_and(|e| Plan::has_relu6(e.graph, e.post));
        let direct = h
            .direct
            .iter()
            .map(|l| {
                let q = match (exact, self.input_quantizer(l, vars, relu6)) {
                    (Some(e), Some((scale, zero, lo, hi))) => e.codes(scale, zero, lo, hi),
                    _ => self.quantize_input(&x, l, vars),
                };
                (l.clone(), q)
            })
            .collect();
        let general = match h.eight {
            None => x,
            Some(signed) => {
                let observing = self.observed.lock().ok().is_some_and(|mut o| {
                    o.as_mut().is_some_and(|m| {
                        let seen = if signed { x.abs().max() } else { x.max() };
                        m[v] = m[v].max(seen.double_value(&[]));
                        true
                    })
                });
                let range = self.range(ranges, v);
                match exact {
                    _ if observing => x,
                    Some(e) => {
                        let (lo, hi) = eight_codes(signed);
                        e.codes(eight_scale(range, signed), eight_zero(signed), lo, hi)
                    }
                    None => quantize_eight(&x, range, signed),
                }
            }
        };
        Slot { general, direct }
    }

    /// `layer`'s input quantizer: its scale, zero point and code range (see [`input_codes`]);
    /// none for a float layer.
    fn input_quantizer(
        &self,
        layer: &str,
        vars: &HashMap<String, LayerVars>,
        relu6: bool,
    ) -> Option<(f32, u8, f64, f64)> {
        let &(_, a_bits, signed) = self.plan.bits.get(layer)?;
        let clip = vars.get(layer)?.act_clip.as_ref()?;
        let scale = input_scale(clip.double_value(&[]), a_bits, signed);
        let (lo, hi) = input_codes(a_bits, signed, scale, relu6);
        Some((scale, eight_zero(signed), lo, hi))
    }

    /// `x` at `layer`'s input quantizer: the PACT quantizer where a gradient is wanted, else
    /// the exported graph's `QuantizeLinear` and integer clip (the PACT form
    /// `(|x| − |x − r| + r)/2` rounds, and one ulp can change a code).
    fn quantize_input(&self, x: &Tensor, layer: &str, vars: &HashMap<String, LayerVars>) -> Tensor {
        let (Some(&(_, a_bits, signed)), Some(clip)) = (
            self.plan.bits.get(layer),
            vars.get(layer).and_then(|v| v.act_clip.as_ref()),
        ) else {
            return x.shallow_clone();
        };
        // An op on the clip requires a gradient only where autograd records.
        let gradient = x.requires_grad() || (clip * 1.0).requires_grad();
        match self.input_quantizer(layer, vars, false) {
            Some((scale, _, lo, hi)) if !gradient => quantize_codes(x, scale, lo, hi),
            _ => quantize_activation_mix(x, clip, None, &[a_bits], signed),
        }
    }

    /// The integer network's logits for the normalised images `xs`.
    pub fn forward(
        &self,
        graph: &Graph,
        specs: &[ConvSpec],
        vars: &HashMap<String, LayerVars>,
        xs: &Tensor,
    ) -> Tensor {
        let ranges: Vec<f32> =
            Vec::try_from(self.ranges.detach().to_device(tch::Device::Cpu)).unwrap_or_default();
        let mut run = Run {
            graph,
            specs: specs.iter().map(|s| (s.name.as_str(), s)).collect(),
            vars,
            ranges,
            values: (0..=graph.ops.len()).map(|_| None).collect(),
            device: xs.device(),
        };
        run.values[0] = Some(self.hold(xs.shallow_clone(), 0, &run.ranges, vars, None));
        for step in &self.plan.steps {
            match step {
                Step::Conv(u) => {
                    if let Some(slot) = self.conv(&run, u) {
                        run.values[u.output] = Some(slot);
                    }
                }
                Step::Add(u) => {
                    let (a, b) = (run.get(u.a, None).0, run.get(u.b, None).0);
                    let exact = self.add_kernel(&run, u, &a, &b);
                    let mut y = a + b;
                    for &op in &u.post {
                        y = graph.ops[op].eval(&[y], false);
                    }
                    let slot = self.hold(y, u.output, &run.ranges, vars, exact.as_ref());
                    run.values[u.output] = Some(slot);
                }
                Step::Float(i) => {
                    let inputs: Vec<Tensor> = graph.ops[*i]
                        .inputs()
                        .into_iter()
                        .map(|v| run.get(v, None).0)
                        .collect();
                    let general = match &graph.ops[*i] {
                        Op::BatchNorm { params, .. } => {
                            let (scale, shift) = batch_norm_affine(params);
                            &inputs[0] * scale.view([1, -1, 1, 1]) + shift.view([1, -1, 1, 1])
                        }
                        op => op.eval(&inputs, false),
                    };
                    run.values[i + 1] = Some(Slot {
                        general,
                        direct: HashMap::new(),
                    });
                }
            }
        }
        run.get(graph.ops.len(), None).0
    }

    /// A residual add as ONNX Runtime's QLinearAdd computes it (see [`Exact::codes`]), where
    /// both inputs are 8-bit values and no gradient is wanted; None otherwise (a float input
    /// makes it a float `Add` in the exported graph too).
    fn add_kernel<'a>(
        &self,
        run: &Run<'a>,
        u: &'a AddUnit,
        a: &Tensor,
        b: &Tensor,
    ) -> Option<Exact<'a>> {
        if a.requires_grad() || b.requires_grad() || self.observing() {
            return None;
        }
        let at = |v: Value| {
            let signed = self.plan.held[v].eight?;
            Some((
                eight_scale(self.range(&run.ranges, v), signed),
                eight_zero(signed),
            ))
        };
        let (a_at, b_at) = (at(u.a)?, at(u.b)?);
        let codes = |x: &Tensor, (s, z): (f32, u8)| (x / s as f64).round() + z as f64;
        Some(Exact {
            kernel: Kernel::Add {
                a: codes(a, a_at),
                a_at,
                b: codes(b, b_at),
                b_at,
            },
            post: &u.post,
            graph: run.graph,
        })
    }

    /// Whether a calibration round is recording the 8-bit values' maxima.
    fn observing(&self) -> bool {
        self.observed.lock().ok().is_some_and(|o| o.is_some())
    }

    /// A conv unit: its input at the conv's quantizer, its folded kernel and bias quantized,
    /// the conv (in evaluation the integer kernel's own arithmetic: see `exact_conv`, `Sums`),
    /// its post ops, and its output held for its readers. None for a layer `vars` lacks.
    fn conv(&self, run: &Run, u: &ConvUnit) -> Option<Slot> {
        let (mut x, quantized) = run.get(u.input, Some(&u.layer));
        let spec = run.specs.get(u.layer.as_str())?;
        let lv = run.vars.get(&u.layer)?;
        let folded = fold_unit(&lv.weight, run.graph, u);
        let integer = match (
            self.plan.bits.get(&u.layer),
            self.plan.kernel_bits(&u.layer),
        ) {
            (Some(&(_, a_bits, signed)), Some(w_bits)) => {
                if !quantized {
                    x = self.quantize_input(&x, &u.layer, run.vars);
                }
                let clip = lv.act_clip.as_ref().map_or(0.0, |c| c.double_value(&[]));
                let own = lv.weight_threshold.as_ref().map(|t| (&lv.weight, t));
                Some((input_scale(clip, a_bits, signed), w_bits, own))
            }
            (None, Some(w_bits)) => Some((
                eight_scale(self.range(&run.ranges, u.input), true),
                w_bits,
                None,
            )),
            _ => None,
        };
        let mut codes = None;
        let (w, b) = match integer {
            Some((s_x, w_bits, own)) => {
                let t = folded.threshold(own, s_x, w_bits);
                let w = quantize_weight_mix(&folded.weight, &t, None, &[w_bits]);
                let s_w = crate::quant::weight_scale(&t, w_bits);
                let (q, scale) = bias_integers(&folded.bias, s_x, &s_w);
                let b = straight_through(&(&q * &scale), &folded.bias);
                codes = Some((s_x, s_w, q, scale));
                (w, b)
            }
            None => (folded.weight, folded.bias),
        };
        if let Some(p) = u.pads {
            x = x.constant_pad_nd(p.as_slice());
        }
        let (s, p) = (spec.stride as i64, spec.padding as i64);
        let conv = |x: &Tensor, w: &Tensor, b: Option<&Tensor>| {
            x.conv2d(w, b, [s, s], [p, p], [1, 1], spec.groups as i64)
        };
        let exact = match codes {
            Some((s_x, s_w, q, scale)) if !x.requires_grad() && !w.requires_grad() => Some(Exact {
                kernel: Kernel::Conv {
                    acc: exact_conv(&x, &w, s_x, &s_w, &q, conv),
                    scale,
                },
                post: &u.post,
                graph: run.graph,
            }),
            _ => None,
        };
        let mut y = match &exact {
            Some(Exact {
                kernel: Kernel::Conv { acc, scale },
                ..
            }) => acc * scale.view([1, -1, 1, 1]),
            _ => conv(&x, &w, Some(&b)),
        };
        for &op in &u.post {
            y = run.graph.ops[op].eval(&[y], false);
        }
        Some(self.hold(y, u.output, &run.ranges, run.vars, exact.as_ref()))
    }
}

/// One forward pass's state: the graph, the layers' geometry and tensors, the 8-bit ranges
/// and every value computed so far.
struct Run<'a> {
    graph: &'a Graph,
    specs: HashMap<&'a str, &'a ConvSpec>,
    vars: &'a HashMap<String, LayerVars>,
    ranges: Vec<f32>,
    values: Vec<Option<Slot>>,
    device: tch::Device,
}

impl Run<'_> {
    /// Value `v` as `layer` reads it (None: as any other reader does), and whether it is
    /// already at that layer's input quantizer.
    fn get(&self, v: Value, layer: Option<&str>) -> (Tensor, bool) {
        match &self.values[v] {
            Some(slot) => match layer.and_then(|l| slot.direct.get(l)) {
                Some(t) => (t.shallow_clone(), true),
                None => (slot.general.shallow_clone(), false),
            },
            None => (Tensor::zeros([1], (Kind::Float, self.device)), false),
        }
    }
}

/// A value in the executor: as general readers see it, and as each direct reader does.
struct Slot {
    general: Tensor,
    direct: HashMap<String, Tensor>,
}
