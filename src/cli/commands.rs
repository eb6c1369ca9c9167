//! One function per command; each turns arguments into library calls.

use super::args::{BenchCommand, Cli, Command};
use super::progress::TrainBars;
use anyhow::{bail, Context, Result};
use gmpq::bops::BopsArgs;
use gmpq::data::SubsetCmdArgs;
use gmpq::engine::EvalArgs;
use gmpq::import::ImportArgs;
use gmpq::policy::{LayerCost, PolicyTotals};
use gmpq::train::{FinetuneArgs, QuantizeArgs, TrainArgs, TrainRequest};

pub fn run(cli: Cli) -> Result<()> {
    if let (Some(n), Ok(cores)) = (cli.engine.threads, std::thread::available_parallelism()) {
        if n > cores.get() {
            tracing::warn!(
                "--threads {n} is more than the {} cores here: the threads will share cores, \
                 which is slower than --threads {}",
                cores.get(),
                cores.get()
            );
        }
    }
    let threads = gmpq::runtime::set_threads(cli.engine.threads);
    gmpq::quant::set_kernels(cli.engine.quant_kernels);
    let mut device = gmpq::runtime::parse_device(&cli.engine.device).map_err(anyhow::Error::msg)?;
    device = join_process_group(&cli.command, device)?;
    if matches!(
        cli.command,
        Command::Train(_)
            | Command::Finetune(_)
            | Command::Search(_)
            | Command::Pipeline(_)
            | Command::Demo(_)
            | Command::Study(_)
    ) {
        // A scheduler's stop signal ends these at the next step, resumable.
        gmpq::runtime::install_stop_signals();
    }
    tracing::debug!("libtorch threads: {threads}, device: {device:?}");
    dispatch(cli.command, device)
}

/// Under torchrun or srun with several ranks: joins the process group (NCCL on CUDA, Gloo
/// on CPU) for the commands that run data-parallel, and puts each rank on its node-local
/// CUDA device. Other commands refuse to run as several ranks.
fn join_process_group(command: &Command, device: tch::Device) -> Result<tch::Device> {
    let parallel = matches!(
        command,
        Command::Train(_) | Command::Finetune(_) | Command::Search(_) | Command::Info
    );
    let launch = gmpq::dist::Rendezvous::from_vars(|n| std::env::var(n).ok())?;
    let Some(r) = launch else {
        return Ok(device);
    };
    if !parallel {
        bail!(
            "this command runs as one process, but it was launched as rank {} of {}              (train, finetune and search run data-parallel; launch others without torchrun/srun)",
            r.rank,
            r.world
        );
    }
    let device = match device {
        tch::Device::Cuda(_) => tch::Device::Cuda(r.local_rank),
        d => d,
    };
    let g = gmpq::dist::init_from_env(device.is_cuda())?;
    if let Some(g) = g {
        let args: Vec<String> = std::env::args().skip(1).collect();
        g.check_same_settings(&gmpq::dist::settings_of(&args))?;
        tracing::info!(
            "rank {} of {} ({:?}, local rank {}, device {device:?})",
            g.rank,
            g.world,
            g.backend,
            g.local_rank
        );
    }
    Ok(device)
}

/// Runs one parsed command (the pipeline runs its stages through here too).
pub(super) fn dispatch(command: Command, device: tch::Device) -> Result<()> {
    match command {
        Command::Train(a) => train_cmd(a, device),
        Command::Finetune(a) => finetune_cmd(a, device),
        Command::Eval(a) => eval_cmd(a, device),
        Command::Import(a) => import_cmd(a),
        Command::Subset(a) => subset_cmd(a),
        Command::Bops(a) => bops_cmd(a),
        Command::Quantize(a) => quantize_cmd(a, device),
        Command::Search(a) => super::search::search_cmd(a, device),
        Command::Extract(a) => super::search::extract_cmd(a),
        Command::Export(a) => super::deploy::export_cmd(a),
        Command::Predict(a) => super::deploy::predict_cmd(a),
        Command::Attribution(a) => super::search::attribution_cmd(a, device),
        Command::Demo(a) => super::pipeline::demo_cmd(a, device),
        Command::Pipeline(a) => super::pipeline::pipeline_cmd(a, device),
        Command::Study(a) => {
            super::study::study_cmd(a, tch::get_num_threads().max(1) as usize, device)
        }
        Command::Report(a) => {
            let page = gmpq::pipeline::write_run_report(&a.run_dir)
                .with_context(|| format!("writing the report of {}", a.run_dir.display()))?;
            println!("{}", page.display());
            Ok(())
        }
        Command::Info => info_cmd(device),
        Command::Bench(BenchCommand::Train(a)) => print_bench(&a.run(device)?, a.json),
        Command::Bench(BenchCommand::Infer(a)) => super::deploy::bench_infer_cmd(a),
        Command::Bench(BenchCommand::SearchStep(a)) => print_bench(&a.run(device)?, a.json),
    }
}

