//! Building a node from its configuration: keys → token engine, PUs →
//! identities, ruleset → evaluator; then the namespaces are programmed and
//! the queue workers started. A reload (SIGHUP) reads the configuration
//! again and carries out the difference: PUs added, removed or relabelled,
//! a new ruleset, new remotes and nodes.

use crate::by_address::PuTables;
use crate::config::{Config, Fanout, PuConfig};
use crate::enforcer::{Enforcer, Inventory, Loaded, Pu};
use crate::firewall;
use crate::nft;
use crate::queue;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;
use trireme_compiler::plugins::host::{Budget, Limits};
use trireme_compiler::ruleset::Ruleset;
use trireme_tokens::handshake::{Config as TokenConfig, Credentials, Engine, PkiCredentials};
use trireme_tokens::keys::{Ca, NodeKey, Psk};

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The token engine for this node's key material.
pub fn engine(cfg: &Config) -> Result<Engine, String> {
    if let Some(p) = &cfg.keys.psk {
        let psk = Psk::from_file(p).map_err(|e| e.to_string())?;
        let tc = TokenConfig::new(&cfg.node, &cfg.audience);
        return Engine::new(tc, Credentials::Psk(Box::new(psk))).map_err(|e| e.to_string());
    }
    let k = cfg.keys.pki.as_ref().ok_or("keys: none configured")?;
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))
    };
    let ca_pem = read(&k.ca)?;
    let td = trireme_tokens::pki::trust_domain(&ca_pem)
        .map_err(|e| format!("{}: {e}", k.ca.display()))?;
    let ca =
        Ca::from_pem(ca_pem.as_bytes(), &td).map_err(|e| format!("{}: {e}", k.ca.display()))?;
    let key = NodeKey::from_pem(&cfg.node, &read(&k.key)?)
        .map_err(|e| format!("{}: {e}", k.key.display()))?;
    let key_token = match &k.key_token {
        Some(p) => Some(read(p)?.trim().to_string()),
        None => None,
    };
    let mut peers = Vec::new();
    if let Some(dir) = &k.peers {
        let (good, bad) = ca
            .load_cert_dir(dir, unix_now(), 30)
            .map_err(|e| e.to_string())?;
        for (p, e) in bad {
            eprintln!(
                "trireme-runtime: warning: {}: not trusted: {e}",
                p.display()
            );
        }
        peers = good;
    }
    let tc = TokenConfig::new(&cfg.node, &td);
    Engine::new(
        tc,
        Credentials::Pki(Box::new(PkiCredentials {
            key,
            ca,
            key_token,
            peers,
        })),
    )
    .map_err(|e| e.to_string())
}

pub fn load_ruleset(cfg: &Config) -> Result<Ruleset, String> {
    let p = &cfg.ruleset;
    let bytes = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
    Ruleset::decode(&bytes).map_err(|e| format!("{}: {e}", p.display()))
}

fn pu_of(p: &PuConfig) -> Pu {
    Pu::new(&p.name, p.identity(), p.named_ports()).with_workload(p.workload())
}

/// What `cfg` says of workloads, with the PUs in `slots`; with their
/// addresses (read from their namespaces) if `learn`.
fn inventory(cfg: &Config, slots: &[Option<PuConfig>], learn: bool) -> Result<Inventory, String> {
    let mut inv = Inventory {
        pus: slots
            .iter()
            .map(|p| p.as_ref().map(|p| Arc::new(pu_of(p))))
            .collect(),
        ..Inventory::default()
    };
    for r in &cfg.remotes {
        for ip in &r.ips {
            inv.by_ip.insert(*ip, r.identity());
        }
    }
    for n in &cfg.nodes {
        let labels: trireme_compiler::model::Identity = n.labels.clone().into_iter().collect();
        for ip in &n.ips {
            inv.nodes.insert(*ip, labels.clone());
        }
    }
    if learn {
        for (i, p) in slots.iter().enumerate() {
            let Some(p) = p else { continue };
            for ip in
                firewall::addresses(&p.netns_path()).map_err(|e| format!("pu {}: {e}", p.name))?
            {
                inv.local_ips.insert(ip, i);
            }
        }
    }
    Ok(inv)
}

