//! Building a node from its configuration: keys → token engine, PUs →
//! identities, ruleset → evaluator; then the namespaces are programmed and
//! the queue workers started.

use crate::config::{Config, Fanout};
use crate::enforcer::{Enforcer, Loaded, Pu};
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

/// The enforcer for `cfg`, without touching the kernel.
pub fn enforcer(cfg: &Config) -> Result<Enforcer, String> {
    let engine = engine(cfg)?;
    let rs = load_ruleset(cfg)?;
    let pus: Vec<Pu> = cfg
        .pus
        .iter()
        .map(|p| Pu::new(&p.name, p.identity(), p.named_ports()).with_workload(p.workload()))
        .collect();
    let mut by_ip = HashMap::new();
    for r in &cfg.remotes {
        for ip in &r.ips {
            by_ip.insert(*ip, r.identity());
        }
    }
    let mut nodes = HashMap::new();
    for n in &cfg.nodes {
        let labels: trireme_compiler::model::Identity = n.labels.clone().into_iter().collect();
        for ip in &n.ips {
            nodes.insert(*ip, labels.clone());
        }
    }
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
    for p in rs.plugins.iter().filter(|p| p.fail_open) {
        eprintln!(
            "trireme-runtime: WARNING: plugin {} is FAIL-OPEN: when it fails, this node abstains instead of denying",
            p.name
        );
    }
    Enforcer::with_plugin_limits(
        engine,
        pus,
        rs,
        by_ip,
        cfg.max_flows,
        cfg.handshake_timeout * 1000,
        limits,
        cfg.plugins.cache_dir.clone(),
    )
    .map(|e| e.with_nodes(nodes))
}

/// Start the queue workers (one per queue number, each serving every PU),
/// then program every PU namespace.
pub fn start(
    cfg: &Config,
    enforcer: &Arc<Enforcer>,
    stop: &Arc<AtomicBool>,
) -> Result<Vec<std::thread::JoinHandle<()>>, String> {
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
    let mut handles = Vec::new();
    for q in &plan {
        let w = queue::Worker {
            pus: pus.clone(),
            queue: q.queue,
            max_len: 4096,
            spin_us: cfg.spin_micros,
            cpus: q.cpus.clone(),
        };
        handles.push(queue::spawn(w, enforcer.clone(), stop.clone())?);
    }
    for (pu, netns) in cfg.pus.iter().zip(&pus) {
        firewall::apply(netns, &opts).map_err(|e| format!("pu {}: {e}", pu.name))?;
    }
    learn_local_ips(cfg, enforcer)?;
    datagram_tables(cfg, enforcer, &enforcer.policy())?;
    Ok(handles)
}

/// Read every PU's addresses from its namespace (again on each reload:
/// a PU may have been renumbered).
pub fn learn_local_ips(cfg: &Config, e: &Enforcer) -> Result<(), String> {
    let mut ips = HashMap::new();
    for (i, pu) in cfg.pus.iter().enumerate() {
        for ip in
            firewall::addresses(&pu.netns_path()).map_err(|e| format!("pu {}: {e}", pu.name))?
        {
            ips.insert(ip, i);
        }
    }
    e.set_local_ips(ips);
    Ok(())
}

/// Program every PU's UDP/SCTP table from `l` (each PU's table is
/// replaced in one transaction; an error names the PUs that kept their
/// previous table).
pub fn datagram_tables(cfg: &Config, e: &Enforcer, l: &Loaded) -> Result<(), String> {
    let mut errs = Vec::new();
    for (i, pu) in cfg.pus.iter().enumerate() {
        let (t, notes) = e.datagram_tables(l, i);
        for n in notes {
            eprintln!("trireme-runtime: pu {}: {n}", pu.name);
        }
        let elements = [&t.in4, &t.in6, &t.out4, &t.out6]
            .iter()
            .map(|t| t.allow.len() + t.ask.len())
            .sum::<usize>();
        match nft::apply(&pu.netns_path(), &t) {
            Ok(()) => {
                e.counters.inc("datagram_tables_applied");
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

/// SIGHUP: load the ruleset again, program the kernel's datagram tables
/// from it, then put it in force for new TCP handshakes. A ruleset that
/// cannot be loaded changes nothing; `Ok(Some(_))` says which PUs kept
/// their previous datagram table although the ruleset is in force.
pub fn reload(cfg: &Config, e: &Enforcer) -> Result<Option<String>, String> {
    let l = e.prepare(load_ruleset(cfg)?)?;
    learn_local_ips(cfg, e)?;
    let tables = datagram_tables(cfg, e, &l);
    e.install(l);
    Ok(tables
        .err()
        .map(|err| format!("datagram tables not replaced: {err}")))
}