/// `gmpq info`: the versions loaded, the threads, the devices, the process group (checked
/// with one all-reduce) and ONNX Runtime.
fn info_cmd(device: tch::Device) -> Result<()> {
    println!("gmpq {}", env!("CARGO_PKG_VERSION"));
    match gmpq::runtime::loaded_libtorch() {
        Some((lib, version)) => println!(
            "libtorch: {} ({})",
            version
                .as_deref()
                .unwrap_or("version not recorded beside it"),
            lib.display()
        ),
        None => {
            println!("libtorch: loaded, but its library was not found in the process's memory map")
        }
    }
    println!("threads: {}", tch::get_num_threads());
    for var in [
        gmpq::runtime::OMP_WAIT_POLICY,
        gmpq::runtime::GOMP_SPINCOUNT,
    ] {
        let value = std::env::var(var).unwrap_or_else(|_| "(unset)".into());
        println!("{var}: {value}");
    }
    println!("cuda available: {}", tch::Cuda::is_available());
    println!("cuda devices: {}", tch::Cuda::device_count());
    println!("cudnn available: {}", tch::Cuda::cudnn_is_available());
    println!("device: {device:?}");
    if let Some(g) = gmpq::dist::current() {
        // One all-reduce of every rank's number: proves the group computes.
        let t = tch::Tensor::from_slice(&[g.rank as f64 + 1.0]);
        let started = std::time::Instant::now();
        g.all_reduce_sum(&t)?;
        let sum = t.double_value(&[0]);
        let expected = (g.world * (g.world + 1) / 2) as f64;
        println!(
            "process group: rank {} of {} ({:?}), all-reduce check {} ({sum} = {expected}, {:.1} ms)",
            g.rank,
            g.world,
            g.backend,
            if sum == expected { "passed" } else { "FAILED" },
            started.elapsed().as_secs_f64() * 1e3
        );
        if sum != expected {
            bail!("the process group's all-reduce gave {sum}, not {expected}");
        }
    } else {
        println!("process group: none (a single process)");
    }
    match gmpq::engine::runtime_library()
        .and_then(|lib| gmpq::engine::runtime_available().map(|_| lib))
    {
        Ok(lib) => println!(
            "onnx runtime: {} ({})",
            gmpq::engine::runtime_build_info().unwrap_or("build info unavailable"),
            lib.display()
        ),
        Err(e) => println!("onnx runtime: unavailable ({e})"),
    }
    Ok(())
}

fn print_bench(r: &gmpq::bench::BenchResult, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    println!(
        "{} ({}, {}, {} quantizers) batch {} input {:?} threads {}: {:.1} img/s (median step {:.4} s over {} steps)",
        r.model, r.precision, r.param_layout, r.kernels, r.batch_size, r.input, r.threads,
        r.images_per_second, r.median_step_seconds, r.steps
    );
    Ok(())
}

fn train_cmd(a: TrainArgs, device: tch::Device) -> Result<()> {
    let request = a.request(None)?;
    run_training(request, a.json, device)
}

fn finetune_cmd(a: FinetuneArgs, device: tch::Device) -> Result<()> {
    let json = a.train.json;
    let init = a.init()?.to_path_buf();
    let request = a
        .request()
        .with_context(|| format!("fine-tuning from {}", init.display()))?;
    run_training(request, json, device)
}

fn run_training(request: TrainRequest, json: bool, device: tch::Device) -> Result<()> {
    let bars = TrainBars::new();
    let outcome = request.run(device, &bars)?;
    if !gmpq::dist::is_main() {
        return Ok(()); // rank 0 reports
    }
    let meta = &outcome.meta;
    let last = meta.history.last().context("no epoch was run")?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "checkpoint": outcome.checkpoint,
                "epochs": meta.epoch,
                "final": last,
                "seconds_per_epoch": meta.history.iter().map(|m| m.seconds).sum::<f64>() / meta.history.len() as f64,
            }))?
        );
    } else {
        println!("{}", outcome.one_line());
    }
    Ok(())
}

