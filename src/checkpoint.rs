//! Checkpoints: one safetensors file holding the model's state dict (torchvision names),
//! optional optimizer buffers (`optimizer.*`), and the run's metadata as JSON under the
//! `gmpq` metadata key; plus a JSON sidecar for humans and scripts. Every file is written
//! atomically (temp file, fsync, rename, fsync of the folder), so a crash never leaves a
//! half-written checkpoint.

use crate::data::Pipeline;
use crate::files::write_atomic;
use crate::model::ModelConfig;
use safetensors::tensor::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

pub const FORMAT_VERSION: u32 = 1;
pub const META_KEY: &str = "gmpq";
/// The safetensors metadata key that marks a packed file (its format: `export::packed`).
pub const PACKED_KEY: &str = "gmpq.packed";
pub const OPTIMIZER_PREFIX: &str = "optimizer.";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid safetensors file: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: has no gmpq metadata (use `gmpq import` for foreign weights)")]
    NoMetadata { path: PathBuf },
    #[error(
        "{path} is a packed integer model, which runs in ONNX Runtime: gmpq eval --onnx {path}, \
         gmpq predict --model {path}"
    )]
    RunsInOnnxRuntime { path: PathBuf },
    #[error(
        "{path} is a packed file: gmpq eval, export and predict read it; training and search \
         need the checkpoint it was packed from"
    )]
    Packed { path: PathBuf },
    #[error("{path}: tensor '{name}' has unsupported dtype {dtype}")]
    Dtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error("{path}: does not fit the model: {problems}")]
    Mismatch { path: PathBuf, problems: String },
    #[error("tensor error: {0}")]
    Tch(#[from] tch::TchError),
}

type Result<T> = std::result::Result<T, CheckpointError>;

/// Metrics of one finished epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub lr: f64,
    pub train_loss: f64,
    pub train_top1: f64,
    pub test_loss: f64,
    pub test_top1: f64,
    pub test_top5: f64,
    pub seconds: f64,
    pub images_per_second: f64,
    /// Top-1 on the held-out validation images of the train split (training with a holdout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_top1: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
}

/// Everything about a checkpoint except its tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub format: u32,
    pub model: ModelConfig,
    /// The pipeline evaluation uses (resize/crop/normalise): `gmpq eval` needs nothing else.
    pub eval_pipeline: Pipeline,
    pub dataset: Option<String>,
    /// Training settings (as JSON, owned by the `train` module).
    pub train: Option<serde_json::Value>,
    /// Number of completed epochs.
    pub epoch: usize,
    pub history: Vec<EpochMetrics>,
    /// Where the weights came from, for imported checkpoints.
    pub source: Option<String>,
    /// Full precision when absent; a fixed policy or a supernet otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<crate::policy::Precision>,
    /// How the quantizers were calibrated, per layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<Vec<crate::policy::LayerCalibration>>,
    /// The class names, by label, when the training data named them (`gmpq predict` prints
    /// them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_names: Option<Vec<String>>,
}

impl CheckpointMeta {
    /// Metadata of a model with nothing else known yet (no training, no quantization).
    pub fn new(model: ModelConfig, eval_pipeline: Pipeline) -> Self {
        Self {
            format: FORMAT_VERSION,
            model,
            eval_pipeline,
            dataset: None,
            train: None,
            epoch: 0,
            history: Vec::new(),
            source: None,
            precision: None,
            calibration: None,
            class_names: None,
        }
    }
}

/// A checkpoint in memory: metadata plus named CPU tensors.
pub struct Checkpoint {
    pub meta: CheckpointMeta,
    pub tensors: BTreeMap<String, Tensor>,
}

/// A fingerprint of a network's variables (names and values, FNV-1a 64 over their f32
/// bytes in name order): an export records it, so a model can be matched to the checkpoint it
/// came from.
pub fn weights_digest(vs: &tch::nn::VarStore) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    for (name, t) in &vars {
        feed(name.as_bytes());
        let values = Vec::<f32>::try_from(
            t.detach()
                .to_device(tch::Device::Cpu)
                .to_kind(tch::Kind::Float)
                .flatten(0, -1),
        )
        .unwrap_or_default();
        for v in values {
            feed(&v.to_le_bytes());
        }
    }
    format!("{h:016x}")
}

