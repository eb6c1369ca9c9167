//! Quantization: the reference's fake quantizers, fixed-policy and mixed-precision (supernet)
//! conv layers, and calibration.

mod calibrate;
mod layers;
mod network;
mod quantizer;

pub use calibrate::{kl_threshold, CalibrationMethod};
pub use layers::{FixedPolicyConvs, Observe, QuantLayerHandle, SupernetConvs};
pub use network::{build, calibrate, load, LayerCalibration, Network, Precision, QuantError};
pub use quantizer::{
    expected_bits, quantize_activation, quantize_activation_signed, quantize_weight, softmax_mix,
};

/// Initial activation clip `r` (the reference's PACT init).
pub const CLIP_INIT: f64 = 6.0;
/// Initial architecture parameters α.
pub const ALPHA_INIT: f64 = 0.01;
