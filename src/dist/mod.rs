//! Data-parallel runs over PyTorch's distributed engine (c10d), which the torch wheel ships
//! compiled inside libtorch: a TCPStore for rendezvous and a Gloo (CPU) or NCCL (CUDA, cargo
//! feature `nccl`) process group, reached through the small C shim `csrc/dist.cpp` (`tch`
//! has no distributed API).
//!
//! One process per device. The process group is the process's default group, as in
//! `torch.distributed`: [`init_from_env`] creates it from torchrun's `env://` variables
//! (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`) or from `srun`'s
//! (`SLURM_PROCID`, `SLURM_STEP_NUM_TASKS`, `SLURM_LOCALID`), and training and search ask
//! [`current`] for it. With no such variables, or a world of one, there is no group and every
//! run computes exactly as a single process.

mod error;
mod rendezvous;

pub use error::DistError;
pub use rendezvous::{Rendezvous, DEFAULT_TIMEOUT};

use crate::data::Shard;
use std::ffi::{c_void, CStr, CString};
use std::os::raw::c_char;
use std::sync::OnceLock;
use tch::{Kind, Tensor};
use torch_sys::C_tensor;

extern "C" {
    fn gmpq_dist_new(
        host: *const c_char,
        port: i32,
        host_store: i32,
        prefix: *const c_char,
        rank: i32,
        world: i32,
        timeout_ms: i64,
        nccl: i32,
    ) -> *mut c_void;
    fn gmpq_dist_all_reduce(group: *mut c_void, t: *const C_tensor, op: i32) -> i32;
    fn gmpq_dist_broadcast(group: *mut c_void, t: *const C_tensor, root: i32) -> i32;
    fn gmpq_dist_barrier(group: *mut c_void) -> i32;
    fn gmpq_dist_free(group: *mut c_void);
    fn gmpq_dist_last_error() -> *const c_char;
}

/// Buckets of the settings digest: a differing setting is found by its bucket.
const SETTING_BUCKETS: usize = 128;

/// A 46-bit digest of `s` (sums of a few stay exact in f64); the same in every process of
/// one build (SipHash with fixed keys).
fn digest46(s: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish() >> 18
}

/// A command line as `(setting, value)` pairs: `--flag value` or `--flag=value` by flag
/// name, a lone `--flag` with an empty value, and each positional word by its position
/// (`argument N`).
pub fn settings_of(args: &[String]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut i = 0;
    let mut position = 0;
    while i < args.len() {
        let a = &args[i];
        if let Some(flag) = a.strip_prefix("--") {
            match flag.split_once('=') {
                Some((k, v)) => out.push((format!("--{k}"), v.to_string())),
                None => {
                    let value = args.get(i + 1).filter(|v| !v.starts_with("--"));
                    out.push((a.clone(), value.cloned().unwrap_or_default()));
                    i += usize::from(value.is_some());
                }
            }
        } else {
            position += 1;
            out.push((format!("argument {position}"), a.clone()));
        }
        i += 1;
    }
    out
}

/// Which c10d backend a group runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Gloo,
    Nccl,
}

/// A joined process group.
#[derive(Debug)]
pub struct Group {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub backend: Backend,
    raw: *mut c_void,
}

// SAFETY: c10d process groups are thread-safe (their work runs on their own threads); the
// pointer is freed only in `Drop`.
unsafe impl Send for Group {}
unsafe impl Sync for Group {}

fn last_error() -> String {
    // SAFETY: the shim returns its thread-local, NUL-terminated message.
    unsafe { CStr::from_ptr(gmpq_dist_last_error()) }
        .to_string_lossy()
        .into_owned()
}

