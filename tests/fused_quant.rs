//! The fused CPU quantizers against the reference composition: forward values bit-identical,
//! gradients equal up to float summation order, ties (x = 0, x = r, half-way values) pinned,
//! memory layouts kept, and a whole supernet step that agrees.

use gmpq::model::{Arch, ModelConfig};
use gmpq::policy::Candidates;
use gmpq::quant::{
    self, fused_quantize_activation, fused_quantize_weight, quantize_activation_mix_with,
    quantize_weight_mix_with, Precision, QuantKernels,
};
use tch::nn::ModuleT;
use tch::{Kind, Tensor};

fn values(t: &Tensor) -> Vec<f32> {
    Vec::try_from(&t.detach().flatten(0, -1).to_kind(Kind::Float)).unwrap()
}

fn assert_bit_equal(a: &Tensor, b: &Tensor, what: &str) {
    let (a, b) = (values(a), values(b));
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        // -0.0 and 0.0 are the same quantized value.
        assert!(x == y, "{what}[{i}]: {x} vs {y}");
    }
}

fn assert_close(a: &Tensor, b: &Tensor, rel: f64, what: &str) {
    let (a, b) = (values(a), values(b));
    assert_eq!(a.len(), b.len(), "{what}");
    let scale = b.iter().fold(1e-3f64, |m, v| m.max(v.abs() as f64));
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            ((x - y) as f64).abs() <= rel * scale,
            "{what}[{i}]: {x} vs {y}"
        );
    }
}

/// Activations with everything a quantizer meets: negatives, exact zeros (ReLU), values above
/// every clip, values exactly at a clip, and exact half-way points of a 2-bit grid.
fn activations(shape: &[i64], clip: f32) -> Tensor {
    tch::manual_seed(7);
    let x = Tensor::randn(shape, tch::kind::FLOAT_CPU) * 2.0;
    let flat = x.view([-1]);
    let n = flat.size()[0];
    let specials = [
        0.0f32,
        clip,
        -clip,
        clip * 0.5,
        clip / 6.0,
        0.5 * clip / 3.0,
        9.0,
    ];
    for (i, v) in specials.iter().enumerate() {
        let _ = flat.get((i as i64 * 37) % n).fill_(*v as f64);
    }
    x
}

