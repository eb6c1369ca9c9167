//! Quantization: the reference's fake quantizers, fixed-policy and mixed-precision (supernet)
//! conv layers, and calibration.

mod calibrate;
mod error;
mod fused;
pub mod integer;
mod layers;
mod network;
mod quantizer;

pub use crate::policy::Numerics;
/// The numeric form of a network is plain data recorded in checkpoints: it lives in
/// [`crate::policy`], below both this module and [`crate::checkpoint`].
pub use crate::policy::{LayerCalibration, Precision};
pub use calibrate::{kl_threshold, CalibrationMethod};
pub use error::QuantError;
pub use fused::{
    fused_quantize_activation, fused_quantize_weight, kernels, quantize_activation_mix,
    quantize_activation_mix_with, quantize_weight_mix, quantize_weight_mix_with, set_kernels,
    QuantKernels,
};
pub(crate) use layers::initial_threshold;
pub use layers::{
    FixedPolicyConvs, Observe, QuantLayerHandle, QuantizerTensor, SupernetConvs, Temperature,
};
pub use network::{build, calibrate, load, network_of, Network};
pub use quantizer::{activation_levels, weight_levels, weight_scale};
pub use quantizer::{
    expected_bits, expected_bits_from, quantize_activation, quantize_activation_signed,
    quantize_weight, softmax_mix,
};

/// Initial activation clip `r` (the reference's PACT init).
pub const CLIP_INIT: f64 = 6.0;
/// Initial architecture parameters α.
pub const ALPHA_INIT: f64 = 0.01;
