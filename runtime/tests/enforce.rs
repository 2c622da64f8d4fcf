//! End to end, for real: network namespaces, veths, iptables-nft rules,
//! NFQUEUE, two `trireme-runtime` processes (two nodes), real TCP. Needs root.

mod common;
use common::*;
use nix::sys::signal::Signal;
use std::net::SocketAddr;
use std::time::Duration;
use trireme_runtime::nft;

const POLICIES: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: backend, namespace: beer}
spec:
  podSelector: {matchLabels: {role: backend}}
  ingress:
  - from: [{podSelector: {matchLabels: {role: frontend}}}]
    ports: [{port: 80}]
  - from: [{ipBlock: {cidr: 198.18.1.0/24, except: [198.18.1.31/32]}}]
    ports: [{port: 80}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: frontend, namespace: beer}
spec:
  podSelector: {matchLabels: {role: frontend}}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {role: backend}}}]
    ports: [{port: 80}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db, namespace: beer}
spec:
  podSelector: {matchLabels: {role: db}}
  ingress:
  - from: [{podSelector: {matchLabels: {role: backend}}}]
    ports: [{port: 5432}]
"#;

fn skip() -> bool {
    if !is_root() {
        eprintln!("skipped: needs root (network namespaces)");
        return true;
    }
    false
}

struct Beer {
    lab: Lab,
    fe: Host,
    be: Host,
    db: Host,
    ext: Host,
    ext2: Host,
    web: Host,
}

fn pu(name: &str, h: &Host, role: &str) -> String {
    format!(
        "- {{name: {name}, netns: {}, namespace: beer, labels: {{role: {role}}}}}\n",
        h.ns
    )
}

/// Two nodes: A runs the frontend, B the backend and the database; ext
/// and ext2 enforce nothing.
fn beer(tag: &str, keys_a: &str, keys_b: &str) -> Beer {
    beer_with(tag, keys_a, keys_b, "", "")
}

/// `beer`, with more configuration for node A and node B.
fn beer_with(tag: &str, keys_a: &str, keys_b: &str, extra_a: &str, extra_b: &str) -> Beer {
    let mut lab = lab(tag);
    let fe = lab.host("fe", "198.18.1.10", "fd00::1:10");
    let be = lab.host("be", "198.18.1.20", "fd00::1:20");
    let db = lab.host("db", "198.18.1.40", "fd00::1:40");
    let ext = lab.host("ext", "198.18.1.30", "fd00::1:30");
    let ext2 = lab.host("ext2", "198.18.1.31", "fd00::1:31");
    let web = lab.host("web", "198.18.1.50", "fd00::1:50");
    let rs = lab.compile("rs.bin", POLICIES);
    let a = format!(
        "node: node-a\nruleset: {}\nkeys: {keys_a}\n{extra_a}pus:\n{}",
        rs.display(),
        pu("fe", &fe, "frontend")
    );
    let b = format!(
        "node: node-b\nruleset: {}\nkeys: {keys_b}\n{extra_b}pus:\n{}{}{}",
        rs.display(),
        pu("be", &be, "backend"),
        pu("db", &db, "db"),
        pu("web", &web, "web")
    );
    lab.start("a", &a);
    lab.start("b", &b);
    Beer {
        lab,
        fe,
        be,
        db,
        ext,
        ext2,
        web,
    }
}

fn psk(lab_dir: &std::path::Path, name: &str, byte: u8) -> String {
    use base64::Engine;
    let p = lab_dir.join(name);
    std::fs::write(
        &p,
        base64::engine::general_purpose::STANDARD.encode([byte; 32]),
    )
    .unwrap();
    format!("{{psk: {}}}", p.display())
}

fn at(h: &Host, port: u16) -> SocketAddr {
    SocketAddr::new(h.ip4, port)
}

fn at6(h: &Host, port: u16) -> SocketAddr {
    SocketAddr::new(h.ip6, port)
}

