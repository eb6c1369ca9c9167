//! One function per command; each turns arguments into library calls.

use super::progress::TrainBars;
use super::{
    BenchCommand, BopsArgs, Cli, Command, EvalArgs, FinetuneArgs, ImportArgs, ModelArgs,
    PolicyChoice, QuantizeArgs, SplitArg, SubsetCmdArgs, TrainArgs,
};
use anyhow::{bail, Context, Result};
use gmpq::checkpoint::Checkpoint;
use gmpq::data::{stratified_subset, DatasetSpec, ImageSource, Split, SubsetSpec};
use gmpq::model::options::{check_options, ModelOption, ModelSource};
use gmpq::model::Model;
use gmpq::model::{Arch, ModelConfig, Stem};
use gmpq::policy::{LayerCost, Policy, PolicyError, PolicySource, PolicyTotals};
use gmpq::quant::Precision;
use gmpq::train::{self, Augment, TrainRequest};

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
        Command::Bench(BenchCommand::Train(a)) => bench_train_cmd(a, device),
        Command::Bench(BenchCommand::Infer(a)) => super::deploy::bench_infer_cmd(a),
        Command::Bench(BenchCommand::SearchStep(a)) => {
            let arch: Arch = a.model.parse()?;
            let cfg = ModelConfig::new(arch, a.channels, a.classes, a.input_size);
            let r = gmpq::bench::bench_search_step(
                &cfg,
                a.bits.candidates()?,
                a.batch_size,
                a.warmup,
                a.steps,
                device,
            )?;
            print_bench(&r, a.json)
        }
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

