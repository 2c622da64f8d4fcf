//! The enforcement demo: for each built-in example, one network namespace
//! per pod (at its podIP), a server on each declared TCP port, one
//! `trireme-runtime` enforcing the compiled policies, and a real TCP probe
//! of every pair. Prints the observed matrix beside `trireme matrix`'s.
//! Needs root; removes everything it made on every exit path (the lab's
//! Drop runs on errors and panics, and Ctrl-C is turned into a clean stop).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use trireme_compiler::eval::Evaluator;
use trireme_compiler::matrix::Matrix;
use trireme_compiler::model::Protocol;
use trireme_runtime::lab::{self, Host, Lab};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: nix::libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn table(m: &Matrix, k: usize, observed: Option<&[bool]>) -> Vec<String> {
    let n = m.names.len();
    let w = m.names.iter().map(|s| s.len()).max().unwrap_or(1) + 2;
    let mut lines = vec![format!(
        "{:w$}  {}",
        "from \\ to",
        (0..n).map(|j| format!("{j}")).collect::<Vec<_>>().join(" ")
    )];
    for i in 0..n {
        let cells: Vec<&str> = (0..n)
            .map(|j| {
                let v = observed.map_or(m.allowed[k][i * n + j], |o| o[i * n + j]);
                match (i == j, v) {
                    (true, _) => "-",
                    (false, true) => ".",
                    (false, false) => "X",
                }
            })
            .collect();
        lines.push(format!(
            "{:w$}  {}",
            format!("{i} {}", m.names[i]),
            cells.join(" ")
        ));
    }
    lines
}

fn pu_yaml(w: &trireme_compiler::cluster::Workload, ns: &str, netns: &str) -> String {
    let ports: Vec<serde_json::Value> = w
        .pod
        .ports
        .iter()
        .map(|p| serde_json::json!({"name": p.name, "port": p.port, "protocol": p.protocol.as_str()}))
        .collect();
    let json = |v: &dyn erased::Json| v.json();
    format!(
        "- name: {}\n  netns: {netns}\n  namespace: {}\n  namespaceLabels: {}\n  labels: {}\n  ports: {}\n",
        w.display_name().replace('/', "-"),
        w.pod.namespace,
        ns,
        json(&w.pod.labels),
        serde_json::Value::Array(ports)
    )
}

mod erased {
    pub trait Json {
        fn json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> String {
            serde_json::to_string(self).unwrap_or_default()
        }
    }
}

fn example(dir: &Path, bin: &Path) -> Result<bool, String> {
    use erased::Json;
    let loaded = trireme_compiler::source::load(&[dir.to_path_buf()])
        .map_err(|d| format!("{}: {d:?}", dir.display()))?;
    let rs = trireme_compiler::compile::compile(&loaded);
    let cluster = &loaded.cluster;
    let ports: BTreeSet<u16> = cluster
        .workloads
        .iter()
        .flat_map(|w| w.pod.ports.iter())
        .filter(|p| p.protocol == Protocol::Tcp)
        .map(|p| p.port)
        .collect();
    let ports: Vec<(u16, Protocol)> = ports.into_iter().map(|p| (p, Protocol::Tcp)).collect();
    let ev = Evaluator::new(&rs);
    let m = trireme_compiler::matrix::compute(&ev, cluster, &ports);

    let tag = dir.file_name().and_then(|s| s.to_str()).unwrap_or("x");
    let mut lab = Lab::new(&tag[..tag.len().min(3)], bin);
    let rs_path = lab.dir.join("ruleset.bin");
    std::fs::write(&rs_path, rs.encode()).map_err(|e| e.to_string())?;
    use base64::Engine;
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut key))
        .map_err(|e| e.to_string())?;
    let psk = lab.write(
        "psk.key",
        &base64::engine::general_purpose::STANDARD.encode(key),
    );
    let mut hosts: Vec<Host> = Vec::new();
    let flows = lab.dir.join("flows.jsonl");
    let mut cfg = format!(
        "node: demo-node\nruleset: {}\nkeys: {{psk: {}}}\nflowLog: {}\npus:\n",
        rs_path.display(),
        psk.display(),
        flows.display()
    );
    for (i, w) in cluster.workloads.iter().enumerate() {
        let ip = w
            .pod
            .ips
            .iter()
            .find(|ip| ip.is_ipv4())
            .ok_or_else(|| format!("{} has no IPv4 podIP", w.display_name()))?;
        let h = lab.host(
            &format!("p{i}"),
            &ip.to_string(),
            &format!("fd00::9:{}", i + 1),
        );
        // Every pod listens on every probed port (as upstream's agnhost
        // pods do), so the matrix shows policy, not missing servers.
        for (port, _) in &ports {
            lab::serve(&h, h.ip4, *port);
        }
        let ns_labels = cluster.namespaces[&w.pod.namespace].labels.json();
        cfg += &pu_yaml(w, &ns_labels, &h.ns);
        hosts.push(h);
    }
    lab.start("node", &cfg);
    println!(
        "\n== {}: {} pods, one PU network namespace each, enforced by trireme-runtime (PSK)",
        dir.display(),
        hosts.len()
    );
    let n = hosts.len();
    let mut all_ok = true;
    for (k, (port, _)) in m.ports.iter().enumerate() {
        let probes: Vec<_> = (0..n * n)
            .filter(|i| i / n != i % n)
            .map(|i| {
                let (from, to) = (hosts[i / n].clone(), hosts[i % n].clone());
                let port = *port;
                std::thread::spawn(move || (i, lab::probe(&from, SocketAddr::new(to.ip4, port))))
            })
            .collect();
        let mut observed = vec![false; n * n];
        for p in probes {
            let (i, v) = p.join().map_err(|_| "probe thread panicked")?;
            observed[i] = v;
        }
        if INTERRUPTED.load(Ordering::SeqCst) {
            return Err("interrupted".into());
        }
        let expected = table(&m, k, None);
        let seen = table(&m, k, Some(&observed));
        let same = (0..n * n).all(|i| i / n == i % n || observed[i] == m.allowed[k][i]);
        all_ok &= same;
        println!(
            "\n{port}/TCP ('.' allowed, 'X' denied): {}",
            if same {
                "observed == expected"
            } else {
                "MISMATCH"
            }
        );
        let w = expected.iter().map(|l| l.len()).max().unwrap_or(0);
        println!("{:w$}    observed (real TCP)", "expected (trireme matrix)");
        for (e, o) in expected.iter().zip(&seen) {
            println!("{e:w$}    {o}");
        }
    }
    // The flow log's writer looks for lines every 50 ms.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let names: Vec<(std::net::IpAddr, String)> = hosts
        .iter()
        .zip(&cluster.workloads)
        .map(|(h, w)| (h.ip4, w.display_name()))
        .collect();
    why_denied(&flows, &names);
    println!(
        "\nruntime counters: {}",
        std::fs::read_to_string(&lab.runtimes[0].stats).unwrap_or_default()
    );
    Ok(all_ok)
}

