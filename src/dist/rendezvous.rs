//! Where and as whom a process joins its group: torchrun's or Slurm's variables.

use super::error::DistError;
use std::time::Duration;

/// Where and as whom a process joins its group, read from the launcher's variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendezvous {
    pub addr: String,
    pub port: u16,
    pub rank: usize,
    pub world: usize,
    /// The rank among this node's processes: its CUDA device.
    pub local_rank: usize,
    /// Whether this process hosts the TCPStore (rank 0, unless torchrun's agent does).
    pub host_store: bool,
    /// Keys of this launch in the store (a restarted launch must not read the last one's).
    pub prefix: String,
    /// Bounds joining and every collective: a peer that never comes ends the run.
    pub timeout: Duration,
}

/// How long a rank waits for its peers unless `GMPQ_DIST_TIMEOUT` (seconds) says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

impl Rendezvous {
    /// The rendezvous the environment describes (`var` reads one variable), or `None` for a
    /// single process. torchrun's variables win over Slurm's.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, DistError> {
        let num = |name: &str| -> Result<Option<usize>, DistError> {
            var(name)
                .map(|v| {
                    v.trim().parse::<usize>().map_err(|_| {
                        DistError::Env(format!("{name}={v:?} is not a non-negative integer"))
                    })
                })
                .transpose()
        };
        let timeout = match var("GMPQ_DIST_TIMEOUT") {
            Some(v) => Duration::from_secs_f64(
                v.trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s > 0.0)
                    .ok_or_else(|| {
                        DistError::Env(format!(
                            "GMPQ_DIST_TIMEOUT={v:?} is not a positive number of seconds"
                        ))
                    })?,
            ),
            None => DEFAULT_TIMEOUT,
        };
        let (rank, world, local_rank, launcher) = match (num("RANK")?, num("WORLD_SIZE")?) {
            (Some(rank), Some(world)) => (rank, world, num("LOCAL_RANK")?.unwrap_or(0), "torchrun"),
            (None, None) => match (num("SLURM_PROCID")?, num("SLURM_STEP_NUM_TASKS")?) {
                (Some(rank), Some(world)) => {
                    (rank, world, num("SLURM_LOCALID")?.unwrap_or(0), "srun")
                }
                _ => return Ok(None),
            },
            _ => {
                return Err(DistError::Env(
                    "RANK and WORLD_SIZE must be set together".into(),
                ))
            }
        };
        if world == 0 || rank >= world {
            return Err(DistError::Env(format!(
                "rank {rank} is not in a world of {world} ({launcher})"
            )));
        }
        if world == 1 {
            return Ok(None);
        }
        let addr = match var("MASTER_ADDR") {
            Some(a) => a,
            // srun runs rank 0 on the node it was launched from unless told otherwise.
            None if launcher == "srun" => {
                var("SLURM_LAUNCH_NODE_IPADDR").unwrap_or_else(|| "127.0.0.1".into())
            }
            None => {
                return Err(DistError::Env(
                    "WORLD_SIZE is set but MASTER_ADDR is not".into(),
                ))
            }
        };
        let port = match var("MASTER_PORT") {
            Some(p) => p
                .trim()
                .parse::<u16>()
                .map_err(|_| DistError::Env(format!("MASTER_PORT={p:?} is not a port number")))?,
            // Distinct per Slurm job, so that several jobs can share a node.
            None if launcher == "srun" => {
                20_000 + (num("SLURM_JOB_ID")?.unwrap_or(0) % 20_000) as u16
            }
            None => {
                return Err(DistError::Env(
                    "WORLD_SIZE is set but MASTER_PORT is not".into(),
                ))
            }
        };
        let agent_store = var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v == "True");
        let launch = var("TORCHELASTIC_RUN_ID")
            .or_else(|| var("SLURM_JOB_ID"))
            .unwrap_or_default();
        let attempt = var("TORCHELASTIC_RESTART_COUNT").unwrap_or_else(|| "0".into());
        Ok(Some(Self {
            addr,
            port,
            rank,
            world,
            local_rank,
            host_store: rank == 0 && !agent_store,
            prefix: if launch.is_empty() {
                format!("gmpq/{attempt}/")
            } else {
                format!("gmpq/{launch}/{attempt}/")
            },
            timeout,
        }))
    }
}
