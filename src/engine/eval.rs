//! `gmpq eval` as a typed value: a checkpoint, an exported model, or both compared, on one
//! split of a dataset.

use super::{compare, compare_unoptimized, Agreement, EngineError, OnnxModel, SessionOptions};
use crate::data::{stratified_subset, DatasetSpec, ImageSource, Pipeline, Split, SubsetSpec};
use crate::model::ModelConfig;
use crate::train::{self, EvalMetrics};
use std::path::PathBuf;
use std::sync::Arc;

/// What `gmpq eval` runs: a checkpoint (in libtorch), an exported model (in ONNX Runtime), or
/// both on the same images, compared.
#[derive(Debug, Clone)]
pub struct EvalRequest {
    pub data: DatasetSpec,
    pub split: Split,
    pub subset: SubsetSpec,
    pub checkpoint: Option<PathBuf>,
    pub onnx: Option<PathBuf>,
    /// With `onnx` alone: compare ONNX Runtime's optimized session with the graph run as
    /// written ([`compare_unoptimized`]).
    pub unoptimized: bool,
    pub batch_size: usize,
}

/// What an evaluation measured.
#[derive(Debug, Clone)]
pub enum EvalOutcome {
    /// One model's metrics; `label` names it.
    One { label: String, metrics: EvalMetrics },
    /// The checkpoint and its export on the same batches.
    Both {
        checkpoint: PathBuf,
        onnx: PathBuf,
        agreement: Agreement,
    },
    /// An ONNX model's optimized session (`agreement.onnx`) against its unoptimized one
    /// (`agreement.libtorch`) on the same batches.
    Unoptimized { onnx: PathBuf, agreement: Agreement },
}

impl EvalOutcome {
    /// The measured numbers as one JSON document.
    pub fn json(&self) -> Result<String, serde_json::Error> {
        match self {
            EvalOutcome::One { metrics, .. } => serde_json::to_string_pretty(metrics),
            EvalOutcome::Both { agreement, .. } | EvalOutcome::Unoptimized { agreement, .. } => {
                serde_json::to_string_pretty(agreement)
            }
        }
    }

    /// One line for a person: what ran on `data`, and what it measured.
    pub fn line(&self, data: &DatasetSpec) -> String {
        let compared = |r: &Agreement, a: f64, b: f64| {
            format!(
                "{} images: top-1 {a:.2}% vs {b:.2}%, same top-1 class on {:.2}%, largest logit \
                 difference {:.3e}",
                r.images, r.top1_agreement, r.max_logit_difference
            )
        };
        match self {
            EvalOutcome::One { label, metrics: m } => format!(
                "{label} on {data}: top-1 {:.2}%, top-5 {:.2}%, loss {:.4} ({} images)",
                m.top1, m.top5, m.loss, m.images
            ),
            EvalOutcome::Both {
                checkpoint,
                onnx,
                agreement: r,
            } => format!(
                "{} vs {} (ONNX Runtime) on {data}, {}",
                checkpoint.display(),
                onnx.display(),
                compared(r, r.libtorch.top1, r.onnx.top1)
            ),
            EvalOutcome::Unoptimized { onnx, agreement: r } => format!(
                "{} in ONNX Runtime, optimized (integer kernels) vs unoptimized (float \
                 emulation) on {data}, {}",
                onnx.display(),
                compared(r, r.onnx.top1, r.libtorch.top1)
            ),
        }
    }
}

/// A data set whose label space is not the model's gives a meaningless accuracy, and images
/// that are not the model's input a meaningless one too: both are refused, naming the shapes.
pub fn check_fits(
    spec: &DatasetSpec,
    data: &dyn ImageSource,
    pipeline: &Pipeline,
    model: &ModelConfig,
) -> Result<(), EngineError> {
    if data.num_classes() != model.num_classes {
        let hint = if spec.to_string().starts_with("folder:") {
            " (folders named by class index, as ImageNet's: use imagenet-folder:PATH)"
        } else {
            ""
        };
        return Err(EngineError::Invalid(format!(
            "{spec} has {} classes but the model predicts {}: their labels cannot match{hint}",
            data.num_classes(),
            model.num_classes
        )));
    }
    match train::input_mismatch(data, pipeline, model) {
        Some(problem) => Err(EngineError::Invalid(format!("{spec} {problem}"))),
        None => Ok(()),
    }
}

