//! The reference implementation's quantizer outputs and gradients
//! (`../shared/docs/goldens/quantizers.json`, copied to `tests/goldens/`), reproduced to 1e-6
//! by both implementations: the fused CPU kernels and the libtorch op composition.

use gmpq::quant::{quantize_activation_mix_with, quantize_weight_mix_with, QuantKernels};
use serde_json::Value;
use tch::{Kind, Tensor};

const TOL: f64 = 1e-6;
const KERNELS: [QuantKernels; 2] = [QuantKernels::Fused, QuantKernels::Reference];

fn goldens() -> Value {
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/goldens/quantizers.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn vec_of(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn assert_close(got: &Tensor, want: &Value, what: &str) {
    let got: Vec<f32> = Vec::try_from(&got.flatten(0, -1).to_kind(Kind::Float)).unwrap();
    let want = vec_of(want);
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            ((g - w) as f64).abs() <= TOL,
            "{what}[{i}]: got {g}, want {w}"
        );
    }
}

fn input(g: &Value, name: &str) -> Tensor {
    Tensor::from_slice(&vec_of(&g["inputs"][name]))
}

#[test]
fn weight_quantizer_matches_reference() {
    for k in KERNELS {
        weight_quantizer_case(k);
    }
}

fn weight_quantizer_case(k: QuantKernels) {
    let g = goldens();
    let up = input(&g, "g_up");
    let mut checked = 0;
    for xname in ["x_rand", "x_ties"] {
        for bits in [2u32, 3, 4, 6] {
            let case = &g["weight"][xname][format!("b{bits}")];
            for (gname, upstream) in [
                ("ones", Tensor::ones([16], tch::kind::FLOAT_CPU)),
                ("g", up.shallow_clone()),
            ] {
                let w = input(&g, xname).set_requires_grad(true);
                // Threshold fixed on the first call: max|w|.
                let t = w.abs().max().detach();
                assert!(
                    (t.double_value(&[]) - case[gname]["threshold"].as_f64().unwrap()).abs() < TOL
                );
                let q = quantize_weight_mix_with(k, &w, &t, None, &[bits]);
                assert_close(
                    &q,
                    &case[gname]["out"],
                    &format!("{k:?} weight {xname} b{bits} {gname} out"),
                );
                (&q * &upstream).sum(Kind::Float).backward();
                assert_close(
                    &w.grad(),
                    &case[gname]["grad_x"],
                    &format!("{k:?} weight {xname} b{bits} {gname} grad"),
                );
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 16);
}

#[test]
fn weight_threshold_stays_frozen_after_first_call() {
    for k in KERNELS {
        threshold_case(k);
    }
}

fn threshold_case(k: QuantKernels) {
    let quantize_weight =
        |w: &Tensor, t: &Tensor, b: u32| quantize_weight_mix_with(k, w, t, None, &[b]);
    let g = goldens();
    let x = input(&g, "x_rand");
    let up = input(&g, "g_up");
    for bits in [2u32, 4] {
        let case = &g["weight"]["second_call"][format!("b{bits}")];
        let t = x.abs().max();
        assert!(
            (t.double_value(&[]) - case["threshold_after_first"].as_f64().unwrap()).abs() < TOL
        );
        assert_close(&quantize_weight(&x, &t, bits), &case["out_first"], "first");
        let w2 = (&x * 2.0).set_requires_grad(true);
        let q2 = quantize_weight(&w2, &t, bits);
        assert_close(&q2, &case["out_second_2x"], "second 2x");
        (&q2 * &up).sum(Kind::Float).backward();
        assert_close(&w2.grad(), &case["grad_second_2x_g"], "second grad");
        assert_close(
            &quantize_weight(&(&x * 0.5), &t, bits),
            &case["out_third_0p5x"],
            "third 0.5x",
        );
    }
}

#[test]
fn activation_quantizer_matches_reference() {
    for k in KERNELS {
        activation_case(k);
    }
}

fn activation_case(k: QuantKernels) {
    let g = goldens();
    let up = input(&g, "g_up");
    let mut checked = 0;
    for xname in ["x_rand", "x_ties"] {
        for bits in [2u32, 3, 4, 6] {
            for r in [6.0f32, 1.0] {
                let case = &g["activation"][xname][format!("b{bits}_r{}", r as i32)];
                for (gname, upstream) in [
                    ("ones", Tensor::ones([16], tch::kind::FLOAT_CPU)),
                    ("g", up.shallow_clone()),
                ] {
                    let x = input(&g, xname).set_requires_grad(true);
                    let clip = Tensor::from(r).set_requires_grad(true);
                    let q = quantize_activation_mix_with(k, &x, &clip, None, &[bits], false);
                    let what = format!("{k:?} activation {xname} b{bits} r{r} {gname}");
                    assert_close(&q, &case[gname]["out"], &format!("{what} out"));
                    (&q * &upstream).sum(Kind::Float).backward();
                    assert_close(&x.grad(), &case[gname]["grad_x"], &format!("{what} grad_x"));
                    let gr = clip.grad().double_value(&[]);
                    let want = case[gname]["grad_range"].as_f64().unwrap();
                    assert!(
                        (gr - want).abs() <= 1e-5 * want.abs().max(1.0),
                        "{what} grad_range {gr} vs {want}"
                    );
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 32);
}

#[test]
fn softmax_mixed_branches_match_reference() {
    for k in KERNELS {
        mix_case(k);
    }
}

fn mix_case(k: QuantKernels) {
    let g = goldens();
    let up = input(&g, "g_up");
    for name in ["activ_init_0.01", "activ_custom"] {
        let case = &g["mix"][name];
        let bits: Vec<u32> = case["bits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u32)
            .collect();
        let alpha = Tensor::from_slice(&vec_of(&case["alpha"])).set_requires_grad(true);
        assert_close(&alpha.softmax(0, Kind::Float), &case["softmax"], "softmax");
        let x = input(&g, "x_rand").set_requires_grad(true);
        let clips =
            Tensor::full([bits.len() as i64], 6.0, tch::kind::FLOAT_CPU).set_requires_grad(true);
        let pi = alpha.softmax(0, Kind::Float);
        let out = quantize_activation_mix_with(k, &x, &clips, Some(&pi), &bits, false);
        let name = format!("{k:?} {name}");
        assert_close(&out, &case["out"], &format!("{name} out"));
        (&out * &up).sum(Kind::Float).backward();
        assert_close(&x.grad(), &case["grad_x"], &format!("{name} grad_x"));
        assert_close(
            &alpha.grad(),
            &case["grad_alpha"],
            &format!("{name} grad_alpha"),
        );
        assert_close(
            &clips.grad(),
            &case["grad_ranges"],
            &format!("{name} grad_ranges"),
        );
    }
    for name in ["weight_init_0.01", "weight_custom"] {
        let case = &g["mix"][name];
        let bits: Vec<u32> = case["bits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u32)
            .collect();
        let alpha = Tensor::from_slice(&vec_of(&case["alpha"])).set_requires_grad(true);
        let w = input(&g, "x_rand").set_requires_grad(true);
        let t = w.abs().max().detach();
        for (i, th) in vec_of(&case["thresholds"]).iter().enumerate() {
            assert!(
                (t.double_value(&[]) - *th as f64).abs() < TOL,
                "threshold {i}"
            );
        }
        let pi = alpha.softmax(0, Kind::Float);
        let w_mix = quantize_weight_mix_with(k, &w, &t, Some(&pi), &bits);
        let name = format!("{k:?} {name}");
        assert_close(&w_mix, &case["w_mix"], &format!("{name} w_mix"));
        // As a 1×1 conv over 16 input channels: a ones input sums the mixed kernel, one-hot
        // inputs read it back element by element.
        let kernel = w_mix.view([1, 16, 1, 1]);
        let ones = Tensor::ones([1, 16, 1, 1], tch::kind::FLOAT_CPU);
        let s = ones
            .conv2d(&kernel, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1)
            .double_value(&[0, 0, 0, 0]);
        assert!(
            (s - case["out_sum_ones_input"].as_f64().unwrap()).abs() < 1e-5,
            "{name} sum {s}"
        );
        let onehot = Tensor::eye(16, tch::kind::FLOAT_CPU).view([16, 16, 1, 1]);
        let outs = onehot.conv2d(&kernel, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1);
        assert_close(&outs, &case["outs_onehot"], &format!("{name} onehot"));
        (&w_mix * &up).sum(Kind::Float).backward();
        assert_close(&w.grad(), &case["grad_w"], &format!("{name} grad_w"));
        assert_close(
            &alpha.grad(),
            &case["grad_alpha"],
            &format!("{name} grad_alpha"),
        );
    }
}
