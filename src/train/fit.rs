//! The training loop behind [`train`]: where a run starts (from scratch, fine-tuning from FP
//! weights, or resumed), one epoch of steps, the epoch's evaluation and its checkpoint.

use super::{
    calibration_batches, channel_stats, check_run_size, check_same, evaluate_shared,
    last_checkpoint, pipelines, EvalMetrics, Progress, Result, Sgd, Silent, TrainConfig,
    TrainError, TrainJob, BN_FREEZE_AT, CALIBRATION_IMAGES,
};
use crate::checkpoint::{self, Checkpoint, CheckpointMeta, EpochMetrics, OPTIMIZER_PREFIX};
use crate::data::{DataLoader, LoaderConfig, Normalize, Pipeline, Shard};
use crate::dist::Group;
use crate::policy::{LayerCalibration, Precision};
use crate::quant::{self, Network};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tch::nn::ModuleT;
use tch::{Device, Kind, Tensor};

/// Creates the run folder; rank 0 locks it (for the run's length) and clears what an
/// interrupted write left.
fn open_out_dir(dir: &std::path::Path, main: bool) -> Result<Option<crate::files::DirLock>> {
    std::fs::create_dir_all(dir).map_err(|source| TrainError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    if !main {
        return Ok(None);
    }
    let lock = crate::files::DirLock::acquire(dir)?;
    crate::files::remove_stale_temps(dir);
    Ok(Some(lock))
}

/// Trains (or resumes) a network at `job.precision` — from scratch, or fine-tuning from FP
/// weights after calibrating its quantizers — and returns the final checkpoint's metadata.
pub fn train(job: TrainJob) -> Result<CheckpointMeta> {
    check_job(&job)?;
    let cfg = &job.config;
    // Data-parallel: each rank computes its share of every batch; rank 0 owns the run folder.
    let group = crate::dist::current();
    let main = group.is_none_or(|g| g.is_main());
    let shard = crate::dist::shard(cfg.batch_size).map_err(TrainError::Invalid)?;
    let progress: &dyn Progress = if main { job.progress } else { &Silent };
    let _lock = open_out_dir(&job.out_dir, main)?;
    let ckpt_path = last_checkpoint(&job.out_dir);
    // Seed before the network is built: the weight init draws from libtorch's RNG.
    tch::manual_seed(cfg.seed as i64);
    let network = quant::build(&job.model, job.precision.clone(), job.device)?;
    let mut opt = Sgd::new(Sgd::trainable(&network.vs), cfg.momentum, cfg.weight_decay);
    let train_json = serde_json::to_value(cfg).map_err(|e| TrainError::Invalid(e.to_string()))?;
    let Start {
        mut history,
        epoch: start_epoch,
        normalize,
        mut calibration,
    } = start(&job, &network, &mut opt, &ckpt_path)?;

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
        .map_or(CALIBRATION_IMAGES, |i| i.calibration_images);
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
    let steps_per_epoch = job.train_indices.len() / cfg.batch_size;
    let run = Run {
        job: &job,
        cfg,
        network: &network,
        group,
        main,
        shard,
        progress,
        calib_batches,
        // Integer numerics: float batch norm until this step, then the deployed, folded form
        // (ranges calibrated once there, then saved); evaluation always runs the deployed form.
        freeze_step: ((cfg.epochs * steps_per_epoch) as f64 * BN_FREEZE_AT).floor() as usize,
        steps_per_epoch,
        ckpt_path,
    };
    if let Some(e) = &network.integer {
        if start_epoch * steps_per_epoch >= run.freeze_step && start_epoch > 0 {
            e.set_training_frozen(true);
        } else {
            network.calibrate_ranges(&run.calib_batches);
        }
    }
    // Every rank starts from rank 0's network (weights, statistics, quantizer state).
    if let Some(g) = group {
        g.broadcast_var_store(&network.vs)?;
    }

    let mut meta = first_meta(
        &job,
        eval_pipe.clone(),
        train_json,
        start_epoch,
        &history,
        calibration,
    );
    for epoch in start_epoch..cfg.epochs {
        let started = Instant::now();
        let totals = run.train_epoch(epoch, &mut opt, &train_pipe)?;
        progress.evaluating();
        let (test, val) = run.evaluate(epoch, &eval_pipe, &totals)?;
        let m = EpochMetrics {
            epoch: epoch + 1,
            lr: totals.lr,
            train_loss: totals.loss_sum / totals.seen.max(1) as f64,
            train_top1: 100.0 * totals.correct / totals.seen.max(1) as f64,
            test_loss: test.loss,
            test_top1: test.top1,
            test_top5: test.top5,
            seconds: started.elapsed().as_secs_f64(),
            images_per_second: totals.seen as f64 / totals.seconds,
            val_top1: val.as_ref().map(|v| v.top1),
            val_loss: val.as_ref().map(|v| v.loss),
        };
        history.push(m.clone());
        meta.epoch = epoch + 1;
        meta.history = history.clone();
        if let Some(g) = group {
            g.check_same_var_store(&network.vs, &format!("after epoch {}", epoch + 1))?;
        }
        if main {
            run.save(&meta, &opt)?;
            progress.epoch_end(&m);
        }
    }
    Ok(meta)
}

/// The checkpoint metadata of a run about to train from `epoch` with `history` behind it and
/// its quantizers calibrated as `calibration` records.
fn first_meta(
    job: &TrainJob,
    eval_pipeline: Pipeline,
    train: serde_json::Value,
    epoch: usize,
    history: &[EpochMetrics],
    calibration: Option<Vec<LayerCalibration>>,
) -> CheckpointMeta {
    CheckpointMeta {
        format: checkpoint::FORMAT_VERSION,
        model: job.model.clone(),
        eval_pipeline,
        dataset: Some(job.dataset.clone()),
        train: Some(train),
        epoch,
        history: history.to_vec(),
        source: job
            .init
            .as_ref()
            .map(|i| format!("fine-tuned from {}", i.checkpoint.display())),
        precision: (job.precision != Precision::Full).then(|| job.precision.clone()),
        calibration,
        class_names: job.class_names.clone(),
    }
}

/// Refuses settings the run cannot train with, before anything is written.
fn check_job(job: &TrainJob) -> Result<()> {
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
    .map_err(TrainError::Invalid)
}

/// Where a run starts: the history so far, the first epoch to run, the input normalization
/// and the quantizers' calibration record.
struct Start {
    history: Vec<EpochMetrics>,
    epoch: usize,
    normalize: Normalize,
    calibration: Option<Vec<LayerCalibration>>,
}

/// Resumes from `ckpt_path` (weights, momentum and history; everything but the number of
/// epochs must match), starts from the FP checkpoint a fine-tuning names, or from scratch
/// (the input normalization measured on the training data).
fn start(job: &TrainJob, network: &Network, opt: &mut Sgd, ckpt_path: &Path) -> Result<Start> {
    let cfg = &job.config;
    if ckpt_path.exists() {
        if !job.resume {
            return Err(TrainError::WouldOverwrite {
                dir: job.out_dir.clone(),
            });
        }
        let ck = Checkpoint::load(ckpt_path)?;
        check_same(ckpt_path, "the model", &ck.meta.model, &job.model)?;
        let saved_precision = ck.meta.precision.clone().unwrap_or(Precision::Full);
        check_same(ckpt_path, "the precision", &saved_precision, &job.precision)?;
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
        check_same(ckpt_path, "the training settings", &saved_cfg, cfg)?;
        check_same(
            ckpt_path,
            "dataset",
            &ck.meta.dataset,
            &Some(job.dataset.clone()),
        )?;
        checkpoint::load_into_var_store(
            &network.vs,
            ck.model_tensors(),
            ckpt_path,
            |_| false,
            |_| false,
        )?;
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
        return Ok(Start {
            history: ck.meta.history,
            epoch: ck.meta.epoch,
            normalize: ck.meta.eval_pipeline.normalize,
            calibration: ck.meta.calibration,
        });
    }
    if let Some(init) = &job.init {
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
        return Ok(Start {
            history: Vec::new(),
            epoch: 0,
            normalize: ck.meta.eval_pipeline.normalize,
            calibration: None,
        });
    }
    Ok(Start {
        history: Vec::new(),
        epoch: 0,
        normalize: channel_stats(job.train_data.as_ref(), &job.train_indices)?,
        calibration: None,
    })
}

/// What stays the same over the epochs of one run.
struct Run<'a> {
    job: &'a TrainJob<'a>,
    cfg: &'a TrainConfig,
    network: &'a Network,
    group: Option<&'static Group>,
    /// Rank 0 (or the only process): it reports and writes.
    main: bool,
    shard: Shard,
    progress: &'a dyn Progress,
    /// Training images (no augmentation) the quantizers and integer ranges calibrate on.
    calib_batches: Vec<Tensor>,
    /// The step where integer numerics freeze batch norm ([`BN_FREEZE_AT`]).
    freeze_step: usize,
    steps_per_epoch: usize,
    ckpt_path: PathBuf,
}

