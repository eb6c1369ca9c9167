//! Throughput of the full training step (forward, cross-entropy, backward, SGD update) on
//! synthetic data, so the engine can be compared with PyTorch (`bench/pytorch_train.py`).

use crate::model::ModelConfig;
use crate::train::{build_fp, Sgd, TrainError};
use serde::Serialize;
use std::time::Instant;
use tch::nn::ModuleT;
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub model: String,
    pub batch_size: usize,
    pub input: [usize; 3],
    pub threads: usize,
    pub steps: usize,
    pub images_per_second: f64,
    pub median_step_seconds: f64,
}

/// Times `steps` training steps after `warmup` untimed ones.
pub fn bench_train(
    config: &ModelConfig,
    batch_size: usize,
    warmup: usize,
    steps: usize,
    device: Device,
) -> Result<BenchResult, TrainError> {
    if steps == 0 || batch_size == 0 {
        return Err(TrainError::Invalid(
            "steps and batch size must be positive".into(),
        ));
    }
    tch::manual_seed(0);
    let (vs, net) = build_fp(config, device)?;
    let mut opt = Sgd::new(Sgd::trainable(&vs), 0.9, 5e-4);
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
    let mut times = Vec::with_capacity(steps);
    for i in 0..warmup + steps {
        let t = Instant::now();
        let loss = net.forward_t(&x, true).cross_entropy_for_logits(&y);
        opt.zero_grad();
        loss.backward();
        opt.step(0.01);
        // Synchronise (a no-op on the CPU, needed for CUDA timing).
        let _ = loss.double_value(&[]);
        if i >= warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let total: f64 = times.iter().sum();
    times.sort_by(f64::total_cmp);
    Ok(BenchResult {
        model: config.arch.to_string(),
        batch_size,
        input: [config.in_channels, config.input_size, config.input_size],
        threads: tch::get_num_threads() as usize,
        steps,
        images_per_second: (steps * batch_size) as f64 / total,
        median_step_seconds: times[times.len() / 2],
    })
}