impl Group {
    /// Joins the group `r` describes (blocks until every rank has come, or `r.timeout`).
    pub fn join(r: &Rendezvous, backend: Backend) -> Result<Self, DistError> {
        let cstr =
            |s: &str| CString::new(s).map_err(|_| DistError::Env(format!("{s:?} has a NUL byte")));
        let (host, prefix) = (cstr(&r.addr)?, cstr(&r.prefix)?);
        // SAFETY: valid NUL-terminated strings for the call; the result is owned here.
        let raw = unsafe {
            gmpq_dist_new(
                host.as_ptr(),
                r.port as i32,
                r.host_store as i32,
                prefix.as_ptr(),
                r.rank as i32,
                r.world as i32,
                r.timeout.as_millis() as i64,
                (backend == Backend::Nccl) as i32,
            )
        };
        if raw.is_null() {
            return Err(DistError::Join {
                rank: r.rank,
                world: r.world,
                addr: r.addr.clone(),
                port: r.port,
                timeout_s: r.timeout.as_secs(),
                message: last_error(),
            });
        }
        Ok(Self {
            rank: r.rank,
            world: r.world,
            local_rank: r.local_rank,
            backend,
            raw,
        })
    }

    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    fn check(&self, rc: i32, what: &'static str) -> Result<(), DistError> {
        if rc == 0 {
            Ok(())
        } else {
            Err(DistError::Collective {
                rank: self.rank,
                what,
                message: last_error(),
            })
        }
    }

    /// Runs `f` on `t`, or on a contiguous copy written back into `t` (c10d reduces dense
    /// buffers; channels-last kernels are views that are not).
    fn on_dense(
        &self,
        t: &Tensor,
        f: impl Fn(&Tensor) -> i32,
        what: &'static str,
    ) -> Result<(), DistError> {
        if t.is_contiguous() {
            return self.check(f(t), what);
        }
        let dense = t.contiguous();
        self.check(f(&dense), what)?;
        tch::no_grad(|| t.shallow_clone().copy_(&dense));
        Ok(())
    }

    /// Sums `t` over all ranks, in place (every rank gets the same bits).
    pub fn all_reduce_sum(&self, t: &Tensor) -> Result<(), DistError> {
        // SAFETY: `t` is a live tensor for the call; the shim reduces into its storage (shared
        // by every handle of `t`).
        self.on_dense(
            t,
            |t| unsafe { gmpq_dist_all_reduce(self.raw, t.as_ptr(), 0) },
            "all-reduce (sum)",
        )
    }

    /// Averages `t` over all ranks, in place.
    pub fn all_reduce_mean(&self, t: &Tensor) -> Result<(), DistError> {
        self.all_reduce_sum(t)?;
        tch::no_grad(|| {
            let _ = t.shallow_clone().g_div_scalar_(self.world as f64);
        });
        Ok(())
    }

    /// The elementwise maximum of `t` over all ranks, in place.
    pub fn all_reduce_max(&self, t: &Tensor) -> Result<(), DistError> {
        // SAFETY: as in `all_reduce_sum`.
        self.on_dense(
            t,
            |t| unsafe { gmpq_dist_all_reduce(self.raw, t.as_ptr(), 1) },
            "all-reduce (max)",
        )
    }

    /// Copies rank `root`'s `t` into every rank's, in place.
    pub fn broadcast(&self, t: &Tensor, root: usize) -> Result<(), DistError> {
        // SAFETY: as in `all_reduce_sum`.
        self.on_dense(
            t,
            |t| unsafe { gmpq_dist_broadcast(self.raw, t.as_ptr(), root as i32) },
            "broadcast",
        )
    }

    pub fn barrier(&self) -> Result<(), DistError> {
        // SAFETY: a live group.
        let rc = unsafe { gmpq_dist_barrier(self.raw) };
        self.check(rc, "barrier")
    }

    /// Sums a few numbers over all ranks (evaluation counts), in f64.
    pub fn sum_f64(&self, values: &[f64]) -> Result<Vec<f64>, DistError> {
        let t = Tensor::from_slice(values).to_kind(Kind::Double);
        self.all_reduce_sum(&t)?;
        Vec::<f64>::try_from(&t).map_err(|e| DistError::Collective {
            rank: self.rank,
            what: "all-reduce (sum)",
            message: e.to_string(),
        })
    }

    /// Checks that every rank holds the same `vs` (a data-parallel run's invariant; a
    /// difference means the ranks ran different code or data). Compares per-variable sums
    /// and sums of squares in f64 by max/min all-reduces.
    pub fn check_same_var_store(
        &self,
        vs: &tch::nn::VarStore,
        what: &str,
    ) -> Result<(), DistError> {
        let vars = sorted_vars(vs, |_| true);
        let sums: Vec<f64> = tch::no_grad(|| {
            vars.iter()
                .flat_map(|(_, v)| {
                    let d = v.to_kind(Kind::Double);
                    [
                        d.sum(Kind::Double).double_value(&[]),
                        d.square().sum(Kind::Double).double_value(&[]),
                    ]
                })
                .collect()
        });
        match self.differing(&sums)?.first() {
            None => Ok(()),
            Some(&i) => Err(DistError::Collective {
                rank: self.rank,
                what: "the ranks' agreement check",
                message: format!(
                    "{what}: the ranks hold different values of {}",
                    vars[i / 2].0
                ),
            }),
        }
    }