/// One epoch's training, summed over all ranks.
struct EpochTotals {
    loss_sum: f64,
    correct: f64,
    seen: usize,
    /// The learning rate of the epoch's last step.
    lr: f64,
    /// Seconds of the training steps (evaluation not included).
    seconds: f64,
}

impl Run<'_> {
    /// Whether the network trains in its deployed form (always, but for integer numerics
    /// before the batch-norm freeze).
    fn frozen(&self) -> bool {
        self.network
            .integer
            .as_ref()
            .is_none_or(|e| e.training_frozen())
    }

    /// Calibrates the integer ranges; those set on rank 0 are the ones every rank uses.
    fn calibrate_ranges(&self) -> Result<()> {
        self.network.calibrate_ranges(&self.calib_batches);
        if let (Some(g), Some(e)) = (self.group, &self.network.integer) {
            g.broadcast(&e.ranges, 0)?;
        }
        Ok(())
    }

    /// The checkpoint a stopped run keeps, if an epoch has finished.
    fn kept(&self) -> Option<std::path::Display<'_>> {
        self.ckpt_path.exists().then(|| self.ckpt_path.display())
    }

    /// One epoch of steps (0-based `epoch`): forward, loss, the step's totals summed over the
    /// ranks (a stop signal or a NaN on one rank stops them all at the same step), backward,
    /// gradients averaged, update.
    fn train_epoch(
        &self,
        epoch: usize,
        opt: &mut Sgd,
        train_pipe: &Arc<Pipeline>,
    ) -> Result<EpochTotals> {
        let (job, cfg) = (self.job, self.cfg);
        let loader = DataLoader::new(
            job.train_data.clone(),
            &job.train_indices,
            train_pipe.clone(),
            LoaderConfig::training(cfg.batch_size, cfg.seed).sharded(self.shard),
            epoch as u64,
        )?;
        self.progress
            .epoch_start(epoch + 1, cfg.epochs, loader.batches());
        let started = Instant::now();
        let mut totals = EpochTotals {
            loss_sum: 0.0,
            correct: 0.0,
            seen: 0,
            lr: cfg.lr,
            seconds: 0.0,
        };
        // Seconds this rank spent in the step's collectives (data-parallel runs).
        let mut comm = 0.0f64;
        for (b, batch) in loader.enumerate() {
            let batch = batch?;
            if !self.frozen() && epoch * self.steps_per_epoch + b >= self.freeze_step {
                self.calibrate_ranges()?;
                if let Some(e) = &self.network.integer {
                    e.set_training_frozen(true);
                }
            }
            let (x, y) = (
                batch.images.to_device(job.device),
                batch.labels.to_device(job.device),
            );
            totals.lr = cfg.schedule.lr(
                cfg.lr,
                epoch as f64 + b as f64 / self.steps_per_epoch as f64,
                cfg.epochs,
            );
            let logits = self.network.forward_t(&x, true);
            let loss = logits.cross_entropy_for_logits(&y);
            let n = y.size()[0] as f64;
            let hits = logits
                .argmax(1, false)
                .eq_tensor(&y)
                .sum(Kind::Float)
                .double_value(&[]);
            let stop = crate::runtime::stop_requested();
            let mut step = [
                loss.double_value(&[]) * n,
                hits,
                n,
                stop.map_or(0.0, f64::from),
            ];
            if let Some(g) = self.group {
                let t = Instant::now();
                let all = g.sum_f64(&step)?;
                step.copy_from_slice(&all);
                comm += t.elapsed().as_secs_f64();
            }
            if step[3] != 0.0 {
                return Err(TrainError::Stopped {
                    signal: crate::runtime::stop_cause(stop),
                    epoch: epoch + 1,
                    kept: self.kept().map_or("no epoch had finished".into(), |path| {
                        format!("{path} keeps epoch {epoch}")
                    }),
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
            if let Some(g) = self.group {
                let t = Instant::now();
                opt.average_grads(g)?;
                comm += t.elapsed().as_secs_f64();
            }
            opt.step(totals.lr);
            totals.loss_sum += step[0];
            totals.correct += step[1];
            totals.seen += step[2] as usize;
            self.progress.batch(
                loss_value,
                totals.lr,
                totals.seen as f64 / started.elapsed().as_secs_f64(),
            );
        }
        totals.seconds = started.elapsed().as_secs_f64();
        if let (Some(g), true) = (self.group, self.main) {
            let steps = self.steps_per_epoch.max(1) as f64;
            tracing::info!(
                "data-parallel, {} ranks: {:.2} ms of collectives per step on rank 0 ({:.1} % of \
                 its {:.1} ms step)",
                g.world,
                1e3 * comm / steps,
                100.0 * comm / totals.seconds.max(1e-9),
                1e3 * totals.seconds / steps
            );
        }
        Ok(totals)
    }

    /// The epoch's test (and validation) metrics, after the ranks' batch-norm statistics are
    /// averaged and the integer ranges follow them; every metric must be finite, else the run
    /// stops here and the last good checkpoint stays (a diverged network can keep a finite
    /// training loss while its outputs overflow).
    fn evaluate(
        &self,
        epoch: usize,
        eval_pipe: &Pipeline,
        totals: &EpochTotals,
    ) -> Result<(EvalMetrics, Option<EvalMetrics>)> {
        let job = self.job;
        if let Some(g) = self.group {
            g.average_running_stats(&self.network.vs)?;
        }
        if !self.frozen() {
            // Batch norm has moved since the ranges were set.
            self.calibrate_ranges()?;
        }
        let net: &dyn ModuleT = self.network;
        let test = evaluate_shared(
            net,
            job.test_data.clone(),
            &job.test_indices,
            eval_pipe,
            job.device,
            self.group,
        )?;
        let val = if job.val_indices.is_empty() {
            None
        } else {
            Some(evaluate_shared(
                net,
                job.train_data.clone(),
                &job.val_indices,
                eval_pipe,
                job.device,
                self.group,
            )?)
        };
        for (what, value) in [
            ("test loss", Some(test.loss)),
            ("validation loss", val.as_ref().map(|v| v.loss)),
            (
                "training loss",
                Some(totals.loss_sum / totals.seen.max(1) as f64),
            ),
        ] {
            if let Some(v) = value.filter(|v| !v.is_finite()) {
                return Err(TrainError::NonFiniteMetric {
                    what,
                    value: v,
                    epoch: epoch + 1,
                    kept: self
                        .kept()
                        .map_or("no checkpoint was written".into(), |path| {
                            format!("the last good checkpoint, {path}, is kept")
                        }),
                });
            }
        }
        Ok((test, val))
    }

    /// Writes the epoch's checkpoint (weights, momentum, `meta`) atomically.
    fn save(&self, meta: &CheckpointMeta, opt: &Sgd) -> Result<()> {
        let mut tensors = checkpoint::var_store_tensors(&self.network.vs);
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
        .save(&self.ckpt_path)?;
        Ok(())
    }
}