/// The same values, stored NHWC (channels-last strides).
fn channels_last(t: &Tensor) -> Tensor {
    t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

/// A fixed, sign-changing upstream gradient shaped like `out` (no RNG: tests in this binary
/// run concurrently and share libtorch's global generator).
fn upstream(out: &Tensor) -> Tensor {
    let n = out.numel() as i64;
    (Tensor::arange(n, tch::kind::FLOAT_CPU) * 0.37)
        .sin()
        .view(out.size().as_slice())
}

struct Grads {
    out: Tensor,
    x: Tensor,
    clips: Tensor,
    alpha: Option<Tensor>,
}

fn run_activation(
    k: QuantKernels,
    x0: &Tensor,
    clips0: &[f32],
    alpha0: Option<&[f32]>,
    bits: &[u32],
    signed: bool,
) -> Grads {
    let x = x0.copy().set_requires_grad(true);
    let clips = if clips0.len() == 1 && alpha0.is_none() {
        Tensor::from(clips0[0]).set_requires_grad(true)
    } else {
        Tensor::from_slice(clips0).set_requires_grad(true)
    };
    let alpha = alpha0.map(|a| Tensor::from_slice(a).set_requires_grad(true));
    let pi = alpha.as_ref().map(|a| a.softmax(0, Kind::Float));
    let out = match k {
        QuantKernels::Fused => {
            fused_quantize_activation(&x, &clips, pi.as_ref(), bits, signed).expect("fused")
        }
        QuantKernels::Reference => {
            quantize_activation_mix_with(k, &x, &clips, pi.as_ref(), bits, signed)
        }
    };
    let up = upstream(&out);
    (&out * &up).sum(Kind::Float).backward();
    Grads {
        out: out.detach(),
        x: x.grad(),
        clips: clips.grad(),
        alpha: alpha.map(|a| a.grad()),
    }
}

fn compare_activation(
    x: &Tensor,
    clips: &[f32],
    alpha: Option<&[f32]>,
    bits: &[u32],
    signed: bool,
) {
    let what = format!("bits {bits:?} signed {signed} mixed {}", alpha.is_some());
    let f = run_activation(QuantKernels::Fused, x, clips, alpha, bits, signed);
    let r = run_activation(QuantKernels::Reference, x, clips, alpha, bits, signed);
    assert_bit_equal(&f.out, &r.out, &format!("{what} out"));
    assert_close(&f.x, &r.x, 1e-6, &format!("{what} grad x"));
    assert_close(&f.clips, &r.clips, 1e-5, &format!("{what} grad clips"));
    if let (Some(a), Some(b)) = (&f.alpha, &r.alpha) {
        assert_close(a, b, 1e-5, &format!("{what} grad alpha"));
    }
}

#[test]
fn fused_activation_quantizer_equals_reference() {
    let x = activations(&[8, 5, 9, 7], 3.0);
    for signed in [false, true] {
        for bits in [2u32, 3, 4, 6, 8] {
            compare_activation(&x, &[3.0], None, &[bits], signed);
        }
        compare_activation(
            &x,
            &[3.0, 2.5, 6.0, 1.25],
            Some(&[0.3, -0.2, 0.05, 0.4]),
            &[2, 3, 4, 6],
            signed,
        );
    }
}

#[test]
fn fused_activation_keeps_channels_last_layout() {
    let x = activations(&[4, 6, 5, 5], 2.0);
    let cl = channels_last(&x);
    let clip = Tensor::from(2.0f32);
    let a = fused_quantize_activation(&x, &clip, None, &[3], false).unwrap();
    let b = fused_quantize_activation(&cl, &clip, None, &[3], false).unwrap();
    assert_eq!(b.stride(), cl.stride(), "output keeps the input's layout");
    assert_bit_equal(&a, &b.contiguous(), "channels-last values");
}

/// The reference's tie gradients, which the fused kernels reproduce: at x = 0 and at x = r
/// the half-wave clip passes half the gradient to x, and at x = r half to r.
#[test]
fn fused_activation_ties_follow_the_reference() {
    let x = Tensor::from_slice(&[0.0f32, 2.0, 1.0, 3.0]).set_requires_grad(true);
    let r = Tensor::from(2.0f32).set_requires_grad(true);
    let q = fused_quantize_activation(&x, &r, None, &[2], false).unwrap();
    q.sum(Kind::Float).backward();
    assert_eq!(values(&x.grad()), vec![0.5, 0.5, 1.0, 0.0]);
    assert_eq!(r.grad().double_value(&[]), 1.5);
    // Half-way values round to even: 2 bits, r = 3, s = 1.
    let x = Tensor::from_slice(&[0.5f32, 1.5, 2.5]);
    let q = fused_quantize_activation(&x, &Tensor::from(3.0f32), None, &[2], false).unwrap();
    assert_eq!(values(&q), vec![0.0, 2.0, 2.0]);
}

fn run_weight(
    k: QuantKernels,
    w0: &Tensor,
    t: &Tensor,
    alpha0: Option<&[f32]>,
    bits: &[u32],
) -> (Tensor, Tensor, Option<Tensor>) {
    let w = w0.copy().set_requires_grad(true);
    let alpha = alpha0.map(|a| Tensor::from_slice(a).set_requires_grad(true));
    let pi = alpha.as_ref().map(|a| a.softmax(0, Kind::Float));
    let out = match k {
        QuantKernels::Fused => fused_quantize_weight(&w, t, pi.as_ref(), bits).expect("fused"),
        QuantKernels::Reference => quantize_weight_mix_with(k, &w, t, pi.as_ref(), bits),
    };
    let up = upstream(&out);
    (&out * &up).sum(Kind::Float).backward();
    (out.detach(), w.grad(), alpha.map(|a| a.grad()))
}

#[test]
fn fused_weight_quantizer_equals_reference() {
    tch::manual_seed(3);
    let w = Tensor::randn([6, 4, 3, 3], tch::kind::FLOAT_CPU);
    let per_tensor = w.abs().max() * 0.8; // some weights beyond the threshold
    let per_channel = w.abs().amax([1i64, 2, 3].as_slice(), true);
    let layouts = [w.shallow_clone(), channels_last(&w)];
    for w in &layouts {
        for t in [&per_tensor, &per_channel] {
            for (alpha, bits) in [
                (None, vec![2u32]),
                (None, vec![6]),
                (Some(&[0.1f32, 0.7, -0.3, 0.0][..]), vec![2, 3, 4, 6]),
            ] {
                let what = format!("w {:?} t {:?} bits {bits:?}", w.stride(), t.size());
                let f = run_weight(QuantKernels::Fused, w, t, alpha, &bits);
                let r = run_weight(QuantKernels::Reference, w, t, alpha, &bits);
                assert_bit_equal(&f.0, &r.0, &format!("{what} out"));
                assert_close(&f.1, &r.1, 1e-6, &format!("{what} grad w"));
                if let (Some(a), Some(b)) = (&f.2, &r.2) {
                    assert_close(a, b, 1e-5, &format!("{what} grad alpha"));
                }
            }
        }
    }
}

/// One supernet training step (ResNet-20, both kernel choices): the same loss, and the
/// same gradients of every weight, clip and α up to float summation order.
#[test]
fn supernet_step_agrees_between_kernels() {
    let cfg = ModelConfig::new(Arch::ResNet20, 3, 10, 16);
    let candidates = Candidates {
        weight: vec![2, 3, 4, 6],
        activation: vec![2, 3, 4, 6],
    };
    let x = Tensor::linspace(-2.0, 2.0, 8 * 3 * 16 * 16, tch::kind::FLOAT_CPU)
        .view([8, 3, 16, 16])
        .sin();
    let y = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 5, 6, 7]);
    // Other tests in this binary draw from libtorch's global RNG concurrently: both networks
    // get the first one's values by copy, not by seeding.
    let build = || {
        quant::build(
            &cfg,
            Precision::Supernet {
                candidates: candidates.clone(),
            },
            tch::Device::Cpu,
        )
        .unwrap()
    };
    let nets = [build(), build()];
    tch::no_grad(|| {
        let src = nets[0].vs.variables();
        for (name, var) in nets[1].vs.variables() {
            var.shallow_clone().copy_(&src[&name]);
        }
    });
    let mut results = Vec::new();
    for (net, k) in nets
        .iter()
        .zip([QuantKernels::Fused, QuantKernels::Reference])
    {
        quant::set_kernels(k);
        let loss = net.net.forward_t(&x, true).cross_entropy_for_logits(&y);
        loss.backward();
        let mut grads: Vec<(String, Tensor)> = net
            .vs
            .variables()
            .into_iter()
            .filter(|(_, v)| v.requires_grad())
            .map(|(n, v)| (n, v.grad()))
            .collect();
        grads.sort_by(|a, b| a.0.cmp(&b.0));
        results.push((loss.double_value(&[]), grads));
    }
    quant::set_kernels(QuantKernels::Fused);
    let (lf, gf) = &results[0];
    let (lr, gr) = &results[1];
    assert!((lf - lr).abs() < 1e-5, "loss {lf} vs {lr}");
    assert_eq!(gf.len(), gr.len());
    for ((n, a), (_, b)) in gf.iter().zip(gr) {
        assert_close(a, b, 1e-3, &format!("grad {n}"));
    }
}
