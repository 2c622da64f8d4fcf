//! Inputs: files and directories of Kubernetes YAML, read into the cluster
//! snapshot (namespaces, pods) and model policies, or rejected with
//! located diagnostics. Nothing downstream sees an unvalidated object.

mod admin;
mod k8s;
pub mod yaml;

use crate::cluster::{Cluster, ClusterNamespace, ClusterNode, ClusterPod};
use crate::diag::{Diagnostic, Diagnostics, Location};
use crate::model::Policy;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use yaml::{DocTree, Document, Seg};

/// Everything read from the inputs.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Input files, sorted; `SourceRef::file` indexes this table.
    pub files: Vec<String>,
    pub cluster: Cluster,
    pub policies: Vec<Policy>,
    /// Lints (rule-language files); `--deny-warnings` makes them errors.
    pub warnings: Vec<Diagnostic>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    NetworkPolicy,
    AdminNetworkPolicy,
    BaselineAdminNetworkPolicy,
    ClusterNetworkPolicy,
    Namespace,
    Pod,
    Node,
    List,
}

/// ClusterNetworkPolicy renamed AdminNetworkPolicy's `ports` to `protocols`
/// (and early v1alpha2 drafts still had `ports`), so a user porting a policy
/// hits this first; saying what to write instead saves a trip to the API docs.
fn unknown_field_hint(kind: Kind, name: &str) -> &'static str {
    match (kind, name) {
        (Kind::ClusterNetworkPolicy, "ports") => {
            "; ClusterNetworkPolicy rules match ports with `protocols`, e.g. \
             `protocols: [{tcp: {destinationPort: {number: 80}}}]`"
        }
        _ => "",
    }
}

impl Kind {
    fn from(api_version: &str, kind: &str) -> Result<Kind, String> {
        match (api_version, kind) {
            ("networking.k8s.io/v1", "NetworkPolicy") => Ok(Kind::NetworkPolicy),
            ("policy.networking.k8s.io/v1alpha1", "AdminNetworkPolicy") => {
                Ok(Kind::AdminNetworkPolicy)
            }
            ("policy.networking.k8s.io/v1alpha1", "BaselineAdminNetworkPolicy") => {
                Ok(Kind::BaselineAdminNetworkPolicy)
            }
            (
                "policy.networking.k8s.io/v1alpha2" | "policy.networking.k8s.io/v1beta1",
                "ClusterNetworkPolicy",
            ) => Ok(Kind::ClusterNetworkPolicy),
            (_, "ClusterNetworkPolicy") => Err(format!(
                "ClusterNetworkPolicy must have apiVersion policy.networking.k8s.io/v1beta1 or v1alpha2, not {api_version:?}"
            )),
            (_, "AdminNetworkPolicy" | "BaselineAdminNetworkPolicy") => Err(format!(
                "{kind} must have apiVersion policy.networking.k8s.io/v1alpha1, not {api_version:?}"
            )),
            ("v1", "Namespace") => Ok(Kind::Namespace),
            ("v1", "Pod") => Ok(Kind::Pod),
            ("v1", "Node") => Ok(Kind::Node),
            ("v1", "List") => Ok(Kind::List),
            (_, "NetworkPolicy") => Err(format!(
                "NetworkPolicy must have apiVersion networking.k8s.io/v1, not {api_version:?}"
            )),
            (_, "Namespace" | "Pod" | "Node" | "List") => Err(format!(
                "{kind} must have apiVersion v1, not {api_version:?}"
            )),
            _ => Err(format!(
                "unsupported kind {kind:?} (apiVersion {api_version:?}); trireme reads NetworkPolicy (networking.k8s.io/v1), AdminNetworkPolicy and BaselineAdminNetworkPolicy (policy.networking.k8s.io/v1alpha1), ClusterNetworkPolicy (policy.networking.k8s.io/v1beta1 or v1alpha2), Namespace (v1), Pod (v1), Node (v1) and List (v1)"
            )),
        }
    }
}

