//! The chosen model as a user ships it: exported, and the exported file itself evaluated in
//! ONNX Runtime on the target's test images beside the checkpoint it came from, so that what
//! the run reports is what the shipped file computes.

use super::stage::{Stage, StageContext};
use super::{Arm, PipelineError, Result};
use crate::data::{stratified_subset, DatasetSpec, ImageSource, Split, SubsetSpec};
use crate::engine::{Agreement, OnnxModel, SessionOptions};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Below this share of test images with the same top-1 class in gmpq and in ONNX Runtime, the
/// shipped file is not the model the run measured, and the run says so.
pub const AGREEMENT_FLOOR: f64 = 99.9;

/// What `chosen.json` records: the chosen arm's files and how the shipped ONNX file scores.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Shipped {
    pub arm: Arm,
    pub checkpoint: PathBuf,
    pub onnx: PathBuf,
    pub packed: PathBuf,
    /// Test images both were run on (the fine-tuning's test split).
    #[serde(default)]
    pub images: usize,
    /// Top-1 (%) of the shipped ONNX file in ONNX Runtime, and of its checkpoint in gmpq.
    #[serde(default)]
    pub onnx_top1: Option<f64>,
    #[serde(default)]
    pub checkpoint_top1: Option<f64>,
    /// Images with the same top-1 class in both, in %.
    #[serde(default)]
    pub top1_agreement: Option<f64>,
    #[serde(default)]
    pub max_logit_difference: Option<f64>,
    /// The CPU and the integer kernel path ONNX Runtime took on it.
    #[serde(default)]
    pub cpu: Option<String>,
    #[serde(default)]
    pub integer_kernels: Option<String>,
}

impl Shipped {
    /// The record in `path`, if it is one (older runs' records have no evaluation).
    pub fn read(path: &Path) -> Option<Self> {
        let bytes = std::fs::read(path).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Whether the shipped file was evaluated.
    pub fn evaluated(&self) -> bool {
        self.onnx_top1.is_some() && self.top1_agreement.is_some()
    }

    /// Whether gmpq and ONNX Runtime disagree on more images than [`AGREEMENT_FLOOR`] allows.
    pub fn disagrees(&self) -> bool {
        self.top1_agreement.is_some_and(|a| a < AGREEMENT_FLOOR)
    }

    /// One line: the shipped file's top-1 beside its checkpoint's, and their agreement.
    pub fn line(&self) -> String {
        let name = self.onnx.file_name().map_or_else(
            || self.onnx.display().to_string(),
            |n| n.to_string_lossy().into(),
        );
        match (self.onnx_top1, self.checkpoint_top1, self.top1_agreement) {
            (Some(o), Some(c), Some(a)) => {
                let warning = if self.disagrees() {
                    format!(
                        " — WARNING: below {AGREEMENT_FLOOR}%: the shipped file is not the model \
                         measured here"
                    )
                } else {
                    String::new()
                };
                format!(
                    "shipped: {name} scores {o:.2}% in ONNX Runtime ({} kernels) against \
                     {c:.2}% for its checkpoint in gmpq; same top-1 class on {a:.2}% of {} \
                     test images{warning}",
                    self.integer_kernels
                        .as_deref()
                        .and_then(|k| k.split(" (").next())
                        .unwrap_or("its"),
                    self.images
                )
            }
            _ => format!("shipped: {name} (not evaluated: exported before gmpq checked it)"),
        }
    }
}

/// The chosen model exported for deployment: `chosen.onnx` (the graph of `gmpq export`) and
/// `chosen.packed.safetensors`, then `chosen.onnx` run by ONNX Runtime on the target's test
/// images beside the checkpoint ([`Shipped`] in `chosen.json`). Done when `chosen.json` names
/// the arm chosen now and holds that evaluation (an added arm that wins on validation, or a
/// run exported before the evaluation existed, is exported again).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportStage {
    pub arm: Arm,
    pub checkpoint: PathBuf,
    pub layout_dir: PathBuf,
    /// The target data and the fine-tunings' test limit: the images the arms were scored on.
    pub data: String,
    pub test_limit: Option<usize>,
}

