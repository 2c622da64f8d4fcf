//! The node's YAML configuration: which ruleset, which keys, which node
//! this is, and its processing units (network namespaces with labels).
//!
//! This is the embedded PU source used by the demo and the tests; the
//! Kubernetes and Docker sources feed the same `PuConfig` later. Relative
//! paths are relative to the config file, so a config directory can move.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use trireme_compiler::model::{Identity, NamedPort, Protocol};

/// See `Config::fanout`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fanout {
    #[default]
    Cpu,
    Flow,
}

/// One NFQUEUE of a PU: its number and the CPUs its thread may run on
/// (empty: any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuePlan {
    pub queue: u16,
    pub cpus: Vec<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    /// Node id: the `iss` of this node's tokens (the certificate CN in PKI mode).
    pub node: String,
    /// Compiled ruleset (`trireme compile -o`).
    pub ruleset: PathBuf,
    pub keys: Keys,
    /// PSK mode only: the audience tokens must name (PKI mode uses the CA's trust domain).
    #[serde(default = "default_audience")]
    pub audience: String,
    /// Let packets through when no enforcer listens (NFQUEUE bypass). Unsafe;
    /// logged at start.
    #[serde(default)]
    pub fail_open: bool,
    /// How a PU's handshake packets are spread over its queues: `cpu` (the
    /// default) gives each PU one queue per CPU, served by a thread pinned
    /// to that CPU, so that a packet wakes a thread on the CPU it arrived
    /// on; `flow` spreads flows over `queues` queues by hash.
    #[serde(default)]
    pub fanout: Fanout,
    /// `fanout: flow` only: NFQUEUE queues per PU namespace (default 1).
    #[serde(default)]
    pub queues: Option<u16>,
    /// Busy-poll a queue this many µs after each packet before sleeping
    /// (lower handshake latency for some CPU; 0 disables).
    #[serde(default = "default_spin")]
    pub spin_micros: u64,
    /// `fanout: flow` only: pin the queue threads to these CPUs (empty: the scheduler places
    /// them). On a VM, waking a thread on another, idle vCPU costs tens of
    /// µs per handshake packet; keeping the threads on a CPU of their own
    /// (as one pins a dataplane with its NIC's interrupts) avoids it.
    #[serde(default)]
    pub cpus: Vec<usize>,
    /// Connection table capacity (flows in handshake), per node.
    #[serde(default = "default_flows")]
    pub max_flows: usize,
    /// Seconds a handshake may take before its state is forgotten.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout: u64,
    /// Counters are written here as JSON every second (and at exit).
    #[serde(default)]
    pub stats: Option<PathBuf>,
    /// Serve `/metrics` (Prometheus), `/healthz` and `/readyz` on this
    /// address (`0.0.0.0:9464` for a DaemonSet's probes and scrapes). Off
    /// when absent.
    #[serde(default)]
    pub metrics_address: Option<std::net::SocketAddr>,
    /// One JSON line per decision (allowed, denied, dropped with the
    /// reason and the peer's verified labels): a file, appended to, or
    /// `-` for standard output. Off when absent.
    #[serde(default)]
    pub flow_log: Option<PathBuf>,
    /// Flow-log lines per second at most; the rest are counted
    /// (`flow_log_suppressed`). 0: no limit.
    #[serde(default = "default_flow_log_rate")]
    pub flow_log_rate: u64,
    #[serde(default)]
    pub pus: Vec<PuConfig>,
    /// Workloads elsewhere that send no token (not enforced), known by IP:
    /// their traffic is judged with these identities instead of as
    /// external addresses. Trust in an IP is only as good as the network's
    /// anti-spoofing; leave empty to judge such peers by ipBlock alone.
    #[serde(default)]
    pub remotes: Vec<RemoteConfig>,
    /// Cluster nodes by address, with their labels: what the admin tiers'
    /// `nodes` peers select. Without them such peers match nothing here.
    #[serde(default)]
    pub nodes: Vec<NodeConfig>,
    /// Limits and cache for the ruleset's WASM plugins.
    #[serde(default)]
    pub plugins: PluginsConfig,
}

/// The sandbox's knobs; the defaults are safe.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PluginsConfig {
    /// Compiled modules are kept here across restarts (trusted: give it to
    /// this process alone).
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// Wall-clock budget of one plugin call.
    #[serde(default = "default_plugin_timeout")]
    pub timeout_ms: u64,
    /// Linear memory cap per plugin instance.
    #[serde(default = "default_plugin_memory")]
    pub memory_mib: usize,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        PluginsConfig {
            cache_dir: None,
            timeout_ms: default_plugin_timeout(),
            memory_mib: default_plugin_memory(),
        }
    }
}

