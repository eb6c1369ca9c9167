//! SGD with momentum and weight decay (PyTorch's formulation), with its momentum buffers
//! exposed by parameter name so they are saved in checkpoints and restored on `--resume`.

use std::collections::BTreeMap;
use tch::Tensor;

#[derive(Debug)]
pub struct Sgd {
    pub momentum: f64,
    pub weight_decay: f64,
    params: Vec<(String, Tensor)>,
    buffers: BTreeMap<String, Tensor>,
}

impl Sgd {
    /// `params`: the trainable tensors, by name.
    pub fn new(params: Vec<(String, Tensor)>, momentum: f64, weight_decay: f64) -> Self {
        Self {
            momentum,
            weight_decay,
            params,
            buffers: BTreeMap::new(),
        }
    }

    /// The trainable variables of a var store, sorted by name.
    pub fn trainable(vs: &tch::nn::VarStore) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub fn zero_grad(&mut self) {
        for (_, p) in &mut self.params {
            p.zero_grad();
        }
    }

    /// `buf = m·buf + (g + wd·p)`; `p -= lr·buf` (the first step sets `buf = g + wd·p`).
    pub fn step(&mut self, lr: f64) {
        tch::no_grad(|| {
            for (name, p) in &mut self.params {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let d_p = if self.weight_decay != 0.0 {
                    &g + &*p * self.weight_decay
                } else {
                    g
                };
                let update = if self.momentum != 0.0 {
                    match self.buffers.get_mut(name) {
                        Some(buf) => {
                            let _ = buf.g_mul_scalar_(self.momentum).g_add_(&d_p);
                            buf.shallow_clone()
                        }
                        None => {
                            let buf = d_p.detach().copy();
                            self.buffers.insert(name.clone(), buf.shallow_clone());
                            buf
                        }
                    }
                } else {
                    d_p
                };
                let _ = p.g_sub_(&(update * lr));
            }
        })
    }

    /// Momentum buffers by parameter name (for checkpoints).
    pub fn state(&self) -> &BTreeMap<String, Tensor> {
        &self.buffers
    }

    /// Restores momentum buffers saved by [`Sgd::state`]; unknown names are ignored.
    pub fn load_state(&mut self, buffers: BTreeMap<String, Tensor>) {
        let device = self.params.first().map(|(_, p)| p.device());
        for (name, buf) in buffers {
            if let Some((_, p)) = self.params.iter().find(|(n, _)| *n == name) {
                if p.size() == buf.size() {
                    self.buffers
                        .insert(name, buf.to_device(device.unwrap_or(tch::Device::Cpu)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_pytorch_sgd_formula() {
        // One parameter, loss = sum(p * c): grad = c. Two steps by hand:
        // buf1 = c + wd·p0; p1 = p0 − lr·buf1; buf2 = m·buf1 + c + wd·p1; p2 = p1 − lr·buf2.
        let p = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let c = Tensor::from_slice(&[0.5f32, 0.25]);
        let mut opt = Sgd::new(vec![("p".into(), p.shallow_clone())], 0.9, 0.1);
        let (lr, m, wd) = (0.1, 0.9, 0.1);
        let mut expect = [1.0f64, -2.0];
        let mut buf = [0.0f64; 2];
        for step in 0..2 {
            opt.zero_grad();
            (&p * &c).sum(tch::Kind::Float).backward();
            opt.step(lr);
            for i in 0..2 {
                let g = [0.5, 0.25][i] + wd * expect[i];
                buf[i] = if step == 0 { g } else { m * buf[i] + g };
                expect[i] -= lr * buf[i];
            }
        }
        let got: Vec<f32> = Vec::try_from(&p).unwrap();
        for i in 0..2 {
            assert!(
                (got[i] as f64 - expect[i]).abs() < 1e-6,
                "{got:?} vs {expect:?}"
            );
        }
        assert!(opt.state().contains_key("p"));
    }
}
