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
//!
//! Files: [`plan`] (the units and how each value is held), [`kernel`] (the integer kernels'
//! arithmetic: folding, scales, codes, the saturation rule), [`executor`] (the plan run in
//! libtorch).

mod executor;
mod kernel;
mod plan;

pub use crate::policy::Numerics;
pub use executor::{Executor, LayerVars};
pub use kernel::{
    batch_norm_affine, bias_integers, eight_scale, eight_zero, fold, input_code_max, input_codes,
    input_scale, kernel_weight_bits, Folded, PAIR_SUM_LIMIT, STEM_BITS,
};
pub use plan::{fold_unit, moves_codes, AddUnit, ConvUnit, Holding, Plan, Step};

/// The name of the var-store tensor holding the 8-bit ranges, indexed by graph value.
pub const RANGES: &str = "integer_ranges";
