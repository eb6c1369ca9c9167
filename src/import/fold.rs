//! Constant folding: a node whose inputs are all constant (shape arithmetic such as
//! ShuffleNet's `Shape → Gather → Div → Mul → Slice`) is computed at import, in libtorch, and
//! becomes a constant. Integer arithmetic stays int64 with ONNX's truncating division.

use super::proto::{float, guarded, ints, refuse, Attrs, OnnxImportError};
use onnx_protobuf::NodeProto;
use tch::{Kind, Tensor};

/// The constant `op` computes from the constants `c` (absent optional inputs are `None`).
pub(super) fn fold(
    node: &NodeProto,
    op: &str,
    a: &Attrs,
    c: &[Option<Tensor>],
) -> Result<Tensor, OnnxImportError> {
    let arg = |i: usize| {
        c.get(i)
            .and_then(|t| t.as_ref())
            .ok_or_else(|| refuse(node, format!("input {i} is missing")))
    };
    let x = arg(0)?;
    guarded(node, || -> Result<Tensor, OnnxImportError> {
        Ok(match op {
            "Identity" | "Dropout" => x.shallow_clone(),
            "Cast" => match a.int("to").unwrap_or(1) {
                1 | 10 | 11 => float(x),
                6 | 7 | 9 => x.to_kind(Kind::Int64),
                to => return Err(refuse(node, format!("casts to ONNX type {to}"))),
            },
            "Add" | "Sub" | "Mul" | "Div" => arithmetic(op, x, arg(1)?),
            "Gather" => gather(x, arg(1)?, a.int("axis").unwrap_or(0)),
            "Unsqueeze" | "Squeeze" => {
                let axes = a
                    .ints("axes")
                    .or_else(|| c.get(1).and_then(|t| t.as_ref()).map(ints));
                squeeze(node, op, x, axes)?
            }
            "Concat" => {
                let all: Vec<Tensor> = c.iter().flatten().map(|t| t.shallow_clone()).collect();
                let all: Vec<Tensor> = if all.iter().all(is_int) {
                    all
                } else {
                    all.iter().map(float).collect()
                };
                let rank = all.first().map(|t| t.dim() as i64).unwrap_or(1);
                let axis = a.int("axis").unwrap_or(0);
                Tensor::cat(&all, if axis < 0 { axis + rank } else { axis })
            }
            "Reshape" => {
                let shape: Vec<i64> = ints(arg(1)?)
                    .iter()
                    .enumerate()
                    .map(|(i, &d)| match d {
                        0 => x.size().get(i).copied().unwrap_or(0),
                        d => d,
                    })
                    .collect();
                x.reshape(shape)
            }
            "Slice" => {
                let (starts, ends) = (ints(arg(1)?), ints(arg(2)?));
                let axes = c
                    .get(3)
                    .and_then(|t| t.as_ref())
                    .map(ints)
                    .unwrap_or_else(|| (0..starts.len() as i64).collect());
                slice(x, &starts, &ends, &axes)
            }
            other => {
                return Err(refuse(
                    node,
                    format!("{other} of constants is not supported"),
                ))
            }
        })
    })?
}

fn is_int(t: &Tensor) -> bool {
    t.kind() == Kind::Int64
}

/// Elementwise arithmetic: int64 when both are integers (division truncates, as ONNX's
/// does), else float32.
fn arithmetic(op: &str, x: &Tensor, y: &Tensor) -> Tensor {
    let (x, y) = if is_int(x) && is_int(y) {
        (x.shallow_clone(), y.shallow_clone())
    } else {
        (float(x), float(y))
    };
    match op {
        "Add" => &x + &y,
        "Sub" => &x - &y,
        "Mul" => &x * &y,
        _ if is_int(&x) => x.divide_tensor_mode(&y, "trunc"),
        _ => &x / &y,
    }
}

/// `Gather`: the indices' entries along `axis` (negative indices count from the end).
fn gather(x: &Tensor, idx: &Tensor, axis: i64) -> Tensor {
    let rank = x.dim() as i64;
    let axis = if axis < 0 { axis + rank } else { axis };
    let len = x.size().get(axis as usize).copied().unwrap_or(0);
    let flat: Vec<i64> = ints(idx)
        .into_iter()
        .map(|i| if i < 0 { i + len } else { i })
        .collect();
    let picked = x.index_select(axis, &Tensor::from_slice(&flat));
    let mut shape = x.size()[..axis as usize].to_vec();
    shape.extend(idx.size());
    shape.extend(&x.size()[axis as usize + 1..]);
    picked.reshape(shape)
}

fn squeeze(
    node: &NodeProto,
    op: &str,
    x: &Tensor,
    axes: Option<Vec<i64>>,
) -> Result<Tensor, OnnxImportError> {
    let unsqueeze = op == "Unsqueeze";
    let Some(mut axes) = axes else {
        return match unsqueeze {
            true => Err(refuse(node, "Unsqueeze without axes")),
            false => Ok(x.squeeze()),
        };
    };
    // Unsqueeze's axes index the output, Squeeze's the input.
    let rank = x.dim() as i64 + if unsqueeze { axes.len() as i64 } else { 0 };
    for ax in axes.iter_mut() {
        if *ax < 0 {
            *ax += rank;
        }
    }
    axes.sort_unstable();
    let mut t = x.shallow_clone();
    if unsqueeze {
        for &ax in &axes {
            t = t.unsqueeze(ax);
        }
    } else {
        for &ax in axes.iter().rev() {
            t = t.squeeze_dim(ax);
        }
    }
    Ok(t)
}

/// `Slice` with step 1, ends clamped as ONNX clamps them.
fn slice(x: &Tensor, starts: &[i64], ends: &[i64], axes: &[i64]) -> Tensor {
    let mut t = x.shallow_clone();
    for ((s, e), ax) in starts.iter().zip(ends).zip(axes) {
        let ax = if *ax < 0 { ax + t.dim() as i64 } else { *ax };
        let len = t.size()[ax as usize];
        let fix = |i: i64| (if i < 0 { i + len } else { i }).clamp(0, len);
        t = t.slice(ax, fix(*s), fix(*e).max(fix(*s)), 1);
    }
    t
}
