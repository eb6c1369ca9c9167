//! Full-precision training and evaluation: SGD with momentum and weight decay, cosine or step
//! learning-rate schedules, top-1/top-5 evaluation every epoch, and atomic, resumable
//! checkpoints.

mod eval;
mod optim;
mod request;

pub use eval::{
    evaluate, evaluate_by, evaluate_shared, evaluate_with_predictions, input_mismatch, EvalMetrics,
};
pub use optim::{Adam, ParamLayout, Sgd};
pub use request::{Finetune, TrainOutcome, TrainRequest, CALIBRATION, CALIBRATION_IMAGES};

use crate::checkpoint::{
    self, Checkpoint, CheckpointError, CheckpointMeta, EpochMetrics, OPTIMIZER_PREFIX,
};
use crate::data::{
    DataError, DataLoader, ImageSource, LoaderConfig, Normalize, Pipeline, Transform,
};
use crate::model::{Model, ModelConfig, ModelError};
use crate::quant::{self, CalibrationMethod, Precision, QuantError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Lock(#[from] crate::files::LockError),
    #[error(transparent)]
    Quant(#[from] QuantError),
    #[error(transparent)]
    Dist(#[from] crate::dist::DistError),
    #[error(
        "stopped by {signal} in epoch {epoch}; {kept}: run the same command with --resume to \
         go on"
    )]
    Stopped {
        signal: String,
        epoch: usize,
        kept: String,
    },
    #[error(
        "loss became {value} at epoch {epoch}, batch {batch}: training diverged (try a lower --lr)"
    )]
    NonFiniteLoss {
        epoch: usize,
        batch: usize,
        value: f64,
    },
    #[error(
        "{what} became {value} at epoch {epoch}: training diverged (try a lower --lr); {kept}"
    )]
    NonFiniteMetric {
        what: &'static str,
        value: f64,
        epoch: usize,
        kept: String,
    },
    #[error(
        "{dir} already holds a checkpoint: pass --resume to continue it, or choose another --out"
    )]
    WouldOverwrite { dir: PathBuf },
    #[error("cannot resume {path}: {what} changed ({fields})")]
    ResumeMismatch {
        path: PathBuf,
        what: &'static str,
        fields: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, TrainError>;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum LrSchedule {
    /// Cosine decay from the base rate to 0 over all steps, updated every step.
    Cosine,
    /// Multiply by `gamma` every `step_epochs` epochs.
    Step {
        step_epochs: usize,
        gamma: f64,
    },
    Constant,
}

impl LrSchedule {
    /// Learning rate at fractional epoch `t` (0 ≤ t < epochs).
    pub fn lr(&self, base: f64, t: f64, epochs: usize) -> f64 {
        match *self {
            LrSchedule::Cosine => {
                base * 0.5 * (1.0 + (std::f64::consts::PI * t / epochs.max(1) as f64).cos())
            }
            LrSchedule::Step { step_epochs, gamma } => {
                base * gamma.powi((t.floor() as usize / step_epochs.max(1)) as i32)
            }
            LrSchedule::Constant => base,
        }
    }
}

impl std::str::FromStr for LrSchedule {
    type Err = TrainError;

    /// `cosine`, `constant` or `step:EPOCHS:GAMMA`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            TrainError::Invalid(format!(
                "unknown schedule '{s}' (cosine, constant, step:EPOCHS:GAMMA)"
            ))
        };
        Ok(match s {
            "cosine" => LrSchedule::Cosine,
            "constant" => LrSchedule::Constant,
            _ => match s.split(':').collect::<Vec<_>>().as_slice() {
                ["step", e, g] => {
                    let step_epochs: usize = e.parse().map_err(|_| bad())?;
                    let gamma: f64 = g.parse().map_err(|_| bad())?;
                    if step_epochs == 0 || !(gamma > 0.0 && gamma <= 1.0) {
                        return Err(TrainError::Invalid(format!(
                            "--schedule {s}: the step needs at least 1 epoch and a factor in (0, 1]"
                        )));
                    }
                    LrSchedule::Step { step_epochs, gamma }
                }
                _ => return Err(bad()),
            },
        })
    }
}

/// Training-time augmentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Augment {
    /// Random crop after zero-padding by this many pixels (0: no random crop).
    pub crop_padding: usize,
    pub hflip: bool,
}