enum Object {
    NetworkPolicy(Box<NetworkPolicy>),
    Admin(admin::AdminKind, Box<admin::AdminPolicy>),
    Cluster(Box<admin::ClusterPolicy>),
    Namespace(Box<Namespace>),
    Pod(Box<Pod>),
    Node(Box<Node>),
}

struct ObjSeed(Kind);

impl<'de> DeserializeSeed<'de> for ObjSeed {
    type Value = Object;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Object, D::Error> {
        use serde::Deserialize;
        Ok(match self.0 {
            Kind::NetworkPolicy => Object::NetworkPolicy(Box::new(NetworkPolicy::deserialize(d)?)),
            Kind::AdminNetworkPolicy => Object::Admin(
                admin::AdminKind::Admin,
                Box::new(admin::AdminPolicy::deserialize(d)?),
            ),
            Kind::ClusterNetworkPolicy => {
                Object::Cluster(Box::new(admin::ClusterPolicy::deserialize(d)?))
            }
            Kind::BaselineAdminNetworkPolicy => Object::Admin(
                admin::AdminKind::Baseline,
                Box::new(admin::AdminPolicy::deserialize(d)?),
            ),
            Kind::Namespace => Object::Namespace(Box::new(Namespace::deserialize(d)?)),
            Kind::Pod => Object::Pod(Box::new(Pod::deserialize(d)?)),
            Kind::Node => Object::Node(Box::new(Node::deserialize(d)?)),
            Kind::List => {
                return Err(serde::de::Error::custom(
                    "a List cannot be nested in a List",
                ));
            }
        })
    }
}

/// A `kind: List` whose item kinds were read in the first pass.
struct ListSeed<'a>(&'a [Kind]);

impl<'de> DeserializeSeed<'de> for ListSeed<'_> {
    type Value = Vec<Object>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<Object>, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ListSeed<'_> {
    type Value = Vec<Object>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a v1 List")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Vec<Object>, A::Error> {
        let mut items = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "items" => items = map.next_value_seed(ItemsSeed(self.0))?,
                "apiVersion" | "kind" => {
                    map.next_value::<String>()?;
                }
                // List metadata (resourceVersion, ...) carries no policy meaning.
                "metadata" => {
                    map.next_value::<serde_json::Value>()?;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(items)
    }
}

struct ItemsSeed<'a>(&'a [Kind]);

impl<'de> DeserializeSeed<'de> for ItemsSeed<'_> {
    type Value = Vec<Object>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<Object>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ItemsSeed<'_> {
    type Value = Vec<Object>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of objects")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Object>, A::Error> {
        let mut out = Vec::new();
        for kind in self.0 {
            match seq.next_element_seed(ObjSeed(*kind))? {
                Some(o) => out.push(o),
                None => break,
            }
        }
        if seq.next_element::<IgnoredAny>()?.is_some() {
            return Err(serde::de::Error::custom("more List items than indexed"));
        }
        Ok(out)
    }
}

/// Where an object sits: its file, document and path prefix (List items).
pub(crate) struct ObjCtx<'a> {
    pub file: &'a Arc<str>,
    pub file_index: u32,
    pub tree: &'a DocTree,
    pub base: Vec<Seg>,
}

impl ObjCtx<'_> {
    fn full(&self, path: &[Seg]) -> Vec<Seg> {
        let mut p = self.base.clone();
        p.extend_from_slice(path);
        p
    }

    pub fn loc(&self, path: &[Seg]) -> Location {
        let (line, col) = self.tree.value_pos(&self.full(path));
        Location {
            file: self.file.clone(),
            line,
            col,
        }
    }

    pub fn key_loc(&self, path: &[Seg]) -> Location {
        let (line, col) = self.tree.key_pos(&self.full(path));
        Location {
            file: self.file.clone(),
            line,
            col,
        }
    }
}

