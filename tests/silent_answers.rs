//! Every flag takes effect or is refused, every failed run says so: one case per numbered item
//! of the issue on silent wrong answers, each run through the binary as a user would. Every
//! refusal exits non-zero with a short error that names what is wrong, and writes nothing.

mod common;

use common::{gmpq, stderr};
use gmpq::checkpoint::{self, Checkpoint, CheckpointMeta};
use gmpq::data::{Normalize, Pipeline};
use gmpq::model::{Arch, ModelConfig};
use gmpq::policy::Policy;
use gmpq::quant::{self, Precision};
use gmpq::search::{PolicyMeta, Preferences, Target};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Output;

fn fmnist_r20() -> ModelConfig {
    ModelConfig::new(Arch::ResNet20, 1, 10, 28)
}

/// A searched-looking policy of ResNet-20 (1×28×28) at uniform w4a4 for `target`, with α.
fn policy(target: Target) -> Policy {
    let cfg = fmnist_r20();
    let net = quant::build(&cfg, Precision::Full, tch::Device::Cpu).unwrap();
    let mut p = Policy::uniform(&cfg, net.net.convs(), 4, 4);
    p.candidates = gmpq::policy::Candidates::new(&[2, 3, 4, 6], &[2, 3, 4, 6]).unwrap();
    let alpha: BTreeMap<String, Vec<f64>> = p
        .layers
        .iter()
        .map(|l| (l.name.clone(), vec![0.0, 0.0, 1.0, 0.0]))
        .collect();
    let meta = PolicyMeta {
        model_config: Some(cfg),
        alpha: Some(Preferences {
            alpha_w: alpha.clone(),
            alpha_a: alpha,
            temperature: 1.0,
            bits: None,
        }),
        ..PolicyMeta::new("gmpq", Some(target), Default::default())
    };
    p.meta = Some(meta.to_value());
    p
}

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let f = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        common::fp_checkpoint(&fmnist_r20(), &f.path("r20.safetensors"));
        let mut other = ModelConfig::new(Arch::ResNet20, 3, 10, 32);
        other.stem = gmpq::model::Stem::Cifar;
        common::fp_checkpoint(&other, &f.path("r20-rgb.safetensors"));
        policy(Target::Compression(64.0))
            .save(&f.path("p64.json"))
            .unwrap();
        f
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn p(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }
}

fn run(args: &[String]) -> Output {
    gmpq().args(args).output().expect("failed to start gmpq")
}

/// Runs `args`, which must fail with a short error holding every needle.
fn refused(args: &[String], needles: &[&str]) -> String {
    let o = run(args);
    let e = stderr(&o);
    assert!(!o.status.success(), "{args:?} succeeded: {e}");
    assert_ne!(o.status.code(), Some(101), "{args:?} panicked: {e}");
    for n in needles {
        assert!(e.contains(n), "{args:?}: '{n}' not in: {e}");
    }
    let lines = e.trim().lines().count();
    assert!(lines <= 5, "{args:?}: {lines} lines: {e}");
    assert!(e.len() < 1200, "{args:?}: {} bytes: {e}", e.len());
    e
}

fn args(s: &str, f: &Fixture) -> Vec<String> {
    shell_words::split(s)
        .unwrap()
        .into_iter()
        .map(|a| match a.strip_prefix('@') {
            Some(name) => f.p(name),
            None => a,
        })
        .collect()
}

/// 1. A search into a folder that holds another request's policy is refused (it printed
///    "exists, kept" and exited 0); with --json, stdout stays one JSON document.
#[test]
fn a_search_folder_refuses_another_request() {
    let f = Fixture::new();
    let d = f.path("search");
    std::fs::create_dir_all(&d).unwrap();
    policy(Target::Compression(64.0))
        .save(&d.join("policy.json"))
        .unwrap();
    let cmd = "search --teacher @r20.safetensors --data bundled:fashion-mnist --limit 128 \
               --val-limit 20 --epochs 2 --batch-size 64 --out @search --json";
    let e = refused(
        &args(&format!("{cmd} --target-compression 32"), &f),
        &["compression-64x", "--out"],
    );
    assert!(!e.contains("kept"), "{e}");
    // A folder whose recorded request differs names the changed setting; the same request
    // keeps its policy and says so in JSON.
    std::fs::remove_dir_all(&d).unwrap();
    let o = run(&args(
        &format!("--threads 1 {cmd} --target-compression 64"),
        &f,
    ));
    assert!(o.status.success(), "{}", stderr(&o));
    refused(
        &args(&format!("{cmd} --target-compression 32"), &f),
        &["holds another search", "targets"],
    );
    let o = run(&args(&format!("{cmd} --target-compression 64"), &f));
    assert!(o.status.success(), "{}", stderr(&o));
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON document");
    assert_eq!(doc["kept"].as_array().map(Vec::len), Some(1), "{doc}");
}