/// Learning rate of training from scratch.
pub const TRAIN_LR: f64 = 0.1;
/// Learning rate of quantization-aware fine-tuning from FP weights.
pub const FINETUNE_LR: f64 = 0.01;
/// Weight decay of training from scratch.
pub const TRAIN_WEIGHT_DECAY: f64 = 5e-4;
/// Weight decay of fine-tuning.
pub const FINETUNE_WEIGHT_DECAY: f64 = 4e-5;

/// Training hyper-parameters (saved with the checkpoint; a resumed run must match them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub schedule: LrSchedule,
    pub augment: Augment,
    pub seed: u64,
}

impl TrainConfig {
    /// Refuses settings that cannot train: each error names its flag and the valid range.
    pub fn check(&self) -> Result<()> {
        let bad = |flag: &str, value: f64, range: &str| {
            Err(TrainError::Invalid(format!(
                "{flag} {value}: must be {range}"
            )))
        };
        if self.epochs == 0 {
            return Err(TrainError::Invalid("--epochs 0: must be at least 1".into()));
        }
        if self.batch_size == 0 {
            return Err(TrainError::Invalid(
                "--batch-size 0: must be at least 1".into(),
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("--lr", self.lr, "a positive number");
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return bad("--momentum", self.momentum, "in [0, 1)");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("--wd", self.weight_decay, "zero or positive");
        }
        Ok(())
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 30,
            batch_size: 128,
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 5e-4,
            schedule: LrSchedule::Cosine,
            augment: Augment {
                crop_padding: 2,
                hflip: false,
            },
            seed: 0,
        }
    }
}

/// The train and eval pipelines for images of shape `native` fed to a model of
/// `input_size`, normalised with `normalize`.
pub fn pipelines(
    native: [usize; 3],
    model: &ModelConfig,
    augment: Augment,
    normalize: Normalize,
) -> (Pipeline, Pipeline) {
    let mut common = Vec::new();
    if native[0] == 1 && model.in_channels == 3 {
        common.push(Transform::GrayToRgb);
    }
    let size = model.input_size;
    if native[1] != size || native[2] != size {
        common.push(Transform::Resize { size });
        common.push(Transform::CenterCrop { size });
    }
    let mut train = common.clone();
    if augment.crop_padding > 0 {
        train.push(Transform::RandomCrop {
            size,
            padding: augment.crop_padding,
        });
    }
    if augment.hflip {
        train.push(Transform::RandomHorizontalFlip);
    }
    (
        Pipeline {
            transforms: train,
            normalize: normalize.clone(),
        },
        Pipeline {
            transforms: common,
            normalize,
        },
    )
}

/// Per-channel mean and standard deviation of (up to 10,000 of) `indices`, in 0..1 units.
pub fn channel_stats(source: &dyn ImageSource, indices: &[usize]) -> Result<Normalize> {
    let step = (indices.len() / 10_000).max(1);
    let mut sums: Vec<(f64, f64, f64)> = Vec::new();
    for &i in indices.iter().step_by(step) {
        let img = source.image(i)?;
        if sums.is_empty() {
            sums = vec![(0.0, 0.0, 0.0); img.channels];
        }
        let plane = img.height * img.width;
        for (c, s) in sums.iter_mut().enumerate().take(img.channels) {
            for &v in &img.data[c * plane..(c + 1) * plane] {
                let x = v as f64 / 255.0;
                s.0 += x;
                s.1 += x * x;
                s.2 += 1.0;
            }
        }
    }
    if sums.is_empty() {
        return Err(TrainError::Invalid(
            "cannot compute statistics of an empty dataset".into(),
        ));
    }
    let mean: Vec<f32> = sums.iter().map(|s| (s.0 / s.2) as f32).collect();
    let std: Vec<f32> = sums
        .iter()
        .map(|s| ((s.1 / s.2 - (s.0 / s.2).powi(2)).max(1e-12).sqrt()) as f32)
        .collect();
    Ok(Normalize { mean, std })
}

/// Builds a full-precision network and its var store on `device`.
pub fn build_fp(config: &ModelConfig, device: Device) -> Result<(nn::VarStore, Model)> {
    let network = quant::build(config, Precision::Full, device)?;
    Ok((network.vs, network.net))
}

/// Observes training; the CLI draws progress bars with it.
pub trait Progress {
    fn epoch_start(&self, _epoch: usize, _epochs: usize, _batches: usize) {}
    fn batch(&self, _loss: f64, _lr: f64, _images_per_second: f64) {}
    fn evaluating(&self) {}
    fn epoch_end(&self, _m: &EpochMetrics) {}
}

/// A [`Progress`] that ignores everything.
pub struct Silent;
impl Progress for Silent {}

/// What a training run needs besides hyper-parameters.
pub struct TrainJob<'a> {
    pub model: ModelConfig,
    pub config: TrainConfig,
    pub train_data: Arc<dyn ImageSource>,
    pub train_indices: Vec<usize>,
    pub test_data: Arc<dyn ImageSource>,
    pub test_indices: Vec<usize>,
    /// Held-out images of `train_data`, evaluated after each epoch (none: no validation).
    pub val_indices: Vec<usize>,
    /// The data's class names, recorded in the checkpoint.
    pub class_names: Option<Vec<String>>,
    pub dataset: String,
    pub out_dir: PathBuf,
    pub resume: bool,
    pub device: Device,
    pub progress: &'a dyn Progress,
    /// Full precision, or a fixed policy (quantization-aware training / fine-tuning).
    pub precision: Precision,
    /// Start from these full-precision weights instead of a fresh init (fine-tuning).
    pub init: Option<InitFrom>,
}