/// Expands `-f` arguments: files as given, directories recursively
/// (`*.yaml`, `*.yml`, `*.json`, `*.trireme`), sorted and deduplicated.
pub fn expand_paths(paths: &[PathBuf]) -> Result<Vec<PathBuf>, Diagnostics> {
    let mut out = Vec::new();
    let mut diags = Vec::new();
    for p in paths {
        if p.is_dir() {
            walk(p, &mut out, &mut diags);
        } else if p.exists() {
            out.push(p.clone());
        } else {
            diags.push(Diagnostic::global(format!(
                "{}: no such file or directory",
                p.display()
            )));
        }
    }
    if !diags.is_empty() {
        return Err(Diagnostics(diags));
    }
    // Sorted as strings, the order the ruleset's source table uses.
    out.sort_by_key(|p| p.display().to_string());
    out.dedup();
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>, diags: &mut Vec<Diagnostic>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            diags.push(Diagnostic::global(format!("{}: {e}", dir.display())));
            return;
        }
    };
    for entry in entries.flatten() {
        let p = entry.path();
        if p.is_dir() {
            walk(&p, out, diags);
        } else if matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json" | "trireme")
        ) {
            out.push(p);
        }
    }
}

/// Reads and validates every input. All problems found are reported
/// together; on any error nothing is returned.
pub fn load(paths: &[PathBuf]) -> Result<Loaded, Diagnostics> {
    load_with(paths, &[])
}

