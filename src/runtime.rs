//! Process-level engine settings: threads, device, and OpenMP's wait policy.

use std::ffi::OsString;

/// The environment variable OpenMP reads (once, when libtorch loads) for its wait policy.
pub const OMP_WAIT_POLICY: &str = "OMP_WAIT_POLICY";

/// Whether the process should re-execute itself with `OMP_WAIT_POLICY=PASSIVE`.
///
/// libtorch's OpenMP workers spin while they wait by default; on a shared machine that
/// collapses throughput (measured: 450 → 19 img/s with one other busy process). The runtime
/// reads the policy before `main` runs, so setting the variable from inside is too late: the
/// binary sets it and re-executes itself, unless the user has chosen a policy.
pub fn needs_passive_reexec(current: Option<OsString>) -> bool {
    current.is_none()
}

/// Re-executes the current binary with `OMP_WAIT_POLICY=PASSIVE` when the user has not set a
/// policy. Returns only if no re-exec was needed or it failed (then we just run as we are).
#[cfg(unix)]
pub fn ensure_passive_omp() {
    use std::os::unix::process::CommandExt;
    if !needs_passive_reexec(std::env::var_os(OMP_WAIT_POLICY)) {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let err = std::process::Command::new(exe)
        .args(args)
        .env(OMP_WAIT_POLICY, "PASSIVE")
        .exec();
    tracing::warn!("could not re-exec with OMP_WAIT_POLICY=PASSIVE: {err}");
}

#[cfg(not(unix))]
pub fn ensure_passive_omp() {}

/// Sets libtorch's intra-op thread count; `None` means all cores.
pub fn set_threads(threads: Option<usize>) -> usize {
    let n = threads
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    tch::set_num_threads(n as i32);
    n
}

/// Parses a device name: `cpu`, `cuda`, `cuda:N`, or `auto` (CUDA when available).
pub fn parse_device(name: &str) -> Result<tch::Device, String> {
    match name {
        "cpu" => Ok(tch::Device::Cpu),
        "auto" => Ok(tch::Device::cuda_if_available()),
        "cuda" => cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => cuda(i),
            _ => Err(format!(
                "unknown device '{other}' (cpu, cuda, cuda:N, auto)"
            )),
        },
    }
}

fn cuda(i: usize) -> Result<tch::Device, String> {
    if tch::Cuda::is_available() && i < tch::Cuda::device_count() as usize {
        Ok(tch::Device::Cuda(i))
    } else {
        Err(format!(
            "CUDA device {i} requested but {} CUDA device(s) are available",
            if tch::Cuda::is_available() {
                tch::Cuda::device_count()
            } else {
                0
            }
        ))
    }
}
