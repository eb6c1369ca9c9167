//! `gmpq predict` on real image files: a PNG and a JPEG through a checkpoint, its packed file
//! and its ONNX export, with the class names the training data gave; bad inputs get one line.

mod common;

use common::{gmpq, stderr};
use gmpq::data::{DatasetSpec, Split};
use protobuf::Message;
use std::path::{Path, PathBuf};

fn run(args: &[&str]) -> std::process::Output {
    gmpq().args(args).output().unwrap()
}

fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn refused(args: &[&str], needles: &[&str]) {
    let o = run(args);
    let e = stderr(&o);
    assert!(!o.status.success(), "{args:?} succeeded");
    assert_ne!(o.status.code(), Some(101), "{args:?} panicked: {e}");
    assert_eq!(e.trim().lines().count(), 1, "{args:?}: {e}");
    for n in needles {
        assert!(e.contains(n), "{args:?}: '{n}' not in {e}");
    }
}

/// Bundled Fashion-MNIST test image `i` as a grey PNG or JPEG (by extension), and its label.
fn image_file(dir: &Path, i: usize, name: &str) -> (PathBuf, i64) {
    let spec: DatasetSpec = "bundled:fashion-mnist".parse().unwrap();
    let test = spec.load(Split::Test).unwrap();
    let img = test.image(i).unwrap();
    let grey = image::GrayImage::from_raw(img.width as u32, img.height as u32, img.data).unwrap();
    let path = dir.join(name);
    grey.save(&path).unwrap();
    (path, test.label(i))
}

#[test]
fn predict_reads_png_and_jpeg_through_every_model_format() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).display().to_string();
    common::fmnist_teacher(&dir.path().join("fp"), 2000);
    let ft = d("ft");
    ok(&[
        "--threads",
        "1",
        "finetune",
        "--init",
        &d("fp/last.safetensors"),
        "--uniform",
        "w8a8",
        "--data",
        "bundled:fashion-mnist",
        "--limit",
        "256",
        "--test-limit",
        "100",
        "--epochs",
        "1",
        "--out",
        &ft,
    ]);
    let ck = format!("{ft}/last.safetensors");
    ok(&["export", "--checkpoint", &ck, "--out", &d("m.onnx")]);
    ok(&[
        "export",
        "--checkpoint",
        &ck,
        "--format",
        "packed",
        "--out",
        &d("m.packed.safetensors"),
    ]);

    let (png, _) = image_file(dir.path(), 0, "a.png");
    let (jpg, _) = image_file(dir.path(), 1, "b.jpg");
    let names = [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ];
    let mut tops = Vec::new();
    for model in [ck.clone(), d("m.packed.safetensors"), d("m.onnx")] {
        let out = ok(&[
            "predict",
            "--model",
            &model,
            png.to_str().unwrap(),
            jpg.to_str().unwrap(),
            "--top",
            "3",
            "--json",
        ]);
        let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
        let preds = doc.as_array().unwrap();
        assert_eq!(preds.len(), 2);
        for p in preds {
            let top = p["top"].as_array().unwrap();
            assert_eq!(top.len(), 3);
            let sum: f64 = top.iter().map(|c| c["probability"].as_f64().unwrap()).sum();
            assert!(sum <= 1.0 + 1e-9 && sum > 0.0);
            let class = top[0]["class"].as_u64().unwrap() as usize;
            assert_eq!(top[0]["name"], names[class], "{p}");
        }
        tops.push(preds[0]["top"][0]["class"].as_u64().unwrap());
    }
    // The same model in three formats gives the same top class.
    assert!(tops.iter().all(|t| *t == tops[0]), "{tops:?}");
    // The plain listing names the class the JSON document gave (a briefly fine-tuned model
    // is not reliably right, so the label itself is not checked).
    let plain = ok(&[
        "predict",
        "--model",
        &ck,
        png.to_str().unwrap(),
        "--top",
        "1",
    ]);
    assert!(plain.contains(names[tops[0] as usize]), "{plain}");

    // Bad inputs: one line each.
    std::fs::write(dir.path().join("bad.png"), b"not an image").unwrap();
    refused(
        &["predict", "--model", &ck, &d("bad.png")],
        &["bad.png", "not a readable PNG or JPEG"],
    );
    let rgb = image::RgbImage::from_pixel(28, 28, image::Rgb([10, 200, 30]));
    rgb.save(dir.path().join("rgb.png")).unwrap();
    refused(
        &["predict", "--model", &ck, &d("rgb.png")],
        &["rgb.png", "3 channels", "takes 1 channel"],
    );
    let big = image::GrayImage::from_pixel(64, 64, image::Luma([0]));
    big.save(dir.path().join("big.png")).unwrap();
    refused(
        &["predict", "--model", &ck, &d("big.png")],
        &["64×64", "28×28"],
    );
    // An ONNX model without gmpq's metadata.
    let bytes = std::fs::read(d("m.onnx")).unwrap();
    let mut proto = onnx_protobuf::ModelProto::parse_from_bytes(&bytes).unwrap();
    proto.metadata_props.clear();
    std::fs::write(d("bare.onnx"), proto.write_to_bytes().unwrap()).unwrap();
    refused(
        &["predict", "--model", &d("bare.onnx"), png.to_str().unwrap()],
        &["bare.onnx", "metadata"],
    );
}