/// Where a fine-tuning run starts: FP weights, then calibration of the quantizers.
#[derive(Debug, Clone)]
pub struct InitFrom {
    pub checkpoint: PathBuf,
    pub calibration: CalibrationMethod,
    /// Training images used to calibrate (stratified over the training indices).
    pub calibration_images: usize,
}

/// Where integer numerics freeze batch norm: the fraction of the run's steps trained with
/// float batch norm (batch statistics) before the rest trains folded, as deployed.
pub const BN_FREEZE_AT: f64 = 0.5;

/// A stratified subset of `images` training images (no augmentation), as batches: what a
/// fine-tuning calibrates its quantizers on.
fn calibration_batches(job: &TrainJob, images: usize, eval_pipe: &Pipeline) -> Result<Vec<Tensor>> {
    let step = (job.train_indices.len() / images.max(1)).max(1);
    let idx: Vec<usize> = job
        .train_indices
        .iter()
        .step_by(step)
        .take(images)
        .copied()
        .collect();
    let loader = DataLoader::new(
        job.train_data.clone(),
        &idx,
        Arc::new(eval_pipe.clone()),
        LoaderConfig {
            batch_size: 256,
            ..Default::default()
        },
        0,
    )?;
    Ok(loader
        .map(|b| b.map(|b| b.images))
        .collect::<std::result::Result<_, _>>()?)
}

/// The checkpoint a run keeps in its output folder.
pub fn last_checkpoint(out_dir: &Path) -> PathBuf {
    out_dir.join("last.safetensors")
}

fn check_same<T: PartialEq + serde::Serialize>(
    path: &Path,
    what: &'static str,
    saved: &T,
    now: &T,
) -> Result<()> {
    if saved != now {
        return Err(TrainError::ResumeMismatch {
            path: path.to_path_buf(),
            what,
            fields: crate::fields::changed_fields(saved, now),
        });
    }
    Ok(())
}

/// Checks that a run has epochs, a batch size, and at least one full batch of `images`.
pub fn check_run_size(
    epochs: usize,
    batch_size: usize,
    images: usize,
    what: &str,
) -> std::result::Result<(), String> {
    if epochs == 0 || batch_size == 0 {
        return Err("epochs and batch size must be positive".into());
    }
    if images < batch_size {
        return Err(format!(
            "the {what} has {images} images, fewer than one batch of {batch_size}"
        ));
    }
    Ok(())
}

