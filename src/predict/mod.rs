//! `gmpq predict`: the classes a shipped model gives a few image files — a gmpq checkpoint,
//! a packed file or an ONNX model, each read with the preprocessing its metadata records.

#[cfg(feature = "cli")]
mod args;
#[cfg(feature = "cli")]
pub use args::PredictArgs;

use crate::data::{ImageU8, Pipeline};
use crate::engine::{EngineError, OnnxModel, SessionOptions};
use crate::model::ModelConfig;
use crate::quant::{Network, QuantError};
use serde::Serialize;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Quant(#[from] QuantError),
    #[error(transparent)]
    Export(#[from] crate::export::ExportError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error("{path}: {reason}")]
    Image { path: PathBuf, reason: String },
    #[error("{0}")]
    Model(String),
}

type Result<T> = std::result::Result<T, PredictError>;

/// One class of a prediction.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassScore {
    pub class: usize,
    /// Its name, when the model records class names.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub probability: f64,
}

/// The top classes of one image.
#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    pub image: PathBuf,
    pub top: Vec<ClassScore>,
}

enum Engine {
    Libtorch(Box<Network>),
    Onnx(Box<OnnxModel>),
}

/// A loaded model with what it needs to read images.
pub struct Predictor {
    engine: Engine,
    model: ModelConfig,
    /// Resize and crop (and the normalisation libtorch applies; ONNX graphs normalise
    /// themselves).
    pipeline: Pipeline,
    class_names: Option<Vec<String>>,
}

