//! The CPU an exported model runs on: its model name, and the integer kernel path ONNX
//! Runtime takes on it.

use serde::Serialize;

/// The CPU model and which of the instruction sets ONNX Runtime's and oneDNN's kernels use
/// it has (the integer/float ratios depend on them: VNNI and AMX speed up int8 dot products).
#[derive(Debug, Clone, Serialize)]
pub struct CpuInfo {
    pub model: String,
    pub cores: usize,
    /// Of `avx2`, `avx512f`, `avx512_vnni`, `avx_vnni`, `amx_int8`, `amx_bf16`: those present.
    pub features: Vec<String>,
}

impl CpuInfo {
    /// From `/proc/cpuinfo` (Linux); elsewhere the model is "unknown" and no feature is listed.
    pub fn detect() -> Self {
        const WANTED: [&str; 6] = [
            "avx2",
            "avx512f",
            "avx512_vnni",
            "avx_vnni",
            "amx_int8",
            "amx_bf16",
        ];
        let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |key: &str| {
            text.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        };
        let flags = field("flags").unwrap_or_default();
        let flags: std::collections::HashSet<&str> = flags.split_whitespace().collect();
        Self {
            model: field("model name").unwrap_or_else(|| "unknown".into()),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            features: WANTED
                .iter()
                .filter(|f| flags.contains(*f))
                .map(|f| f.to_string())
                .collect(),
        }
    }

    /// Whether the CPU has int8 dot products that sum in int32 (VNNI, AMX).
    pub fn has_vnni(&self) -> bool {
        self.features
            .iter()
            .any(|f| matches!(f.as_str(), "avx512_vnni" | "avx_vnni" | "amx_int8"))
    }

    /// Which integer kernels ONNX Runtime runs here, and what that means for the answer.
    pub fn integer_kernel_path(&self) -> &'static str {
        if cfg!(target_arch = "aarch64") {
            "ARM integer dot products (sums in int32)"
        } else if self.features.iter().any(|f| f == "amx_int8") {
            "AMX / VNNI (u8s8 products summed in int32)"
        } else if self.has_vnni() {
            "VNNI (u8s8 products summed in int32)"
        } else if self.features.iter().any(|f| f == "avx2") {
            "AVX2 without VNNI (u8s8 pairs summed in int16, which gmpq's export never overflows)"
        } else {
            "generic (no AVX2: scalar integer kernels, sums in int32)"
        }
    }
}