struct RawTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &RawTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn to_raw(t: &Tensor) -> Result<RawTensor> {
    let t = t.to_device(tch::Device::Cpu).contiguous();
    let dtype = match t.kind() {
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Uint8 => Dtype::U8,
        k => {
            return Err(CheckpointError::Tch(tch::TchError::Convert(format!(
                "cannot save tensor of kind {k:?}"
            ))))
        }
    };
    let numel = t.numel();
    let mut bytes = vec![0u8; numel * t.kind().elt_size_in_bytes()];
    t.f_copy_data_u8(&mut bytes, numel)?;
    Ok(RawTensor {
        dtype,
        shape: t.size().iter().map(|&d| d as usize).collect(),
        bytes,
    })
}

/// Safetensors bytes of `tensors`, with `meta_json` under the `gmpq` metadata key.
pub fn tensors_to_bytes(tensors: &BTreeMap<String, Tensor>, meta_json: String) -> Result<Vec<u8>> {
    tensors_to_bytes_with(tensors, meta_json, HashMap::new())
}

/// [`tensors_to_bytes`] with more metadata entries beside `gmpq`.
pub fn tensors_to_bytes_with(
    tensors: &BTreeMap<String, Tensor>,
    meta_json: String,
    mut extra: HashMap<String, String>,
) -> Result<Vec<u8>> {
    let raws: Vec<(String, RawTensor)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), to_raw(t)?)))
        .collect::<Result<_>>()?;
    extra.insert(META_KEY.to_string(), meta_json);
    let metadata = extra;
    safetensors::tensor::serialize(raws.iter().map(|(n, r)| (n.as_str(), r)), &Some(metadata))
        .map_err(|e| CheckpointError::Corrupt {
            path: PathBuf::new(),
            reason: format!("{e:?}"),
        })
}

impl Checkpoint {
    /// Serialises to safetensors bytes (metadata under the `gmpq` key).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let meta_json =
            serde_json::to_string(&self.meta).map_err(|e| CheckpointError::Corrupt {
                path: PathBuf::new(),
                reason: e.to_string(),
            })?;
        tensors_to_bytes(&self.tensors, meta_json)
    }

    /// Saves `path` (safetensors) and `path.json` (sidecar metadata), both atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let io = |source| CheckpointError::Io {
            path: path.to_path_buf(),
            source,
        };
        write_atomic(path, &self.to_bytes()?).map_err(io)?;
        let sidecar = sidecar_path(path);
        let json = serde_json::to_vec_pretty(&self.meta).map_err(|e| CheckpointError::Corrupt {
            path: sidecar.clone(),
            reason: e.to_string(),
        })?;
        write_atomic(&sidecar, &json).map_err(|source| CheckpointError::Io {
            path: sidecar,
            source,
        })
    }

    /// Loads a gmpq checkpoint (tensors on the CPU). A packed file is refused: it is read
    /// by the layer that wrote it (`export::load`), which unpacks it.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_raw(path).and_then(|(ck, packed)| match packed {
            None => Ok(ck),
            Some(_) => Err(CheckpointError::Packed {
                path: path.to_path_buf(),
            }),
        })
    }

    /// A checkpoint file as stored, and the [`PACKED_KEY`] header of a packed one (whose
    /// tensors are then the packed blobs).
    pub fn load_raw(path: &Path) -> Result<(Self, Option<String>)> {
        let (mut metadata, tensors) = read_safetensors_all(path)?;
        let meta_json = metadata
            .remove(META_KEY)
            .ok_or_else(|| CheckpointError::NoMetadata {
                path: path.to_path_buf(),
            })?;
        let meta: CheckpointMeta =
            serde_json::from_str(&meta_json).map_err(|e| CheckpointError::Corrupt {
                path: path.to_path_buf(),
                reason: format!("metadata: {e}"),
            })?;
        let packed = metadata.remove(PACKED_KEY);
        Ok((Checkpoint { meta, tensors }, packed))
    }

    /// The model's state dict (everything but optimizer buffers).
    pub fn model_tensors(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.tensors
            .iter()
            .filter(|(n, _)| !n.starts_with(OPTIMIZER_PREFIX))
    }
}

/// `x.safetensors` → `x.json`.
pub fn sidecar_path(path: &Path) -> PathBuf {
    path.with_extension("json")
}

