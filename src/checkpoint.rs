//! Checkpoints: one safetensors file holding the model's state dict (torchvision names),
//! optional optimizer buffers (`optimizer.*`), and the run's metadata as JSON under the
//! `gmpq` metadata key; plus a JSON sidecar for humans and scripts. Every file is written
//! atomically (temp file, fsync, rename, fsync of the folder), so a crash never leaves a
//! half-written checkpoint.

use crate::data::Pipeline;
use crate::model::ModelConfig;
use safetensors::tensor::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

pub const FORMAT_VERSION: u32 = 1;
pub const META_KEY: &str = "gmpq";
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
    pub precision: Option<crate::quant::Precision>,
    /// How the quantizers were calibrated, per layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<Vec<crate::quant::LayerCalibration>>,
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

/// The name of [`DirLock`]'s file inside the folder it locks.
pub const LOCK_FILE: &str = ".gmpq.lock";

/// An exclusive lock on an output folder (`DIR/.gmpq.lock`), held while one process writes
/// there: two processes resuming the same run would otherwise interleave checkpoints and
/// delete each other's temp files. The OS drops it when the process dies, so a killed run
/// never leaves a stale lock behind.
#[derive(Debug)]
pub struct DirLock {
    _file: std::fs::File,
    dir: PathBuf,
    /// The folder held nothing when it was locked: if nothing was written to it, dropping
    /// the lock removes it, so a command that fails early leaves no empty run folder.
    was_empty: bool,
}

impl Drop for DirLock {
    fn drop(&mut self) {
        if !self.was_empty {
            return;
        }
        let only_lock = std::fs::read_dir(&self.dir).is_ok_and(|entries| {
            entries
                .flatten()
                .all(|e| e.file_name() == std::ffi::OsStr::new(LOCK_FILE))
        });
        if only_lock {
            let _ = std::fs::remove_file(self.dir.join(LOCK_FILE));
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "{dir} is in use by another gmpq process{holder}; wait for it or choose another folder"
    )]
    Busy { dir: PathBuf, holder: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl DirLock {
    /// Locks `dir` (created if missing) without waiting.
    pub fn acquire(dir: &Path) -> std::result::Result<Self, LockError> {
        let path = dir.join(LOCK_FILE);
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let was_empty = std::fs::read_dir(dir)
            .map_err(io)?
            .flatten()
            .all(|e| e.file_name() == std::ffi::OsStr::new(LOCK_FILE));
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let pid = std::fs::read_to_string(&path).unwrap_or_default();
                let pid = pid.trim();
                return Err(LockError::Busy {
                    dir: dir.into(),
                    holder: if pid.is_empty() {
                        String::new()
                    } else {
                        format!(" (pid {pid})")
                    },
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        // The holder's pid, for the message another process gets.
        file.set_len(0).map_err(io)?;
        file.write_all(std::process::id().to_string().as_bytes())
            .map_err(io)?;
        Ok(Self {
            _file: file,
            dir: dir.to_path_buf(),
            was_empty,
        })
    }
}

/// Writes `bytes` to `path` atomically: a temp file in the same folder, fsync, rename, and
/// fsync of the folder so the rename itself is durable.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Removes temp files that an interrupted [`write_atomic`] into `dir` left behind.
pub fn remove_stale_temps(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.contains(".tmp-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
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

    /// Loads a gmpq checkpoint (tensors on the CPU); a packed one
    /// ([`crate::export::packed`]) is unpacked.
    pub fn load(path: &Path) -> Result<Self> {
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
        let tensors = match metadata.get(crate::export::packed::PACKED_KEY) {
            Some(header) => crate::export::packed::unpack(path, &meta, header, &tensors)?,
            None => tensors,
        };
        Ok(Checkpoint { meta, tensors })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.bin");
        write_atomic(&p, b"hello").unwrap();
        write_atomic(&p, b"world").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"world");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_locked_folder_is_refused_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let held = DirLock::acquire(&run).unwrap();
        let err = DirLock::acquire(&run).unwrap_err().to_string();
        assert!(
            err.contains("in use by another gmpq process")
                && err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(held);
        DirLock::acquire(&run).unwrap();
    }
}