impl EvalRequest {
    /// Loads both models and checks them against the data before any image is read; with
    /// both, the checkpoint runs on the CPU beside ONNX Runtime.
    pub fn run(&self, device: tch::Device) -> Result<EvalOutcome, EngineError> {
        let spec = &self.data;
        let data = spec.load(self.split)?;
        let checkpoint = match &self.checkpoint {
            Some(path) => {
                let on = if self.onnx.is_some() {
                    tch::Device::Cpu
                } else {
                    device
                };
                let (ck, network) = crate::export::load(path, on)?;
                check_fits(spec, data.as_ref(), &ck.meta.eval_pipeline, &ck.meta.model)?;
                Some((path, ck, network))
            }
            None => None,
        };
        let onnx = match &self.onnx {
            Some(path) => {
                let opts = SessionOptions {
                    threads: tch::get_num_threads().max(1) as usize,
                    optimized_model: None,
                    unoptimized: false,
                };
                let model = OnnxModel::open(path, &opts)?;
                if let (Some(cfg), Some(pre)) = (&model.model, &model.preprocessing) {
                    check_fits(spec, data.as_ref(), pre, cfg)?;
                }
                Some((path, model))
            }
            None => None,
        };
        let indices = stratified_subset(data.as_ref(), &self.subset)?;
        let data: Arc<dyn ImageSource> = data;
        match (checkpoint, onnx) {
            (Some((path, ck, network)), Some((onnx_path, mut model))) => {
                // A comparison of two different networks would read as a disagreement of
                // engines.
                if let Some(recorded) = &model.weights {
                    let digest = crate::checkpoint::weights_digest(&network.vs);
                    if *recorded != digest {
                        return Err(EngineError::Invalid(format!(
                            "{} was not exported from {} (its weights digest {recorded}, the \
                             checkpoint's {digest}): export this checkpoint to compare them",
                            onnx_path.display(),
                            path.display()
                        )));
                    }
                }
                let agreement = compare(
                    &mut model,
                    &network,
                    &ck.meta.eval_pipeline,
                    data,
                    &indices,
                    self.batch_size,
                )?;
                Ok(EvalOutcome::Both {
                    checkpoint: path.clone(),
                    onnx: onnx_path.clone(),
                    agreement,
                })
            }
            (Some((path, ck, network)), None) => Ok(EvalOutcome::One {
                label: path.display().to_string(),
                metrics: train::evaluate(
                    &network,
                    data,
                    &indices,
                    &ck.meta.eval_pipeline,
                    self.batch_size,
                    device,
                )?,
            }),
            (None, Some((path, mut model))) if self.unoptimized => {
                let opts = SessionOptions {
                    threads: tch::get_num_threads().max(1) as usize,
                    optimized_model: None,
                    unoptimized: true,
                };
                let mut plain = OnnxModel::open(path, &opts)?;
                Ok(EvalOutcome::Unoptimized {
                    onnx: path.clone(),
                    agreement: compare_unoptimized(
                        &mut model,
                        &mut plain,
                        data,
                        &indices,
                        self.batch_size,
                    )?,
                })
            }
            (None, Some((path, mut model))) => Ok(EvalOutcome::One {
                label: format!("{} (ONNX Runtime)", path.display()),
                metrics: model.evaluate(data, &indices, self.batch_size)?.0,
            }),
            (None, None) => Err(EngineError::Invalid("give --checkpoint or --onnx".into())),
        }
    }
}
