//! Fixed-policy networks, the supernet, policies and their BOPs.

mod common;

use gmpq::checkpoint::{self, Checkpoint};
use gmpq::model::{Arch, ModelConfig, Stem};
use gmpq::policy::{parse_uniform, Candidates, LayerBits, Policy, PolicyError};
use gmpq::quant::{self, Precision, QuantError};
use tch::nn::ModuleT;
use tch::{Device, Kind, Tensor};

fn resnet18_cifar() -> ModelConfig {
    let mut c = ModelConfig::new(Arch::ResNet18, 3, 10, 32);
    c.stem = Stem::Cifar;
    c
}

fn geometry(cfg: &ModelConfig) -> quant::Network {
    quant::build(cfg, Precision::Full, Device::Cpu).unwrap()
}

#[test]
fn bops_worked_numbers_from_method_md() {
    let cfg = resnet18_cifar();
    let n = geometry(&cfg);
    let p = Policy::uniform(&cfg, n.net.convs(), 4, 4);
    assert_eq!(p.layers.len(), 19);
    let (rows, t) = p.cost(n.net.convs(), n.net.fc_spec());
    let q_macs: u64 = rows.iter().filter(|r| r.quantized()).map(|r| r.macs).sum();
    assert_eq!(q_macs, 553_648_128);
    assert_eq!(t.bops, 553_648_128 * 16); // 8,858.4 M BOPs
    assert_eq!(format!("{:.1}", t.bops as f64 / 1e6), "8858.4");
    // FP BOPs count every layer (stem and head too) at 32×32 bits.
    let all_macs: u64 = rows.iter().map(|r| r.macs).sum();
    assert_eq!(t.fp_bops, all_macs * 1024);
    assert_eq!(t.fp_layers_bops, (all_macs - q_macs) * 1024);
    assert!((t.compression - t.fp_bops as f64 / t.bops as f64).abs() < 1e-9);
    // Size: 4-bit quantized kernels + 32-bit stem and head (weights and bias).
    let q_params: u64 = rows
        .iter()
        .filter(|r| r.quantized())
        .map(|r| r.params)
        .sum();
    let fp_params: u64 = 3 * 64 * 9 + 512 * 10 + 10;
    assert!((t.size_mb - (q_params * 4 + fp_params * 32) as f64 / 8e6).abs() < 1e-12);
    // A mixed policy: halving one layer's activation bits halves its BOPs.
    let mut p2 = p.clone();
    p2.candidates = Candidates {
        weight: vec![2, 4],
        activation: vec![2, 4],
    };
    p2.layers[0].a_bits = 2;
    let (_, t2) = p2.cost(n.net.convs(), n.net.fc_spec());
    assert_eq!(t.bops - t2.bops, rows[1].macs * 8);
}

#[test]
fn uniform_policy_names() {
    assert_eq!(parse_uniform("w4a4").unwrap(), (4, 4));
    assert_eq!(parse_uniform("w2a6").unwrap(), (2, 6));
    for bad in ["w4", "a4w4", "w1a4", "wxa4", "w4a40"] {
        assert!(parse_uniform(bad).is_err(), "{bad}");
    }
}

#[test]
fn policy_validation_names_the_layer() {
    let cfg = ModelConfig::new(Arch::ResNet20, 1, 10, 28);
    let n = geometry(&cfg);
    let good = Policy::uniform(&cfg, n.net.convs(), 4, 4);
    good.validate(&cfg, n.net.convs()).unwrap();

    let mut p = good.clone();
    p.model = "resnet56".into();
    assert!(matches!(
        p.validate(&cfg, n.net.convs()),
        Err(PolicyError::WrongModel { .. })
    ));

    let mut p = good.clone();
    p.layers[3].name = "layer9.0.conv1".into();
    let e = p.validate(&cfg, n.net.convs()).unwrap_err();
    assert!(e.to_string().contains("layer9.0.conv1"), "{e}");

    let mut p = good.clone();
    let removed = p.layers.remove(5).name;
    let e = p.validate(&cfg, n.net.convs()).unwrap_err();
    assert!(
        matches!(e, PolicyError::MissingLayer(ref l) if *l == removed),
        "{e}"
    );

    let mut p = good.clone();
    p.layers[2].w_bits = 3;
    let e = p.validate(&cfg, n.net.convs()).unwrap_err();
    assert!(
        e.to_string().contains(&p.layers[2].name) && e.to_string().contains("weight bits 3"),
        "{e}"
    );

    // The FP stem is not part of any policy.
    let mut p = good.clone();
    p.layers.push(LayerBits {
        name: "conv1".into(),
        w_bits: 4,
        a_bits: 4,
    });
    assert!(matches!(
        p.validate(&cfg, n.net.convs()),
        Err(PolicyError::UnknownLayer(_))
    ));

    // Building a fixed-policy network refuses the same mistakes.
    let mut p = good.clone();
    p.layers.pop();
    let e = quant::build(
        &cfg,
        Precision::Fixed {
            policy: p,
            per_channel: false,
            numerics: gmpq::quant::Numerics::FakeQuant,
        },
        Device::Cpu,
    )
    .unwrap_err();
    assert!(
        matches!(e, QuantError::Policy(PolicyError::MissingLayer(_))),
        "{e}"
    );
}

