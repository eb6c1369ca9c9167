//! Running exported models: ONNX Runtime, loaded at run time from the `onnxruntime` wheel
//! that scripts/setup.sh installs (its path is compiled in by build.rs; `ORT_DYLIB_PATH`
//! overrides it).

#[cfg(feature = "cli")]
mod args;
mod cpu;
mod eval;
mod graph_ops;
#[cfg(feature = "cli")]
pub use args::{EvalArgs, SplitArg};
pub use cpu::CpuInfo;
pub use eval::{check_fits, EvalOutcome, EvalRequest};
pub use graph_ops::{float_op_counts, op_and_float_counts, op_counts, OpCounts};

use crate::data::{ImageSource, Normalize, Pipeline};
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