/// Reads any safetensors file: its `gmpq` metadata (if present) and its tensors.
pub fn read_safetensors(path: &Path) -> Result<(Option<String>, BTreeMap<String, Tensor>)> {
    let (mut metadata, tensors) = read_safetensors_all(path)?;
    Ok((metadata.remove(META_KEY), tensors))
}

/// Reads any safetensors file: all its metadata and its tensors.
pub fn read_safetensors_all(
    path: &Path,
) -> Result<(HashMap<String, String>, BTreeMap<String, Tensor>)> {
    let bytes = std::fs::read(path).map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let corrupt = |reason: String| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| corrupt(format!("{e:?}")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(&bytes).map_err(|e| corrupt(format!("{e:?}")))?;
    let mut tensors = BTreeMap::new();
    for (name, view) in st.tensors() {
        let kind = match view.dtype() {
            Dtype::F32 => Kind::Float,
            Dtype::F64 => Kind::Double,
            Dtype::F16 => Kind::Half,
            Dtype::BF16 => Kind::BFloat16,
            Dtype::I64 => Kind::Int64,
            Dtype::I32 => Kind::Int,
            Dtype::U8 => Kind::Uint8,
            d => {
                return Err(CheckpointError::Dtype {
                    path: path.to_path_buf(),
                    name,
                    dtype: format!("{d:?}"),
                })
            }
        };
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)?;
        tensors.insert(name, t);
    }
    Ok((meta, tensors))
}

/// Copies `tensors` into the var store's variables by name. Every variable must be present
/// with its shape unless `allow_missing` says it may keep its initial value (e.g. quantizer
/// state when loading full-precision weights); unexpected tensors are errors unless
/// `allow_unexpected` (e.g. torchvision's `num_batches_tracked`) says otherwise. All
/// problems are reported together, by name.
pub fn load_into_var_store<'a>(
    vs: &tch::nn::VarStore,
    tensors: impl IntoIterator<Item = (&'a String, &'a Tensor)>,
    path: &Path,
    allow_unexpected: impl Fn(&str) -> bool,
    allow_missing: impl Fn(&str) -> bool,
) -> Result<()> {
    let vars = vs.variables();
    let given: BTreeMap<&String, &Tensor> = tensors.into_iter().collect();
    // Counts and the first few names: a wrong file can differ in hundreds of tensors.
    let brief = |what: &str, names: Vec<String>| -> Option<String> {
        const SHOWN: usize = 3;
        if names.is_empty() {
            return None;
        }
        let more = if names.len() > SHOWN { ", …" } else { "" };
        Some(format!(
            "{} {what} ({}{more})",
            names.len(),
            names[..names.len().min(SHOWN)].join(", ")
        ))
    };
    let mut missing: Vec<String> = vars
        .keys()
        .filter(|k| !given.contains_key(k) && !allow_missing(k))
        .cloned()
        .collect();
    missing.sort();
    let unexpected: Vec<String> = given
        .keys()
        .filter(|k| !vars.contains_key(k.as_str()) && !allow_unexpected(k))
        .map(|s| s.to_string())
        .collect();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    let mut reshaped = Vec::new();
    for name in names {
        if let Some(t) = given.get(name) {
            let want = vars[name].size();
            if t.size() != want {
                reshaped.push(format!("{name} is {:?}, the model's {want:?}", t.size()));
            }
        }
    }
    let problems: Vec<String> = [
        brief(
            &format!("of the model's {} tensors missing", vars.len()),
            missing,
        ),
        brief(
            &format!("of the file's {} tensors unexpected", given.len()),
            unexpected,
        ),
        brief("tensors of another shape", reshaped),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !problems.is_empty() {
        return Err(CheckpointError::Mismatch {
            path: path.to_path_buf(),
            problems: problems.join("; "),
        });
    }
    tch::no_grad(|| -> Result<()> {
        for (name, var) in vars.iter() {
            if let Some(src) = given.get(name) {
                let mut var = var.shallow_clone();
                var.f_copy_(&src.to_kind(var.kind()).to_device(var.device()))?;
            }
        }
        Ok(())
    })
}

/// The model's state dict from a var store, sorted by name.
pub fn var_store_tensors(vs: &tch::nn::VarStore) -> BTreeMap<String, Tensor> {
    vs.variables()
        .into_iter()
        .map(|(n, t)| (n, t.detach().to_device(tch::Device::Cpu)))
        .collect()
}