#[test]
fn supernet_step_gives_alpha_gradients_and_policy_round_trips() {
    tch::manual_seed(1);
    let cfg = ModelConfig::new(Arch::ResNet20, 1, 10, 28);
    let cands = Candidates {
        weight: vec![2, 3, 4, 6],
        activation: vec![2, 3, 4, 6],
    };
    let sn = quant::build(
        &cfg,
        Precision::Supernet {
            candidates: cands.clone(),
        },
        Device::Cpu,
    )
    .unwrap();
    assert_eq!(sn.handles.len(), 20); // 18 block convs + 2 shortcuts; the stem stays FP
    let x = Tensor::randn([8, 1, 28, 28], tch::kind::FLOAT_CPU);
    let y = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 5, 6, 7]);
    let loss = sn.net.forward_t(&x, true).cross_entropy_for_logits(&y);
    loss.backward();
    let alphas = sn.alpha_parameters();
    assert_eq!(alphas.len(), 40);
    for (name, a) in &alphas {
        let g = a.grad();
        assert!(g.defined(), "{name} has no gradient");
        assert!(
            g.abs().sum(Kind::Float).double_value(&[]) > 0.0,
            "{name} has zero gradient"
        );
    }
    // Thresholds were fixed on that first pass.
    let vars = sn.vs.variables();
    let t = vars["layer1.0.conv1.weight_threshold"].double_value(&[]);
    let w = vars["layer1.0.conv1.weight"].abs().max().double_value(&[]);
    assert_eq!(t, w);

    // Push α toward distinct choices, take the argmax policy, round-trip it through JSON.
    tch::no_grad(|| {
        vars["layer2.1.conv2.alpha_w"]
            .shallow_clone()
            .copy_(&Tensor::from_slice(&[0.0f32, 0.0, 0.0, 1.0]));
        vars["layer2.1.conv2.alpha_a"]
            .shallow_clone()
            .copy_(&Tensor::from_slice(&[0.0f32, 2.0, 0.0, 0.0]));
    });
    let policy = sn.argmax_policy().unwrap();
    let l = policy
        .layers
        .iter()
        .find(|l| l.name == "layer2.1.conv2")
        .unwrap();
    assert_eq!((l.w_bits, l.a_bits), (6, 3));
    // Equal α everywhere else: ties go to the lowest bitwidth.
    assert!(policy
        .layers
        .iter()
        .filter(|l| l.name != "layer2.1.conv2")
        .all(|l| l.w_bits == 2 && l.a_bits == 2));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.json");
    policy.save(&path).unwrap();
    let back = Policy::load(&path).unwrap();
    assert_eq!(back, policy);

    let fixed = quant::build(
        &cfg,
        Precision::Fixed {
            policy: back,
            per_channel: false,
            numerics: gmpq::quant::Numerics::FakeQuant,
        },
        Device::Cpu,
    )
    .unwrap();
    let names = |n: &quant::Network| {
        n.handles
            .iter()
            .map(|h| h.spec.name.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&fixed), names(&sn));
    // Every variable of the fixed net exists in the supernet under the same name, so the
    // supernet's weights carry over by name.
    let sn_vars = sn.vs.variables();
    for (name, v) in fixed.vs.variables() {
        let s = sn_vars
            .get(&name)
            .unwrap_or_else(|| panic!("{name} missing in the supernet"));
        if !name.ends_with(".act_clip") {
            assert_eq!(s.size(), v.size(), "{name}");
        }
    }
}

