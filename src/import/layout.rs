//! The op table's arms for layout and pooling: `Concat`, `Split`, `Slice`, `Transpose`,
//! `Reshape`, `Flatten`, `MaxPool`, `AveragePool`, `GlobalAveragePool`, `ReduceMean`. None may
//! touch the batch axis: gmpq runs any batch size through the graph.

use super::proto::{ints, refuse, Attrs, OnnxImportError};
use super::walk::{Val, Walk};
use crate::model::graph::{Op, Window};
use onnx_protobuf::NodeProto;

impl Walk {
    pub(super) fn rank_of(&self, node: &NodeProto) -> Result<i64, OnnxImportError> {
        let (x, _) = self.dynamic(node, 0)?;
        Ok(self.shape(x).len() as i64)
    }

    /// A non-batch axis, made positive.
    pub(super) fn axis(
        &self,
        node: &NodeProto,
        axis: i64,
        rank: i64,
    ) -> Result<i64, OnnxImportError> {
        let a = if axis < 0 { axis + rank } else { axis };
        if a <= 0 || a >= rank {
            return Err(refuse(
                node,
                format!("axis {axis} is the batch axis or outside the rank {rank}"),
            ));
        }
        Ok(a)
    }

    pub(super) fn split(
        &mut self,
        node: &NodeProto,
        a: &Attrs,
    ) -> Result<Vec<Val>, OnnxImportError> {
        let (x, nonneg) = self.dynamic(node, 0)?;
        let rank = self.shape(x).len() as i64;
        let axis = self.axis(node, a.int("axis").unwrap_or(0), rank)?;
        let len = self.shape(x)[axis as usize];
        let parts = node.output.len() as i64;
        let sizes = match (a.ints("split"), self.constant(node, 1, "split")?) {
            (Some(s), _) => s,
            (None, Some(t)) => ints(&t),
            (None, None) if parts > 0 => {
                let each = (len + parts - 1) / parts;
                (0..parts)
                    .map(|i| each.min(len - i * each).max(0))
                    .collect()
            }
            _ => return Err(refuse(node, "splits into no outputs")),
        };
        if sizes.len() as i64 != parts
            || sizes.iter().sum::<i64>() != len
            || sizes.iter().any(|&s| s < 0)
        {
            return Err(refuse(
                node,
                format!("sizes {sizes:?} do not split {len} into {parts}"),
            ));
        }
        let (mut start, mut outputs) = (0, Vec::new());
        for size in sizes {
            let v = self.push(
                node,
                Op::Slice {
                    input: x,
                    axis,
                    start,
                    end: start + size,
                },
                nonneg,
            )?;
            outputs.push(v);
            start += size;
        }
        Ok(outputs)
    }

    pub(super) fn slice(&mut self, node: &NodeProto, a: &Attrs) -> Result<Val, OnnxImportError> {
        let (x, nonneg) = self.dynamic(node, 0)?;
        let list = |i: usize, attr: &str| -> Result<Option<Vec<i64>>, OnnxImportError> {
            Ok(match self.constant(node, i, attr)? {
                Some(t) => Some(ints(&t)),
                None => a.ints(attr),
            })
        };
        let starts = list(1, "starts")?.ok_or_else(|| refuse(node, "has no starts"))?;
        let ends = list(2, "ends")?.ok_or_else(|| refuse(node, "has no ends"))?;
        let axes = list(3, "axes")?.unwrap_or_else(|| (0..starts.len() as i64).collect());
        let steps = list(4, "steps")?.unwrap_or_else(|| vec![1; starts.len()]);
        if steps.iter().any(|&s| s != 1) {
            return Err(refuse(
                node,
                format!("steps {steps:?}; gmpq slices with step 1"),
            ));
        }
        if ends.len() != starts.len() || axes.len() != starts.len() {
            return Err(refuse(node, "starts, ends and axes differ in length"));
        }
        let mut value = x;
        for ((&s, &e), &ax) in starts.iter().zip(&ends).zip(&axes) {
            let shape = self.shape(value);
            let rank = shape.len() as i64;
            let axis_raw = if ax < 0 { ax + rank } else { ax };
            let len = shape.get(axis_raw.max(0) as usize).copied().unwrap_or(0);
            let fix = |i: i64| (if i < 0 { i + len } else { i }).clamp(0, len);
            let (start, end) = (fix(s), fix(e).max(fix(s)));
            if axis_raw == 0 && start == 0 && end == len {
                continue; // the whole batch: no op
            }
            let axis = self.axis(node, ax, rank)?;
            let op = Op::Slice {
                input: value,
                axis,
                start,
                end,
            };
            value = self.push_value(node, op)?;
        }
        Ok(Val::Dyn { value, nonneg })
    }

