//! Building, calibrating and loading networks at any precision: full precision, a fixed
//! policy, or the mixed-precision supernet. The three share layer names, so weights and
//! policies move between them by name.

use super::calibrate::{kl_threshold, CalibrationMethod};
use super::integer::{Executor, LayerVars, Plan, RANGES};
use super::layers::{
    FixedPolicyConvs, Observe, QuantLayerHandle, QuantizerTensor, SupernetConvs, Temperature,
};
use super::QuantError;
use super::CLIP_INIT;
use crate::checkpoint::{self, Checkpoint};
use crate::model::{FullPrecisionConvs, Model, ModelConfig, ModelError};
use crate::policy::{LayerBits, LayerCalibration, Numerics, Policy, PolicyError, Precision};
use std::path::Path;
use std::sync::Arc;
use tch::nn::{self, ModuleT};
use tch::{Device, Tensor};

/// A built network: its variables, the module, and handles on its quantized layers.
pub struct Network {
    pub vs: nn::VarStore,
    pub net: Model,
    pub handles: Vec<Arc<QuantLayerHandle>>,
    pub precision: Precision,
    /// The supernet's softmax temperature (1 and unused for other precisions).
    pub temperature: Temperature,
    /// Integer numerics' executor (fixed policies with [`Numerics::Integer`]).
    pub integer: Option<Executor>,
    /// Each conv layer's kernel and clip, for the integer executor.
    pub layer_vars: std::collections::HashMap<String, LayerVars>,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network")
            .field("model", self.net.config())
            .field("precision", &self.precision)
            .finish()
    }
}

/// Builds `config` at `precision` on `device` (fresh weights).
pub fn build(
    config: &ModelConfig,
    precision: Precision,
    device: Device,
) -> Result<Network, QuantError> {
    let vs = nn::VarStore::new(device);
    let mut temperature = Temperature::default();
    let (net, handles) = match &precision {
        Precision::Full => (
            Model::new(&vs.root(), config, &FullPrecisionConvs)?,
            Vec::new(),
        ),
        Precision::Fixed {
            policy,
            per_channel,
            ..
        } => {
            if policy.model != config.arch.to_string() {
                return Err(PolicyError::WrongModel {
                    policy: policy.model.clone(),
                    model: config.arch.to_string(),
                }
                .into());
            }
            let factory = FixedPolicyConvs::new(policy.bits_by_layer(), *per_channel);
            let net = Model::new(&vs.root(), config, &factory).map_err(|e| match e {
                ModelError::NoLayerConfig(layer) => PolicyError::MissingLayer(layer).into(),
                other => QuantError::from(other),
            })?;
            policy.validate(config, net.convs())?;
            (net, factory.handles())
        }
        Precision::Supernet { candidates } => {
            let factory =
                SupernetConvs::new(candidates.weight.clone(), candidates.activation.clone())?;
            let net = Model::new(&vs.root(), config, &factory)?;
            temperature = factory.temperature();
            (net, factory.handles())
        }
    };
    let mut layer_vars = std::collections::HashMap::new();
    let mut integer = None;
    if let Precision::Fixed {
        policy,
        numerics: Numerics::Integer,
        ..
    } = &precision
    {
        let graph = net.graph();
        let plan = Plan::new(&graph, net.convs(), &policy.bits_by_layer())?;
        let ranges = vs
            .root()
            .zeros_no_train(RANGES, &[graph.ops.len() as i64 + 1]);
        integer = Some(Executor::new(plan, ranges));
        let vars = vs.variables();
        for spec in net.convs() {
            if let Some(weight) = vars.get(&spec.kernel_name()) {
                layer_vars.insert(
                    spec.name.clone(),
                    LayerVars {
                        weight: weight.shallow_clone(),
                        act_clip: vars
                            .get(&QuantizerTensor::ActClip.of(&spec.name))
                            .map(|t| t.shallow_clone()),
                        weight_threshold: vars
                            .get(&QuantizerTensor::WeightThreshold.of(&spec.name))
                            .map(|t| t.shallow_clone()),
                    },
                );
            }
        }
    }
    Ok(Network {
        vs,
        net,
        handles,
        precision,
        temperature,
        integer,
        layer_vars,
    })
}

impl tch::nn::ModuleT for Network {
    /// The network's logits: the integer executor for integer numerics (in training only
    /// once batch norm is frozen), else the model's own forward pass.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        match &self.integer {
            Some(e) if !train || e.training_frozen() => {
                e.forward(&self.net.graph(), self.net.convs(), &self.layer_vars, xs)
            }
            _ => self.net.forward_t(xs, train),
        }
    }
}

