//! The source tree stays one-way: no module imports one that imports it back, directly or
//! through others. The graph is read from the sources themselves: every `crate::…` and
//! `super::…` path outside comments is an edge from the file it is written in to the file of
//! the module it names (the longest prefix of the path that is a module). A folder's
//! `mod.rs` is its façade: it declares, composes and re-exports its children, and they may
//! use what it defines, so an edge from a module to one of its own descendants is not
//! counted. Between siblings and cousins every edge counts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module path (`audit::write::committer`) of every source file under `src/`.
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap().with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if parts.last().is_some_and(|p| p == "mod") {
                parts.pop();
            }
            if parts == ["main"] || parts == ["lib"] {
                parts.clear();
            }
            out.insert(parts.join("::"), path);
        }
    }
    out
}

/// The code of a file without comments, string literals and `#[cfg(test)]` modules (a test
/// may reach anywhere: it is not part of the architecture).
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    let mut out = String::with_capacity(text.len());
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            i += 2;
            while i + 1 < b.len() && !b[i..].starts_with(b"*/") {
                i += 1;
            }
            i += 2;
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i..].starts_with(b"r#\"") {
            let end = text[i + 3..].find("\"#").map_or(b.len(), |e| i + 3 + e + 2);
            i = end;
            out.push_str("\"\"");
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// The module paths a file's code names: `crate::a::b::C` gives `a::b::C`, `super::x` is
/// resolved against the file's own module. `use` groups (`crate::a::{b, c::d}`) are
/// expanded.
fn named_paths(module: &str, is_mod_rs: bool, code: &str) -> Vec<String> {
    let mut own: Vec<&str> = if module.is_empty() {
        Vec::new()
    } else {
        module.split("::").collect()
    };
    // `super` in `a/b.rs` (module a::b) is `a`; in `a/b/mod.rs` (also a::b) it is `a` too.
    let _ = is_mod_rs;
    let mut found = Vec::new();
    let bytes = code.as_bytes();
    for start in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(at) = code[from..].find(start) {
            let at = from + at;
            from = at + start.len();
            if at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_') {
                continue;
            }
            let mut base: Vec<String> = if start == "crate::" {
                Vec::new()
            } else {
                own.iter().map(|s| s.to_string()).collect()
            };
            if start == "super::" {
                base.pop();
            }
            let mut rest = &code[from..];
            // Further `super::` steps.
            while let Some(r) = rest.strip_prefix("super::") {
                base.pop();
                rest = r;
            }
            expand(&base, rest, &mut found);
        }
    }
    own.clear();
    found
}

/// Appends the paths `base::rest` names, expanding one level of `{…}` groups recursively.
fn expand(base: &[String], rest: &str, out: &mut Vec<String>) {
    let mut path = base.to_vec();
    let mut s = rest;
    loop {
        if let Some(r) = s.strip_prefix('{') {
            for item in split_top(group(r)) {
                let item = item.trim();
                if item == "self" || item.is_empty() {
                    out.push(path.join("::"));
                } else {
                    expand(&path, item, out);
                }
            }
            return;
        }
        let end = s
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(s.len());
        if end == 0 {
            break;
        }
        path.push(s[..end].to_string());
        s = &s[end..];
        match s.strip_prefix("::") {
            Some(r) => s = r,
            None => break,
        }
    }
    out.push(path.join("::"));
}

/// The text up to the brace closing a group that starts just before `s`.
fn group(s: &str) -> &str {
    let mut depth = 1;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return &s[..i];
                }
            }
            _ => {}
        }
    }
    s
}

fn split_top(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut from) = (Vec::new(), 0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[from..i]);
                from = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[from..]);
    out
}

/// The module a path falls in: its longest prefix that is a module file.
fn owner<'m>(mods: &'m BTreeMap<String, PathBuf>, path: &str) -> Option<&'m str> {
    let mut p = path;
    loop {
        if let Some((k, _)) = mods.get_key_value(p) {
            return Some(k);
        }
        p = &p[..p.rfind("::")?];
    }
}

/// The import graph of the tree under `src`: module -> modules it names.
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mods = modules(src);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, file) in &mods {
        let text = std::fs::read_to_string(file).unwrap();
        let is_mod_rs = file.file_name().is_some_and(|f| f == "mod.rs");
        let edges = g.entry(m.clone()).or_default();
        for p in named_paths(m, is_mod_rs, &code(&text)) {
            if let Some(o) = owner(&mods, &p)
                && o != m
                && !o.is_empty()
                && !(m.is_empty() || o.starts_with(&format!("{m}::")))
            {
                edges.insert(o.to_string());
            }
        }
    }
    g
}

/// Every cycle's modules, each cycle once (Tarjan's strongly connected components of more
/// than one module).
fn cycles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct State<'g> {
        g: &'g BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on: BTreeSet<&'g str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'g>(s: &mut State<'g>, v: &'g str) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on.insert(v);
        for w in s.g.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.g.contains_key(w) {
                continue;
            }
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if s.on.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            loop {
                let w = s.stack.pop().unwrap();
                s.on.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                s.out.push(comp);
            }
        }
    }
    let mut s = State {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in g.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let g = graph(&src);
    let found = cycles(&g);
    let shown: Vec<String> = found
        .iter()
        .map(|c| {
            let edges: Vec<String> = c
                .iter()
                .flat_map(|a| {
                    g[a].iter()
                        .filter(|b| c.contains(b))
                        .map(move |b| format!("{a} -> {b}"))
                })
                .collect();
            format!("{{{}}}: {}", c.join(", "), edges.join("; "))
        })
        .collect();
    assert!(
        found.is_empty(),
        "import circles in src/ (break each by moving what both sides need below them):\n{}",
        shown.join("\n")
    );
}

/// The check finds a circle when there is one: two files that name each other, through a
/// `use` group and an inline path.
#[test]
fn a_circle_added_on_purpose_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::create_dir_all(src.join("proxy")).unwrap();
    std::fs::write(src.join("lib.rs"), "pub mod proxy;\n").unwrap();
    std::fs::write(src.join("proxy/mod.rs"), "mod body;\nmod upstream;\n").unwrap();
    std::fs::write(
        src.join("proxy/body.rs"),
        "use super::{upstream::PoolReturn, other};\n// crate::proxy::nothing in a comment\n",
    )
    .unwrap();
    std::fs::write(
        src.join("proxy/upstream.rs"),
        "fn f() { let _ = crate::proxy::body::RequestBody::new(\"crate::x\"); }\n",
    )
    .unwrap();
    let found = cycles(&graph(src));
    assert_eq!(
        found,
        [vec![
            "proxy::body".to_string(),
            "proxy::upstream".to_string()
        ]]
    );
    // Without the inline path back, the tree is one-way.
    std::fs::write(src.join("proxy/upstream.rs"), "fn f() {}\n").unwrap();
    assert!(cycles(&graph(src)).is_empty());
}
