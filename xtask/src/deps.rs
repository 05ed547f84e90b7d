//! `cargo xtask deps`: canary-agent's module dependency graph, from the source.
//!
//! Each file is a module (`src/analysis/check.rs` is `analysis::check`, a `mod.rs`
//! is its folder). An edge A → B is a path A names that resolves into B:
//! `crate::b::…`, `super::…` and `self::…` in code (comments are skipped). Two
//! graphs are checked for cycles: the top-level modules (layers), and inside each
//! folder its files (siblings); a folder's `mod.rs` naming its own children
//! (declarations, re-exports) is structure, not a dependency. Exits non-zero when a
//! cycle is found, printing it.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

use anyhow::{bail, Context, Result};

use crate::workspace_root;

type Graph = BTreeMap<String, BTreeSet<String>>;

pub fn run() -> Result<()> {
    let src = workspace_root().join("canary-agent/src");
    let mut files = BTreeMap::new();
    collect(&src, &src, &mut files)?;
    let modules: BTreeSet<String> = files.keys().cloned().collect();
    let mut edges: Graph = BTreeMap::new();
    for (module, text) in &files {
        let targets = edges.entry(module.clone()).or_default();
        for path in referenced_paths(module, text) {
            if let Some(target) = resolve(&modules, &path) {
                if target != *module {
                    targets.insert(target);
                }
            }
        }
    }

    let mut layers: Graph = BTreeMap::new();
    let mut folders: BTreeMap<String, Graph> = BTreeMap::new();
    for (from, targets) in &edges {
        let top = top_of(from);
        layers.entry(top.to_string()).or_default();
        for to in targets {
            if top_of(to) != top {
                layers
                    .entry(top.into())
                    .or_default()
                    .insert(top_of(to).into());
            } else if let (Some(a), Some(b)) = (sibling_of(from), sibling_of(to)) {
                // Same folder: compare the two files' entries in that folder.
                if a.0 == b.0 && a.1 != b.1 {
                    folders
                        .entry(a.0.clone())
                        .or_default()
                        .entry(a.1.clone())
                        .or_default()
                        .insert(b.1.clone());
                }
            }
        }
    }

    println!("canary-agent layers (module -> the modules it uses):");
    for (module, targets) in &layers {
        let list: Vec<&str> = targets.iter().map(String::as_str).collect();
        println!("  {module:<12} -> {}", list.join(", "));
    }
    let mut cycles = Vec::new();
    for cycle in strongly_connected(&layers) {
        cycles.push(format!("layers: {}", cycle.join(" <-> ")));
    }
    for (folder, graph) in &folders {
        println!("inside {folder}/:");
        for (file, targets) in graph {
            let list: Vec<&str> = targets.iter().map(String::as_str).collect();
            println!("  {file:<12} -> {}", list.join(", "));
        }
        for cycle in strongly_connected(graph) {
            cycles.push(format!("{folder}/: {}", cycle.join(" <-> ")));
        }
    }
    if cycles.is_empty() {
        println!("no cycles");
        Ok(())
    } else {
        for c in &cycles {
            println!("cycle: {c}");
        }
        bail!("{} import cycle(s) in canary-agent", cycles.len())
    }
}

/// Every `.rs` file under `dir` as (module path, source).
fn collect(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect(root, &path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path.strip_prefix(root)?.with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if matches!(
                parts.last().map(String::as_str),
                Some("mod" | "lib" | "main")
            ) {
                parts.pop();
            }
            let module = if parts.is_empty() {
                "crate".to_string()
            } else {
                parts.join("::")
            };
            out.insert(module, fs::read_to_string(&path)?);
        }
    }
    Ok(())
}

/// Absolute module paths (`a::b::c`) that `text`, the source of `module`, names.
fn referenced_paths(module: &str, text: &str) -> Vec<String> {
    // Line comments out (a `//` inside a string only drops the string's end).
    let code: String = text
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let parent: Vec<&str> = module.split("::").filter(|p| *p != "crate").collect();
    let mut out = Vec::new();
    for (prefix, base) in [
        ("crate::", Vec::new()),
        ("super::", parent[..parent.len().saturating_sub(1)].to_vec()),
        ("self::", parent.clone()),
    ] {
        let mut at = 0;
        while let Some(found) = code[at..].find(prefix) {
            let start = at + found;
            at = start + prefix.len();
            let before = code[..start].chars().last();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let base: Vec<String> = base.iter().map(|s| s.to_string()).collect();
            for tail in use_tree(&code[at..]).0 {
                let mut path = base.clone();
                path.extend(tail);
                out.push(path.join("::"));
            }
        }
    }
    out
}

