//! The module order of `tributary-broker`, declared in ARCHITECTURE.md ("Module order") and
//! checked here on the sources, as rust-analyzer's tidy tests do: every path a file names
//! through `crate::`, `super::` or `self::` is resolved to the module it reaches, and a module
//! may use only modules declared on a lower line of its scope. The test names the file and
//! line of each edge the order does not allow, and every module missing from the order.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// One scope of the order: the module whose children are ordered (`[]` for the crate root) and
/// the children's layers, highest first.
#[derive(Debug)]
struct Scope {
    path: Vec<String>,
    layers: Vec<Vec<String>>,
}

impl Scope {
    fn layer_of(&self, child: &str) -> Option<usize> {
        self.layers.iter().position(|l| l.iter().any(|m| m == child))
    }
}

/// Reads the ```dag block of ARCHITECTURE.md: a line `crate:` or `crate::a::b:` opens a scope,
/// each indented line after it is one layer (space-separated module names), highest first.
fn declared_order(architecture: &str) -> Vec<Scope> {
    let block = architecture
        .split("```dag\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("ARCHITECTURE.md has a ```dag block");
    let mut scopes: Vec<Scope> = Vec::new();
    for line in block.lines() {
        let line = line.split('#').next().unwrap_or_default();
        if line.trim().is_empty() {
            continue;
        }
        if !line.starts_with(' ') {
            let name = line.trim().strip_suffix(':').expect("a scope line ends with ':'");
            let path = name.split("::").skip(1).map(str::to_string).collect();
            scopes.push(Scope { path, layers: Vec::new() });
        } else {
            let scope = scopes.last_mut().expect("a layer belongs to a scope");
            scope.layers.push(line.split_whitespace().map(str::to_string).collect());
        }
    }
    scopes
}

/// The source with comments, string and character literals blanked out (newlines kept, so
/// positions keep their line numbers).
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let blank = |out: &mut Vec<u8>, s: &[u8]| out.extend(s.iter().map(|&c| if c == b'\n' { b'\n' } else { b' ' }));
    while i < b.len() {
        let rest = &b[i..];
        let end = if rest.starts_with(b"//") {
            rest.iter().position(|&c| c == b'\n').unwrap_or(rest.len())
        } else if rest.starts_with(b"/*") {
            rest.windows(2).position(|w| w == b"*/").map_or(rest.len(), |p| p + 2)
        } else if rest.starts_with(b"r#\"") || rest.starts_with(b"r\"") {
            let hashes = rest[1..].iter().take_while(|&&c| c == b'#').count();
            let mut close = vec![b'"'];
            close.extend(std::iter::repeat_n(b'#', hashes));
            let start = 2 + hashes;
            rest[start..]
                .windows(close.len())
                .position(|w| w == close.as_slice())
                .map_or(rest.len(), |p| start + p + close.len())
        } else if rest[0] == b'"' && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')) {
            let mut j = 1;
            while j < rest.len() && rest[j] != b'"' {
                j += if rest[j] == b'\\' { 2 } else { 1 };
            }
            (j + 1).min(rest.len())
        } else if rest[0] == b'\'' && rest.len() > 2 && (rest[2] == b'\'' || (rest[1] == b'\\' && rest.len() > 3)) {
            // A character literal ('{', '\n', '\''); lifetimes ('a) have no closing quote.
            let close = rest[2..].iter().position(|&c| c == b'\'').map_or(1, |p| p + 3);
            if rest[1] == b'\\' || close == 3 {
                close
            } else {
                1
            }
        } else {
            1
        };
        if end == 1 && !matches!(rest[0], b'"' | b'\'') {
            out.push(rest[0]);
        } else {
            blank(&mut out, &rest[..end]);
        }
        i += end;
    }
    String::from_utf8(out).expect("blanking keeps UTF-8 (only ASCII replaced)")
}

/// Module path of a source file: `src/a/b.rs` and `src/a/b/mod.rs` are `[a, b]`, `src/lib.rs` is `[]`.
fn file_module(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).expect("file under src");
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let last = parts.pop().expect("a file name");
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        parts.push(stem.to_string());
    }
    parts
}

/// An edge found in a file: the line and the module path it reaches (as far as it names modules).
#[derive(Debug)]
struct Use {
    line: usize,
    target: Vec<String>,
}

fn ident_at(code: &[u8], mut i: usize) -> (String, usize) {
    let start = i;
    while i < code.len() && (code[i].is_ascii_alphanumeric() || code[i] == b'_') {
        i += 1;
    }
    (String::from_utf8_lossy(&code[start..i]).into_owned(), i)
}

/// Every `crate::`/`super::`/`self::` path in `code`, resolved from the module `module` (inline
/// `mod x { ... }` blocks are followed, so `super::` inside `mod tests` is the file's module).
fn uses(code: &str, module: &[String]) -> Vec<Use> {
    let b = code.as_bytes();
    let mut found = Vec::new();
    let mut depth = 0usize;
    // Inline modules open: (name, brace depth inside it).
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut pending_mod: Option<String> = None;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'{' {
            depth += 1;
            if let Some(name) = pending_mod.take() {
                inline.push((name, depth));
            }
            i += 1;
            continue;
        }
        if c == b'}' {
            if inline.last().is_some_and(|(_, d)| *d == depth) {
                inline.pop();
            }
            depth = depth.saturating_sub(1);
            i += 1;
            continue;
        }
        if c == b';' {
            pending_mod = None;
        }
        let boundary =
            i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_' || b[i - 1] == b'$' || b[i - 1] == b':');
        if !(c.is_ascii_alphabetic() || c == b'_') || !boundary {
            i += 1;
            continue;
        }
        let (word, after) = ident_at(b, i);
        if word == "mod" {
            let mut j = after;
            while j < b.len() && b[j].is_ascii_whitespace() {
                j += 1;
            }
            let (name, _) = ident_at(b, j);
            pending_mod = Some(name);
            i = after;
            continue;
        }
        if !matches!(word.as_str(), "crate" | "super" | "self") || !b[after..].starts_with(b"::") {
            i = after;
            continue;
        }
        let here: Vec<String> = module.iter().cloned().chain(inline.iter().map(|(n, _)| n.clone())).collect();
        let line = code[..i].matches('\n').count() + 1;
        // The path's leading segments: crate/super/self, then names up to a `{`, `*` or a non-path.
        let mut base: Vec<String> = Vec::new();
        let mut j = i;
        let mut prefix = true;
        loop {
            let (seg, end) = ident_at(b, j);
            if seg.is_empty() {
                break;
            }
            match seg.as_str() {
                "crate" if prefix => base.clear(),
                "self" if prefix => base = here.clone(),
                "super" if prefix => {
                    if j == i {
                        base = here.clone();
                    }
                    base.pop();
                }
                _ => {
                    prefix = false;
                    base.push(seg);
                }
            }
            j = end;
            if b[j..].starts_with(b"::") {
                j += 2;
            } else {
                break;
            }
        }
        if b.get(j) == Some(&b'{') {
            // A group: each item's first segment is a child of `base`.
            let mut k = j + 1;
            let mut level = 1;
            let mut at_item = true;
            while k < b.len() && level > 0 {
                match b[k] {
                    b'{' => level += 1,
                    b'}' => level -= 1,
                    b',' if level == 1 => at_item = true,
                    c if at_item && level == 1 && (c.is_ascii_alphabetic() || c == b'_') => {
                        let (seg, _) = ident_at(b, k);
                        let mut target = base.clone();
                        if seg != "self" {
                            target.push(seg);
                        }
                        found.push(Use { line, target });
                        at_item = false;
                    }
                    _ => {}
                }
                k += 1;
            }
        } else {
            found.push(Use { line, target: base });
        }
        i = j.max(after);
    }
    found
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Checks `files` (path, source) against `scopes`; returns one message per violation.
fn check(src: &Path, files: &[(PathBuf, String)], scopes: &[Scope]) -> Vec<String> {
    let mut problems = Vec::new();
    for scope in scopes {
        let depth = scope.path.len();
        let mut undeclared: BTreeMap<String, String> = BTreeMap::new();
        // The scope's child modules that have files.
        let modules: BTreeSet<String> = files
            .iter()
            .map(|(file, _)| file_module(src, file))
            .filter(|m| m.len() > depth && m[..depth] == scope.path[..])
            .map(|m| m[depth].clone())
            .collect();
        for (file, text) in files {
            let module = file_module(src, file);
            if module.len() <= depth || module[..depth] != scope.path[..] {
                continue;
            }
            let from = &module[depth];
            let Some(from_layer) = scope.layer_of(from) else {
                undeclared.entry(from.clone()).or_insert_with(|| file.display().to_string());
                continue;
            };
            for u in uses(&code_only(text), &module) {
                if u.target.len() <= depth || u.target[..depth] != scope.path[..] || &u.target[depth] == from {
                    continue;
                }
                let to = &u.target[depth];
                match scope.layer_of(to) {
                    // An item of the scope's own module (a function in `mod.rs`), not a module.
                    None if !modules.contains(to) => {}
                    None => {
                        undeclared.entry(to.clone()).or_insert_with(|| format!("{}:{}", file.display(), u.line));
                    }
                    Some(to_layer) if to_layer <= from_layer => problems.push(format!(
                        "{}:{}: `{from}` uses `{to}` ({}), which the module order in ARCHITECTURE.md does not allow \
                         ({} is not below {})",
                        file.display(),
                        u.line,
                        u.target.join("::"),
                        to,
                        from
                    )),
                    Some(_) => {}
                }
            }
        }
        let scope_name =
            std::iter::once("crate".to_string()).chain(scope.path.iter().cloned()).collect::<Vec<_>>().join("::");
        for (m, at) in undeclared {
            problems.push(format!("{at}: module `{scope_name}::{m}` is not in the module order (ARCHITECTURE.md)"));
        }
    }
    problems
}

fn sources() -> (PathBuf, Vec<(PathBuf, String)>) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut paths = Vec::new();
    rust_files(&src, &mut paths);
    paths.sort();
    let files = paths
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("read source");
            (p, text)
        })
        .collect();
    (src, files)
}

fn architecture() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ARCHITECTURE.md");
    std::fs::read_to_string(path).expect("read ARCHITECTURE.md")
}

#[test]
fn modules_use_only_modules_below_them() {
    let (src, files) = sources();
    let scopes = declared_order(&architecture());
    assert!(scopes.iter().any(|s| s.path.is_empty()), "the order declares the crate's top modules");
    let problems = check(&src, &files, &scopes);
    assert!(problems.is_empty(), "module order violated:\n{}", problems.join("\n"));
}

/// Appends `code` to the source file ending in `name`; returns its path and last line number.
fn append(files: &mut [(PathBuf, String)], name: &str, code: &str) -> (PathBuf, usize) {
    let (file, text) = files.iter_mut().find(|(p, _)| p.ends_with(name)).expect("source file");
    text.push_str(code);
    (file.clone(), text.lines().count())
}

/// Whether `problems` report `what` at `file:line`.
fn reported(problems: &[String], file: &Path, line: usize, what: &str) -> bool {
    problems.iter().any(|p| p.starts_with(&format!("{}:{line}:", file.display())) && p.contains(what))
}

/// The checker itself: back edges added on purpose (security using both front ends, the ACL
/// circle the order was drawn to end; a Kafka handler type using the listener, the kafka/
/// circle) are reported with their file and line, in the `use` form, the inline path form from
/// a nested module, and inside a `use` group; a downward edge in the same group is not.
#[test]
fn a_back_edge_is_reported_with_file_and_line() {
    let (src, mut files) = sources();
    let scopes = declared_order(&architecture());
    let (acl, end) = append(
        &mut files,
        "security/acl.rs",
        "\nuse crate::kafka::KafkaConfig;\nmod t {\n    fn f() { let _ = super::super::super::mqtt::MqttConfig::default(); }\n}\n",
    );
    let (ctx, ctx_end) = append(&mut files, "kafka/context.rs", "\nuse super::{codec, server::KafkaServer};\n");
    let problems = check(&src, &files, &scopes);
    assert!(reported(&problems, &acl, end - 3, "`security` uses `kafka`"), "{problems:?}");
    assert!(reported(&problems, &acl, end - 1, "`security` uses `mqtt`"), "{problems:?}");
    assert!(reported(&problems, &ctx, ctx_end, "`context` uses `server`"), "{problems:?}");
    assert!(!problems.iter().any(|p| p.contains("`context` uses `codec`")), "a downward edge is allowed: {problems:?}");
    assert_eq!(problems.len(), 3, "{problems:?}");
}

#[test]
fn comments_and_strings_are_not_code() {
    let code = code_only("let s = \"crate::kafka::x\"; // crate::mqtt\nlet c = '{'; /* super::x */ crate::topic::y");
    let found = uses(&code, &["security".to_string()]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].target, ["topic", "y"]);
    assert_eq!(found[0].line, 2);
}
