//! Integer numerics: a fixed-policy network computed the way ONNX Runtime's integer kernels
//! (QLinearConv, QLinearAdd) compute its exported graph, so that what gmpq trains and
//! evaluates is what the deployed model returns.
//!
//! On the network's [`Graph`] (the same ops the exporters read):
//! - every conv is fused with its batch norm: `w_f = w·γ/√(σ²+ε)`, `b_f = β − μ·γ/√(σ²+ε)`,
//!   with the running statistics frozen;
//! - a quantized conv's kernel is `w_f` quantized symmetrically per output channel at its
//!   policy bits (`T_c = max|w_f[c]|`), its bias `b_f` rounded to int32 in units of
//!   `s_x·s_w[c]`;
//! - every conv output and every residual sum (after its ReLU/ReLU6/max-pool) is quantized
//!   once: at the input quantizer of the one quantized conv that reads it (its bits and
//!   learned clip, in an 8-bit container), or, where several ops read it, to 8 bits with a
//!   calibrated range (unsigned after a ReLU, else signed with zero point 128); each conv
//!   then re-quantizes that to its own input bits;
//! - the stem (full precision in the policy) runs as an integer conv on the image quantized
//!   to 8 bits, and the classifier (global average pool + linear) reads the dequantized
//!   features in float, as in training;
//! - no integer conv's pair of u8×s8 products can leave int16 ([`kernel_weight_bits`]: the
//!   stem's kernels hold 7 bits), so every CPU computes the same integers.
//!
//! [`Executor::forward`] computes this in libtorch with straight-through gradients (to the
//! kernels, the batch norm's scale and shift, and the activation clips); the ONNX exporter
//! writes the same plan as QDQ units that ONNX Runtime fuses into integer kernels.

use super::fused::{quantize_activation_mix, quantize_weight_mix};
use super::quantizer::{activation_levels, straight_through, weight_levels};
use super::QuantError;
use crate::model::graph::{BatchNormParams, Graph, Op, Value};
use crate::model::ConvSpec;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use tch::{Kind, Tensor};

pub use crate::policy::Numerics;

/// The name of the var-store tensor holding the 8-bit ranges, indexed by graph value.
pub const RANGES: &str = "integer_ranges";

/// How a value of the graph is held in the integer network: float (the default), and/or
/// quantized for its readers.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Holding {
    /// 8 bits with a calibrated range `R` (stored at the value's index in [`RANGES`]) for
    /// every reader not in `direct`: unsigned `s = R/255`, or signed `s = R/127` around zero
    /// point 128. Quantized convs among those readers re-quantize it to their input bits.
    pub eight: Option<bool>,
    /// Quantized convs that read the value at their own input quantizer (bits and clip,
    /// uint8 container), quantized once from its float form.
    pub direct: Vec<String>,
}

/// A conv fused with its batch norm (or bias) and the ops that follow it before quantization.
#[derive(Debug, Clone)]
pub struct ConvUnit {
    /// The op index of its batch norm, or of its bias (an imported network's conv, whose
    /// batch norm the exporter folded in); none: a conv without either.
    pub bn: Option<usize>,
    pub layer: String,
    /// The value the conv reads (after a padding op, if any: see `pads`).
    pub input: Value,
    /// Zero padding `[left, right, top, bottom]` of a `Pad` op that feeds only this conv.
    pub pads: Option<[i64; 4]>,
    /// ReLU / ReLU6 / max-pool ops applied after the batch norm, in order.
    pub post: Vec<usize>,
    /// The value the unit produces (after `post`).
    pub output: Value,
}

/// A residual add and the ops that follow it before quantization.
#[derive(Debug, Clone)]
pub struct AddUnit {
    pub a: Value,
    pub b: Value,
    pub post: Vec<usize>,
    pub output: Value,
}

/// One step of the integer network.
#[derive(Debug, Clone)]
pub enum Step {
    Conv(ConvUnit),
    Add(AddUnit),
    /// Any other op, computed in float on dequantized values (pooling, the classifier).
    Float(usize),
}

