//! Throughput of the full training step (forward, cross-entropy, backward, SGD update) at
//! full precision, under a fixed quantization policy (QAT) or as the supernet, and of the
//! full GMPQ search step, on synthetic data, so the engine can be compared with PyTorch
//! (`bench/pytorch_train.py`, `bench/pytorch_qat.py`).

#[cfg(feature = "cli")]
mod args;
#[cfg(feature = "cli")]
pub use args::{BenchInferArgs, BenchSearchStepArgs, BenchTrainArgs};

pub use crate::engine::CpuInfo;
use crate::engine::OpCounts;
use crate::model::ModelConfig;
use crate::quant::{self, Precision};
use crate::search::{AlphaOpt, ComplexityTerm, SearchConfig, SearchStep};
use crate::train::{ParamLayout, Sgd, TrainError};
use serde::Serialize;
use std::time::Instant;
use tch::nn::ModuleT;
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub model: String,
    /// `full`, or `supernet w{..} a{..}`.
    pub precision: String,
    pub batch_size: usize,
    pub input: [usize; 3],
    pub threads: usize,
    /// Memory layout of the convolution weights (see [`ParamLayout`]).
    pub param_layout: String,
    /// Quantizer implementation (`fused` or `reference`, see `quant::QuantKernels`).
    pub kernels: String,
    pub steps: usize,
    pub images_per_second: f64,
    pub median_step_seconds: f64,
}

/// Times `steps` training steps after `warmup` untimed ones. A supernet step updates the
/// weights and α with two optimizers, as the search does.
pub fn bench_train(
    config: &ModelConfig,
    precision: Precision,
    batch_size: usize,
    warmup: usize,
    steps: usize,
    layout: ParamLayout,
    device: Device,
) -> Result<BenchResult, TrainError> {
    begin(steps, batch_size)?;
    let label = match &precision {
        Precision::Full => "full".to_string(),
        Precision::Fixed { policy, .. } => {
            let mut bits: Vec<u32> = policy
                .layers
                .iter()
                .flat_map(|l| [l.w_bits, l.a_bits])
                .collect();
            bits.sort_unstable();
            bits.dedup();
            format!("fixed policy, bits {bits:?}")
        }
        Precision::Supernet { candidates } => {
            format!(
                "supernet w{:?} a{:?}",
                candidates.weight, candidates.activation
            )
        }
    };
    let network =
        quant::build(config, precision, device).map_err(|e| TrainError::Invalid(e.to_string()))?;
    let net = &network.net;
    let mut opt = Sgd::with_layout(network.weight_parameters(), 0.9, 5e-4, layout);
    let alphas = network.alpha_parameters();
    let mut alpha_opt = (!alphas.is_empty()).then(|| Sgd::with_layout(alphas, 0.9, 1e-4, layout));
    let (x, y) = synthetic_batch(config, batch_size, device);
    let times = time_steps(warmup, steps, || {
        let loss = net.forward_t(&x, true).cross_entropy_for_logits(&y);
        opt.zero_grad();
        if let Some(a) = alpha_opt.as_mut() {
            a.zero_grad();
        }
        loss.backward();
        opt.step(0.01);
        if let Some(a) = alpha_opt.as_mut() {
            a.step(0.01);
        }
        // Synchronise (a no-op on the CPU, needed for CUDA timing).
        let _ = loss.double_value(&[]);
        Ok(())
    })?;
    Ok(result(config, label, batch_size, layout, times))
}

/// Times the full GMPQ search step (`search::SearchStep`): the frozen FP teacher's CAM, the
/// supernet's forward with its CAM, `CE + aw·L_attr + λ·L_complexity`, backward, and both
/// optimizers, with the default search settings.
pub fn bench_search_step(
    config: &ModelConfig,
    candidates: crate::policy::Candidates,
    batch_size: usize,
    warmup: usize,
    steps: usize,
    device: Device,
) -> Result<BenchResult, TrainError> {
    begin(steps, batch_size)?;
    let invalid = |e: quant::QuantError| TrainError::Invalid(e.to_string());
    let teacher = quant::build(config, Precision::Full, device).map_err(invalid)?;
    teacher.use_channels_last_weights();
    let label = format!(
        "search step, supernet w{:?} a{:?}",
        candidates.weight, candidates.activation
    );
    let sn = quant::build(config, Precision::Supernet { candidates }, device).map_err(invalid)?;
    let search = SearchConfig::default();
    let mut w_opt = Sgd::new(sn.weight_parameters(), search.momentum, search.weight_decay);
    let mut a_opt = AlphaOpt::new(&search, sn.alpha_parameters());
    let macs: Vec<f64> = sn.handles.iter().map(|h| h.spec.macs() as f64).collect();
    let vars = sn.vs.variables();
    let (x, y) = synthetic_batch(config, batch_size, device);
    let mut step = SearchStep {
        supernet: &sn,
        teacher: &teacher.net,
        config: &search,
        weight_opt: &mut w_opt,
        alpha_opt: &mut a_opt,
        macs: &macs,
        vars: &vars,
        group: None,
    };
    let times = time_steps(warmup, steps, || {
        step.run(
            &x,
            &y,
            ComplexityTerm::Weighted(search.complexity_weight),
            search.lr,
            Some(search.alpha_lr),
            0,
        )
        .map(|_| ())
        .map_err(|e| TrainError::Invalid(e.to_string()))
    })?;
    Ok(result(
        config,
        label,
        batch_size,
        ParamLayout::default(),
        times,
    ))
}

