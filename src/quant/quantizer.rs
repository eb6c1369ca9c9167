//! The reference's fake quantizers, with straight-through estimators.
//!
//! Forward values are exactly the quantized values (`q.detach() + (x − x.detach())` adds an
//! exact zero), and the gradient is the STE's: identity for weights, `∂x_c/∂x`, `∂x_c/∂r` for
//! activations. Scales are computed with the same operations and precision as the PyTorch
//! reference so the goldens match to float precision.

use tch::{Kind, Tensor};

/// Straight-through: the value of `q`, the gradient of `through`.
pub(crate) fn straight_through(q: &Tensor, through: &Tensor) -> Tensor {
    q.detach() + (through - through.detach())
}

/// Symmetric uniform weight quantizer: `s = T/(2^(b−1)−1)`, `q = round(clamp(w,−T,T)/s)·s`
/// (round half to even). `threshold` is a scalar (per-tensor) or shaped `[C_out,1,1,1]`
/// (per-channel). Gradient to `w`: identity.
pub fn quantize_weight(w: &Tensor, threshold: &Tensor, bits: u32) -> Tensor {
    let t = threshold.detach();
    let s = weight_scale(&t, bits);
    let neg = -&t;
    let q = (w.clamp_tensor(Some(&neg), Some(&t)) / &s).round() * &s;
    straight_through(&q, w)
}

/// The weight quantizer's scale `T/(2^(b−1)−1)`, in the threshold's precision.
pub fn weight_scale(threshold: &Tensor, bits: u32) -> Tensor {
    threshold / weight_levels(bits) as f64
}

/// Levels on each side of the symmetric weight quantizer: `2^(b−1) − 1`.
pub fn weight_levels(bits: u32) -> i64 {
    (1i64 << (bits - 1)) - 1
}

/// Levels on the positive side of an activation quantizer: `2^b − 1` (half-wave), or
/// `2^(b−1) − 1` (signed).
pub fn activation_levels(bits: u32, signed: bool) -> i64 {
    if signed {
        weight_levels(bits)
    } else {
        (1i64 << bits) - 1
    }
}

/// Half-wave (unsigned) activation quantizer with learnable clip `r`:
/// `x_c = 0.5·(|x| − |x − r| + r)`, `s = r/(2^b − 1)` taken as a constant,
/// `q = round(x_c/s)·s`, STE from `q` to `x_c`.
pub fn quantize_activation(x: &Tensor, clip: &Tensor, bits: u32) -> Tensor {
    // The reference reads r with `.item()`: no gradient flows through the scale.
    let r = clip.double_value(&[]);
    let clipped = (x.abs() - (x - clip).abs() + clip) * 0.5;
    let s = r / activation_levels(bits, false) as f64;
    let q = (&clipped / s).round() * s;
    straight_through(&q, &clipped)
}

/// Signed activation quantizer for inputs that follow a linear layer (MobileNet's
/// bottlenecks), the symmetric counterpart of [`quantize_activation`]:
/// `x_c = 0.5·(|x + r| − |x − r|)` (= clamp(x, −r, r), with the PACT gradient to `r`),
/// `s = r/(2^(b−1) − 1)`, `q = round(x_c/s)·s`, STE from `q` to `x_c`.
pub fn quantize_activation_signed(x: &Tensor, clip: &Tensor, bits: u32) -> Tensor {
    let r = clip.double_value(&[]);
    let clipped = ((x + clip).abs() - (x - clip).abs()) * 0.5;
    let s = r / activation_levels(bits, true) as f64;
    let q = (&clipped / s).round() * s;
    straight_through(&q, &clipped)
}

/// `Σ_i softmax(α)_i · f_i`, summed in branch order as the reference does.
pub fn softmax_mix(alpha: &Tensor, branches: impl IntoIterator<Item = Tensor>) -> Tensor {
    weighted_mix(&alpha.softmax(0, Kind::Float), branches)
}

/// `Σ_i weights_i · f_i` in branch order (zero for no branches).
pub fn weighted_mix(weights: &Tensor, branches: impl IntoIterator<Item = Tensor>) -> Tensor {
    let mut acc: Option<Tensor> = None;
    for (i, b) in branches.into_iter().enumerate() {
        let term = b * weights.get(i as i64);
        acc = Some(match acc {
            None => term,
            Some(a) => a + term,
        });
    }
    acc.unwrap_or_else(|| Tensor::zeros([], (Kind::Float, weights.device())))
}

/// `E[b] = Σ softmax(α)_i · b_i`.
pub fn expected_bits(alpha: &Tensor, bits: &[u32]) -> Tensor {
    expected_bits_from(&alpha.softmax(0, Kind::Float), bits)
}

/// `E[b] = Σ π_i · b_i` for mixture weights `π` (e.g. a tempered softmax).
pub fn expected_bits_from(pi: &Tensor, bits: &[u32]) -> Tensor {
    let b: Vec<f32> = bits.iter().map(|&b| b as f32).collect();
    (pi * Tensor::from_slice(&b).to_device(pi.device())).sum(Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_activation_levels_and_clip() {
        let x = Tensor::from_slice(&[-7.0f32, -1.1, -0.2, 0.0, 0.74, 2.9, 9.0]);
        let r = Tensor::from_slice(&[3.0f32]).squeeze();
        // 3 bits signed: s = 3/3 = 1, levels −3..3.
        let q = quantize_activation_signed(&x, &r, 3);
        let v: Vec<f32> = Vec::try_from(&q).unwrap();
        assert_eq!(v, vec![-3.0, -1.0, -0.0, 0.0, 1.0, 3.0, 3.0]);
    }
}
