//! A training or fine-tuning run as one typed value: what `gmpq train`, `gmpq finetune` and the
//! pipeline's teacher and fine-tuning stages run. The CLI only fills it in from flags.

use super::{
    last_checkpoint, train, Augment, InitFrom, LrSchedule, Progress, Result, TrainConfig,
    TrainError, TrainJob, CALIBRATION, CALIBRATION_IMAGES, FINETUNE_LR, FINETUNE_WEIGHT_DECAY,
    TRAIN_LR, TRAIN_WEIGHT_DECAY,
};
use crate::checkpoint::{Checkpoint, CheckpointMeta};
use crate::data::{holdout_indices, stratified_subset, DatasetSpec, Split, SubsetSpec};
use crate::model::{Arch, ModelConfig, Stem};
use crate::policy::Policy;
use crate::quant::Precision;
use std::path::PathBuf;

/// Fine-tuning's extras: the FP weights it starts from, their model, and the fixed policy.
#[derive(Debug, Clone)]
pub struct Finetune {
    pub init: InitFrom,
    pub model: ModelConfig,
    pub precision: Precision,
}

impl Finetune {
    /// Reads `init`'s model and checks `policy` against it.
    pub fn new(
        init: InitFrom,
        policy: Policy,
        per_channel: bool,
        numerics: crate::quant::Numerics,
    ) -> Result<Self> {
        let model = Checkpoint::load(&init.checkpoint)?.meta.model;
        let (_, net) = super::build_fp(&model, tch::Device::Cpu)?;
        policy
            .validate(&model, net.convs())
            .map_err(|e| TrainError::Invalid(format!("the policy does not fit the model: {e}")))?;
        Ok(Self {
            init,
            model,
            precision: Precision::Fixed {
                policy: policy.with_totals(net.convs(), net.fc_spec()),
                per_channel,
                numerics,
            },
        })
    }

    /// Fine-tuning from `checkpoint` with the policy file at `policy`, default calibration.
    pub fn from_files(
        checkpoint: PathBuf,
        policy: &std::path::Path,
        numerics: crate::quant::Numerics,
    ) -> Result<Self> {
        let policy = Policy::load(policy)
            .map_err(|e| TrainError::Invalid(format!("{}: {e}", policy.display())))?;
        let init = InitFrom {
            checkpoint,
            calibration: CALIBRATION,
            calibration_images: CALIBRATION_IMAGES,
        };
        Self::new(init, policy, false, numerics)
    }
}

/// One training run: data, model, recipe, output folder.
#[derive(Debug, Clone)]
pub struct TrainRequest {
    /// The architecture trained from scratch (a fine-tuning takes its init's).
    pub arch: Arch,
    pub data: DatasetSpec,
    /// Evaluation data (default: the test split of `data`).
    pub test_data: Option<DatasetSpec>,
    /// Model input resolution (default: the data's own).
    pub input_size: Option<usize>,
    /// Expand gray images to 3 channels.
    pub rgb: bool,
    pub stem: Option<Stem>,
    pub width: f64,
    pub epochs: usize,
    pub batch_size: usize,
    /// Default: [`TRAIN_LR`], or [`FINETUNE_LR`] when fine-tuning.
    pub lr: Option<f64>,
    pub momentum: f64,
    /// Default: [`TRAIN_WEIGHT_DECAY`], or [`FINETUNE_WEIGHT_DECAY`] when fine-tuning.
    pub weight_decay: Option<f64>,
    pub schedule: LrSchedule,
    pub augment: Augment,
    pub seed: u64,
    pub subset: SubsetSpec,
    pub test_limit: Option<usize>,
    pub out: PathBuf,
    pub resume: bool,
    pub finetune: Option<Finetune>,
}

/// What a finished training left: its last checkpoint and that checkpoint's record.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub checkpoint: PathBuf,
    pub meta: CheckpointMeta,
}

impl TrainOutcome {
    /// `PATH: epoch N, test top-1 …%, top-5 …%`.
    pub fn one_line(&self) -> String {
        match self.meta.history.last() {
            Some(last) => format!(
                "{}: epoch {}, test top-1 {:.2}%, top-5 {:.2}%",
                self.checkpoint.display(),
                self.meta.epoch,
                last.test_top1,
                last.test_top5
            ),
            None => format!("{}: no epoch run", self.checkpoint.display()),
        }
    }
}

