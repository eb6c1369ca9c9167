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

/// The sizes the layout keeps: no function over 120 lines, no file over 600 (split by
/// concept: a search's phases, a pipeline's stage types, an error type of its own), the CLI
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
        if lines > 600 {
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

/// A crate's files as module paths (`src/pipeline/run.rs` → `pipeline::run`, a `mod.rs` its
/// folder's path, `lib.rs` the root "") → their code (see [`code`]).
fn crate_files(src: &Path) -> BTreeMap<String, String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files
        .iter()
        .filter_map(|f| {
            let rel = f.strip_prefix(src).ok()?.with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            match parts.last().map(String::as_str) {
                Some("mod") | Some("lib") => {
                    parts.pop();
                }
                Some("main") => return None,
                _ => {}
            }
            Some((parts.join("::"), code(&std::fs::read_to_string(f).ok()?)))
        })
        .collect()
}

/// The identifiers and `::` of a text, in order (everything else dropped, braces, commas and
/// semicolons kept as one-character tokens).
fn tokens(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_alphanumeric() || c == '_' {
            let mut t = c.to_string();
            while let Some(&n) = chars.peek().filter(|n| n.is_alphanumeric() || **n == '_') {
                t.push(n);
                chars.next();
            }
            out.push(t);
        } else if c == ':' && chars.peek() == Some(&':') {
            chars.next();
            out.push("::".into());
        } else if "{},;*".contains(c) {
            out.push(c.to_string());
        } else if c == '"' {
            // Skip string literals ("crate::" in a message is no path).
            while let Some(n) = chars.next() {
                if n == '\\' {
                    chars.next();
                } else if n == '"' {
                    break;
                }
            }
        }
    }
    out
}

/// The paths of a `use` tree starting at `toks[i]` (after `use`); returns them and the index
/// after the tree.
fn use_tree(toks: &[String], mut i: usize, prefix: &[String]) -> (Vec<Vec<String>>, usize) {
    let mut path = prefix.to_vec();
    let mut out = Vec::new();
    while i < toks.len() {
        match toks[i].as_str() {
            "::" => i += 1,
            "{" => {
                i += 1;
                while i < toks.len() && toks[i] != "}" {
                    let (paths, next) = use_tree(toks, i, &path);
                    out.extend(paths);
                    i = next;
                    if toks.get(i).map(String::as_str) == Some(",") {
                        i += 1;
                    }
                }
                return (out, i + 1);
            }
            "," | "}" | ";" => break,
            "as" => i += 2,
            "*" => i += 1,
            t => {
                path.push(t.to_string());
                i += 1;
            }
        }
    }
    if path.len() > prefix.len() {
        out.push(path);
    }
    (out, i)
}

/// A path as seen from a module, made absolute (None: another crate's).
type Absolute<'a> = dyn Fn(&str, &[String]) -> Option<Vec<String>> + 'a;

