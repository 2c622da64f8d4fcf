//! The plugins a ruleset carries, run the way the node runtime runs them:
//! resolvers turn workload metadata into identity labels before any
//! decision, and decide hooks answer `ask` rules during one. `check`,
//! `matrix` and `test` use this with fuel (reproducible); the runtime uses it
//! with an epoch deadline.

use crate::cluster::{Cluster, ClusterPod};
use crate::eval::{Evaluator, Flow, HookAnswer, Hooks};
use crate::model::{Direction, Identity, Protocol, UNRESOLVED_KEY};
use crate::ruleset::{self, Ruleset};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use trireme_plugin_host::{
    CallError, Host, Labels, Limits, Plugin, Query, QueryDirection, Verdict, Workload, abi,
};

/// The sandbox, for embedders (the node runtime) that build their own host.
pub use trireme_plugin_host as host;

struct Entry {
    plugin: Plugin,
    fail_open: bool,
}

/// Identity ids are hashes of the labels (stable across processes); this
/// keeps each identity's id and labels JSON so neither is recomputed.
#[derive(Default)]
struct Ids {
    by_identity: HashMap<Identity, u64>,
    json: HashMap<u64, String>,
}

pub struct Plugins {
    /// Same order as `Ruleset::plugins` (what `Action::Ask` indexes).
    table: Vec<Entry>,
    ids: Mutex<Ids>,
}

/// A resolver failed for a workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolveFailure {
    pub plugin: String,
    pub error: CallError,
}

impl std::fmt::Display for ResolveFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "plugin {} {}", self.plugin, self.error)
    }
}

impl Plugins {
    /// Loads (validates, compiles, starts) every plugin of the ruleset,
    /// checking each against its pinned sha256.
    pub fn load(rs: &Ruleset, host: &Host) -> Result<Plugins, String> {
        let mut table = Vec::with_capacity(rs.plugins.len());
        for p in &rs.plugins {
            let plugin = host
                .load(&p.name, &p.wasm, Some(p.sha256), p.settings.as_deref())
                .map_err(|e| e.to_string())?;
            table.push(Entry {
                plugin,
                fail_open: p.fail_open,
            });
        }
        Ok(Plugins {
            table,
            ids: Mutex::new(Ids::default()),
        })
    }

    /// For the CLI: a fuel-limited host, shared by the whole process (so a
    /// module is compiled once however many rulesets carry it), compiled
    /// modules also cached in `$TRIREME_PLUGIN_CACHE` when set. `None` when
    /// the ruleset has no plugins.
    pub fn offline(rs: &Ruleset) -> Result<Option<Plugins>, String> {
        static HOST: OnceLock<Result<Host, String>> = OnceLock::new();
        if rs.plugins.is_empty() {
            return Ok(None);
        }
        let host = HOST.get_or_init(|| {
            let cache = std::env::var_os("TRIREME_PLUGIN_CACHE").map(Into::into);
            Host::build(
                Limits::offline(),
                cache,
                std::sync::Arc::new(|p, l, m| eprintln!("plugin {p}: {l:?}: {m}")),
            )
        });
        Plugins::load(rs, host.as_ref().map_err(Clone::clone)?).map(Some)
    }

    pub fn plugins(&self) -> impl Iterator<Item = &Plugin> {
        self.table.iter().map(|e| &e.plugin)
    }

    pub fn has_resolvers(&self) -> bool {
        self.table.iter().any(|e| e.plugin.hooks().resolve)
    }

