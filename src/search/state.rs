//! Per-epoch snapshots of a search phase (supernet weights and α, both optimizers' momentum,
//! λ, the log so far), so an interrupted search continues after its last finished epoch
//! instead of starting over. The data order of an epoch depends only on the seed and the
//! epoch, so a resumed search sees the batches an uninterrupted one would.

use super::{AlphaOpt, EpochLog, Result, SearchConfig};
use crate::checkpoint::{read_safetensors, tensors_to_bytes, var_store_tensors};
use crate::files::write_atomic;
use crate::train::Sgd;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// Name prefixes of the snapshot's three parts: supernet variables, weight-optimizer and
/// α-optimizer momentum.
const PARTS: [&str; 3] = ["net/", "w_opt/", "a_opt/"];

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct PhaseState {
    pub config: SearchConfig,
    pub phase: String,
    /// Epochs finished (the next epoch's index).
    pub epochs_done: usize,
    pub lambda: f64,
    pub logs: Vec<EpochLog>,
    pub images: usize,
    /// Wall seconds spent in this phase before the interruption.
    pub seconds: f64,
}

/// Deletes every phase snapshot in `dir` (once the search's policies are written).
pub fn remove_snapshots(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("search-state-") && name.ends_with(".safetensors") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// `DIR/search-state-PHASE.safetensors`, the phase name made file-safe.
pub(super) fn path(dir: &Path, phase: &str) -> PathBuf {
    let slug: String = phase
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    dir.join(format!("search-state-{slug}.safetensors"))
}

pub(super) fn save(
    path: &Path,
    state: &PhaseState,
    vs: &tch::nn::VarStore,
    w_opt: &Sgd,
    a_opt: &AlphaOpt,
) -> Result<()> {
    let mut tensors = BTreeMap::new();
    for (prefix, map) in
        PARTS
            .into_iter()
            .zip([var_store_tensors(vs), w_opt.state(), a_opt.state()])
    {
        for (name, t) in map {
            tensors.insert(format!("{prefix}{name}"), t.detach());
        }
    }
    let json =
        serde_json::to_string(state).map_err(|e| super::SearchError::Invalid(e.to_string()))?;
    let bytes = tensors_to_bytes(&tensors, json)?;
    write_atomic(path, &bytes).map_err(|source| super::SearchError::Io {
        path: path.into(),
        source,
    })
}

/// Restores a snapshot of `phase` written by a search with the same `config` into the
/// supernet and optimizers. A snapshot from other settings, or that does not fit the supernet,
/// is ignored with a warning (the next epoch overwrites it), never half-applied.
pub(super) fn load(
    path: &Path,
    config: &SearchConfig,
    phase: &str,
    vs: &tch::nn::VarStore,
    w_opt: &mut Sgd,
    a_opt: &mut AlphaOpt,
) -> Result<Option<PhaseState>> {
    if !path.exists() {
        return Ok(None);
    }
    let ignore = |why: &str| {
        tracing::warn!("ignoring {}: {why}; this phase starts over", path.display());
        Ok(None)
    };
    let (meta, tensors) = match read_safetensors(path) {
        Ok(v) => v,
        Err(e) => return ignore(&e.to_string()),
    };
    let Some(state) = meta.and_then(|m| serde_json::from_str::<PhaseState>(&m).ok()) else {
        return ignore("not a search snapshot");
    };
    if state.config != *config || state.phase != phase {
        return ignore("written by a search with other settings");
    }
    let [mut net, mut w_state, mut a_state]: [BTreeMap<String, Tensor>; 3] = Default::default();
    for (k, t) in tensors {
        for (prefix, part) in PARTS.iter().zip([&mut net, &mut w_state, &mut a_state]) {
            if let Some(name) = k.strip_prefix(prefix) {
                part.insert(name.to_string(), t);
                break;
            }
        }
    }
    let vars = vs.variables();
    if vars.len() != net.len()
        || vars
            .iter()
            .any(|(n, v)| net.get(n).is_none_or(|t| t.size() != v.size()))
    {
        return ignore("it does not fit this supernet");
    }
    tch::no_grad(|| {
        for (name, var) in &vars {
            var.shallow_clone()
                .copy_(&net[name].to_device(var.device()));
        }
    });
    w_opt.load_state(w_state);
    a_opt.load_state(a_state);
    Ok(Some(state))
}
