//! The integer network's plan over a graph: conv and residual units, the ops left in float,
//! and how each value is held (float, at a conv's input quantizer, or at 8 bits).

use super::kernel::{fold, input_code_max, kernel_weight_bits, Folded, STEM_BITS};
use crate::model::graph::{Graph, Op, Value};
use crate::model::ConvSpec;
use crate::quant::QuantError;
use std::collections::HashMap;
use tch::Tensor;

/// How a value of the graph is held in the integer network: float (the default), and/or
/// quantized for its readers.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Holding {
    /// 8 bits with a calibrated range `R` (stored at the value's index in [`RANGES`]) for
    /// every reader not in `direct`: unsigned `s = R/255`, or signed `s = R/127` around zero
    /// point 128. Quantized convs among those readers re-quantize it to their input bits.
    pub eight: Option<bool>,
    /// Quantized convs that read the value at their own input quantizer (bits and clip,
    /// uint8 container), quantized once from its float form.
    pub direct: Vec<String>,
}

/// A conv fused with its batch norm (or bias) and the ops that follow it before quantization.
#[derive(Debug, Clone)]
pub struct ConvUnit {
    /// The op index of its batch norm, or of its bias (an imported network's conv, whose
    /// batch norm the exporter folded in); none: a conv without either.
    pub bn: Option<usize>,
    pub layer: String,
    /// The value the conv reads (after a padding op, if any: see `pads`).
    pub input: Value,
    /// Zero padding `[left, right, top, bottom]` of a `Pad` op that feeds only this conv.
    pub pads: Option<[i64; 4]>,
    /// ReLU / ReLU6 / max-pool ops applied after the batch norm, in order.
    pub post: Vec<usize>,
    /// The value the unit produces (after `post`).
    pub output: Value,
}

/// A residual add and the ops that follow it before quantization.
#[derive(Debug, Clone)]
pub struct AddUnit {
    pub a: Value,
    pub b: Value,
    pub post: Vec<usize>,
    pub output: Value,
}

/// One step of the integer network.
#[derive(Debug, Clone)]
pub enum Step {
    Conv(ConvUnit),
    Add(AddUnit),
    /// Any other op, computed in float on dequantized values (pooling, the classifier).
    Float(usize),
}

/// The integer network's plan over a graph: its steps and how each value is held.
#[derive(Debug, Clone)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// By value (0 = input, `i + 1` = op `i`'s output).
    pub held: Vec<Holding>,
    /// Quantized layers by name: `(w_bits, a_bits, signed input)`.
    pub bits: HashMap<String, (u32, u32, bool)>,
    /// Full-precision convs (the stem) that read the image: they run as integer convs
    /// ([`Plan::kernel_bits`]: 7-bit kernels) on the image quantized to 8 bits (signed,
    /// calibrated range), so that every conv of the deployed graph is an integer kernel and
    /// its layout stays channels-last end to end.
    pub stem: Vec<String>,
    /// The weight bits of every integer conv's kernel (quantized layers and the stem), see
    /// [`Plan::kernel_bits`].
    kernels: HashMap<String, u32>,
    /// Values that share one 8-bit range (each group: the 8-bit held values a `Concat` joins,
    /// through ops that only move codes): the concat and those ops then run on uint8 codes,
    /// as TFLite and ONNX Runtime's `QLinearConcat`-free graphs require.
    pub shared: Vec<Vec<Value>>,
}

/// Who reads each value of a graph.
struct Reads<'a> {
    graph: &'a Graph,
    consumers: Vec<Vec<usize>>,
}

impl<'a> Reads<'a> {
    fn new(graph: &'a Graph) -> Self {
        let mut consumers: Vec<Vec<usize>> = vec![Vec::new(); graph.ops.len() + 1];
        for (i, op) in graph.ops.iter().enumerate() {
            for v in op.inputs() {
                consumers[v].push(i);
            }
        }
        Self { graph, consumers }
    }

    /// The ops that read value `v`, looking through a padding op (folded into its conv).
    fn readers(&self, v: Value) -> Vec<usize> {
        self.consumers[v]
            .iter()
            .flat_map(|&r| match self.graph.ops[r] {
                Op::Pad { .. } => self.consumers[r + 1].clone(),
                _ => vec![r],
            })
            .collect()
    }

    fn sole(&self, v: Value) -> Option<usize> {
        match self.consumers[v].as_slice() {
            [only] => Some(*only),
            _ => None,
        }
    }

    /// The ops that follow value `v` while each is its input's only reader.
    fn post_of(&self, mut v: Value) -> (Vec<usize>, Value) {
        let mut post = Vec::new();
        while let Some(next) = self.sole(v) {
            match self.graph.ops[next] {
                Op::Relu { .. } | Op::Relu6 { .. } | Op::MaxPool { .. } => {
                    post.push(next);
                    v = next + 1;
                }
                _ => break,
            }
        }
        (post, v)
    }

