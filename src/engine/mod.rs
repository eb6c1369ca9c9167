//! Running exported models: ONNX Runtime, loaded at run time from the `onnxruntime` wheel
//! that scripts/setup.sh installs (its path is compiled in by build.rs; `ORT_DYLIB_PATH`
//! overrides it).

#[cfg(feature = "cli")]
mod args;
mod cpu;
#[cfg(feature = "cli")]
pub use args::{EvalArgs, SplitArg};
pub use cpu::CpuInfo;

use crate::data::{
    stratified_subset, DatasetSpec, ImageSource, Normalize, Pipeline, Split, SubsetSpec,
};
use crate::export::onnx::{META_CLASS_NAMES, META_MODEL, META_PREPROCESSING, META_WEIGHTS};
use crate::model::ModelConfig;
use crate::train::{self, EvalMetrics, TrainError};
use ort::session::{builder::GraphOptimizationLevel, Session};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use tch::Tensor;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(
        "ONNX Runtime is not installed: {0} (run scripts/setup.sh, which installs the \
         onnxruntime wheel, or set ORT_DYLIB_PATH to libonnxruntime.so)"
    )]
    NoRuntime(String),
    #[error("{path}: {reason}")]
    Model { path: PathBuf, reason: String },
    #[error("ONNX Runtime: {0}")]
    Run(String),
    #[error(transparent)]
    Eval(#[from] TrainError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    /// Loading a checkpoint failed (its message names the file).
    #[error(transparent)]
    Load(#[from] crate::export::ExportError),
    #[error("{0}")]
    Invalid(String),
}

/// Where libonnxruntime.so is: `ORT_DYLIB_PATH`, else the wheel's copy found at build time.
pub fn runtime_library() -> Result<PathBuf, EngineError> {
    let path = match std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => match option_env!("GMPQ_ORT_DYLIB") {
            Some(p) => PathBuf::from(p),
            None => {
                return Err(EngineError::NoRuntime(
                    "no onnxruntime wheel was found when gmpq was built".into(),
                ))
            }
        },
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(EngineError::NoRuntime(format!(
            "{} does not exist",
            path.display()
        )))
    }
}

static ENVIRONMENT: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

fn environment() -> Result<&'static ort::environment::Environment, EngineError> {
    ENVIRONMENT
        .get_or_init(|| {
            // Kept as the inner reason: `NoRuntime` adds the how-to once.
            let lib = runtime_library().map_err(|e| match e {
                EngineError::NoRuntime(reason) => reason,
                other => other.to_string(),
            })?;
            ort::init_from(&lib)
                .map_err(|e| format!("cannot load {}: {e}", lib.display()))?
                .with_name("gmpq")
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| EngineError::NoRuntime(e.clone()))
}

/// The loaded ONNX Runtime's own build description (version, git commit), once loaded.
pub fn runtime_build_info() -> Result<&'static str, EngineError> {
    environment().map(|_| ort::info())
}

/// Whether ONNX Runtime can be loaded (for tests that must say why they skip).
pub fn runtime_available() -> Result<(), EngineError> {
    environment().map(|_| ())
}

/// How a session is set up.
#[derive(Debug, Clone, Default)]
pub struct SessionOptions {
    /// Intra-op threads (0: ONNX Runtime's default).
    pub threads: usize,
    /// Write the optimized graph ONNX Runtime runs to this file (to see which kernels it
    /// chose, e.g. QLinearConv).
    pub optimized_model: Option<PathBuf>,
    /// Run the graph as written, without graph optimizations: every QDQ unit then computes
    /// `DequantizeLinear → float op → QuantizeLinear`, the integer arithmetic emulated in
    /// float with no integer kernel, the same on every CPU (the reference the optimized
    /// session must match).
    pub unoptimized: bool,
}

