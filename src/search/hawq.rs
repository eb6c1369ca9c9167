//! The practitioner's baseline (HAWQ-v3 style, as OpenVINO NNCF and Sony MCT ship it):
//! per-layer sensitivities of the full-precision network, minimised under the budget by the
//! same exact knapsack as the GMPQ extraction.
//!
//! - Weights: `½·tr(H_l)/n_l·‖Q_b(W_l) − W_l‖²`, the second-order estimate of the loss
//!   increase when layer l's kernel is quantized to b bits, with the Hessian trace `tr(H_l)`
//!   by Hutchinson's estimator (`E[vᵀHv]`, v Rademacher) through libtorch's double backward.
//! - Activations: the measured loss increase when only layer l's input is quantized to a bits
//!   (every other layer at 16 bits, clips calibrated as `gmpq quantize` does). A trace of the
//!   Hessian with respect to activations would need every activation as a leaf; the direct
//!   measurement is cheaper here (a few forward passes per layer and bitwidth) and exact.
//!
//! A layer's sensitivity at `(w, a)` is the sum of the two; the knapsack maximises its
//! negative under the budget.

use super::budget::{Geometry, Target};
use super::extract::{check_feasible, knapsack_policy, ExtractionError};
pub use super::sensitivity::Sensitivities;
use super::{Result, SearchError};
use crate::checkpoint::Checkpoint;
use crate::model::kernel_name;
use crate::policy::{Candidates, LayerBits, Policy};
use crate::quant::{self, Network, Observe, Precision, QuantLayerHandle};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tch::nn::ModuleT;
use tch::{Kind, Tensor};

/// Hutchinson estimates of `tr(∂²L/∂p²)` for each parameter tensor `p` in `params`, from
/// `samples` Rademacher probes: `E_v[vᵀ(Hv)]`, with `Hv` by double backward. `loss` is
/// evaluated once; its graph must reach every parameter.
pub fn hutchinson_traces(loss: &Tensor, params: &[Tensor], samples: usize) -> Vec<f64> {
    let refs: Vec<&Tensor> = params.iter().collect();
    let grads = Tensor::run_backward(&[loss], &refs, true, true);
    let mut traces = vec![0.0; params.len()];
    for s in 0..samples.max(1) {
        let probes: Vec<Tensor> = params
            .iter()
            .map(|p| p.randint_like(2).to_kind(p.kind()) * 2.0 - 1.0)
            .collect();
        let gv = grads
            .iter()
            .zip(&probes)
            .map(|(g, v)| (g * v).sum(Kind::Float))
            .reduce(|a, b| a + b)
            .unwrap_or_else(|| Tensor::zeros([], (Kind::Float, loss.device())));
        // Keep the gradient graph for the next probe; the last one may free it.
        let keep = s + 1 < samples.max(1);
        let hv = Tensor::run_backward(&[&gv], &refs, keep, false);
        for ((t, h), v) in traces.iter_mut().zip(&hv).zip(&probes) {
            *t += (h * v).sum(Kind::Float).double_value(&[]);
        }
    }
    traces.iter().map(|t| t / samples.max(1) as f64).collect()
}

/// The seed of the sensitivity analysis's random draws (the Hutchinson probes).
pub const HAWQ_SEED: i64 = 0;

/// Settings of the analysis.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HawqConfig {
    pub candidates: Candidates,
    /// Hutchinson probes.
    pub samples: usize,
}

/// `‖Q_b(W) − W‖²` with the weight quantizer's per-tensor threshold `max|W|`.
fn weight_perturbation(w: &Tensor, bits: u32) -> f64 {
    let t = w.abs().max().clamp_min(1e-12);
    let q = quant::quantize_weight(w, &t, bits);
    (q - w).square().sum(Kind::Float).double_value(&[])
}

fn loss_on(net: &Network, batches: &[(Tensor, Tensor)]) -> f64 {
    tch::no_grad(|| {
        batches
            .iter()
            .map(|(x, y)| {
                net.net
                    .forward_t(x, false)
                    .cross_entropy_for_logits(y)
                    .double_value(&[])
            })
            .sum::<f64>()
            / batches.len().max(1) as f64
    })
}