/// `gmpq bench train`: images per second of the full training step.
fn bench_train_cmd(a: super::BenchTrainArgs, device: tch::Device) -> Result<()> {
    let arch: Arch = a.model.parse()?;
    let cfg = ModelConfig::new(arch, a.channels, a.classes, a.input_size);
    let policy = match (&a.policy, &a.uniform) {
        (Some(path), _) => Some(Policy::load(path)?),
        (None, Some(u)) => Some(uniform_policy(&cfg, u)?),
        (None, None) => None,
    };
    let precision = if a.supernet {
        Precision::Supernet {
            candidates: a.bits.candidates()?,
        }
    } else if let Some(policy) = policy {
        Precision::Fixed {
            policy,
            per_channel: false,
            numerics: gmpq::quant::Numerics::FakeQuant,
        }
    } else {
        Precision::Full
    };
    let layout = a.param_layout.parse().map_err(anyhow::Error::msg)?;
    let r = gmpq::bench::bench_train(
        &cfg,
        precision,
        a.batch_size,
        a.warmup,
        a.steps,
        layout,
        device,
    )?;
    print_bench(&r, a.json)
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

pub(super) fn parse_spec(s: &str) -> Result<DatasetSpec> {
    parse_spec_flag("--data", s)
}

/// Parses the KIND:PATH given to `flag`, naming the flag in the error.
pub(super) fn parse_spec_flag(flag: &str, s: &str) -> Result<DatasetSpec> {
    s.parse::<DatasetSpec>()
        .with_context(|| format!("{flag} {s}"))
}

fn train_cmd(a: TrainArgs, device: tch::Device) -> Result<()> {
    run_training(a, device, None)
}

fn finetune_cmd(mut a: FinetuneArgs, device: tch::Device) -> Result<()> {
    check_options(
        ModelSource::File {
            flag: "--init",
            path: &a.init,
        },
        &a.train.given(),
    )?;
    a.train.out.get_or_insert_with(|| "runs/finetune".into());
    let ck = Checkpoint::load(&a.init).with_context(|| format!("loading {}", a.init.display()))?;
    let geometry = model_geometry(&ck.meta.model)?;
    let policy = chosen_policy(&a.policy, &ck.meta.model, &geometry)?
        .context("give --policy FILE or --uniform wXaY")?;
    // chosen_policy has checked the policy against the model and set its totals: no second
    // load and network build through Finetune::new.
    let finetune = train::Finetune {
        init: train::InitFrom {
            checkpoint: a.init.clone(),
            calibration: a.calibration,
            calibration_images: a.calib_images,
        },
        model: ck.meta.model,
        precision: Precision::Fixed {
            policy,
            per_channel: a.per_channel,
            numerics: a.numerics,
        },
    };
    run_training(a.train, device, Some(finetune))
}

/// The library's training request of `gmpq train`'s flags.
fn train_request(a: &TrainArgs, finetune: Option<train::Finetune>) -> Result<TrainRequest> {
    let mut r = TrainRequest::new(
        parse_spec(&a.data)?,
        a.out.clone().unwrap_or_else(|| "runs/train".into()),
    );
    r.arch = a.model.as_deref().unwrap_or("resnet20").parse()?;
    if finetune.is_none() {
        check_options(ModelSource::Named(r.arch), &a.given())?;
    }
    r.test_data = a
        .test_data
        .as_deref()
        .map(|t| parse_spec_flag("--test-data", t))
        .transpose()?;
    r.input_size = a.input_size;
    r.rgb = a.rgb;
    r.stem = a.stem.as_deref().map(str::parse::<Stem>).transpose()?;
    r.width = a.width.unwrap_or(1.0);
    r.epochs = a.epochs;
    r.batch_size = a.batch_size;
    r.lr = a.lr;
    r.momentum = a.momentum;
    r.weight_decay = a.weight_decay;
    r.schedule = a.schedule.parse()?;
    r.augment = Augment {
        crop_padding: a.crop_padding,
        hflip: a.hflip,
    };
    r.seed = a.seed;
    r.subset = SubsetSpec {
        holdout: a.holdout,
        ..a.subset.spec()
    };
    r.test_limit = a.test_limit;
    r.resume = a.resume;
    r.finetune = finetune;
    Ok(r)
}

fn run_training(
    a: TrainArgs,
    device: tch::Device,
    finetune: Option<train::Finetune>,
) -> Result<()> {
    let bars = TrainBars::new();
    let outcome = train_request(&a, finetune)?.run(device, &bars)?;
    if !gmpq::dist::is_main() {
        return Ok(()); // rank 0 reports
    }
    let meta = &outcome.meta;
    let last = meta.history.last().context("no epoch was run")?;
    if a.json {
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
    let spec = parse_spec(&a.data)?;
    let split = match (a.split, spec.kind) {
        (SplitArg::Train, _) => Split::Train,
        (SplitArg::Test, _) => Split::Test,
        // Image folders keep their test images in val/.
        (
            SplitArg::Val,
            gmpq::data::DatasetKind::Folder | gmpq::data::DatasetKind::ImagenetFolder,
        ) => Split::Test,
        (SplitArg::Val, _) => bail!("{spec} has train and test splits (val is for image folders)"),
    };
    let outcome = gmpq::engine::EvalRequest {
        data: spec.clone(),
        split,
        subset: a.subset.spec(),
        checkpoint: a.checkpoint.clone(),
        onnx: a.onnx.clone(),
        batch_size: a.batch_size,
    }
    .run(device)?;
    match outcome {
        gmpq::engine::EvalOutcome::Both {
            checkpoint,
            onnx,
            agreement: r,
        } => {
            if a.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "{} vs {} (ONNX Runtime) on {spec}, {} images: top-1 {:.2}% vs {:.2}%, \
                     same top-1 class on {:.2}%, largest logit difference {:.3e}",
                    checkpoint.display(),
                    onnx.display(),
                    r.images,
                    r.libtorch.top1,
                    r.onnx.top1,
                    r.top1_agreement,
                    r.max_logit_difference
                );
            }
        }
        gmpq::engine::EvalOutcome::One { label, metrics: m } => {
            if a.json {
                println!("{}", serde_json::to_string_pretty(&m)?);
            } else {
                println!(
                    "{label} on {spec}: top-1 {:.2}%, top-5 {:.2}%, loss {:.4} ({} images)",
                    m.top1, m.top5, m.loss, m.images
                );
            }
        }
    }
    Ok(())
}