fn eval_cmd(a: EvalArgs, device: tch::Device) -> Result<()> {
    let request = a.request()?;
    let outcome = request.run(device)?;
    if a.json {
        println!("{}", outcome.json()?);
    } else {
        if request.onnx.is_some() {
            let cpu = gmpq::engine::CpuInfo::detect();
            println!(
                "CPU: {}; ONNX Runtime's integer kernels: {}",
                cpu.model,
                cpu.integer_kernel_path()
            );
        }
        println!("{}", outcome.line(&request.data));
    }
    Ok(())
}

fn import_cmd(a: ImportArgs) -> Result<()> {
    let ck = a
        .run()
        .with_context(|| format!("importing {}", a.source().display()))?;
    println!(
        "wrote {} ({} tensors) and its metadata {}",
        a.out.display(),
        ck.tensors.len(),
        gmpq::checkpoint::sidecar_path(&a.out).display()
    );
    match a.check_against_runtime(&ck) {
        Ok(Some(line)) => println!("{line}"),
        Ok(None) => {}
        Err(e) => println!("not checked against ONNX Runtime: {e}"),
    }
    Ok(())
}

fn subset_cmd(a: SubsetCmdArgs) -> Result<()> {
    for s in a.write()? {
        println!(
            "{}: {} of {} images → {}",
            s.prefix,
            s.kept,
            s.of,
            a.out.display()
        );
    }
    Ok(())
}

fn fmt_bits(b: Option<u32>) -> String {
    b.map_or("fp32".into(), |b| b.to_string())
}

fn print_bops_table(rows: &[LayerCost], totals: &PolicyTotals) {
    println!(
        "{:<24} {:>22} {:>14} {:>10} {:>5} {:>5} {:>18} {:>10}",
        "layer", "shape", "MACs", "params", "w", "a", "BOPs", "size KB"
    );
    for r in rows {
        println!(
            "{:<24} {:>22} {:>14} {:>10} {:>5} {:>5} {:>18} {:>10.2}",
            r.name,
            r.shape,
            r.macs,
            r.params,
            fmt_bits(r.w_bits),
            fmt_bits(r.a_bits),
            r.bops,
            r.size_bits as f64 / 8e3
        );
    }
    let q_macs: u64 = rows.iter().filter(|r| r.quantized()).map(|r| r.macs).sum();
    println!(
        "quantized layers: {} layers, {} MACs, {:.4} G BOPs ({:.1} M)",
        rows.iter().filter(|r| r.quantized()).count(),
        q_macs,
        totals.bops as f64 / 1e9,
        totals.bops as f64 / 1e6
    );
    println!(
        "full-precision layers (stem, head; not in the policy's BOPs): {:.4} G BOPs",
        totals.fp_layers_bops as f64 / 1e9
    );
    println!(
        "full-precision model: {:.4} G BOPs, {:.3} MB; compression {:.2}x; policy size {:.3} MB",
        totals.fp_bops as f64 / 1e9,
        totals.fp_size_mb,
        totals.compression,
        totals.size_mb
    );
}

fn bops_cmd(a: BopsArgs) -> Result<()> {
    let costs = a.measure()?;
    if let Some(w) = &costs.warning {
        eprintln!("warning: {w}");
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&costs)?);
        return Ok(());
    }
    let cfg = &costs.model;
    println!(
        "{} ({} ch, {}x{} input, {} classes)",
        cfg.arch, cfg.in_channels, cfg.input_size, cfg.input_size, cfg.num_classes
    );
    print_bops_table(&costs.layers, &costs.totals);
    Ok(())
}

fn quantize_cmd(a: QuantizeArgs, device: tch::Device) -> Result<()> {
    let request = a.request()?;
    let r = request.run(device)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "FP top-1 {:.2}% → quantized top-1 {:.2}% (drop {:.2} pt), top-5 {:.2}%, on {} images",
        r.fp.top1,
        r.quantized.top1,
        r.fp.top1 - r.quantized.top1,
        r.quantized.top5,
        r.quantized.images
    );
    println!(
        "top-1 agreement with the FP model: {}/{} images",
        r.top1_agreement, r.images
    );
    println!(
        "policy: {:.4} G BOPs, compression {:.2}x, size {:.3} MB; saved {}",
        r.totals.bops as f64 / 1e9,
        r.totals.compression,
        r.totals.size_mb,
        a.out.display()
    );
    Ok(())
}