/// The enforcer for `cfg`, its PUs in their slots and resolved, with
/// their addresses read from their namespaces if `learn` (`run`; `check`
/// touches no namespace). Resolver plugins run once per PU here, and the
/// inventory is complete before `Node::start` lets any packet in.
pub fn enforcer(cfg: &Config, learn: bool) -> Result<Enforcer, String> {
    let engine = engine(cfg)?;
    let rs = load_ruleset(cfg)?;
    let slots: Vec<_> = cfg.pus.iter().cloned().map(Some).collect();
    let inv = inventory(cfg, &slots, learn)?;
    if cfg.nodes.is_empty() && rs.uses_node_peers() {
        eprintln!(
            "trireme-runtime: WARNING: the ruleset has `nodes` peers but the config lists no nodes: they match nothing on this node"
        );
    }
    let limits = Limits {
        budget: Budget::Deadline(Duration::from_millis(cfg.plugins.timeout_ms.max(1))),
        memory_bytes: cfg.plugins.memory_mib.max(1) << 20,
        ..Limits::runtime()
    };
    warn_fail_open_plugins(&rs);
    let e = Enforcer::with_plugin_limits(
        engine,
        vec![],
        rs,
        HashMap::new(),
        cfg.max_flows,
        cfg.handshake_timeout * 1000,
        limits,
        cfg.plugins.cache_dir.clone(),
    )?;
    e.install_inventory(inv);
    Ok(e)
}

fn warn_fail_open_plugins(rs: &Ruleset) {
    for p in rs.plugins.iter().filter(|p| p.fail_open) {
        eprintln!(
            "trireme-runtime: WARNING: plugin {} is FAIL-OPEN: when it fails, this node abstains instead of denying",
            p.name
        );
    }
}

/// A running node: its enforcer, its queue workers, and the configuration
/// it runs, which a reload compares the new one with.
pub struct Node {
    pub enforcer: Arc<Enforcer>,
    cfg: Config,
    /// The configured PU in each slot (see `Inventory::pus`).
    slots: Vec<Option<PuConfig>>,
    workers: Vec<queue::Handle>,
    opts: firewall::Options,
    /// Each slot's datagram table as last applied: a reload rewrites only
    /// the tables that change (an update of an existing table costs
    /// ~18 ms of kernel commit here, most of a reload of many PUs).
    applied: Vec<Option<PuTables>>,
    health: Arc<crate::health::Health>,
}

/// What a reload changed, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reloaded {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Same namespace, other labels, namespace, ports or metadata.
    pub changed: Vec<String>,
    /// Errors that did not stop the reload (a PU whose datagram table was
    /// not replaced, rules of a removed PU that could not be removed).
    pub errors: Vec<String>,
}

impl std::fmt::Display for Reloaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |v: &[String]| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.join(", ")
            }
        };
        write!(
            f,
            "PUs added: {}; removed: {}; changed: {}",
            list(&self.added),
            list(&self.removed),
            list(&self.changed)
        )
    }
}

