//! Export: ONNX (QDQ and float) through ONNX Runtime against the libtorch network, the
//! packed format's exact round trip and size, and clear errors on what cannot be exported.

mod common;

use gmpq::checkpoint::{self, Checkpoint, CheckpointMeta};
use gmpq::data::{Normalize, Pipeline};
use gmpq::engine::{OnnxModel, SessionOptions};
use gmpq::export::{onnx, packed};
use gmpq::model::{Arch, ModelConfig, Stem};
use gmpq::policy::Policy;
use gmpq::quant::{self, Network, Precision};
use tch::nn::ModuleT;
use tch::{Device, Kind, Tensor};

/// ONNX Runtime must be installed by scripts/setup.sh; without it these tests say so (and
/// fail under `GMPQ_STRICT_TESTS=1`).
fn runtime_or_skip(test: &str) -> bool {
    common::onnx_runtime(test)
}

/// A policy cycling through 2-, 3-, 4- and 6-bit weights and activations.
fn mixed_policy(cfg: &ModelConfig) -> Policy {
    let g = quant::build(cfg, Precision::Full, Device::Cpu).unwrap();
    let mut p = Policy::uniform(cfg, g.net.convs(), 4, 4);
    p.candidates = gmpq::policy::Candidates {
        weight: vec![2, 3, 4, 6],
        activation: vec![2, 3, 4, 6],
    };
    let pairs = [(2, 3), (3, 4), (4, 6), (6, 2), (3, 3), (2, 6)];
    for (l, (w, a)) in p.layers.iter_mut().zip(pairs.iter().cycle()) {
        l.w_bits = *w;
        l.a_bits = *a;
    }
    p.with_totals(g.net.convs(), g.net.fc_spec())
}

fn normalize(channels: usize) -> Normalize {
    Normalize {
        mean: vec![0.45; channels],
        std: vec![0.25; channels],
    }
}

/// A fixed-policy network with non-trivial state: batch-norm statistics from a few
/// training-mode passes, clips spread over [1, 4], thresholds set by a forward pass.
fn network(cfg: &ModelConfig, precision: Precision) -> (Checkpoint, Network) {
    tch::manual_seed(7);
    let net = quant::build(cfg, precision, Device::Cpu).unwrap();
    let s = cfg.input_size as i64;
    let x = Tensor::rand(
        [16, cfg.in_channels as i64, s, s],
        (Kind::Float, Device::Cpu),
    );
    tch::no_grad(|| {
        for (name, mut v) in net.vs.variables() {
            if name.ends_with(".act_clip") {
                v.copy_(&(Tensor::rand_like(&v) * 3.0 + 1.0));
            }
        }
        for _ in 0..3 {
            let _ = net.net.forward_t(&x, true);
        }
        let _ = net.net.forward_t(&x, false);
    });
    let mut meta = CheckpointMeta::new(
        cfg.clone(),
        Pipeline {
            transforms: vec![],
            normalize: normalize(cfg.in_channels),
        },
    );
    meta.precision = Some(net.precision.clone());
    let ck = Checkpoint {
        meta,
        tensors: checkpoint::var_store_tensors(&net.vs),
    };
    (ck, net)
}

fn images(cfg: &ModelConfig, n: i64) -> Tensor {
    tch::manual_seed(11);
    let s = cfg.input_size as i64;
    // Pixel values as the data pipeline makes them: k/255.
    (Tensor::randint(
        256,
        [n, cfg.in_channels as i64, s, s],
        (Kind::Float, Device::Cpu),
    ) / 255.0)
        .to_kind(Kind::Float)
}

