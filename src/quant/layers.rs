//! Quantized conv layers and the factories that put them into a network.
//!
//! Both kinds keep the conv kernel at `NAME.weight`, so full-precision checkpoints load
//! directly, and add their quantizer state beside it: `NAME.weight_threshold` (fixed on the
//! first forward pass; saved), `NAME.act_clip` (learnable `r`), and for the supernet
//! `NAME.alpha_w` / `NAME.alpha_a`. Supernet and fixed-policy nets thus share layer names.

use super::fused::{quantize_activation_mix, quantize_weight_mix};
use super::{ALPHA_INIT, CLIP_INIT};
use crate::model::{fp_conv, ConvLayer, ConvSpec, LayerFactory, ModelError};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// What a quantized layer does with its input while the network is being calibrated.
#[derive(Debug, Clone, PartialEq)]
pub enum Observe {
    /// Normal (quantized) operation.
    Off,
    /// Full-precision forward; track `max(x)` over the batches seen.
    Max,
    /// Full-precision forward; accumulate a histogram of `x > 0` over `[0, max]`.
    Histogram { max: f64, bins: usize },
}

/// Calibration statistics of one layer's input.
#[derive(Debug, Default)]
pub struct Observation {
    pub max: f64,
    pub histogram: Vec<f64>,
}

/// A handle on one quantized layer, kept by the factory so calibration and policy code can
/// reach the layer after the network is built. Its tensors live in the var store under
/// `spec.name` (`.weight`, `.weight_threshold`, `.act_clip`, `.alpha_w`, `.alpha_a`).
#[derive(Debug)]
pub struct QuantLayerHandle {
    pub spec: ConvSpec,
    /// Fixed layers: `(w_bits, a_bits)`.
    pub bits: Option<(u32, u32)>,
    observe: Mutex<Observe>,
    observation: Mutex<Observation>,
}

impl QuantLayerHandle {
    pub fn set_observe(&self, mode: Observe) {
        if let Ok(mut m) = self.observe.lock() {
            *m = mode;
        }
        if let Ok(mut o) = self.observation.lock() {
            o.histogram.clear();
        }
    }

    pub fn take_observation(&self) -> Observation {
        self.observation
            .lock()
            .map(|mut o| std::mem::take(&mut *o))
            .unwrap_or_default()
    }

    /// Records calibration statistics; returns false when not observing.
    fn observe(&self, xs: &Tensor) -> bool {
        let mode = self
            .observe
            .lock()
            .map(|m| m.clone())
            .unwrap_or(Observe::Off);
        let Ok(mut obs) = self.observation.lock() else {
            return false;
        };
        match mode {
            Observe::Off => return false,
            Observe::Max => {
                let m = if self.spec.signed_input {
                    xs.abs().max()
                } else {
                    xs.max()
                }
                .double_value(&[]);
                obs.max = obs.max.max(m);
            }
            Observe::Histogram { max, bins } => {
                if obs.histogram.len() != bins {
                    obs.histogram = vec![0.0; bins];
                }
                if max > 0.0 {
                    // Only positive values: zeros (and clipped negatives) quantize to exactly 0
                    // whatever the clip, so they say nothing about it, and after a ReLU their
                    // spike in bin 0 pulls the KL search toward tiny thresholds (measured: a
                    // 4-bit clip of 0.09 for inputs reaching 7.5). `max` was measured on the
                    // same batches, so nothing lies above it.
                    // A signed input's clip bounds |x|.
                    let x = xs.detach().flatten(0, -1);
                    let x = if self.spec.signed_input { x.abs() } else { x };
                    let x = x.masked_select(&x.gt(0.0));
                    let idx = (x.clamp(0.0, max) * (bins as f64 / max))
                        .floor()
                        .clamp(0.0, (bins - 1) as f64)
                        .to_kind(Kind::Int64);
                    let h = idx
                        .bincount(None::<Tensor>, bins as i64)
                        .to_kind(Kind::Double);
                    let h: Vec<f64> = Vec::try_from(&h).unwrap_or_default();
                    for (a, b) in obs.histogram.iter_mut().zip(h) {
                        *a += b;
                    }
                }
            }
        }
        true
    }
}