impl Network {
    /// Stores every convolution kernel channels-last (NHWC order, NCHW shape) for a network
    /// that only runs forward, such as the search's frozen teacher: oneDNN then convolves
    /// without reordering (training gets the same layout from its optimizer's flat buffers).
    ///
    /// The strides are exactly those of the training optimizer's flat buffer (`[out, kh, kw,
    /// in]` in memory, also for the size-1 dimensions of 1×1 and single-channel kernels):
    /// libtorch picks a convolution's memory format from them, and a loaded network must
    /// compute bit for bit what its training evaluated.
    pub fn use_channels_last_weights(&self) {
        tch::no_grad(|| {
            for (_, mut var) in self.vs.variables() {
                if let &[o, i, h, w] = var.size().as_slice() {
                    let nhwc = Tensor::empty([o, h, w, i], (var.kind(), var.device()))
                        .permute([0, 3, 1, 2]);
                    nhwc.shallow_clone().copy_(&var);
                    var.set_data(&nhwc);
                }
            }
        });
    }

    /// Copies a full-precision state dict into this network's shared variables (conv
    /// kernels, batch norm, head). Quantizer state (thresholds, clips, α) keeps its init.
    pub fn load_fp_weights(&self, ck: &Checkpoint, path: &Path) -> Result<(), QuantError> {
        let quantizer_state = |n: &str| n == RANGES || QuantizerTensor::kind_of(n).is_some();
        checkpoint::load_into_var_store(
            &self.vs,
            ck.model_tensors(),
            path,
            |_| false,
            quantizer_state,
        )?;
        Ok(())
    }

    /// The policy a supernet currently prefers: per layer `argmax α` for weights and
    /// activations separately; ties go to the lowest bitwidth (the first candidate).
    pub fn argmax_policy(&self) -> Result<Policy, QuantError> {
        let Precision::Supernet { candidates } = &self.precision else {
            return Err(QuantError::Invalid(
                "only a supernet has α to take a policy from".into(),
            ));
        };
        let vars = self.vs.variables();
        let argmax = |name: &str, set: &[u32]| -> Result<u32, QuantError> {
            let a = vars
                .get(name)
                .ok_or_else(|| QuantError::Invalid(format!("no variable {name}")))?;
            let v: Vec<f32> = Vec::try_from(&a.detach().to_device(Device::Cpu))
                .map_err(|e: tch::TchError| QuantError::Invalid(e.to_string()))?;
            let mut best = 0;
            for (i, x) in v.iter().enumerate() {
                if *x > v[best] {
                    best = i;
                }
            }
            Ok(set[best])
        };
        let layers = self
            .handles
            .iter()
            .map(|h| {
                Ok(LayerBits {
                    name: h.spec.name.clone(),
                    w_bits: argmax(
                        &QuantizerTensor::AlphaW.of(&h.spec.name),
                        &candidates.weight,
                    )?,
                    a_bits: argmax(
                        &QuantizerTensor::AlphaA.of(&h.spec.name),
                        &candidates.activation,
                    )?,
                })
            })
            .collect::<Result<Vec<_>, QuantError>>()?;
        let config = self.net.config();
        Ok(Policy {
            format: crate::policy::POLICY_FORMAT,
            fp_layers: Vec::new(),
            quantizer: Default::default(),
            model: config.arch.to_string(),
            input_size: config.input_size,
            candidates: candidates.clone(),
            layers,
            totals: None,
            meta: None,
        }
        .with_totals(self.net.convs(), self.net.fc_spec()))
    }