fn default_plugin_timeout() -> u64 {
    20
}
fn default_plugin_memory() -> usize {
    16
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RemoteConfig {
    pub ips: Vec<std::net::IpAddr>,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default)]
    pub namespace_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeConfig {
    pub name: String,
    pub ips: Vec<std::net::IpAddr>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl RemoteConfig {
    pub fn identity(&self) -> Identity {
        Identity::for_pod(&self.namespace, &self.namespace_labels, &self.labels)
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Keys {
    /// Base64 pre-shared key file (at least 32 bytes once decoded).
    #[serde(default)]
    pub psk: Option<PathBuf>,
    #[serde(default)]
    pub pki: Option<PkiKeys>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PkiKeys {
    /// The cluster CA certificate (its Organization is the trust domain).
    pub ca: PathBuf,
    /// This node's private key (PKCS#8 PEM, P-256).
    pub key: PathBuf,
    /// CA-signed key token sent on the wire so peers need no certificate
    /// of ours beforehand.
    #[serde(default)]
    pub key_token: Option<PathBuf>,
    /// Directory of pre-distributed node certificates (`*.pem`).
    #[serde(default)]
    pub peers: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PuConfig {
    pub name: String,
    /// A named network namespace (`/run/netns/NAME`) or an absolute path
    /// (`/proc/PID/ns/net`).
    pub netns: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default)]
    pub namespace_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Declared ports, for policies that name them.
    #[serde(default)]
    pub ports: Vec<PortConfig>,
    /// For resolver plugins: the workload's container images.
    #[serde(default)]
    pub images: Vec<String>,
    /// For resolver plugins.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortConfig {
    pub name: String,
    pub port: u16,
    #[serde(default = "default_protocol")]
    pub protocol: String,
}

fn default_audience() -> String {
    "trireme".into()
}
/// Highest online CPU id + 1 (`/sys/devices/system/cpu/online`, e.g.
/// "0-3,6"): the kernel's queue choice is `cpu % queues`, so ids, not a
/// count of CPUs, are what matter.
pub fn online_cpus() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|s| {
            s.trim()
                .split(',')
                .filter_map(|r| r.rsplit('-').next()?.parse::<usize>().ok())
                .max()
        })
        .map(|m| m + 1)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn default_flow_log_rate() -> u64 {
    5000
}

fn default_spin() -> u64 {
    0
}
fn default_flows() -> usize {
    65536
}
fn default_handshake_timeout() -> u64 {
    10
}
fn default_namespace() -> String {
    "default".into()
}
fn default_protocol() -> String {
    "TCP".into()
}

#[derive(Debug, thiserror::Error)]
#[error("{path}: {msg}")]
pub struct ConfigError {
    pub path: String,
    pub msg: String,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let err = |msg: String| ConfigError {
            path: path.display().to_string(),
            msg,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let mut cfg: Config = serde_saphyr::from_str(&text).map_err(|e| err(e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.resolve(base);
        cfg.validate().map_err(err)?;
        Ok(cfg)
    }

    fn resolve(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.ruleset);
        if let Some(p) = &mut self.keys.psk {
            fix(p);
        }
        if let Some(k) = &mut self.keys.pki {
            fix(&mut k.ca);
            fix(&mut k.key);
            if let Some(p) = &mut k.key_token {
                fix(p);
            }
            if let Some(p) = &mut k.peers {
                fix(p);
            }
        }
        if let Some(p) = &mut self.stats {
            fix(p);
        }
        if let Some(p) = &mut self.flow_log
            && p.as_os_str() != "-"
        {
            fix(p);
        }
    }

    /// The settings that differ in `new` and that only a restart can
    /// change (the keys, the node's identity, the queues and their
    /// threads, the tables' sizes, the plugins' sandbox). A reload
    /// applies the rest: the ruleset, the PUs, remotes and nodes.
    pub fn restart_only_changes(&self, new: &Config) -> Vec<&'static str> {
        let mut v = Vec::new();
        let mut check = |name, same: bool| {
            if !same {
                v.push(name);
            }
        };
        check("node", self.node == new.node);
        check("keys", self.keys == new.keys);
        check("audience", self.audience == new.audience);
        check("failOpen", self.fail_open == new.fail_open);
        check("fanout", self.fanout == new.fanout);
        check("queues", self.queues == new.queues);
        check("spinMicros", self.spin_micros == new.spin_micros);
        check("cpus", self.cpus == new.cpus);
        check("maxFlows", self.max_flows == new.max_flows);
        check(
            "handshakeTimeout",
            self.handshake_timeout == new.handshake_timeout,
        );
        check("stats", self.stats == new.stats);
        check(
            "metricsAddress",
            self.metrics_address == new.metrics_address,
        );
        check("flowLog", self.flow_log == new.flow_log);
        check("flowLogRate", self.flow_log_rate == new.flow_log_rate);
        check("plugins", self.plugins == new.plugins);
        v
    }

    /// Every PU's queues. With `fanout: cpu`, queue `c` is the one the
    /// kernel picks for packets handled on CPU `c`, so there is one per
    /// online CPU id, and its thread is pinned to CPU `c` when the runtime
    /// may run there (a container's cpuset may forbid it: that queue's
    /// thread then runs on the CPUs allowed).
    pub fn queue_plan(&self) -> Vec<QueuePlan> {
        match self.fanout {
            Fanout::Flow => (0..self.queues.unwrap_or(1))
                .map(|queue| QueuePlan {
                    queue,
                    cpus: self.cpus.clone(),
                })
                .collect(),
            Fanout::Cpu => {
                let allowed = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).ok();
                let may = |c: usize| allowed.is_none_or(|a| a.is_set(c).unwrap_or(false));
                (0..online_cpus().min(64) as u16)
                    .map(|queue| QueuePlan {
                        queue,
                        cpus: if may(queue as usize) {
                            vec![queue as usize]
                        } else {
                            vec![]
                        },
                    })
                    .collect()
            }
        }
    }

    fn validate(&self) -> Result<(), String> {
        match (&self.keys.psk, &self.keys.pki) {
            (Some(_), Some(_)) => return Err("keys: give either psk or pki, not both".into()),
            (None, None) => {
                return Err("keys: no key material (psk or pki); there is no default key".into());
            }
            _ => {}
        }
        match (self.fanout, self.queues) {
            (Fanout::Cpu, Some(_)) => {
                return Err(
                    "queues: only with `fanout: flow` (`fanout: cpu` makes one queue per CPU)"
                        .into(),
                );
            }
            (Fanout::Cpu, None) if !self.cpus.is_empty() => {
                return Err("cpus: only with `fanout: flow` (`fanout: cpu` pins each queue's thread to its own CPU)".into());
            }
            (Fanout::Flow, Some(q)) if q == 0 || q > 64 => {
                return Err(format!("queues: {q} is not in 1..=64"));
            }
            _ => {}
        }
        if self.max_flows < 16 {
            return Err("maxFlows: at least 16".into());
        }
        let cpu_max = nix::sched::CpuSet::count();
        if let Some(c) = self.cpus.iter().find(|c| **c >= cpu_max) {
            return Err(format!("cpus: {c} is not a CPU number (0..{cpu_max})"));
        }
        let mut names = std::collections::BTreeSet::new();
        let mut netns = std::collections::BTreeMap::new();
        for pu in &self.pus {
            if !names.insert(&pu.name) {
                return Err(format!("pus: duplicate name {:?}", pu.name));
            }
            // One PU per namespace: its rules and queues are the namespace's.
            if let Some(other) = netns.insert(pu.netns_path(), &pu.name) {
                return Err(format!(
                    "pus: {other:?} and {:?} are the same network namespace {}",
                    pu.name,
                    pu.netns_path().display()
                ));
            }
            if pu.netns.is_empty() || (!pu.netns.starts_with('/') && pu.netns.contains('/')) {
                return Err(format!(
                    "pu {}: netns {:?} must be a name under /run/netns or an absolute path",
                    pu.name, pu.netns
                ));
            }
            for k in pu.labels.keys() {
                if k.starts_with('@') {
                    return Err(format!(
                        "pu {}: label key {k:?} is reserved (system labels start with '@')",
                        pu.name
                    ));
                }
            }
            for p in &pu.ports {
                if Protocol::parse(&p.protocol).is_none() {
                    return Err(format!(
                        "pu {}: port {}: unknown protocol {:?}",
                        pu.name, p.name, p.protocol
                    ));
                }
            }
        }
        Ok(())
    }
}

impl PuConfig {
    pub fn netns_path(&self) -> PathBuf {
        if self.netns.starts_with('/') {
            PathBuf::from(&self.netns)
        } else {
            Path::new("/run/netns").join(&self.netns)
        }
    }

    /// The PU's identity, built exactly as the compiler builds a pod's.
    pub fn identity(&self) -> Identity {
        Identity::for_pod(&self.namespace, &self.namespace_labels, &self.labels)
    }

    /// What resolver plugins see of this PU (the compiler shows them a pod
    /// the same way).
    pub fn workload(&self) -> trireme_compiler::plugins::host::Workload {
        trireme_compiler::plugins::host::Workload {
            kind: "netns".into(),
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            labels: self.labels.clone(),
            annotations: self.annotations.clone(),
            namespace_labels: self.namespace_labels.clone(),
            images: self.images.clone(),
        }
    }

    pub fn named_ports(&self) -> Vec<NamedPort> {
        self.ports
            .iter()
            .map(|p| NamedPort {
                name: p.name.clone(),
                port: p.port,
                protocol: Protocol::parse(&p.protocol).unwrap_or(Protocol::Tcp),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        let dir = std::env::temp_dir().join(format!("trcfg{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = dir.join(format!("{n}.yaml"));
        std::fs::write(&p, text).unwrap();
        let r = Config::load(&p);
        let _ = std::fs::remove_file(&p);
        r
    }

    const BASE: &str = "node: n\nruleset: rs.bin\nkeys: {psk: k}\n";

    /// A reload applies the ruleset, PUs, remotes and nodes; it names
    /// every other setting that changed, which only a restart applies.
    #[test]
    fn a_reload_names_the_settings_only_a_restart_applies() {
        let pus = "pus:\n- {name: a, netns: a, labels: {x: y}}\n";
        let c = load(&format!("{BASE}{pus}")).unwrap();
        let same = load(&format!(
            "{BASE}pus:\n- {{name: b, netns: b}}\nremotes:\n- {{ips: [198.18.0.9]}}\n"
        ))
        .unwrap();
        assert!(c.restart_only_changes(&same).is_empty());
        let other = load(
            "node: m\nruleset: other.bin\nkeys: {psk: k2}\nmaxFlows: 99\nfanout: flow\nplugins: {timeoutMs: 5}\nmetricsAddress: 127.0.0.1:9464\nflowLog: '-'\n",
        )
        .unwrap();
        assert_eq!(
            c.restart_only_changes(&other),
            [
                "node",
                "keys",
                "fanout",
                "maxFlows",
                "metricsAddress",
                "flowLog",
                "plugins"
            ]
        );
        // `-` is standard output, not a file next to the config; a
        // relative path is.
        assert_eq!(other.flow_log.as_deref(), Some(std::path::Path::new("-")));
        let rel = load(&format!("{BASE}flowLog: flows.jsonl\n")).unwrap();
        assert!(rel.flow_log.unwrap().is_absolute());
        let bad = load(&format!("{BASE}metricsAddress: localhost\n")).unwrap_err();
        assert!(bad.msg.contains("metricsAddress"), "{bad}");
    }

    #[test]
    fn two_pus_may_not_share_a_namespace() {
        let e = load(&format!(
            "{BASE}pus:\n- {{name: a, netns: x}}\n- {{name: b, netns: /run/netns/x}}\n"
        ))
        .unwrap_err();
        assert!(
            e.msg
                .contains(r#""a" and "b" are the same network namespace /run/netns/x"#),
            "{e}"
        );
    }

    #[test]
    fn one_queue_per_cpu_by_default() {
        let c = load(BASE).unwrap();
        assert_eq!(c.fanout, Fanout::Cpu);
        let plan = c.queue_plan();
        assert_eq!(plan.len(), online_cpus().min(64));
        for (i, q) in plan.iter().enumerate() {
            assert_eq!(q.queue as usize, i);
            assert_eq!(q.cpus, vec![i], "each queue's thread on its own CPU");
        }
        let e = load(&format!("{BASE}queues: 2\n")).unwrap_err();
        assert!(e.msg.contains("queues: only with `fanout: flow`"), "{e}");
        let e = load(&format!("{BASE}cpus: [0]\n")).unwrap_err();
        assert!(e.msg.contains("cpus: only with `fanout: flow`"), "{e}");
        let e = load(&format!("{BASE}fanout: cpus\n")).unwrap_err();
        assert!(e.msg.contains("fanout"), "{e}");
    }

    #[test]
    fn flow_fanout_queues_can_be_pinned() {
        let flow = format!("{BASE}fanout: flow\n");
        let c = load(&flow).unwrap();
        assert_eq!(
            c.queue_plan(),
            vec![QueuePlan {
                queue: 0,
                cpus: vec![]
            }],
            "one unpinned queue"
        );
        let c = load(&format!("{flow}cpus: [0, 1]\nqueues: 2\n")).unwrap();
        assert_eq!(c.queue_plan().len(), 2);
        assert!(c.queue_plan().iter().all(|q| q.cpus == vec![0, 1]));
        let e = load(&format!("{flow}cpus: [100000]\n")).unwrap_err();
        assert!(e.msg.contains("cpus: 100000 is not a CPU number"), "{e}");
        let e = load(&format!("{flow}cpus: [-1]\n")).unwrap_err();
        assert!(e.msg.contains("cpus"), "{e}");
        let e = load(&format!("{flow}queues: 0\n")).unwrap_err();
        assert!(e.msg.contains("queues: 0 is not in 1..=64"), "{e}");
    }
}