    /// Identity labels from every resolver, in plugin-name order (a later
    /// one overrides an earlier one's key). A failing fail-open resolver
    /// contributes nothing; a failing fail-closed one fails the workload.
    pub fn resolve(&self, w: &Workload) -> Result<Labels, ResolveFailure> {
        let mut out = Labels::new();
        let json = w.to_json();
        for e in self.table.iter().filter(|e| e.plugin.hooks().resolve) {
            match e.plugin.resolve(&json) {
                Ok(l) => out.extend(l),
                Err(_) if e.fail_open => {}
                Err(error) => {
                    return Err(ResolveFailure {
                        plugin: e.plugin.name().to_string(),
                        error,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Rewrites the snapshot's identities with resolver labels (which win
    /// over the pod's own labels of the same key: the pod's author does not
    /// get to contradict the resolver). A workload whose resolver failed is
    /// marked unresolved and denied everything. Returns one warning per
    /// failed workload.
    pub fn resolve_cluster(&self, cluster: &mut Cluster) -> Vec<String> {
        if !self.has_resolvers() {
            return Vec::new();
        }
        let mut warnings = Vec::new();
        for w in &mut cluster.workloads {
            let ns_labels = cluster
                .namespaces
                .get(&w.pod.namespace)
                .map(|n| n.labels.clone())
                .unwrap_or_default();
            let meta = pod_workload(&w.pod, &ns_labels);
            match self.resolve(&meta) {
                Ok(extra) => {
                    let mut labels = w.pod.labels.clone();
                    labels.extend(extra);
                    w.identity = Identity::for_pod(&w.pod.namespace, &ns_labels, &labels);
                }
                Err(f) => {
                    warnings.push(format!(
                        "{}: {f}; denying it everything (fail-closed)",
                        w.display_name()
                    ));
                    w.identity.insert(UNRESOLVED_KEY, f.plugin);
                }
            }
        }
        warnings
    }

    fn id_of(&self, id: Option<&Identity>) -> u64 {
        let Some(id) = id else { return 0 };
        let mut ids = self.ids.lock().expect("poisoned");
        if let Some(&n) = ids.by_identity.get(id) {
            return n;
        }
        // Bounded: a long-lived node meets many peer identities. Clearing
        // only costs recomputing ids; instances keep what they were told.
        if ids.by_identity.len() >= 65_536 {
            ids.by_identity.clear();
            ids.json.clear();
        }
        let n = abi::identity_id(id.iter());
        let map: BTreeMap<String, String> = id
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ids.json.insert(n, abi::labels_json(&map));
        ids.by_identity.insert(id.clone(), n);
        n
    }
}

/// What every CLI command does with a ruleset and a snapshot: load the
/// ruleset's plugins for offline use and resolve the snapshot with them.
/// Returns the plugins and one warning per workload whose resolver failed.
pub fn offline_view(
    rs: &Ruleset,
    cluster: &mut Cluster,
) -> Result<(Option<Plugins>, Vec<String>), String> {
    let p = Plugins::offline(rs)?;
    let warnings = p
        .as_ref()
        .map(|p| p.resolve_cluster(cluster))
        .unwrap_or_default();
    Ok((p, warnings))
}

/// An evaluator of `rs` whose `ask` rules consult `plugins`, if any.
pub fn evaluator<'r>(rs: &'r Ruleset, plugins: Option<&'r Plugins>) -> Evaluator<'r> {
    match plugins {
        Some(p) => Evaluator::new(rs).with_hooks(p),
        None => Evaluator::new(rs),
    }
}

/// The resolver's view of a pod.
pub fn pod_workload(pod: &ClusterPod, ns_labels: &BTreeMap<String, String>) -> Workload {
    Workload {
        kind: "pod".into(),
        name: pod.name.clone(),
        namespace: pod.namespace.clone(),
        labels: pod.labels.clone(),
        annotations: pod.annotations.clone(),
        namespace_labels: ns_labels.clone(),
        images: pod.images.clone(),
    }
}

pub fn protocol_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

impl Hooks for Plugins {
    fn decide(&self, plugin: u32, dir: Direction, flow: &Flow<'_>) -> HookAnswer {
        let Some(e) = self.table.get(plugin as usize) else {
            return HookAnswer::Failed;
        };
        let q = Query {
            src_id: self.id_of(flow.src.identity),
            dst_id: self.id_of(flow.dst.identity),
            src_ip: flow.src.ip,
            dst_ip: flow.dst.ip,
            port: flow.port,
            protocol: protocol_number(flow.protocol),
            direction: match dir {
                Direction::Ingress => QueryDirection::Ingress,
                Direction::Egress => QueryDirection::Egress,
            },
        };
        let mut labels_of = |id: u64| self.ids.lock().expect("poisoned").json.get(&id).cloned();
        match e.plugin.decide(&q, &mut labels_of) {
            Ok(Verdict::Allow) => HookAnswer::Allow,
            Ok(Verdict::Deny) => HookAnswer::Deny,
            Ok(Verdict::Abstain) => HookAnswer::Abstain,
            Err(_) if e.fail_open => HookAnswer::Abstain,
            Err(_) => HookAnswer::Failed,
        }
    }
}

/// A `--plugin NAME=FILE` given to the compiler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginSpec {
    pub name: String,
    pub wasm: Vec<u8>,
    pub settings: Option<String>,
    pub fail_open: bool,
}

impl PluginSpec {
    pub fn from_files(
        name: &str,
        wasm: &Path,
        config: Option<&Path>,
        fail_open: bool,
    ) -> Result<PluginSpec, String> {
        check_plugin_name(name)?;
        Ok(PluginSpec {
            name: name.to_string(),
            wasm: std::fs::read(wasm)
                .map_err(|e| format!("plugin {name}: {}: {e}", wasm.display()))?,
            settings: config.map(settings_json).transpose()?,
            fail_open,
        })
    }
}

/// Plugin names: what `ask` can write and a file name can hold.
pub fn check_plugin_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "plugin name {name:?}: use 1-63 of a-z, 0-9, - and _, starting with a letter"
        ))
    }
}

/// Reads `--plugin NAME=FILE`, `--plugin-config NAME=FILE` (JSON or YAML,
/// stored as compact JSON) and `--plugin-fail-open NAME` into specs.
pub fn read_specs(
    plugins: &[String],
    configs: &[String],
    fail_open: &[String],
) -> Result<Vec<PluginSpec>, String> {
    let split = |s: &str, what: &str| {
        s.split_once('=')
            .map(|(n, f)| (n.to_string(), f.to_string()))
            .ok_or_else(|| format!("{what} {s:?}: expected NAME=FILE"))
    };
    let mut specs: BTreeMap<String, PluginSpec> = BTreeMap::new();
    for p in plugins {
        let (name, file) = split(p, "--plugin")?;
        let spec = PluginSpec::from_files(&name, Path::new(&file), None, false)?;
        if specs.insert(name.clone(), spec).is_some() {
            return Err(format!("plugin {name} given twice"));
        }
    }
    for c in configs {
        let (name, file) = split(c, "--plugin-config")?;
        let spec = specs
            .get_mut(&name)
            .ok_or_else(|| format!("--plugin-config {name}: no --plugin {name}=FILE"))?;
        spec.settings = Some(settings_json(Path::new(&file))?);
    }
    for name in fail_open {
        specs
            .get_mut(name)
            .ok_or_else(|| format!("--plugin-fail-open {name}: no --plugin {name}=FILE"))?
            .fail_open = true;
    }
    Ok(specs.into_values().collect())
}

/// Settings files may be YAML (a superset of JSON); plugins get JSON.
fn settings_json(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let v: serde_json::Value = serde_saphyr::from_str(&text)
        .map_err(|e| format!("{}: not JSON or YAML: {e}", path.display()))?;
    Ok(v.to_string())
}

/// Validates specs by loading them (an ABI violation is a compile error,
/// not a surprise on a node) and checks every `ask` names a decide plugin.
pub fn embed(rs: &mut Ruleset, specs: Vec<PluginSpec>) -> Result<(), String> {
    use sha2::{Digest, Sha256};
    rs.plugins = specs
        .into_iter()
        .map(|s| ruleset::Plugin {
            sha256: Sha256::digest(&s.wasm).into(),
            name: s.name,
            wasm: s.wasm,
            settings: s.settings,
            fail_open: s.fail_open,
        })
        .collect();
    rs.plugins.sort();
    let Some(loaded) = Plugins::offline(rs)? else {
        return Ok(());
    };
    for p in &rs.policies {
        for r in p.ingress.iter().chain(p.egress.iter()).flatten() {
            if let crate::model::Action::Ask(k) = r.action {
                let e = &loaded.table[k as usize];
                if !e.plugin.hooks().decide {
                    return Err(format!(
                        "{}:{}:{}: `ask {}`, but that plugin exports no trireme_decide",
                        rs.sources
                            .get(r.source.file as usize)
                            .map_or("?", String::as_str),
                        r.source.line,
                        r.source.col,
                        e.plugin.name()
                    ));
                }
            }
        }
    }
    Ok(())
}
