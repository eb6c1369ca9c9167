//! Evaluation: top-1/top-5 and loss of any forward function over a dataset's indices, split
//! over the ranks of a data-parallel run when there are several.

use super::{Result, TrainError};
use crate::data::{DataLoader, ImageSource, LoaderConfig, Pipeline};
use crate::model::ModelConfig;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tch::nn::ModuleT;
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    pub loss: f64,
    pub top1: f64,
    pub top5: f64,
    pub images: usize,
}

/// Batches of `indices` in order, with the evaluation pipeline (no augmentation).
fn eval_loader(
    source: Arc<dyn ImageSource>,
    indices: &[usize],
    pipeline: &Pipeline,
    batch_size: usize,
) -> Result<DataLoader> {
    Ok(DataLoader::new(
        source,
        indices,
        Arc::new(pipeline.clone()),
        LoaderConfig {
            batch_size,
            ..Default::default()
        },
        0,
    )?)
}

/// Why `source`'s images, after `pipeline`, are not `model`'s input (`None` when they are,
/// or when the images have no common shape): both shapes, channels × height × width.
pub fn input_mismatch(
    source: &dyn ImageSource,
    pipeline: &Pipeline,
    model: &ModelConfig,
) -> Option<String> {
    let native = source.native_shape()?;
    let out = pipeline.output_shape(native);
    let want = [model.in_channels, model.input_size, model.input_size];
    if out != want {
        return Some(format!(
            "has {}×{}×{} images ({}×{}×{} after the model's preprocessing), but the model takes \
             {}×{}×{} (channels × height × width)",
            native[0], native[1], native[2], out[0], out[1], out[2], want[0], want[1], want[2]
        ));
    }
    let norm = pipeline.normalize.mean.len();
    (norm != model.in_channels).then(|| {
        format!(
            "gives {}-channel images, but the model's preprocessing normalises {norm} channels",
            model.in_channels
        )
    })
}

/// Top-1/top-5 accuracy (in %) and mean cross-entropy of `model` on `indices` of `source`.
pub fn evaluate(
    model: &dyn ModuleT,
    source: Arc<dyn ImageSource>,
    indices: &[usize],
    pipeline: &Pipeline,
    batch_size: usize,
    device: Device,
) -> Result<EvalMetrics> {
    Ok(evaluate_with_predictions(model, source, indices, pipeline, batch_size, device)?.0)
}

/// [`evaluate`], plus the top-1 class predicted for each of `indices`, in order, from the
/// same pass over the data.
pub fn evaluate_with_predictions(
    model: &dyn ModuleT,
    source: Arc<dyn ImageSource>,
    indices: &[usize],
    pipeline: &Pipeline,
    batch_size: usize,
    device: Device,
) -> Result<(EvalMetrics, Vec<i64>)> {
    evaluate_by(
        |x| {
            Ok(tch::no_grad(|| {
                model.forward_t(&x.to_device(device), false)
            }))
        },
        source,
        indices,
        pipeline,
        batch_size,
    )
}

/// [`evaluate_with_predictions`] of any forward function from a CPU batch to logits (e.g. an
/// ONNX Runtime session).
pub fn evaluate_by(
    mut forward: impl FnMut(&Tensor) -> Result<Tensor>,
    source: Arc<dyn ImageSource>,
    indices: &[usize],
    pipeline: &Pipeline,
    batch_size: usize,
) -> Result<(EvalMetrics, Vec<i64>)> {
    let loader = eval_loader(source, indices, pipeline, batch_size)?;
    let (mut loss, mut top1, mut top5, mut n) = (0.0, 0.0, 0.0, 0usize);
    let mut predictions = Vec::with_capacity(indices.len());
    for batch in loader {
        let batch = batch?;
        let logits = forward(&batch.images)?;
        let y = batch.labels.to_device(logits.device());
        let b = y.size()[0] as usize;
        loss += logits.cross_entropy_for_logits(&y).double_value(&[]) * b as f64;
        let k = logits.size()[1].min(5);
        let (_, top) = logits.topk(k, 1, true, true);
        predictions.extend(
            Vec::<i64>::try_from(&top.select(1, 0))
                .map_err(|e| TrainError::Invalid(e.to_string()))?,
        );
        let hits = top.eq_tensor(&y.unsqueeze(1));
        top1 += hits.narrow(1, 0, 1).sum(Kind::Float).double_value(&[]);
        top5 += hits.sum(Kind::Float).double_value(&[]);
        n += b;
    }
    let d = n.max(1) as f64;
    Ok((
        EvalMetrics {
            loss: loss / d,
            top1: 100.0 * top1 / d,
            top5: 100.0 * top5 / d,
            images: n,
        },
        predictions,
    ))
}

/// [`evaluate`] at batch 256, split over the ranks of `group` (each evaluates every
/// `world`-th image; the sums are all-reduced).
pub fn evaluate_shared(
    model: &dyn ModuleT,
    source: Arc<dyn ImageSource>,
    indices: &[usize],
    pipeline: &Pipeline,
    device: Device,
    group: Option<&crate::dist::Group>,
) -> Result<EvalMetrics> {
    let Some(g) = group else {
        return evaluate(model, source, indices, pipeline, 256, device);
    };
    let mine: Vec<usize> = indices
        .iter()
        .skip(g.rank)
        .step_by(g.world)
        .copied()
        .collect();
    let m = evaluate(model, source, &mine, pipeline, 256, device)?;
    let n = m.images as f64;
    let s = g.sum_f64(&[m.loss * n, m.top1 * n, m.top5 * n, n])?;
    let d = s[3].max(1.0);
    Ok(EvalMetrics {
        loss: s[0] / d,
        top1: s[1] / d,
        top5: s[2] / d,
        images: s[3] as usize,
    })
}