/// Bad inputs found as a new user would: a truncated JPEG among good images (each good one is
/// printed, then one line for the bad one, exit 1), a checkpoint given as `--onnx`, an
/// export whose extension contradicts its format, `--test-limit` on eval.
#[test]
fn bad_inputs_among_good_ones_and_formats_that_contradict_names() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).display().to_string();
    let cfg = gmpq::model::ModelConfig::new(gmpq::model::Arch::ResNet20, 1, 10, 28);
    common::fp_checkpoint(&cfg, &dir.path().join("fp.safetensors"));
    let ck = d("fp.safetensors");
    let (png, _) = image_file(dir.path(), 0, "a.png");
    let (jpg, _) = image_file(dir.path(), 1, "b.jpg");
    let bytes = std::fs::read(&jpg).unwrap();
    std::fs::write(d("cut.jpg"), &bytes[..bytes.len() / 3]).unwrap();
    let o = run(&[
        "predict",
        "--model",
        &ck,
        png.to_str().unwrap(),
        &d("cut.jpg"),
        jpg.to_str().unwrap(),
        "--top",
        "1",
    ]);
    let (out, err) = (String::from_utf8_lossy(&o.stdout), stderr(&o));
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(out.contains("a.png") && out.contains("b.jpg"), "{out}");
    assert!(!out.contains("cut.jpg"), "{out}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("cut.jpg") && err.contains("not a readable"),
        "{err}"
    );

    // A checkpoint as --onnx: named as what it is.
    refused(
        &["eval", "--onnx", &ck, "--data", "bundled:fashion-mnist"],
        &["fp.safetensors", "safetensors", "--checkpoint"],
    );
    // --out's extension picks the format; a contradicting --format is refused.
    refused(
        &[
            "export",
            "--checkpoint",
            &ck,
            "--format",
            "onnx",
            "--out",
            &d("o.safetensors"),
        ],
        &["--format onnx", "o.safetensors"],
    );
    assert!(!dir.path().join("o.safetensors").exists());
    ok(&["export", "--checkpoint", &ck, "--fp", "--out", &d("o.onnx")]);
    let o = ok(&[
        "eval",
        "--checkpoint",
        &ck,
        "--onnx",
        &d("o.onnx"),
        "--data",
        "bundled:fashion-mnist",
        "--test-limit",
        "50",
    ]);
    assert!(o.contains("50 images"), "{o}");
    assert!(o.contains("integer kernels"), "{o}");
    let o = ok(&[
        "eval",
        "--onnx",
        &d("o.onnx"),
        "--unoptimized",
        "--data",
        "bundled:fashion-mnist",
        "--test-limit",
        "50",
    ]);
    assert!(
        o.contains("optimized (integer kernels) vs unoptimized"),
        "{o}"
    );
}