/// The integer network's plan over a graph: its steps and how each value is held.
#[derive(Debug, Clone)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// By value (0 = input, `i + 1` = op `i`'s output).
    pub held: Vec<Holding>,
    /// Quantized layers by name: `(w_bits, a_bits, signed input)`.
    pub bits: HashMap<String, (u32, u32, bool)>,
    /// Full-precision convs (the stem) that read the image: they run as integer convs
    /// ([`Plan::kernel_bits`]: 7-bit kernels) on the image quantized to 8 bits (signed,
    /// calibrated range), so that every conv of the deployed graph is an integer kernel and
    /// its layout stays channels-last end to end.
    pub stem: Vec<String>,
    /// The weight bits of every integer conv's kernel (quantized layers and the stem), see
    /// [`Plan::kernel_bits`].
    kernels: HashMap<String, u32>,
}

/// Who reads each value of a graph.
struct Reads<'a> {
    graph: &'a Graph,
    consumers: Vec<Vec<usize>>,
}

impl<'a> Reads<'a> {
    fn new(graph: &'a Graph) -> Self {
        let mut consumers: Vec<Vec<usize>> = vec![Vec::new(); graph.ops.len() + 1];
        for (i, op) in graph.ops.iter().enumerate() {
            for v in op.inputs() {
                consumers[v].push(i);
            }
        }
        Self { graph, consumers }
    }

    /// The ops that read value `v`, looking through a padding op (folded into its conv).
    fn readers(&self, v: Value) -> Vec<usize> {
        self.consumers[v]
            .iter()
            .flat_map(|&r| match self.graph.ops[r] {
                Op::Pad { .. } => self.consumers[r + 1].clone(),
                _ => vec![r],
            })
            .collect()
    }

    fn sole(&self, v: Value) -> Option<usize> {
        match self.consumers[v].as_slice() {
            [only] => Some(*only),
            _ => None,
        }
    }

    /// The ops that follow value `v` while each is its input's only reader.
    fn post_of(&self, mut v: Value) -> (Vec<usize>, Value) {
        let mut post = Vec::new();
        while let Some(next) = self.sole(v) {
            match self.graph.ops[next] {
                Op::Relu { .. } | Op::Relu6 { .. } | Op::MaxPool { .. } => {
                    post.push(next);
                    v = next + 1;
                }
                _ => break,
            }
        }
        (post, v)
    }

    /// The graph as units: each conv with its batch norm (and padding) and the activations
    /// and pooling that follow it alone, each residual sum with what follows it, the rest
    /// in float.
    fn units(&self) -> Result<Vec<Step>, QuantError> {
        let mut steps = Vec::new();
        let mut fused = vec![false; self.graph.ops.len()];
        for (i, op) in self.graph.ops.iter().enumerate() {
            if fused[i] {
                continue;
            }
            match op {
                Op::Conv { input, layer } => {
                    let bn = self.sole(i + 1).filter(|&j| {
                        matches!(self.graph.ops[j], Op::BatchNorm { .. } | Op::Bias { .. })
                    });
                    let (input, pads) = match self.graph.ops.get(input.wrapping_sub(1)) {
                        Some(Op::Pad { input: src, pads }) if *input > 0 => (*src, Some(*pads)),
                        _ => (*input, None),
                    };
                    let (post, output) = self.post_of(bn.map_or(i, |j| j) + 1);
                    if let Some(j) = bn {
                        fused[j] = true;
                    }
                    post.iter().for_each(|&p| fused[p] = true);
                    steps.push(Step::Conv(ConvUnit {
                        bn,
                        layer: layer.clone(),
                        input,
                        pads,
                        post,
                        output,
                    }));
                }
                Op::Add { a, b } => {
                    let (post, output) = self.post_of(i + 1);
                    post.iter().for_each(|&p| fused[p] = true);
                    steps.push(Step::Add(AddUnit {
                        a: *a,
                        b: *b,
                        post,
                        output,
                    }));
                }
                // A padding op is folded into the conv that reads it.
                Op::Pad { .. }
                    if self
                        .sole(i + 1)
                        .is_some_and(|c| matches!(self.graph.ops[c], Op::Conv { .. })) => {}
                _ => steps.push(Step::Float(i)),
            }
        }
        Ok(steps)
    }