impl Node {
    /// Start the queue workers (one per queue number, each serving every
    /// PU), then program every PU namespace. `enforcer` comes from
    /// `enforcer(cfg, true)`: it knows the PUs and their addresses already.
    pub fn start(
        cfg: &Config,
        enforcer: &Arc<Enforcer>,
        stop: &Arc<AtomicBool>,
    ) -> Result<Node, String> {
        let plan = cfg.queue_plan();
        let opts = firewall::Options {
            queue: 0,
            queues: plan.len() as u16,
            cpu_fanout: cfg.fanout == Fanout::Cpu,
            fail_open: cfg.fail_open,
        };
        // Queues first: rules that queue to nobody would drop every new
        // connection of the PU until the workers are up.
        let pus: Vec<_> = cfg.pus.iter().map(|pu| pu.netns_path()).collect();
        let mut workers = Vec::new();
        for q in &plan {
            let w = queue::Worker {
                pus: pus.clone(),
                queue: q.queue,
                max_len: 4096,
                spin_us: cfg.spin_micros,
                cpus: q.cpus.clone(),
            };
            workers.push(queue::spawn(w, enforcer.clone(), stop.clone())?);
        }
        for (pu, netns) in cfg.pus.iter().zip(&pus) {
            firewall::apply(netns, &opts).map_err(|e| format!("pu {}: {e}", pu.name))?;
        }
        let slots: Vec<_> = cfg.pus.iter().cloned().map(Some).collect();
        let mut applied = Vec::new();
        address_tables(&slots, enforcer, &enforcer.policy(), &mut applied)?;
        let health = Arc::new(crate::health::Health::default());
        health.set_workers(
            plan.iter()
                .zip(&workers)
                .map(|(q, w)| (q.queue, w.alive.clone()))
                .collect(),
        );
        let node = Node {
            enforcer: enforcer.clone(),
            cfg: cfg.clone(),
            slots,
            workers,
            opts,
            applied,
            health,
        };
        node.publish_pus();
        node.health.set_ready(true);
        Ok(node)
    }

    /// Close the queues opened for (worker, slot) pairs.
    fn close(&self, opened: &[(usize, usize)]) {
        for &(w, i) in opened {
            let _ = self.workers[w].control.remove(i);
        }
    }

    /// What the probes and the metrics read.
    pub fn health(&self) -> Arc<crate::health::Health> {
        self.health.clone()
    }

    fn publish_pus(&self) {
        let pus = self.slots.iter().flatten();
        self.health
            .set_pus(pus.map(|p| (p.name.clone(), p.netns_path())).collect());
    }

    /// The number of PUs served.
    pub fn pus(&self) -> usize {
        self.slots.iter().flatten().count()
    }

    /// SIGHUP: put `new` in force. A PU is known by its namespace: one
    /// in a namespace not served yet is added (its queues open before its
    /// rules go in); one whose namespace is not listed any more is
    /// removed (its rules, tables and queues go); one whose name, labels
    /// or other fields changed keeps its queues and rules and gets its
    /// new identity for new connections. The ruleset file is read again. Any error before the
    /// swap leaves the node exactly as it was; settings that only a
    /// restart can change make the reload fail, naming them.
    pub fn reload(&mut self, new: Config) -> Result<Reloaded, String> {
        let fixed = self.cfg.restart_only_changes(&new);
        if !fixed.is_empty() {
            return Err(format!(
                "{} changed: only a restart applies {}",
                fixed.join(", "),
                if fixed.len() == 1 { "it" } else { "them" }
            ));
        }
        let Diff {
            slots,
            added,
            removed,
            mut report,
        } = diff(&self.slots, &new.pus);
        let e = self.enforcer.clone();
        let rs = load_ruleset(&new)?;
        warn_fail_open_plugins(&rs);
        let inv = inventory(&new, &slots, true)?;
        let old = e.policy();
        // What is in force while the new PUs' rules go in: the current
        // ruleset and PUs, plus the new PUs, so that their first packets
        // (queued as soon as a rule exists) find their slot.
        let interim = {
            let mut i = old.inventory().clone();
            i.pus.resize(slots.len(), None);
            for &s in &added {
                i.pus[s] = inv.pus[s].clone();
            }
            for (ip, s) in &inv.local_ips {
                if added.contains(s) {
                    i.local_ips.insert(*ip, *s);
                }
            }
            i
        };
        let l = e.prepare_with(rs, inv)?;
        // The new PUs' queues, then their rules; undone on any error.
        let mut listening = Vec::new();
        for &i in &added {
            let p = slots[i].as_ref().expect("an added slot holds its PU");
            for (w, worker) in self.workers.iter().enumerate() {
                // Recorded before the answer: a worker that answers late
                // (after the 10 s timeout) still opens the queue, and the
                // removal queued behind the add closes it again.
                listening.push((w, i));
                if let Err(err) = worker.control.add(i, &p.netns_path()) {
                    self.close(&listening);
                    return Err(format!("pu {}: {err}", p.name));
                }
            }
        }
        if !added.is_empty() {
            e.install_inventory(interim);
        }
        for (n, &i) in added.iter().enumerate() {
            let p = slots[i].as_ref().expect("an added slot holds its PU");
            if let Err(err) = firewall::apply(&p.netns_path(), &self.opts) {
                for &j in &added[..=n] {
                    if let Some(q) = &slots[j] {
                        let _ = firewall::remove(&q.netns_path());
                    }
                }
                e.restore(old);
                self.close(&listening);
                return Err(format!("pu {}: {err}", p.name));
            }
        }
        for &i in &removed {
            if let Some(a) = self.applied.get_mut(i) {
                *a = None;
            }
        }
        if let Err(err) = address_tables(&slots, &e, &l, &mut self.applied) {
            report
                .errors
                .push(format!("datagram tables not replaced: {err}"));
        }
        e.install(l);
        for i in removed {
            let p = self.slots[i].as_ref().expect("a removed slot held its PU");
            let netns = p.netns_path();
            if let Err(err) = firewall::remove(&netns) {
                report.errors.push(format!("pu {}: {err}", p.name));
            }
            if let Err(err) = nft::remove(&netns) {
                report.errors.push(format!("pu {}: {err}", p.name));
            }
            for w in &self.workers {
                if let Err(err) = w.control.remove(i) {
                    report.errors.push(format!("pu {}: {err}", p.name));
                }
            }
            e.forget_pu(i);
        }
        self.slots = slots;
        self.cfg = new;
        self.publish_pus();
        self.health.set_problems(report.errors.clone());
        Ok(report)
    }
}