impl Stage for ExportStage {
    fn identity(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    fn name(&self) -> String {
        "export-chosen".into()
    }

    fn command(&self) -> String {
        let l = super::RunLayout::new(&self.layout_dir);
        format!(
            "(in gmpq) the chosen model ({}) as gmpq export writes it: {} and --format packed {}; \
             then gmpq eval --checkpoint {} --onnx {} --data {}",
            self.arm.name(),
            l.chosen_onnx().display(),
            l.chosen_packed().display(),
            self.checkpoint.display(),
            l.chosen_onnx().display(),
            self.data
        )
    }

    fn done(&self) -> Result<bool> {
        let l = super::RunLayout::new(&self.layout_dir);
        let recorded = Shipped::read(&l.chosen_record());
        Ok(recorded.is_some_and(|r| r.arm == self.arm && r.evaluated())
            && l.chosen_onnx().is_file()
            && l.chosen_packed().is_file())
    }

    fn run(&self, _ctx: &StageContext) -> Result<String> {
        let l = super::RunLayout::new(&self.layout_dir);
        let (ck, network) = crate::quant::load(&self.checkpoint, tch::Device::Cpu)?;
        let onnx = crate::export::onnx::export(
            &ck,
            &network,
            crate::export::onnx::OnnxOptions {
                full_precision: false,
            },
        )?;
        let write = |path: &Path, bytes: &[u8]| {
            crate::files::write_atomic(path, bytes).map_err(|source| PipelineError::Write {
                path: path.into(),
                source,
            })
        };
        write(&l.chosen_onnx(), &onnx)?;
        let packed = crate::export::packed::save(&ck, &l.chosen_packed())?;
        let agreement = self.evaluate(&onnx, &ck, &network)?;
        let cpu = crate::engine::CpuInfo::detect();
        let shipped = Shipped {
            arm: self.arm,
            checkpoint: self.checkpoint.clone(),
            onnx: l.chosen_onnx(),
            packed: l.chosen_packed(),
            images: agreement.images,
            onnx_top1: Some(agreement.onnx.top1),
            checkpoint_top1: Some(agreement.libtorch.top1),
            top1_agreement: Some(agreement.top1_agreement),
            max_logit_difference: Some(agreement.max_logit_difference),
            cpu: Some(cpu.model.clone()),
            integer_kernels: Some(agreement.integer_kernels.clone()),
        };
        if shipped.disagrees() {
            tracing::warn!("{}", shipped.line());
        }
        let record = serde_json::to_vec_pretty(&shipped)
            .map_err(|e| PipelineError::Invalid(format!("chosen.json: {e}")))?;
        write(&l.chosen_record(), &record)?;
        Ok(format!(
            "{} ({:.3} MB) and {} ({:.3} MB): the {} model; {}",
            l.chosen_onnx().display(),
            onnx.len() as f64 / 1e6,
            l.chosen_packed().display(),
            packed as f64 / 1e6,
            self.arm.label(),
            shipped.line()
        ))
    }
}

impl ExportStage {
    /// The exported bytes in ONNX Runtime and the checkpoint in gmpq, on the test images the
    /// fine-tuning scored.
    fn evaluate(
        &self,
        onnx: &[u8],
        ck: &crate::checkpoint::Checkpoint,
        network: &crate::quant::Network,
    ) -> Result<Agreement> {
        let spec: DatasetSpec = self
            .data
            .parse()
            .map_err(super::context(format!("target data {}", self.data)))?;
        let data = spec
            .load(Split::Test)
            .map_err(super::context(format!("target data {}", self.data)))?;
        let indices = stratified_subset(data.as_ref(), &SubsetSpec::limited(self.test_limit, 0))
            .map_err(super::context(format!("target data {}", self.data)))?;
        let opts = SessionOptions {
            threads: tch::get_num_threads().max(1) as usize,
            optimized_model: None,
            unoptimized: false,
        };
        let mut model = OnnxModel::from_bytes(onnx, &opts).map_err(super::context(
            "the exported chosen.onnx in ONNX Runtime".to_string(),
        ))?;
        let data: Arc<dyn ImageSource> = data;
        crate::engine::compare(
            &mut model,
            network,
            &ck.meta.eval_pipeline,
            data,
            &indices,
            256,
        )
        .map_err(super::context(
            "evaluating the exported chosen.onnx".to_string(),
        ))
    }
}