/// The paths of a use tree (`a::b::{c, d::{e}}` → a::b::c, a::b::d::e), and the
/// bytes it took. Whitespace (newlines too) may separate its tokens.
fn use_tree(s: &str) -> (Vec<Vec<String>>, usize) {
    let mut at = 0;
    let mut segs = Vec::new();
    loop {
        at += s[at..].len() - s[at..].trim_start().len();
        let ident: String = s[at..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if !ident.is_empty() {
            at += ident.len();
            segs.push(ident);
            if s[at..].starts_with("::") {
                at += 2;
                continue;
            }
            return (vec![segs], at);
        }
        if !s[at..].starts_with('{') {
            return (vec![segs], at);
        }
        at += 1;
        let mut paths = Vec::new();
        loop {
            let (inner, used) = use_tree(&s[at..]);
            at += used;
            for tail in inner.into_iter().filter(|t| !t.is_empty()) {
                let mut p = segs.clone();
                p.extend(tail);
                paths.push(p);
            }
            at += s[at..].len() - s[at..].trim_start().len();
            match s[at..].chars().next() {
                Some(',') => at += 1,
                Some('}') => return (paths, at + 1),
                // `*`, `as name` and the like: skip to the next separator.
                Some(_) => {
                    let skip = s[at..].find([',', '}']).unwrap_or(s.len() - at);
                    at += skip;
                }
                None => return (paths, at),
            }
        }
    }
}

/// The longest known module that `path` starts with.
fn resolve(modules: &BTreeSet<String>, path: &str) -> Option<String> {
    let parts: Vec<&str> = path.split("::").collect();
    (1..=parts.len())
        .rev()
        .map(|n| parts[..n].join("::"))
        .find(|m| modules.contains(m))
}

fn top_of(module: &str) -> &str {
    module.split("::").next().unwrap_or(module)
}

/// (folder, entry of that folder) for a module below a top-level folder:
/// `analysis::check` → ("analysis", "check"); a top-level module has none.
fn sibling_of(module: &str) -> Option<(String, String)> {
    let parts: Vec<&str> = module.split("::").collect();
    (parts.len() >= 2).then(|| (parts[0].to_string(), parts[1].to_string()))
}

/// Strongly connected components of more than one node (Tarjan), each sorted.
fn strongly_connected(graph: &Graph) -> Vec<Vec<String>> {
    struct Walk<'a> {
        graph: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    impl<'a> Walk<'a> {
        fn visit(&mut self, v: &'a str) {
            self.index.insert(v, self.next);
            self.low.insert(v, self.next);
            self.next += 1;
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.graph.get(v).into_iter().flatten() {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(lw);
                } else if self.on_stack.contains(w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    component.push(w.to_string());
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.out.push(component);
                }
            }
        }
    }
    let mut walk = Walk {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !walk.index.contains_key(v.as_str()) {
            walk.visit(v);
        }
    }
    walk.out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_through_groups_super_and_self() {
        let text = "use crate::analysis::{check::Outcome, window};\nuse super::plan::Plan; // crate::ui\nlet x = self::inner::f();";
        let paths = referenced_paths("policy::toml", text);
        assert!(
            paths.contains(&"analysis::check::Outcome".to_string()),
            "{paths:?}"
        );
        assert!(paths.contains(&"analysis::window".to_string()), "{paths:?}");
        assert!(
            paths.contains(&"policy::plan::Plan".to_string()),
            "{paths:?}"
        );
        assert!(
            paths.contains(&"policy::toml::inner::f".to_string()),
            "{paths:?}"
        );
        assert!(!paths.iter().any(|p| p.starts_with("ui")), "{paths:?}");
        let nested = "use crate::{\n    agent::{lock, Agent},\n    api::*,\n};";
        let paths = referenced_paths("fleet::etcd", nested);
        assert!(paths.contains(&"agent::Agent".to_string()), "{paths:?}");
        assert!(paths.contains(&"api".to_string()), "{paths:?}");
    }

    #[test]
    fn a_cycle_is_found_and_a_chain_is_not() {
        let mut g: Graph = BTreeMap::new();
        g.entry("a".into()).or_default().insert("b".into());
        g.entry("b".into()).or_default().insert("c".into());
        g.entry("c".into()).or_default();
        assert!(strongly_connected(&g).is_empty());
        g.entry("c".into()).or_default().insert("a".into());
        assert_eq!(strongly_connected(&g), vec![vec!["a", "b", "c"]]);
    }
}