/// 2. Flags that do not shape the chosen model are refused, from one table.
#[test]
fn flags_that_would_be_ignored_are_refused() {
    let f = Fixture::new();
    for extra in ["--stem imagenet", "--width 0.5", "--input-size 32", "--rgb"] {
        let flag = extra.split(' ').next().unwrap();
        refused(
            &args(
                &format!(
                    "finetune --init @r20.safetensors --uniform w4a4 --data bundled:fashion-mnist \
                     --limit 200 --epochs 1 --out @ft {extra}"
                ),
                &f,
            ),
            &[flag, "--init"],
        );
    }
    assert!(
        !f.path("ft").exists(),
        "a refused finetune wrote its folder"
    );
    for (cmd, needles) in [
        (
            "train --model resnet20 --stem imagenet --out @t",
            &["--stem", "resnet20"][..],
        ),
        (
            "train --model resnet20 --width 0.5 --out @t",
            &["--width", "resnet20"],
        ),
        (
            "bench infer --model resnet20 --stem imagenet",
            &["--stem", "resnet20"],
        ),
        (
            "bops --model resnet32 --policy @p64.json",
            &["--model", "--policy"],
        ),
        (
            "bops --policy @p64.json --input-size 64",
            &["--input-size", "--policy"],
        ),
        (
            "bops --policy @p64.json --channels 3 --classes 100",
            &["--channels", "--policy"],
        ),
        (
            "bops --model mobilenetv2 --checkpoint @r20.safetensors",
            &["--model", "--checkpoint"],
        ),
    ] {
        refused(&args(cmd, &f), needles);
    }
}

/// 3. A diverged run fails and keeps no bad checkpoint; impossible settings are refused.
#[test]
fn diverged_runs_and_impossible_settings_fail() {
    let f = Fixture::new();
    refused(
        &args(
            "--threads 1 train --lr 1e6 --epochs 1 --limit 300 --test-limit 100 --out @div",
            &f,
        ),
        &["diverged", "epoch 1"],
    );
    assert!(!f.path("div/last.safetensors").exists());
    for (cmd, flag) in [
        ("train --momentum 5 --out @t", "--momentum 5"),
        (
            "train --schedule step:0:0.1 --out @t",
            "--schedule step:0:0.1",
        ),
        (
            "train --crop-padding 1000 --limit 100 --out @t",
            "--crop-padding 1000",
        ),
        (
            "search --teacher @r20.safetensors --data bundled:fashion-mnist --limit 100 \
             --attribution-weight -5 --out @s",
            "--attribution-weight -5",
        ),
    ] {
        refused(&args(cmd, &f), &[flag]);
    }
}

/// 4. Every reader validates a policy file's bits (bops printed 68.16× for 0/1/40 bits).
#[test]
fn policy_bits_out_of_range_are_refused_by_every_reader() {
    let f = Fixture::new();
    for bits in [0, 1, 40] {
        let mut p = policy(Target::Compression(64.0));
        p.layers[1].w_bits = bits;
        let path = f.path(&format!("bad{bits}.json"));
        std::fs::write(&path, serde_json::to_vec(&p).unwrap()).unwrap();
        let path = path.display().to_string();
        for cmd in [
            format!("bops --policy {path}"),
            format!("extract {path} --target-compression 64 --out {path}.x.json"),
        ] {
            refused(&args(&cmd, &f), &["outside the supported 2..=16"]);
        }
    }
}