/// libtorch and ONNX Runtime logits of the same images.
fn both(ck: &Checkpoint, net: &Network, full_precision: bool, n: i64) -> (Tensor, Tensor) {
    let bytes = onnx::export(ck, net, onnx::OnnxOptions { full_precision }).unwrap();
    // One thread: ONNX Runtime's sums in a fixed order, whatever else runs beside the test.
    let mut model = OnnxModel::from_bytes(
        &bytes,
        &SessionOptions {
            threads: 1,
            optimized_model: None,
            unoptimized: false,
        },
    )
    .unwrap();
    let cfg = net.net.config();
    let x = images(cfg, n);
    let c = cfg.in_channels as i64;
    let norm = normalize(cfg.in_channels);
    let mean = Tensor::from_slice(&norm.mean).reshape([1, c, 1, 1]);
    let std = Tensor::from_slice(&norm.std).reshape([1, c, 1, 1]);
    let ours = tch::no_grad(|| net.net.forward_t(&((&x - mean) / std), false));
    (ours, model.run(&x).unwrap())
}

/// Top-1 agreement (fraction) and the fraction of logits within 1e-3 (relative) of ours.
fn agreement(ours: &Tensor, theirs: &Tensor) -> (f64, f64) {
    assert_eq!(ours.size(), theirs.size());
    let same = ours.argmax(1, false).eq_tensor(&theirs.argmax(1, false));
    let top1 = same
        .to_kind(Kind::Float)
        .mean(Kind::Float)
        .double_value(&[]);
    let close = (ours - theirs)
        .abs()
        .le_tensor(&(ours.abs() * 1e-3 + 1e-3))
        .to_kind(Kind::Float)
        .mean(Kind::Float)
        .double_value(&[]);
    (top1, close)
}

#[test]
fn qdq_resnet20_matches_the_fake_quantized_network() {
    if !runtime_or_skip("qdq_resnet20_matches_the_fake_quantized_network") {
        return;
    }
    let cfg = ModelConfig::new(Arch::ResNet20, 1, 10, 28);
    for per_channel in [false, true] {
        let policy = mixed_policy(&cfg);
        let (ck, net) = network(
            &cfg,
            Precision::Fixed {
                policy,
                per_channel,
                numerics: gmpq::quant::Numerics::FakeQuant,
            },
        );
        let (ours, theirs) = both(&ck, &net, false, 64);
        let (top1, close) = agreement(&ours, &theirs);
        // Rounding boundaries flip where the two engines' conv sums differ in the last bit,
        // so a few logits may move (random 2-bit layers have small margins); a wrong graph
        // agrees on far fewer.
        assert!(
            top1 >= 0.9,
            "per_channel {per_channel}: top-1 agreement {top1}, close {close}"
        );
        // One flipped level early in a 20-layer 2-bit network moves many later logits: under
        // a loaded machine 72 % stayed within 1e-3 (100 % on a quiet one); a wrong graph
        // leaves next to none.
        assert!(
            close >= 0.5,
            "per_channel {per_channel}: close logits {close}"
        );
    }
}

#[test]
fn qdq_mobilenet_with_signed_inputs_matches() {
    if !runtime_or_skip("qdq_mobilenet_with_signed_inputs_matches") {
        return;
    }
    let mut cfg = ModelConfig::new(Arch::MobileNetV2, 3, 10, 32);
    cfg.stem = Stem::Cifar;
    cfg.width = 0.35;
    let policy = mixed_policy(&cfg);
    let (ck, net) = network(
        &cfg,
        Precision::Fixed {
            policy,
            per_channel: true,
            numerics: gmpq::quant::Numerics::FakeQuant,
        },
    );
    assert!(net.net.convs().iter().any(|c| c.signed_input));
    let (ours, theirs) = both(&ck, &net, false, 32);
    let (top1, close) = agreement(&ours, &theirs);
    assert!(top1 >= 0.9, "top-1 agreement {top1}");
    // Loose, as for ResNet-20: one flipped level moves many later logits.
    assert!(close >= 0.5, "close logits {close}");
}