/// The softmax temperature T of a supernet's mixtures (`softmax(α/T)`), shared by all its
/// layers and set by the search each step; 1 is the reference's plain softmax.
#[derive(Debug, Clone)]
pub struct Temperature(Arc<AtomicU64>);

impl Default for Temperature {
    fn default() -> Self {
        Self(Arc::new(AtomicU64::new(1f64.to_bits())))
    }
}

impl Temperature {
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
    /// Sets T (clamped to at least 1e-3, where the mixture is one-hot for any α gap).
    pub fn set(&self, t: f64) {
        self.0.store(t.max(1e-3).to_bits(), Ordering::Relaxed);
    }
    /// `softmax(α/T)`; exactly `softmax(α)` at T = 1.
    pub fn softmax(&self, alpha: &Tensor) -> Tensor {
        let t = self.get();
        if t == 1.0 {
            alpha.softmax(0, Kind::Float)
        } else {
            (alpha / t).softmax(0, Kind::Float)
        }
    }
}

/// A quantized layer's own tensors in the var store, beside its kernel (`LAYER.weight`):
/// the one place their names are spelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantizerTensor {
    /// The weight quantizer's threshold `T` (a scalar, or `[C_out,1,1,1]` per channel).
    WeightThreshold,
    /// The activation quantizer's learnable clip `r` (one per candidate in a supernet).
    ActClip,
    /// The supernet's weight-bit architecture parameters α.
    AlphaW,
    /// The supernet's activation-bit architecture parameters α.
    AlphaA,
}

impl QuantizerTensor {
    pub const ALL: [Self; 4] = [
        Self::WeightThreshold,
        Self::ActClip,
        Self::AlphaW,
        Self::AlphaA,
    ];

    /// The name under the layer's path.
    pub fn suffix(self) -> &'static str {
        match self {
            Self::WeightThreshold => "weight_threshold",
            Self::ActClip => "act_clip",
            Self::AlphaW => "alpha_w",
            Self::AlphaA => "alpha_a",
        }
    }

    /// `LAYER.SUFFIX`, its var-store name.
    pub fn of(self, layer: &str) -> String {
        format!("{layer}.{}", self.suffix())
    }

    /// The layer whose tensor of this kind `name` is.
    pub fn layer_of(self, name: &str) -> Option<&str> {
        name.strip_suffix(self.suffix())
            .and_then(|n| n.strip_suffix('.'))
    }

    /// What quantizer tensor `name` is, if any.
    pub fn kind_of(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.layer_of(name).is_some())
    }

    /// Whether `name` is an architecture parameter α.
    pub fn is_alpha(name: &str) -> bool {
        matches!(Self::kind_of(name), Some(Self::AlphaW | Self::AlphaA))
    }
}

/// The smallest weight threshold: keeps the scale of an all-zero kernel (or channel) positive.
pub(crate) const MIN_THRESHOLD: f64 = 1e-12;

/// The weight threshold the first forward pass sets: `max|w|`, per tensor (a scalar) or per
/// output channel (`[C_out,1,1,1]`). An all-zero channel (depthwise layers have them) would
/// give a zero scale and NaNs; any positive threshold quantizes it to zero exactly.
pub(crate) fn initial_threshold(w: &Tensor, per_channel: bool) -> Tensor {
    let w = w.abs();
    if per_channel {
        w.amax([1i64, 2, 3].as_slice(), true)
    } else {
        w.max()
    }
    .clamp_min(MIN_THRESHOLD)
}

/// The tensors a quantized conv computes with (shallow clones of var-store variables).
#[derive(Debug)]
struct QuantCore {
    spec: ConvSpec,
    weight: Tensor,
    weight_threshold: Tensor,
    act_clip: Tensor,
    /// Set once the threshold is known to be positive: checking it reads the tensor (a
    /// device sync), so it is done until it first succeeds, not on every forward pass.
    threshold_ready: Cell<bool>,
}