#[test]
fn quantized_checkpoint_round_trips_and_per_channel_thresholds() {
    tch::manual_seed(2);
    let cfg = ModelConfig::new(Arch::ResNet20, 1, 10, 28);
    let fp = geometry(&cfg);
    let g = geometry(&cfg);
    let policy =
        Policy::uniform(&cfg, g.net.convs(), 4, 8).with_totals(g.net.convs(), g.net.fc_spec());
    let q = quant::build(
        &cfg,
        Precision::Fixed {
            policy,
            per_channel: true,
            numerics: gmpq::quant::Numerics::FakeQuant,
        },
        Device::Cpu,
    )
    .unwrap();
    let fp_ck = Checkpoint {
        meta: gmpq::checkpoint::CheckpointMeta::new(
            cfg.clone(),
            gmpq::data::Pipeline {
                transforms: vec![],
                normalize: gmpq::data::Normalize::identity(1),
            },
        ),
        tensors: checkpoint::var_store_tensors(&fp.vs),
    };
    q.load_fp_weights(&fp_ck, std::path::Path::new("fp"))
        .unwrap();
    let x = Tensor::randn([4, 1, 28, 28], tch::kind::FLOAT_CPU);
    let batches = vec![x.shallow_clone()];
    // 8-bit activations: max calibration; the reference rule caps the clip at 6.
    let cal = quant::calibrate(&q, &batches, quant::CalibrationMethod::Reference).unwrap();
    assert_eq!(cal.len(), 20);
    assert!(cal
        .iter()
        .all(|c| c.clip == c.max.min(6.0) && c.method.starts_with("max")));
    assert!(
        cal.iter().any(|c| c.max > 6.0),
        "random inputs should exceed 6 somewhere"
    );
    let cal = quant::calibrate(&q, &batches, quant::CalibrationMethod::KlBelow5Bits).unwrap();
    assert!(cal.iter().all(|c| c.clip == c.max && c.method == "max"));
    let clip = q.vs.variables()["layer2.0.conv1.act_clip"].double_value(&[]);
    let want = cal
        .iter()
        .find(|c| c.name == "layer2.0.conv1")
        .unwrap()
        .clip;
    assert!((clip - want).abs() < 1e-5 * want, "{clip} vs {want}");
    let vars = q.vs.variables();
    assert_eq!(
        vars["layer3.0.conv1.weight_threshold"].size(),
        vec![64, 1, 1, 1]
    );
    // A loaded network holds its kernels channels-last, as training does.
    q.use_channels_last_weights();
    let out = tch::no_grad(|| q.net.forward_t(&x, false));

    let mut meta = fp_ck.meta.clone();
    meta.precision = Some(q.precision.clone());
    meta.calibration = Some(cal);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("q.safetensors");
    Checkpoint {
        meta,
        tensors: checkpoint::var_store_tensors(&q.vs),
    }
    .save(&p)
    .unwrap();
    let (_, back) = quant::load(&p, Device::Cpu).unwrap();
    let out2 = tch::no_grad(|| back.net.forward_t(&x, false));
    assert!(
        out.allclose(&out2, 0.0, 0.0, false),
        "reloaded quantized net differs"
    );
    // Quantization changes the function: the FP net gives other logits.
    let fp_out = tch::no_grad(|| fp.net.forward_t(&x, false));
    assert!(!fp_out.allclose(&out, 1e-6, 1e-6, false));
}

/// Depthwise convs: MACs and params divide by `groups` (METHOD.md), worked by hand for
/// MobileNetV2's `features.2.conv.1.0` (96 channels, 3×3, stride 2, 112 → 56 px).
#[test]
fn depthwise_bops_use_groups() {
    let cfg = ModelConfig::new(Arch::MobileNetV2, 3, 1000, 224);
    let n = geometry(&cfg);
    let p = Policy::uniform(&cfg, n.net.convs(), 4, 4);
    let (rows, t) = p.cost(n.net.convs(), n.net.fc_spec());
    let dw = rows
        .iter()
        .find(|r| r.name == "features.2.conv.1.0")
        .unwrap();
    assert_eq!(dw.macs, 96 * 9 * 56 * 56); // = 96·96·9·56·56 / 96
    assert_eq!(dw.params, 96 * 9);
    assert_eq!(dw.bops, 96 * 9 * 56 * 56 * 16);
    assert_eq!(dw.size_bits, 96 * 9 * 4);
    // The whole network: torchvision's MobileNetV2 has ~300 M MACs at 224 px.
    let macs: u64 = rows.iter().map(|r| r.macs).sum();
    assert_eq!(macs, 300_774_272);
    assert_eq!(t.fp_bops, macs * 1024);
    // 52 convs: the stem stays full precision, the other 51 are in the policy.
    assert_eq!(p.layers.len(), 51);
}

/// A fixed-policy MobileNetV2 (CIFAR variant): the convs after a linear bottleneck get a
/// signed activation quantizer, so negative inputs survive; calibration and the forward pass
/// give finite outputs.
#[test]
fn mobilenet_v2_fixed_policy_signed_inputs() {
    let cfg = ModelConfig::new(Arch::MobileNetV2, 1, 10, 28);
    let fp = geometry(&cfg);
    let signed: Vec<&str> = fp
        .net
        .convs()
        .iter()
        .filter(|c| c.signed_input)
        .map(|c| c.name.as_str())
        .collect();
    assert!(signed.contains(&"features.2.conv.0.0"), "{signed:?}");
    assert!(signed.contains(&"features.18.0"), "{signed:?}");
    assert!(!signed.contains(&"features.2.conv.1.0"), "{signed:?}");
    let policy = Policy::uniform(&cfg, fp.net.convs(), 4, 4);
    let q = quant::build(
        &cfg,
        Precision::Fixed {
            policy,
            per_channel: true,
            numerics: gmpq::quant::Numerics::FakeQuant,
        },
        Device::Cpu,
    )
    .unwrap();
    tch::manual_seed(0);
    let x = Tensor::randn([4, 1, 28, 28], tch::kind::FLOAT_CPU);
    let cal = quant::calibrate(&q, &[x.shallow_clone()], quant::CalibrationMethod::Max).unwrap();
    assert_eq!(cal.len(), 51);
    assert!(cal.iter().all(|c| c.clip > 0.0 && c.clip.is_finite()));
    let y = q.net.forward_t(&x, false);
    assert_eq!(y.size(), vec![4, 10]);
    assert!(y.isfinite().all().int64_value(&[]) == 1);
}
