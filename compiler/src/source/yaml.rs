//! YAML reading with precise locations.
//!
//! Typed objects are deserialized by serde-saphyr (which reports syntax and
//! type errors with line and column). Semantic validation happens later on
//! the typed objects and needs the location of an arbitrary field path, and
//! unknown fields (which k8s-openapi silently drops) are caught by
//! serde_ignored as paths; so a first pass over the parser's events records a
//! compact tree of where every key and value starts. The tree also lets us
//! split a multi-document stream and learn each document's `kind` before the
//! typed pass, so that each document is deserialized straight into its type.

use crate::diag::{Diagnostic, Location};
use serde_saphyr::granit_parser::{Event, Parser};
use std::borrow::Cow;
use std::sync::Arc;

/// One step of a field path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Key(Cow<'static, str>),
    Index(usize),
}

impl Seg {
    pub fn key(k: &'static str) -> Seg {
        Seg::Key(Cow::Borrowed(k))
    }
}

/// Renders a path as `spec.ingress[0].ports[1].port`.
pub fn path_string(path: &[Seg]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Seg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

#[derive(Debug)]
struct Node {
    /// Key (for mapping values) or index (for sequence items).
    key: NodeKey,
    first_child: u32,
    next_sibling: u32,
    key_line: u32,
    key_col: u32,
    line: u32,
    col: u32,
    /// Scalar text, kept only where the loader needs it before the typed pass.
    scalar: Option<Box<str>>,
}

#[derive(Debug)]
enum NodeKey {
    Root,
    Key(Box<str>),
    Index(u32),
}

const NONE: u32 = u32::MAX;

/// Where every node of one document starts.
#[derive(Debug)]
pub struct DocTree {
    nodes: Vec<Node>,
}

impl DocTree {
    fn child(&self, parent: u32, seg: &Seg) -> Option<u32> {
        let mut c = self.nodes.get(parent as usize)?.first_child;
        while c != NONE {
            let n = &self.nodes[c as usize];
            let hit = match (&n.key, seg) {
                (NodeKey::Key(a), Seg::Key(b)) => a.as_ref() == b.as_ref(),
                (NodeKey::Index(a), Seg::Index(b)) => *a as usize == *b,
                _ => false,
            };
            if hit {
                return Some(c);
            }
            c = n.next_sibling;
        }
        None
    }

    fn find(&self, path: &[Seg]) -> (u32, usize) {
        // Deepest existing node along the path, and how many segments matched.
        let mut cur = 0u32;
        for (i, seg) in path.iter().enumerate() {
            match self.child(cur, seg) {
                Some(c) => cur = c,
                None => return (cur, i),
            }
        }
        (cur, path.len())
    }

    /// Start of the value at `path` (or of its deepest existing ancestor).
    pub fn value_pos(&self, path: &[Seg]) -> (u32, u32) {
        let (n, _) = self.find(path);
        let n = &self.nodes[n as usize];
        (n.line, n.col)
    }

    /// Start of the key naming `path` (for "unknown field" errors).
    pub fn key_pos(&self, path: &[Seg]) -> (u32, u32) {
        let (n, _) = self.find(path);
        let n = &self.nodes[n as usize];
        (n.key_line, n.key_col)
    }

    /// Scalar text at `path`, if the first pass kept it.
    pub fn scalar(&self, path: &[Seg]) -> Option<&str> {
        let (n, matched) = self.find(path);
        if matched != path.len() {
            return None;
        }
        self.nodes[n as usize].scalar.as_deref()
    }

    /// Number of items of the sequence at `path`.
    pub fn seq_len(&self, path: &[Seg]) -> usize {
        let (n, matched) = self.find(path);
        if matched != path.len() {
            return 0;
        }
        let mut c = self.nodes[n as usize].first_child;
        let mut count = 0;
        while c != NONE {
            if matches!(self.nodes[c as usize].key, NodeKey::Index(_)) {
                count += 1;
            }
            c = self.nodes[c as usize].next_sibling;
        }
        count
    }
}

/// One YAML document of a file.
#[derive(Debug)]
pub struct Document {
    /// The document's own text (whole lines), so columns stay true.
    pub text_range: std::ops::Range<usize>,
    /// 1-based line of `text_range.start` in the file.
    pub first_line: u32,
    pub tree: DocTree,
}

/// Keys whose scalar values the loader reads before the typed pass.
fn keep_scalar(key: &str) -> bool {
    matches!(key, "apiVersion" | "kind")
}

enum Frame {
    Map {
        node: u32,
        last_child: u32,
        pending_key: Option<(Box<str>, u32, u32)>,
    },
    Seq {
        node: u32,
        last_child: u32,
        next: u32,
    },
}

/// Byte offset of the start of every line (index 0 = line 1).
fn line_starts(text: &str) -> Vec<usize> {
    std::iter::once(0)
        .chain(text.match_indices('\n').map(|(i, _)| i + 1))
        .collect()
}

/// First pass: split into documents and index every node's position.
pub fn index(file: &Arc<str>, text: &str) -> Result<Vec<Document>, Diagnostic> {
    let mut docs = Vec::new();
    let mut parser = Parser::new_from_str(text);
    let mut stack: Vec<Frame> = Vec::new();
    let mut nodes: Vec<Node> = Vec::new();
    let mut doc_start: Option<(usize, u32)> = None;
    let err_at = |line: usize, col: usize, msg: String| {
        Diagnostic::at(
            Location {
                file: file.clone(),
                line: line as u32,
                col: col as u32 + 1,
            },
            msg,
        )
    };
    let mut starts: Vec<(usize, u32, DocTree)> = Vec::new();
    let lines = line_starts(text);
    while let Some(ev) = parser.next_event() {
        let (ev, span) = match ev {
            Ok(x) => x,
            Err(e) => {
                let m = e.marker();
                return Err(err_at(
                    m.line(),
                    m.col(),
                    format!("invalid YAML: {}", e.info()),
                ));
            }
        };
        let line = span.start.line() as u32;
        let col = span.start.col() as u32 + 1;
        match ev {
            Event::DocumentStart(..) => {
                let ls = lines
                    .get(line.saturating_sub(1) as usize)
                    .copied()
                    .unwrap_or(text.len());
                doc_start = Some((ls, line));
                nodes.clear();
                stack.clear();
            }
            Event::DocumentEnd => {
                if let Some((start, first_line)) = doc_start.take() {
                    starts.push((
                        start,
                        first_line,
                        DocTree {
                            nodes: std::mem::take(&mut nodes),
                        },
                    ));
                }
            }
            Event::Scalar(..)
            | Event::SequenceStart(..)
            | Event::MappingStart(..)
            | Event::Alias(_) => {
                // A mapping key?
                if let Some(Frame::Map { pending_key, .. }) = stack.last_mut()
                    && pending_key.is_none()
                {
                    match ev {
                        Event::Scalar(v, ..) => {
                            *pending_key = Some((v.as_ref().into(), line, col));
                            continue;
                        }
                        _ => {
                            return Err(err_at(
                                span.start.line(),
                                span.start.col(),
                                "complex mapping keys are not supported in Kubernetes objects"
                                    .into(),
                            ));
                        }
                    }
                }
                let idx = nodes.len() as u32;
                let (key, key_line, key_col, parent) = match stack.last_mut() {
                    None => (NodeKey::Root, line, col, None),
                    Some(Frame::Map {
                        node,
                        last_child,
                        pending_key,
                    }) => {
                        let (k, kl, kc) = pending_key.take().expect("key present");
                        let prev = *last_child;
                        *last_child = idx;
                        (NodeKey::Key(k), kl, kc, Some((*node, prev)))
                    }
                    Some(Frame::Seq {
                        node,
                        last_child,
                        next,
                    }) => {
                        let i = *next;
                        *next += 1;
                        let prev = *last_child;
                        *last_child = idx;
                        (NodeKey::Index(i), line, col, Some((*node, prev)))
                    }
                };
                let scalar = match (&ev, &key) {
                    (Event::Scalar(v, ..), NodeKey::Key(k)) if keep_scalar(k) => {
                        Some(v.as_ref().into())
                    }
                    _ => None,
                };
                nodes.push(Node {
                    key,
                    first_child: NONE,
                    next_sibling: NONE,
                    key_line,
                    key_col,
                    line,
                    col,
                    scalar,
                });
                if let Some((parent, prev)) = parent {
                    if prev == NONE {
                        nodes[parent as usize].first_child = idx;
                    } else {
                        nodes[prev as usize].next_sibling = idx;
                    }
                }
                match ev {
                    Event::SequenceStart(..) => stack.push(Frame::Seq {
                        node: idx,
                        last_child: NONE,
                        next: 0,
                    }),
                    Event::MappingStart(..) => stack.push(Frame::Map {
                        node: idx,
                        last_child: NONE,
                        pending_key: None,
                    }),
                    _ => {}
                }
            }
            Event::SequenceEnd | Event::MappingEnd => {
                stack.pop();
            }
            _ => {}
        }
    }
    // Each document's text runs from its first line to the next document's.
    for i in 0..starts.len() {
        let end = starts.get(i + 1).map_or(text.len(), |s| s.0);
        let (start, first_line) = (starts[i].0, starts[i].1);
        let tree = std::mem::replace(&mut starts[i].2, DocTree { nodes: Vec::new() });
        if tree.nodes.is_empty() {
            continue;
        }
        docs.push(Document {
            text_range: start..end.max(start),
            first_line,
            tree,
        });
    }
    Ok(docs)
}

/// serde-saphyr options: duplicate keys are errors (a silently dropped
/// duplicate `podSelector` would change what a policy means).
pub fn options() -> serde_saphyr::Options {
    let mut o = serde_saphyr::Options::default();
    o.duplicate_keys = serde_saphyr::DuplicateKeyPolicy::Error;
    o.with_snippet = false;
    o
}

/// The message of a serde-saphyr error, without its location suffix.
pub fn saphyr_message(e: &serde_saphyr::Error) -> String {
    match e.without_snippet() {
        serde_saphyr::Error::Message { msg, .. } => msg.clone(),
        other => {
            let s = other.to_string();
            match s.find(" at line ") {
                Some(i) => s[..i].to_string(),
                None => s,
            }
        }
    }
}

/// Converts a serde_ignored path into our segments.
pub fn ignored_path(p: &serde_ignored::Path<'_>, out: &mut Vec<Seg>) {
    use serde_ignored::Path;
    match p {
        Path::Root => {}
        Path::Seq { parent, index } => {
            ignored_path(parent, out);
            out.push(Seg::Index(*index));
        }
        Path::Map { parent, key } => {
            ignored_path(parent, out);
            out.push(Seg::Key(Cow::Owned(key.clone())));
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => ignored_path(parent, out),
    }
}

impl From<&'static str> for Seg {
    fn from(k: &'static str) -> Seg {
        Seg::Key(Cow::Borrowed(k))
    }
}

impl From<usize> for Seg {
    fn from(i: usize) -> Seg {
        Seg::Index(i)
    }
}

impl From<String> for Seg {
    fn from(k: String) -> Seg {
        Seg::Key(Cow::Owned(k))
    }
}

/// Builds a field path: `path!["spec", "ingress", i]`.
#[macro_export]
macro_rules! path {
    ($($s:expr),* $(,)?) => { [$($crate::source::yaml::Seg::from($s)),*] };
}