impl QuantCore {
    fn new(path: &nn::Path, spec: &ConvSpec, clips: i64, per_channel: bool) -> Self {
        let conv = fp_conv(path.clone(), spec);
        let threshold_shape: Vec<i64> = if per_channel {
            vec![spec.out_channels as i64, 1, 1, 1]
        } else {
            vec![]
        };
        let clip_shape: Vec<i64> = if clips == 0 { vec![] } else { vec![clips] };
        QuantCore {
            spec: spec.clone(),
            weight: conv.ws,
            weight_threshold: path
                .zeros_no_train(QuantizerTensor::WeightThreshold.suffix(), &threshold_shape),
            act_clip: path.var(
                QuantizerTensor::ActClip.suffix(),
                &clip_shape,
                nn::Init::Const(CLIP_INIT),
            ),
            threshold_ready: Cell::new(false),
        }
    }

    /// Sets the weight threshold to `max|w|` (per tensor or per output channel) on the first
    /// forward pass; afterwards it stays fixed (and is saved with the checkpoint).
    fn ensure_threshold(&self) {
        if self.threshold_ready.get() {
            return;
        }
        if self.weight_threshold.min().double_value(&[]) > 0.0 {
            self.threshold_ready.set(true);
            return;
        }
        tch::no_grad(|| {
            let t = initial_threshold(&self.weight, self.weight_threshold.dim() != 0);
            let mut dst = self.weight_threshold.shallow_clone();
            dst.copy_(&t);
        });
        self.threshold_ready.set(true);
    }

    /// The input's activation quantizer (half-wave after a ReLU, signed after a linear
    /// bottleneck) over `bits`, mixed by `mix` when there are several.
    fn quantize_input(&self, xs: &Tensor, mix: Option<&Tensor>, bits: &[u32]) -> Tensor {
        quantize_activation_mix(xs, &self.act_clip, mix, bits, self.spec.signed_input)
    }

    fn conv(&self, x: &Tensor, w: &Tensor) -> Tensor {
        let s = self.spec.stride as i64;
        let p = self.spec.padding as i64;
        x.conv2d(
            w,
            None::<Tensor>,
            [s, s],
            [p, p],
            [1, 1],
            self.spec.groups as i64,
        )
    }
}

fn new_handle(spec: &ConvSpec, bits: Option<(u32, u32)>) -> Arc<QuantLayerHandle> {
    Arc::new(QuantLayerHandle {
        spec: spec.clone(),
        bits,
        observe: Mutex::new(Observe::Off),
        observation: Mutex::new(Observation::default()),
    })
}

/// A conv with a fixed `(w_bits, a_bits)`: activation quantizer on its input, weight
/// quantizer on its kernel.
#[derive(Debug)]
struct QuantConv {
    core: QuantCore,
    h: Arc<QuantLayerHandle>,
    w_bits: u32,
    a_bits: u32,
}

impl ConvLayer for QuantConv {
    fn forward_t(&self, xs: &Tensor, _train: bool) -> Tensor {
        let c = &self.core;
        if self.h.observe(xs) {
            return c.conv(xs, &c.weight);
        }
        c.ensure_threshold();
        let xq = c.quantize_input(xs, None, &[self.a_bits]);
        let wq = quantize_weight_mix(&c.weight, &c.weight_threshold, None, &[self.w_bits]);
        c.conv(&xq, &wq)
    }
}

/// The supernet conv: softmax(α)-mixed quantized input and kernel, one convolution.
#[derive(Debug)]
struct MixedConv {
    core: QuantCore,
    h: Arc<QuantLayerHandle>,
    w_bits: Vec<u32>,
    a_bits: Vec<u32>,
    alpha_w: Tensor,
    alpha_a: Tensor,
    temperature: Temperature,
}

impl ConvLayer for MixedConv {
    fn forward_t(&self, xs: &Tensor, _train: bool) -> Tensor {
        let c = &self.core;
        if self.h.observe(xs) {
            return c.conv(xs, &c.weight);
        }
        c.ensure_threshold();
        let pi_a = self.temperature.softmax(&self.alpha_a);
        let pi_w = self.temperature.softmax(&self.alpha_w);
        let x_mix = c.quantize_input(xs, Some(&pi_a), &self.a_bits);
        let w_mix = quantize_weight_mix(&c.weight, &c.weight_threshold, Some(&pi_w), &self.w_bits);
        c.conv(&x_mix, &w_mix)
    }
}

/// Plain FP conv for layers that stay full precision (the stem).
#[derive(Debug)]
struct FpConv(nn::Conv2D);

