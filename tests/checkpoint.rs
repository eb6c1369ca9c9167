//! Checkpoints round-trip, and foreign weights are checked tensor by tensor.

use gmpq::checkpoint::{self, Checkpoint, CheckpointMeta};
use gmpq::data::{Normalize, Pipeline};
use gmpq::import::{import_pretrained, mismatch_text};
use gmpq::model::{Arch, ModelConfig};
use gmpq::train::build_fp;
use std::collections::BTreeMap;
use tch::{Device, Tensor};

fn meta(model: ModelConfig) -> CheckpointMeta {
    let pipeline = Pipeline {
        transforms: vec![],
        normalize: Normalize::identity(3),
    };
    CheckpointMeta::new(model, pipeline)
}

#[test]
fn round_trip_preserves_tensors_and_meta() {
    let cfg = ModelConfig::new(Arch::ResNet20, 3, 10, 32);
    let (vs, _) = build_fp(&cfg, Device::Cpu).unwrap();
    let ck = Checkpoint {
        meta: meta(cfg.clone()),
        tensors: checkpoint::var_store_tensors(&vs),
    };
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.safetensors");
    ck.save(&p).unwrap();
    let back = Checkpoint::load(&p).unwrap();
    assert_eq!(back.meta, ck.meta);
    assert_eq!(back.tensors.len(), ck.tensors.len());
    for (k, t) in &ck.tensors {
        assert!(back.tensors[k].equal(t), "{k}");
    }
    let sidecar: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("c.json")).unwrap()).unwrap();
    assert_eq!(sidecar["model"]["arch"], "resnet20");
}

#[test]
fn truncated_checkpoint_is_an_error_naming_the_file() {
    let cfg = ModelConfig::new(Arch::ResNet20, 1, 10, 28);
    let (vs, _) = build_fp(&cfg, Device::Cpu).unwrap();
    let bytes = Checkpoint {
        meta: meta(cfg),
        tensors: checkpoint::var_store_tensors(&vs),
    }
    .to_bytes()
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("cut.safetensors");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = Checkpoint::load(&p).err().unwrap();
    assert!(e.to_string().contains("cut.safetensors"), "{e}");
}

/// A torchvision-named ResNet-18 state dict (values from our own init, names and shapes
/// exactly torchvision's) with one tensor missing, one extra, one mis-shaped.
#[test]
fn import_reports_missing_unexpected_and_misshaped_by_name() {
    let cfg = ModelConfig::new(Arch::ResNet18, 3, 1000, 224);
    let (vs, _) = build_fp(&cfg, Device::Cpu).unwrap();
    let mut sd: BTreeMap<String, Tensor> = checkpoint::var_store_tensors(&vs);
    // torchvision also stores BN batch counters; they must be accepted.
    sd.insert("bn1.num_batches_tracked".into(), Tensor::from(0i64));
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.safetensors");
    write_state_dict(&sd, &good);
    let ck = import_pretrained(&good, &cfg).unwrap();
    assert!(ck.tensors["layer4.1.conv2.weight"].equal(&sd["layer4.1.conv2.weight"]));

    sd.remove("layer3.0.downsample.0.weight");
    sd.insert("fc.extra".into(), Tensor::zeros([2], tch::kind::FLOAT_CPU));
    sd.insert(
        "fc.weight".into(),
        Tensor::zeros([10, 512], tch::kind::FLOAT_CPU),
    );
    let bad = dir.path().join("bad.safetensors");
    write_state_dict(&sd, &bad);
    let e = import_pretrained(&bad, &cfg).err().unwrap();
    let text = mismatch_text(&e).expect("a mismatch error");
    assert!(
        text.contains("missing (layer3.0.downsample.0.weight)"),
        "{text}"
    );
    assert!(text.contains("unexpected (fc.extra)"), "{text}");
    assert!(
        text.contains("another shape (fc.weight is [10, 512], the model's [1000, 512])"),
        "{text}"
    );
    assert!(e.to_string().contains("bad.safetensors"));
}

/// The same for the depthwise networks' layouts: a missing depthwise kernel and a mis-shaped
/// expand conv of EfficientNet-Lite0 (efficientnet_pytorch names) are named.
#[test]
fn efficientnet_lite0_import_names_missing_and_misshaped_tensors() {
    let cfg = ModelConfig::new(Arch::EfficientNetLite0, 3, 1000, 224);
    let (vs, _) = build_fp(&cfg, Device::Cpu).unwrap();
    let mut sd: BTreeMap<String, Tensor> = checkpoint::var_store_tensors(&vs);
    assert!(sd.contains_key("_blocks.15._project_conv.weight"));
    assert!(sd.contains_key("_fc.bias"));
    sd.remove("_blocks.3._depthwise_conv.weight");
    sd.insert(
        "_blocks.5._expand_conv.weight".into(),
        Tensor::zeros([144, 24, 3, 3], tch::kind::FLOAT_CPU),
    );
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("lite0.safetensors");
    write_state_dict(&sd, &bad);
    let e = import_pretrained(&bad, &cfg).err().unwrap();
    let text = mismatch_text(&e).expect("a mismatch error");
    assert!(
        text.contains("missing (_blocks.3._depthwise_conv.weight)"),
        "{text}"
    );
    assert!(
        text.contains(
            "_blocks.5._expand_conv.weight is [144, 24, 3, 3], the model's [240, 40, 1, 1]"
        ),
        "{text}"
    );
}

/// A torchvision-named MobileNetV2 state dict (our init, torchvision's names and shapes, BN
/// counters included) imports; its depthwise kernels keep their [C, 1, 3, 3] shape.
#[test]
fn mobilenet_v2_imports_torchvision_names() {
    let cfg = ModelConfig::new(Arch::MobileNetV2, 3, 1000, 224);
    let (vs, _) = build_fp(&cfg, Device::Cpu).unwrap();
    let mut sd: BTreeMap<String, Tensor> = checkpoint::var_store_tensors(&vs);
    for name in [
        "features.0.0.weight",
        "features.18.0.weight",
        "classifier.1.bias",
    ] {
        assert!(sd.contains_key(name), "{name}");
    }
    assert_eq!(sd["features.2.conv.1.0.weight"].size(), vec![96, 1, 3, 3]);
    sd.insert(
        "features.0.1.num_batches_tracked".into(),
        Tensor::from(0i64),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mbv2.safetensors");
    write_state_dict(&sd, &path);
    let ck = import_pretrained(&path, &cfg).unwrap();
    assert!(ck.tensors["features.17.conv.1.0.weight"].equal(&sd["features.17.conv.1.0.weight"]));
}

/// Writes a state dict as safetensors, as a PyTorch export would.
fn write_state_dict(sd: &BTreeMap<String, Tensor>, path: &std::path::Path) {
    let named: Vec<(String, Tensor)> = sd
        .iter()
        .map(|(k, v)| (k.clone(), v.shallow_clone()))
        .collect();
    Tensor::write_safetensors(&named, path).unwrap();
}