/// How a new configuration's PUs map onto the running slots.
#[derive(Debug, PartialEq)]
struct Diff {
    slots: Vec<Option<PuConfig>>,
    /// Slots of PUs in a namespace not served yet.
    added: Vec<usize>,
    /// Slots of PUs whose namespace is not listed any more.
    removed: Vec<usize>,
    report: Reloaded,
}

/// A PU is its namespace (that is where its rules and queues are): one
/// that keeps its namespace keeps its slot, renamed or not. New PUs take
/// slots that were free before this reload (a slot freed by it is still
/// served until the swap), then new slots at the end.
fn diff(current: &[Option<PuConfig>], new: &[PuConfig]) -> Diff {
    let mut report = Reloaded::default();
    let mut slots = current.to_vec();
    let mut removed = Vec::new();
    for (i, slot) in current.iter().enumerate() {
        let Some(old) = slot else { continue };
        match new.iter().find(|p| p.netns_path() == old.netns_path()) {
            Some(p) => {
                if p.name != old.name {
                    report
                        .changed
                        .push(format!("{} (was {})", p.name, old.name));
                } else if p != old {
                    report.changed.push(p.name.clone());
                }
                slots[i] = Some(p.clone());
            }
            None => {
                removed.push(i);
                slots[i] = None;
                report.removed.push(old.name.clone());
            }
        }
    }
    let mut added = Vec::new();
    let mut free = (0..current.len()).filter(|&i| current[i].is_none());
    for p in new {
        let kept = current
            .iter()
            .flatten()
            .any(|o| o.netns_path() == p.netns_path());
        if kept {
            continue;
        }
        let i = free.next().unwrap_or_else(|| {
            slots.push(None);
            slots.len() - 1
        });
        slots[i] = Some(p.clone());
        added.push(i);
        report.added.push(p.name.clone());
    }
    Diff {
        slots,
        added,
        removed,
        report,
    }
}

