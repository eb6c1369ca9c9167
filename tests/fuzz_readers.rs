//! Every reader gmpq has, fed randomly truncated and bit-flipped inputs: IDX (plain and
//! gzipped), CIFAR binaries, image folders, policy JSON, checkpoints, packed checkpoints,
//! ONNX models in ONNX Runtime, and ONNX models through `gmpq import --onnx`. Each must answer
//! with a value or an error: never a panic, never a hang.

mod common;

use gmpq::checkpoint::{self, Checkpoint, CheckpointMeta};
use gmpq::data::{
    read_cifar, read_idx, write_idx, CifarLayout, ClassIndex, ImageFolder, ImageSource, Normalize,
    Pipeline, IDX_IMAGES_MAGIC,
};
use gmpq::model::{Arch, ModelConfig};
use gmpq::policy::Policy;
use gmpq::quant::{self, Precision};
use proptest::prelude::*;
use std::path::Path;
use std::sync::OnceLock;
use tch::Device;

/// A corruption: truncate to a fraction of the length, then flip some bits.
#[derive(Debug, Clone)]
struct Damage {
    keep: f64,
    flips: Vec<(f64, u8)>,
    /// Flip within the first 4 KiB (headers, metadata), not anywhere.
    head: bool,
}

fn damage() -> impl Strategy<Value = Damage> {
    (
        prop_oneof![Just(1.0), 0.0..1.0f64],
        prop::collection::vec((0.0..1.0f64, 0u8..8), 0..6),
        any::<bool>(),
    )
        .prop_map(|(keep, flips, head)| Damage { keep, flips, head })
}

fn apply(bytes: &[u8], d: &Damage) -> Vec<u8> {
    let mut b = bytes[..(bytes.len() as f64 * d.keep) as usize].to_vec();
    if !b.is_empty() {
        let span = if d.head { b.len().min(4096) } else { b.len() };
        for &(at, bit) in &d.flips {
            let i = ((span as f64 * at) as usize).min(b.len() - 1);
            b[i] ^= 1 << bit;
        }
    }
    b
}

/// A fixed seed: CI runs the same thousands of cases as every developer, so a failure is
/// reproducible (change the seed to explore new inputs).
fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 400,
        failure_persistence: None,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x6d70_7121),
        ..ProptestConfig::default()
    }
}

/// Writes `bytes` to a fresh file named `name` in a new temp dir.
fn file(name: &str, bytes: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    (dir, path)
}

fn idx_bytes(gz: bool) -> &'static [u8] {
    static PLAIN: OnceLock<Vec<u8>> = OnceLock::new();
    static GZ: OnceLock<Vec<u8>> = OnceLock::new();
    let make = |gz: bool| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(if gz { "x.gz" } else { "x" });
        let data: Vec<u8> = (0..3 * 5 * 5).map(|i| (i * 37 % 256) as u8).collect();
        write_idx(&path, IDX_IMAGES_MAGIC, &[3, 5, 5], &data).unwrap();
        std::fs::read(&path).unwrap()
    };
    if gz {
        GZ.get_or_init(|| make(true))
    } else {
        PLAIN.get_or_init(|| make(false))
    }
}

/// A fine-tuned-like ResNet-20 checkpoint (mixed policy) and its packed form.
fn checkpoints() -> &'static (Vec<u8>, Vec<u8>, String) {
    static CK: OnceLock<(Vec<u8>, Vec<u8>, String)> = OnceLock::new();
    CK.get_or_init(|| {
        let cfg = ModelConfig::new(Arch::ResNet20, 1, 10, 28);
        let g = quant::build(&cfg, Precision::Full, Device::Cpu).unwrap();
        let mut policy = Policy::uniform(&cfg, g.net.convs(), 4, 4);
        policy.candidates.weight = vec![2, 3, 4, 6];
        policy.candidates.activation = vec![2, 3, 4, 6];
        for (i, l) in policy.layers.iter_mut().enumerate() {
            l.w_bits = [2, 3, 4, 6][i % 4];
        }
        let policy_json = serde_json::to_string(&policy).unwrap();
        let net = quant::build(
            &cfg,
            Precision::Fixed {
                policy,
                per_channel: false,
                numerics: gmpq::quant::Numerics::FakeQuant,
            },
            Device::Cpu,
        )
        .unwrap();
        let mut meta = CheckpointMeta::new(
            cfg,
            Pipeline {
                transforms: vec![],
                normalize: Normalize::identity(1),
            },
        );
        meta.precision = Some(net.precision.clone());
        let ck = Checkpoint {
            meta,
            tensors: checkpoint::var_store_tensors(&net.vs),
        };
        (
            ck.to_bytes().unwrap(),
            gmpq::export::packed::pack(&ck).unwrap(),
            policy_json,
        )
    })
}

/// ResNet-20 as a float ONNX model (gmpq's export): what `gmpq import --onnx` reads.
fn float_onnx() -> &'static [u8] {
    static ONNX: OnceLock<Vec<u8>> = OnceLock::new();
    ONNX.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.safetensors");
        std::fs::write(&path, &checkpoints().0).unwrap();
        let (ck, net) = quant::load(&path, Device::Cpu).unwrap();
        let opts = gmpq::export::onnx::OnnxOptions {
            full_precision: true,
        };
        gmpq::export::onnx::export(&ck, &net, opts).unwrap()
    })
}