    /// How each unit's output is held: see [`Holding`].
    fn holdings(&self, steps: &[Step], qbits: &HashMap<String, (u32, u32, bool)>) -> Vec<Holding> {
        // How each unit's output is held. A conv's output can feed one integer kernel's
        // quantize op: at its one reader's input quantizer, else 8 bits. A residual sum is
        // cheap to repeat: each quantized conv reading it gets its own sum at its input bits.
        let mut held = vec![Holding::default(); self.graph.ops.len() + 1];
        for step in steps {
            let (output, post, is_add) = match step {
                Step::Conv(u) => (u.output, &u.post, false),
                Step::Add(u) => (u.output, &u.post, true),
                Step::Float(_) => continue,
            };
            let readers = self.readers(output);
            let quantized_conv = |r: &usize| match &self.graph.ops[*r] {
                Op::Conv { layer, .. } if qbits.contains_key(layer) => Some(layer.clone()),
                _ => None,
            };
            let after_relu = post
                .iter()
                .any(|&p| matches!(self.graph.ops[p], Op::Relu { .. } | Op::Relu6 { .. }));
            let direct: Vec<String> = if is_add || readers.len() == 1 {
                readers.iter().filter_map(quantized_conv).collect()
            } else {
                Vec::new()
            };
            let others = readers.len() > direct.len();
            held[output] = Holding {
                eight: others.then_some(!after_relu),
                direct,
            };
        }
        held
    }
}

impl Plan {
    /// Plans `graph` for the quantized layers `bits` (others stay float); fails on a graph
    /// shape the integer form does not cover (a conv without batch norm).
    pub fn new(
        graph: &Graph,
        specs: &[ConvSpec],
        bits: &HashMap<String, (u32, u32)>,
    ) -> Result<Self, QuantError> {
        let qbits: HashMap<String, (u32, u32, bool)> = specs
            .iter()
            .filter(|s| s.quantizable)
            .filter_map(|s| {
                bits.get(&s.name)
                    .map(|&(w, a)| (s.name.clone(), (w, a, s.signed_input)))
            })
            .collect();
        let reads = Reads::new(graph);
        let steps = reads.units()?;
        let mut held = reads.holdings(&steps, &qbits);
        // The image's readers (through a TF "SAME" stem's padding).
        let stem: Vec<String> = reads
            .readers(0)
            .into_iter()
            .filter_map(|r| match &graph.ops[r] {
                Op::Conv { layer, .. } if !qbits.contains_key(layer) => Some(layer.clone()),
                _ => None,
            })
            .collect();
        if !stem.is_empty() {
            held[0] = Holding {
                eight: Some(true),
                direct: Vec::new(),
            };
        }
        // Depthwise convs follow the rule too, though ONNX Runtime's integer depthwise kernel
        // sums in int32 (`export::saturation` does not flag them): exempting them moved
        // EfficientNet-Lite0's calibrated w8a8 agreement with float from 16 to 15 of 20 images.
        let kernels = qbits
            .iter()
            .map(|(l, &(w, a, signed))| {
                let bits = kernel_weight_bits(w, input_code_max(a, signed));
                (l.clone(), bits)
            })
            .chain(stem.iter().map(|l| {
                let bits = kernel_weight_bits(STEM_BITS, input_code_max(8, true));
                (l.clone(), bits)
            }))
            .collect();
        Ok(Self {
            steps,
            held,
            bits: qbits,
            stem,
            kernels,
        })
    }

    /// The weight bits `layer`'s integer kernel holds ([`kernel_weight_bits`]): a quantized
    /// layer's policy bits or the stem's [`STEM_BITS`], lowered where its input codes could
    /// saturate a pair sum. `None` for a float conv.
    pub fn kernel_bits(&self, layer: &str) -> Option<u32> {
        self.kernels.get(layer).copied()
    }

    /// Whether a unit's post ops end in a ReLU6 (its quantization must not pass 6).
    pub fn has_relu6(graph: &Graph, post: &[usize]) -> bool {
        post.iter()
            .any(|&p| matches!(graph.ops[p], Op::Relu6 { .. }))
    }
}

/// The input quantizer's scale `r/levels`, as the quantizer computes it (double, then used
/// in float).
pub fn input_scale(clip: f64, bits: u32, signed: bool) -> f32 {
    (clip / activation_levels(bits, signed) as f64) as f32
}

/// The stem's weight bits before the saturation rule ([`kernel_weight_bits`]) lowers them to
/// 7 against its 8-bit image (see [`Plan::stem`]).
pub const STEM_BITS: u32 = 8;

