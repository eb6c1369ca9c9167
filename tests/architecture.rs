//! The library's layout is its architecture: no import circle between its top-level modules.
//! Every `crate::MODULE` path in a module's files (comments and unit tests left out) is an
//! edge; the graph must have no cycle, so each module can be read with only those below it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The code of a file without comments and without its `#[cfg(test)] mod tests`.
fn code(text: &str) -> String {
    let text = text
        .split("#[cfg(test)]\nmod tests")
        .next()
        .unwrap_or_default();
    text.lines()
        .map(|l| l.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Top-level module → the top-level modules its files name through `crate::`.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        let text = code(&std::fs::read_to_string(f).unwrap());
        let deps = graph.entry(module.clone()).or_default();
        for (i, _) in text.match_indices("crate::") {
            let name: String = text[i + 7..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && name != module {
                deps.insert(name);
            }
        }
    }
    let known: BTreeSet<String> = graph.keys().cloned().collect();
    for deps in graph.values_mut() {
        deps.retain(|d| known.contains(d));
    }
    graph
}

/// A cycle through `start`, if any (depth-first).
fn cycle_from(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    fn walk(
        graph: &BTreeMap<String, BTreeSet<String>>,
        start: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        let here = path.last().unwrap().clone();
        for next in &graph[&here] {
            if next == start {
                path.push(next.clone());
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(graph, start, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_string()];
    walk(graph, start, &mut path, &mut BTreeSet::new()).then_some(path)
}

#[test]
fn no_import_circle_between_modules() {
    let graph = module_graph();
    assert!(
        graph.len() > 15 && graph["pipeline"].contains("search"),
        "the scan found the modules: {graph:?}"
    );
    for module in graph.keys() {
        if let Some(cycle) = cycle_from(&graph, module) {
            panic!("import circle: {}", cycle.join(" → "));
        }
    }
}

/// The check finds a circle where there is one.
#[test]
fn a_circle_is_found() {
    let mut graph = module_graph();
    graph.get_mut("policy").unwrap().insert("search".into());
    let cycle = cycle_from(&graph, "policy").expect("policy → search → policy");
    assert_eq!(cycle.first(), cycle.last());
}

/// The CLI's files → the sibling files each names through `super::` (`mod` for an item of
/// `cli/mod.rs`, which declares and re-exports every sibling).
fn cli_file_graph() -> BTreeMap<String, BTreeSet<String>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/cli");
    let mut files = Vec::new();
    rust_files(&dir, &mut files);
    let stems: BTreeSet<String> = files
        .iter()
        .map(|f| f.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let stem = f.file_stem().unwrap().to_string_lossy().into_owned();
        let text = code(&std::fs::read_to_string(f).unwrap());
        let deps = graph.entry(stem.clone()).or_default();
        if stem == "mod" {
            deps.extend(stems.iter().filter(|s| *s != "mod").cloned());
            continue;
        }
        // A test module's `use super::…` names its own file.
        let text = text.split("#[cfg(test)]").next().unwrap_or_default();
        for (i, _) in text.match_indices("super::") {
            let name: String = text[i + 7..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if name.is_empty() {
                continue; // `super::{…}`: read below
            }
            deps.insert(if stems.contains(&name) {
                name
            } else {
                "mod".into()
            });
        }
        for (i, _) in text.match_indices("super::{") {
            let list: String = text[i + 8..].chars().take_while(|c| *c != '}').collect();
            for name in list
                .split(',')
                .map(|n| n.trim().split("::").next().unwrap_or(""))
            {
                if !name.is_empty() {
                    let name = name.to_string();
                    deps.insert(if stems.contains(&name) {
                        name
                    } else {
                        "mod".into()
                    });
                }
            }
        }
        deps.remove(&stem);
    }
    graph
}

/// The CLI's files use each other in one direction: commands → the printing files → args.
#[test]
fn no_import_circle_between_the_cli_files() {
    let graph = cli_file_graph();
    assert!(
        graph.len() >= 5 && graph["commands"].contains("args"),
        "the scan found the files: {graph:?}"
    );
    for file in graph.keys() {
        if let Some(cycle) = cycle_from(&graph, file) {
            panic!("import circle in src/cli: {}", cycle.join(" → "));
        }
    }
}

/// Each function's length in lines (signature to closing brace), from its file's text.
fn function_lengths(text: &str) -> Vec<(String, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let head = [
            "pub fn ",
            "fn ",
            "pub(crate) fn ",
            "pub(super) fn ",
            "const fn ",
        ]
        .iter()
        .find_map(|p| trimmed.strip_prefix(p));
        let Some(rest) = head else {
            i += 1;
            continue;
        };
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        // The body opens on the signature's last line; a declaration without one is skipped.
        let Some(open) = (i..lines.len()).find(|&j| {
            let l = lines[j].trim_end();
            l.ends_with('{') || l.ends_with(';')
        }) else {
            break;
        };
        if lines[open].trim_end().ends_with(';') {
            i = open + 1;
            continue;
        }
        let close = (open + 1..lines.len())
            .find(|&j| {
                let l = lines[j];
                l.len() > indent && l[..indent].trim().is_empty() && l[indent..].starts_with('}')
            })
            .unwrap_or(lines.len() - 1);
        out.push((name, close - i + 1));
        i = close + 1;
    }
    out
}

/// The sizes the layout keeps: no function over 120 lines, no file over 800, the CLI
/// under 1,200 lines in all.
#[test]
fn functions_files_and_the_cli_stay_small() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut cli_lines = 0;
    let mut problems = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let lines = text.lines().count();
        let rel = f.strip_prefix(&src).unwrap().display().to_string();
        if rel.starts_with("cli") {
            cli_lines += lines;
        }
        if lines > 800 {
            problems.push(format!("{rel}: {lines} lines"));
        }
        for (name, n) in function_lengths(&text) {
            if n > 120 {
                problems.push(format!("{rel}: fn {name} is {n} lines"));
            }
        }
    }
    if cli_lines >= 1200 {
        problems.push(format!("src/cli: {cli_lines} lines"));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // The scanner measures what it is given.
    let long = format!("fn f() {{\n{}}}\n", "    x();\n".repeat(130));
    assert_eq!(function_lengths(&long), vec![("f".to_string(), 132)]);
}
