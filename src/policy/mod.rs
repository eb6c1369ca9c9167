//! Mixed-precision policies (a `(w_bits, a_bits)` per quantized layer), their validation
//! against a model, and their cost: BOPs, model size and compression, as METHOD.md defines.

#[cfg(feature = "cli")]
mod args;
#[cfg(feature = "cli")]
pub use args::{bit_width, parse_numerics, ChoiceError, PolicyChoice};

use crate::model::{ConvSpec, LinearSpec, ModelConfig};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

pub const DEFAULT_CANDIDATES: [u32; 4] = [2, 3, 4, 6];
/// [`DEFAULT_CANDIDATES`] as the flags take and `--help` shows them (comma-separated; clap
/// would print a typed default list space-separated); parsed back in the settings tests.
pub const DEFAULT_CANDIDATES_FLAG: &str = "2,3,4,6";

/// The bit candidates of a supernet search (or a HAWQ allocation).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct BitCandidateArgs {
    /// Weight bit candidates, comma-separated.
    #[cfg_attr(feature = "cli", arg(long, value_delimiter = ',', value_parser = args::bit_width(), default_value = DEFAULT_CANDIDATES_FLAG))]
    pub w_bits: Vec<u32>,
    /// Activation bit candidates, comma-separated.
    #[cfg_attr(feature = "cli", arg(long, value_delimiter = ',', value_parser = args::bit_width(), default_value = DEFAULT_CANDIDATES_FLAG))]
    pub a_bits: Vec<u32>,
}

impl BitCandidateArgs {
    /// The candidate sets, sorted and without repeats.
    pub fn candidates(&self) -> Result<Candidates, PolicyError> {
        Candidates::new(&self.w_bits, &self.a_bits)
    }
}

