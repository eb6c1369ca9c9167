//! The command-line form of `gmpq export`, and the export it states.

use super::{ExportError, Format};
use crate::policy::Policy;
use crate::quant::{Network, Numerics, Precision};
use clap::Args;
use std::path::PathBuf;

/// Export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// ONNX (opset 21): the integer graph, or QDQ for a fake-quant checkpoint.
    Onnx,
    /// safetensors with bit-packed kernels: of an integer checkpoint, the integer ONNX graph
    /// with its kernels packed (ONNX Runtime runs it: `gmpq eval --onnx`, `gmpq predict`); of
    /// a fake-quant checkpoint, the checkpoint with its kernels packed (libtorch runs it:
    /// `gmpq eval --checkpoint`, `gmpq predict`, `gmpq export`).
    Packed,
}

impl ExportFormat {
    /// The format a file name asks for: `.onnx` ONNX, `.safetensors` packed.
    pub fn of_path(path: &std::path::Path) -> Option<Self> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "onnx" => Some(Self::Onnx),
            "safetensors" => Some(Self::Packed),
            _ => None,
        }
    }

    /// Its `--format` value, what it writes, and the file extension that names it.
    fn names(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Self::Onnx => ("onnx", "an ONNX model", "onnx"),
            Self::Packed => ("packed", "a packed safetensors file", "safetensors"),
        }
    }
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The fine-tuned (fixed-policy) checkpoint, or a fake-quant packed file (an integer
    /// packed file already is the export: run it with gmpq eval --onnx or gmpq predict).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// What to write [default: from --out's extension, .onnx or .safetensors; else onnx].
    /// A format that contradicts the extension is refused.
    #[arg(long, value_enum)]
    pub format: Option<ExportFormat>,
    /// With --format onnx: the float network, quantizers left out (for comparison).
    #[arg(long)]
    pub fp: bool,
    /// Output file (.onnx or .safetensors).
    #[arg(long)]
    pub out: PathBuf,
}

/// What an export wrote.
#[derive(Debug, Clone, PartialEq)]
pub enum Exported {
    /// An ONNX graph: `kind` is integer, QDQ or float; `risks`, the QDQ convs whose int16
    /// pair sums can saturate on CPUs without VNNI ([`super::saturation`]; never in an
    /// integer graph, which is built without them).
    Onnx {
        kind: &'static str,
        bytes: usize,
        risks: Vec<super::saturation::PairSumRisk>,
    },
    /// A packed file; `policy_bytes` is the policy's model size (METHOD.md's count) and
    /// `float_bytes` the other float tensors' (batch norm, clips, thresholds, biases).
    Packed {
        bytes: usize,
        policy_bytes: f64,
        float_bytes: f64,
        integer: bool,
    },
}

impl ExportArgs {
    /// Reads the checkpoint (on the CPU, whatever the device), writes the format atomically.
    /// The format written: `--format`, else the one `--out`'s extension names, else ONNX; a
    /// `--format` the extension contradicts is an error (a reader would pick the wrong one).
    pub fn format(&self) -> Result<ExportFormat, ExportError> {
        let named = ExportFormat::of_path(&self.out);
        match (self.format, named) {
            (Some(f), Some(n)) if f != n => {
                let ((flag, writes, ext), (named_flag, _, named_ext)) = (f.names(), n.names());
                Err(ExportError::Unsupported(format!(
                    "--format {flag} writes {writes}, but --out {} names a .{named_ext} file: \
                     name it .{ext} or give --format {named_flag}",
                    self.out.display()
                )))
            }
            (Some(f), _) => Ok(f),
            (None, n) => Ok(n.unwrap_or(ExportFormat::Onnx)),
        }
    }

    pub fn run(&self) -> Result<Exported, ExportError> {
        let format = match (self.format()?, self.fp) {
            (ExportFormat::Onnx, false) => Format::Onnx,
            (ExportFormat::Onnx, true) => Format::OnnxFloat,
            (ExportFormat::Packed, false) => Format::Packed,
            (ExportFormat::Packed, true) => {
                return Err(ExportError::Unsupported(
                    "--fp applies to --format onnx only".into(),
                ))
            }
        };
        let (ck, network) = super::load(&self.checkpoint, tch::Device::Cpu)?;
        let io = |source| ExportError::Io {
            path: self.out.clone(),
            source,
        };
        if let Some(dir) = self.out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let bytes = format.write(&ck, &network)?;
        crate::files::write_atomic(&self.out, &bytes).map_err(io)?;
        let fixed = match &ck.meta.precision {
            Some(Precision::Fixed {
                policy, numerics, ..
            }) => Some((policy, *numerics)),
            _ => None,
        };
        Ok(match (format, fixed) {
            (Format::Packed, Some((policy, _))) => {
                let (policy_bytes, float_bytes) = policy_size_bytes(&network, policy);
                Exported::Packed {
                    bytes: bytes.len(),
                    policy_bytes,
                    float_bytes,
                    integer: network.integer.is_some(),
                }
            }
            (Format::Packed, None) => {
                return Err(ExportError::Unsupported(
                    "not a fixed-policy checkpoint".into(),
                ))
            }
            (Format::Onnx, Some((_, Numerics::Integer))) => Exported::Onnx {
                kind: "integer",
                bytes: bytes.len(),
                risks: Vec::new(),
            },
            (Format::Onnx, Some(_)) => Exported::Onnx {
                kind: "QDQ",
                bytes: bytes.len(),
                risks: super::saturation::pair_sum_risks(&bytes)?,
            },
            _ => Exported::Onnx {
                kind: "float",
                bytes: bytes.len(),
                risks: Vec::new(),
            },
        })
    }
}

/// The policy's model size in bytes (quantized kernels at their bits, the FP stem and head at
/// 32 bits, as METHOD.md counts it) and the other float tensors' bytes (batch norm, clips,
/// thresholds, biases).
fn policy_size_bytes(network: &Network, policy: &Policy) -> (f64, f64) {
    let size = policy
        .cost(network.net.convs(), network.net.fc_spec())
        .1
        .size_mb
        * 1e6;
    let counted: std::collections::HashSet<String> = network
        .net
        .convs()
        .iter()
        .map(|c| c.kernel_name())
        .chain(["fc.weight".to_string(), "fc.bias".to_string()])
        .collect();
    let other: usize = network
        .vs
        .variables()
        .iter()
        .filter(|(n, _)| !counted.contains(*n))
        .map(|(_, t)| t.numel() * 4)
        .sum();
    (size, other as f64)
}