impl ConvLayer for FpConv {
    fn forward_t(&self, xs: &Tensor, _train: bool) -> Tensor {
        self.0.forward(xs)
    }
}

/// Builds fixed-policy quantized convs from per-layer `(w_bits, a_bits)`.
#[derive(Debug, Default)]
pub struct FixedPolicyConvs {
    bits: HashMap<String, (u32, u32)>,
    per_channel: bool,
    handles: RefCell<Vec<Arc<QuantLayerHandle>>>,
}

impl FixedPolicyConvs {
    pub fn new(bits: HashMap<String, (u32, u32)>, per_channel: bool) -> Self {
        Self {
            bits,
            per_channel,
            handles: RefCell::new(Vec::new()),
        }
    }
    /// The quantized layers built so far, in forward order.
    pub fn handles(&self) -> Vec<Arc<QuantLayerHandle>> {
        self.handles.borrow().clone()
    }
}

impl LayerFactory for FixedPolicyConvs {
    fn conv(&self, path: nn::Path, spec: &ConvSpec) -> Result<Box<dyn ConvLayer>, ModelError> {
        if !spec.quantizable {
            return Ok(Box::new(FpConv(fp_conv(path, spec))));
        }
        let &(w_bits, a_bits) = self
            .bits
            .get(&spec.name)
            .ok_or_else(|| ModelError::NoLayerConfig(spec.name.clone()))?;
        for b in [w_bits, a_bits] {
            if !crate::policy::BIT_RANGE.contains(&b) {
                return Err(ModelError::Invalid(format!(
                    "layer '{}': {b} bits is outside the supported 2..=16",
                    spec.name
                )));
            }
        }
        let core = QuantCore::new(&path, spec, 0, self.per_channel);
        let h = new_handle(spec, Some((w_bits, a_bits)));
        self.handles.borrow_mut().push(h.clone());
        Ok(Box::new(QuantConv {
            core,
            h,
            w_bits,
            a_bits,
        }))
    }
}

/// Builds supernet convs over candidate sets `B_w`, `B_a`.
#[derive(Debug, Default)]
pub struct SupernetConvs {
    w_bits: Vec<u32>,
    a_bits: Vec<u32>,
    handles: RefCell<Vec<Arc<QuantLayerHandle>>>,
    temperature: Temperature,
}

impl SupernetConvs {
    pub fn new(w_bits: Vec<u32>, a_bits: Vec<u32>) -> Result<Self, ModelError> {
        for set in [&w_bits, &a_bits] {
            if set.is_empty() || set.iter().any(|b| !crate::policy::BIT_RANGE.contains(b)) {
                return Err(ModelError::Invalid(format!(
                    "candidate bit set {set:?} must be non-empty, within 2..=16"
                )));
            }
        }
        Ok(Self {
            w_bits,
            a_bits,
            handles: RefCell::new(Vec::new()),
            temperature: Temperature::default(),
        })
    }
    pub fn handles(&self) -> Vec<Arc<QuantLayerHandle>> {
        self.handles.borrow().clone()
    }
    /// The temperature every layer built here mixes with.
    pub fn temperature(&self) -> Temperature {
        self.temperature.clone()
    }
}

impl LayerFactory for SupernetConvs {
    fn conv(&self, path: nn::Path, spec: &ConvSpec) -> Result<Box<dyn ConvLayer>, ModelError> {
        if !spec.quantizable {
            return Ok(Box::new(FpConv(fp_conv(path, spec))));
        }
        let core = QuantCore::new(&path, spec, self.a_bits.len() as i64, false);
        let h = new_handle(spec, None);
        let alpha_w = path.var(
            QuantizerTensor::AlphaW.suffix(),
            &[self.w_bits.len() as i64],
            nn::Init::Const(ALPHA_INIT),
        );
        let alpha_a = path.var(
            QuantizerTensor::AlphaA.suffix(),
            &[self.a_bits.len() as i64],
            nn::Init::Const(ALPHA_INIT),
        );
        self.handles.borrow_mut().push(h.clone());
        Ok(Box::new(MixedConv {
            core,
            h,
            w_bits: self.w_bits.clone(),
            a_bits: self.a_bits.clone(),
            alpha_w,
            alpha_a,
            temperature: self.temperature.clone(),
        }))
    }
}
