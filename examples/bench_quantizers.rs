//! Forward + backward time of one activation quantizer (single bitwidth and the supernet's
//! four-way mixture) on a ResNet-20-sized activation, fused kernels against the reference
//! composition: `cargo run --release --example bench_quantizers`.

use gmpq::quant::{quantize_activation_mix_with, QuantKernels};
use std::time::Instant;
use tch::{Kind, Tensor};

fn time(k: QuantKernels, mixed: bool) -> f64 {
    let x0 = (Tensor::randn([64, 16, 32, 32], tch::kind::FLOAT_CPU) * 2.0).relu();
    let g = Tensor::randn([64, 16, 32, 32], tch::kind::FLOAT_CPU);
    let bits: Vec<u32> = if mixed { vec![2, 3, 4, 6] } else { vec![3] };
    let clips =
        Tensor::full([bits.len() as i64], 3.0, tch::kind::FLOAT_CPU).set_requires_grad(true);
    let clip0 = Tensor::from(3.0f32).set_requires_grad(true);
    let alpha = Tensor::full([4], 0.01, tch::kind::FLOAT_CPU).set_requires_grad(true);
    let mut ts = Vec::new();
    for i in 0..40 {
        let x = x0.copy().set_requires_grad(true);
        let t = Instant::now();
        let pi = alpha.softmax(0, Kind::Float);
        let y = if mixed {
            quantize_activation_mix_with(k, &x, &clips, Some(&pi), &bits, false)
        } else {
            quantize_activation_mix_with(k, &x, &clip0, None, &bits, false)
        };
        (&y * &g).sum(Kind::Float).backward();
        if i >= 5 {
            ts.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    ts.sort_by(f64::total_cmp);
    ts[ts.len() / 2]
}

fn main() {
    tch::set_num_threads(2);
    for mixed in [false, true] {
        for k in [QuantKernels::Reference, QuantKernels::Fused] {
            println!(
                "{} {:?}: {:.2} ms (forward + backward, 64x16x32x32)",
                if mixed { "mixture of 4" } else { "single" },
                k,
                time(k, mixed)
            );
        }
    }
}