/// The largest sum an x86 integer kernel without VNNI (AVX2, AVX-512BW) can hold where it adds
/// two u8×s8 products: `vpmaddubsw` sums each pair in int16 and saturates there, so ONNX
/// Runtime's QLinearConv would return another answer than the arithmetic gmpq computes.
/// VNNI (`vpdpbusd`), AMX and ARM's dot products sum in int32 and never saturate.
pub const PAIR_SUM_LIMIT: i64 = i16::MAX as i64;

/// The largest uint8 code a conv's input takes: `2^a − 1` unsigned, `128 + 2^(a−1) − 1`
/// signed around zero point 128 (an 8-bit value: 255 either way).
pub fn input_code_max(a_bits: u32, signed: bool) -> i64 {
    let levels = activation_levels(a_bits, signed);
    if signed {
        (128 + levels).min(255)
    } else {
        levels.min(255)
    }
}

/// The weight bits a conv computes with in integer numerics: its own `w_bits`, lowered while two
/// products of its largest input code and its largest weight `2^(w−1) − 1` would pass
/// [`PAIR_SUM_LIMIT`]. Every CPU then computes the same integers: 8-bit weights against an
/// 8-bit input become 7-bit (2·255·63 = 32130); 2–6-bit weights are never lowered
/// (2·255·31 = 15810), nor 8-bit weights against inputs of at most 7 unsigned bits.
pub fn kernel_weight_bits(w_bits: u32, input_max: i64) -> u32 {
    let mut bits = w_bits;
    while bits > 2 && 2 * input_max * weight_levels(bits) > PAIR_SUM_LIMIT {
        bits -= 1;
    }
    bits
}

/// The 8-bit scale of a range `R`: `R/255` unsigned, `R/127` signed.
pub fn eight_scale(range: f32, signed: bool) -> f32 {
    range / if signed { 127.0 } else { 255.0 }
}

/// A conv with the batch norm after it folded in: `w·g` and `β − μ·g`, `g = γ/√(σ²+ε)`.
pub struct Folded {
    pub weight: Tensor,
    pub bias: Tensor,
    /// `g`, per output channel `[C,1,1,1]`.
    gain: Tensor,
}

/// Batch norm folded into the conv before it.
pub fn fold(weight: &Tensor, bn: &BatchNormParams) -> Folded {
    let g = &bn.weight / (bn.var.detach() + bn.eps).sqrt();
    let gain = g.view([-1, 1, 1, 1]);
    Folded {
        weight: weight * &gain,
        bias: &bn.bias - bn.mean.detach() * &g,
        gain,
    }
}

/// A batch norm that no conv precedes (DenseNet's, after a `Concat`) as `x·scale + shift`: the
/// exporter writes it as the same `Mul` and `Add` of these float32 constants, so that ONNX
/// Runtime rounds as gmpq does (its BatchNormalization kernel rounds otherwise, and a value
/// one ulp off can land on the other side of the next quantizer's rounding step).
pub fn batch_norm_affine(bn: &BatchNormParams) -> (Tensor, Tensor) {
    let scale = &bn.weight / (bn.var.detach() + bn.eps).sqrt();
    let shift = &bn.bias - bn.mean.detach() * &scale;
    (scale, shift)
}

/// An integer conv as ONNX Runtime's QLinearConv computes it: the input and kernel as their
/// integer codes (exact in float32), their products summed exactly (the sums stay below 2^24
/// for the layers' bits), the int32 bias added, then one scaling `s_x·s_w`. A float conv of the
/// dequantized values instead rounds every product and partial sum: a conv output near a
/// rounding boundary of the next quantizer then lands on the other side in about one
/// element in ten thousand, and a deep network (DenseNet-121) drifts from the exported one.
fn exact_conv(
    x: &Tensor,
    w: &Tensor,
    s_x: f32,
    s_w: &Tensor,
    bias_codes: &Tensor,
    scale: &Tensor,
    conv: impl Fn(&Tensor, &Tensor, Option<&Tensor>) -> Tensor,
) -> Tensor {
    let x_codes = (x / s_x as f64).round();
    let w_codes = (w / s_w.view([-1, 1, 1, 1])).round();
    let acc = conv(&x_codes, &w_codes, None);
    (acc + bias_codes.view([1, -1, 1, 1])) * scale.view([1, -1, 1, 1])
}

