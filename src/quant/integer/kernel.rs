//! The integer kernels' arithmetic, as ONNX Runtime computes it: batch norm folded into the
//! conv, per-channel kernel scales and int32 biases, input and 8-bit scales, integer sums and
//! their one requantization, and the saturation rule that keeps every CPU on the same
//! integers.

use crate::model::graph::{BatchNormParams, Graph, Op};
use crate::quant::quantizer::{activation_levels, straight_through, weight_levels};
use tch::{Kind, Tensor};

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
    pub(super) gain: Tensor,
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
pub(super) fn exact_conv(
    x: &Tensor,
    w: &Tensor,
    s_x: f32,
    s_w: &Tensor,
    bias_codes: &Tensor,
    conv: impl Fn(&Tensor, &Tensor, Option<&Tensor>) -> Tensor,
) -> Tensor {
    let x_codes = (x / s_x as f64).round();
    let w_codes = (w / s_w.view([-1, 1, 1, 1])).round();
    conv(&x_codes, &w_codes, None) + bias_codes.view([1, -1, 1, 1])
}

/// What an integer kernel requantizes: a conv's integer sums, or a residual add's two 8-bit
/// inputs.
pub(super) enum Kernel {
    /// The sums (bias included, exact integers in float32) and their scale `s_x·s_w` per
    /// output channel.
    Conv { acc: Tensor, scale: Tensor },
    /// Both inputs' codes (uint8, zero point included) with their scales and zero points.
    Add {
        a: Tensor,
        a_at: (f32, u8),
        b: Tensor,
        b_at: (f32, u8),
    },
}

/// A unit computed by an integer kernel, with the post ops of its unit: its output codes at
/// any quantization, exactly as ONNX Runtime writes them.
pub(super) struct Exact<'a> {
    pub(super) kernel: Kernel,
    pub(super) post: &'a [usize],
    pub(super) graph: &'a Graph,
}

impl Exact<'_> {
    /// The unit's output at scale `s_y` and zero point `zero`, codes clamped to `[lo, hi]`
    /// around the zero point, dequantized.
    ///
    /// - QLinearConv: `round(acc·m)` with the one float32 multiplier `m = (s_x·s_w)/s_y`,
    ///   ties to even. Requantizing the scaled float sum instead (`round((acc·s_x·s_w)/s_y)`)
    ///   rounds twice, and about one element in ten thousand lands on the other side of a
    ///   rounding step: enough, over DenseNet-121's 120 convs, to move a top-1 class on 2 %
    ///   of images.
    /// - QLinearAdd (MLAS's AVX2 kernel, which AVX-512 machines run too): with
    ///   `r_a = s_a/s_y`, `r_b = s_b/s_y` and `c = z_y − (r_a·z_a + r_b·z_b)` in float32,
    ///   `round(fma(a, r_a, fma(b, r_b, c)))` on the uint8 codes, saturated to uint8 (each
    ///   fused multiply-add rounds once: computed in float64, where the product and sum are
    ///   exact, then rounded to float32). Pinned against ONNX Runtime on all 65,536 code pairs
    ///   for 40 random scale triples; the float sum `round((a·s_a + b·s_b)/s_y)` differs on
    ///   about 5 pairs in a million.
    ///
    /// A ReLU after the kernel is the lower clamp of the codes (ReLU6's 6 is the caller's
    /// `hi`); a max-pool commutes with the rounding.
    pub(super) fn codes(&self, s_y: f32, zero: u8, lo: f64, hi: f64) -> Tensor {
        let mut codes = match &self.kernel {
            Kernel::Conv { acc, scale } => (acc * (scale.view([1, -1, 1, 1]) / s_y as f64)).round(),
            Kernel::Add { a, a_at, b, b_at } => {
                let (r_a, r_b) = (a_at.0 / s_y, b_at.0 / s_y);
                let c = zero as f32 - (r_a * a_at.1 as f32 + r_b * b_at.1 as f32);
                let fma = |x: &Tensor, r: f32, plus: Tensor| {
                    (x.to_kind(Kind::Double) * r as f64 + plus.to_kind(Kind::Double))
                        .to_kind(Kind::Float)
                };
                let inner = fma(b, r_b, Tensor::from(c));
                fma(a, r_a, inner).round().clamp(0.0, 255.0) - zero as f64
            }
        };
        let mut lo = lo;
        for &p in self.post {
            match &self.graph.ops[p] {
                Op::Relu { .. } | Op::Relu6 { .. } => lo = lo.max(0.0),
                op => codes = op.eval(&[codes], false),
            }
        }
        codes.clamp(lo, hi) * s_y as f64
    }
}

/// `clamp(round(x/s), lo, hi)·s`: ONNX Runtime's QuantizeLinear (ties to even) and the
/// integer clip after it, in codes around the zero point.
pub(super) fn quantize_codes(x: &Tensor, s: f32, lo: f64, hi: f64) -> Tensor {
    (x / s as f64).round().clamp(lo, hi) * s as f64
}

/// The code range `[lo, hi]` (around the zero point) of a layer's input quantizer: its
/// levels, and ReLU6's 6 rounded as the quantizer rounds `min(x, 6)/s` when `relu6`.
pub fn input_codes(a_bits: u32, signed: bool, scale: f32, relu6: bool) -> (f64, f64) {
    let levels = activation_levels(a_bits, signed) as f64;
    if signed {
        (-levels, levels)
    } else if relu6 {
        (0.0, levels.min((6.0f32 / scale).round_ties_even() as f64))
    } else {
        (0.0, levels)
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
                        crate::quant::layers::initial_threshold(weight, t.dim() != 0)
                    };
                    t * self.gain.abs()
                }
                None => self.weight.abs().amax([1i64, 2, 3].as_slice(), true),
            };
            let levels = weight_levels(w_bits) as f64;
            let for_bias =
                self.bias.abs().view([-1, 1, 1, 1]) * (levels / (s_x as f64 * BIAS_LIMIT));
            base.maximum(&for_bias)
                .clamp_min(crate::quant::layers::MIN_THRESHOLD)
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

/// The 8-bit code range of a value: `[-128, 127]` signed (zero point 128), else `[0, 255]`.
pub(super) fn eight_codes(signed: bool) -> (f64, f64) {
    if signed {
        (-128.0, 127.0)
    } else {
        (0.0, 255.0)
    }
}

/// The zero point of a value held signed (128) or unsigned (0) in a uint8.
pub fn eight_zero(signed: bool) -> u8 {
    if signed {
        128
    } else {
        0
    }
}

/// `clamp(round(x/s), lo, hi)·s`, gradient identity inside the range.
pub(super) fn quantize_eight(x: &Tensor, range: f32, signed: bool) -> Tensor {
    let s = eight_scale(range, signed);
    let (lo, hi) = eight_codes(signed);
    let q = quantize_codes(&x.detach(), s, lo, hi);
    let s = s as f64;
    straight_through(&q, &x.clamp(lo * s, hi * s))
}