/// Each denial once, from the runtime's flow log: who tried, where, why,
/// and the labels the decision was made on.
fn why_denied(flows: &Path, names: &[(std::net::IpAddr, String)]) {
    let name = |addr: &str| -> (String, String) {
        let a: Option<SocketAddr> = addr.parse().ok();
        let n = a
            .and_then(|a| names.iter().find(|(ip, _)| *ip == a.ip()))
            .map_or(addr.to_string(), |(_, n)| n.clone());
        (n, a.map_or(String::new(), |a| a.port().to_string()))
    };
    let text = std::fs::read_to_string(flows).unwrap_or_default();
    let mut seen = BTreeSet::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["verdict"] != "deny" {
            continue;
        }
        let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
        let (local, local_port) = name(&s("local"));
        let (remote, remote_port) = name(&s("remote"));
        let ((src, _), (dst, port)) = if s("direction") == "ingress" {
            ((remote, remote_port), (local.clone(), local_port))
        } else {
            ((local.clone(), local_port), (remote, remote_port))
        };
        let labels: Vec<String> = v["peer"]["labels"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| !k.starts_with('@'))
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                    .collect()
            })
            .unwrap_or_default();
        let on = if labels.is_empty() {
            "by address".to_string()
        } else {
            let whose = if s("direction") == "ingress" {
                "source"
            } else {
                "destination"
            };
            format!("on the {whose}'s labels {{{}}}", labels.join(", "))
        };
        seen.insert(format!(
            "{src} -> {dst}:{port}  {} at {local}, {on}",
            s("reason")
        ));
    }
    if seen.is_empty() {
        return;
    }
    println!("\nwhy (the runtime's flow log, each denial once):");
    const SHOWN: usize = 12;
    for l in seen.iter().take(SHOWN) {
        println!("  {l}");
    }
    if seen.len() > SHOWN {
        println!("  ... and {} more", seen.len() - SHOWN);
    }
}

fn main() -> ExitCode {
    if !lab::is_root() {
        eprintln!("trireme-demo: needs root (it creates network namespaces)");
        return ExitCode::from(2);
    }
    let handler = nix::sys::signal::SigHandler::Handler(on_signal);
    for s in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
    ] {
        // SAFETY: the handler only stores to an atomic.
        let _ = unsafe { nix::sys::signal::signal(s, handler) };
    }
    let bin = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("trireme-runtime")))
        .unwrap_or_else(|| PathBuf::from("trireme-runtime"));
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dirs: Vec<PathBuf> = if args.is_empty() {
        vec!["testdata/apobeer".into(), "testdata/three-tier".into()]
    } else {
        args.into_iter().map(PathBuf::from).collect()
    };
    let mut ok = true;
    for d in dirs {
        match example(&d, &bin) {
            Ok(same) => ok &= same,
            Err(e) => {
                eprintln!("trireme-demo: {e}");
                return ExitCode::from(2);
            }
        }
    }
    if ok {
        println!("\nall observed matrices equal the compiled policy's");
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