impl Predictor {
    /// An ONNX model (`.onnx`) or an integer packed file runs in ONNX Runtime; anything else
    /// is read as a gmpq checkpoint or fake-quant packed file and runs in libtorch.
    pub fn open(path: &Path, threads: usize) -> Result<Self> {
        let bytes = std::fs::read(path)
            .map_err(|e| PredictError::Model(format!("{}: {e}", path.display())))?;
        let onnx = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("onnx"))
            || crate::export::packed::is_integer(&bytes);
        if onnx {
            let m = OnnxModel::open_bytes(
                path,
                bytes,
                &SessionOptions {
                    threads,
                    optimized_model: None,
                    unoptimized: false,
                },
            )?;
            let missing = |what: &str| {
                PredictError::Model(format!(
                    "{}: no {what} metadata (export it with gmpq export)",
                    path.display()
                ))
            };
            let model = m.model.clone().ok_or_else(|| missing("gmpq.model"))?;
            let pipeline = m
                .preprocessing
                .clone()
                .ok_or_else(|| missing("gmpq.preprocessing"))?;
            let class_names = m.class_names.clone();
            return Ok(Self {
                engine: Engine::Onnx(Box::new(m)),
                model,
                pipeline,
                class_names,
            });
        }
        let (ck, network) = crate::export::load(path, tch::Device::Cpu)?;
        Ok(Self {
            engine: Engine::Libtorch(Box::new(network)),
            model: ck.meta.model.clone(),
            pipeline: ck.meta.eval_pipeline.clone(),
            class_names: ck.meta.class_names.clone(),
        })
    }

    pub fn class_names(&self) -> Option<&[String]> {
        self.class_names.as_deref()
    }

    /// Decodes `path` (PNG or JPEG) as the model's input: grey images as one channel, colour
    /// as three, then the model's resize and crop; a shape the model does not take is an
    /// error that names both.
    fn input(&self, path: &Path) -> Result<Tensor> {
        let bad = |reason: String| PredictError::Image {
            path: path.to_path_buf(),
            reason,
        };
        let img = image::ImageReader::open(path)
            .map_err(|e| bad(e.to_string()))?
            .with_guessed_format()
            .map_err(|e| bad(e.to_string()))?
            .decode()
            // The decoder's message can span lines; the error stays one.
            .map_err(|e| {
                let reason = e
                    .to_string()
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ");
                bad(format!("not a readable PNG or JPEG image ({reason})"))
            })?;
        let grey = !img.color().has_color();
        let (w, h) = (img.width() as usize, img.height() as usize);
        let decoded = if grey {
            ImageU8::new(1, h, w, img.to_luma8().into_raw())
        } else {
            // HWC → CHW.
            let rgb = img.to_rgb8().into_raw();
            let mut data = vec![0u8; 3 * h * w];
            for (i, px) in rgb.chunks_exact(3).enumerate() {
                for c in 0..3 {
                    data[c * h * w + i] = px[c];
                }
            }
            ImageU8::new(3, h, w, data)
        };
        let m = &self.model;
        let out = self.pipeline.output_shape([decoded.channels, h, w]);
        if out[0] != m.in_channels {
            return Err(bad(format!(
                "{} image ({} channel{}), but the model takes {} channel{}",
                if grey { "a grey" } else { "a colour" },
                decoded.channels,
                if decoded.channels == 1 { "" } else { "s" },
                m.in_channels,
                if m.in_channels == 1 { "" } else { "s" }
            )));
        }
        if out[1..] != [m.input_size, m.input_size] {
            return Err(bad(format!(
                "{w}×{h} pixels become {}×{} after the model's preprocessing, but the model takes \
                 {}×{}",
                out[2], out[1], m.input_size, m.input_size
            )));
        }
        let mut values = vec![0f32; out.iter().product()];
        let mut pipeline = self.pipeline.clone();
        if matches!(self.engine, Engine::Onnx(_)) {
            // The graph normalises: it takes pixel values in [0, 1].
            pipeline.normalize = crate::data::Normalize::identity(m.in_channels);
        }
        let mut rng = rand::rngs::mock::StepRng::new(0, 0);
        pipeline.apply_into(decoded, &mut rng, out, &mut values)?;
        Ok(Tensor::from_slice(&values).view([1, out[0] as i64, out[1] as i64, out[2] as i64]))
    }

    /// The `top` most probable classes of each image, in the order given.
    pub fn predict(&mut self, images: &[PathBuf], top: usize) -> Result<Vec<Prediction>> {
        self.predict_each(images, top)?.into_iter().collect()
    }

    /// [`Self::predict`] of every readable image, in order, with an error in place of each
    /// image that cannot be read (the others are still predicted); the outer error is the
    /// model's.
    pub fn predict_each(
        &mut self,
        images: &[PathBuf],
        top: usize,
    ) -> Result<Vec<Result<Prediction>>> {
        let inputs: Vec<Result<Tensor>> = images.iter().map(|p| self.input(p)).collect();
        let readable: Vec<(&PathBuf, &Tensor)> = images
            .iter()
            .zip(&inputs)
            .filter_map(|(p, t)| t.as_ref().ok().map(|t| (p, t)))
            .collect();
        let mut predicted = if readable.is_empty() {
            Vec::new()
        } else {
            let paths: Vec<PathBuf> = readable.iter().map(|(p, _)| (*p).clone()).collect();
            let batch: Vec<&Tensor> = readable.iter().map(|(_, t)| *t).collect();
            self.predict_batch(&paths, &Tensor::cat(&batch, 0), top)?
        }
        .into_iter();
        Ok(inputs
            .into_iter()
            .map(|input| match input {
                Ok(_) => predicted
                    .next()
                    .ok_or_else(|| PredictError::Model("a prediction went missing".into())),
                Err(e) => Err(e),
            })
            .collect())
    }

    /// The top classes of each image of `batch` (preprocessed), named by `images`.
    fn predict_batch(
        &mut self,
        images: &[PathBuf],
        batch: &Tensor,
        top: usize,
    ) -> Result<Vec<Prediction>> {
        let logits = match &mut self.engine {
            Engine::Libtorch(net) => {
                tch::no_grad(|| tch::nn::ModuleT::forward_t(&**net, batch, false))
            }
            Engine::Onnx(m) => m.run(batch)?,
        };
        let probs = logits.to_kind(Kind::Double).softmax(-1, Kind::Double);
        let classes = probs.size()[1] as usize;
        let mut out = Vec::new();
        for (i, path) in images.iter().enumerate() {
            let p: Vec<f64> = Vec::try_from(probs.get(i as i64))
                .map_err(|e: tch::TchError| PredictError::Model(e.to_string()))?;
            let mut order: Vec<usize> = (0..classes).collect();
            order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
            out.push(Prediction {
                image: path.clone(),
                top: order
                    .into_iter()
                    .take(top.min(classes))
                    .map(|c| ClassScore {
                        class: c,
                        name: self.class_names.as_ref().and_then(|n| n.get(c).cloned()),
                        probability: p[c],
                    })
                    .collect(),
            });
        }
        Ok(out)
    }
}
