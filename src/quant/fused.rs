//! The quantizers as the layers call them: one entry point for a single bitwidth and for a
//! softmax(α) mixture of several (the supernet), with two implementations.
//!
//! - [`QuantKernels::Fused`] (the default on the CPU): custom autograd functions in
//!   `csrc/fused_quant.cpp` that make one pass over the tensor forward and one backward,
//!   however many candidates are mixed. Forward values are bit-identical to the reference
//!   composition; gradients use the reference's formulas (ties included) and differ only by
//!   float summation order (tests/fused_quant.rs).
//! - [`QuantKernels::Reference`]: the reference's arithmetic composed from libtorch ops
//!   ([`super::quantizer`]), used on other devices and dtypes, and selectable for comparison.

use super::quantizer::{
    quantize_activation, quantize_activation_signed, quantize_weight, weighted_mix,
};
use std::sync::atomic::{AtomicU8, Ordering};
use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

extern "C" {
    fn gmpq_fused_quantize_activation(
        x: *const C_tensor,
        clips: *const C_tensor,
        mix: *const C_tensor,
        bits: *const i64,
        k: i64,
        is_signed: i32,
    ) -> *mut C_tensor;
    fn gmpq_fused_quantize_weight(
        w: *const C_tensor,
        threshold: *const C_tensor,
        mix: *const C_tensor,
        bits: *const i64,
        k: i64,
    ) -> *mut C_tensor;
    fn gmpq_fused_last_error() -> *const std::os::raw::c_char;
}

/// Which implementation of the quantizers the layers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum QuantKernels {
    /// One-pass CPU kernels (float32 on the CPU; anything else falls back to `Reference`).
    Fused,
    /// libtorch op composition, exactly the reference's autograd graph.
    Reference,
}

static KERNELS: AtomicU8 = AtomicU8::new(0);

/// Chooses the quantizer implementation for the whole process (benchmarks, tests).
pub fn set_kernels(k: QuantKernels) {
    KERNELS.store(
        match k {
            QuantKernels::Fused => 0,
            QuantKernels::Reference => 1,
        },
        Ordering::Relaxed,
    );
}

pub fn kernels() -> QuantKernels {
    match KERNELS.load(Ordering::Relaxed) {
        0 => QuantKernels::Fused,
        _ => QuantKernels::Reference,
    }
}

fn fused_applies(k: QuantKernels, t: &Tensor) -> bool {
    k == QuantKernels::Fused && t.device() == Device::Cpu && t.kind() == Kind::Float
}

fn take_result(ptr: *mut C_tensor, what: &str) -> Result<Tensor, String> {
    if ptr.is_null() {
        // SAFETY: the C++ side returns a pointer to its thread-local, NUL-terminated string.
        let msg = unsafe { std::ffi::CStr::from_ptr(gmpq_fused_last_error()) };
        return Err(format!("{what}: {}", msg.to_string_lossy()));
    }
    // SAFETY: a non-null result is a heap-allocated tensor whose ownership passes to us.
    Ok(unsafe { Tensor::from_ptr(ptr) })
}

/// Warns once per process that the fused kernels failed and the reference composition is
/// used instead (it computes the same values, only slower).
fn fall_back(e: &str) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| tracing::warn!("{e}; using the reference quantizers"));
}

fn bits_i64(bits: &[u32]) -> Vec<i64> {
    bits.iter().map(|&b| b as i64).collect()
}

/// Activation quantizer over `bits` candidates: `clips` holds one clip per candidate (a
/// scalar for one), `mix` the softmax weights (`None`: exactly one candidate, no mixture).
/// `signed`: the symmetric quantizer for inputs after a linear layer.
pub fn quantize_activation_mix(
    x: &Tensor,
    clips: &Tensor,
    mix: Option<&Tensor>,
    bits: &[u32],
    signed: bool,
) -> Tensor {
    quantize_activation_mix_with(kernels(), x, clips, mix, bits, signed)
}

/// [`quantize_activation_mix`] with an explicit implementation.
pub fn quantize_activation_mix_with(
    k: QuantKernels,
    x: &Tensor,
    clips: &Tensor,
    mix: Option<&Tensor>,
    bits: &[u32],
    signed: bool,
) -> Tensor {
    if fused_applies(k, x) {
        match fused_quantize_activation(x, clips, mix, bits, signed) {
            Ok(t) => return t,
            Err(e) => fall_back(&e),
        }
    }
    let one = |clip: &Tensor, b: u32| {
        if signed {
            quantize_activation_signed(x, clip, b)
        } else {
            quantize_activation(x, clip, b)
        }
    };
    match mix {
        None => one(clips, bits[0]),
        Some(m) => weighted_mix(
            m,
            bits.iter()
                .enumerate()
                .map(|(i, &b)| one(&clips.get(i as i64), b)),
        ),
    }
}

/// Weight quantizer over `bits` candidates with a fixed `threshold` (scalar, or
/// `[C_out,1,1,1]` per channel) and optional softmax weights `mix`.
pub fn quantize_weight_mix(
    w: &Tensor,
    threshold: &Tensor,
    mix: Option<&Tensor>,
    bits: &[u32],
) -> Tensor {
    quantize_weight_mix_with(kernels(), w, threshold, mix, bits)
}

/// [`quantize_weight_mix`] with an explicit implementation.
pub fn quantize_weight_mix_with(
    k: QuantKernels,
    w: &Tensor,
    threshold: &Tensor,
    mix: Option<&Tensor>,
    bits: &[u32],
) -> Tensor {
    if fused_applies(k, w) {
        match fused_quantize_weight(w, threshold, mix, bits) {
            Ok(t) => return t,
            Err(e) => fall_back(&e),
        }
    }
    match mix {
        None => quantize_weight(w, threshold, bits[0]),
        Some(m) => weighted_mix(m, bits.iter().map(|&b| quantize_weight(w, threshold, b))),
    }
}

/// The fused activation quantizer alone (float32 CPU tensors), its error instead of a
/// fallback.
pub fn fused_quantize_activation(
    x: &Tensor,
    clips: &Tensor,
    mix: Option<&Tensor>,
    bits: &[u32],
    signed: bool,
) -> Result<Tensor, String> {
    let b = bits_i64(bits);
    // SAFETY: all pointers are live tch tensors / a slice of `b.len()` values for the call.
    let ptr = unsafe {
        gmpq_fused_quantize_activation(
            x.as_ptr(),
            clips.as_ptr(),
            mix.map_or(std::ptr::null(), |m| m.as_ptr()),
            b.as_ptr(),
            b.len() as i64,
            signed as i32,
        )
    };
    take_result(ptr, "fused activation quantizer")
}

/// The fused weight quantizer alone (float32 CPU tensors), its error instead of a fallback.
pub fn fused_quantize_weight(
    w: &Tensor,
    threshold: &Tensor,
    mix: Option<&Tensor>,
    bits: &[u32],
) -> Result<Tensor, String> {
    let b = bits_i64(bits);
    // SAFETY: as in `fused_quantize_activation`.
    let ptr = unsafe {
        gmpq_fused_quantize_weight(
            w.as_ptr(),
            threshold.as_ptr(),
            mix.map_or(std::ptr::null(), |m| m.as_ptr()),
            b.as_ptr(),
            b.len() as i64,
        )
    };
    take_result(ptr, "fused weight quantizer")
}
