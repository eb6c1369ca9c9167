//! Link-time fixes for libtorch from the PyPI wheel.
//!
//! - An rpath to libtorch's lib dir, so `gmpq` runs without `LD_LIBRARY_PATH`.
//! - `libtorch_cuda` kept as a NEEDED entry: nothing references its symbols directly (CUDA
//!   kernels register themselves when the library loads), so `--as-needed` would drop it and
//!   `tch::Cuda::is_available()` would say false on a GPU machine.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // torch-sys (links = "tch") exports the libtorch lib dir it linked against.
    let Some(lib_dir) = std::env::var_os("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from) else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