    /// The graph as units: each conv with its batch norm (and padding) and the activations
    /// and pooling that follow it alone, each residual sum with what follows it, the rest
    /// in float.
    fn units(&self) -> Result<Vec<Step>, QuantError> {
        let mut steps = Vec::new();
        let mut fused = vec![false; self.graph.ops.len()];
        for (i, op) in self.graph.ops.iter().enumerate() {
            if fused[i] {
                continue;
            }
            match op {
                Op::Conv { input, layer } => {
                    let bn = self.sole(i + 1).filter(|&j| {
                        matches!(self.graph.ops[j], Op::BatchNorm { .. } | Op::Bias { .. })
                    });
                    let (input, pads) = match self.graph.ops.get(input.wrapping_sub(1)) {
                        Some(Op::Pad { input: src, pads }) if *input > 0 => (*src, Some(*pads)),
                        _ => (*input, None),
                    };
                    let (post, output) = self.post_of(bn.map_or(i, |j| j) + 1);
                    if let Some(j) = bn {
                        fused[j] = true;
                    }
                    post.iter().for_each(|&p| fused[p] = true);
                    steps.push(Step::Conv(ConvUnit {
                        bn,
                        layer: layer.clone(),
                        input,
                        pads,
                        post,
                        output,
                    }));
                }
                Op::Add { a, b } => {
                    let (post, output) = self.post_of(i + 1);
                    post.iter().for_each(|&p| fused[p] = true);
                    steps.push(Step::Add(AddUnit {
                        a: *a,
                        b: *b,
                        post,
                        output,
                    }));
                }
                // A padding op is folded into the conv that reads it.
                Op::Pad { .. }
                    if self
                        .sole(i + 1)
                        .is_some_and(|c| matches!(self.graph.ops[c], Op::Conv { .. })) => {}
                _ => steps.push(Step::Float(i)),
            }
        }
        Ok(steps)
    }

    /// How each unit's output is held: see [`Holding`].
    fn holdings(&self, steps: &[Step], qbits: &HashMap<String, (u32, u32, bool)>) -> Vec<Holding> {
        // How each unit's output is held. A conv's output can feed one integer kernel's
        // quantize op: at its one reader's input quantizer, else 8 bits. A residual sum is
        // cheap to repeat: each quantized conv reading it gets its own sum at its input bits.
        let mut held = vec![Holding::default(); self.graph.ops.len() + 1];
        for step in steps {
            let (output, post, is_add) = match step {
                Step::Conv(u) => (u.output, &u.post, false),
                Step::Add(u) => (u.output, &u.post, true),
                Step::Float(_) => continue,
            };
            let readers = self.readers(output);
            let quantized_conv = |r: &usize| match &self.graph.ops[*r] {
                Op::Conv { layer, .. } if qbits.contains_key(layer) => Some(layer.clone()),
                _ => None,
            };
            let after_relu = post
                .iter()
                .any(|&p| matches!(self.graph.ops[p], Op::Relu { .. } | Op::Relu6 { .. }));
            let direct: Vec<String> = if is_add || readers.len() == 1 {
                readers.iter().filter_map(quantized_conv).collect()
            } else {
                Vec::new()
            };
            let others = readers.len() > direct.len();
            held[output] = Holding {
                eight: others.then_some(!after_relu),
                direct,
            };
        }
        held
    }
}

impl Reads<'_> {
    /// The 8-bit held values each `Concat` left in float joins, through ops that move codes
    /// without changing them (slices, transposes, reshapes, max-pools, other concats),
    /// merged where groups meet (ShuffleNet's blocks chain one stage into one group). A
    /// concat whose parts are not all 8-bit unit outputs of one signedness stays float.
    fn shared_ranges(&self, steps: &[Step], held: &[Holding]) -> Vec<Vec<Value>> {
        let float: Vec<bool> = {
            let mut f = vec![false; self.graph.ops.len()];
            steps.iter().for_each(|s| {
                if let Step::Float(i) = s {
                    f[*i] = true;
                }
            });
            f
        };
        let mut group: Vec<usize> = (0..held.len()).collect();
        fn root(group: &mut [usize], mut v: usize) -> usize {
            while group[v] != v {
                group[v] = group[group[v]];
                v = group[v];
            }
            v
        }
        for (i, op) in self.graph.ops.iter().enumerate() {
            if !(float[i] && matches!(op, Op::Concat { .. })) {
                continue;
            }
            let Some(parts) = self.code_sources(i + 1, held, &float) else {
                continue;
            };
            let signed: Vec<Option<bool>> = parts.iter().map(|&v| held[v].eight).collect();
            if signed.windows(2).any(|w| w[0] != w[1]) {
                continue;
            }
            for &v in &parts[1..] {
                let (a, b) = (root(&mut group, parts[0]), root(&mut group, v));
                group[b] = a;
            }
        }
        let mut by_root: HashMap<usize, Vec<Value>> = HashMap::new();
        for (v, h) in held.iter().enumerate().skip(1) {
            if h.eight.is_some() {
                by_root.entry(root(&mut group, v)).or_default().push(v);
            }
        }
        let mut shared: Vec<Vec<Value>> = by_root.into_values().filter(|g| g.len() > 1).collect();
        shared.sort();
        shared
    }

    /// The 8-bit held unit outputs value `v` is made of, through code-moving float ops;
    /// None where any part is something else (the image, a float op's result).
    fn code_sources(&self, v: Value, held: &[Holding], float: &[bool]) -> Option<Vec<Value>> {
        if v > 0 && held[v].eight.is_some() {
            return Some(vec![v]);
        }
        let i = v.checked_sub(1).filter(|&i| float[i])?;
        let op = &self.graph.ops[i];
        if !moves_codes(op) {
            return None;
        }
        let mut all = Vec::new();
        for x in op.inputs() {
            all.extend(self.code_sources(x, held, float)?);
        }
        Some(all)
    }
}

