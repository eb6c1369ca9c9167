//! One search step: teacher and student attribution, the loss
//! `CE + aw·L_attr + λ·L_complexity`, and the weight and α updates.

use super::alpha::{complexity_loss, expected_layer_bits, AlphaOpt};
use super::budget::{Geometry, Target};
use super::config::{AttributionMethod, SearchConfig};
use super::{Result, SearchError};
use crate::attribution::{self, capacity_aware_p};
use crate::quant::Network;
use crate::train::Sgd;
use std::collections::HashMap;
use tch::{Kind, Tensor};

/// Teacher and student attribution maps of `x` (student with gradient), and the student's
/// logits.
pub(super) fn attribution_maps(
    teacher: &crate::model::Model,
    sn: &Network,
    method: AttributionMethod,
    x: &Tensor,
    train: bool,
) -> (Tensor, Tensor, Tensor) {
    let a_t = attribution::network_map(&**teacher, x);
    let f_s = sn.net.features(x, train);
    let logits = sn.net.head(&f_s);
    let classes = attribution::top1(&logits);
    // CAM is Grad-CAM only for a GAP → linear head; any other head takes the gradient
    // (without autograd, in evaluation, by a backward pass of its own).
    let a_s = match method {
        AttributionMethod::Cam if sn.net.cam_exact() => {
            attribution::cam(&f_s, sn.net.fc_weight(), &classes)
        }
        _ if !logits.requires_grad() => attribution::network_map(&*sn.net, x),
        _ => attribution::grad_cam(&f_s, &logits, &classes),
    };
    (a_t, a_s, logits)
}

/// What one search step measured.
#[derive(Debug, Clone)]
pub struct StepOutcome {
    pub ce: f64,
    pub attribution_loss: f64,
    pub complexity_loss: f64,
    pub p: f64,
    /// Per-layer `(E[b_w], E[b_a])` before the update.
    pub expected_bits: Vec<(f64, f64)>,
}

/// The complexity term of one search step.
#[derive(Debug, Clone, Copy)]
pub enum ComplexityTerm<'g> {
    /// No complexity term (a shared warm-up).
    Off,
    /// `λ·L_complexity`: the fixed weight, or the dual λ of a budgeted search.
    Weighted(f64),
    /// `μ·(E[cost]/limit − 1)²` ([`BudgetMode::Penalty`]).
    Penalty {
        weight: f64,
        geometry: &'g Geometry,
        target: Target,
    },
}

/// The supernet, its teacher and the two optimizers of one search step.
pub struct SearchStep<'a> {
    pub supernet: &'a Network,
    pub teacher: &'a crate::model::Model,
    pub config: &'a SearchConfig,
    pub weight_opt: &'a mut Sgd,
    pub alpha_opt: &'a mut AlphaOpt,
    /// Per-layer MACs of the quantized layers, in forward order.
    pub macs: &'a [f64],
    /// The supernet's variables by name.
    pub vars: &'a HashMap<String, Tensor>,
    /// Data-parallel: the ranks whose gradients (weights and α) each step averages.
    pub group: Option<&'a crate::dist::Group>,
}

impl SearchStep<'_> {
    /// One step of `L = CE + aw·L_attr + complexity`: forward through teacher and
    /// supernet, backward, and both optimizer updates. `alpha_lr`: `None` while α is
    /// frozen. `epoch` only labels a divergence.
    pub fn run(
        &mut self,
        x: &Tensor,
        y: &Tensor,
        complexity: ComplexityTerm,
        lr: f64,
        alpha_lr: Option<f64>,
        epoch: usize,
    ) -> Result<StepOutcome> {
        let cfg = self.config;
        let (a_t, a_s, logits) =
            attribution_maps(self.teacher, self.supernet, cfg.attribution, x, true);
        let ce = logits.cross_entropy_for_logits(y);
        let bits = expected_layer_bits(self.supernet, self.vars);
        let bits_f: Vec<(f64, f64)> = bits
            .iter()
            .map(|(w, a)| (w.double_value(&[]), a.double_value(&[])))
            .collect();
        // p follows the current α but is not itself optimised (no gradient through p).
        let p = cfg.p.unwrap_or_else(|| capacity_aware_p(&bits_f));
        let l_attr = if cfg.attribution_weight != 0.0 {
            attribution::attribution_loss(&a_t, &a_s, p)
        } else {
            Tensor::zeros([], (Kind::Float, x.device()))
        };
        let l_comp = complexity_loss(&bits, self.macs);
        let mut loss = &ce + &l_attr * cfg.attribution_weight;
        match complexity {
            ComplexityTerm::Off => {}
            ComplexityTerm::Weighted(l) => loss += &l_comp * l,
            ComplexityTerm::Penalty {
                weight,
                geometry,
                target,
            } => {
                let deviation =
                    geometry.measure_tensor(&target, &bits) / geometry.limit(&target) - 1.0;
                loss += deviation.square() * weight;
            }
        }
        let mut loss_v = loss.double_value(&[]);
        let stop = crate::runtime::stop_requested();
        let mut stopping = stop.is_some();
        if let Some(g) = self.group {
            // Every rank sees a NaN, or a stop signal, on any rank, and stops with it.
            let all = g.sum_f64(&[loss_v, stop.map_or(0.0, f64::from)])?;
            loss_v = all[0] / g.world as f64;
            stopping = all[1] != 0.0;
        }
        if stopping {
            return Err(SearchError::Stopped {
                signal: crate::runtime::stop_cause(stop),
                epoch,
            });
        }
        if !loss_v.is_finite() {
            return Err(SearchError::NonFiniteLoss {
                epoch,
                value: loss_v,
            });
        }
        self.weight_opt.zero_grad();
        self.alpha_opt.zero_grad();
        loss.backward();
        if let Some(g) = self.group {
            self.weight_opt.average_grads(g)?;
            self.alpha_opt.average_grads(g)?;
        }
        self.weight_opt.step(lr);
        if let Some(alpha_lr) = alpha_lr {
            self.alpha_opt.step(alpha_lr);
        }
        Ok(StepOutcome {
            ce: ce.double_value(&[]),
            attribution_loss: l_attr.double_value(&[]),
            complexity_loss: l_comp.double_value(&[]),
            p,
            expected_bits: bits_f,
        })
    }
}

/// A 1×1 last feature map (an ImageNet stem at 32 px) makes every attribution map a constant:
/// the attribution term then does nothing, and GMPQ is EdMIPS. Said once, before the search.
pub(super) fn warn_if_point_map(
    teacher: &crate::model::Model,
    model: &crate::model::ModelConfig,
    cfg: &SearchConfig,
    device: tch::Device,
) {
    if cfg.attribution_weight == 0.0 {
        return;
    }
    let s = model.input_size as i64;
    let probe = Tensor::zeros([1, model.in_channels as i64, s, s], (Kind::Float, device));
    let map = tch::no_grad(|| teacher.features(&probe, false)).size();
    if map.get(2..) == Some(&[1, 1][..]) {
        tracing::warn!(
            "the network's last feature map is 1×1 at {s} px: its attribution maps are \
             constant, so the attribution term does nothing (this search is EdMIPS); a larger \
             input, or a stem that downsamples less, keeps the map's extent"
        );
    }
}