/// The per-layer sensitivities of the FP checkpoint `teacher` on `batches` (images, labels).
pub fn sensitivities(
    teacher_path: &Path,
    teacher: &Checkpoint,
    batches: &[(Tensor, Tensor)],
    cfg: &HawqConfig,
) -> Result<Sensitivities> {
    if batches.is_empty() {
        return Err(SearchError::Invalid(
            "HAWQ needs at least one proxy batch".into(),
        ));
    }
    // The Hutchinson probes (and the networks' throwaway initial weights) come from
    // libtorch's generator: a fixed seed makes the analysis a function of its inputs, so a
    // rerun (or a resumed study) measures the same sensitivities.
    tch::manual_seed(HAWQ_SEED);
    let device = batches[0].0.device();
    let fp = quant::build(&teacher.meta.model, Precision::Full, device)?;
    fp.load_fp_weights(teacher, teacher_path)?;
    let fp_loss = loss_on(&fp, batches);
    let quantized: Vec<String> = fp
        .net
        .convs()
        .iter()
        .filter(|c| c.quantizable)
        .map(|c| c.name.clone())
        .collect();
    let (mean_trace, weight) = weight_sensitivities(&fp, &quantized, batches, cfg)?;
    let probe = ActivationProbe {
        teacher_path,
        teacher,
        quantized: &quantized,
        batches,
        device,
    };
    let activation = probe.sensitivities(cfg, fp_loss)?;
    // A teacher whose loss is not finite measures nothing: stop rather than rank by NaN.
    let finite = |t: &BTreeMap<String, Vec<f64>>| t.values().flatten().all(|v| v.is_finite());
    if !fp_loss.is_finite() || !finite(&weight) || !finite(&activation) {
        return Err(SearchError::Invalid(format!(
            "the sensitivity analysis of {} is not finite (FP loss {fp_loss}): the teacher \
             diverged or does not fit the proxy data",
            teacher_path.display()
        )));
    }
    Ok(Sensitivities {
        mean_trace,
        weight,
        activation,
        fp_loss,
    })
}

/// Per layer: the kernel's mean Hessian trace (averaged over the batches) and, per weight
/// bit candidate, ½·trace·‖Q(w) − w‖².
#[allow(clippy::type_complexity)]
fn weight_sensitivities(
    fp: &quant::Network,
    quantized: &[String],
    batches: &[(Tensor, Tensor)],
    cfg: &HawqConfig,
) -> Result<(BTreeMap<String, f64>, BTreeMap<String, Vec<f64>>)> {
    let vars = fp.vs.variables();
    let kernels: Vec<Tensor> = quantized
        .iter()
        .map(|n| {
            vars.get(&kernel_name(n))
                .map(|t| t.shallow_clone())
                .ok_or_else(|| SearchError::Invalid(format!("no kernel {n}.weight in the teacher")))
        })
        .collect::<Result<_>>()?;
    let mut traces = vec![0.0; kernels.len()];
    for (x, y) in batches {
        let loss = fp.net.forward_t(x, false).cross_entropy_for_logits(y);
        for (t, v) in traces
            .iter_mut()
            .zip(hutchinson_traces(&loss, &kernels, cfg.samples))
        {
            *t += v / batches.len() as f64;
        }
    }
    let mut mean_trace = BTreeMap::new();
    let mut weight = BTreeMap::new();
    for ((name, w), tr) in quantized.iter().zip(&kernels).zip(&traces) {
        // A Hutchinson estimate can come out negative where the loss is not locally convex
        // (or with few probes); the magnitude keeps more perturbation ranked as worse.
        let mean = tr.abs() / w.numel() as f64;
        mean_trace.insert(name.clone(), mean);
        let per_bits = tch::no_grad(|| {
            cfg.candidates
                .weight
                .iter()
                .map(|&b| 0.5 * mean * weight_perturbation(&w.detach(), b))
                .collect()
        });
        weight.insert(name.clone(), per_bits);
    }
    Ok((mean_trace, weight))
}