/// Trains (or resumes) a network at `job.precision` — from scratch, or fine-tuning from FP
/// weights after calibrating its quantizers — and returns the final checkpoint's metadata.
pub fn train(job: TrainJob) -> Result<CheckpointMeta> {
    let cfg = &job.config;
    cfg.check()?;
    if cfg.augment.crop_padding > job.model.input_size {
        return Err(TrainError::Invalid(format!(
            "--crop-padding {}: must be at most the input size, {} px",
            cfg.augment.crop_padding, job.model.input_size
        )));
    }
    check_run_size(
        cfg.epochs,
        cfg.batch_size,
        job.train_indices.len(),
        "training set",
    )
    .map_err(TrainError::Invalid)?;
    // Data-parallel: each rank computes its share of every batch; rank 0 owns the run folder.
    let group = crate::dist::current();
    let main = group.is_none_or(|g| g.is_main());
    let shard = crate::dist::shard(cfg.batch_size).map_err(TrainError::Invalid)?;
    let silent = Silent;
    let progress: &dyn Progress = if main { job.progress } else { &silent };
    std::fs::create_dir_all(&job.out_dir).map_err(|source| TrainError::Io {
        path: job.out_dir.clone(),
        source,
    })?;
    let _lock = main
        .then(|| crate::files::DirLock::acquire(&job.out_dir))
        .transpose()?;
    let ckpt_path = last_checkpoint(&job.out_dir);
    if main {
        crate::files::remove_stale_temps(&job.out_dir);
    }
    // Seed before the network is built: the weight init draws from libtorch's RNG.
    tch::manual_seed(cfg.seed as i64);
    let network = quant::build(&job.model, job.precision.clone(), job.device)?;
    let (vs, net) = (&network.vs, &network);
    let mut opt = Sgd::new(Sgd::trainable(vs), cfg.momentum, cfg.weight_decay);
    let train_json = serde_json::to_value(cfg).map_err(|e| TrainError::Invalid(e.to_string()))?;

    let (mut history, start_epoch, normalize, mut calibration) = if ckpt_path.exists() {
        if !job.resume {
            return Err(TrainError::WouldOverwrite {
                dir: job.out_dir.clone(),
            });
        }
        let ck = Checkpoint::load(&ckpt_path)?;
        check_same(&ckpt_path, "the model", &ck.meta.model, &job.model)?;
        let saved_precision = ck.meta.precision.clone().unwrap_or(Precision::Full);
        check_same(
            &ckpt_path,
            "the precision",
            &saved_precision,
            &job.precision,
        )?;
        let mut saved_cfg: TrainConfig = ck
            .meta
            .train
            .clone()
            .and_then(|v| serde_json::from_value(v).ok())
            .ok_or_else(|| {
                TrainError::Invalid(format!("{}: no training settings", ckpt_path.display()))
            })?;
        // More epochs may be asked for on resume; everything else must match.
        saved_cfg.epochs = cfg.epochs;
        check_same(&ckpt_path, "the training settings", &saved_cfg, cfg)?;
        check_same(
            &ckpt_path,
            "dataset",
            &ck.meta.dataset,
            &Some(job.dataset.clone()),
        )?;
        checkpoint::load_into_var_store(vs, ck.model_tensors(), &ckpt_path, |_| false, |_| false)?;
        let buffers: BTreeMap<String, Tensor> = ck
            .tensors
            .iter()
            .filter_map(|(n, t)| {
                n.strip_prefix(OPTIMIZER_PREFIX)
                    .and_then(|n| n.strip_prefix("momentum."))
                    .map(|n| (n.to_string(), t.shallow_clone()))
            })
            .collect();
        opt.load_state(buffers);
        tracing::info!(
            "resuming {} after epoch {}",
            ckpt_path.display(),
            ck.meta.epoch
        );
        (
            ck.meta.history,
            ck.meta.epoch,
            ck.meta.eval_pipeline.normalize,
            ck.meta.calibration,
        )
    } else if let Some(init) = &job.init {
        let ck = Checkpoint::load(&init.checkpoint)?;
        check_same(&init.checkpoint, "model", &ck.meta.model, &job.model)?;
        if ck
            .meta
            .precision
            .as_ref()
            .is_some_and(|p| *p != Precision::Full)
        {
            return Err(TrainError::Invalid(format!(
                "{}: fine-tuning starts from a full-precision checkpoint",
                init.checkpoint.display()
            )));
        }
        network.load_fp_weights(&ck, &init.checkpoint)?;
        (Vec::new(), 0, ck.meta.eval_pipeline.normalize, None)
    } else {
        (
            Vec::new(),
            0,
            channel_stats(job.train_data.as_ref(), &job.train_indices)?,
            None,
        )
    };

    let native = job.train_data.native_shape().unwrap_or([
        job.model.in_channels,
        job.model.input_size,
        job.model.input_size,
    ]);
    let (train_pipe, eval_pipe) = pipelines(native, &job.model, cfg.augment, normalize);
    let train_pipe = Arc::new(train_pipe);
    let calibration_images = job
        .init
        .as_ref()
        .map_or(request::CALIBRATION_IMAGES, |i| i.calibration_images);
    let calib_batches = if network.handles.is_empty() {
        Vec::new()
    } else {
        calibration_batches(&job, calibration_images, &eval_pipe)?
    };
    if let (Some(init), 0, false) = (&job.init, start_epoch, network.handles.is_empty()) {
        calibration = Some(quant::calibrate(
            &network,
            &calib_batches,
            init.calibration,
        )?);
    }
    // Integer numerics: float batch norm until `freeze_step`, then the deployed, folded form
    // (ranges calibrated once there, then saved); evaluation always runs the deployed form.
    let total_steps = cfg.epochs * (job.train_indices.len() / cfg.batch_size);
    let freeze_step = (total_steps as f64 * BN_FREEZE_AT).floor() as usize;
    let frozen =
        |network: &quant::Network| network.integer.as_ref().is_none_or(|e| e.training_frozen());
    if let Some(e) = &network.integer {
        let done = start_epoch * (job.train_indices.len() / cfg.batch_size);
        if done >= freeze_step && start_epoch > 0 {
            e.set_training_frozen(true);
        } else {
            network.calibrate_ranges(&calib_batches);
        }
    }
    // Every rank starts from rank 0's network (weights, statistics, quantizer state).
    if let Some(g) = group {
        g.broadcast_var_store(vs)?;
    }
    // Ranges set on rank 0 are the ones every rank uses.
    let calibrate_ranges = |network: &quant::Network| -> Result<()> {
        network.calibrate_ranges(&calib_batches);
        if let (Some(g), Some(e)) = (group, &network.integer) {
            g.broadcast(&e.ranges, 0)?;
        }
        Ok(())
    };

    let mut meta = CheckpointMeta {
        format: checkpoint::FORMAT_VERSION,
        model: job.model.clone(),
        eval_pipeline: eval_pipe.clone(),
        dataset: Some(job.dataset.clone()),
        train: Some(train_json),
        epoch: start_epoch,
        history: history.clone(),
        source: job
            .init
            .as_ref()
            .map(|i| format!("fine-tuned from {}", i.checkpoint.display())),
        precision: (job.precision != Precision::Full).then(|| job.precision.clone()),
        calibration,
        class_names: job.class_names.clone(),
    };
    let steps_per_epoch = job.train_indices.len() / cfg.batch_size;
    for epoch in start_epoch..cfg.epochs {
        let loader = DataLoader::new(
            job.train_data.clone(),
            &job.train_indices,
            train_pipe.clone(),
            LoaderConfig::training(cfg.batch_size, cfg.seed).sharded(shard),
            epoch as u64,
        )?;
        progress.epoch_start(epoch + 1, cfg.epochs, loader.batches());
        let started = Instant::now();
        let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0.0f64, 0usize);
        // Seconds this rank spent in the step's collectives (data-parallel runs).
        let mut comm = 0.0f64;
        let mut lr = cfg.lr;
        for (b, batch) in loader.enumerate() {
            let batch = batch?;
            if !frozen(&network) && epoch * steps_per_epoch + b >= freeze_step {
                calibrate_ranges(&network)?;
                if let Some(e) = &network.integer {
                    e.set_training_frozen(true);
                }
            }
            let (x, y) = (
                batch.images.to_device(job.device),
                batch.labels.to_device(job.device),
            );
            lr = cfg.schedule.lr(
                cfg.lr,
                epoch as f64 + b as f64 / steps_per_epoch as f64,
                cfg.epochs,
            );
            let logits = net.forward_t(&x, true);
            let loss = logits.cross_entropy_for_logits(&y);
            let n = y.size()[0] as f64;
            let hits = logits
                .argmax(1, false)
                .eq_tensor(&y)
                .sum(Kind::Float)
                .double_value(&[]);
            // The batch's loss, hits and size over all ranks (a NaN on one stops them all), and
            // whether any rank was asked to stop (they all stop at the same step).
            let stop = crate::runtime::stop_requested();
            let mut step = [
                loss.double_value(&[]) * n,
                hits,
                n,
                stop.map_or(0.0, f64::from),
            ];
            if let Some(g) = group {
                let t = Instant::now();
                let all = g.sum_f64(&step)?;
                step.copy_from_slice(&all);
                comm += t.elapsed().as_secs_f64();
            }
            if step[3] != 0.0 {
                return Err(TrainError::Stopped {
                    signal: crate::runtime::stop_cause(stop),
                    epoch: epoch + 1,
                    kept: if ckpt_path.exists() {
                        format!("{} keeps epoch {epoch}", ckpt_path.display())
                    } else {
                        "no epoch had finished".into()
                    },
                });
            }
            let loss_value = step[0] / step[2];
            if !loss_value.is_finite() {
                return Err(TrainError::NonFiniteLoss {
                    epoch: epoch + 1,
                    batch: b,
                    value: loss_value,
                });
            }
            opt.zero_grad();
            loss.backward();
            if let Some(g) = group {
                let t = Instant::now();
                opt.average_grads(g)?;
                comm += t.elapsed().as_secs_f64();
            }
            opt.step(lr);
            loss_sum += step[0];
            correct += step[1];
            seen += step[2] as usize;
            progress.batch(
                loss_value,
                lr,
                seen as f64 / started.elapsed().as_secs_f64(),
            );
        }
        let train_seconds = started.elapsed().as_secs_f64();
        if let (Some(g), true) = (group, main) {
            let steps = steps_per_epoch.max(1) as f64;
            tracing::info!(
                "data-parallel, {} ranks: {:.2} ms of collectives per step on rank 0 ({:.1} % of \
                 its {:.1} ms step)",
                g.world,
                1e3 * comm / steps,
                100.0 * comm / train_seconds.max(1e-9),
                1e3 * train_seconds / steps
            );
        }
        progress.evaluating();
        if let Some(g) = group {
            g.average_running_stats(vs)?;
        }
        if !frozen(&network) {
            // Batch norm has moved since the ranges were set.
            calibrate_ranges(&network)?;
        }
        let test = evaluate_shared(
            net,
            job.test_data.clone(),
            &job.test_indices,
            &eval_pipe,
            job.device,
            group,
        )?;
        let val = if job.val_indices.is_empty() {
            None
        } else {
            Some(evaluate_shared(
                net,
                job.train_data.clone(),
                &job.val_indices,
                &eval_pipe,
                job.device,
                group,
            )?)
        };
        // A diverged network can keep a finite training loss while its outputs overflow: every
        // metric must be finite, else the run stops here and the last good checkpoint stays.
        for (what, value) in [
            ("test loss", Some(test.loss)),
            ("validation loss", val.as_ref().map(|v| v.loss)),
            ("training loss", Some(loss_sum / seen.max(1) as f64)),
        ] {
            if let Some(v) = value.filter(|v| !v.is_finite()) {
                return Err(TrainError::NonFiniteMetric {
                    what,
                    value: v,
                    epoch: epoch + 1,
                    kept: if ckpt_path.exists() {
                        format!("the last good checkpoint, {}, is kept", ckpt_path.display())
                    } else {
                        "no checkpoint was written".into()
                    },
                });
            }
        }
        let m = EpochMetrics {
            epoch: epoch + 1,
            lr,
            train_loss: loss_sum / seen.max(1) as f64,
            train_top1: 100.0 * correct / seen.max(1) as f64,
            test_loss: test.loss,
            test_top1: test.top1,
            test_top5: test.top5,
            seconds: started.elapsed().as_secs_f64(),
            images_per_second: seen as f64 / train_seconds,
            val_top1: val.as_ref().map(|v| v.top1),
            val_loss: val.as_ref().map(|v| v.loss),
        };
        history.push(m.clone());
        meta.epoch = epoch + 1;
        meta.history = history.clone();
        if let Some(g) = group {
            g.check_same_var_store(vs, &format!("after epoch {}", epoch + 1))?;
        }
        if !main {
            continue;
        }
        let mut tensors = checkpoint::var_store_tensors(vs);
        for (name, buf) in opt.state() {
            tensors.insert(
                format!("{OPTIMIZER_PREFIX}momentum.{name}"),
                buf.to_device(Device::Cpu),
            );
        }
        Checkpoint {
            meta: meta.clone(),
            tensors,
        }
        .save(&ckpt_path)?;
        progress.epoch_end(&m);
    }
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules() {
        let c = LrSchedule::Cosine;
        assert!((c.lr(0.1, 0.0, 10) - 0.1).abs() < 1e-12);
        assert!((c.lr(0.1, 5.0, 10) - 0.05).abs() < 1e-12);
        let s = LrSchedule::Step {
            step_epochs: 10,
            gamma: 0.1,
        };
        assert!((s.lr(0.1, 9.9, 30) - 0.1).abs() < 1e-12);
        assert!((s.lr(0.1, 10.0, 30) - 0.01).abs() < 1e-12);
    }
}
