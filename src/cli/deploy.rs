//! `gmpq export`: ONNX (QDQ or float) and packed safetensors.

use super::{ExportArgs, ExportFormat};
use anyhow::{bail, Context, Result};
use gmpq::export::{onnx, Format};
use gmpq::quant::Precision;

/// Export reads the checkpoint's tensors on the CPU, whatever `--device` says.
pub(super) fn export_cmd(a: ExportArgs) -> Result<()> {
    if a.fp && a.format != ExportFormat::Onnx {
        bail!("--fp applies to --format onnx only");
    }
    let (ck, network) = gmpq::export::load(&a.checkpoint, tch::Device::Cpu)
        .with_context(|| format!("loading {}", a.checkpoint.display()))?;
    if let Some(dir) = a.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let format = match (a.format, a.fp) {
        (ExportFormat::Onnx, false) => Format::Onnx,
        (ExportFormat::Onnx, true) => Format::OnnxFloat,
        (ExportFormat::Packed, _) => Format::Packed,
    };
    let bytes = format
        .write(&ck, &network)
        .with_context(|| format!("exporting {}", a.checkpoint.display()))?;
    gmpq::files::write_atomic(&a.out, &bytes)
        .with_context(|| format!("writing {}", a.out.display()))?;
    match a.format {
        ExportFormat::Onnx => {
            let kind = match (&network.precision, a.fp) {
                (
                    Precision::Fixed {
                        numerics: gmpq::quant::Numerics::Integer,
                        ..
                    },
                    false,
                ) => "integer",
                (Precision::Fixed { .. }, false) => "QDQ",
                _ => "float",
            };
            println!(
                "wrote {} ({kind} ONNX, opset {}, {:.3} MB)",
                a.out.display(),
                onnx::OPSET,
                bytes.len() as f64 / 1e6
            );
        }
        ExportFormat::Packed => {
            let size = bytes.len();
            let Some(Precision::Fixed { policy, .. }) = &ck.meta.precision else {
                bail!("not a fixed-policy checkpoint");
            };
            let expected = policy_size_bytes(&network, policy);
            if network.integer.is_some() {
                println!(
                    "wrote {}: {:.4} MB on disk, the integer graph ONNX Runtime runs (gmpq eval \
                     --onnx, gmpq predict --model); policy size {:.4} MB, the rest (int32 \
                     biases, scales, graph) {:.4} MB",
                    a.out.display(),
                    size as f64 / 1e6,
                    expected.0 / 1e6,
                    (size as f64 - expected.0) / 1e6,
                );
                return Ok(());
            }
            println!(
                "wrote {}: {:.4} MB on disk; policy size {:.4} MB + float parts {:.4} MB = {:.4} MB ({:+.1}%)",
                a.out.display(),
                size as f64 / 1e6,
                expected.0 / 1e6,
                expected.1 / 1e6,
                (expected.0 + expected.1) / 1e6,
                100.0 * (size as f64 / (expected.0 + expected.1) - 1.0)
            );
        }
    }
    Ok(())
}

/// The policy's model size in bytes (quantized kernels at their bits, the FP stem and head at
/// 32 bits, as METHOD.md counts it) and the other float tensors' bytes (batch norm, clips,
/// thresholds, biases).
fn policy_size_bytes(network: &gmpq::quant::Network, policy: &gmpq::policy::Policy) -> (f64, f64) {
    let size = policy
        .cost(network.net.convs(), network.net.fc_spec())
        .1
        .size_mb
        * 1e6;
    let counted: std::collections::HashSet<String> = network
        .net
        .convs()
        .iter()
        .map(|c| format!("{}.weight", c.name))
        .chain(["fc.weight".to_string(), "fc.bias".to_string()])
        .collect();
    let other: usize = network
        .vs
        .variables()
        .iter()
        .filter(|(n, _)| !counted.contains(*n))
        .map(|(_, t)| t.numel() * 4)
        .sum();
    (size, other as f64)
}

pub(super) fn predict_cmd(a: super::PredictArgs) -> Result<()> {
    let threads = tch::get_num_threads().max(1) as usize;
    let mut predictor = gmpq::predict::Predictor::open(&a.model, threads)
        .with_context(|| format!("loading {}", a.model.display()))?;
    let predictions = predictor.predict(&a.images, a.top)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&predictions)?);
        return Ok(());
    }
    for p in &predictions {
        println!("{}", p.image.display());
        for c in &p.top {
            let name = c
                .name
                .as_deref()
                .map_or(String::new(), |n| format!("  {n}"));
            println!("  {:>6.2}%  class {}{name}", 100.0 * c.probability, c.class);
        }
    }
    Ok(())
}

pub(super) fn bench_infer_cmd(a: super::BenchInferArgs) -> Result<()> {
    use gmpq::model::{Arch, ModelConfig, Stem};
    let arch: Arch = a.model.parse()?;
    let mut cfg = ModelConfig::new(arch, a.channels, a.classes, a.input_size);
    if let Some(stem) = &a.stem {
        use gmpq::model::options::{check_options, ModelOption, ModelSource};
        check_options(ModelSource::Named(arch), &[ModelOption::Stem])?;
        cfg.stem = stem.parse::<Stem>()?;
    }
    let policy = if a.mixed {
        let geometry = super::commands::model_geometry(&cfg)?;
        gmpq::policy::Policy::cycled(&cfg, geometry.convs(), &[2, 3, 4, 6], &[6, 4, 3, 2])
    } else {
        super::commands::uniform_policy(&cfg, &a.uniform)?
    };
    let threads = tch::get_num_threads().max(1) as usize;
    let report =
        gmpq::bench::bench_infer(&cfg, policy, &a.batch_sizes, a.warmup, a.steps, threads)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "CPU: {} ({} cores), features: {}",
        report.cpu.model,
        report.cpu.cores,
        if report.cpu.features.is_empty() {
            "none of avx2/avx512/vnni/amx".to_string()
        } else {
            report.cpu.features.join(", ")
        }
    );
    for r in &report.results {
        println!(
            "{} {:?} {:<19} batch {:>3} threads {}: {:>8.1} img/s (median batch {:.5} s)",
            r.model,
            r.input,
            r.engine,
            r.batch_size,
            r.threads,
            r.images_per_second,
            r.median_batch_seconds
        );
    }
    let list = |ops: &std::collections::BTreeMap<String, usize>| {
        ops.iter()
            .map(|(k, v)| format!("{k}×{v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "ONNX Runtime's optimized integer graph ({} quantized convs): {}",
        report.quantized_convs,
        list(&report.integer_optimized_ops)
    );
    println!(
        "ONNX Runtime's optimized QDQ graph: {}",
        list(&report.qdq_optimized_ops)
    );
    Ok(())
}