/// 5. An ONNX model exported from another checkpoint is not compared as if it were the same.
#[test]
fn eval_refuses_an_onnx_model_of_another_checkpoint() {
    let f = Fixture::new();
    let mut cfg = fmnist_r20();
    cfg.num_classes = 10;
    tch::manual_seed(1);
    let net = quant::build(&cfg, Precision::Full, tch::Device::Cpu).unwrap();
    Checkpoint {
        meta: CheckpointMeta::new(
            cfg.clone(),
            Pipeline {
                transforms: vec![],
                normalize: Normalize::identity(1),
            },
        ),
        tensors: checkpoint::var_store_tensors(&net.vs),
    }
    .save(&f.path("other.safetensors"))
    .unwrap();
    let export = args(
        "export --checkpoint @other.safetensors --format onnx --fp --out @other.onnx",
        &f,
    );
    let o = run(&export);
    assert!(o.status.success(), "export: {}", stderr(&o));
    refused(
        &args(
            "eval --checkpoint @r20.safetensors --onnx @other.onnx --data bundled:fashion-mnist \
             --limit 50",
            &f,
        ),
        &["was not exported from", "r20.safetensors"],
    );
    // Its own export compares.
    let own = args(
        "eval --checkpoint @other.safetensors --onnx @other.onnx --data bundled:fashion-mnist \
         --limit 50",
        &f,
    );
    let o = run(&own);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// 6. extract refuses missing or mis-sized α instead of reading zeros.
#[test]
fn extract_refuses_missing_or_missized_alpha() {
    let f = Fixture::new();
    for (i, damage) in ["missing", "short"].into_iter().enumerate() {
        let mut p = policy(Target::Compression(64.0));
        let mut meta = PolicyMeta::of(&p).unwrap().unwrap();
        let alpha = meta.alpha.as_mut().unwrap();
        let name = p.layers[2].name.clone();
        match damage {
            "missing" => {
                alpha.alpha_w.remove(&name);
            }
            _ => {
                alpha.alpha_a.insert(name.clone(), vec![9.0, 0.0]);
            }
        }
        p.meta = Some(meta.to_value());
        let path = f.path(&format!("alpha{i}.json"));
        p.save(&path).unwrap();
        refused(
            &args(
                &format!(
                    "extract {} --target-compression 64 --out @x.json",
                    path.display()
                ),
                &f,
            ),
            &[&name, "α"],
        );
    }
}

/// 7. attribution with a network that cannot take the images is an error, not a panic.
#[test]
fn attribution_checks_every_network_against_the_data() {
    let f = Fixture::new();
    refused(
        &args(
            "attribution --checkpoint @r20.safetensors --compare @r20-rgb.safetensors \
             --data bundled:fashion-mnist --out @a.png",
            &f,
        ),
        &["r20-rgb.safetensors", "1×28×28"],
    );
    refused(
        &args(
            "attribution --checkpoint @r20.safetensors --data bundled:fashion-mnist --limit 5000 \
             --out @a.png",
            &f,
        ),
        &["--limit 5000", "1000 images"],
    );
    refused(
        &args(
            "attribution --checkpoint @r20.safetensors --data bundled:fashion-mnist --out @a.jpg",
            &f,
        ),
        &["--out", ".png"],
    );
    // The grid has a row of column labels: white glyphs above every column.
    let ok = run(&args(
        "attribution --checkpoint @r20.safetensors --compare @r20.safetensors \
         --data bundled:fashion-mnist --limit 2 --out @a.png",
        &f,
    ));
    assert!(ok.status.success(), "{}", stderr(&ok));
    let png = image::open(f.path("a.png")).unwrap().to_rgb8();
    let columns = 3;
    let col = png.width() / columns;
    for k in 0..columns {
        let white = (k * col..(k + 1) * col)
            .flat_map(|x| (0..12).map(move |y| (x, y)))
            .filter(|&(x, y)| png.get_pixel(x, y).0 == [255, 255, 255])
            .count();
        assert!(white > 10, "column {k} has no label");
    }
}

/// 8. subset checks both splits before it writes either.
#[test]
fn subset_writes_nothing_when_a_split_is_refused() {
    let f = Fixture::new();
    let mnist = common::bundled("mnist").display().to_string();
    for test in ["0", "999999"] {
        refused(
            &args(
                &format!("subset --data idx:{mnist} --train 10 --test {test} --out @sub"),
                &f,
            ),
            &["--test"],
        );
        assert!(
            !f.path("sub").exists(),
            "--test {test}: wrote the train split"
        );
    }
}

/// 9. Mismatch errors name the differing fields briefly instead of dumping structures.
#[test]
fn mismatch_errors_are_short() {
    let f = Fixture::new();
    let ft = |uniform: &str| {
        args(
            &format!(
                "--threads 1 finetune --init @r20.safetensors --uniform {uniform} \
                 --data bundled:fashion-mnist --limit 128 --test-limit 50 --epochs 1 \
                 --batch-size 64 --calib-limit 64 --out @ft --resume"
            ),
            &f,
        )
    };
    let o = run(&ft("w4a4"));
    assert!(o.status.success(), "{}", stderr(&o));
    refused(&ft("w2a2"), &["cannot resume", "precision", "was 4, now 2"]);
    // A file of another network's weights: counts and the first names, not thousands.
    let mut cfg = ModelConfig::new(Arch::MobileNetV2, 3, 1000, 224);
    cfg.stem = gmpq::model::Stem::Imagenet;
    let (vs, _) = gmpq::train::build_fp(&cfg, tch::Device::Cpu).unwrap();
    let tensors = checkpoint::var_store_tensors(&vs);
    let named: Vec<(String, tch::Tensor)> = tensors.into_iter().collect();
    tch::Tensor::write_safetensors(&named, f.path("mbv2.safetensors")).unwrap();
    refused(
        &args(
            "import --model resnet18 --weights @mbv2.safetensors --out @r18.safetensors",
            &f,
        ),
        &["missing (", "unexpected (", ", …"],
    );
    // 12. A successful import names the metadata file it writes beside the weights.
    let o = run(&args(
        "import --model mobilenetv2 --weights @mbv2.safetensors --out @mbv2-ck.safetensors",
        &f,
    ));
    assert!(o.status.success(), "{}", stderr(&o));
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(said.contains("mbv2-ck.json"), "{said}");
}

/// 10. Errors name the flag that is wrong.
#[test]
fn errors_name_the_flag() {
    let f = Fixture::new();
    for (cmd, flag) in [
        (
            "search --teacher @r20.safetensors --data bundled:fashion-mnist --val-limit 0",
            "--val-limit",
        ),
        ("train --per-class 0 --out @t", "--per-class"),
        ("train --limit 0 --out @t", "--limit"),
        (
            "quantize --checkpoint @r20.safetensors --uniform w8a8 --calib-limit 0 --out @q",
            "--calib-limit",
        ),
        (
            "eval --checkpoint @r20.safetensors --data bundled:fashion-mnist --batch-size 0",
            "--batch-size",
        ),
        (
            "search --teacher @r20.safetensors --data bundled:fashion-mnist --epochs 0",
            "--epochs",
        ),
        ("--threads -1 info", "--threads"),
        ("--threads 0 info", "--threads"),
        ("train --lr -1 --out @t", "--lr"),
    ] {
        let e = refused(&args(cmd, &f), &[flag]);
        assert!(!e.contains("alpha-frozen"), "{cmd}: {e}");
    }
}

/// 11 and 12. Help says what the commands do; notes where a budget or a teacher is useless.
#[test]
fn help_and_notes_tell_the_truth() {
    let help = |cmd: &[&str]| {
        let o = gmpq().args(cmd).arg("--help").output().unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let export = help(&["export"]);
    assert!(!export.contains("integer inference"), "{export}");
    let quantize = help(&["quantize"]);
    assert!(quantize.contains("--calib-limit <N>"), "{quantize}");
    assert!(quantize.contains("largest absolute value"), "{quantize}");
    let eval = help(&["eval"]);
    assert!(!eval.contains("<EVAL_LIMIT>") && !eval.contains("<CALIB_IMAGES>"));
    let search = help(&["search"]);
    assert!(search.contains("--val-limit <N>"), "{search}");

    // A budget above the costliest policy and a teacher at chance are both said.
    let f = Fixture::new();
    let o = run(&args(
        "--threads 1 search --teacher @r20.safetensors --data bundled:fashion-mnist --limit 128 \
         --val-limit 50 --epochs 2 --batch-size 64 --target-size-mb 100 --out @s",
        &f,
    ));
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("constrains nothing"), "{e}");
    assert!(e.contains("chance"), "{e}");
}
