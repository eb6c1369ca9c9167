//! The attribution stage: the target teacher's and each arm's attribution maps on the same
//! target images, for the report's grid.

use super::stage::{parse_spec, Stage, StageContext};
use super::{context, PipelineError, Result};
use crate::data::{stratified_subset, DataLoader, DatasetSpec, LoaderConfig, Split, SubsetSpec};
use crate::train::{self};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// CAM heatmaps of the target teacher and every fine-tuned arm on a few target test images.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AttributionStage {
    pub checkpoints: Vec<PathBuf>,
    pub data: String,
    pub count: usize,
    pub out: PathBuf,
}

impl Stage for AttributionStage {
    fn identity(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    fn name(&self) -> String {
        "attribution".into()
    }

    fn command(&self) -> String {
        format!(
            "(in gmpq) CAM heatmaps of the target teacher and every fine-tuned arm on {} test \
             images of {} → {}",
            self.count,
            self.data,
            self.out.display()
        )
    }

    /// Drawn again on every pass (seconds), so the picture shows the arms of this pass.
    fn done(&self) -> Result<bool> {
        Ok(false)
    }

    /// A fine-tuned checkpoint may be absent where only its record was kept (a committed
    /// study keeps `last.json`, not the weights): the picture is then drawn from those
    /// present, or, when one exists already, kept as it is.
    fn run(&self, ctx: &StageContext) -> Result<String> {
        let data = parse_spec("--data", &self.data)?;
        let (present, missing): (Vec<PathBuf>, Vec<PathBuf>) =
            self.checkpoints.iter().cloned().partition(|c| c.is_file());
        if !missing.is_empty() && self.out.is_file() {
            return Ok(format!(
                "{} kept: {} of the checkpoints are not here (only their records are), e.g. {}",
                self.out.display(),
                missing.len(),
                missing[0].display()
            ));
        }
        if present.is_empty() {
            return Err(PipelineError::Invalid(format!(
                "no checkpoint to draw attribution maps of (first missing: {})",
                self.checkpoints
                    .first()
                    .map_or("none".into(), |c| c.display().to_string())
            )));
        }
        let n = attribution_grid(&present, &data, self.count, &self.out, ctx.device)?;
        Ok(format!(
            "{} ({n} images × {} maps)",
            self.out.display(),
            present.len()
        ))
    }
}

/// Writes a PNG grid of CAM heatmaps: one row per test image of `data` (stratified), one
/// column per checkpoint after the image itself. Returns the number of images.
pub fn attribution_grid(
    checkpoints: &[PathBuf],
    data: &DatasetSpec,
    count: usize,
    out: &Path,
    device: tch::Device,
) -> Result<usize> {
    if !out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"))
    {
        return Err(PipelineError::Invalid(format!(
            "--out {}: the maps are written as PNG; name the file .png",
            out.display()
        )));
    }
    let spec = data;
    let data = data.load(Split::Test)?;
    if count > data.len() {
        return Err(PipelineError::Invalid(format!(
            "--limit {count}: the test split of {spec} has {} images",
            data.len()
        )));
    }
    let idx = stratified_subset(data.as_ref(), &SubsetSpec::limited(Some(count), 0))?;
    let nets = checkpoints
        .iter()
        .map(|c| crate::quant::load(c, device).map_err(context(format!("loading {}", c.display()))))
        .collect::<Result<Vec<_>>>()?;
    // Every network sees the same images (prepared by the first's pipeline): each must take
    // them and predict the data's classes.
    for (c, (ck, _)) in checkpoints.iter().zip(&nets) {
        let m = &ck.meta.model;
        if m.num_classes != data.num_classes() {
            return Err(PipelineError::Invalid(format!(
                "{} predicts {} classes but {spec} has {}",
                c.display(),
                m.num_classes,
                data.num_classes()
            )));
        }
        if let Some(problem) = train::input_mismatch(data.as_ref(), &ck.meta.eval_pipeline, m) {
            return Err(PipelineError::Invalid(format!(
                "{spec} {problem} ({})",
                c.display()
            )));
        }
        if ck.meta.eval_pipeline != nets[0].0.meta.eval_pipeline {
            return Err(PipelineError::Invalid(format!(
                "{} prepares its images differently from {}: draw them separately",
                c.display(),
                checkpoints[0].display()
            )));
        }
    }
    let pipeline = nets
        .first()
        .ok_or_else(|| PipelineError::Invalid("no checkpoint".into()))?
        .0
        .meta
        .eval_pipeline
        .clone();
    let mut loader = DataLoader::new(
        data,
        &idx,
        Arc::new(pipeline.clone()),
        LoaderConfig {
            batch_size: idx.len().max(1),
            ..Default::default()
        },
        0,
    )?;
    let x = loader
        .next()
        .ok_or_else(|| PipelineError::Invalid("no images".into()))??
        .images
        .to_device(device);
    let maps: Vec<tch::Tensor> = nets
        .iter()
        .map(|(_, n)| crate::attribution::network_map(&*n.net, &x))
        .collect();
    let refs: Vec<&tch::Tensor> = maps.iter().collect();
    // Each column named by its checkpoint: the run folder (`finetune-gmpq`) of a
    // `last.safetensors`, else the file's stem.
    let mut labels = vec!["image".to_string()];
    labels.extend(checkpoints.iter().map(|c| {
        let stem = c.file_stem().map(|s| s.to_string_lossy().into_owned());
        match (stem.as_deref(), c.parent().and_then(|p| p.file_name())) {
            (Some("last"), Some(dir)) => dir.to_string_lossy().into_owned(),
            (Some(stem), _) => stem.to_string(),
            _ => c.display().to_string(),
        }
    }));
    crate::report::heatmaps_png(&x, &pipeline.normalize, &refs, &labels, out)?;
    Ok(idx.len())
}
