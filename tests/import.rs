//! `gmpq import --onnx`: torchvision CNNs exported by both of torch's exporters compute in
//! gmpq what ONNX Runtime computes on the same file; gmpq's own float export imports back to
//! the same network; bad files get one-line errors.

mod common;

use gmpq::checkpoint::Checkpoint;
use gmpq::engine::{OnnxModel, SessionOptions};
use gmpq::import::{import_onnx, OnnxOptions};
use gmpq::quant::{self, Network, Precision};
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::nn::ModuleT;
use tch::{Device, Kind, Tensor};

/// The virtualenv's Python with torchvision (scripts/setup.sh installs it), if present.
fn zoo_python(test: &str) -> Option<PathBuf> {
    let venv = std::env::var_os("GMPQ_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv"));
    let python = venv.join("bin/python");
    let ok = Command::new(&python)
        .args(["-c", "import torchvision, onnxscript"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        common::cannot_run(
            test,
            "no Python with torchvision and onnxscript in .venv (bash scripts/setup.sh installs them)",
        );
        return None;
    }
    Some(python)
}

/// Exports `models` with both exporters into `dir` (scripts/onnx_zoo.py).
fn export_zoo(python: &Path, models: &str, dir: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/onnx_zoo.py");
    let out = Command::new(python)
        .arg(script)
        .args(["--out", dir.to_str().unwrap(), "--models", models])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "onnx_zoo.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Imports `onnx`, saves the checkpoint and loads it back as gmpq loads any checkpoint.
fn imported(onnx: &Path, dir: &Path) -> (Checkpoint, Network) {
    let ck = import_onnx(onnx, &OnnxOptions::default(), None)
        .unwrap_or_else(|e| panic!("{}: {e}", onnx.display()));
    let path = dir.join(format!(
        "{}.safetensors",
        onnx.file_stem().unwrap().to_string_lossy()
    ));
    ck.save(&path).unwrap();
    quant::load(&path, Device::Cpu).unwrap()
}

fn images(n: i64, size: i64) -> Tensor {
    tch::manual_seed(5);
    Tensor::rand([n, 3, size, size], (Kind::Float, Device::Cpu))
}

/// `max |a − b| / max |b|`.
fn relative_error(a: &Tensor, b: &Tensor) -> f64 {
    let diff = (a - b).abs().max().double_value(&[]);
    diff / b.abs().max().double_value(&[]).max(1e-12)
}

fn one_thread() -> SessionOptions {
    SessionOptions {
        threads: 1,
        optimized_model: None,
        unoptimized: false,
    }
}

/// The default suite's share of the zoo: a plain ResNet, an MLP head with squeeze-excite and
/// HardSwish, a channel shuffle (shape arithmetic to fold, or `Split`), and un-folded batch
/// norm after `Concat`. Both exporters each. The bound: float32 sums in a different order
/// (oneDNN here, MLAS in ONNX Runtime) through up to 120 convs stay within 1e-5 of the largest
/// logit on both AVX2 and AVX-512 machines; 1e-4 leaves a factor of 10.
#[test]
fn torchvision_cnns_compute_what_onnx_runtime_computes() {
    let test = "torchvision_cnns_compute_what_onnx_runtime_computes";
    let Some(python) = zoo_python(test) else {
        return;
    };
    if !common::onnx_runtime(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let models = [
        "resnet18",
        "mobilenet_v3_small",
        "shufflenet_v2_x0_5",
        "densenet121",
    ];
    export_zoo(&python, &models.join(","), dir.path());
    let x = images(4, 32);
    for model in models {
        for exporter in ["torchscript", "dynamo"] {
            let file = dir.path().join(format!("{model}-{exporter}.onnx"));
            let (ck, net) = imported(&file, dir.path());
            assert_eq!(ck.meta.model.num_classes, 10);
            assert_eq!(ck.meta.model.input_size, 32);
            assert!(net.net.convs().iter().filter(|c| c.quantizable).count() >= 19);
            let ours = tch::no_grad(|| net.forward_t(&x, false));
            // The files fix the batch at 1 (as a plain export does); gmpq runs any batch.
            let mut session = OnnxModel::open(&file, &one_thread()).unwrap();
            let theirs: Vec<Tensor> = (0..x.size()[0])
                .map(|i| session.run(&x.narrow(0, i, 1)).unwrap())
                .collect();
            let theirs = Tensor::cat(&theirs, 0);
            let err = relative_error(&ours, &theirs);
            assert!(err <= 1e-4, "{model} ({exporter}): relative error {err:e}");
        }
    }
}

/// A full-precision checkpoint of a built-in network with batch-norm statistics from a few
/// training-mode passes (so batch norm is not the identity).
fn built_in(cfg: &gmpq::model::ModelConfig, path: &Path) -> (Checkpoint, Network) {
    use gmpq::checkpoint::{self, CheckpointMeta};
    use gmpq::data::{Normalize, Pipeline};
    tch::manual_seed(3);
    let net = quant::build(cfg, Precision::Full, Device::Cpu).unwrap();
    let s = cfg.input_size as i64;
    let x = Tensor::rand(
        [16, cfg.in_channels as i64, s, s],
        (Kind::Float, Device::Cpu),
    );
    tch::no_grad(|| {
        for _ in 0..3 {
            let _ = net.net.forward_t(&x, true);
        }
    });
    let c = cfg.in_channels;
    let meta = CheckpointMeta::new(
        cfg.clone(),
        Pipeline {
            transforms: vec![],
            normalize: Normalize {
                mean: vec![0.4; c],
                std: vec![0.3; c],
            },
        },
    );
    let ck = Checkpoint {
        meta,
        tensors: checkpoint::var_store_tensors(&net.vs),
    };
    ck.save(path).unwrap();
    quant::load(path, Device::Cpu).unwrap()
}

/// The BOPs table rows that METHOD.md defines: per layer name, MACs and params, and the FP
/// total.
/// A conv's name, MACs, parameters and whether it is quantized.
type CostRow = (String, u64, u64, bool);

fn cost_rows(net: &Network) -> (Vec<CostRow>, u64, u64) {
    let convs = net.net.convs();
    let mut rows: Vec<_> = convs
        .iter()
        .map(|c| (c.name.clone(), c.macs(), c.params(), c.quantizable))
        .collect();
    rows.sort();
    let g = gmpq::search::Geometry::new(convs, net.net.fc_spec());
    (rows, g.fp_bops as u64, g.fp_layer_bits as u64)
}

/// gmpq's own networks, exported as float ONNX and imported back: the same function (same
/// logits: the same libtorch ops on the same tensors, up to the reshape of the head — 1e-5
/// leaves room for a different summation order of the pooling), the same layers and costs.
#[test]
fn gmpq_float_exports_import_back_to_the_same_network() {
    use gmpq::model::{Arch, ModelConfig};
    let dir = tempfile::tempdir().unwrap();
    for arch in [Arch::ResNet18, Arch::MobileNetV2] {
        let cfg = ModelConfig::new(arch, 3, 10, 32);
        let (ck, net) = built_in(&cfg, &dir.path().join(format!("{arch}.safetensors")));
        let bytes = gmpq::export::onnx::export(
            &ck,
            &net,
            gmpq::export::onnx::OnnxOptions {
                full_precision: true,
            },
        )
        .unwrap();
        let onnx = dir.path().join(format!("{arch}.onnx"));
        std::fs::write(&onnx, bytes).unwrap();
        let (ick, inet) = imported(&onnx, dir.path());
        // The export's leading normalisation comes back as the checkpoint's preprocessing.
        assert_eq!(
            ick.meta.eval_pipeline.normalize,
            ck.meta.eval_pipeline.normalize
        );
        let x = (images(8, 32) - 0.4) / 0.3;
        let (a, b) = tch::no_grad(|| (net.forward_t(&x, false), inet.forward_t(&x, false)));
        let err = relative_error(&b, &a);
        assert!(err <= 1e-5, "{arch}: relative error {err:e}");
        assert_eq!(
            cost_rows(&net),
            cost_rows(&inet),
            "{arch}: layers or costs differ"
        );
        // Inputs that can be negative quantize signed: the same layers in both.
        let signed = |n: &Network| -> Vec<(String, bool)> {
            let mut v: Vec<_> = n
                .net
                .convs()
                .iter()
                .filter(|c| c.quantizable)
                .map(|c| (c.name.clone(), c.signed_input))
                .collect();
            v.sort();
            v
        };
        assert_eq!(signed(&net), signed(&inet), "{arch}: signed inputs differ");
    }
}

/// The search reads an imported network as it reads the built-in one: gmpq's ResNet-18,
/// exported as float ONNX and imported, searched with the same seed, ends with the same α
/// (bit for bit: the same libtorch ops in the same order) and so the same policy.
#[test]
fn an_imported_resnet18_searches_to_the_built_in_policy() {
    use gmpq::model::{Arch, ModelConfig};
    let dir = tempfile::tempdir().unwrap();
    let cfg = ModelConfig::new(Arch::ResNet18, 1, 10, 28);
    let teacher = dir.path().join("r18.safetensors");
    let (ck, net) = built_in(&cfg, &teacher);
    let bytes = gmpq::export::onnx::export(
        &ck,
        &net,
        gmpq::export::onnx::OnnxOptions {
            full_precision: true,
        },
    )
    .unwrap();
    let onnx = dir.path().join("r18.onnx");
    std::fs::write(&onnx, bytes).unwrap();
    let imported = dir.path().join("r18-imported.safetensors");
    let out = common::run(&[
        "import",
        "--onnx",
        onnx.to_str().unwrap(),
        "--out",
        imported.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let search = |teacher: &Path, name: &str| -> serde_json::Value {
        let o = dir.path().join(name);
        let out = common::run(&[
            "--threads",
            "2",
            "search",
            "--teacher",
            teacher.to_str().unwrap(),
            "--data",
            "bundled:mnist",
            "--limit",
            "128",
            "--val-images",
            "32",
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--target-compression",
            "16",
            "--seed",
            "1",
            "--out",
            o.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", common::stderr(&out));
        let text = std::fs::read_to_string(o.join("policy.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    };
    let (a, b) = (search(&teacher, "built-in"), search(&imported, "imported"));
    assert_eq!(a["layers"], b["layers"], "the policies differ");
    assert_eq!(a["meta"]["alpha"], b["meta"]["alpha"], "α differs");
}
