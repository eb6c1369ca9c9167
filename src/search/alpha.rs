//! The architecture parameters α: their optimizer, the expected bits and complexity term they
//! define, the preferences they express, and the fixed-policy network a chosen policy takes
//! from the supernet.

use super::budget::Preferences;
use super::config::{AlphaOptimizer, SearchConfig};
use super::{Result, SearchError};
use crate::policy::Policy;
use crate::quant::{self, expected_bits_from, Network, Precision, QuantizerTensor};
use crate::train::{Adam, Sgd};
use std::collections::{BTreeMap, HashMap};
use tch::{Device, Kind, Tensor};

/// The α optimizer a search runs with.
pub enum AlphaOpt {
    Sgd(Sgd),
    Adam(Adam),
}

impl AlphaOpt {
    pub fn new(cfg: &SearchConfig, alphas: Vec<(String, Tensor)>) -> Self {
        match cfg.alpha_optimizer {
            AlphaOptimizer::Sgd => {
                Self::Sgd(Sgd::new(alphas, cfg.momentum, cfg.alpha_weight_decay))
            }
            AlphaOptimizer::Adam => {
                Self::Adam(Adam::new(alphas, 0.5, 0.999, cfg.alpha_weight_decay))
            }
        }
    }
    pub fn zero_grad(&mut self) {
        match self {
            Self::Sgd(o) => o.zero_grad(),
            Self::Adam(o) => o.zero_grad(),
        }
    }
    /// Averages the α gradients over the ranks of `group`.
    pub fn average_grads(
        &mut self,
        group: &crate::dist::Group,
    ) -> std::result::Result<(), crate::dist::DistError> {
        match self {
            Self::Sgd(o) => o.average_grads(group),
            Self::Adam(o) => o.average_grads(group),
        }
    }

    pub fn step(&mut self, lr: f64) {
        match self {
            Self::Sgd(o) => o.step(lr),
            Self::Adam(o) => o.step(lr),
        }
    }
    pub fn state(&self) -> BTreeMap<String, Tensor> {
        match self {
            Self::Sgd(o) => o.state(),
            Self::Adam(o) => o.state(),
        }
    }
    pub fn load_state(&mut self, state: BTreeMap<String, Tensor>) {
        match self {
            Self::Sgd(o) => o.load_state(state),
            Self::Adam(o) => o.load_state(state),
        }
    }
}

/// `L_complexity = Σ_l MACs_l·E[b_a]_l·E[b_w]_l / MACs_0`, `MACs_0` the first quantized
/// layer's MACs.
pub fn complexity_loss(bits: &[(Tensor, Tensor)], macs: &[f64]) -> Tensor {
    let macs0 = macs.first().copied().unwrap_or(1.0);
    bits.iter()
        .zip(macs)
        .map(|((w, a), m)| w * a * (m / macs0))
        .reduce(|x, y| x + y)
        .unwrap_or_else(|| Tensor::zeros([], (Kind::Float, Device::Cpu)))
}

/// Per-layer `(E[b_w], E[b_a])` tensors of a supernet, in forward order.
pub fn expected_layer_bits(net: &Network, vars: &HashMap<String, Tensor>) -> Vec<(Tensor, Tensor)> {
    let Precision::Supernet { candidates } = &net.precision else {
        return Vec::new();
    };
    net.handles
        .iter()
        .map(|h| {
            let n = &h.spec.name;
            let t = &net.temperature;
            (
                expected_bits_from(
                    &t.softmax(&vars[&QuantizerTensor::AlphaW.of(n)]),
                    &candidates.weight,
                ),
                expected_bits_from(
                    &t.softmax(&vars[&QuantizerTensor::AlphaA.of(n)]),
                    &candidates.activation,
                ),
            )
        })
        .collect()
}

fn alpha_table(net: &Network, alpha: QuantizerTensor) -> BTreeMap<String, Vec<f64>> {
    let vars = net.vs.variables();
    net.handles
        .iter()
        .filter_map(|h| {
            let t = vars.get(&alpha.of(&h.spec.name))?;
            let v: Vec<f32> = Vec::try_from(&t.detach().to_device(Device::Cpu)).ok()?;
            Some((h.spec.name.clone(), v.into_iter().map(f64::from).collect()))
        })
        .collect()
}

/// The supernet's current α as repair preferences.
pub fn preferences(net: &Network) -> Preferences {
    Preferences {
        alpha_w: alpha_table(net, QuantizerTensor::AlphaW),
        alpha_a: alpha_table(net, QuantizerTensor::AlphaA),
        temperature: net.temperature.get(),
        bits: match &net.precision {
            Precision::Supernet { candidates } => Some(candidates.clone()),
            _ => None,
        },
    }
}

/// A fixed-policy network carrying the supernet's weights, batch norm and thresholds, and
/// the clip of each layer's chosen activation branch.
pub fn fixed_from_supernet(sn: &Network, policy: &Policy) -> Result<Network> {
    let Precision::Supernet { candidates } = &sn.precision else {
        return Err(SearchError::Invalid("not a supernet".into()));
    };
    let fixed = quant::build(
        sn.net.config(),
        Precision::Fixed {
            policy: policy.clone(),
            per_channel: false,
            numerics: crate::quant::Numerics::FakeQuant,
        },
        sn.vs.device(),
    )?;
    let src = sn.vs.variables();
    let bits = policy.bits_by_layer();
    tch::no_grad(|| {
        for (name, var) in fixed.vs.variables() {
            let value = match QuantizerTensor::ActClip.layer_of(&name) {
                Some(layer) => {
                    let a = bits.get(layer).map_or(0, |b| b.1);
                    let i = candidates
                        .activation
                        .iter()
                        .position(|&b| b == a)
                        .unwrap_or(0);
                    src[&name].get(i as i64)
                }
                None => src[&name].shallow_clone(),
            };
            var.shallow_clone().copy_(&value);
        }
    });
    Ok(fixed)
}
