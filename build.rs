//! Link-time fixes for libtorch from the PyPI wheel, and gmpq's fused quantizer kernels.
//!
//! - An rpath to libtorch's lib dir, so `gmpq` runs without `LD_LIBRARY_PATH`.
//! - `libtorch_cuda` kept as a NEEDED entry: nothing references its symbols directly (CUDA
//!   kernels register themselves when the library loads), so `--as-needed` would drop it and
//!   `tch::Cuda::is_available()` would say false on a GPU machine.
//! - `csrc/fused_quant.cpp` (custom autograd functions, see src/quant/fused.rs) compiled
//!   against the same libtorch headers, with the flags torch-sys uses for its own C++.
//! - `csrc/dist.cpp` (PyTorch's distributed engine c10d, see src/dist/), with the Gloo
//!   declarations the wheel does not ship (`csrc/third_party/gloo`, see its README).
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc/fused_quant.cpp");
    println!("cargo:rerun-if-changed=csrc/dist.cpp");
    println!("cargo:rerun-if-changed=csrc/third_party/gloo");
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
    // torchrun from the same virtualenv (venv/lib/pythonX.Y/site-packages/torch/lib →
    // venv/bin/torchrun): the distributed tests launch through it.
    if let Some(venv) = lib_dir.ancestors().nth(5) {
        println!(
            "cargo:rustc-env=GMPQ_TORCHRUN={}",
            venv.join("bin/torchrun").display()
        );
    }
    // The wheel's layout: torch/lib beside torch/include.
    let include = lib_dir
        .parent()
        .map(|p| p.join("include"))
        .unwrap_or_else(|| PathBuf::from("include"));
    // The same default as torch-sys: the PyPI wheels use the C++11 ABI.
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    let build = |file: &str, lib: &str, extra: &[PathBuf], defines: &[&str]| {
        let mut b = cc::Build::new();
        b.cpp(true)
            .pic(true)
            .warnings(false)
            .include(&include)
            .include(include.join("torch/csrc/api/include"));
        for dir in extra {
            b.include(dir);
        }
        for d in defines {
            b.define(d, None);
        }
        b.flag("-std=c++17")
            .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
            .flag("-DGLOG_USE_GLOG_EXPORT")
            // Bit-exact float arithmetic: no contraction into FMA, no fast-math.
            .flag("-ffp-contract=off")
            .opt_level(3)
            .file(file)
            .compile(lib);
    };
    build("csrc/fused_quant.cpp", "gmpq_fused", &[], &[]);
    let mut dist_includes = vec![PathBuf::from("csrc/third_party/gloo")];
    let mut dist_defines = vec!["USE_C10D_GLOO", "USE_DISTRIBUTED"];
    if std::env::var_os("CARGO_FEATURE_NCCL").is_some() {
        // The CUDA headers (torch's nvidia-cuda-runtime wheel, plus nvidia-cuda-crt and
        // nvidia-cuda-cccl, which `GMPQ_NCCL=1 scripts/setup.sh` adds) and NCCL's, beside
        // torch in site-packages.
        if let Some(site) = lib_dir.parent().and_then(|t| t.parent()) {
            for sub in ["nvidia/cu13/include", "nvidia/nccl/include"] {
                dist_includes.push(site.join(sub));
            }
        }
        dist_defines.extend(["GMPQ_NCCL", "USE_C10D_NCCL", "USE_CUDA"]);
    }
    build("csrc/dist.cpp", "gmpq_dist", &dist_includes, &dist_defines);
}
