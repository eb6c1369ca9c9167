//! Throughput of the full training step (forward, cross-entropy, backward, SGD update) on
//! synthetic data, so the engine can be compared with PyTorch (`bench/pytorch_train.py`).

use crate::model::ModelConfig;
use crate::quant::{self, Precision};
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
    if steps == 0 || batch_size == 0 {
        return Err(TrainError::Invalid(
            "steps and batch size must be positive".into(),
        ));
    }
    tch::manual_seed(0);
    let label = match &precision {
        Precision::Full => "full".to_string(),
        Precision::Fixed { .. } => "fixed policy".to_string(),
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
        if i >= warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let total: f64 = times.iter().sum();
    times.sort_by(f64::total_cmp);
    Ok(BenchResult {
        model: config.arch.to_string(),
        precision: label,
        batch_size,
        input: [config.in_channels, config.input_size, config.input_size],
        threads: tch::get_num_threads() as usize,
        param_layout: layout.to_string(),
        steps,
        images_per_second: (steps * batch_size) as f64 / total,
        median_step_seconds: times[times.len() / 2],
    })
}
