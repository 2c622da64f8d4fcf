//! UDP decided in the kernel, for real: the runtime compiles each PU's
//! datagram verdicts into nftables interval sets in the PU's namespace
//! (`table inet trireme`), and real UDP clients and servers in network
//! namespaces see exactly the policy's verdicts: labels of local PUs and
//! configured remotes, ipBlock with except, named ports, port ranges, the
//! admin tier, `nodes` peers on configured node addresses, IPv6, a policy
//! update, and cleanup. Needs root.

mod common;
use common::*;
use nix::sys::signal::Signal;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const POLICIES: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: dns, namespace: svc}
spec:
  podSelector: {matchLabels: {role: dns}}
  ingress:
  - from: [{podSelector: {matchLabels: {role: app}}}]
    ports: [{protocol: UDP, port: dns}]
  - from: [{ipBlock: {cidr: 198.18.2.0/24, except: [198.18.2.31/32]}}]
    ports: [{protocol: UDP, port: 53}, {protocol: SCTP, port: 9003}]
  - from: [{namespaceSelector: {matchLabels: {tier: partners}}, podSelector: {matchLabels: {role: partner}}}]
    ports: [{protocol: UDP, port: 5000, endPort: 5010}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: app, namespace: svc}
spec:
  podSelector: {matchLabels: {role: app}}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {role: dns}}}]
    ports: [{protocol: UDP, port: 53}]
---
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: no-outside-dns}
spec:
  priority: 10
  subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {role: other}}}}
  egress:
  - name: deny-dns-outside
    action: Deny
    to: [{networks: [198.18.2.0/24]}]
    ports: [{portNumber: {protocol: UDP, port: 53}}]
---
apiVersion: policy.networking.k8s.io/v1beta1
kind: ClusterNetworkPolicy
metadata: {name: no-udp-to-linux-nodes}
spec:
  tier: Admin
  priority: 5
  subject: {pods: {podSelector: {matchLabels: {role: other}}}}
  egress:
  - name: deny-udp-to-nodes
    action: Deny
    to: [{nodes: {matchLabels: {kubernetes.io/os: linux}}}]
    protocols: [{udp: {destinationPort: {range: {start: 1, end: 65535}}}}]
"#;

fn pu(name: &str, h: &Host, role: &str, ports: &str) -> String {
    format!(
        "- {{name: {name}, netns: {}, namespace: svc, labels: {{role: {role}}}, ports: [{ports}]}}\n",
        h.ns
    )
}

fn until(what: &str, f: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(10), "{what}");
    }
}