impl TrainRequest {
    /// ResNet-20 on `data` with the default recipe ([`TrainConfig::default`]), into `out`.
    pub fn new(data: DatasetSpec, out: PathBuf) -> Self {
        let d = TrainConfig::default();
        Self {
            arch: Arch::ResNet20,
            data,
            test_data: None,
            input_size: None,
            rgb: false,
            stem: None,
            width: 1.0,
            epochs: d.epochs,
            batch_size: d.batch_size,
            lr: None,
            momentum: d.momentum,
            weight_decay: None,
            schedule: d.schedule,
            augment: d.augment,
            seed: d.seed,
            subset: SubsetSpec::limited(None, 0),
            test_limit: None,
            out,
            resume: false,
            finetune: None,
        }
    }

    /// Loads the data, builds the model and trains (or resumes) into `out`.
    pub fn run(self, device: tch::Device, progress: &dyn Progress) -> Result<TrainOutcome> {
        let train_data = self.data.load(Split::Train)?;
        let test_spec = self.test_data.as_ref().unwrap_or(&self.data);
        let test_data = test_spec.load(Split::Test)?;
        if test_data.num_classes() != train_data.num_classes() {
            return Err(TrainError::Invalid(format!(
                "train data has {} classes but test data has {}",
                train_data.num_classes(),
                test_data.num_classes()
            )));
        }
        let train_indices = stratified_subset(train_data.as_ref(), &self.subset)?;
        let val_indices = holdout_indices(train_data.as_ref(), self.subset.holdout)?;
        let test_indices = stratified_subset(
            test_data.as_ref(),
            &SubsetSpec::limited(self.test_limit, self.subset.seed),
        )?;
        let native = train_data.shape()?;
        let channels = if self.rgb { 3 } else { native[0] };
        let mut model = ModelConfig::new(
            self.arch,
            channels,
            train_data.num_classes(),
            self.input_size.unwrap_or(native[1]),
        );
        if let Some(stem) = self.stem {
            model.stem = stem;
        }
        model.width = self.width;
        let (precision, init) = match self.finetune {
            Some(f) => {
                if f.model.num_classes < train_data.num_classes() {
                    return Err(TrainError::Invalid(format!(
                        "{} predicts {} classes but the data has {}",
                        f.init.checkpoint.display(),
                        f.model.num_classes,
                        train_data.num_classes()
                    )));
                }
                model = f.model;
                (f.precision, Some(f.init))
            }
            None => (Precision::Full, None),
        };
        let finetuning = init.is_some();
        let config = TrainConfig {
            epochs: self.epochs,
            batch_size: self.batch_size,
            lr: self
                .lr
                .unwrap_or(if finetuning { FINETUNE_LR } else { TRAIN_LR }),
            momentum: self.momentum,
            weight_decay: self.weight_decay.unwrap_or(if finetuning {
                FINETUNE_WEIGHT_DECAY
            } else {
                TRAIN_WEIGHT_DECAY
            }),
            schedule: self.schedule,
            augment: self.augment,
            seed: self.seed,
        };
        let subset = self.subset.limit.is_some() || self.subset.per_class.is_some();
        let dataset = format!(
            "{} ({} train images{}; test {} images)",
            self.data,
            train_indices.len(),
            if subset {
                format!(", subset seed {}", self.subset.seed)
            } else {
                String::new()
            },
            test_indices.len()
        ) + &if val_indices.is_empty() {
            String::new()
        } else {
            format!("; {} held out for validation", val_indices.len())
        };
        tracing::info!(
            "training {} ({} ch, {} px, {} classes) on {dataset} for {} epochs",
            model.arch,
            model.in_channels,
            model.input_size,
            model.num_classes,
            config.epochs
        );
        let class_names = self
            .data
            .class_names()
            .filter(|n| n.len() == train_data.num_classes());
        let meta = train(TrainJob {
            model,
            config,
            train_data,
            train_indices,
            test_data,
            test_indices,
            val_indices,
            class_names,
            dataset,
            out_dir: self.out.clone(),
            resume: self.resume,
            device,
            progress,
            precision,
            init,
        })?;
        Ok(TrainOutcome {
            checkpoint: last_checkpoint(&self.out),
            meta,
        })
    }
}