/// The activation sensitivities: only layer l's input quantized, everything else at 16 bits.
/// One network at 16 bits observes every layer's input once (maximum, then a histogram for
/// the KL clip); each (layer, bits) network copies its weights and takes its clips from there.
struct ActivationProbe<'a> {
    teacher_path: &'a Path,
    teacher: &'a Checkpoint,
    quantized: &'a [String],
    batches: &'a [(Tensor, Tensor)],
    device: tch::Device,
}

/// Per layer: its input's largest value and its histogram (and whether it is signed).
struct Observed {
    maxima: HashMap<String, f64>,
    histograms: HashMap<String, (Vec<f64>, bool)>,
}

impl Observed {
    /// The clip `gmpq quantize` would calibrate: KL below 5 bits, the maximum otherwise.
    fn clip(&self, name: &str, a: u32) -> f64 {
        let max = self.maxima[name];
        if max <= 0.0 {
            return quant::CLIP_INIT;
        }
        let (hist, signed) = &self.histograms[name];
        if a < 5 {
            quant::kl_threshold(hist, max, 1usize << (a - u32::from(*signed)))
        } else {
            max
        }
    }
}

impl ActivationProbe<'_> {
    /// 16-bit weights everywhere, activation bits from `a_of`.
    fn network(&self, a_of: &dyn Fn(&str) -> u32) -> Result<quant::Network> {
        let model = &self.teacher.meta.model;
        let policy = Policy {
            format: crate::policy::POLICY_FORMAT,
            fp_layers: Vec::new(),
            quantizer: Default::default(),
            model: model.arch.to_string(),
            input_size: model.input_size,
            candidates: Candidates {
                weight: vec![16],
                activation: crate::policy::BIT_RANGE.collect(),
            },
            layers: self
                .quantized
                .iter()
                .map(|n| LayerBits {
                    name: n.clone(),
                    w_bits: 16,
                    a_bits: a_of(n),
                })
                .collect(),
            totals: None,
            meta: None,
        };
        let precision = Precision::Fixed {
            policy,
            per_channel: false,
            numerics: crate::quant::Numerics::FakeQuant,
        };
        Ok(quant::build(model, precision, self.device)?)
    }

    /// Every layer's input, observed on the 16-bit network.
    fn observe(&self, base: &quant::Network) -> Observed {
        let observe = |mode: &dyn Fn(&QuantLayerHandle) -> Observe| {
            for h in &base.handles {
                h.set_observe(mode(h));
            }
            tch::no_grad(|| {
                for (x, _) in self.batches {
                    let _ = base.net.forward_t(x, false);
                }
            });
        };
        observe(&|_| Observe::Max);
        let maxima: HashMap<String, f64> = base
            .handles
            .iter()
            .map(|h| (h.spec.name.clone(), h.take_observation().max))
            .collect();
        const BINS: usize = 2048;
        observe(&|h| Observe::Histogram {
            max: maxima[&h.spec.name],
            bins: BINS,
        });
        let histograms = base
            .handles
            .iter()
            .map(|h| {
                h.set_observe(Observe::Off);
                (
                    h.spec.name.clone(),
                    (h.take_observation().histogram, h.spec.signed_input),
                )
            })
            .collect();
        Observed { maxima, histograms }
    }

    /// Per layer and activation bit candidate: the loss increase over the FP loss.
    fn sensitivities(&self, cfg: &HawqConfig, fp_loss: f64) -> Result<BTreeMap<String, Vec<f64>>> {
        let base = self.network(&|_| 16)?;
        base.load_fp_weights(self.teacher, self.teacher_path)?;
        let observed = self.observe(&base);
        let base_vars = base.vs.variables();
        let mut activation = BTreeMap::new();
        for name in self.quantized {
            let mut per_bits = Vec::new();
            for &a in &cfg.candidates.activation {
                let q = self.network(&|n| if n == name { a } else { 16 })?;
                tch::no_grad(|| {
                    for (var_name, var) in q.vs.variables() {
                        let value = match crate::quant::QuantizerTensor::ActClip.layer_of(&var_name)
                        {
                            Some(layer) => Tensor::from(
                                observed.clip(layer, if layer == name { a } else { 16 }) as f32,
                            ),
                            None => base_vars[&var_name].shallow_clone(),
                        };
                        var.shallow_clone().copy_(&value.to_device(var.device()));
                    }
                });
                per_bits.push((loss_on(&q, self.batches) - fp_loss).max(0.0));
            }
            activation.insert(name.clone(), per_bits);
        }
        Ok(activation)
    }
}

