//! Post-training quantization (`gmpq quantize`): a full-precision checkpoint, a policy, and
//! calibration on a few training images — no training — then the FP and the quantized
//! network compared on test images.

use super::{evaluate_with_predictions, EvalMetrics, Result, TrainError};
use crate::checkpoint::Checkpoint;
use crate::data::{stratified_subset, DataLoader, DatasetSpec, LoaderConfig, Split, SubsetSpec};
use crate::policy::{Numerics, PolicySource, PolicyTotals, Precision};
use crate::quant::{self, CalibrationMethod};
use std::path::PathBuf;
use std::sync::Arc;

/// What `gmpq quantize` runs.
#[derive(Debug, Clone)]
pub struct PtqRequest {
    /// The full-precision checkpoint.
    pub checkpoint: PathBuf,
    pub policy: PolicySource,
    pub per_channel: bool,
    pub numerics: Numerics,
    pub calibration: CalibrationMethod,
    /// Calibration images come from its training split (a stratified draw).
    pub calib_data: DatasetSpec,
    pub calib_images: usize,
    /// The comparison runs on its test split (`limit` images, stratified; all when `None`).
    pub eval_data: DatasetSpec,
    pub eval_limit: Option<usize>,
    /// The quantized checkpoint.
    pub out: PathBuf,
}

/// What a post-training quantization gave.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PtqOutcome {
    pub checkpoint: PathBuf,
    pub fp: EvalMetrics,
    pub quantized: EvalMetrics,
    /// Test images where both networks predict the same class.
    pub top1_agreement: usize,
    pub images: usize,
    /// FP top-1 minus quantized top-1, in points.
    pub top1_drop: f64,
    pub totals: PolicyTotals,
    pub calibration: CalibrationMethod,
}

impl PtqRequest {
    /// Builds the quantized network from the FP weights, calibrates its clips (and integer
    /// ranges), compares it with the FP network and saves it.
    pub fn run(&self, device: tch::Device) -> Result<PtqOutcome> {
        let (fp_ck, fp_net) = quant::load(&self.checkpoint, device)?;
        if fp_net.precision != Precision::Full {
            return Err(TrainError::Invalid(format!(
                "{} is already quantized; give a full-precision checkpoint",
                self.checkpoint.display()
            )));
        }
        let cfg = fp_ck.meta.model.clone();
        let policy = self
            .policy
            .resolve(&cfg, fp_net.net.convs(), fp_net.net.fc_spec())?;
        let q = quant::build(
            &cfg,
            Precision::Fixed {
                policy: policy.clone(),
                per_channel: self.per_channel,
                numerics: self.numerics,
            },
            device,
        )?;
        q.load_fp_weights(&fp_ck, &self.checkpoint)?;

        let calib_data = self.calib_data.load(Split::Train)?;
        let calib_idx = stratified_subset(
            calib_data.as_ref(),
            &SubsetSpec::limited(Some(self.calib_images.min(calib_data.len())), 0),
        )?;
        let loader = DataLoader::new(
            calib_data,
            &calib_idx,
            Arc::new(fp_ck.meta.eval_pipeline.clone()),
            LoaderConfig {
                batch_size: 256,
                ..Default::default()
            },
            0,
        )?;
        let batches: Vec<tch::Tensor> = loader
            .map(|b| b.map(|b| b.images))
            .collect::<std::result::Result<_, _>>()?;
        let layers = quant::calibrate(&q, &batches, self.calibration)?;
        q.calibrate_ranges(&batches);

        let test = self.eval_data.load(Split::Test)?;
        let test_idx = stratified_subset(test.as_ref(), &SubsetSpec::limited(self.eval_limit, 0))?;
        let pipe = &fp_ck.meta.eval_pipeline;
        let (fp, fp_pred) =
            evaluate_with_predictions(&fp_net.net, test.clone(), &test_idx, pipe, 256, device)?;
        let (quantized, q_pred) =
            evaluate_with_predictions(&q, test, &test_idx, pipe, 256, device)?;
        let top1_agreement = fp_pred.iter().zip(&q_pred).filter(|(a, b)| a == b).count();
        let totals = policy
            .totals
            .clone()
            .ok_or_else(|| TrainError::Invalid("the policy has no totals".into()))?;

        let mut meta = fp_ck.meta.clone();
        meta.precision = Some(q.precision.clone());
        meta.calibration = Some(layers);
        meta.train = None;
        meta.history = Vec::new();
        meta.source = Some(format!("calibrated from {}", self.checkpoint.display()));
        if let Some(dir) = self.out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| TrainError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        Checkpoint {
            meta,
            tensors: crate::checkpoint::var_store_tensors(&q.vs),
        }
        .save(&self.out)?;
        Ok(PtqOutcome {
            checkpoint: self.out.clone(),
            fp,
            quantized,
            top1_agreement,
            images: q_pred.len(),
            top1_drop: fp.top1 - quantized.top1,
            totals,
            calibration: self.calibration,
        })
    }
}