#[test]
fn float_export_computes_the_same_function() {
    if !runtime_or_skip("float_export_computes_the_same_function") {
        return;
    }
    let cfg = ModelConfig::new(Arch::ResNet20, 1, 10, 28);
    let (ck, net) = network(&cfg, Precision::Full);
    let (ours, theirs) = both(&ck, &net, true, 16);
    let diff = (&ours - &theirs).abs().max().double_value(&[]);
    let scale = ours.abs().max().double_value(&[]);
    assert!(
        diff <= 1e-4 * scale.max(1.0),
        "max |diff| {diff} (logits up to {scale})"
    );
    // A fixed-policy checkpoint exported with --fp drops its quantizers.
    let policy = mixed_policy(&cfg);
    let layers = policy.layers.len();
    let (ck, net) = network(
        &cfg,
        Precision::Fixed {
            policy,
            per_channel: false,
            numerics: gmpq::quant::Numerics::FakeQuant,
        },
    );
    let bytes = onnx::export(
        &ck,
        &net,
        onnx::OnnxOptions {
            full_precision: true,
        },
    )
    .unwrap();
    let qdq = onnx::export(&ck, &net, onnx::OnnxOptions::default()).unwrap();
    let count = |b: &[u8], op: &str| b.windows(op.len()).filter(|w| *w == op.as_bytes()).count();
    assert_eq!(count(&bytes, "QuantizeLinear"), 0);
    assert_eq!(
        count(&qdq, "QuantizeLinear"),
        layers,
        "one per quantized conv"
    );
}

#[test]
fn packed_round_trip_is_exact_and_sized_by_the_policy() {
    let cfg = ModelConfig::new(Arch::ResNet20, 1, 10, 28);
    let policy = mixed_policy(&cfg);
    let dir = tempfile::tempdir().unwrap();
    for per_channel in [false, true] {
        let (ck, net) = network(
            &cfg,
            Precision::Fixed {
                policy: policy.clone(),
                per_channel,
                numerics: gmpq::quant::Numerics::FakeQuant,
            },
        );
        let path = dir.path().join(format!("p{per_channel}.safetensors"));
        let size = packed::save(&ck, &path).unwrap();
        assert_eq!(size, std::fs::metadata(&path).unwrap().len());
        let (_, unpacked) = gmpq::export::load(&path, Device::Cpu).unwrap();
        // Training and search refuse a packed file, naming it.
        let err = quant::load(&path, Device::Cpu).err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("is a packed file")),
            "{err:?}"
        );
        let x = images(&cfg, 8);
        // A loaded network holds its kernels channels-last, as training does.
        net.use_channels_last_weights();
        let a = tch::no_grad(|| net.net.forward_t(&x, false));
        let b = tch::no_grad(|| unpacked.net.forward_t(&x, false));
        assert!(
            a.equal(&b),
            "per_channel {per_channel}: unpacked network differs"
        );
        // Size: the policy's size (quantized kernels at their bits, FP stem and head at
        // 32 bits) plus the other float tensors, within 5 %.
        let policy_bytes = policy.totals.as_ref().unwrap().size_mb * 1e6;
        let counted: Vec<String> = net
            .net
            .convs()
            .iter()
            .map(|c| format!("{}.weight", c.name))
            .chain(["fc.weight".into(), "fc.bias".into()])
            .collect();
        let other: usize = net
            .vs
            .variables()
            .iter()
            .filter(|(n, _)| !counted.contains(n))
            .map(|(_, t)| t.numel() * 4)
            .sum();
        let expected = policy_bytes + other as f64;
        let ratio = size as f64 / expected;
        assert!(
            (0.95..=1.05).contains(&ratio),
            "size {size} vs {expected}: {ratio}"
        );
    }
}

#[test]
fn bit_packing_round_trips_every_width() {
    for bits in 2..=8u32 {
        let max = (1i32 << (bits - 1)) - 1;
        let values: Vec<i8> = (0..1001)
            .map(|i| ((i * 7919) % (2 * max + 1) - max) as i8)
            .collect();
        let packed = packed::pack_bits(&values, bits);
        assert_eq!(packed.len(), (values.len() * bits as usize).div_ceil(8));
        assert_eq!(
            packed::unpack_bits(&packed, bits, values.len()).unwrap(),
            values
        );
        assert!(packed::unpack_bits(&packed[1..], bits, values.len()).is_none());
    }
}

