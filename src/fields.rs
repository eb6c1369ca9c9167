//! What differs between two recorded settings, for errors a person reads: the changed fields
//! by their paths, with both values, short — never two whole structures.

use serde::Serialize;
use serde_json::Value;

/// Values longer than this are cut (a policy's α table, a list of layers).
const MAX_VALUE_CHARS: usize = 60;
/// At most this many fields are named; the rest are counted.
const MAX_FIELDS: usize = 6;

fn short(v: Option<&Value>) -> String {
    let Some(v) = v else {
        return "absent".into();
    };
    let s = v.to_string();
    if s.chars().count() <= MAX_VALUE_CHARS {
        s
    } else {
        let cut: String = s.chars().take(MAX_VALUE_CHARS).collect();
        format!("{cut}…")
    }
}

/// Appends the leaf paths where `old` and `new` differ.
fn walk(path: &str, old: Option<&Value>, new: Option<&Value>, out: &mut Vec<String>) {
    if old == new {
        return;
    }
    let join = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    match (old, new) {
        (Some(Value::Object(a)), Some(Value::Object(b))) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                walk(&join(k), a.get(k), b.get(k), out);
            }
        }
        (Some(Value::Array(a)), Some(Value::Array(b))) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                walk(&join(&i.to_string()), Some(x), Some(y), out);
            }
        }
        (Some(Value::String(a)), Some(Value::String(b))) => {
            // Long strings that differ late: show where they part.
            let common = a
                .char_indices()
                .zip(b.chars())
                .take_while(|((_, x), y)| x == y)
                .last()
                .map_or(0, |((i, x), _)| i + x.len_utf8());
            let from = a[..common]
                .char_indices()
                .rev()
                .nth(9)
                .map_or(0, |(i, _)| i);
            let tail = |s: &str| {
                let t = Value::String(s[from..].to_string());
                let t = short(Some(&t));
                if from > 0 {
                    format!("…{t}")
                } else {
                    t
                }
            };
            out.push(format!(
                "{}: was {}, now {}",
                if path.is_empty() { "value" } else { path },
                tail(a),
                tail(b)
            ));
        }
        _ => out.push(format!(
            "{}: was {}, now {}",
            if path.is_empty() { "value" } else { path },
            short(old),
            short(new)
        )),
    }
}

/// The fields where `old` and `new` differ, as `a.b: was X, now Y`, joined by `; ` (at most
/// a few named, the rest counted). Empty when they are equal.
pub fn changed_fields_of(old: &Value, new: &Value) -> String {
    let mut fields = Vec::new();
    walk("", Some(old), Some(new), &mut fields);
    let more = fields.len().saturating_sub(MAX_FIELDS);
    fields.truncate(MAX_FIELDS);
    let mut line = fields.join("; ");
    if more > 0 {
        line.push_str(&format!("; and {more} more"));
    }
    line
}

/// [`changed_fields_of`] two serializable values.
pub fn changed_fields<T: Serialize>(old: &T, new: &T) -> String {
    let to = |v: &T| serde_json::to_value(v).unwrap_or(Value::Null);
    changed_fields_of(&to(old), &to(new))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_the_changed_leaves_briefly() {
        let old = json!({"a": 1, "b": {"c": [1, 2], "d": "x"}, "long": vec![0; 100]});
        let new = json!({"a": 1, "b": {"c": [1, 3], "d": "x"}, "long": vec![1; 100], "e": true});
        let s = changed_fields_of(&old, &new);
        assert!(s.contains("b.c.1: was 2, now 3"), "{s}");
        assert!(s.contains("e: was absent, now true"), "{s}");
        assert!(s.len() < 400, "{s}");
        assert_eq!(changed_fields_of(&old, &old), "");
        let long = "x".repeat(100);
        let s = changed_fields_of(&json!(format!("{long}; a")), &json!(format!("{long}, a")));
        assert!(s.contains("; a") && s.contains(", a"), "{s}");
        let many: serde_json::Map<String, Value> =
            (0..20).map(|i| (format!("k{i}"), json!(i))).collect();
        let s = changed_fields_of(&Value::Object(many), &json!({}));
        assert!(s.ends_with("and 14 more"), "{s}");
    }
}