/// Program every PU's UDP/SCTP table from `l` (each PU's table is
/// updated in one transaction, and only if it changed since `applied`;
/// an error names the PUs that kept their previous table).
fn address_tables(
    slots: &[Option<PuConfig>],
    e: &Enforcer,
    l: &Loaded,
    applied: &mut Vec<Option<PuTables>>,
) -> Result<(), String> {
    let mut errs = Vec::new();
    applied.resize(slots.len(), None);
    for (i, pu) in slots.iter().enumerate() {
        let Some(pu) = pu else { continue };
        let (t, notes) = e.address_tables(l, i);
        for n in notes {
            eprintln!("trireme-runtime: pu {}: {n}", pu.name);
        }
        if applied[i].as_ref() == Some(&t) {
            e.counters.inc("address_tables_unchanged");
            continue;
        }
        let elements = [&t.in4, &t.in6, &t.out4, &t.out6]
            .iter()
            .map(|t| t.allow.len() + t.ask.len())
            .sum::<usize>();
        match nft::apply(&pu.netns_path(), &t) {
            Ok(mode) => {
                e.counters.inc("address_tables_applied");
                applied[i] = Some(t.clone());
                if mode == nft::Mode::Replace {
                    // Its hooks were re-registered: the PU's queued
                    // handshake packets were dropped (nft::Mode).
                    e.counters.inc("address_tables_rebuilt");
                }
                e.counters.add("datagram_set_elements", elements as u64);
            }
            Err(err) => {
                e.counters.inc("datagram_table_errors");
                errs.push(format!("pu {}: {err}", pu.name));
            }
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pu(name: &str, netns: &str, role: &str) -> PuConfig {
        let yaml = format!("{{name: {name}, netns: {netns}, labels: {{role: {role}}}}}");
        serde_saphyr::from_str(&yaml).unwrap()
    }

    fn names(slots: &[Option<PuConfig>]) -> Vec<Option<&str>> {
        slots
            .iter()
            .map(|s| s.as_ref().map(|p| p.name.as_str()))
            .collect()
    }

    #[test]
    fn an_unchanged_config_changes_nothing() {
        let cur = vec![Some(pu("a", "na", "x")), None, Some(pu("c", "nc", "y"))];
        let d = diff(&cur, &[pu("c", "nc", "y"), pu("a", "na", "x")]);
        assert_eq!(d.slots, cur, "order in the file does not matter");
        assert!(d.added.is_empty() && d.removed.is_empty());
        assert_eq!(d.report, Reloaded::default());
    }

    #[test]
    fn a_pu_is_its_namespace() {
        let cur = vec![Some(pu("a", "na", "x")), Some(pu("b", "nb", "x"))];
        // a renamed and relabelled in place; b moved to another namespace.
        let d = diff(&cur, &[pu("a2", "na", "z"), pu("b", "nb2", "x")]);
        assert_eq!(names(&d.slots), [Some("a2"), None, Some("b")]);
        assert_eq!((d.added, d.removed), (vec![2], vec![1]));
        assert_eq!(d.report.changed, ["a2 (was a)"]);
        assert_eq!(
            (d.report.added, d.report.removed),
            (vec!["b".into()], vec!["b".into()])
        );
        let d = diff(&cur, &[pu("a", "na", "z"), pu("b", "nb", "x")]);
        assert_eq!(d.report.changed, ["a"], "labels changed");
    }

    /// A hole left by an earlier reload is filled; one left by this reload
    /// is not (its queues are open until the swap).
    #[test]
    fn new_pus_fill_earlier_holes_only() {
        let cur = vec![Some(pu("a", "na", "x")), None, Some(pu("c", "nc", "x"))];
        let d = diff(&cur, &[pu("d", "nd", "x"), pu("e", "ne", "x")]);
        assert_eq!(
            names(&d.slots),
            [None, Some("d"), None, Some("e")],
            "d takes the old hole; a's and c's slots stay empty"
        );
        assert_eq!((d.added, d.removed), (vec![1, 3], vec![0, 2]));
    }
}