/// Refuses empty runs, then seeds libtorch so every benchmark starts from the same weights.
fn begin(steps: usize, batch_size: usize) -> Result<(), TrainError> {
    for (what, n) in [("--steps", steps), ("the batch size", batch_size)] {
        if n == 0 {
            return Err(TrainError::Invalid(format!("{what} must be at least 1")));
        }
    }
    tch::manual_seed(0);
    Ok(())
}

fn synthetic_batch(config: &ModelConfig, batch_size: usize, device: Device) -> (Tensor, Tensor) {
    let s = config.input_size as i64;
    let x = Tensor::randn(
        [batch_size as i64, config.in_channels as i64, s, s],
        (Kind::Float, device),
    );
    let y = Tensor::randint(
        config.num_classes as i64,
        [batch_size as i64],
        (Kind::Int64, device),
    );
    (x, y)
}

/// Wall time of each of `steps` calls of `step` after `warmup` untimed ones.
fn time_steps(
    warmup: usize,
    steps: usize,
    mut step: impl FnMut() -> Result<(), TrainError>,
) -> Result<Vec<f64>, TrainError> {
    let mut times = Vec::with_capacity(steps);
    for i in 0..warmup + steps {
        let t = Instant::now();
        step()?;
        if i >= warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(times)
}

fn result(
    config: &ModelConfig,
    precision: String,
    batch_size: usize,
    layout: ParamLayout,
    mut times: Vec<f64>,
) -> BenchResult {
    let steps = times.len();
    let total: f64 = times.iter().sum();
    times.sort_by(f64::total_cmp);
    BenchResult {
        model: config.arch.to_string(),
        precision,
        batch_size,
        input: [config.in_channels, config.input_size, config.input_size],
        threads: tch::get_num_threads() as usize,
        param_layout: layout.to_string(),
        kernels: match quant::kernels() {
            quant::QuantKernels::Fused => "fused",
            quant::QuantKernels::Reference => "reference",
        }
        .to_string(),
        steps,
        images_per_second: (steps * batch_size) as f64 / total,
        median_step_seconds: times[times.len() / 2],
    }
}

/// Inference throughput of one engine on one batch size.
#[derive(Debug, Clone, Serialize)]
pub struct InferResult {
    pub model: String,
    pub input: [usize; 3],
    /// `libtorch fp32`, `onnxruntime fp32` or `onnxruntime qdq`.
    pub engine: String,
    pub batch_size: usize,
    pub threads: usize,
    pub steps: usize,
    pub images_per_second: f64,
    pub median_batch_seconds: f64,
}

/// What [`bench_infer`] measured, with the op types ONNX Runtime's optimized QDQ graph runs
/// (e.g. `QLinearConv` where it chose integer convolutions).
#[derive(Debug, Clone, Serialize)]
pub struct InferReport {
    pub results: Vec<InferResult>,
    pub qdq_optimized_ops: std::collections::BTreeMap<String, usize>,
    /// The op types of ONNX Runtime's optimized integer graph (QLinearConv, QLinearAdd, …).
    pub integer_optimized_ops: std::collections::BTreeMap<String, usize>,
    /// Those of its ops that compute in float ([`crate::engine::float_op_counts`]).
    pub integer_float_ops: std::collections::BTreeMap<String, usize>,
    /// The policy's layers (convs whose QDQ units ONNX Runtime could fuse).
    pub quantized_convs: usize,
    /// The CPU and the features the integer and float kernels' speed depends on.
    pub cpu: CpuInfo,
}

/// A checkpoint of `net` as the exporter reads it (identity normalisation: the benchmark
/// feeds the network's input directly).
fn bench_checkpoint(config: &ModelConfig, net: &quant::Network) -> crate::checkpoint::Checkpoint {
    use crate::checkpoint::{self, Checkpoint, CheckpointMeta};
    let mut meta = CheckpointMeta::new(
        config.clone(),
        crate::data::Pipeline {
            transforms: vec![],
            normalize: crate::data::Normalize::identity(config.in_channels),
        },
    );
    meta.precision = Some(net.precision.clone());
    Checkpoint {
        meta,
        tensors: checkpoint::var_store_tensors(&net.vs),
    }
}

/// An ONNX Runtime session of `net`'s export, and the op types of the graph ONNX Runtime
/// optimized it to: all of them, and those that compute in float (`what` names the dump file).
fn optimized_session(
    config: &ModelConfig,
    net: &quant::Network,
    what: &str,
    opts: &crate::engine::SessionOptions,
) -> Result<(crate::engine::OnnxModel, (OpCounts, OpCounts)), TrainError> {
    use crate::export::onnx::{self, OnnxOptions};
    let invalid = |e: &dyn std::fmt::Display| TrainError::Invalid(e.to_string());
    let bytes = onnx::export(&bench_checkpoint(config, net), net, OnnxOptions::default())
        .map_err(|e| invalid(&e))?;
    let dump =
        std::env::temp_dir().join(format!("gmpq-{what}-optimized-{}.onnx", std::process::id()));
    let session = crate::engine::OnnxModel::from_bytes(
        &bytes,
        &crate::engine::SessionOptions {
            optimized_model: Some(dump.clone()),
            unoptimized: false,
            ..opts.clone()
        },
    )
    .map_err(|e| invalid(&e))?;
    let ops = crate::engine::op_and_float_counts(&dump).map_err(|e| invalid(&e));
    let _ = std::fs::remove_file(&dump);
    Ok((session, ops?))
}

/// Times inference of `config` (random weights; speed does not depend on their values)
/// three ways: gmpq's FP32 libtorch network, its FP32 ONNX export and its QDQ export under
/// `policy`, both through ONNX Runtime with `threads` intra-op threads.
pub fn bench_infer(
    config: &ModelConfig,
    policy: crate::policy::Policy,
    batch_sizes: &[usize],
    warmup: usize,
    steps: usize,
    threads: usize,
) -> Result<InferReport, TrainError> {
    use crate::engine::{OnnxModel, SessionOptions};
    use crate::export::onnx::{self, OnnxOptions};
    let invalid = |e: &dyn std::fmt::Display| TrainError::Invalid(e.to_string());
    for &b in batch_sizes {
        begin(steps, b)?;
    }
    let device = Device::Cpu;
    let fp = quant::build(config, Precision::Full, device).map_err(|e| invalid(&e))?;
    let quantized_convs = policy.layers.len();
    let at = |numerics| {
        quant::build(
            config,
            Precision::Fixed {
                policy: policy.clone(),
                per_channel: false,
                numerics,
            },
            device,
        )
        .map_err(|e| invalid(&e))
    };
    let fixed = at(crate::quant::Numerics::FakeQuant)?;
    let integer = at(crate::quant::Numerics::Integer)?;
    let s = config.input_size as i64;
    let probe = Tensor::rand([2, config.in_channels as i64, s, s], (Kind::Float, device));
    // Sets the weight thresholds, as the first forward pass of fine-tuning does, and the
    // integer network's 8-bit ranges.
    let _ = tch::no_grad(|| fixed.net.forward_t(&probe, false));
    integer.calibrate_ranges(std::slice::from_ref(&probe));
    let fp_onnx = onnx::export(&bench_checkpoint(config, &fp), &fp, OnnxOptions::default())
        .map_err(|e| invalid(&e))?;
    let opts = SessionOptions {
        threads,
        optimized_model: None,
        unoptimized: false,
    };
    let mut fp_session = OnnxModel::from_bytes(&fp_onnx, &opts).map_err(|e| invalid(&e))?;
    let (mut qdq_session, (qdq_optimized_ops, _)) =
        optimized_session(config, &fixed, "qdq", &opts)?;
    let (mut integer_session, (integer_optimized_ops, integer_float_ops)) =
        optimized_session(config, &integer, "integer", &opts)?;
    let mut results = Vec::new();
    for &batch in batch_sizes {
        let x = Tensor::rand(
            [batch as i64, config.in_channels as i64, s, s],
            (Kind::Float, device),
        );
        let mut record = |engine: &str, times: Vec<f64>| {
            let r = result(config, String::new(), batch, ParamLayout::default(), times);
            results.push(InferResult {
                model: r.model,
                input: r.input,
                engine: engine.into(),
                batch_size: batch,
                threads,
                steps: r.steps,
                images_per_second: r.images_per_second,
                median_batch_seconds: r.median_step_seconds,
            });
        };
        let times = time_steps(warmup, steps, || {
            let _ = tch::no_grad(|| fp.net.forward_t(&x, false));
            Ok(())
        })?;
        record("libtorch fp32", times);
        for (engine, session) in [
            ("onnxruntime fp32", &mut fp_session),
            ("onnxruntime integer", &mut integer_session),
            ("onnxruntime qdq", &mut qdq_session),
        ] {
            let times = time_steps(warmup, steps, || {
                session.run(&x).map(|_| ()).map_err(|e| invalid(&e))
            })?;
            record(engine, times);
        }
    }
    Ok(InferReport {
        results,
        qdq_optimized_ops,
        integer_optimized_ops,
        integer_float_ops,
        quantized_convs,
        cpu: CpuInfo::detect(),
    })
}
