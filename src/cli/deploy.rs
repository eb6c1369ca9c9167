//! `gmpq export`: ONNX (QDQ or float) and packed safetensors.

use anyhow::{Context, Result};
use gmpq::export::{ExportArgs, Exported};

pub(super) fn export_cmd(a: ExportArgs) -> Result<()> {
    let exported = a
        .run()
        .with_context(|| format!("exporting {}", a.checkpoint.display()))?;
    let out = a.out.display();
    let mb = |b: f64| b / 1e6;
    match exported {
        Exported::Onnx { kind, bytes, risks } => {
            println!(
                "wrote {out} ({kind} ONNX, opset {}, {:.3} MB)",
                gmpq::export::onnx::OPSET,
                mb(bytes as f64)
            );
            // A fake-quant graph keeps the policy's 8-bit weights as trained; say where
            // ONNX Runtime's int8 kernels may answer differently on CPUs without VNNI.
            for r in &risks {
                eprintln!(
                    "warning: {r}; fine-tune with --numerics integer for a graph that computes \
                     the same on every CPU"
                );
            }
        }
        Exported::Packed {
            bytes,
            policy_bytes,
            integer: true,
            ..
        } => println!(
            "wrote {out}: {:.4} MB on disk, the integer graph ONNX Runtime runs (gmpq eval \
             --onnx, gmpq predict --model); policy size {:.4} MB, the rest (int32 biases, \
             scales, graph) {:.4} MB",
            mb(bytes as f64),
            mb(policy_bytes),
            mb(bytes as f64 - policy_bytes),
        ),
        Exported::Packed {
            bytes,
            policy_bytes,
            float_bytes,
            integer: false,
        } => println!(
            "wrote {out}: {:.4} MB on disk; policy size {:.4} MB + float parts {:.4} MB = {:.4} MB ({:+.1}%)",
            mb(bytes as f64),
            mb(policy_bytes),
            mb(float_bytes),
            mb(policy_bytes + float_bytes),
            100.0 * (bytes as f64 / (policy_bytes + float_bytes) - 1.0)
        ),
    }
    Ok(())
}

pub(super) fn predict_cmd(a: gmpq::predict::PredictArgs) -> Result<()> {
    let threads = tch::get_num_threads().max(1) as usize;
    let mut predictor = gmpq::predict::Predictor::open(&a.model, threads)
        .with_context(|| format!("loading {}", a.model.display()))?;
    let (mut predictions, mut failures) = (Vec::new(), Vec::new());
    for result in predictor.predict_each(&a.images, a.top)? {
        match result {
            Ok(p) => predictions.push(p),
            Err(e) => failures.push(e),
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&predictions)?);
    } else {
        print_predictions(&predictions);
    }
    // Every good image is printed first; then one line per bad one, and the exit status
    // says so.
    if let Some((last, rest)) = failures.split_last() {
        for e in rest {
            eprintln!("error: {e}");
        }
        anyhow::bail!("{last}");
    }
    Ok(())
}

fn print_predictions(predictions: &[gmpq::predict::Prediction]) {
    for p in predictions {
        println!("{}", p.image.display());
        for c in &p.top {
            let name = c
                .name
                .as_deref()
                .map_or(String::new(), |n| format!("  {n}"));
            println!("  {:>6.2}%  class {}{name}", 100.0 * c.probability, c.class);
        }
    }
}

pub(super) fn bench_infer_cmd(a: gmpq::bench::BenchInferArgs) -> Result<()> {
    let report = a.run(tch::get_num_threads().max(1) as usize)?;
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
    println!("integer kernels: {}", report.cpu.integer_kernel_path());
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
        "  of which compute in float: {}",
        list(&report.integer_float_ops)
    );
    println!(
        "ONNX Runtime's optimized QDQ graph: {}",
        list(&report.qdq_optimized_ops)
    );
    Ok(())
}