fn import_cmd(a: ImportArgs) -> Result<()> {
    let arch: Arch = a.model.parse()?;
    if arch == Arch::EfficientNetLite0 {
        // Its weights fix both: TF "SAME" padding is laid out for 224 px and its stem.
        if a.input_size.is_some_and(|s| s != 224) {
            bail!("--input-size does not apply to efficientnet-lite0 (its weights are for 224 px)");
        }
        if a.stem.is_some() {
            bail!("--stem does not apply to efficientnet-lite0 (it has one stem)");
        }
    }
    let mut cfg = ModelConfig::new(arch, 3, a.classes, a.input_size.unwrap_or(224));
    cfg.stem = a.stem.as_deref().unwrap_or("imagenet").parse()?;
    let ck = gmpq::import::import_pretrained(&a.weights, &cfg)
        .with_context(|| format!("importing {}", a.weights.display()))?;
    if let Some(dir) = a.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    ck.save(&a.out)?;
    println!(
        "wrote {} ({} tensors) and its metadata {}",
        a.out.display(),
        ck.tensors.len(),
        gmpq::checkpoint::sidecar_path(&a.out).display()
    );
    Ok(())
}

fn subset_cmd(a: SubsetCmdArgs) -> Result<()> {
    let spec = parse_spec(&a.data)?;
    // Both splits are drawn before either is written: a bad --test leaves no half subset.
    let mut drawn = Vec::new();
    for (split, n, flag, prefix) in [
        (Split::Train, a.train, "--train", "train"),
        (Split::Test, a.test, "--test", "t10k"),
    ] {
        let data = spec.load_idx(split)?;
        let idx = stratified_subset(&data, &SubsetSpec::limited(Some(n), a.seed))
            .with_context(|| format!("{flag} {n}"))?;
        drawn.push((data, idx, prefix));
    }
    for (data, idx, prefix) in drawn {
        gmpq::data::write_idx_split(&data, &idx, &a.out, prefix)?;
        println!(
            "{prefix}: {} of {} images → {}",
            idx.len(),
            data.len(),
            a.out.display()
        );
    }
    Ok(())
}

/// The uniform policy `name` (`w4a4`, …) of `cfg`'s quantized layers.
pub(super) fn uniform_policy(cfg: &ModelConfig, name: &str) -> Result<Policy> {
    let (w, a) = gmpq::policy::parse_uniform(name)?;
    Ok(Policy::uniform(cfg, model_geometry(cfg)?.convs(), w, a))
}

/// Builds the spec-only view of a model (conv geometry and head) for BOPs tables.
pub(super) fn model_geometry(cfg: &ModelConfig) -> Result<Model> {
    Ok(train::build_fp(cfg, tch::Device::Cpu)?.1)
}

/// The network `a` describes (`--model`, or `arch` when a file names it), its flags checked
/// against the table of which options apply to which network.
fn model_config(a: &ModelArgs, arch: Option<Arch>) -> Result<ModelConfig> {
    let arch = match arch {
        Some(arch) => arch,
        None => a.model.as_deref().unwrap_or("resnet20").parse()?,
    };
    check_options(ModelSource::Named(arch), &a.given())?;
    let mut cfg = ModelConfig::new(
        arch,
        a.channels.unwrap_or(3),
        a.classes.unwrap_or(10),
        a.input_size.unwrap_or(32),
    );
    if let Some(stem) = &a.stem {
        cfg.stem = stem.parse::<Stem>()?;
    }
    if let Some(w) = a.width {
        cfg.width = w;
    }
    Ok(cfg)
}

