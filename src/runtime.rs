//! Process-level engine settings: threads, device, and OpenMP's wait policy.

use std::ffi::OsString;

/// The environment variables OpenMP (libgomp, which the torch wheel ships) reads for how its
/// idle workers wait. It reads them once, when libtorch loads, before `main` runs.
pub const OMP_WAIT_POLICY: &str = "OMP_WAIT_POLICY";
pub const GOMP_SPINCOUNT: &str = "GOMP_SPINCOUNT";

/// The OpenMP spin count gmpq sets when the user has chosen no wait policy or spin count.
///
/// libgomp's default lets idle workers spin for ~300,000 iterations, which collapses
/// throughput when another process wants the cores (the issue measured 450 → 19 img/s);
/// passive waiting (0 spins) never collapses but costs a wake-up per parallel region on a
/// quiet machine. Measured on this 2-core machine (ResNet-20 training step, batch 64,
/// `scripts/omp-sweep.sh` and `scripts/bench.sh`, docs/PERFORMANCE.md): 10,000 spins ran at
/// 669–859 img/s quiet against 571–716 passive and 749–796 for PyTorch, and beside a second
/// 2-thread training at 152–317 img/s (mean 261) against 202–304 passive (mean 246) and
/// 110–120 active; 30,000 spins fell to 77 img/s there.
pub const DEFAULT_SPINCOUNT: &str = "10000";

/// The variable and value to set before re-executing, or `None` when the user has chosen a
/// wait policy or spin count themselves.
pub fn wait_setting_to_apply(
    policy: Option<OsString>,
    spincount: Option<OsString>,
) -> Option<(&'static str, &'static str)> {
    (policy.is_none() && spincount.is_none()).then_some((GOMP_SPINCOUNT, DEFAULT_SPINCOUNT))
}

/// Re-executes the current binary with `GOMP_SPINCOUNT` set (see [`DEFAULT_SPINCOUNT`])
/// when the user has not configured OpenMP's waiting. Returns only if no re-exec was needed or it
/// failed (then we just run as we are).
#[cfg(unix)]
pub fn ensure_bounded_omp_spinning() {
    use std::os::unix::process::CommandExt;
    let Some((var, value)) = wait_setting_to_apply(
        std::env::var_os(OMP_WAIT_POLICY),
        std::env::var_os(GOMP_SPINCOUNT),
    ) else {
        return;
    };
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let err = std::process::Command::new(exe)
        .args(args)
        .env(var, value)
        .exec();
    tracing::warn!("could not re-exec with {var}={value}: {err}");
}

#[cfg(not(unix))]
pub fn ensure_bounded_omp_spinning() {}

/// Sets libtorch's intra-op thread count; `None` means `OMP_NUM_THREADS` when it is set (as
/// torchrun sets it for each of several ranks on a node), else all cores.
pub fn set_threads(threads: Option<usize>) -> usize {
    let n = threads
        .filter(|&n| n > 0)
        .or_else(|| {
            std::env::var("OMP_NUM_THREADS")
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .filter(|&n| n > 0)
        })
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

/// The libtorch this process loaded: its library's path (from the process's memory map) and
/// the version its wheel records beside it (`torch/version.py`); `None` where neither can be
/// read (not Linux, or libtorch not from a wheel).
pub fn loaded_libtorch() -> Option<(std::path::PathBuf, Option<String>)> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let lib = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cpu.so"))
        .map(std::path::PathBuf::from)?;
    let version = lib
        .parent()
        .and_then(|d| d.parent())
        .and_then(|torch| std::fs::read_to_string(torch.join("version.py")).ok())
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("__version__"))
                .and_then(|v| v.split(['\'', '"']).nth(1).map(str::to_string))
        });
    Some((lib, version))
}

/// The signal that asked this process to stop (0: none yet), set by [`install_stop_signals`].
static STOP_SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

#[cfg(unix)]
extern "C" fn remember_stop_signal(signal: libc::c_int) {
    // Only an atomic swap and _exit: async-signal-safe. A second signal ends the process at
    // once (as the default action would have).
    if STOP_SIGNAL.swap(signal, std::sync::atomic::Ordering::SeqCst) != 0 {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(128 + signal) };
    }
}

/// Makes SIGTERM and SIGUSR1 (what Slurm sends before a job's time limit, and what a
/// scheduler's preemption sends) ask training and search to stop at the next step instead of
/// killing the process: the run then ends with an error naming the signal, its folder locks
/// released and its last checkpoint (the last finished epoch) intact for the resume. A second
/// signal ends the process at once. For the commands that train or search only.
#[cfg(unix)]
pub fn install_stop_signals() {
    // SAFETY: installs a handler that only stores into an atomic.
    unsafe {
        libc::signal(
            libc::SIGTERM,
            remember_stop_signal as *const () as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGUSR1,
            remember_stop_signal as *const () as libc::sighandler_t,
        );
    }
}

#[cfg(not(unix))]
pub fn install_stop_signals() {}

/// The signal that asked this process to stop, if one has.
pub fn stop_requested() -> Option<i32> {
    match STOP_SIGNAL.load(std::sync::atomic::Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// What stopped a data-parallel step: this process's signal (`local`), else a peer's.
pub fn stop_cause(local: Option<i32>) -> String {
    local.map_or("another rank's stop signal".into(), signal_name)
}

/// The signal's name for messages.
pub fn signal_name(signal: i32) -> String {
    match signal {
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGUSR1 => "SIGUSR1".into(),
        s => format!("signal {s}"),
    }
}