/// As `load`, where rule files may `ask` the named decide plugins (sorted:
/// the order of the ruleset's plugin table).
pub fn load_with(paths: &[PathBuf], plugins: &[String]) -> Result<Loaded, Diagnostics> {
    debug_assert!(plugins.is_sorted());
    let files = expand_paths(paths)?;
    let mut loaded = Loaded {
        files: files.iter().map(|p| p.display().to_string()).collect(),
        ..Default::default()
    };
    let mut diags = Vec::new();
    let mut namespaces: Vec<(ClusterNamespace, Location)> = Vec::new();
    let mut pods: Vec<(ClusterPod, Location)> = Vec::new();
    let mut nodes: Vec<ClusterNode> = Vec::new();
    let mut seen: BTreeMap<(&'static str, String, String), Location> = BTreeMap::new();
    for (fi, path) in files.iter().enumerate() {
        let file: Arc<str> = Arc::from(loaded.files[fi].as_str());
        let text = match std::fs::read(path) {
            Ok(b) => match String::from_utf8(b) {
                Ok(t) => t,
                Err(_) => {
                    diags.push(Diagnostic::global(format!("{file}: not valid UTF-8")));
                    continue;
                }
            },
            Err(e) => {
                diags.push(Diagnostic::global(format!("{file}: {e}")));
                continue;
            }
        };
        if path.extension().is_some_and(|e| e == "trireme") {
            match crate::rules::load(&file, &text, fi as u32, plugins) {
                Ok(r) => {
                    for p in r.policies {
                        let loc = Location {
                            file: file.clone(),
                            line: p.source.line,
                            col: p.source.col,
                        };
                        let key = ("Policy", String::new(), p.name.name.clone());
                        if let Some(first) = seen.get(&key) {
                            diags.push(
                                Diagnostic::at(loc, format!("duplicate Policy {}", p.name.name))
                                    .with_note(first.clone(), "first defined here"),
                            );
                            continue;
                        }
                        seen.insert(key, loc);
                        loaded.policies.push(p);
                    }
                    loaded.warnings.extend(r.warnings);
                }
                Err(ds) => diags.extend(ds),
            }
            continue;
        }
        let docs = match yaml::index(&file, &text) {
            Ok(d) => d,
            Err(d) => {
                diags.push(d);
                continue;
            }
        };
        for doc in &docs {
            let objects = match read_document(&file, &text, doc, &mut diags) {
                Some(o) => o,
                None => continue,
            };
            for (base, obj) in objects {
                let ctx = ObjCtx {
                    file: &file,
                    file_index: fi as u32,
                    tree: &doc.tree,
                    base,
                };
                let before = diags.len();
                let (kind, ns, name, loc) = match &obj {
                    Object::NetworkPolicy(np) => {
                        let p = k8s::network_policy(&ctx, np, &mut diags);
                        let key = p.as_ref().map(|p| {
                            (
                                p.name.namespace.clone().unwrap_or_default(),
                                p.name.name.clone(),
                            )
                        });
                        if let (Some(p), true) = (p, diags.len() == before) {
                            loaded.policies.push(p);
                        }
                        match key {
                            Some((ns, n)) => ("NetworkPolicy", ns, n, ctx.loc(&[])),
                            None => continue,
                        }
                    }
                    Object::Admin(k, ap) => {
                        let p = admin::admin_policy(&ctx, *k, ap, &mut diags);
                        let kind_name = match k {
                            admin::AdminKind::Admin => "AdminNetworkPolicy",
                            admin::AdminKind::Baseline => "BaselineAdminNetworkPolicy",
                        };
                        let key = p.as_ref().map(|p| p.name.name.clone());
                        if let (Some(p), true) = (p, diags.len() == before) {
                            loaded.policies.push(p);
                        }
                        match key {
                            Some(n) => (kind_name, String::new(), n, ctx.loc(&[])),
                            None => continue,
                        }
                    }
                    Object::Cluster(cp) => {
                        let p = admin::cluster_policy(&ctx, cp, &mut diags);
                        let key = p.as_ref().map(|p| p.name.name.clone());
                        if let (Some(p), true) = (p, diags.len() == before) {
                            loaded.policies.push(p);
                        }
                        match key {
                            Some(n) => ("ClusterNetworkPolicy", String::new(), n, ctx.loc(&[])),
                            None => continue,
                        }
                    }
                    Object::Namespace(n) => match k8s::namespace(&ctx, n, &mut diags) {
                        Some(n) => {
                            let name = n.name.clone();
                            namespaces.push((n, ctx.loc(&[])));
                            ("Namespace", String::new(), name, ctx.loc(&[]))
                        }
                        None => continue,
                    },
                    Object::Node(n) => match k8s::node(&ctx, n, &mut diags) {
                        Some(n) => {
                            let name = n.name.clone();
                            nodes.push(n);
                            ("Node", String::new(), name, ctx.loc(&[]))
                        }
                        None => continue,
                    },
                    Object::Pod(p) => match k8s::pod(&ctx, p, &mut diags) {
                        Some(p) => {
                            let key = (p.namespace.clone(), p.name.clone());
                            pods.push((p, ctx.loc(&[])));
                            ("Pod", key.0, key.1, ctx.loc(&[]))
                        }
                        None => continue,
                    },
                };
                let shown = if ns.is_empty() {
                    name.clone()
                } else {
                    format!("{ns}/{name}")
                };
                if let Some(first) = seen.get(&(kind, ns.clone(), name.clone())) {
                    diags.push(
                        Diagnostic::at(loc, format!("duplicate {kind} {shown}"))
                            .with_note(first.clone(), "first defined here"),
                    );
                } else {
                    seen.insert((kind, ns, name), loc);
                }
            }
        }
    }
    if !diags.is_empty() {
        return Err(Diagnostics(diags));
    }
    loaded.cluster = Cluster::new(
        namespaces.into_iter().map(|(n, _)| n).collect(),
        pods.into_iter().map(|(p, _)| p).collect(),
        nodes,
    );
    // Canonical order is established once, by `Ruleset::new`.
    Ok(loaded)
}

fn kind_at(file: &Arc<str>, tree: &DocTree, base: &[Seg]) -> Result<Kind, Diagnostic> {
    let mut p = base.to_vec();
    p.push(Seg::key("kind"));
    let kind = tree.scalar(&p);
    let (l, c) = tree.value_pos(&p);
    let loc = Location {
        file: file.clone(),
        line: l,
        col: c,
    };
    let kind = kind.ok_or_else(|| Diagnostic::at(loc.clone(), "object has no `kind`"))?;
    p.pop();
    p.push(Seg::key("apiVersion"));
    let api = tree
        .scalar(&p)
        .ok_or_else(|| Diagnostic::at(loc.clone(), format!("{kind} has no `apiVersion`")))?;
    Kind::from(api, kind).map_err(|m| Diagnostic::at(loc, m))
}

fn read_document(
    file: &Arc<str>,
    text: &str,
    doc: &Document,
    diags: &mut Vec<Diagnostic>,
) -> Option<Vec<(Vec<Seg>, Object)>> {
    let kind = match kind_at(file, &doc.tree, &[]) {
        Ok(k) => k,
        Err(d) => {
            diags.push(d);
            return None;
        }
    };
    let item_kinds: Vec<Kind> = if kind == Kind::List {
        let items = [Seg::key("items")];
        let n = doc.tree.seq_len(&items);
        let mut kinds = Vec::with_capacity(n);
        let mut ok = true;
        for i in 0..n {
            match kind_at(file, &doc.tree, &[Seg::key("items"), Seg::Index(i)]) {
                Ok(Kind::List) => {
                    let (l, c) =
                        doc.tree
                            .value_pos(&[Seg::key("items"), Seg::Index(i), Seg::key("kind")]);
                    diags.push(Diagnostic::at(
                        Location {
                            file: file.clone(),
                            line: l,
                            col: c,
                        },
                        "a List cannot contain a List",
                    ));
                    ok = false;
                }
                Ok(k) => kinds.push(k),
                Err(d) => {
                    diags.push(d);
                    ok = false;
                }
            }
        }
        if !ok {
            return None;
        }
        kinds
    } else {
        Vec::new()
    };
    let doc_text = &text[doc.text_range.clone()];
    let mut ignored: Vec<Vec<Seg>> = Vec::new();
    let result =
        serde_saphyr::with_deserializer_from_str_with_options(doc_text, yaml::options(), |de| {
            let mut cb = |path: serde_ignored::Path<'_>| {
                let mut segs = Vec::new();
                yaml::ignored_path(&path, &mut segs);
                ignored.push(segs);
            };
            let de = serde_ignored::Deserializer::new(de, &mut cb);
            if kind == Kind::List {
                ListSeed(&item_kinds).deserialize(de)
            } else {
                ObjSeed(kind).deserialize(de).map(|o| vec![o])
            }
        });
    match result {
        Ok(objects) => {
            let mut bad = false;
            for path in ignored {
                // List metadata is skipped on purpose.
                if kind == Kind::List
                    && matches!(path.first(), Some(Seg::Key(k)) if k == "metadata")
                {
                    continue;
                }
                let (l, c) = doc.tree.key_pos(&path);
                let name = match path.last() {
                    Some(Seg::Key(k)) => k.to_string(),
                    _ => yaml::path_string(&path),
                };
                diags.push(Diagnostic::at(
                    Location {
                        file: file.clone(),
                        line: l,
                        col: c,
                    },
                    format!(
                        "unknown field `{name}` (at {}){}",
                        yaml::path_string(&path),
                        unknown_field_hint(kind, &name)
                    ),
                ));
                bad = true;
            }
            if bad {
                return None;
            }
            Some(if kind == Kind::List {
                objects
                    .into_iter()
                    .enumerate()
                    .map(|(i, o)| (vec![Seg::key("items"), Seg::Index(i)], o))
                    .collect()
            } else {
                objects.into_iter().map(|o| (Vec::new(), o)).collect()
            })
        }
        Err(e) => {
            let (line, col) = match e.location() {
                Some(l) => (l.line() as u32 + doc.first_line - 1, l.column() as u32),
                None => {
                    let (l, c) = doc.tree.value_pos(&[]);
                    (l, c)
                }
            };
            diags.push(Diagnostic::at(
                Location {
                    file: file.clone(),
                    line,
                    col: col.max(1),
                },
                yaml::saphyr_message(&e),
            ));
            None
        }
    }
}