impl Default for BitCandidateArgs {
    fn default() -> Self {
        Self {
            w_bits: DEFAULT_CANDIDATES.to_vec(),
            a_bits: DEFAULT_CANDIDATES.to_vec(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a policy: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("policy is for {policy} but the model is {model}")]
    WrongModel { policy: String, model: String },
    #[error("policy layer '{0}' does not exist in the model")]
    UnknownLayer(String),
    #[error("policy has no entry for layer '{0}'")]
    MissingLayer(String),
    #[error("policy lists layer '{0}' twice")]
    DuplicateLayer(String),
    #[error("layer '{layer}': {kind} bits {bits} not in the candidate set {set:?}")]
    BitsNotCandidate {
        layer: String,
        kind: &'static str,
        bits: u32,
        set: Vec<u32>,
    },
    #[error("'{0}' is not a uniform policy name: wBITSaBITS with bits in 2..=16 (like w4a4, w8a8, w2a3)")]
    BadUniform(String),
    #[error("invalid candidate set '{0}' (comma-separated bit widths in 2..=16)")]
    BadCandidates(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerBits {
    pub name: String,
    pub w_bits: u32,
    pub a_bits: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidates {
    pub weight: Vec<u32>,
    pub activation: Vec<u32>,
}

impl Candidates {
    /// Both sets checked ([`candidate_set`]): sorted, without repeats, bits in range.
    pub fn new(weight: &[u32], activation: &[u32]) -> Result<Self, PolicyError> {
        Ok(Self {
            weight: candidate_set(weight)?,
            activation: candidate_set(activation)?,
        })
    }
}

/// Totals derived from a policy and model geometry (written for humans; recomputed on load).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyTotals {
    /// Σ over quantized layers of MACs·b_w·b_a.
    pub bops: u64,
    /// Σ over all layers (stem, quantized, head) of MACs·32·32.
    pub fp_bops: u64,
    /// MACs·32·32 of the full-precision stem and head, which `bops` leaves out.
    pub fp_layers_bops: u64,
    pub compression: f64,
    /// Σ params·b_w over quantized layers + 32-bit FP layers, in MB (10^6 bytes).
    pub size_mb: f64,
    pub fp_size_mb: f64,
}

/// The policy file format version (`format` in policy.json).
pub const POLICY_FORMAT: u32 = 2;

fn policy_format_v1() -> u32 {
    1
}

/// How the bits of a policy are used (METHOD.md's quantizers), recorded in every policy file
/// so it can be read without gmpq's source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantizerScheme {
    pub weight: String,
    pub activation: String,
}

impl Default for QuantizerScheme {
    fn default() -> Self {
        Self {
            weight: "symmetric uniform, per tensor (per output channel with --per-channel): \
                     T = max|w|, s = T/(2^(b-1)-1), q = round(clamp(w,-T,T)/s)·s"
                .into(),
            activation: "unsigned uniform on the conv input with a learned clip r: \
                         s = r/(2^b-1), q = round(clamp(x,0,r)/s)·s (signed inputs after \
                         linear bottlenecks: clamp(x,-r,r), s = r/(2^(b-1)-1))"
                .into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// File format version (1 for files written before it was recorded).
    #[serde(default = "policy_format_v1")]
    pub format: u32,
    pub model: String,
    pub input_size: usize,
    pub candidates: Candidates,
    pub layers: Vec<LayerBits>,
    /// The layers that stay full precision (32-bit stem and classifier), filled in with the
    /// totals.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fp_layers: Vec<String>,
    #[serde(default)]
    pub quantizer: QuantizerScheme,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub totals: Option<PolicyTotals>,
    /// Free-form provenance (search settings, cost), kept as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<serde_json::Value>,
}

/// Where a policy comes from on a command line: a file, or a uniform name (`w4a4`).
#[derive(Debug, Clone, PartialEq)]
pub enum PolicySource {
    File(PathBuf),
    Uniform { w_bits: u32, a_bits: u32 },
}

impl PolicySource {
    /// `--policy FILE` or `--uniform wXaY` (the name checked); `None` when neither is given.
    pub fn from_flags(
        file: Option<&Path>,
        uniform: Option<&str>,
    ) -> Result<Option<Self>, PolicyError> {
        Ok(match (file, uniform) {
            (Some(path), _) => Some(PolicySource::File(path.to_path_buf())),
            (None, Some(name)) => {
                let (w_bits, a_bits) = parse_uniform(name)?;
                Some(PolicySource::Uniform { w_bits, a_bits })
            }
            (None, None) => None,
        })
    }

    /// The policy for the network `model` with these layers, checked against it and with
    /// its totals.
    pub fn resolve(
        &self,
        model: &ModelConfig,
        convs: &[ConvSpec],
        fc: &LinearSpec,
    ) -> Result<Policy, PolicyError> {
        let policy = match self {
            PolicySource::File(path) => Policy::load(path)?,
            PolicySource::Uniform { w_bits, a_bits } => {
                Policy::uniform(model, convs, *w_bits, *a_bits)
            }
        };
        policy.validate(model, convs)?;
        Ok(policy.with_totals(convs, fc))
    }
}

/// Parses `2,3,4,6`.
/// A candidate set as a sorted list without repeats; empty or out-of-range sets are refused.
pub fn candidate_set(bits: &[u32]) -> Result<Vec<u32>, PolicyError> {
    if bits.is_empty() || bits.iter().any(|b| !BIT_RANGE.contains(b)) {
        let list: Vec<String> = bits.iter().map(|b| b.to_string()).collect();
        return Err(PolicyError::BadCandidates(list.join(",")));
    }
    let set: BTreeSet<u32> = bits.iter().copied().collect();
    Ok(set.into_iter().collect())
}

/// What producing a policy cost, recorded in its `meta.cost` (`PolicyMeta` of the search module)
/// by every producer (searches, HAWQ, the uniform and random arms) and read by the pipeline's
/// summary.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct PolicyCost {
    /// Wall time in seconds.
    pub wall_seconds: f64,
    /// Images processed (forward passes through the network, counted per image).
    pub images_processed: u64,
}

/// The bitwidths gmpq quantizes to (weights and activations).
pub const BIT_RANGE: std::ops::RangeInclusive<u32> = 2..=16;

/// Parses `w4a4` into `(4, 4)`.
pub fn parse_uniform(name: &str) -> Result<(u32, u32), PolicyError> {
    let bad = || PolicyError::BadUniform(name.into());
    let rest = name.strip_prefix('w').ok_or_else(bad)?;
    let (w, a) = rest.split_once('a').ok_or_else(bad)?;
    let (w, a): (u32, u32) = (w.parse().map_err(|_| bad())?, a.parse().map_err(|_| bad())?);
    if !BIT_RANGE.contains(&w) || !BIT_RANGE.contains(&a) {
        return Err(bad());
    }
    Ok((w, a))
}

impl Policy {
    /// Whether `other` quantizes the same network the same way: same model and input, the
    /// same bits per layer, the same full-precision layers and quantizers. The candidates,
    /// totals and provenance do not change a fine-tuning, so they are not compared.
    pub fn same_allocation(&self, other: &Policy) -> bool {
        self.model == other.model
            && self.input_size == other.input_size
            && self.layers == other.layers
            && self.fp_layers == other.fp_layers
            && self.quantizer == other.quantizer
    }

    /// The same bits for every quantized layer.
    pub fn uniform(model: &ModelConfig, convs: &[ConvSpec], w_bits: u32, a_bits: u32) -> Self {
        let layers = convs
            .iter()
            .filter(|c| c.quantizable)
            .map(|c| LayerBits {
                name: c.name.clone(),
                w_bits,
                a_bits,
            })
            .collect();
        Policy {
            format: POLICY_FORMAT,
            fp_layers: Vec::new(),
            quantizer: Default::default(),
            model: model.arch.to_string(),
            input_size: model.input_size,
            candidates: Candidates {
                weight: vec![w_bits],
                activation: vec![a_bits],
            },
            layers,
            totals: None,
            meta: None,
        }
    }

    /// A mixed policy that cycles through the given bits: quantized layer `i` gets
    /// `w_cycle[i mod len]` and `a_cycle[i mod len]` (for benchmarks that need one without
    /// a search).
    pub fn cycled(
        model: &ModelConfig,
        convs: &[ConvSpec],
        w_cycle: &[u32],
        a_cycle: &[u32],
    ) -> Self {
        let mut p = Self::uniform(model, convs, w_cycle[0], a_cycle[0]);
        for (i, l) in p.layers.iter_mut().enumerate() {
            l.w_bits = w_cycle[i % w_cycle.len()];
            l.a_bits = a_cycle[i % a_cycle.len()];
        }
        let sorted = |v: &[u32]| {
            let mut v = v.to_vec();
            v.sort_unstable();
            v.dedup();
            v
        };
        p.candidates = Candidates {
            weight: sorted(w_cycle),
            activation: sorted(a_cycle),
        };
        p
    }

    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let policy: Policy = serde_json::from_str(&text).map_err(|e| PolicyError::Parse {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        policy.check_bits().map_err(|reason| PolicyError::Parse {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(policy)
    }

    /// Every bit width the file states (layers and candidates) within [`BIT_RANGE`]: the one
    /// check every reader of a policy file gets from [`Policy::load`].
    pub fn check_bits(&self) -> Result<(), String> {
        let r = BIT_RANGE;
        for (what, set) in [
            ("weight candidates", &self.candidates.weight),
            ("activation candidates", &self.candidates.activation),
        ] {
            if let Some(b) = set.iter().find(|b| !r.contains(b)) {
                return Err(format!(
                    "{what} hold {b} bits, outside the supported {}..={}",
                    r.start(),
                    r.end()
                ));
            }
        }
        for l in &self.layers {
            for (kind, b) in [("weight", l.w_bits), ("activation", l.a_bits)] {
                if !r.contains(&b) {
                    return Err(format!(
                        "layer '{}': {b} {kind} bits, outside the supported {}..={}",
                        l.name,
                        r.start(),
                        r.end()
                    ));
                }
            }
        }
        Ok(())
    }

    /// Writes the policy (with freshly computed totals) atomically as pretty JSON.
    pub fn save(&self, path: &Path) -> Result<(), PolicyError> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| PolicyError::Parse {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        crate::files::write_atomic(path, &json).map_err(|source| PolicyError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Checks the policy against a model: same architecture, exactly its quantized layers,
    /// bits within the candidate sets.
    pub fn validate(&self, model: &ModelConfig, convs: &[ConvSpec]) -> Result<(), PolicyError> {
        if self.model != model.arch.to_string() {
            return Err(PolicyError::WrongModel {
                policy: self.model.clone(),
                model: model.arch.to_string(),
            });
        }
        let quantized: BTreeSet<&str> = convs
            .iter()
            .filter(|c| c.quantizable)
            .map(|c| c.name.as_str())
            .collect();
        let mut seen = BTreeSet::new();
        for l in &self.layers {
            if !quantized.contains(l.name.as_str()) {
                return Err(PolicyError::UnknownLayer(l.name.clone()));
            }
            if !seen.insert(l.name.as_str()) {
                return Err(PolicyError::DuplicateLayer(l.name.clone()));
            }
            for (kind, bits, set) in [
                ("weight", l.w_bits, &self.candidates.weight),
                ("activation", l.a_bits, &self.candidates.activation),
            ] {
                if !set.contains(&bits) {
                    return Err(PolicyError::BitsNotCandidate {
                        layer: l.name.clone(),
                        kind,
                        bits,
                        set: set.clone(),
                    });
                }
            }
        }
        if let Some(missing) = quantized.iter().find(|n| !seen.contains(*n)) {
            return Err(PolicyError::MissingLayer(missing.to_string()));
        }
        Ok(())
    }

    pub fn bits_by_layer(&self) -> HashMap<String, (u32, u32)> {
        self.layers
            .iter()
            .map(|l| (l.name.clone(), (l.w_bits, l.a_bits)))
            .collect()
    }

    /// Per-layer cost rows and totals for this policy on `convs` + `fc`.
    pub fn cost(&self, convs: &[ConvSpec], fc: &LinearSpec) -> (Vec<LayerCost>, PolicyTotals) {
        let bits = self.bits_by_layer();
        let rows: Vec<LayerCost> = convs
            .iter()
            .map(|c| LayerCost::conv(c, bits.get(&c.name).copied()))
            .chain(std::iter::once(LayerCost::linear(fc)))
            .collect();
        let totals = totals_of(&rows);
        (rows, totals)
    }

    /// Fills in `totals` for `convs` + `fc`.
    pub fn with_totals(mut self, convs: &[ConvSpec], fc: &LinearSpec) -> Self {
        self.totals = Some(self.cost(convs, fc).1);
        self.fp_layers = convs
            .iter()
            .filter(|c| !c.quantizable)
            .map(|c| c.name.clone())
            .chain(std::iter::once(fc.name.clone()))
            .collect();
        self
    }
}

/// One row of a BOPs table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerCost {
    pub name: String,
    /// e.g. `16x16x3x3 @32x32` (C_out × C_in/groups × k × k at the output resolution).
    pub shape: String,
    pub macs: u64,
    pub params: u64,
    /// `None` for full-precision layers.
    pub w_bits: Option<u32>,
    pub a_bits: Option<u32>,
    /// MACs·b_w·b_a for quantized layers; MACs·32·32 for FP layers.
    pub bops: u64,
    pub size_bits: u64,
}

impl LayerCost {
    fn conv(c: &ConvSpec, bits: Option<(u32, u32)>) -> Self {
        let macs = c.macs();
        let params = c.params();
        let (wb, ab) = bits.unwrap_or((32, 32));
        LayerCost {
            name: c.name.clone(),
            shape: format!(
                "{}x{}x{}x{} @{}x{}",
                c.out_channels,
                c.in_channels / c.groups,
                c.kernel,
                c.kernel,
                c.out_hw[0],
                c.out_hw[1]
            ),
            macs,
            params,
            w_bits: bits.map(|b| b.0),
            a_bits: bits.map(|b| b.1),
            bops: macs * (wb * ab) as u64,
            size_bits: params * wb as u64,
        }
    }

    fn linear(fc: &LinearSpec) -> Self {
        let params = fc.params();
        LayerCost {
            name: fc.name.clone(),
            // An MLP head (an imported network's) shows its widths, input first.
            shape: match fc.hidden.as_slice() {
                [] => format!("{}x{}", fc.out_features, fc.in_features),
                hidden => std::iter::once(fc.in_features)
                    .chain(hidden.iter().copied())
                    .chain(std::iter::once(fc.out_features))
                    .map(|w| w.to_string())
                    .collect::<Vec<_>>()
                    .join("→"),
            },
            macs: fc.macs(),
            params,
            w_bits: None,
            a_bits: None,
            bops: fc.macs() * 1024,
            size_bits: params * 32,
        }
    }

    pub fn quantized(&self) -> bool {
        self.w_bits.is_some()
    }
}

fn totals_of(rows: &[LayerCost]) -> PolicyTotals {
    let bops: u64 = rows.iter().filter(|r| r.quantized()).map(|r| r.bops).sum();
    let fp_bops: u64 = rows.iter().map(|r| r.macs * 1024).sum();
    let fp_layers_bops: u64 = rows.iter().filter(|r| !r.quantized()).map(|r| r.bops).sum();
    let size_bits: u64 = rows.iter().map(|r| r.size_bits).sum();
    let fp_size_bits: u64 = rows.iter().map(|r| r.params * 32).sum();
    PolicyTotals {
        bops,
        fp_bops,
        fp_layers_bops,
        compression: if bops > 0 {
            fp_bops as f64 / bops as f64
        } else {
            f64::INFINITY
        },
        size_mb: size_bits as f64 / 8e6,
        fp_size_mb: fp_size_bits as f64 / 8e6,
    }
}

/// The numeric form of a network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
#[allow(clippy::large_enum_variant)] // one per network: boxing the policy would buy nothing
pub enum Precision {
    Full,
    /// Fixed per-layer bits; `per_channel` weight thresholds (off by default, as the reference).
    Fixed {
        policy: Policy,
        per_channel: bool,
        /// How the network computes (absent in checkpoints written before integer numerics,
        /// which are fake-quantized).
        #[serde(default, skip_serializing_if = "Numerics::is_fake_quant")]
        numerics: Numerics,
    },
    /// The mixed-precision supernet over these candidate sets.
    Supernet {
        candidates: Candidates,
    },
}

/// How a fixed-policy network computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Numerics {
    /// The reference's fake quantization: conv inputs and kernels quantized, batch norm,
    /// residual adds and activations in float (what checkpoints written before integer
    /// numerics hold).
    #[default]
    FakeQuant,
    /// Integer deployment numerics (see the module docs): folded batch norm, int32 biases,
    /// every conv output and residual sum re-quantized.
    Integer,
}

impl Numerics {
    pub fn name(self) -> &'static str {
        match self {
            Numerics::FakeQuant => "fake-quant",
            Numerics::Integer => "integer",
        }
    }
    pub fn is_fake_quant(&self) -> bool {
        *self == Numerics::FakeQuant
    }
}

impl std::str::FromStr for Numerics {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fake-quant" => Ok(Numerics::FakeQuant),
            "integer" => Ok(Numerics::Integer),
            _ => Err(format!("unknown numerics '{s}' (integer, fake-quant)")),
        }
    }
}

/// What calibration chose for one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerCalibration {
    pub name: String,
    pub a_bits: u32,
    pub max: f64,
    pub clip: f64,
    pub method: String,
}