#[test]
fn udp_is_decided_by_kernel_sets_with_the_policy_semantics() {
    if !is_root() {
        eprintln!("skipped: needs root (network namespaces)");
        return;
    }
    let mut lab = lab("u");
    let dns = lab.host("dns", "198.18.1.53", "fd00::1:53");
    let app = lab.host("app", "198.18.1.10", "fd00::1:10");
    let other = lab.host("other", "198.18.1.20", "fd00::1:20");
    let ext = lab.host("ext", "198.18.2.30", "fd00::2:30");
    let ext2 = lab.host("ext2", "198.18.2.31", "fd00::2:31");
    let partner = lab.host("partner", "198.18.3.5", "fd00::3:5");
    let node = lab.host("node", "198.18.4.1", "fd00::4:1");
    serve_udp(&node, node.ip4, 54);
    for h in [&dns, &ext] {
        for port in [53, 54, 5005, 5011] {
            serve_udp(h, h.ip4, port);
        }
        serve_udp(h, h.ip6, 53);
    }
    let rs = lab.compile("rs.bin", POLICIES);
    let psk = lab.write("psk.key", "VGhpcyBpcyBhIHRlc3Qga2V5IG9mIDMyIGJ5dGVzISE=\n");
    let cfg = format!(
        "node: n\nruleset: {}\nkeys: {{psk: {}}}\npus:\n{}{}{}\
         remotes:\n- {{ips: [{}], namespace: partners, namespaceLabels: {{tier: partners}}, labels: {{role: partner}}}}\n\
         nodes:\n- {{name: worker, ips: [{}], labels: {{kubernetes.io/os: linux}}}}\n",
        rs.display(),
        psk.display(),
        pu("dns", &dns, "dns", "{name: dns, port: 53, protocol: UDP}"),
        pu("app", &app, "app", ""),
        pu("other", &other, "other", ""),
        partner.ip4,
        node.ip4,
    );
    lab.start("n", &cfg);
    let to = |h: &Host, port: u16| SocketAddr::new(h.ip4, port);

    // Local PUs by their labels (addresses read from their namespaces),
    // the named port resolved on the destination.
    assert!(udp_probe(&app, to(&dns, 53)), "app -> dns:53");
    assert!(!udp_probe(&app, to(&dns, 54)), "dns admits app on 53 only");
    assert!(!udp_probe(&other, to(&dns, 53)), "other is not an app");
    // Non-enforced senders by ipBlock, with its except.
    assert!(udp_probe(&ext, to(&dns, 53)), "ipBlock admits 198.18.2.30");
    assert!(!udp_probe(&ext2, to(&dns, 53)), "except 198.18.2.31");
    // A configured remote by its labels, on a port range.
    assert!(udp_probe(&partner, to(&dns, 5005)), "partner, 5000-5010");
    assert!(
        !udp_probe(&partner, to(&dns, 5011)),
        "partner, out of range"
    );
    assert!(!udp_probe(&ext, to(&dns, 5005)), "ext is no partner");
    // Egress: app may only reach dns; the admin tier denies other's
    // UDP 53 to 198.18.2.0/24 and nothing else.
    assert!(!udp_probe(&app, to(&ext, 53)), "app egress");
    assert!(!udp_probe(&other, to(&ext, 53)), "admin deny");
    assert!(
        udp_probe(&other, to(&ext, 54)),
        "admin deny is port 53 only"
    );
    // A `nodes` peer: the configured node address, by its labels.
    assert!(!udp_probe(&other, to(&node, 54)), "other -> a Linux node");
    assert!(udp_probe(&dns, to(&node, 54)), "dns is no subject of it");
    // IPv6: labels work, the v4 ipBlock does not admit ext's v6 address.
    assert!(
        udp_probe(&app, SocketAddr::new(dns.ip6, 53)),
        "v6 app -> dns"
    );
    assert!(
        !udp_probe(&ext, SocketAddr::new(dns.ip6, 53)),
        "v6 ext -> dns"
    );

    // SCTP (this kernel has no SCTP sockets: an INIT that gets through is
    // answered with ICMP protocol-unreachable, one that is dropped is not).
    assert!(sctp_probe(&ext, &dns, 9003), "SCTP 9003 from the ipBlock");
    assert!(!sctp_probe(&ext, &dns, 9005), "SCTP port not allowed");
    assert!(!sctp_probe(&ext2, &dns, 9003), "SCTP from the except");

    // The kernel decided all of it: no allowed flow reached userspace.
    // The denied ones went on to the queue (under the kernel's rate
    // limit, which these few never reach) to be counted and logged there,
    // where the same verdict was given again.
    for c in ["ingress_allowed_by_ip", "egress_allowed_by_ip"] {
        assert_eq!(lab.counter(0, c), 0, "{}", lab.stats(0));
    }
    assert!(
        lab.counter(0, "ingress_denied_by_ip") >= 6,
        "{}",
        lab.stats(0)
    );
    assert!(
        lab.counter(0, "egress_denied_by_ip") >= 3,
        "{}",
        lab.stats(0)
    );
    assert_eq!(lab.counter(0, "address_tables_applied"), 3);
    let listing = sh_out(
        &dns,
        &["nft", "list", "set", "inet", "trireme", "in4_allow"],
    );
    assert!(
        listing.contains("198.18.2.0-198.18.2.30 . udp . 53"),
        "{listing}"
    );

    // The kernel counts what it allowed, and dropped nothing itself.
    assert!(nft_counter(&dns, "in_allowed") >= 5);
    assert_eq!(nft_counter(&dns, "in_dropped"), 0);

    // A policy update replaces the tables: dns now admits nobody.
    let deny = POLICIES
        .replace(
            "role: app}}}]\n    ports: [{protocol: UDP, port: dns}]",
            "role: nobody}}}]\n    ports: [{protocol: UDP, port: dns}]",
        )
        .replace("198.18.2.0/24, except: [198.18.2.31/32]", "198.18.9.0/24");
    std::fs::copy(lab.compile("deny.bin", &deny), &rs).unwrap();
    lab.signal(0, Signal::SIGHUP);
    until("reload", || lab.counter(0, "policy_updates") == 1);
    // Only the tables that changed are written again (dns's at least).
    let written = lab.counter(0, "address_tables_applied");
    assert!(written > 3, "{}", lab.stats(0));
    assert_eq!(written + lab.counter(0, "address_tables_unchanged"), 6);
    assert!(!udp_probe(&app, to(&dns, 53)), "app after the update");
    assert!(!udp_probe(&ext, to(&dns, 53)), "ext after the update");
    assert!(udp_probe(&partner, to(&dns, 5005)), "partner unchanged");

    // Cleanup removes our table.
    lab.kill(0);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_trireme-runtime"))
        .args(["cleanup", "-c"])
        .arg(lab.dir.join("n.yaml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let tables = sh_out(&dns, &["nft", "list", "tables"]);
    assert!(!tables.contains("trireme"), "{tables}");
}

/// An SCTP INIT from `from` to `to:port` (scapy, Debian's python3-scapy):
/// whether the destination's kernel answered.
fn sctp_probe(from: &Host, to: &Host, port: u16) -> bool {
    let script = format!(
        "from scapy.all import IP, ICMP, SCTP, SCTPChunkInit, sr1, conf\n\
         conf.verb = 0\n\
         p = IP(dst='{}')/SCTP(sport={}, dport={port})/SCTPChunkInit(init_tag=7, a_rwnd=1500, n_out_streams=1, n_in_streams=1, init_tsn=1)\n\
         r = sr1(p, timeout=1.5)\n\
         print('answered' if r is not None and r.haslayer(ICMP) and r[ICMP].type == 3 else 'silent')\n",
        to.ip4,
        40000 + port % 1000,
    );
    let out = sh_out(from, &["/usr/bin/python3", "-c", &script]);
    assert!(
        out.contains("answered") || out.contains("silent"),
        "scapy: {out}"
    );
    out.contains("answered")
}

fn sh_out(h: &Host, args: &[&str]) -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &h.ns])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}