/// An ONNX model exported by gmpq, in an ONNX Runtime session.
pub struct OnnxModel {
    session: Session,
    /// The graph's input and output names.
    input: String,
    output: String,
    /// The evaluation pipeline before normalisation (which is in the graph).
    pub preprocessing: Option<Pipeline>,
    pub model: Option<ModelConfig>,
    /// The weights digest the exporter recorded (`gmpq.weights`; older exports have none).
    pub weights: Option<String>,
    /// The class names by label (`gmpq.class_names`), when the model records them.
    pub class_names: Option<Vec<String>>,
}

impl OnnxModel {
    pub fn open(path: &Path, opts: &SessionOptions) -> Result<Self, EngineError> {
        let bytes = std::fs::read(path).map_err(|e| EngineError::Model {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Self::open_bytes(path, bytes, opts)
    }

    /// [`Self::open`] of a file's bytes, already read from `path`.
    pub fn open_bytes(
        path: &Path,
        bytes: Vec<u8>,
        opts: &SessionOptions,
    ) -> Result<Self, EngineError> {
        // A packed integer model: its int8 kernels are unpacked here, in memory.
        let bytes = match crate::export::packed::integer_onnx(path, &bytes) {
            Ok(Some(onnx)) => onnx,
            // A checkpoint handed over as a model: protobuf's own message would not say so.
            Ok(None) if safetensors::SafeTensors::read_metadata(&bytes).is_ok() => {
                return Err(EngineError::Model {
                    path: path.to_path_buf(),
                    reason: "a safetensors file (a gmpq checkpoint or fake-quant packed file), \
                             not an ONNX model: give it as --checkpoint, or export it with \
                             gmpq export --out MODEL.onnx"
                        .into(),
                })
            }
            // A plain ONNX file: from the file, so that its external data (`MODEL.onnx.data`,
            // which torch's dynamo exporter writes) is found beside it.
            Ok(None) => return Self::from_file(path, opts),
            Err(e) => {
                return Err(EngineError::Model {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })
            }
        };
        Self::from_bytes(&bytes, opts).map_err(|e| match e {
            EngineError::Run(reason) => EngineError::Model {
                path: path.to_path_buf(),
                reason,
            },
            other => other,
        })
    }

    pub fn from_bytes(bytes: &[u8], opts: &SessionOptions) -> Result<Self, EngineError> {
        Self::with_session(opts, |mut b| b.commit_from_memory(bytes))
    }

    /// An ONNX file, its external data beside it.
    fn from_file(path: &Path, opts: &SessionOptions) -> Result<Self, EngineError> {
        Self::with_session(opts, |mut b| b.commit_from_file(path)).map_err(|e| match e {
            EngineError::Run(reason) => EngineError::Model {
                path: path.to_path_buf(),
                reason,
            },
            other => other,
        })
    }

    fn with_session(
        opts: &SessionOptions,
        commit: impl FnOnce(ort::session::builder::SessionBuilder) -> ort::Result<Session>,
    ) -> Result<Self, EngineError> {
        let env = environment()?;
        let run = |e: ort::Error| EngineError::Run(e.to_string());
        let built =
            |e: ort::Error<ort::session::builder::SessionBuilder>| EngineError::Run(e.to_string());
        let mut builder = Session::builder(env)
            .map_err(run)?
            .with_optimization_level(if opts.unoptimized {
                GraphOptimizationLevel::Disable
            } else {
                GraphOptimizationLevel::Level3
            })
            .map_err(built)?;
        if opts.threads > 0 {
            builder = builder.with_intra_threads(opts.threads).map_err(built)?;
        }
        if let Some(p) = &opts.optimized_model {
            builder = builder.with_optimized_model_path(p).map_err(built)?;
        }
        let session = commit(builder).map_err(run)?;
        let (preprocessing, model, weights, class_names) = {
            let meta = session.metadata().map_err(run)?;
            let pre = meta
                .custom(META_PREPROCESSING)
                .and_then(|s| serde_json::from_str::<Pipeline>(&s).ok());
            let model = meta
                .custom(META_MODEL)
                .and_then(|s| serde_json::from_str::<ModelConfig>(&s).ok());
            let names = meta
                .custom(META_CLASS_NAMES)
                .and_then(|s| serde_json::from_str::<Vec<String>>(&s).ok());
            (pre, model, meta.custom(META_WEIGHTS), names)
        };
        // gmpq's exports name them `image` and `logits`; any classifier with one input and
        // one output runs (an imported network's own file, checked against gmpq).
        let (input, output) = match (session.inputs(), session.outputs()) {
            ([input], [output, ..]) => (input.name().to_string(), output.name().to_string()),
            (inputs, _) => {
                return Err(EngineError::Run(format!(
                    "the model has {} inputs; gmpq runs models with one image input",
                    inputs.len()
                )))
            }
        };
        Ok(Self {
            session,
            input,
            output,
            preprocessing,
            model,
            weights,
            class_names,
        })
    }

    /// Logits `N×classes` of a float batch `N×C×H×W` with pixel values in [0, 1].
    pub fn run(&mut self, images: &Tensor) -> Result<Tensor, EngineError> {
        let run = |e: ort::Error| EngineError::Run(e.to_string());
        let shape = images.size();
        let data =
            Vec::<f32>::try_from(images.to_kind(tch::Kind::Float).contiguous().flatten(0, -1))
                .map_err(|e| EngineError::Run(e.to_string()))?;
        let input = ort::value::Tensor::from_array((shape.clone(), data)).map_err(run)?;
        let outputs = self
            .session
            .run(ort::inputs![self.input.as_str() => input])
            .map_err(run)?;
        let (out_shape, logits) = outputs[self.output.as_str()]
            .try_extract_tensor::<f32>()
            .map_err(run)?;
        let dims: Vec<i64> = out_shape.iter().copied().collect();
        Ok(Tensor::from_slice(logits).reshape(dims))
    }

    /// Top-1/top-5 and the top-1 predictions on `indices` of `source`, preprocessed as the
    /// model's metadata says (normalisation is in the graph).
    pub fn evaluate(
        &mut self,
        source: Arc<dyn ImageSource>,
        indices: &[usize],
        batch_size: usize,
    ) -> Result<(EvalMetrics, Vec<i64>), EngineError> {
        let mut pipeline = self.preprocessing.clone().ok_or_else(|| {
            EngineError::Run("the model has no gmpq.preprocessing metadata".into())
        })?;
        pipeline.normalize = Normalize::identity(pipeline.normalize.mean.len());
        let result = train::evaluate_by(
            |x| self.run(x).map_err(|e| TrainError::Invalid(e.to_string())),
            source,
            indices,
            &pipeline,
            batch_size,
        )?;
        Ok(result)
    }
}

/// How closely an exported model follows the network it came from.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Agreement {
    pub images: usize,
    /// Images whose top-1 class is the same in both, in %.
    pub top1_agreement: f64,
    /// The largest |logit difference| over all images and classes.
    pub max_logit_difference: f64,
    /// The libtorch network's metrics and the exported model's.
    pub libtorch: EvalMetrics,
    pub onnx: EvalMetrics,
    /// The integer kernel path ONNX Runtime took ([`CpuInfo::integer_kernel_path`]).
    pub integer_kernels: String,
}

/// Runs `onnx` and `net` on the same preprocessed batches of `indices` (`pipeline`: the
/// checkpoint's evaluation pipeline, whose normalisation the ONNX graph holds).
pub fn compare(
    onnx: &mut OnnxModel,
    net: &dyn tch::nn::ModuleT,
    pipeline: &Pipeline,
    source: Arc<dyn ImageSource>,
    indices: &[usize],
    batch_size: usize,
) -> Result<Agreement, EngineError> {
    let norm = &pipeline.normalize;
    let c = norm.mean.len() as i64;
    let mean = Tensor::from_slice(&norm.mean).reshape([1, c, 1, 1]);
    let std = Tensor::from_slice(&norm.std).reshape([1, c, 1, 1]);
    let mut raw = pipeline.clone();
    raw.normalize = Normalize::identity(norm.mean.len());
    compare_by(
        |x| Ok(tch::no_grad(|| net.forward_t(&((x - &mean) / &std), false))),
        |x| onnx.run(x).map_err(|e| TrainError::Invalid(e.to_string())),
        &raw,
        source,
        indices,
        batch_size,
    )
}

/// The same ONNX model in ONNX Runtime's optimized session (its integer kernels; `reference`'s
/// place in the [`Agreement`] is `libtorch`) against `unoptimized`, the graph as written (each
/// QDQ unit in float: the same on every CPU).
pub fn compare_unoptimized(
    optimized: &mut OnnxModel,
    unoptimized: &mut OnnxModel,
    source: Arc<dyn ImageSource>,
    indices: &[usize],
    batch_size: usize,
) -> Result<Agreement, EngineError> {
    let mut pipeline = optimized
        .preprocessing
        .clone()
        .ok_or_else(|| EngineError::Run("the model has no gmpq.preprocessing metadata".into()))?;
    pipeline.normalize = Normalize::identity(pipeline.normalize.mean.len());
    compare_by(
        |x| {
            unoptimized
                .run(x)
                .map_err(|e| TrainError::Invalid(e.to_string()))
        },
        |x| {
            optimized
                .run(x)
                .map_err(|e| TrainError::Invalid(e.to_string()))
        },
        &pipeline,
        source,
        indices,
        batch_size,
    )
}

/// Runs `reference` and `other` on the same batches of `indices` (read through `raw`, without
/// normalisation) and measures how closely `other` follows `reference`.
fn compare_by(
    mut reference: impl FnMut(&Tensor) -> Result<Tensor, TrainError>,
    mut other: impl FnMut(&Tensor) -> Result<Tensor, TrainError>,
    raw: &Pipeline,
    source: Arc<dyn ImageSource>,
    indices: &[usize],
    batch_size: usize,
) -> Result<Agreement, EngineError> {
    let mut reference_logits: Vec<Tensor> = Vec::new();
    let mut max_diff = 0f64;
    let (other_metrics, other_pred) = train::evaluate_by(
        |x| {
            let ours = reference(x)?;
            let theirs = other(x)?;
            max_diff = max_diff.max((&ours - &theirs).abs().max().double_value(&[]));
            reference_logits.push(ours);
            Ok(theirs)
        },
        source.clone(),
        indices,
        raw,
        batch_size,
    )?;
    // The reference's metrics from the logits it produced in the same pass.
    let mut batches = reference_logits.into_iter();
    let (reference_metrics, reference_pred) = train::evaluate_by(
        |_| {
            batches
                .next()
                .ok_or_else(|| TrainError::Invalid("batch count changed".into()))
        },
        source,
        indices,
        raw,
        batch_size,
    )?;
    let same = other_pred
        .iter()
        .zip(&reference_pred)
        .filter(|(a, b)| a == b)
        .count();
    Ok(Agreement {
        images: other_pred.len(),
        top1_agreement: 100.0 * same as f64 / other_pred.len().max(1) as f64,
        max_logit_difference: max_diff,
        libtorch: reference_metrics,
        onnx: other_metrics,
        integer_kernels: CpuInfo::detect().integer_kernel_path().into(),
    })
}

/// How many nodes of each op type an ONNX file holds (e.g. the optimized graph ONNX Runtime
/// wrote with [`SessionOptions::optimized_model`]).
pub fn op_counts(path: &Path) -> Result<std::collections::BTreeMap<String, usize>, EngineError> {
    use onnx_protobuf::Message;
    let model_err = |reason: String| EngineError::Model {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| model_err(e.to_string()))?;
    let model = onnx_protobuf::ModelProto::parse_from_bytes(&bytes)
        .map_err(|e| model_err(e.to_string()))?;
    let mut counts = std::collections::BTreeMap::new();
    for node in &model.graph.node {
        *counts.entry(node.op_type.clone()).or_insert(0) += 1;
    }
    Ok(counts)
}

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
