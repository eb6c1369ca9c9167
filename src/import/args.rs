//! The command-line form of `gmpq import`.

use crate::checkpoint::Checkpoint;
use crate::flags::positive;
use crate::model::{ModelConfig, ModelError};
use crate::train::TrainError;
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// Your own CNN: an ONNX file (`torch.onnx.export`; its `.onnx.data` beside it). Every
    /// conv becomes a quantizable layer; see docs/IMPORT.md for the ops it takes.
    #[arg(long, conflicts_with_all = ["model", "weights", "stem"], required_unless_present = "model")]
    pub onnx: Option<PathBuf>,
    /// With --weights: resnet18, resnet50, mobilenetv2 or efficientnet-lite0.
    #[arg(long, requires = "weights")]
    pub model: Option<String>,
    /// With --model: a .safetensors file with the state dict.
    #[arg(long, requires = "model")]
    pub weights: Option<PathBuf>,
    /// Output checkpoint (.safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Classes the model predicts (--model: default 1000; --onnx: the graph's, checked).
    #[arg(long, alias = "num-classes", value_parser = positive(), allow_negative_numbers = true)]
    pub classes: Option<usize>,
    /// Square input resolution (--model: default 224, efficientnet-lite0 224 only; --onnx:
    /// only where the graph leaves it open).
    #[arg(long, value_parser = positive(), allow_negative_numbers = true)]
    pub input_size: Option<usize>,
    /// --onnx: the input channels, where the graph leaves them open.
    #[arg(long, value_parser = positive(), allow_negative_numbers = true)]
    pub channels: Option<usize>,
    /// --onnx: per-channel mean the images are normalised with, e.g. 0.485,0.456,0.406
    /// (default: the graph's own leading Sub/Div, else 0).
    #[arg(
        long,
        value_delimiter = ',',
        requires = "onnx",
        allow_negative_numbers = true
    )]
    pub mean: Option<Vec<f32>>,
    /// --onnx: per-channel std, e.g. 0.229,0.224,0.225 (default: the graph's own, else 1).
    #[arg(long, value_delimiter = ',', requires = "onnx")]
    pub std: Option<Vec<f32>>,
    /// --onnx: the network's name in reports (default: the file's name).
    #[arg(long, requires = "onnx")]
    pub name: Option<String>,
    /// cifar or imagenet (--model: default imagenet; not for efficientnet-lite0).
    #[arg(long)]
    pub stem: Option<String>,
}

impl ImportArgs {
    /// The network the weights are for: 3 channels, 224 px and the ImageNet stem unless the
    /// flags say otherwise.
    pub fn config(&self) -> Result<ModelConfig, ModelError> {
        let model = self.model.as_deref().unwrap_or_default();
        let mut cfg = ModelConfig::new(
            model.parse()?,
            3,
            self.classes.unwrap_or(1000),
            self.input_size.unwrap_or(224),
        );
        cfg.stem = self.stem.as_deref().unwrap_or("imagenet").parse()?;
        Ok(cfg)
    }

    /// Reads the weights into a checkpoint and saves it (and its metadata) at `out`.
    pub fn run(&self) -> Result<Checkpoint, TrainError> {
        let ck = match (&self.onnx, &self.weights) {
            (Some(onnx), _) => self.onnx_checkpoint(onnx)?,
            (None, Some(weights)) => super::import_pretrained(weights, &self.config()?)?,
            (None, None) => {
                return Err(TrainError::Invalid(
                    "give --onnx, or --model and --weights".into(),
                ))
            }
        };
        if let Some(dir) = self.out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| TrainError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        ck.save(&self.out)?;
        Ok(ck)
    }

    /// The file `gmpq import` reads.
    pub fn source(&self) -> &std::path::Path {
        self.onnx
            .as_deref()
            .or(self.weights.as_deref())
            .unwrap_or(std::path::Path::new(""))
    }

    fn onnx_checkpoint(&self, onnx: &std::path::Path) -> Result<Checkpoint, TrainError> {
        let opts = super::OnnxOptions {
            name: self.name.clone(),
            input_size: self.input_size,
            channels: self.channels,
        };
        let channels = |v: &Vec<f32>| v.len();
        let normalize = match (&self.mean, &self.std) {
            (None, None) => None,
            (mean, std) => {
                let n = mean.as_ref().or(std.as_ref()).map(channels).unwrap_or(0);
                Some(crate::data::Normalize {
                    mean: mean.clone().unwrap_or(vec![0.0; n]),
                    std: std.clone().unwrap_or(vec![1.0; n]),
                })
            }
        };
        if let Some(std) = &self.std {
            if std.iter().any(|&s| s <= 0.0 || !s.is_finite()) {
                return Err(TrainError::Invalid(format!(
                    "--std {std:?}: each must be positive"
                )));
            }
        }
        let ck = super::import_onnx(onnx, &opts, normalize)?;
        if let Some(c) = self.classes.filter(|&c| c != ck.meta.model.num_classes) {
            return Err(TrainError::Invalid(format!(
                "--classes {c}: the graph's output has {} classes",
                ck.meta.model.num_classes
            )));
        }
        Ok(ck)
    }

    /// For `--onnx`: the imported network and ONNX Runtime on the same file, on a few random
    /// images: one line with the largest logit difference relative to the largest logit
    /// (float sums in another order: about 1e-6; 1e-3 or more: not the same function).
    pub fn check_against_runtime(&self, ck: &Checkpoint) -> Result<Option<String>, TrainError> {
        use tch::{Kind, Tensor};
        let Some(onnx) = &self.onnx else {
            return Ok(None);
        };
        let invalid = |e: String| TrainError::Invalid(e);
        crate::engine::runtime_available().map_err(|e| invalid(e.to_string()))?;
        let opts = crate::engine::SessionOptions {
            threads: 1,
            ..Default::default()
        };
        let mut session =
            crate::engine::OnnxModel::open(onnx, &opts).map_err(|e| invalid(e.to_string()))?;
        let net = crate::quant::network_of(ck, &self.out, tch::Device::Cpu)?;
        let m = &ck.meta.model;
        let (c, s) = (m.in_channels as i64, m.input_size as i64);
        let norm = &ck.meta.eval_pipeline.normalize;
        let mean = Tensor::from_slice(&norm.mean).reshape([1, c, 1, 1]);
        let std = Tensor::from_slice(&norm.std).reshape([1, c, 1, 1]);
        let (mut worst, mut largest) = (0f64, 0f64);
        let images = 4;
        for i in 0..images {
            let x = (Tensor::arange(c * s * s, (Kind::Float, tch::Device::Cpu))
                * (0.61 + i as f64))
                .sin()
                .abs()
                .reshape([1, c, s, s]);
            let normalised = (&x - &mean) / &std;
            // The graph normalises itself unless --mean/--std said how.
            let given = self.mean.is_some() || self.std.is_some();
            let theirs = session
                .run(if given { &normalised } else { &x })
                .map_err(|e| invalid(e.to_string()))?;
            let ours = tch::no_grad(|| tch::nn::ModuleT::forward_t(&net, &normalised, false));
            worst = worst.max((&ours - &theirs).abs().max().double_value(&[]));
            largest = largest.max(theirs.abs().max().double_value(&[]));
        }
        let relative = worst / largest.max(1e-12);
        let verdict = if relative < 1e-3 {
            "the same function"
        } else {
            "NOT the same function: please report the model"
        };
        Ok(Some(format!(
            "checked against ONNX Runtime on {images} images: largest logit difference {relative:.1e} \
             of the largest logit ({verdict})"
        )))
    }
}
