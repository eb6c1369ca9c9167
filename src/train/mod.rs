//! Full-precision training and evaluation: SGD with momentum and weight decay, cosine or step
//! learning-rate schedules, top-1/top-5 evaluation every epoch, and atomic, resumable
//! checkpoints.

#[cfg(feature = "cli")]
mod args;
mod eval;
mod fit;
mod optim;
mod ptq;
mod request;

#[cfg(feature = "cli")]
pub use args::{FinetuneArgs, QuantizeArgs, TrainArgs};
pub use eval::{
    evaluate, evaluate_by, evaluate_shared, evaluate_with_predictions, input_mismatch, EvalMetrics,
};
pub use fit::train;
pub use optim::{Adam, ParamLayout, Sgd};
pub use ptq::{PtqOutcome, PtqRequest};
pub use request::{Finetune, TrainOutcome, TrainRequest};

use crate::checkpoint::{CheckpointError, EpochMetrics};
use crate::data::{
    DataError, DataLoader, ImageSource, LoaderConfig, Normalize, Pipeline, Transform,
};
use crate::model::{Model, ModelConfig, ModelError};
use crate::quant::{self, CalibrationMethod, Precision, QuantError};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::nn::{self};
use tch::{Device, Tensor};

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
    Policy(#[from] crate::policy::PolicyError),
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

/// Training images used to calibrate a fine-tuning's quantizers (`--calib-limit`).
pub const CALIBRATION_IMAGES: usize = 1024;
/// The calibration rule of fine-tuning (`--calibration`).
pub const CALIBRATION: crate::quant::CalibrationMethod =
    crate::quant::CalibrationMethod::KlBelow5Bits;

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