/// A unit's conv with what follows it folded in: its batch norm ([`fold`]), its bias as it
/// is, or no bias.
pub fn fold_unit(weight: &Tensor, graph: &Graph, unit: &ConvUnit) -> Folded {
    let channels = weight.size()[0];
    let ones = || Tensor::ones([channels, 1, 1, 1], (weight.kind(), weight.device()));
    match unit.bn.map(|j| &graph.ops[j]) {
        Some(Op::BatchNorm { params, .. }) => fold(weight, params),
        Some(Op::Bias { bias, .. }) => Folded {
            weight: weight.shallow_clone(),
            bias: bias.shallow_clone(),
            gain: ones(),
        },
        _ => Folded {
            weight: weight.shallow_clone(),
            bias: Tensor::zeros([channels], (weight.kind(), weight.device())),
            gain: ones(),
        },
    }
}

/// The largest int32 bias magnitude used: leaves headroom for the accumulator.
const BIAS_LIMIT: f64 = (1u64 << 30) as f64;

impl Folded {
    /// Per-output-channel thresholds `[C,1,1,1]` of the folded kernel. A quantized layer's
    /// own threshold `T` (`weight_threshold`, the one fake quantization trains with; `max|w|`
    /// if not yet set) is carried through the fold as `T·|g|`: since
    /// `Q(w·g; T·|g|) = g·Q(w; T)`, the folded kernel keeps the grid the layer was trained on
    /// (a per-channel `max|w·g|` grid moved every 2-bit weight at the batch-norm freeze).
    /// Without one (the stem) `max|w·g|`. Raised where needed so the bias
    /// `b/(s_x·s_w[c])` fits in ±2^30 (an all-zero channel would otherwise have a scale near
    /// zero and an unrepresentable bias).
    pub fn threshold(&self, layer: Option<(&Tensor, &Tensor)>, s_x: f32, w_bits: u32) -> Tensor {
        tch::no_grad(|| {
            let base = match layer {
                Some((weight, t)) => {
                    let t = if t.numel() > 0 && t.min().double_value(&[]) > 0.0 {
                        t.detach()
                    } else {
                        super::layers::initial_threshold(weight, t.dim() != 0)
                    };
                    t * self.gain.abs()
                }
                None => self.weight.abs().amax([1i64, 2, 3].as_slice(), true),
            };
            let levels = weight_levels(w_bits) as f64;
            let for_bias =
                self.bias.abs().view([-1, 1, 1, 1]) * (levels / (s_x as f64 * BIAS_LIMIT));
            base.maximum(&for_bias)
                .clamp_min(super::layers::MIN_THRESHOLD)
        })
    }
}

/// The int32 bias (as float integers) `round(b_f/(s_x·s_w))` and its scale `s_x·s_w` per
/// channel.
pub fn bias_integers(b: &Tensor, s_x: f32, s_w: &Tensor) -> (Tensor, Tensor) {
    let scale = s_w.flatten(0, -1) * s_x as f64;
    let q = (b.detach() / &scale).round();
    (q, scale)
}