/// Whether `op` only moves (or picks among) its inputs' elements: a slice, transpose, reshape,
/// max-pool or concat, which computes the same on 8-bit codes as on their values when its
/// inputs share one scale ([`Plan::shared`]; the integer exporter writes it on uint8 codes).
pub fn moves_codes(op: &Op) -> bool {
    matches!(
        op,
        Op::Slice { .. }
            | Op::Transpose { .. }
            | Op::Reshape { .. }
            | Op::MaxPool { .. }
            | Op::Concat { .. }
    )
}

impl Plan {
    /// Plans `graph` for the quantized layers `bits` (others stay float); fails on a graph
    /// shape the integer form does not cover (a conv without batch norm).
    pub fn new(
        graph: &Graph,
        specs: &[ConvSpec],
        bits: &HashMap<String, (u32, u32)>,
    ) -> Result<Self, QuantError> {
        let qbits: HashMap<String, (u32, u32, bool)> = specs
            .iter()
            .filter(|s| s.quantizable)
            .filter_map(|s| {
                bits.get(&s.name)
                    .map(|&(w, a)| (s.name.clone(), (w, a, s.signed_input)))
            })
            .collect();
        let reads = Reads::new(graph);
        let steps = reads.units()?;
        let mut held = reads.holdings(&steps, &qbits);
        // The image's readers (through a TF "SAME" stem's padding).
        let stem: Vec<String> = reads
            .readers(0)
            .into_iter()
            .filter_map(|r| match &graph.ops[r] {
                Op::Conv { layer, .. } if !qbits.contains_key(layer) => Some(layer.clone()),
                _ => None,
            })
            .collect();
        if !stem.is_empty() {
            held[0] = Holding {
                eight: Some(true),
                direct: Vec::new(),
            };
        }
        // Depthwise convs follow the rule too, though ONNX Runtime's integer depthwise kernel
        // sums in int32 (`export::saturation` does not flag them): exempting them moved
        // EfficientNet-Lite0's calibrated w8a8 agreement with float from 16 to 15 of 20 images.
        let kernels = qbits
            .iter()
            .map(|(l, &(w, a, signed))| {
                let bits = kernel_weight_bits(w, input_code_max(a, signed));
                (l.clone(), bits)
            })
            .chain(stem.iter().map(|l| {
                let bits = kernel_weight_bits(STEM_BITS, input_code_max(8, true));
                (l.clone(), bits)
            }))
            .collect();
        let shared = reads.shared_ranges(&steps, &held);
        Ok(Self {
            shared,
            steps,
            held,
            bits: qbits,
            stem,
            kernels,
        })
    }

    /// The weight bits `layer`'s integer kernel holds ([`kernel_weight_bits`]): a quantized
    /// layer's policy bits or the stem's [`STEM_BITS`], lowered where its input codes could
    /// saturate a pair sum. `None` for a float conv.
    pub fn kernel_bits(&self, layer: &str) -> Option<u32> {
        self.kernels.get(layer).copied()
    }

    /// Whether a unit's post ops end in a ReLU6 (its quantization must not pass 6).
    pub fn has_relu6(graph: &Graph, post: &[usize]) -> bool {
        post.iter()
            .any(|&p| matches!(graph.ops[p], Op::Relu6 { .. }))
    }
}

/// A unit's conv with what follows it folded in: its batch norm ([`fold`]), its bias as it
/// is, or no bias.
pub fn fold_unit(weight: &Tensor, graph: &Graph, unit: &ConvUnit) -> Folded {
    let channels = weight.size()[0];
    let ones = || Tensor::ones([channels, 1, 1, 1], (weight.kind(), weight.device()));
    match unit.bn.map(|j| &graph.ops[j]) {
        Some(Op::BatchNorm { params, .. }) => fold(weight, params),
        Some(Op::Bias { bias, .. }) => Folded {
            weight: weight.shallow_clone(),
            bias: bias.shallow_clone(),
            gain: ones(),
        },
        _ => Folded {
            weight: weight.shallow_clone(),
            bias: Tensor::zeros([channels], (weight.kind(), weight.device())),
            gain: ones(),
        },
    }
}
