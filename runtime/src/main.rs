//! `trireme-runtime`: enforce a compiled ruleset on this node's workloads.

use clap::{Parser, Subcommand};
use nix::sys::signal::{SigSet, Signal};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use trireme_runtime::config::{Config, Fanout};
use trireme_runtime::node::Node;
use trireme_runtime::{endpoints, enforcer::Enforcer, firewall, flowlog, nft, node};

#[derive(Parser)]
#[command(name = "trireme-runtime", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Enforce: program every PU namespace and run the identity handshake.
    /// SIGHUP reloads the config and the ruleset (PUs added, removed and
    /// relabelled; a reload that fails changes nothing); SIGTERM/SIGINT
    /// stop the process and leave the rules in place (fail-closed: new
    /// connections are refused until the runtime is back).
    Run {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Check a config (keys, ruleset, PUs) without touching the kernel.
    Check {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Remove everything this runtime added to the config's PU namespaces.
    Cleanup {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Load and validate a compiled ruleset.
    Ruleset { path: PathBuf },
}

fn log(msg: impl std::fmt::Display) {
    eprintln!("trireme-runtime: {msg}");
}

fn write_stats(path: &Option<PathBuf>, e: &Enforcer) {
    let Some(path) = path else { return };
    let (flows, evicted, expired) = e.flow_stats();
    let mut m: serde_json::Map<String, serde_json::Value> = e
        .counters
        .snapshot()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into()))
        .collect();
    m.insert("pus".into(), e.pus().len().into());
    m.insert("flows_in_handshake".into(), flows.into());
    m.insert("flows_evicted".into(), evicted.into());
    m.insert("flows_expired".into(), expired.into());
    let policy = e.policy();
    m.insert("ruleset".into(), policy.hash.clone().into());
    let plugins: serde_json::Map<String, serde_json::Value> = policy
        .plugin_stats()
        .into_iter()
        .map(|(name, st)| (name, serde_json::to_value(st).unwrap_or_default()))
        .collect();
    if !plugins.is_empty() {
        m.insert("plugins".into(), plugins.into());
        m.insert("unresolved_pus".into(), policy.unresolved.clone().into());
    }
    let tmp = path.with_extension("tmp");
    let body = serde_json::Value::Object(m).to_string();
    if std::fs::write(&tmp, body).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

fn run(config: PathBuf) -> Result<(), String> {
    let cfg = Config::load(&config).map_err(|e| e.to_string())?;
    if cfg.fail_open {
        log(
            "WARNING: failOpen is set: when this runtime is not running, packets bypass enforcement",
        );
    }
    // Block the signals we handle before any thread starts, so that all
    // threads inherit the mask and only `wait` below receives them.
    let mut sigs = SigSet::empty();
    for s in [Signal::SIGHUP, Signal::SIGTERM, Signal::SIGINT] {
        sigs.add(s);
    }
    sigs.thread_block().map_err(|e| e.to_string())?;
    let e = Arc::new(node::enforcer(&cfg, true)?);
    // Both before any PU's rules go in: a port in use or a log that cannot
    // be opened stops the start, rather than leave a node enforced but
    // unobservable.
    let endpoints = match cfg.metrics_address {
        Some(a) => Some(endpoints::bind(a)?),
        None => None,
    };
    if let Some(path) = &cfg.flow_log {
        let sink = flowlog::Sink::parse(path);
        e.set_flow_log(flowlog::start(&sink, &cfg.node, cfg.flow_log_rate)?)?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut node = Node::start(&cfg, &e, &stop)?;
    if let Some(ep) = endpoints {
        let addr = ep.addr;
        ep.serve(e.clone(), node.health(), cfg.node.clone())?;
        log(format!(
            "serving /metrics, /healthz and /readyz on http://{addr}"
        ));
    }
    log(format!(
        "node {}: enforcing {} PUs with ruleset sha256:{} ({} queue(s) each, {}, fail-{})",
        cfg.node,
        cfg.pus.len(),
        e.policy().hash,
        cfg.queue_plan().len(),
        match cfg.fanout {
            Fanout::Cpu => "one per CPU, each thread on its CPU".to_string(),
            Fanout::Flow if cfg.cpus.is_empty() => "flows spread by hash".to_string(),
            Fanout::Flow => format!("flows spread by hash, threads on CPUs {:?}", cfg.cpus),
        },
        if cfg.fail_open { "open" } else { "closed" },
    ));
    if let Some(p) = cfg.stats.clone() {
        let e = e.clone();
        std::thread::Builder::new()
            .name("stats".into())
            .spawn(move || {
                loop {
                    write_stats(&Some(p.clone()), &e);
                    std::thread::sleep(std::time::Duration::from_millis(500));
                }
            })
            .map_err(|e| e.to_string())?;
    }
    loop {
        match sigs.wait().map_err(|e| e.to_string())? {
            Signal::SIGHUP => {
                // Whatever becomes of the reload: after a rotation the
                // log must go to the file at its path again.
                e.reopen_flow_log();
                let r = Config::load(&config)
                    .map_err(|e| e.to_string())
                    .and_then(|new| node.reload(new));
                match r {
                    Ok(done) => {
                        log(format!(
                            "reloaded {}: ruleset sha256:{}; {done}; {} PUs (applies to new connections)",
                            config.display(),
                            e.policy().hash,
                            node.pus()
                        ));
                        for err in done.errors {
                            log(format!("ERROR: {err}"));
                        }
                    }
                    Err(err) => {
                        // For monitoring: a config that never takes effect.
                        e.counters.inc("reloads_refused");
                        log(format!(
                            "reload refused, nothing changed (config, ruleset and PUs as before): {err}"
                        ))
                    }
                }
            }
            s => {
                write_stats(&cfg.stats, &e);
                log(format!(
                    "{s}: stopping; rules stay in place (fail-closed); `trireme-runtime cleanup` removes them"
                ));
                return Ok(());
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run { config } => run(config),
        Cmd::Check { config } => Config::load(&config)
            .map_err(|e| e.to_string())
            .and_then(|cfg| {
                let e = node::enforcer(&cfg, false)?;
                println!(
                    "ok: node {}, {} PUs, ruleset sha256:{}",
                    cfg.node,
                    e.pus().len(),
                    e.policy().hash
                );
                Ok(())
            }),
        Cmd::Cleanup { config } => {
            Config::load(&config)
                .map_err(|e| e.to_string())
                .and_then(|cfg| {
                    let mut errs = Vec::new();
                    for pu in &cfg.pus {
                        if let Err(e) = firewall::remove(&pu.netns_path()) {
                            errs.push(format!("pu {}: {e}", pu.name));
                        }
                        if let Err(e) = nft::remove(&pu.netns_path()) {
                            errs.push(format!("pu {}: {e}", pu.name));
                        }
                    }
                    if errs.is_empty() {
                        Ok(())
                    } else {
                        Err(errs.join("\n"))
                    }
                })
        }
        Cmd::Ruleset { path } => std::fs::read(&path)
            .map_err(|e| format!("{}: {e}", path.display()))
            .and_then(|b| {
                trireme_compiler::ruleset::Ruleset::decode(&b)
                    .map_err(|e| format!("{}: {e}", path.display()))
            })
            .map(|rs| {
                println!(
                    "loaded {}: {} policies, {} rules, sha256:{}",
                    path.display(),
                    rs.policies.len(),
                    rs.rule_count(),
                    rs.content_hash()
                )
            }),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log(format!("error: {e}"));
            ExitCode::from(2)
        }
    }
}