/// The policy of least summed sensitivity within `target` (the exact knapsack).
pub fn hawq_policy(
    template: &Policy,
    geometry: &Geometry,
    target: &Target,
    sens: &Sensitivities,
) -> std::result::Result<Policy, ExtractionError> {
    let negated = |v: &[f64]| v.iter().map(|x| -x).collect::<Vec<f64>>();
    // Equal sensitivity: spend more of the budget (a negligible bonus).
    knapsack_policy(template, geometry, target, 1e-12, |layer| {
        let (sw, sa) = sens.layer(&layer.name)?;
        Ok((negated(sw), negated(sa)))
    })
}

/// How the sensitivities are turned into a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SensitivityRule {
    /// The least summed sensitivity under the budget ([`hawq_policy`]).
    Hawq,
    /// The best uniform policy, the rest of the budget spent on the most sensitive layers
    /// ([`super::fill::uniform_fill_policy`]).
    UniformFill,
}

/// What a HAWQ run produced.
pub struct HawqRun {
    pub sensitivities: Sensitivities,
    /// One policy per target, with totals.
    pub policies: Vec<(Target, Policy)>,
    pub seconds: f64,
    pub images: usize,
}

/// The proxy images an analysis measures on: indices into a source.
pub struct ProxyImages<'a> {
    pub source: std::sync::Arc<dyn crate::data::ImageSource>,
    pub indices: &'a [usize],
}

/// Sensitivity analysis of `teacher_path` on the proxy `images` (evaluation preprocessing,
/// batches of 128; skipped when `given`), then one knapsack policy per target under `rule`.
pub fn run(
    teacher_path: &Path,
    images: ProxyImages,
    targets: &[Target],
    cfg: &HawqConfig,
    rule: SensitivityRule,
    given: Option<Sensitivities>,
    device: tch::Device,
) -> Result<HawqRun> {
    let started = std::time::Instant::now();
    let teacher = Checkpoint::load(teacher_path)?;
    let fp = quant::build(&teacher.meta.model, Precision::Full, tch::Device::Cpu)?;
    let geometry = Geometry::new(fp.net.convs(), fp.net.fc_spec());
    for t in targets {
        check_feasible(&geometry, t, &cfg.candidates)?;
        super::warn_if_slack(&geometry, t, &cfg.candidates);
    }
    // Sensitivities an identical analysis already measured (the same run's HAWQ arm) are
    // used as they are.
    let (sensitivities, images) = match given {
        Some(given) => (given, images.indices.len()),
        None => {
            let loader = crate::data::DataLoader::new(
                images.source,
                images.indices,
                std::sync::Arc::new(teacher.meta.eval_pipeline.clone()),
                crate::data::LoaderConfig {
                    batch_size: 128,
                    ..Default::default()
                },
                0,
            )?;
            let mut batches = Vec::new();
            let mut images = 0;
            for b in loader {
                let b = b?;
                images += b.labels.size()[0] as usize;
                batches.push((b.images.to_device(device), b.labels.to_device(device)));
            }
            (
                sensitivities(teacher_path, &teacher, &batches, cfg)?,
                images,
            )
        }
    };
    let mut template = Policy::uniform(&teacher.meta.model, fp.net.convs(), 2, 2);
    template.candidates = cfg.candidates.clone();
    let policies = targets
        .iter()
        .map(|t| {
            match rule {
                SensitivityRule::Hawq => hawq_policy(&template, &geometry, t, &sensitivities),
                SensitivityRule::UniformFill => {
                    super::fill::uniform_fill_policy(&template, &geometry, t, &sensitivities)
                }
            }
            .map(|p| (*t, p.with_totals(fp.net.convs(), fp.net.fc_spec())))
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(HawqRun {
        sensitivities,
        policies,
        seconds: started.elapsed().as_secs_f64(),
        images,
    })
}