/// A packed integer-numerics ResNet-20 (ranges calibrated on random images).
fn integer_packed() -> &'static [u8] {
    static P: OnceLock<Vec<u8>> = OnceLock::new();
    P.get_or_init(|| {
        let cfg = ModelConfig::new(Arch::ResNet20, 1, 10, 28);
        let g = quant::build(&cfg, Precision::Full, Device::Cpu).unwrap();
        let policy = Policy::cycled(&cfg, g.net.convs(), &[2, 3, 4, 6], &[4, 3]);
        let net = quant::build(
            &cfg,
            Precision::Fixed {
                policy,
                per_channel: false,
                numerics: gmpq::quant::Numerics::Integer,
            },
            Device::Cpu,
        )
        .unwrap();
        net.calibrate_ranges(&[tch::Tensor::rand(
            [4, 1, 28, 28],
            (tch::Kind::Float, Device::Cpu),
        )]);
        let mut meta = CheckpointMeta::new(
            cfg,
            Pipeline {
                transforms: vec![],
                normalize: Normalize::identity(1),
            },
        );
        meta.precision = Some(net.precision.clone());
        let ck = Checkpoint {
            meta,
            tensors: checkpoint::var_store_tensors(&net.vs),
        };
        gmpq::export::packed::pack(&ck).unwrap()
    })
}

fn png_bytes() -> Vec<u8> {
    let img = image::RgbImage::from_fn(8, 8, |x, y| image::Rgb([x as u8 * 30, y as u8 * 30, 7]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn jpeg_bytes() -> Vec<u8> {
    let img = image::RgbImage::from_fn(8, 8, |x, y| image::Rgb([x as u8 * 30, y as u8 * 30, 7]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
    out.into_inner()
}

fn read_folder(root: &Path) {
    if let Ok(folder) = ImageFolder::open(root, ClassIndex::Sorted) {
        for i in 0..folder.len() {
            let _ = folder.image(i);
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn idx_reader(d in damage(), gz in any::<bool>()) {
        let (_dir, path) = file(if gz { "x.gz" } else { "x" }, &apply(idx_bytes(gz), &d));
        let _ = read_idx(&path, IDX_IMAGES_MAGIC);
    }

    #[test]
    fn cifar_reader(d in damage(), layout in 0..3usize) {
        let layout = [CifarLayout::Cifar10, CifarLayout::Cifar100, CifarLayout::Cifar100FineOnly][layout];
        let good: Vec<u8> = (0..layout.record_size() * 3).map(|i| (i % 251) as u8).collect();
        let (_dir, path) = file("x.bin", &apply(&good, &d));
        if let Ok(ds) = read_cifar(&[&path], layout) {
            for i in 0..ds.len() {
                let _ = ds.image(i);
                let _ = ds.label(i);
            }
        }
    }

    #[test]
    fn image_folder_reader(d in damage(), jpeg in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let class = dir.path().join("a");
        std::fs::create_dir(&class).unwrap();
        let (name, good) = if jpeg { ("x.jpg", jpeg_bytes()) } else { ("x.png", png_bytes()) };
        std::fs::write(class.join(name), apply(&good, &d)).unwrap();
        read_folder(dir.path());
    }

    #[test]
    fn policy_reader(d in damage()) {
        let (_dir, path) = file("p.json", &apply(checkpoints().2.as_bytes(), &d));
        let _ = Policy::load(&path);
    }

    #[test]
    fn checkpoint_reader(d in damage()) {
        let (_dir, path) = file("c.safetensors", &apply(&checkpoints().0, &d));
        let _ = quant::load(&path, Device::Cpu);
    }

    #[test]
    fn packed_integer_reader(d in damage()) {
        let (_dir, path) = file("i.safetensors", &apply(integer_packed(), &d));
        let bytes = std::fs::read(&path).unwrap();
        let _ = gmpq::export::packed::integer_onnx(&path, &bytes);
        let _ = gmpq::export::load(&path, Device::Cpu);
    }

    #[test]
    fn onnx_importer(d in damage()) {
        let bytes = apply(float_onnx(), &d);
        let _ = gmpq::import::parse_onnx(&bytes, None, &gmpq::import::OnnxOptions::default());
    }

    #[test]
    fn packed_reader(d in damage()) {
        let (_dir, path) = file("p.safetensors", &apply(&checkpoints().1, &d));
        let _ = gmpq::export::load(&path, Device::Cpu);
    }
}

#[test]
fn onnx_reader() {
    if !common::onnx_runtime("onnx_reader") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.safetensors");
    std::fs::write(&path, &checkpoints().0).unwrap();
    let (ck, net) = quant::load(&path, Device::Cpu).unwrap();
    let good =
        gmpq::export::onnx::export(&ck, &net, gmpq::export::onnx::OnnxOptions::default()).unwrap();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 200,
        ..config()
    });
    runner
        .run(&damage(), |d| {
            let bytes = apply(&good, &d);
            let opts = gmpq::engine::SessionOptions::default();
            if let Ok(mut m) = gmpq::engine::OnnxModel::from_bytes(&bytes, &opts) {
                let _ = m.run(&tch::Tensor::zeros(
                    [1, 1, 28, 28],
                    (tch::Kind::Float, Device::Cpu),
                ));
            }
            let (_d, p) = file("m.onnx", &bytes);
            let _ = gmpq::engine::op_counts(&p);
            Ok(())
        })
        .unwrap();
}