    /// Architecture parameters (α) by name, for the second optimizer.
    pub fn alpha_parameters(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .filter(|(n, _)| QuantizerTensor::is_alpha(n))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Trainable parameters other than α (weights, BN, clips), for the first optimizer.
    pub fn weight_parameters(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .filter(|(n, t)| t.requires_grad() && !QuantizerTensor::is_alpha(n))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// Calibrates a fixed-policy network from full-precision activations on `batches`:
/// weight thresholds = `max|w|`; activation clips by `method` (see [`CalibrationMethod`]).
pub fn calibrate(
    network: &Network,
    batches: &[Tensor],
    method: CalibrationMethod,
) -> Result<Vec<LayerCalibration>, QuantError> {
    if batches.is_empty() {
        return Err(QuantError::Invalid(
            "calibration needs at least one batch".into(),
        ));
    }
    let device = network.vs.device();
    let run = |mode: &dyn Fn(&QuantLayerHandle) -> Observe| {
        for h in &network.handles {
            h.set_observe(mode(h));
        }
        tch::no_grad(|| {
            for b in batches {
                let _ = network.net.forward_t(&b.to_device(device), false);
            }
        });
    };
    run(&|_| Observe::Max);
    let maxima: Vec<f64> = network
        .handles
        .iter()
        .map(|h| h.take_observation().max)
        .collect();
    const BINS: usize = 2048;
    let uses_kl = |h: &QuantLayerHandle| h.bits.is_some_and(|(_, a)| method.uses_kl(a));
    let max_of: std::collections::HashMap<String, f64> = network
        .handles
        .iter()
        .zip(&maxima)
        .map(|(h, &m)| (h.spec.name.clone(), m))
        .collect();
    run(&|h| {
        if uses_kl(h) {
            Observe::Histogram {
                max: max_of[&h.spec.name],
                bins: BINS,
            }
        } else {
            Observe::Off
        }
    });
    let vars = network.vs.variables();
    let mut out = Vec::new();
    for (h, &max) in network.handles.iter().zip(&maxima) {
        let a_bits = h.bits.map_or(0, |b| b.1);
        let (clip, method) = if max <= 0.0 {
            (CLIP_INIT, "init (input never positive)".to_string())
        } else if uses_kl(h) {
            let obs = h.take_observation();
            (
                // Levels on the positive side: all of them, or half for a signed input.
                kl_threshold(
                    &obs.histogram,
                    max,
                    1usize << (a_bits - u32::from(h.spec.signed_input)),
                ),
                "kl".to_string(),
            )
        } else {
            let clip = method.clip_from_max(max);
            let how = if clip < max {
                "max (capped at 6)"
            } else {
                "max"
            };
            (clip, how.to_string())
        };
        h.set_observe(Observe::Off);
        tch::no_grad(|| {
            if let Some(c) = vars.get(&QuantizerTensor::ActClip.of(&h.spec.name)) {
                let _ = c.shallow_clone().fill_(clip);
            }
            if let (Some(t), Some(w)) = (
                vars.get(&QuantizerTensor::WeightThreshold.of(&h.spec.name)),
                vars.get(&h.spec.kernel_name()),
            ) {
                let m = if t.dim() == 0 {
                    w.abs().max()
                } else {
                    w.abs().amax([1i64, 2, 3].as_slice(), true)
                }
                .clamp_min(super::layers::MIN_THRESHOLD);
                t.shallow_clone().copy_(&m);
            }
        });
        out.push(LayerCalibration {
            name: h.spec.name.clone(),
            a_bits,
            max,
            clip,
            method,
        });
    }
    Ok(out)
}

impl Network {
    /// Sets integer numerics' 8-bit ranges from `batches` (normalised images); nothing for
    /// other numerics.
    pub fn calibrate_ranges(&self, batches: &[Tensor]) {
        let Some(e) = &self.integer else {
            return;
        };
        let device = self.vs.device();
        let graph = self.net.graph();
        e.calibrate(&graph, || {
            tch::no_grad(|| {
                for b in batches {
                    let _ = e.forward(
                        &graph,
                        self.net.convs(),
                        &self.layer_vars,
                        &b.to_device(device),
                    );
                }
            })
        });
    }

    /// The precision's numerics (fake quantization for anything but a fixed policy).
    pub fn numerics(&self) -> Numerics {
        match &self.precision {
            Precision::Fixed { numerics, .. } => *numerics,
            _ => Numerics::FakeQuant,
        }
    }
}

/// Loads any gmpq checkpoint (full precision, fixed policy or supernet) onto `device`.
pub fn load(path: &Path, device: Device) -> Result<(Checkpoint, Network), QuantError> {
    let ck = Checkpoint::load(path)?;
    let network = network_of(&ck, path, device)?;
    Ok((ck, network))
}

/// The network of a checkpoint (read from `path`, which errors name), on `device`. Its
/// kernels are laid out channels-last, as training holds them (the optimizer's flat buffer):
/// the loaded network then computes bit for bit what its training evaluated (oneDNN sums a
/// channels-last and an NCHW kernel in different orders), and convolves without reordering.
pub fn network_of(ck: &Checkpoint, path: &Path, device: Device) -> Result<Network, QuantError> {
    let precision = ck.meta.precision.clone().unwrap_or(Precision::Full);
    let network = build(&ck.meta.model, precision, device)?;
    checkpoint::load_into_var_store(&network.vs, ck.model_tensors(), path, |_| false, |_| false)?;
    network.use_channels_last_weights();
    Ok(network)
}