/// Each file of the crate at `src` → the files whose items it names (through `crate::`,
/// `super::`, `self::` and a `mod.rs`'s `use child::…`), each name followed through `pub use`
/// re-exports to the file that defines it. A re-export itself is no edge: it only makes the
/// name visible higher up.
fn file_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let files = crate_files(src);
    let toks: BTreeMap<&str, Vec<String>> =
        files.iter().map(|(m, t)| (m.as_str(), tokens(t))).collect();
    let mut defs: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    let mut reexports: BTreeMap<&str, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut uses: BTreeMap<&str, Vec<Vec<String>>> = BTreeMap::new();
    let kinds = ["fn", "struct", "enum", "trait", "type", "const", "static"];
    for (&m, t) in &toks {
        let mut i = 0;
        while i < t.len() {
            if kinds.contains(&t[i].as_str()) && i + 1 < t.len() {
                defs.entry(m).or_default().insert(t[i + 1].clone());
            }
            if t[i] == "use" {
                let public =
                    i > 0 && (t[i - 1] == "pub" || t[i - 1] == "crate" || t[i - 1] == "super");
                let (paths, next) = use_tree(t, i + 1, &[]);
                for p in paths {
                    if public {
                        reexports
                            .entry(m)
                            .or_default()
                            .insert(p.last().unwrap().clone(), p);
                    } else {
                        uses.entry(m).or_default().push(p);
                    }
                }
                i = next;
                continue;
            }
            if ["crate", "super", "self"].contains(&t[i].as_str())
                && t.get(i + 1).map(String::as_str) == Some("::")
                && (i == 0 || t[i - 1] != "::")
            {
                let mut p = vec![t[i].clone()];
                let mut j = i + 1;
                while t.get(j).map(String::as_str) == Some("::")
                    && t.get(j + 1)
                        .is_some_and(|s| s.chars().all(|c| c.is_alphanumeric() || c == '_'))
                {
                    p.push(t[j + 1].clone());
                    j += 2;
                }
                uses.entry(m).or_default().push(p);
                i = j;
                continue;
            }
            i += 1;
        }
    }
    let join = |v: &[String]| v.join("::");
    // A path as seen from module `m`, made absolute (None: another crate's).
    let absolute = |m: &str, p: &[String]| -> Option<Vec<String>> {
        let mut base: Vec<String> = if m.is_empty() {
            Vec::new()
        } else {
            m.split("::").map(String::from).collect()
        };
        match p[0].as_str() {
            "crate" => Some(p[1..].to_vec()),
            "super" | "self" => {
                let mut i = 0;
                while i < p.len() && (p[i] == "super" || p[i] == "self") {
                    if p[i] == "super" {
                        base.pop();
                    }
                    i += 1;
                }
                base.extend(p[i..].iter().cloned());
                Some(base)
            }
            first => {
                base.push(first.to_string());
                files.contains_key(&join(&base)).then(|| {
                    base.extend(p[1..].iter().cloned());
                    base
                })
            }
        }
    };
    // The file that defines what an absolute path names.
    fn defining(
        p: &[String],
        files: &BTreeMap<String, String>,
        defs: &BTreeMap<&str, BTreeSet<String>>,
        reexports: &BTreeMap<&str, BTreeMap<String, Vec<String>>>,
        absolute: &Absolute,
        depth: usize,
    ) -> String {
        let mut module: Vec<String> = Vec::new();
        for s in p {
            let mut child = module.clone();
            child.push(s.clone());
            if files.contains_key(&child.join("::")) {
                module = child;
                continue;
            }
            let m = module.join("::");
            if depth < 16 && !defs.get(m.as_str()).is_some_and(|d| d.contains(s)) {
                if let Some(target) = reexports
                    .get(m.as_str())
                    .and_then(|r| r.get(s))
                    .and_then(|r| absolute(&m, r))
                {
                    return defining(&target, files, defs, reexports, absolute, depth + 1);
                }
            }
            return m;
        }
        module.join("::")
    }
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for m in files.keys() {
        let deps = graph.entry(m.clone()).or_default();
        for p in uses.get(m.as_str()).into_iter().flatten() {
            if let Some(a) = absolute(m, p) {
                let d = defining(&a, &files, &defs, &reexports, &absolute, 0);
                if &d != m && files.contains_key(&d) {
                    deps.insert(d);
                }
            }
        }
    }
    graph
}

/// No two files of `src/` use each other, directly or around a loop: each file reads with only
/// the files below it. Re-exports are followed (a `use super::X` of an item `mod.rs`
/// re-exports from a sibling is an edge to that sibling).
#[test]
fn no_import_circle_between_files() {
    let graph = file_graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(
        graph.len() > 80 && graph["pipeline::run"].contains("pipeline::stage"),
        "the scan found the files: {:?}",
        graph.keys().collect::<Vec<_>>()
    );
    let mut cycles = Vec::new();
    for file in graph.keys() {
        if let Some(cycle) = cycle_from(&graph, file) {
            cycles.push(cycle.join(" → "));
        }
    }
    assert!(
        cycles.is_empty(),
        "import circles between files:\n{}",
        cycles.join("\n")
    );
}

/// The file check finds a loop planted through a re-export, and none without it.
#[test]
fn a_file_circle_through_a_re_export_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    write("lib.rs", "pub mod m;\n");
    write(
        "m/mod.rs",
        "mod a;\nmod b;\npub use a::Alpha;\npub use b::beta;\n",
    );
    write("m/a.rs", "pub struct Alpha;\n");
    write("m/b.rs", "use super::Alpha;\npub fn beta(_: Alpha) {}\n");
    let clean = file_graph(dir.path());
    assert_eq!(
        clean["m::b"],
        BTreeSet::from(["m::a".to_string()]),
        "{clean:?}"
    );
    assert!(
        clean.keys().all(|f| cycle_from(&clean, f).is_none()),
        "{clean:?}"
    );
    write(
        "m/a.rs",
        "pub struct Alpha;\nfn uses() { super::beta(Alpha) }\n",
    );
    let looped = file_graph(dir.path());
    let cycle = cycle_from(&looped, "m::a").expect("m::a → m::b → m::a");
    assert_eq!(cycle.first(), cycle.last());
}