#[test]
fn psk_labels_ports_directions_ipblock_ipv6_and_bulk() {
    if skip() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("trpsk{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let k = psk(&dir, "psk.key", 7);
    let t = beer("p", &k, &k);
    for h in [&t.be, &t.db, &t.ext, &t.web] {
        serve(h, h.ip4, 80);
        serve(h, h.ip6, 80);
    }
    serve(&t.be, t.be.ip4, 81);
    serve(&t.db, t.db.ip4, 5432);

    // Ingress by labels and ports, across nodes.
    assert!(probe(&t.fe, at(&t.be, 80)), "frontend -> backend:80");
    assert!(!probe(&t.fe, at(&t.be, 81)), "backend allows only port 80");
    assert!(probe(&t.be, at(&t.db, 5432)), "backend -> db:5432");
    assert!(!probe(&t.be, at(&t.db, 80)), "db allows only 5432");
    // Egress: the frontend may only call backends on 80.
    assert!(!probe(&t.fe, at(&t.db, 5432)), "frontend egress to db");
    assert!(probe(&t.be, at(&t.web, 80)), "web has no ingress policy");
    assert!(!probe(&t.fe, at(&t.web, 80)), "frontend egress to web");
    assert!(
        !probe(&t.fe, at(&t.ext, 80)),
        "frontend egress to a non-enforced host"
    );
    // A non-enforced destination, no egress policy: judged by IP, allowed.
    assert!(probe(&t.be, at(&t.ext, 80)), "backend -> external host");
    // Non-enforced sources: by ipBlock (with its except).
    assert!(probe(&t.ext, at(&t.be, 80)), "ipBlock admits 198.18.1.30");
    assert!(!probe(&t.ext2, at(&t.be, 80)), "ipBlock except 198.18.1.31");
    assert!(!probe(&t.ext, at(&t.db, 5432)), "db admits only backends");
    // IPv6, same identities (the ipBlock is v4-only: ext is refused on v6).
    assert!(probe(&t.fe, at6(&t.be, 80)), "v6 frontend -> backend");
    assert!(!probe(&t.fe, at6(&t.db, 80)), "v6 frontend -> db");
    assert!(!probe(&t.ext, at6(&t.be, 80)), "v6 external -> backend");
    // 100 MB arrive byte-identical through an authorized flow.
    let n = 100 << 20;
    let got = fetch(&t.fe, at(&t.be, 80), n, Duration::from_secs(2));
    assert_eq!(got.as_deref(), Some(expected_sha256(n).as_str()));

    let l = &t.lab;
    assert!(l.counter(1, "ingress_allowed") >= 3, "{}", l.stats(1));
    assert!(l.counter(1, "ingress_denied") >= 2, "{}", l.stats(1));
    assert!(l.counter(1, "ingress_denied_by_ip") >= 2, "{}", l.stats(1));
    assert!(l.counter(0, "egress_denied") >= 1, "{}", l.stats(0));
    assert!(l.counter(0, "egress_denied_by_ip") >= 1, "{}", l.stats(0));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_node_with_the_wrong_key_is_refused() {
    if skip() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("trwk{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let t = beer("w", &psk(&dir, "a.key", 1), &psk(&dir, "b.key", 2));
    serve(&t.be, t.be.ip4, 80);
    serve(&t.fe, t.fe.ip4, 80);
    assert!(!probe(&t.fe, at(&t.be, 80)));
    assert!(!probe(&t.be, at(&t.fe, 80)));
    assert!(
        t.lab.counter(1, "token_signature") >= 1,
        "{}",
        t.lab.stats(1)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pki_nodes_and_a_foreign_ca() {
    if skip() {
        return;
    }
    use trireme_tokens::pki;
    let dir = std::env::temp_dir().join(format!("trpki{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    pki::ca_init(&dir.join("ca"), "td.example", 30, false).unwrap();
    pki::ca_init(&dir.join("evil"), "td.example", 30, false).unwrap();
    pki::issue(&dir.join("ca"), "node-a", None, &dir.join("a"), 30, false).unwrap();
    pki::issue(&dir.join("ca"), "node-b", None, &dir.join("b"), 30, false).unwrap();
    pki::issue(&dir.join("evil"), "node-a", None, &dir.join("e"), 30, false).unwrap();
    let keys = |who: &str, ca: &str| {
        format!(
            "{{pki: {{ca: {d}/{ca}/ca.pem, key: {d}/{who}/node-{n}.key, keyToken: {d}/{who}/node-{n}.keytoken}}}}",
            d = dir.display(),
            n = if who == "b" { "b" } else { "a" }
        )
    };
    let t = beer("k", &keys("a", "ca"), &keys("b", "ca"));
    serve(&t.be, t.be.ip4, 80);
    serve(&t.fe, t.fe.ip4, 80);
    assert!(probe(&t.fe, at(&t.be, 80)), "PKI frontend -> backend");
    assert!(!probe(&t.fe, at(&t.be, 81)));
    let n = 1 << 20;
    let got = fetch(&t.fe, at(&t.be, 80), n, Duration::from_secs(2));
    assert_eq!(got.as_deref(), Some(expected_sha256(n).as_str()));
    drop(t);

    // Node A's key and certificate from another CA: refused.
    let t = beer("e", &keys("e", "evil"), &keys("b", "ca"));
    serve(&t.be, t.be.ip4, 80);
    assert!(!probe(&t.fe, at(&t.be, 80)), "foreign CA must be refused");
    assert!(t.lab.counter(1, "dropped") >= 1, "{}", t.lab.stats(1));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn killed_runtime_fails_closed_restart_and_policy_update() {
    if skip() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("trkill{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let k = psk(&dir, "psk.key", 9);
    let mut t = beer("r", &k, &k);
    serve(&t.be, t.be.ip4, 80);
    let mut established = open(&t.fe, at(&t.be, 80)).expect("allowed connection");
    assert!(exchange(&mut established, 1000));

    // Kill node B (the backend's enforcer) hard.
    t.lab.kill(1);
    assert!(
        exchange(&mut established, 100_000),
        "established flow continues"
    );
    assert!(!probe(&t.fe, at(&t.be, 80)), "new connection while down");
    t.lab.restart(1);
    assert!(probe(&t.fe, at(&t.be, 80)), "new connection after restart");
    // The restart replaced the chains and found the jumps to them in
    // place: one per hook and family, not a second set.
    assert_eq!(our_jumps(&t.be), 4);

    // Policy update: the backend now admits nobody.
    let rs = t.lab.dir.join("rs.bin");
    let deny = POLICIES
        .replace(
            "role: frontend}}}]\n    ports: [{port: 80}]",
            "role: nobody}}}]\n    ports: [{port: 80}]",
        )
        .replace("198.18.1.0/24, except: [198.18.1.31/32]", "198.18.9.0/24");
    let denied = t.lab.compile("deny.bin", &deny);
    std::fs::copy(&denied, &rs).unwrap();
    let mut before = open(&t.fe, at(&t.be, 80)).expect("allowed before the update");
    t.lab.signal(1, Signal::SIGHUP);
    t.lab.signal(0, Signal::SIGHUP);
    let t0 = std::time::Instant::now();
    while t.lab.counter(1, "policy_updates") == 0 {
        assert!(t0.elapsed() < Duration::from_secs(5), "no reload");
    }
    assert!(!probe(&t.fe, at(&t.be, 80)), "denied after the update");
    // Documented: established flows keep running under the old decision.
    assert!(
        exchange(&mut before, 1000),
        "established flow survives the update"
    );
    assert!(exchange(&mut established, 1000));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A SYN captured on the wire and re-sent (after the original connection
/// closed) never reaches the server application; nor does a SYN whose
/// token was altered. Uses Debian's python3-scapy in the bridge namespace.
#[test]
fn replayed_and_tampered_syns_never_reach_the_server() {
    if skip() {
        return;
    }
    let py = "/usr/bin/python3";
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/replay.py");
    let dir = std::env::temp_dir().join(format!("trrp{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let k = psk(&dir, "psk.key", 5);
    let t = beer("s", &k, &k);
    let server = serve(&t.be, t.be.ip4, 80);
    let pcap = t.lab.dir.join("syn.pcap");
    let ready = t.lab.dir.join("ready");
    let br = t.lab.bridge_ns().to_string();
    let mut cap = std::process::Command::new("ip")
        .args(["netns", "exec", &br, py, script, "capture"])
        .arg(&pcap)
        .arg("br0")
        .arg(&ready)
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !ready.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "sniffer did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(probe(&t.fe, at(&t.be, 80)), "the original connection");
    assert!(cap.wait().unwrap().success(), "capture failed");
    assert_eq!(server.accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    std::thread::sleep(Duration::from_millis(300));

    let send = |mode: &str| {
        let st = std::process::Command::new("ip")
            .args(["netns", "exec", &br, py, script, mode])
            .arg(&pcap)
            .arg("br0")
            .status()
            .unwrap();
        assert!(st.success(), "{mode} failed");
    };
    send("replay");
    send("replay");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        server.accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "a replayed SYN reached the application"
    );
    assert!(
        t.lab.counter(1, "token_replay") >= 1,
        "replay not detected: {}",
        t.lab.stats(1)
    );

    let before = t.lab.counter(1, "dropped");
    send("tamper");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        server.accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "a tampered SYN reached the application"
    );
    let stats = t.lab.stats(1);
    assert!(t.lab.counter(1, "dropped") > before, "{stats}");
    assert!(
        ["token_signature", "token_malformed", "token_mac"]
            .iter()
            .map(|c| t.lab.counter(1, c))
            .sum::<u64>()
            >= 1,
        "{stats}"
    );
    // And the real client still gets through.
    assert!(probe(&t.fe, at(&t.be, 80)));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Add a PREROUTING rule in `table` of `h`'s namespace for token ACKs:
/// pure ACKs (no SYN/FIN/RST/PSH) longer than 100 bytes carry a token.
fn on_token_acks(h: &Host, table: &str, then: &[&str]) {
    let mut args = vec![
        "ip",
        "netns",
        "exec",
        &h.ns,
        "iptables",
        "-t",
        table,
        "-A",
        "PREROUTING",
        "-p",
        "tcp",
        "--tcp-flags",
        "SYN,ACK,FIN,RST,PSH",
        "ACK",
        "-m",
        "length",
        "--length",
        "100:400",
    ];
    args.extend_from_slice(then);
    sh(&args);
}

/// The initiator's token-carrying ACK is lost once (a raw-table rule in
/// the server's namespace drops the first one): the server re-sends its
/// SYN-ACK, the client's kernel answers with another ACK that carries the
/// token again, and the connection completes instead of stalling.
#[test]
fn a_lost_token_ack_is_recovered() {
    if skip() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("trlost{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let k = psk(&dir, "psk.key", 3);
    let t = beer("l", &k, &k);
    serve(&t.be, t.be.ip4, 80);
    // Drop every other token ACK, starting with the first.
    on_token_acks(
        &t.be,
        "raw",
        &[
            "-m",
            "statistic",
            "--mode",
            "nth",
            "--every",
            "2",
            "--packet",
            "0",
            "-j",
            "DROP",
        ],
    );
    let got = fetch(&t.fe, at(&t.be, 80), 4096, Duration::from_secs(5));
    assert_eq!(got.as_deref(), Some(expected_sha256(4096).as_str()));
    // The re-sent SYN-ACK revoked the client's provisional mark, so its
    // kernel's answer came back to the runtime for the token.
    assert!(t.lab.counter(0, "revoked") >= 1, "{}", t.lab.stats(0));
    assert!(t.lab.counter(0, "ack_resent") >= 1, "{}", t.lab.stats(0));
    // Meanwhile the server held the client's tokenless request.
    assert!(t.lab.counter(1, "held") >= 1, "{}", t.lab.stats(1));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The client's request overtakes its token ACK (here forced: a test
/// queue in the server's namespace delays every token ACK by 50 ms before
/// the server's runtime sees it). The server's runtime holds the tokenless
/// request until the ACK is verified, then lets it through: no drop, no
/// retransmission timeout.
#[test]
fn data_that_overtakes_the_token_ack_is_held_then_released() {
    if skip() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("trover{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let k = psk(&dir, "psk.key", 4);
    let t = beer("o", &k, &k);
    serve(&t.be, t.be.ip4, 80);
    on_token_acks(&t.be, "mangle", &["-j", "NFQUEUE", "--queue-num", "9"]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let delayed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // The delaying queue must listen before the first token ACK: the rule
    // queues without bypass, so an ACK sent before the bind would be lost
    // (and the held request expire before the SYN-ACK's retransmission).
    let (bound, listening) = std::sync::mpsc::channel();
    let delayer = {
        let (path, stop, delayed) = (t.be.path(), stop.clone(), delayed.clone());
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap();
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let mut q = nfq::Queue::open().unwrap();
            q.bind(9).unwrap();
            q.set_nonblocking(true);
            bound.send(()).unwrap();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match q.recv() {
                    Ok(mut m) => {
                        std::thread::sleep(Duration::from_millis(50));
                        m.set_verdict(nfq::Verdict::Accept);
                        q.verdict(m).unwrap();
                        delayed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        })
    };
    listening.recv_timeout(Duration::from_secs(10)).unwrap();
    for _ in 0..3 {
        let got = fetch(&t.fe, at(&t.be, 80), 4096, Duration::from_secs(5));
        assert_eq!(got.as_deref(), Some(expected_sha256(4096).as_str()));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    delayer.join().unwrap();
    assert!(delayed.load(std::sync::atomic::Ordering::SeqCst) >= 3);
    let stats = t.lab.stats(1);
    assert!(t.lab.counter(1, "held") >= 3, "{stats}");
    assert!(t.lab.counter(1, "released") >= 3, "{stats}");
    assert_eq!(t.lab.counter(1, "ack_without_token"), 0, "{stats}");
    // The client never needed a second ACK.
    assert_eq!(t.lab.counter(0, "ack_resent"), 0, "{}", t.lab.stats(0));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Each runtime thread's name and the CPUs it may run on.
fn thread_cpus(pid: u32) -> Vec<(String, String)> {
    let task = std::path::PathBuf::from(format!("/proc/{pid}/task"));
    let mut out = Vec::new();
    for t in std::fs::read_dir(&task).unwrap() {
        let t = t.unwrap().path();
        let comm = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(t.join("status")).unwrap_or_default();
        let allowed = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap_or_default()
            .trim()
            .to_string();
        out.push((comm.trim().to_string(), allowed));
    }
    out
}

/// A node running one PU (`web`) at `ip4`, with `extra` config lines.
/// The queue worker threads of process `pid`.
fn nfq_threads(pid: u32) -> usize {
    thread_cpus(pid)
        .into_iter()
        .filter(|(comm, _)| comm.starts_with("nfq-"))
        .count()
}

fn one_pu_node(tag: &str, ip4: &str, extra: &str) -> (Lab, Host, usize) {
    let mut lab = lab(tag);
    let ip6 = format!("fd00::1:{}", ip4.rsplit('.').next().unwrap());
    let h = lab.host("h", ip4, &ip6);
    let rs = lab.compile("rs.bin", POLICIES);
    let k = psk(&lab.dir, "psk.key", 5);
    let i = lab.start(
        tag,
        &format!(
            "node: node-{tag}\nruleset: {}\nkeys: {k}\n{extra}pus:\n{}",
            rs.display(),
            pu("h", &h, "web")
        ),
    );
    (lab, h, i)
}

/// `fanout: flow` with `cpus`: the queue threads, and only them, run on
/// the CPUs given.
#[test]
fn queue_threads_are_pinned_to_the_configured_cpus() {
    if skip() {
        return;
    }
    let (lab, _h, i) = one_pu_node("c", "198.18.1.60", "fanout: flow\ncpus: [0]\nqueues: 2\n");
    let multi = std::thread::available_parallelism().map_or(1, |n| n.get()) > 1;
    let mut pinned = 0;
    for (comm, allowed) in thread_cpus(lab.runtimes[i].pid()) {
        if comm.starts_with("nfq-") {
            assert_eq!(allowed, "0", "{comm}");
            pinned += 1;
        } else if multi {
            assert_ne!(allowed, "0", "{comm} should not be pinned");
        }
    }
    assert_eq!(pinned, 2, "one thread per queue");
    assert!(lab.log(i).contains("threads on CPUs [0]"), "{}", lab.log(i));
}

/// The default, `fanout: cpu`: one queue per CPU, the kernel picks the
/// queue of the CPU that handles the packet, and that queue's thread runs
/// on that CPU only (so handing a packet over never wakes another CPU).
#[test]
fn by_default_each_cpu_has_its_queue_and_thread() {
    if skip() {
        return;
    }
    let (lab, h, i) = one_pu_node("f", "198.18.1.61", "");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let queues: Vec<(String, String)> = thread_cpus(lab.runtimes[i].pid())
        .into_iter()
        .filter(|(comm, _)| comm.starts_with("nfq-"))
        .collect();
    assert_eq!(queues.len(), cpus, "{queues:?}");
    for (comm, allowed) in &queues {
        // Thread `nfq-<queue>` serves queue c, and runs on CPU c.
        let c = comm.rsplit('-').next().unwrap();
        assert_eq!(allowed, c, "{comm}");
    }
    let rules = String::from_utf8(
        std::process::Command::new("ip")
            .args(["netns", "exec", &h.ns, "iptables", "-S", "TRIREME-IN"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    if cpus > 1 {
        assert!(
            rules.contains(&format!(
                "--queue-balance 0:{} --queue-cpu-fanout",
                cpus - 1
            )),
            "{rules}"
        );
    }
    assert!(lab.log(i).contains("one per CPU"), "{}", lab.log(i));
}

/// One worker thread per queue serves that queue in every PU's namespace:
/// threads are bounded by CPUs, not PUs × CPUs, and two PUs of one node
/// handshake through the same threads (allowed and denied alike), on the
/// SYN alone (the same-node path: docs/enforcer.md).
#[test]
fn queue_threads_are_shared_by_the_pus_of_a_node() {
    if skip() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("trsh{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let k = psk(&dir, "psk.key", 9);
    let t = beer("s", &k, &k);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let nfq = |i: usize| nfq_threads(t.lab.runtimes[i].pid());
    assert_eq!(nfq(1), cpus, "node B serves three PUs");
    assert_eq!(nfq(0), cpus, "node A serves one PU");
    serve(&t.db, t.db.ip4, 5432);
    serve(&t.db, t.db.ip6, 5432);
    serve(&t.db, t.db.ip4, 80);
    serve(&t.web, t.web.ip4, 80);
    for _ in 0..20 {
        assert!(probe(&t.be, at(&t.db, 5432)), "backend -> db, same node");
        assert!(probe(&t.be, at(&t.web, 80)), "backend -> web, same node");
    }
    assert!(probe(&t.be, at6(&t.db, 5432)), "backend -> db over IPv6");
    assert!(!probe(&t.be, at(&t.db, 80)), "db admits only 5432");
    assert!(
        t.lab.counter(1, "ingress_allowed") >= 40,
        "{}",
        t.lab.stats(1)
    );
    assert!(
        t.lab.counter(1, "ingress_denied") >= 1,
        "{}",
        t.lab.stats(1)
    );
    // Same node: decided on the SYN on both sides. Only the SYNs reached
    // userspace; the kernel carried every SYN-ACK and ACK.
    assert!(
        t.lab.counter(1, "local_handshakes") >= 41,
        "{}",
        t.lab.stats(1)
    );
    for kind in ["synack_out", "synack_in", "ack_out", "ack_in"] {
        assert_eq!(
            t.lab.counter(1, &format!("handled_{kind}")),
            0,
            "{kind}: {}",
            t.lab.stats(1)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `spinMicros`: a worker polls its queues for a while after a packet
/// instead of sleeping, and still serves every connection.
#[test]
fn busy_polling_workers_serve_connections() {
    if skip() {
        return;
    }
    let (mut lab, web, i) = one_pu_node("y", "198.18.1.62", "spinMicros: 300\n");
    let cli = lab.host("cli", "198.18.1.63", "fd00::1:63");
    serve(&web, web.ip4, 80);
    serve(&cli, cli.ip4, 80);
    for _ in 0..10 {
        // Out: the SYN takes a token, the tokenless SYN-ACK is judged by
        // the worker. In: the kernel decides cli's tokenless SYNs.
        assert!(probe(&web, at(&cli, 80)), "web has no egress policy");
        assert!(probe(&cli, at(&web, 80)), "web has no ingress policy");
    }
    assert!(
        lab.counter(i, "egress_allowed_by_ip") >= 10,
        "{}",
        lab.stats(i)
    );
    assert!(nft_counter(&web, "in_allowed") >= 10);
}

/// A peer that sends no token is judged by its address in the kernel:
/// allowed SYNs never reach the queue, denied ones reach it (to be
/// counted and logged) at most at the kernel's rate, and a flood of them
/// is dropped in the kernel while the PU's handshakes go on.
#[test]
fn tokenless_syns_are_decided_in_the_kernel() {
    if skip() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("trtl{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let k = psk(&dir, "psk.key", 9);
    let t = beer("t", &k, &k);
    serve(&t.be, t.be.ip4, 80);
    serve(&t.be, t.be.ip6, 80);
    let l = &t.lab;
    let syns_in = || l.counter(1, "handled_syn_in");

    // Allowed by the ipBlock: the kernel marks the flow, and no packet of
    // the connection reaches userspace.
    let before = syns_in();
    for _ in 0..5 {
        assert!(probe(&t.ext, at(&t.be, 80)), "ipBlock admits 198.18.1.30");
    }
    assert_eq!(syns_in(), before, "{}", l.stats(1));
    assert_eq!(l.counter(1, "ingress_allowed_by_ip"), 0);
    assert!(nft_counter(&t.be, "in_allowed") >= 5);
    // Denied (the except; and v6, which the ipBlock does not cover): on
    // to the queue, which gives the same verdict and counts it.
    assert!(!probe(&t.ext2, at(&t.be, 80)), "ipBlock except 198.18.1.31");
    assert!(!probe(&t.ext, at6(&t.be, 80)), "v6 external -> backend");
    assert!(l.counter(1, "ingress_denied_by_ip") >= 2, "{}", l.stats(1));
    // A token still goes to the handshake.
    let denied = syns_in();
    assert!(probe(&t.fe, at(&t.be, 80)), "frontend -> backend:80");
    assert!(syns_in() > denied);

    // A flood of spoofed-looking SYNs from a denied address.
    let (queued, dropped) = (syns_in(), nft_counter(&t.be, "in_dropped"));
    let n = 3000;
    let start = std::time::Instant::now();
    let flood = format!(
        "from scapy.all import IP, TCP, send\n\
         send(IP(src='{}', dst='{}')/TCP(sport=(20000, {}), dport=80, flags='S'), verbose=0)",
        t.ext2.ip4,
        t.be.ip4,
        20000 + n - 1
    );
    let ok = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &t.ext2.ns,
            "/usr/bin/python3",
            "-c",
            &flood,
        ])
        .status()
        .unwrap()
        .success();
    assert!(ok, "scapy flood");
    let secs = start.elapsed().as_secs() + 1;
    let reached = syns_in() - queued;
    let bound = nft::QUEUED_DENIALS_PER_SECOND as u64 * (1 + secs);
    let kernel = nft_counter(&t.be, "in_dropped") - dropped;
    eprintln!(
        "flood of {n}: {reached} reached the queue, {kernel} dropped in the kernel, {secs} s"
    );
    assert!(
        reached <= bound,
        "{reached} SYNs reached the queue in {secs} s"
    );
    assert!(kernel >= n - bound, "the kernel dropped the rest");
    // The PU's handshakes go on.
    assert!(probe(&t.fe, at(&t.be, 80)), "frontend -> backend after it");
    let _ = std::fs::remove_dir_all(&dir);
}

/// One iptables rule added (`-A`) or deleted (`-D`) in `table`/`chain` of
/// a test host's own namespace.
fn host_rule(h: &Host, table: &str, op: &str, chain: &str, rule: &[&str]) {
    let mut args = vec![
        "ip", "netns", "exec", &h.ns, "iptables", "-t", table, op, chain,
    ];
    args.extend_from_slice(rule);
    sh(&args);
}

/// One connection from `from`, bound to `port`, to `to`:80: a 64-byte
/// exchange, then close (with a reset if `reset`). "ok", "refused" when the
/// connection does not open, anything else on another failure.
fn client_from_port(from: &Host, port: u16, to: &Host, reset: bool) -> String {
    let script = format!(
        "import socket, struct\n\
         s = socket.socket()\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('{from}', {port}))\n\
         s.settimeout(4)\n\
         try:\n    s.connect(('{to}', 80))\n\
         except OSError:\n    print('refused'); raise SystemExit\n\
         s.sendall(struct.pack('>Q', 64))\n\
         got = b''\n\
         while len(got) < 64:\n    got += s.recv(64 - len(got))\n\
         if {reset}:\n    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))\n\
         s.close()\n\
         print('ok')\n",
        from = from.ip4,
        to = to.ip4,
        reset = if reset { "True" } else { "False" }
    );
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &from.ns, "/usr/bin/python3", "-c", &script])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The rule (raw table, before conntrack) that lets a host's resets from
/// `port` pass untracked: the peer's socket goes, the conntrack entry stays
/// established, mark included.
fn untracked_resets(port: &str) -> Vec<&str> {
    vec![
        "-p",
        "tcp",
        "--sport",
        port,
        "--tcp-flags",
        "RST",
        "RST",
        "-j",
        "CT",
        "--notrack",
    ]
}

/// Put `yaml` in force on runtime `i` (compile, replace its ruleset,
/// SIGHUP) and wait until it has reloaded.
fn update_policy(lab: &Lab, i: usize, yaml: &str) {
    std::fs::copy(lab.compile("update.bin", yaml), lab.dir.join("rs.bin")).unwrap();
    lab.signal(i, Signal::SIGHUP);
    let t0 = std::time::Instant::now();
    while lab.counter(i, "policy_updates") == 0 {
        assert!(t0.elapsed() < Duration::from_secs(5), "no reload");
    }
}

/// Whether `h` holds an established connection with local or remote `port`.
fn holds_connection(h: &Host, port: u16) -> bool {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &h.ns, "ss", "-tnH", "state", "established"])
        .output()
        .unwrap();
    let port = format!(":{port}");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .any(|w| w.ends_with(&port))
}

/// A client restarts and reuses its address and port while the server
/// still holds the old connection (a pod's address recycled, a crashed
/// process): the server's kernel answers the new SYN with a bare ACK, the
/// client's kernel answers that with a reset, and the SYN's retransmission
/// opens a new connection. Both runtimes let those two segments through
/// instead of leaving the port unusable until the stale connection dies.
#[test]
fn a_stale_connection_at_the_server_does_not_block_port_reuse() {
    if skip() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("trstale{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let k = psk(&dir, "psk.key", 5);
    let t = beer("s", &k, &k);
    serve(&t.be, t.be.ip4, 80);
    // The client's resets never leave (dropped after conntrack saw them),
    // so the server keeps its side of the first connection.
    let rst = [
        "-p",
        "tcp",
        "--sport",
        "40123",
        "--tcp-flags",
        "RST",
        "RST",
        "-j",
        "DROP",
    ];
    host_rule(&t.fe, "mangle", "-A", "POSTROUTING", &rst);
    assert_eq!(
        client_from_port(&t.fe, 40123, &t.be, true),
        "ok",
        "first connection"
    );
    host_rule(&t.fe, "mangle", "-D", "POSTROUTING", &rst);
    assert!(
        holds_connection(&t.be, 40123),
        "the server still holds the first connection"
    );
    assert_eq!(
        client_from_port(&t.fe, 40123, &t.be, false),
        "ok",
        "the same port again, while the server holds the old connection"
    );
    assert!(
        t.lab.counter(0, "stale_connection_ack") >= 1,
        "{}",
        t.lab.stats(0)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A new connection never inherits the conntrack mark of an older one on
/// its tuple. Conntrack ignores a SYN that arrives on an entry it still
/// believes established (here: the old connection's reset was not
/// tracked), and keeps the entry, mark included; the SYN would then take
/// the fast path without a decision. After a policy update that denies the
/// peer, reusing the old connection's address and port must be denied.
#[test]
fn a_syn_never_inherits_the_mark_of_an_older_connection() {
    if skip() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("trinherit{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let k = psk(&dir, "psk.key", 6);
    let t = beer("i", &k, &k);
    serve(&t.be, t.be.ip4, 80);
    // The client's reset reaches the server untracked: the server's socket
    // goes, the conntrack entry stays established and marked.
    let untracked = untracked_resets("40125");
    host_rule(&t.be, "raw", "-A", "PREROUTING", &untracked);
    assert_eq!(
        client_from_port(&t.ext, 40125, &t.be, true),
        "ok",
        "allowed by ipBlock"
    );
    host_rule(&t.be, "raw", "-D", "PREROUTING", &untracked);
    assert!(
        !holds_connection(&t.be, 40125),
        "the server's socket is gone"
    );

    // The backend now admits no address block.
    let deny = POLICIES.replace("198.18.1.0/24, except: [198.18.1.31/32]", "198.18.9.0/24");
    update_policy(&t.lab, 1, &deny);
    assert_eq!(
        client_from_port(&t.ext, 40125, &t.be, true),
        "refused",
        "the same tuple, after the update"
    );
    assert!(
        t.lab.counter(1, "ingress_denied_by_ip") >= 1,
        "{}",
        t.lab.stats(1)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same on the initiator's side: a SYN leaving on a tuple whose old
/// entry is still marked (egress once allowed by IP to a peer that does
/// not enforce) must carry a token and meet the egress decision again.
/// After an update that denies the PU all egress, reusing the tuple fails.
#[test]
fn an_outgoing_syn_never_inherits_the_mark_of_an_older_connection() {
    if skip() {
        return;
    }
    let (mut lab, web, i) = one_pu_node("o", "198.18.1.60", "");
    let srv = lab.host("srv", "198.18.1.61", "fd00::1:61");
    serve(&srv, srv.ip4, 80);
    // The client's reset leaves untracked: the server's socket goes, the
    // client's conntrack entry stays established and marked.
    let untracked = untracked_resets("40126");
    host_rule(&web, "raw", "-A", "OUTPUT", &untracked);
    assert_eq!(
        client_from_port(&web, 40126, &srv, true),
        "ok",
        "egress allowed"
    );
    host_rule(&web, "raw", "-D", "OUTPUT", &untracked);
    assert!(
        !holds_connection(&srv, 40126),
        "the server's socket is gone"
    );

    let deny = format!(
        "{POLICIES}---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {{name: web-egress, namespace: beer}}\n\
         spec:\n  podSelector: {{matchLabels: {{role: web}}}}\n  policyTypes: [Egress]\n"
    );
    update_policy(&lab, i, &deny);
    assert_eq!(
        client_from_port(&web, 40126, &srv, true),
        "refused",
        "the same tuple, after the update"
    );
    assert!(
        lab.counter(i, "egress_denied_by_ip") >= 1,
        "{}",
        lab.stats(i)
    );
}

/// A PU of the `shop` namespace, for the SHOP policies.
fn shop_pu(name: &str, h: &Host, role: &str) -> String {
    format!(
        "- {{name: {name}, netns: {}, namespace: shop, labels: {{role: {role}}}}}\n",
        h.ns
    )
}

const SHOP: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api, namespace: shop}
spec:
  podSelector: {matchLabels: {role: api}}
  ingress:
  - from: [{podSelector: {matchLabels: {role: client}}}]
    ports: [{port: 80}]
"#;

/// The jumps to our chains from INPUT and OUTPUT, both families.
fn our_jumps(h: &Host) -> usize {
    ["iptables-save", "ip6tables-save"]
        .iter()
        .map(|tool| {
            let o = std::process::Command::new("ip")
                .args(["netns", "exec", &h.ns, tool])
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| *l == "-A INPUT -j TRIREME-IN" || *l == "-A OUTPUT -j TRIREME-OUT")
                .count()
        })
        .sum()
}

/// Whether anything of ours is in `h`'s namespace: our iptables chains
/// or our nftables table.
fn has_our_rules(h: &Host) -> bool {
    let out = |args: &[&str]| {
        let o = std::process::Command::new("ip")
            .args(["netns", "exec", &h.ns])
            .args(args)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    };
    let (_, ipt) = out(&["iptables-save"]);
    let (_, ip6t) = out(&["ip6tables-save"]);
    let (table, _) = out(&["nft", "list", "table", "inet", "trireme"]);
    ipt.contains("TRIREME") || ip6t.contains("TRIREME") || table
}

/// SIGHUP reads the config again and carries out the difference while
/// the node runs: a PU added gets its queues and rules (and is enforced
/// at once), a PU removed loses everything we put in its namespace, a PU
/// relabelled is judged by its new labels on new connections, a PU
/// renamed in the same namespace stays, and a removed PU's slot serves a
/// PU added later. A reload that changes a restart-only setting, names a
/// namespace that does not exist, one that another runtime serves or one
/// whose rules cannot all go in, or is not valid YAML, is refused and
/// changes nothing.
#[test]
fn a_reload_adds_removes_and_relabels_pus() {
    if skip() {
        return;
    }
    let mut lab = lab("u");
    let cli = lab.host("cli", "198.18.1.80", "fd00::1:80");
    let api1 = lab.host("api1", "198.18.1.81", "fd00::1:81");
    let api2 = lab.host("api2", "198.18.1.82", "fd00::1:82");
    let other = lab.host("other", "198.18.1.84", "fd00::1:84");
    for h in [&api1, &api2] {
        serve(h, h.ip4, 80);
    }
    let rs = lab.compile("rs.bin", SHOP);
    let k = psk(&lab.dir, "psk.key", 3);
    let config = |extra: &str, pus: &[String]| {
        format!(
            "node: node-u\nruleset: {}\nkeys: {k}\n{extra}pus:\n{}",
            rs.display(),
            pus.concat()
        )
    };
    let i = lab.start(
        "u",
        &config(
            "",
            &[
                shop_pu("cli", &cli, "client"),
                shop_pu("api1", &api1, "api"),
            ],
        ),
    );
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let nfq = |lab: &Lab| nfq_threads(lab.runtimes[i].pid());
    assert!(probe(&cli, at(&api1, 80)), "client -> api1");
    assert!(!probe(&other, at(&api1, 80)), "api1 admits clients only");
    assert!(has_our_rules(&api1) && !has_our_rules(&api2));

    // api1 goes, api2 comes, cli is relabelled.
    let line = lab.reconfigure(
        i,
        &config(
            "",
            &[
                shop_pu("cli", &cli, "stranger"),
                shop_pu("api2", &api2, "api"),
            ],
        ),
    );
    assert!(
        line.contains("added: api2; removed: api1; changed: cli; 2 PUs"),
        "{line}"
    );
    assert_eq!(lab.counter(i, "pus"), 2);
    assert!(!has_our_rules(&api1), "a removed PU keeps nothing of ours");
    assert!(has_our_rules(&api2));
    assert_eq!(nfq(&lab), cpus, "the same workers serve the new PU");
    let denied = lab.counter(i, "ingress_denied");
    assert!(!probe(&cli, at(&api2, 80)), "a stranger may not reach api2");
    assert!(
        lab.counter(i, "ingress_denied") > denied,
        "{}",
        lab.stats(i)
    );
    assert!(
        probe(&cli, at(&api1, 80)),
        "api1 is not enforced any more (cli has no egress policy)"
    );

    // cli is a client again, api2 is renamed (same namespace: the same
    // PU, its queues and rules kept); api1 comes back, into the slot it
    // left.
    let line = lab.reconfigure(
        i,
        &config(
            "",
            &[
                shop_pu("cli", &cli, "client"),
                shop_pu("api-two", &api2, "api"),
                shop_pu("api1", &api1, "api"),
            ],
        ),
    );
    assert!(
        line.contains("added: api1; removed: none; changed: cli, api-two (was api2); 3 PUs"),
        "{line}"
    );
    for _ in 0..5 {
        assert!(probe(&cli, at(&api2, 80)), "client -> api2");
        assert!(probe(&cli, at(&api1, 80)), "client -> api1");
    }
    assert!(!probe(&other, at(&api1, 80)), "api1 is enforced again");
    assert_eq!(lab.counter(i, "pus"), 3);

    // Refused, and nothing changes.
    let good = config(
        "",
        &[
            shop_pu("cli", &cli, "client"),
            shop_pu("api-two", &api2, "api"),
            shop_pu("api1", &api1, "api"),
        ],
    );
    let line = lab.reconfigure(
        i,
        &config("maxFlows: 999\n", &[shop_pu("cli", &cli, "client")]),
    );
    assert!(
        line.contains("reload refused") && line.contains("maxFlows changed"),
        "{line}"
    );
    let line = lab.reconfigure(
        i,
        &(good.clone() + "- {name: ghost, netns: trireme-no-such-ns, labels: {role: api}}\n"),
    );
    assert!(
        line.contains("reload refused") && line.contains("pu ghost"),
        "{line}"
    );
    // A namespace another runtime serves: its queues cannot be bound.
    let taken = lab.host("taken", "198.18.1.85", "fd00::1:85");
    serve(&taken, taken.ip4, 80);
    let other_node = format!(
        "node: node-v\nruleset: {}\nkeys: {k}\npus:\n{}",
        rs.display(),
        shop_pu("taken", &taken, "api")
    );
    let v = lab.start("v", &other_node);
    let line = lab.reconfigure(i, &(good.clone() + &shop_pu("taken", &taken, "api")));
    assert!(
        line.contains("reload refused")
            && line.contains("pu taken")
            && line.contains("another enforcer?"),
        "{line}"
    );
    assert!(has_our_rules(&taken), "the other runtime's rules stay");
    assert!(!probe(&other, at(&taken, 80)), "and it still enforces");
    assert!(
        lab.counter(v, "ingress_denied_by_ip") >= 1,
        "{}",
        lab.stats(v)
    );
    // A namespace whose ip6 filter table iptables-nft cannot use (a base
    // chain of someone else's at another priority): the new PU's queues
    // open and its IPv4 rules go in, its IPv6 rules fail, and all of it
    // is undone.
    let odd = lab.host("odd", "198.18.1.86", "fd00::1:86");
    for cmd in [
        "add table ip6 filter",
        "add chain ip6 filter INPUT { type filter hook input priority 10; }",
    ] {
        sh(&["ip", "netns", "exec", &odd.ns, "nft", cmd]);
    }
    let pid = lab.runtimes[i].pid();
    let fds = open_fds(pid);
    let line = lab.reconfigure(i, &(good.clone() + &shop_pu("odd", &odd, "api")));
    assert!(
        line.contains("reload refused") && line.contains("pu odd") && line.contains("ip6tables"),
        "{line}"
    );
    assert!(!has_our_rules(&odd), "the IPv4 rules were undone");
    assert_eq!(open_fds(pid), fds, "its queues were closed");
    assert_eq!(lab.counter(i, "pus"), 3);
    let line = lab.reconfigure(i, "node: [unclosed\n");
    assert!(
        line.contains("reload refused") && line.contains("u.yaml"),
        "{line}"
    );
    assert!(has_our_rules(&api1) && has_our_rules(&api2));
    assert!(probe(&cli, at(&api2, 80)) && probe(&cli, at(&api1, 80)));
    assert!(!probe(&other, at(&api2, 80)));
    let line = lab.reconfigure(i, &good);
    assert!(
        line.contains("added: none; removed: none; changed: none"),
        "{line}"
    );
    assert_eq!(lab.counter(i, "reloads_refused"), 5, "{}", lab.stats(i));
}

/// Descriptors open in process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Reloads that add and remove a PU and change a live PU's datagram
/// table, over and over, while two other PUs talk: none of their
/// connections is disturbed (none waits for a SYN retransmission, 1 s),
/// and the runtime ends with the descriptors and threads it started with
/// (no socket left behind by a removed PU).
/// Before the datagram tables were updated in place, each reload
/// re-registered every PU's nftables hooks, which makes the kernel drop
/// the packets waiting in that namespace's queues: this test caught it.
#[test]
fn reloads_do_not_disturb_the_other_pus() {
    if skip() {
        return;
    }
    let mut lab = lab("w");
    let cli = lab.host("cli", "198.18.1.90", "fd00::1:90");
    let api = lab.host("api", "198.18.1.91", "fd00::1:91");
    let extra = lab.host("extra", "198.18.1.92", "fd00::1:92");
    serve(&api, api.ip4, 80);
    serve(&extra, extra.ip4, 80);
    // Two rulesets whose datagram tables for api differ (a UDP rule), so
    // that each reload also updates a live PU's table in place.
    let rs = lab.compile("rs.bin", SHOP);
    let udp = SHOP.to_string()
        + "  - from: [{ipBlock: {cidr: 198.18.7.0/24}}]\n    ports: [{port: 53, protocol: UDP}]\n";
    let rs_udp = lab.compile("rs-udp.bin", &udp);
    let k = psk(&lab.dir, "psk.key", 4);
    let config = |rs: &std::path::Path, with_extra: bool| {
        format!(
            "node: node-w\nruleset: {}\nkeys: {k}\npus:\n{}{}{}",
            rs.display(),
            shop_pu("cli", &cli, "client"),
            shop_pu("api", &api, "api"),
            if with_extra {
                shop_pu("extra", &extra, "api")
            } else {
                String::new()
            }
        )
    };
    let base = config(&rs, false);
    let i = lab.start("w", &base);
    let pid = lab.runtimes[i].pid();
    assert!(probe(&cli, at(&api, 80)));
    let (fds, threads) = (open_fds(pid), thread_cpus(pid).len());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let talker = {
        let (cli, api, stop) = (cli.clone(), api.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut slow = Vec::new();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = std::time::Instant::now();
                let ok = probe(&cli, at(&api, 80));
                if !ok || t.elapsed() > Duration::from_millis(900) {
                    slow.push((ok, t.elapsed()));
                }
                n += 1;
            }
            (n, slow)
        })
    };
    for round in 0..10 {
        let line = lab.reconfigure(i, &config(&rs_udp, true));
        assert!(line.contains("added: extra;"), "round {round}: {line}");
        assert!(probe(&cli, at(&extra, 80)), "round {round}: extra enforced");
        let line = lab.reconfigure(i, &base);
        assert!(line.contains("removed: extra;"), "round {round}: {line}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (n, slow) = talker.join().unwrap();
    assert!(n >= 20, "only {n} connections during the reloads");
    assert!(
        slow.is_empty(),
        "disturbed connections: {slow:?}\n{}",
        lab.stats(i)
    );
    assert_eq!(
        lab.counter(i, "address_tables_rebuilt"),
        0,
        "every table was updated in place"
    );
    // Per round: extra's new table, and api's updated twice (in place);
    // cli's table never changes, nor does a table whose content is the
    // same, so neither is written again.
    assert!(lab.counter(i, "address_tables_applied") >= 2 + 30);
    assert!(lab.counter(i, "address_tables_unchanged") >= 20);
    // A packet the kernel flushed from a queue makes our verdict on it
    // fail (ENOENT, read back as a receive error).
    assert_eq!(lab.counter(i, "queue_recv_errors"), 0, "{}", lab.stats(i));
    assert_eq!(open_fds(pid), fds, "descriptors after 10 add/remove rounds");
    assert_eq!(thread_cpus(pid).len(), threads);
    assert!(!has_our_rules(&extra));
}

/// The kernel drops the packets waiting in a namespace's queues when a
/// netfilter hook is unregistered there (someone deletes an nftables
/// table of theirs, say). Our verdict on such a packet comes back as an
/// error: it is counted, costs no pause and no log line, and the
/// client's retransmitted SYN connects.
#[test]
fn a_packet_flushed_from_a_queue_costs_one_retransmission() {
    if skip() {
        return;
    }
    let (mut lab, web, i) = one_pu_node("f", "198.18.1.94", "");
    let cli = lab.host("cli", "198.18.1.95", "fd00::1:95");
    // web connects out: its SYN takes a token, so it goes to the queue
    // (a tokenless SYN from cli would be decided in the kernel).
    serve(&cli, cli.ip4, 80);
    assert!(probe(&web, at(&cli, 80)), "web has no egress policy");
    // The runtime stopped, a SYN waits in web's queue. (Stopped means
    // every thread is: a queue thread running on the other CPU when the
    // signal is sent could still answer the SYN.)
    lab.signal(i, Signal::SIGSTOP);
    let pid = lab.runtimes[i].pid();
    let stopped = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            .all(|t| {
                let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
                stat.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('T')
            })
    };
    while !stopped() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let client = {
        let (web, to) = (web.clone(), at(&cli, 80));
        std::thread::spawn(move || {
            let t = std::time::Instant::now();
            let ok = fetch(&web, to, 64, Duration::from_secs(5)).is_some();
            (ok, t.elapsed())
        })
    };
    // Until the kernel says a packet waits (the third field of each
    // queue's line is the number waiting).
    let waiting = || {
        let o = std::process::Command::new("ip")
            .args(["netns", "exec", &web.ns, "cat"])
            .arg("/proc/net/netfilter/nfnetlink_queue")
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().nth(2)?.parse::<u64>().ok())
            .sum::<u64>()
    };
    let t0 = std::time::Instant::now();
    while waiting() == 0 {
        assert!(t0.elapsed() < Duration::from_secs(5), "no SYN queued");
        std::thread::sleep(Duration::from_millis(10));
    }
    let nft = |cmd: &str| sh(&["ip", "netns", "exec", &web.ns, "nft", cmd]);
    nft("add table inet other");
    nft("add chain inet other c { type filter hook input priority 5; }");
    nft("delete table inet other");
    assert_eq!(waiting(), 0, "unregistering a hook flushed the queue");
    lab.signal(i, Signal::SIGCONT);
    let (ok, took) = client.join().unwrap();
    assert!(ok, "the retransmitted SYN connects");
    assert!(
        took >= Duration::from_millis(900),
        "the first SYN was lost: {took:?}"
    );
    assert!(
        lab.counter(i, "queue_stale_verdicts") >= 1,
        "{}",
        lab.stats(i)
    );
    assert_eq!(lab.counter(i, "queue_recv_errors"), 0);
    assert!(!lab.log(i).contains("of pu slot"), "{}", lab.log(i));
}

/// A node may start with no PU at all and get its PUs by reloads, as a
/// workload source would drive it: the first PU added is enforced.
#[test]
fn a_node_started_empty_gets_its_pus_by_reload() {
    if skip() {
        return;
    }
    let mut lab = lab("e");
    let cli = lab.host("cli", "198.18.1.97", "fd00::1:97");
    let api = lab.host("api", "198.18.1.98", "fd00::1:98");
    serve(&api, api.ip4, 80);
    let rs = lab.compile("rs.bin", SHOP);
    let k = psk(&lab.dir, "psk.key", 6);
    let head = format!("node: node-e\nruleset: {}\nkeys: {k}\n", rs.display());
    let i = lab.start("e", &head);
    assert_eq!(lab.counter(i, "pus"), 0);
    assert!(probe(&cli, at(&api, 80)), "nothing enforced yet");
    let line = lab.reconfigure(i, &format!("{head}pus:\n{}", shop_pu("api", &api, "api")));
    assert!(line.contains("added: api;"), "{line}");
    assert!(
        !probe(&cli, at(&api, 80)),
        "api admits clients only, by label"
    );
    assert_eq!(lab.counter(i, "pus"), 1);
    let line = lab.reconfigure(i, &head);
    assert!(line.contains("removed: api;"), "{line}");
    assert!(probe(&cli, at(&api, 80)), "not enforced any more");
    assert!(!has_our_rules(&api));
}

/// A plain HTTP/1.0 GET (the server closes after its answer): the status
/// and the body.
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// Where a runtime serves its endpoints (`metricsAddress` with port 0:
/// the log names the port the kernel chose).
fn endpoints_of(lab: &Lab, i: usize) -> SocketAddr {
    let log = lab.log(i);
    let at = log
        .split("on http://")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no endpoints in the log: {log}"));
    at.parse().unwrap()
}

/// The value of one sample line (`name{labels} value`) of a scrape.
fn sample(metrics: &str, line_start: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(line_start) && l[line_start.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The flow log's lines as JSON, once `want` of them satisfy `pred`
/// (the writer flushes when it has nothing more to write).
fn flow_lines(path: &std::path::Path, want: usize) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        if lines.len() >= want || std::time::Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `metricsAddress` and `flowLog`: Prometheus metrics (drops by reason,
/// handshake latencies, the kernel's queue figures), the probes, and one
/// JSON line per decision with the peer's verified labels, on two nodes.
#[test]
fn metrics_probes_and_flow_logs() {
    if skip() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("trobs{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let k = psk(&dir, "psk.key", 9);
    let (log_a, log_b) = (dir.join("a.jsonl"), dir.join("b.jsonl"));
    let extra =
        |p: &std::path::Path| format!("metricsAddress: 127.0.0.1:0\nflowLog: {}\n", p.display());
    let t = beer_with("o", &k, &k, &extra(&log_a), &extra(&log_b));
    serve(&t.be, t.be.ip4, 80);
    serve(&t.be, t.be.ip4, 81);
    assert!(probe(&t.fe, at(&t.be, 80)), "frontend -> backend:80");
    assert!(!probe(&t.fe, at(&t.be, 81)), "backend allows only port 80");
    assert!(!probe(&t.ext2, at(&t.be, 80)), "ipBlock except 198.18.1.31");
    assert!(probe(&t.ext, at(&t.be, 80)), "ipBlock admits 198.18.1.30");

    let (a, b) = (endpoints_of(&t.lab, 0), endpoints_of(&t.lab, 1));
    for ep in [a, b] {
        assert_eq!(http_get(ep, "/healthz"), (200, "ok\n".into()));
        assert_eq!(http_get(ep, "/readyz"), (200, "ok\n".into()));
        assert_eq!(http_get(ep, "/nothing").0, 404);
    }
    let (status, m) = http_get(b, "/metrics");
    assert_eq!(status, 200, "{m}");
    assert!(m.contains("trireme_info{version=\""), "{m}");
    assert!(m.contains("node=\"node-b\""), "{m}");
    assert_eq!(sample(&m, "trireme_pus"), Some(3.0), "{m}");
    assert!(
        sample(&m, "trireme_drops_total{reason=\"ingress_denied\"}") >= Some(1.0),
        "{m}"
    );
    assert!(
        sample(&m, "trireme_drops_total{reason=\"ingress_denied_by_ip\"}") >= Some(1.0),
        "{m}"
    );
    assert!(
        sample(&m, "trireme_events_total{event=\"ingress_allowed\"}") >= Some(1.0),
        "{m}"
    );
    assert!(
        sample(&m, "trireme_handled_packets_total{packet=\"syn_in\"}") >= Some(3.0),
        "{m}"
    );
    assert!(
        sample(&m, "trireme_handshake_seconds_count{side=\"responder\"}") >= Some(1.0),
        "{m}"
    );
    assert!(
        sample(
            &m,
            "trireme_handshake_seconds_bucket{side=\"responder\",le=\"+Inf\"}"
        ) >= Some(1.0),
        "{m}"
    );
    // The kernel's view of each PU's queues, read in its namespace.
    for pu in ["be", "db", "web"] {
        assert_eq!(
            sample(
                &m,
                &format!("trireme_queue_full_drops_total{{pu=\"{pu}\"}}")
            ),
            Some(0.0),
            "{m}"
        );
        assert!(
            sample(&m, &format!("trireme_queue_waiting_packets{{pu=\"{pu}\"}}")).is_some(),
            "{m}"
        );
    }
    // ... and the flows our table decided there by address: ext's
    // tokenless SYN, which no userspace counter saw.
    let kernel = |pu: &str, dir: &str, verdict: &str| {
        sample(
            &m,
            &format!(
                "trireme_kernel_flows_total{{pu=\"{pu}\",direction=\"{dir}\",verdict=\"{verdict}\"}}"
            ),
        )
    };
    assert!(kernel("be", "ingress", "allowed") >= Some(1.0), "{m}");
    assert_eq!(kernel("be", "ingress", "dropped"), Some(0.0), "{m}");
    assert_eq!(kernel("db", "egress", "allowed"), Some(0.0), "{m}");
    assert_eq!(sample(&m, "trireme_kernel_scrape_errors"), Some(0.0), "{m}");
    // Every sample belongs to the family announced before it.
    let mut family = String::new();
    for l in m.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            family = rest.split(' ').next().unwrap().to_string();
        } else if !l.starts_with('#') {
            assert!(l.starts_with(&family), "{l} outside {family}");
        }
    }
    let (_, ma) = http_get(a, "/metrics");
    assert!(
        sample(&ma, "trireme_handshake_seconds_count{side=\"initiator\"}") >= Some(1.0),
        "{ma}"
    );

    // Node B: the allowed and the denied connections, with who tried.
    let lines = flow_lines(&log_b, 3);
    let find = |reason: &str, port: u16| {
        lines
            .iter()
            .find(|l| {
                l["reason"] == reason && l["local"].as_str().unwrap().ends_with(&format!(":{port}"))
            })
            .unwrap_or_else(|| panic!("no {reason} on port {port}: {lines:#?}"))
            .clone()
    };
    let ok = find("ingress_allowed", 80);
    assert_eq!(ok["verdict"], "allow");
    assert_eq!(ok["node"], "node-b");
    assert_eq!(ok["pu"], "be");
    assert_eq!(ok["direction"], "ingress");
    assert_eq!(ok["protocol"], "tcp");
    assert!(
        ok["remote"].as_str().unwrap().starts_with("198.18.1.10:"),
        "{ok}"
    );
    assert_eq!(ok["peer"]["node"], "node-a");
    assert_eq!(ok["peer"]["labels"]["role"], "frontend");
    assert!(ok["time"].as_str().unwrap().ends_with('Z'), "{ok}");
    let denied = find("ingress_denied", 81);
    assert_eq!(denied["verdict"], "deny");
    assert_eq!(denied["peer"]["labels"]["role"], "frontend");
    let by_ip = find("ingress_denied_by_ip", 80);
    assert!(
        by_ip["remote"]
            .as_str()
            .unwrap()
            .starts_with("198.18.1.31:"),
        "{by_ip}"
    );
    assert!(by_ip["peer"].is_null(), "{by_ip}");
    // A denied SYN's retransmissions are not logged again.
    let denials = lines
        .iter()
        .filter(|l| l["reason"] == "ingress_denied")
        .count();
    assert_eq!(denials, 1, "{lines:#?}");

    // Node A: its egress decision, on the backend's verified labels.
    let lines = flow_lines(&log_a, 1);
    let egress = lines
        .iter()
        .find(|l| l["reason"] == "egress_allowed")
        .unwrap_or_else(|| panic!("{lines:#?}"));
    assert_eq!(egress["direction"], "egress");
    assert_eq!(egress["pu"], "fe");
    assert_eq!(egress["peer"]["node"], "node-b");
    assert_eq!(egress["peer"]["labels"]["role"], "backend");

    // Log rotation: the file is renamed, SIGHUP, and the next decision
    // goes to a new file at the configured path.
    std::fs::rename(&log_b, dir.join("b.jsonl.1")).unwrap();
    t.lab.signal(1, Signal::SIGHUP);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !t.lab.log(1).contains("reloaded") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        probe(&t.fe, at(&t.be, 80)),
        "frontend -> backend:80 after the reload"
    );
    let lines = flow_lines(&log_b, 1);
    assert!(
        lines.iter().any(|l| l["reason"] == "ingress_allowed"),
        "{lines:#?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