    /// The positions at which `values` differ between ranks (bit for bit), by two max
    /// all-reduces (of the values and of their negatives).
    fn differing(&self, values: &[f64]) -> Result<Vec<usize>, DistError> {
        let hi = Tensor::from_slice(values);
        let lo = -Tensor::from_slice(values);
        self.all_reduce_max(&hi)?;
        self.all_reduce_max(&lo)?;
        let hi = Vec::<f64>::try_from(&hi).unwrap_or_default();
        let lo = Vec::<f64>::try_from(&lo).unwrap_or_default();
        Ok(hi
            .iter()
            .zip(&lo)
            .enumerate()
            .filter(|(_, (h, l))| h.to_bits() != (-*l).to_bits())
            .map(|(i, _)| i)
            .collect())
    }

    /// Checks that every rank was started with the same `settings` (`(name, value)` pairs, see
    /// [`settings_of`]), before any work: ranks that differ (a `--limit`, an `--lr`) would
    /// otherwise pair up mismatched collectives or train different models. One all-reduce of
    /// bucketed digests; the error names the settings in the buckets that differ.
    pub fn check_same_settings(&self, settings: &[(String, String)]) -> Result<(), DistError> {
        let mut buckets = vec![0f64; SETTING_BUCKETS];
        for (name, value) in settings {
            let b = digest46(name) as usize % SETTING_BUCKETS;
            buckets[b] += digest46(&format!("{name}\u{0}{value}")) as f64;
        }
        let differs = self.differing(&buckets)?;
        if differs.is_empty() {
            return Ok(());
        }
        let mut named: Vec<String> = settings
            .iter()
            .filter(|(n, _)| differs.contains(&(digest46(n) as usize % SETTING_BUCKETS)))
            .map(|(n, v)| {
                if v.is_empty() {
                    n.clone()
                } else {
                    format!("{n} {v} here")
                }
            })
            .collect();
        if named.len() < differs.len() {
            named.push("a setting this rank does not give".into());
        }
        Err(DistError::Mismatch {
            rank: self.rank,
            differing: named.join(", "),
        })
    }

    /// Rank 0's values of every variable in `vs` (parameters, batch-norm statistics,
    /// quantizer state), in name order, so that all ranks start from the same network.
    pub fn broadcast_var_store(&self, vs: &tch::nn::VarStore) -> Result<(), DistError> {
        let vars = sorted_vars(vs, |_| true);
        tch::no_grad(|| {
            for (_, v) in &vars {
                self.broadcast(v, 0)?;
            }
            Ok(())
        })
    }

    /// Averages the batch-norm running statistics of `vs` over the ranks (each saw its own
    /// shard of every batch).
    pub fn average_running_stats(&self, vs: &tch::nn::VarStore) -> Result<(), DistError> {
        let vars = sorted_vars(vs, |n| {
            n.ends_with("running_mean") || n.ends_with("running_var")
        });
        tch::no_grad(|| {
            for (_, v) in &vars {
                self.all_reduce_mean(v)?;
            }
            Ok(())
        })
    }
}

/// The variables of `vs` whose names `keep` accepts, in name order: every rank walks them in
/// the same order, so their collectives pair up.
fn sorted_vars(vs: &tch::nn::VarStore, keep: impl Fn(&str) -> bool) -> Vec<(String, Tensor)> {
    let mut vars: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(n, _)| keep(n))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: created by `gmpq_dist_new`, freed once.
        unsafe { gmpq_dist_free(self.raw) }
    }
}

static GROUP: OnceLock<Group> = OnceLock::new();