/// `clamp(round(x/s), lo, hi)·s`, gradient identity inside the range.
fn quantize_eight(x: &Tensor, range: f32, signed: bool) -> Tensor {
    let s = eight_scale(range, signed) as f64;
    let (lo, hi) = if signed {
        (-128.0, 127.0)
    } else {
        (0.0, 255.0)
    };
    let q = (x.detach() / s).round().clamp(lo, hi) * s;
    straight_through(&q, &x.clamp(lo * s, hi * s))
}

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
        tch::no_grad(|| {
            let t = Tensor::from_slice(&ranges).to_device(self.ranges.device());
            self.ranges.shallow_clone().copy_(&t);
        });
    }

    fn range(&self, ranges: &[f32], v: Value) -> f32 {
        ranges.get(v).copied().unwrap_or(1.0)
    }

    /// The value `x` (float, before quantization) held as `held[v]`.
    fn hold(&self, x: Tensor, v: Value, ranges: &[f32], vars: &HashMap<String, LayerVars>) -> Slot {
        let h = &self.plan.held[v];
        let direct = h
            .direct
            .iter()
            .map(|l| (l.clone(), self.quantize_input(&x, l, vars)))
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
                if observing {
                    x
                } else {
                    quantize_eight(&x, self.range(ranges, v), signed)
                }
            }
        };
        Slot { general, direct }
    }

    fn quantize_input(&self, x: &Tensor, layer: &str, vars: &HashMap<String, LayerVars>) -> Tensor {
        let (Some(&(_, a_bits, signed)), Some(clip)) = (
            self.plan.bits.get(layer),
            vars.get(layer).and_then(|v| v.act_clip.as_ref()),
        ) else {
            return x.shallow_clone();
        };
        quantize_activation_mix(x, clip, None, &[a_bits], signed)
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
        let spec_of: HashMap<&str, &ConvSpec> =
            specs.iter().map(|s| (s.name.as_str(), s)).collect();
        let mut values: Vec<Option<Slot>> = (0..=graph.ops.len()).map(|_| None).collect();
        values[0] = Some(self.hold(xs.shallow_clone(), 0, &ranges, vars));
        // The value as `layer` reads it (None: as any other reader does).
        let get = |values: &[Option<Slot>], v: Value, layer: Option<&str>| -> (Tensor, bool) {
            match &values[v] {
                Some(slot) => match layer.and_then(|l| slot.direct.get(l)) {
                    Some(t) => (t.shallow_clone(), true),
                    None => (slot.general.shallow_clone(), false),
                },
                None => (Tensor::zeros([1], (Kind::Float, xs.device())), false),
            }
        };
        for step in &self.plan.steps {
            match step {
                Step::Conv(u) => {
                    let (mut x, quantized) = get(&values, u.input, Some(&u.layer));
                    let (Some(spec), Some(lv)) =
                        (spec_of.get(u.layer.as_str()), vars.get(&u.layer))
                    else {
                        continue;
                    };
                    let folded = fold_unit(&lv.weight, graph, u);
                    let kernel_bits = self.plan.kernel_bits(&u.layer);
                    let integer = match (self.plan.bits.get(&u.layer), kernel_bits) {
                        (Some(&(_, a_bits, signed)), Some(w_bits)) => {
                            if !quantized {
                                x = self.quantize_input(&x, &u.layer, vars);
                            }
                            let clip = lv.act_clip.as_ref().map_or(0.0, |c| c.double_value(&[]));
                            let own = lv.weight_threshold.as_ref().map(|t| (&lv.weight, t));
                            Some((input_scale(clip, a_bits, signed), w_bits, own))
                        }
                        (None, Some(w_bits)) => Some((
                            eight_scale(self.range(&ranges, u.input), true),
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
                            let s_w = super::weight_scale(&t, w_bits);
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
                    let s = spec.stride as i64;
                    let p = spec.padding as i64;
                    let conv = |x: &Tensor, w: &Tensor, b: Option<&Tensor>| {
                        x.conv2d(w, b, [s, s], [p, p], [1, 1], spec.groups as i64)
                    };
                    let mut y = match codes {
                        // Evaluation: the integer kernel's own arithmetic (see `exact_conv`).
                        Some((s_x, s_w, q, scale)) if !x.requires_grad() && !w.requires_grad() => {
                            exact_conv(&x, &w, s_x, &s_w, &q, &scale, conv)
                        }
                        _ => conv(&x, &w, Some(&b)),
                    };
                    for &op in &u.post {
                        y = graph.ops[op].eval(&[y], false);
                    }
                    values[u.output] = Some(self.hold(y, u.output, &ranges, vars));
                }
                Step::Add(u) => {
                    let mut y = get(&values, u.a, None).0 + get(&values, u.b, None).0;
                    for &op in &u.post {
                        y = graph.ops[op].eval(&[y], false);
                    }
                    values[u.output] = Some(self.hold(y, u.output, &ranges, vars));
                }
                Step::Float(i) => {
                    let inputs: Vec<Tensor> = graph.ops[*i]
                        .inputs()
                        .into_iter()
                        .map(|v| get(&values, v, None).0)
                        .collect();
                    let general = match &graph.ops[*i] {
                        Op::BatchNorm { params, .. } => {
                            let (scale, shift) = batch_norm_affine(params);
                            &inputs[0] * scale.view([1, -1, 1, 1]) + shift.view([1, -1, 1, 1])
                        }
                        op => op.eval(&inputs, false),
                    };
                    values[i + 1] = Some(Slot {
                        general,
                        direct: HashMap::new(),
                    });
                }
            }
        }
        get(&values, graph.ops.len(), None).0
    }
}

/// A value in the executor: as general readers see it, and as each direct reader does.
struct Slot {
    general: Tensor,
    direct: HashMap<String, Tensor>,
}
