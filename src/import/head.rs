//! Finding the classifier head in an imported graph: where attribution reads the feature
//! map, and how (CAM's weights, or the gradient).

use crate::model::graph::{Op, Value};
use crate::model::{Cam, Head, LinearSpec, TensorSpec};
use tch::Tensor;

/// The head: global average pooling (`GlobalAveragePool`, `ReduceMean` over H and W), then a
/// chain of `Flatten`/`Reshape`, linear layers and activations ending the graph.
pub(super) fn find_head(
    ops: &[Op<String>],
    output: Value,
    tensors: &[(TensorSpec, Tensor)],
) -> Result<Head, String> {
    if output != ops.len() {
        return Err("the output is not the last op's".into());
    }
    let shape = |name: &str| {
        tensors
            .iter()
            .find(|(s, _)| s.name == name)
            .map(|(s, _)| s.shape.clone())
            .unwrap_or_default()
    };
    // Back from the output along the chain, to the pooling.
    let (mut linears, mut after_last_linear) = (Vec::new(), false);
    let mut i = ops.len() - 1;
    loop {
        match &ops[i] {
            Op::Linear { weight, .. } => linears.push(weight.clone()),
            Op::Reshape { .. } => {}
            Op::Relu { .. }
            | Op::Relu6 { .. }
            | Op::Clip { .. }
            | Op::HardSwish { .. }
            | Op::Sigmoid { .. }
            | Op::HardSigmoid { .. } => after_last_linear |= linears.is_empty(),
            Op::GlobalAvgPool { .. } => break,
            Op::ReduceMean { axes, .. } if axes == &[2, 3] => break,
            other => {
                return Err(format!(
                    "{} before the output, not global average pooling then linear layers",
                    other.kind()
                ))
            }
        }
        // Each head op reads the one before it.
        let input = ops[i].inputs();
        if input != [i] || i == 0 {
            return Err(format!("{} does not read the op before it", ops[i].kind()));
        }
        i -= 1;
    }
    let features = ops[i].inputs()[0];
    if features != i {
        return Err("the pooling op does not follow the feature map directly".into());
    }
    linears.reverse();
    let widths: Vec<(usize, usize)> = linears
        .iter()
        .map(|w| {
            let s = shape(w);
            (
                s.get(1).copied().unwrap_or(0) as usize,
                s.first().copied().unwrap_or(0) as usize,
            )
        })
        .collect();
    let cam = match linears.as_slice() {
        [one] if !after_last_linear => Cam::Linear {
            weight: one.clone(),
        },
        [] if !after_last_linear => Cam::Identity,
        _ => Cam::Gradient,
    };
    let name = linears
        .last()
        .map(|w| w.strip_suffix(".weight").unwrap_or(w).to_string())
        .unwrap_or_else(|| "head".into());
    let fc = match (widths.first(), widths.last()) {
        (Some(&(i, _)), Some(&(_, o))) => LinearSpec {
            name,
            in_features: i,
            out_features: o,
            hidden: widths[..widths.len() - 1].iter().map(|w| w.1).collect(),
        },
        // No linear layer: pooling gives the classes (no MACs).
        _ => LinearSpec {
            name,
            in_features: 0,
            out_features: 0,
            hidden: Vec::new(),
        },
    };
    Ok(Head { features, fc, cam })
}