/// Creates the process's default group from the launcher's variables, if they describe more
/// than one rank; `cuda` picks NCCL. Returns the group (None: a single process).
pub fn init_from_env(cuda: bool) -> Result<Option<&'static Group>, DistError> {
    let Some(r) = Rendezvous::from_vars(|n| std::env::var(n).ok())? else {
        return Ok(None);
    };
    if GROUP.get().is_some() {
        return Err(DistError::AlreadyInitialized);
    }
    let backend = if cuda { Backend::Nccl } else { Backend::Gloo };
    let g = Group::join(&r, backend)?;
    Ok(Some(GROUP.get_or_init(|| g)))
}

/// The default group, if this process is one of several ranks.
pub fn current() -> Option<&'static Group> {
    GROUP.get()
}

/// Whether this process writes run folders, logs and progress: rank 0, or a lone process.
pub fn is_main() -> bool {
    current().is_none_or(Group::is_main)
}

/// This process's share of every batch of `batch_size` images (all of it for a lone
/// process); refused, with the reason, when the ranks cannot share the batch equally.
pub fn shard(batch_size: usize) -> Result<Shard, String> {
    let shard = current().map_or(Shard::default(), |g| Shard {
        rank: g.rank,
        world: g.world,
    });
    if batch_size.is_multiple_of(shard.world) {
        Ok(shard)
    } else {
        Err(format!(
            "--batch-size {batch_size} (the batch of all ranks together) must be a multiple of \
             the {} ranks",
            shard.world
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |n| m.get(n).cloned()
    }

    #[test]
    fn command_lines_read_as_settings() {
        let args: Vec<String> = [
            "finetune",
            "--lr",
            "0.1",
            "--fp",
            "--limit=64",
            "--out",
            "o",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        assert_eq!(
            settings_of(&args),
            pairs(&[
                ("argument 1", "finetune"),
                ("--lr", "0.1"),
                ("--fp", ""),
                ("--limit", "64"),
                ("--out", "o"),
            ])
        );
    }

    #[test]
    fn no_launcher_is_a_single_process() {
        assert_eq!(Rendezvous::from_vars(vars(&[])).unwrap(), None);
        let one = vars(&[("RANK", "0"), ("WORLD_SIZE", "1")]);
        assert_eq!(Rendezvous::from_vars(one).unwrap(), None);
        // sbatch alone (no srun step) is not a distributed launch.
        let batch = vars(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "4")]);
        assert_eq!(Rendezvous::from_vars(batch).unwrap(), None);
    }

    #[test]
    fn torchrun_variables() {
        let r = Rendezvous::from_vars(vars(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29400"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("TORCHELASTIC_RUN_ID", "abc"),
            ("TORCHELASTIC_RESTART_COUNT", "2"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((r.rank, r.world, r.local_rank, r.port), (1, 2, 1, 29400));
        assert!(!r.host_store);
        assert_eq!(r.prefix, "gmpq/abc/2/");
        // Rank 0 hosts the store unless torchrun's agent already does.
        let r0 = Rendezvous::from_vars(vars(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "1"),
        ]))
        .unwrap()
        .unwrap();
        assert!(r0.host_store);
    }

    #[test]
    fn srun_variables() {
        let r = Rendezvous::from_vars(vars(&[
            ("SLURM_PROCID", "1"),
            ("SLURM_STEP_NUM_TASKS", "2"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_ID", "123"),
            ("SLURM_LAUNCH_NODE_IPADDR", "10.1.1.1"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((r.rank, r.world, r.local_rank), (1, 2, 1));
        assert_eq!((r.addr.as_str(), r.port), ("10.1.1.1", 20_123));
    }

    #[test]
    fn inconsistent_variables_are_refused() {
        for bad in [
            vec![
                ("RANK", "2"),
                ("WORLD_SIZE", "2"),
                ("MASTER_ADDR", "h"),
                ("MASTER_PORT", "1"),
            ],
            vec![("RANK", "0")],
            vec![("RANK", "x"), ("WORLD_SIZE", "2")],
            vec![("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")],
            vec![
                ("RANK", "0"),
                ("WORLD_SIZE", "2"),
                ("MASTER_ADDR", "h"),
                ("MASTER_PORT", "70000"),
            ],
            vec![
                ("RANK", "0"),
                ("WORLD_SIZE", "2"),
                ("GMPQ_DIST_TIMEOUT", "-1"),
            ],
        ] {
            assert!(Rendezvous::from_vars(vars(&bad)).is_err(), "{bad:?}");
        }
    }
}
