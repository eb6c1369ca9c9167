//! Attribution maps and the generalisation loss of GMPQ.
//!
//! `A = ReLU(Σ_k g_k·F_k)` on the last feature map `F` for the model's own top-1 class `c`,
//! with `g_k = Σ_{h,w} ∂y_c/∂F_k(h,w)` (Grad-CAM). With a GAP → linear head this is exactly
//! CAM, `g_k = W_fc[c,k]`, which needs no extra backward pass; the general path takes the
//! gradient with `create_graph` so the loss stays differentiable.

use tch::{Kind, Tensor};

/// Per-sample top-1 classes of `logits` (`[N]`, no gradient).
pub fn top1(logits: &Tensor) -> Tensor {
    logits.detach().argmax(1, false)
}

/// CAM: `ReLU(Σ_k W_fc[c_n,k]·F_nk)` for features `[N,C,H,W]`, head weight `[K,C]`,
/// classes `[N]` → maps `[N,H,W]`.
pub fn cam(features: &Tensor, fc_weight: &Tensor, classes: &Tensor) -> Tensor {
    let g = fc_weight.index_select(0, classes); // [N, C]
    Tensor::einsum("nc,nchw->nhw", &[&g, features], None::<&[i64]>).relu()
}

/// General Grad-CAM: `g_k = Σ_{h,w} ∂y_c/∂F_k(h,w)` by autograd with `create_graph`, so the
/// map stays differentiable (double backward). `logits` must depend on `features`.
pub fn grad_cam(features: &Tensor, logits: &Tensor, classes: &Tensor) -> Tensor {
    grad_cam_of(features, logits, classes, true)
}

/// Grad-CAM's map; `create_graph`: keep the gradient's own graph (a loss on the map).
fn grad_cam_of(features: &Tensor, logits: &Tensor, classes: &Tensor, create_graph: bool) -> Tensor {
    let y = logits
        .gather(1, &classes.unsqueeze(1), false)
        .sum(Kind::Float);
    let grads = Tensor::run_backward(&[&y], &[features], create_graph, create_graph);
    let g = grads[0].sum_dim_intlist([2i64, 3].as_slice(), false, Kind::Float); // [N, C]
    Tensor::einsum("nc,nchw->nhw", &[&g, features], None::<&[i64]>).relu()
}

/// The map of `net` for its own top-1 classes, with no gradient kept (a teacher's, a
/// report's): CAM where the head makes it exact, else Grad-CAM by one backward pass.
pub fn network_map(net: &dyn crate::model::Network, x: &Tensor) -> Tensor {
    if net.cam_exact() {
        return tch::no_grad(|| {
            let f = net.features(x, false);
            cam(&f, net.fc_weight(), &top1(&net.head(&f)))
        });
    }
    let f = tch::no_grad(|| net.features(x, false))
        .detach()
        .set_requires_grad(true);
    // The gradient needs autograd on, also where the caller turned it off (evaluation).
    tch::with_grad(|| {
        let logits = net.head(&f);
        grad_cam_of(&f, &logits, &top1(&logits), false)
    })
    .detach()
}

/// Flattens each sample's map and divides it by its L2 norm (clamped at 1e-12, as PyTorch's
/// `F.normalize`).
pub fn normalize(maps: &Tensor) -> Tensor {
    let flat = maps.flatten(1, -1);
    let norm = flat
        .norm_scalaropt_dim(2.0, [1i64].as_slice(), true)
        .clamp_min(1e-12);
    flat / norm
}

/// `mean_{n,pixels} (normalize(A_T^p) − normalize(A_S))²`; the teacher side carries no
/// gradient.
pub fn attribution_loss(teacher: &Tensor, student: &Tensor, p: f64) -> Tensor {
    let t = normalize(&teacher.detach().pow_tensor_scalar(p));
    let s = normalize(student);
    (t - s).square().mean(Kind::Float)
}

/// The reference's capacity-aware exponent `p = 24 · mean_l 1/(E[b_w]_l·E[b_a]_l)`
/// (w4a4 → 1.5, w2a2 → 6), from per-layer expected bits.
pub fn capacity_aware_p(expected: &[(f64, f64)]) -> f64 {
    if expected.is_empty() {
        return 1.0;
    }
    24.0 * expected.iter().map(|(w, a)| 1.0 / (w * a)).sum::<f64>() / expected.len() as f64
}

/// Ranks along the last dimension (0-based; ties broken by position).
fn ranks(x: &Tensor) -> Tensor {
    x.argsort(-1, false).argsort(-1, false).to_kind(Kind::Float)
}

/// Mean over samples of the Spearman rank correlation between two sets of maps `[N,H,W]`.
pub fn spearman(a: &Tensor, b: &Tensor) -> f64 {
    let ra = ranks(&a.detach().flatten(1, -1));
    let rb = ranks(&b.detach().flatten(1, -1));
    let ca = &ra - ra.mean_dim([1i64].as_slice(), true, Kind::Float);
    let cb = &rb - rb.mean_dim([1i64].as_slice(), true, Kind::Float);
    let num = (&ca * &cb).sum_dim_intlist([1i64].as_slice(), false, Kind::Float);
    let den = (ca
        .square()
        .sum_dim_intlist([1i64].as_slice(), false, Kind::Float)
        * cb.square()
            .sum_dim_intlist([1i64].as_slice(), false, Kind::Float))
    .sqrt()
    .clamp_min(1e-12);
    (num / den).mean(Kind::Float).double_value(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_worked_loss_and_p() {
        // Teacher [1, 2, 0, 2] with p = 2 → [1, 4, 0, 4] / √33; student [3, 0, 0, 4] / 5.
        let t = Tensor::from_slice(&[1.0f32, 2.0, 0.0, 2.0]).view([1, 2, 2]);
        let s = Tensor::from_slice(&[3.0f32, 0.0, 0.0, 4.0]).view([1, 2, 2]);
        let l = attribution_loss(&t, &s, 2.0).double_value(&[]);
        let r33 = 33f64.sqrt();
        let want = [(1.0 / r33 - 0.6), (4.0 / r33), 0.0, (4.0 / r33 - 0.8)]
            .iter()
            .map(|d| d * d)
            .sum::<f64>()
            / 4.0;
        assert!((l - want).abs() < 1e-6, "{l} vs {want}");
        assert!((capacity_aware_p(&[(4.0, 4.0)]) - 1.5).abs() < 1e-12);
        assert!((capacity_aware_p(&[(2.0, 2.0)]) - 6.0).abs() < 1e-12);
        assert!((capacity_aware_p(&[(2.0, 2.0), (4.0, 4.0)]) - 3.75).abs() < 1e-12);
    }

    #[test]
    fn spearman_of_monotone_maps_is_one() {
        let a = Tensor::from_slice(&[1.0f32, 5.0, 2.0, 9.0]).view([1, 2, 2]);
        let b = a.pow_tensor_scalar(3.0) + 1.0;
        assert!((spearman(&a, &b) - 1.0).abs() < 1e-6);
        assert!((spearman(&a, &(-&a)) + 1.0).abs() < 1e-6);
    }
}