/// The policy chosen on the command line (file or uniform name), checked against the model.
fn chosen_policy(choice: &PolicyChoice, cfg: &ModelConfig, net: &Model) -> Result<Option<Policy>> {
    let Some(source) =
        PolicySource::from_flags(choice.policy.as_deref(), choice.uniform.as_deref())?
    else {
        return Ok(None);
    };
    match source.resolve(cfg, net.convs(), net.fc_spec()) {
        Ok(p) => Ok(Some(p)),
        // Reading the file failed: its own message says where and why.
        Err(e @ (PolicyError::Io { .. } | PolicyError::Parse { .. })) => Err(e.into()),
        Err(e) => Err(anyhow::Error::new(e).context("the policy does not fit the model")),
    }
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
    // The totals a policy file states, to compare with what they measure here.
    let mut recorded: Option<PolicyTotals> = None;
    let given = a.model.given();
    let (cfg, policy) = if let Some(path) = &a.checkpoint {
        let source = ModelSource::File {
            flag: "--checkpoint",
            path,
        };
        check_options(source, &given)?;
        let ck = Checkpoint::load(path)?;
        let policy = match ck.meta.precision {
            Some(Precision::Fixed { policy, .. }) => Some(policy),
            _ => None,
        };
        (ck.meta.model, policy)
    } else if let Some(path) = &a.policy.policy {
        // A policy file names its model and input size (and, from a search, the whole
        // model config): its costs are measured on that geometry, not on --model/--input.
        let policy = Policy::load(path)?;
        recorded = policy.totals.clone();
        let meta = gmpq::search::PolicyMeta::of(&policy)
            .with_context(|| format!("{}: malformed meta", path.display()))?;
        let source = ModelSource::File {
            flag: "--policy",
            path,
        };
        let cfg = match meta.and_then(|m| m.model_config) {
            Some(cfg) => {
                check_options(source, &given)?;
                cfg
            }
            None => {
                // The file names its model and input size but not its channels and classes.
                let named: Vec<ModelOption> = given
                    .iter()
                    .copied()
                    .filter(|o| matches!(o, ModelOption::Model | ModelOption::InputSize))
                    .collect();
                check_options(source, &named)?;
                let mut args = a.model.clone();
                args.model = None;
                let mut cfg = model_config(&args, Some(policy.model.parse()?))?;
                cfg.input_size = policy.input_size;
                cfg
            }
        };
        (cfg, None)
    } else {
        (model_config(&a.model, None)?, None)
    };
    let net = model_geometry(&cfg)?;
    let policy = match policy {
        Some(p) => Some(p),
        None => chosen_policy(&a.policy, &cfg, &net)?,
    };
    // Without a policy, every quantized layer is shown at 32/32 bits.
    let policy = policy.unwrap_or_else(|| Policy::uniform(&cfg, net.convs(), 32, 32));
    let (rows, totals) = policy.cost(net.convs(), net.fc_spec());
    // A file that records its totals but not its model config (older files, hand-written
    // ones) is measured on --channels/--classes: say so when the two disagree.
    if let (Some(path), Some(recorded)) = (&a.policy.policy, &recorded) {
        if recorded.bops != totals.bops || recorded.fp_bops != totals.fp_bops {
            eprintln!(
                "warning: {} records {:.2}x ({} BOPs of {} FP) but {} at {} channels, {} px, \
                 {} classes gives {:.2}x ({} of {}); the file does not name its model config: \
                 give its --channels and --classes",
                path.display(),
                recorded.compression,
                recorded.bops,
                recorded.fp_bops,
                cfg.arch,
                cfg.in_channels,
                cfg.input_size,
                cfg.num_classes,
                totals.compression,
                totals.bops,
                totals.fp_bops
            );
        }
    }
    if let Some(chart) = &a.chart {
        if let Some(dir) = chart
            .parent()
            .filter(|d| !d.as_os_str().is_empty() && !d.is_dir())
        {
            bail!(
                "--chart {}: the folder {} does not exist",
                chart.display(),
                dir.display()
            );
        }
        gmpq::report::bit_allocation_svg(&[("policy", &policy)], chart)
            .with_context(|| format!("writing the chart {}", chart.display()))?;
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "model": cfg, "layers": rows, "totals": totals,
            }))?
        );
    } else {
        println!(
            "{} ({} ch, {}x{} input, {} classes)",
            cfg.arch, cfg.in_channels, cfg.input_size, cfg.input_size, cfg.num_classes
        );
        print_bops_table(&rows, &totals);
    }
    Ok(())
}

fn quantize_cmd(a: QuantizeArgs, device: tch::Device) -> Result<()> {
    let calib_data = parse_spec_flag("--calib-data", &a.calib_data)?;
    let request = train::PtqRequest {
        checkpoint: a.checkpoint.clone(),
        policy: PolicySource::from_flags(a.policy.policy.as_deref(), a.policy.uniform.as_deref())?
            .context("give --policy FILE or --uniform wXaY")?,
        per_channel: a.per_channel,
        numerics: a.numerics,
        calibration: a.calibration,
        eval_data: match &a.eval_data {
            Some(s) => parse_spec_flag("--eval-data", s)?,
            None => calib_data.clone(),
        },
        calib_data,
        calib_images: a.calib_images,
        eval_limit: a.eval_limit,
        out: a.out.clone(),
    };
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