    pub(super) fn reshape(&mut self, node: &NodeProto, a: &Attrs) -> Result<Val, OnnxImportError> {
        let (x, nonneg) = self.dynamic(node, 0)?;
        let target = self
            .constant(node, 1, "shape")?
            .map(|t| ints(&t))
            .ok_or_else(|| refuse(node, "has no shape"))?;
        let in_shape = self.shape(x);
        let allow_zero = a.int("allowzero").unwrap_or(0) != 0;
        let per_sample: i64 = in_shape[1..].iter().product();
        let Some((&first, rest)) = target.split_first() else {
            return Err(refuse(node, "reshapes to a scalar"));
        };
        let rest: Vec<i64> = rest
            .iter()
            .enumerate()
            .map(|(i, &d)| {
                if d == 0 && !allow_zero {
                    in_shape.get(i + 1).copied().unwrap_or(0)
                } else {
                    d
                }
            })
            .collect();
        let known: i64 = rest.iter().filter(|&&d| d != -1).product();
        let free = rest.iter().filter(|&&d| d == -1).count();
        let keeps_batch = (first == 0 && !allow_zero) || first == self.batch || first == -1;
        let fits = match free {
            0 => known == per_sample,
            1 => known > 0 && per_sample % known == 0,
            _ => false,
        };
        if !keeps_batch || !fits || (first == -1 && free > 0) {
            return Err(refuse(
                node,
                format!("reshapes {in_shape:?} to {target:?}, which changes the batch axis"),
            ));
        }
        let v = self.push(
            node,
            Op::Reshape {
                input: x,
                shape: rest,
            },
            nonneg,
        )?;
        Ok(v)
    }

    pub(super) fn pool(
        &mut self,
        node: &NodeProto,
        op: &str,
        a: &Attrs,
    ) -> Result<Val, OnnxImportError> {
        let (x, nonneg) = self.dynamic(node, 0)?;
        if node.output.len() > 1 {
            return Err(refuse(node, "returns indices"));
        }
        let kernel = a.ints("kernel_shape").unwrap_or_default();
        let strides = a.ints("strides").unwrap_or(vec![1, 1]);
        let pads = match a.string("auto_pad").as_deref() {
            None | Some("NOTSET") => a.ints("pads").unwrap_or(vec![0; 4]),
            Some("VALID") => vec![0; 4],
            Some(other) => return Err(refuse(node, format!("auto_pad {other}"))),
        };
        let square = |v: &[i64], n: usize| v.len() == n && v.iter().all(|&x| x == v[0]);
        if !square(&kernel, 2) || !square(&strides, 2) || !square(&pads, 4) {
            return Err(refuse(node, format!("kernel {kernel:?}, strides {strides:?}, pads {pads:?}: gmpq pools square windows with equal padding")));
        }
        if a.ints("dilations")
            .is_some_and(|d| d.iter().any(|&d| d != 1))
        {
            return Err(refuse(node, "dilated pooling is not supported"));
        }
        let window = Window {
            kernel: kernel[0],
            stride: strides[0],
            padding: pads[0],
            ceil: a.int("ceil_mode").unwrap_or(0) != 0,
        };
        let op = if op == "MaxPool" {
            Op::MaxPool {
                input: x,
                kernel: window.kernel,
                stride: window.stride,
                padding: window.padding,
                ceil: window.ceil,
            }
        } else {
            Op::AvgPool {
                input: x,
                window,
                count_pad: a.int("count_include_pad").unwrap_or(0) != 0,
            }
        };
        let v = self.push(node, op, nonneg)?;
        Ok(v)
    }

    pub(super) fn concat(&mut self, node: &NodeProto, a: &Attrs) -> Result<Val, OnnxImportError> {
        let rank = self.rank_of(node)?;
        let axis = self.axis(node, a.int("axis").unwrap_or(0), rank)?;
        let (mut inputs, mut nonneg) = (Vec::new(), true);
        for i in 0..node.input.len() {
            let (v, n) = self.dynamic(node, i)?;
            inputs.push(v);
            nonneg &= n;
        }
        self.push(node, Op::Concat { inputs, axis }, nonneg)
    }

    pub(super) fn transpose(
        &mut self,
        node: &NodeProto,
        a: &Attrs,
    ) -> Result<Val, OnnxImportError> {
        let (x, nonneg) = self.dynamic(node, 0)?;
        let rank = self.shape(x).len() as i64;
        let perm = a.ints("perm").unwrap_or_else(|| (0..rank).rev().collect());
        if perm.first() != Some(&0) {
            return Err(refuse(node, "moves the batch axis"));
        }
        self.push(node, Op::Transpose { input: x, perm }, nonneg)
    }

    pub(super) fn flatten(&mut self, node: &NodeProto, a: &Attrs) -> Result<Val, OnnxImportError> {
        let (x, nonneg) = self.dynamic(node, 0)?;
        if a.int("axis").unwrap_or(1) != 1 {
            return Err(refuse(node, "flattens other than from axis 1"));
        }
        let op = Op::Reshape {
            input: x,
            shape: vec![-1],
        };
        self.push(node, op, nonneg)
    }

    /// `GlobalAveragePool` (the mean over H and W, kept) and `ReduceMean`.
    pub(super) fn reduce_mean(
        &mut self,
        node: &NodeProto,
        op: &str,
        a: &Attrs,
    ) -> Result<Val, OnnxImportError> {
        let (x, nonneg) = self.dynamic(node, 0)?;
        let rank = self.shape(x).len() as i64;
        let axes = match (op, a.ints("axes")) {
            ("GlobalAveragePool", _) => (2..rank).collect(),
            (_, Some(axes)) => axes,
            _ => self
                .constant(node, 1, "axes")?
                .map(|t| ints(&t))
                .unwrap_or_default(),
        };
        if axes.is_empty() {
            return Err(refuse(node, "reduces every axis, the batch axis too"));
        }
        let mut axes = axes
            .into_iter()
            .map(|ax| self.axis(node, ax, rank))
            .collect::<Result<Vec<_>, _>>()?;
        axes.sort_unstable();
        let keep_dims = op == "GlobalAveragePool" || a.int("keepdims").unwrap_or(1) != 0;
        let op = Op::ReduceMean {
            input: x,
            axes,
            keep_dims,
        };
        self.push(node, op, nonneg)
    }
}
