//! Link-time fixes for libtorch from the PyPI wheel, and gmpq's fused quantizer kernels.
//!
//! - An rpath to libtorch's lib dir, so `gmpq` runs without `LD_LIBRARY_PATH`.
//! - `libtorch_cuda` kept as a NEEDED entry: nothing references its symbols directly (CUDA
//!   kernels register themselves when the library loads), so `--as-needed` would drop it and
//!   `tch::Cuda::is_available()` would say false on a GPU machine.
//! - `csrc/fused_quant.cpp` (custom autograd functions, see src/quant/fused.rs) compiled
//!   against the same libtorch headers, with the flags torch-sys uses for its own C++.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc/fused_quant.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    // torch-sys (links = "tch") exports the libtorch lib dir it linked against.
    let Some(lib_dir) = std::env::var_os("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from) else {
        panic!("torch-sys did not export DEP_TCH_LIBTORCH_LIB: cannot build the fused kernels");
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
    // The onnxruntime wheel in the same site-packages: its library's path is compiled in, so
    // `ort` loads it without ORT_DYLIB_PATH (which still overrides it).
    if let Some(capi) = lib_dir
        .parent()
        .and_then(|torch| torch.parent())
        .map(|site| site.join("onnxruntime/capi"))
    {
        let found = std::fs::read_dir(&capi).ok().and_then(|entries| {
            entries.filter_map(|e| e.ok().map(|e| e.path())).find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libonnxruntime.so"))
            })
        });
        if let Some(path) = found {
            println!("cargo:rustc-env=GMPQ_ORT_DYLIB={}", path.display());
        }
        println!("cargo:rerun-if-changed={}", capi.display());
    }
    // The wheel's layout: torch/lib beside torch/include.
    let include = lib_dir
        .parent()
        .map(|p| p.join("include"))
        .unwrap_or_else(|| PathBuf::from("include"));
    // The same default as torch-sys: the PyPI wheels use the C++11 ABI.
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        // Bit-exact float arithmetic: no contraction into FMA, no fast-math.
        .flag("-ffp-contract=off")
        .opt_level(3)
        .file("csrc/fused_quant.cpp")
        .compile("gmpq_fused");
}