#[test]
fn what_cannot_be_exported_is_named() {
    let cfg = ModelConfig::new(Arch::ResNet20, 1, 10, 28);
    let mut policy = mixed_policy(&cfg);
    policy.layers[3].w_bits = 12;
    policy.candidates.weight.push(12);
    let name = policy.layers[3].name.clone();
    let (ck, net) = network(
        &cfg,
        Precision::Fixed {
            policy,
            per_channel: false,
            numerics: gmpq::quant::Numerics::FakeQuant,
        },
    );
    let err = onnx::export(&ck, &net, onnx::OnnxOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains(&name) && err.contains("8 bits"), "{err}");
    let err = packed::pack(&ck).unwrap_err().to_string();
    assert!(err.contains(&name), "{err}");
    let candidates = gmpq::policy::Candidates {
        weight: vec![2, 4],
        activation: vec![2, 4],
    };
    let (ck, net) = network(&cfg, Precision::Supernet { candidates });
    let err = onnx::export(&ck, &net, onnx::OnnxOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("supernet"), "{err}");
}

#[test]
fn corrupt_exports_get_errors_not_panics() {
    let cfg = ModelConfig::new(Arch::ResNet20, 1, 10, 28);
    let (ck, net) = network(
        &cfg,
        Precision::Fixed {
            policy: mixed_policy(&cfg),
            per_channel: false,
            numerics: gmpq::quant::Numerics::FakeQuant,
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let bytes = packed::pack(&ck).unwrap();
    let path = dir.path().join("x.safetensors");
    let mut rng_state = 12345u64;
    let mut next = || {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        rng_state
    };
    for i in 0..200 {
        let mut b = bytes.clone();
        if i % 2 == 0 {
            b.truncate(next() as usize % b.len());
        } else {
            for _ in 0..1 + next() % 8 {
                let at = next() as usize % b.len();
                b[at] ^= 1 << (next() % 8);
            }
        }
        std::fs::write(&path, &b).unwrap();
        // Either a clear error or (a flip in a float) a loadable file: never a panic.
        let _ = quant::load(&path, Device::Cpu);
    }
    if runtime_or_skip("corrupt_exports_get_errors_not_panics (ONNX part)") {
        let onnx_bytes = onnx::export(&ck, &net, onnx::OnnxOptions::default()).unwrap();
        for cut in [0, 10, onnx_bytes.len() / 2, onnx_bytes.len() - 3] {
            assert!(OnnxModel::from_bytes(&onnx_bytes[..cut], &SessionOptions::default()).is_err());
        }
    }
}

/// A fake-quant network keeps its 8-bit weights as trained, so its QDQ graph can saturate the
/// int16 pair sums of CPUs without VNNI where an 8-bit input meets them: `gmpq export` warns,
/// naming the conv; a 4-bit policy gives no warning.
#[test]
fn qdq_exports_of_8_bit_layers_warn_of_int16_pair_sums() {
    let cfg = ModelConfig::new(Arch::ResNet20, 1, 10, 28);
    let dir = tempfile::tempdir().unwrap();
    let g = quant::build(&cfg, Precision::Full, Device::Cpu).unwrap();
    for (bits, warned) in [(8, true), (4, false)] {
        let policy = Policy::uniform(&cfg, g.net.convs(), bits, bits)
            .with_totals(g.net.convs(), g.net.fc_spec());
        let (ck, _) = network(
            &cfg,
            Precision::Fixed {
                policy,
                per_channel: false,
                numerics: gmpq::quant::Numerics::FakeQuant,
            },
        );
        let path = dir.path().join(format!("w{bits}.safetensors"));
        ck.save(&path).unwrap();
        let out = dir.path().join(format!("w{bits}.onnx"));
        let o = common::gmpq()
            .args(["export", "--checkpoint"])
            .arg(&path)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        let err = common::stderr(&o);
        assert!(o.status.success(), "{err}");
        assert_eq!(
            err.contains("warning: conv") && err.contains("int16 pair sums"),
            warned,
            "w{bits}a{bits}: {err}"
        );
    }
}
