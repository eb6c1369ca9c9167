//! Var-store names for imported layers and tensors.

use onnx_protobuf::NodeProto;
use std::collections::HashSet;

/// Var-store names: made of `[A-Za-z0-9_]` parts joined by dots, unique.
#[derive(Default)]
pub(super) struct Names {
    used: HashSet<String>,
}

impl Names {
    /// A module name for `node`: its weight initializer's name without `.weight` where the
    /// exporter kept the module's name (`layer1.0.conv1.weight`), else the node's scope path
    /// (`/layer1/layer1.0/conv1/Conv` → `layer1.0.conv1`), else the op type and a count.
    pub(super) fn module(
        &mut self,
        node: &NodeProto,
        weight: Option<&str>,
        fallback: &str,
    ) -> String {
        let from_weight = weight.and_then(|w| {
            let w = w.trim_end_matches(|c: char| c.is_ascii_digit());
            let w = w.strip_suffix('.').unwrap_or(w);
            w.strip_suffix(".weight")
                .filter(|p| !p.contains("::"))
                .map(str::to_string)
        });
        let from_scope = || {
            let parts: Vec<&str> = node.name.trim_start_matches('/').split('/').collect();
            if parts.len() < 2 {
                return None;
            }
            let scope = &parts[..parts.len() - 1];
            let kept: Vec<&str> = scope
                .iter()
                .enumerate()
                .filter(|(i, p)| {
                    scope
                        .get(i + 1)
                        .is_none_or(|next| !next.starts_with(&format!("{p}.")))
                })
                .map(|(_, p)| *p)
                .collect();
            Some(kept.join("."))
        };
        let raw = from_weight
            .or_else(from_scope)
            .unwrap_or_else(|| fallback.to_string());
        self.unique(&raw, fallback)
    }

    pub(super) fn unique(&mut self, raw: &str, fallback: &str) -> String {
        let clean = |s: &str| -> String {
            s.split('.')
                .map(|p| {
                    p.chars()
                        .map(|c| {
                            if c.is_ascii_alphanumeric() || c == '_' {
                                c
                            } else {
                                '_'
                            }
                        })
                        .collect::<String>()
                })
                .filter(|p| !p.is_empty())
                .collect::<Vec<_>>()
                .join(".")
        };
        let mut base = clean(raw);
        if base.is_empty() {
            base = clean(fallback);
        }
        let mut name = base.clone();
        let mut n = 1;
        while !self.used.insert(name.clone()) {
            n += 1;
            name = format!("{base}_{n}");
        }
        name
    }
}
