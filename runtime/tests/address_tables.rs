//! The kernel's tables for peers known by address against the userspace
//! path, in-process (no kernel): for random UDP and SCTP flows, in and
//! out, and inbound TCP SYNs without a token, IPv4 and IPv6, the verdict
//! the compiled nftables sets give equals the enforcer's verdict on the
//! same packet. The policy mixes all three tiers (admin Pass and Deny,
//! NetworkPolicy ipBlock with except and named ports, a baseline Deny),
//! port ranges, configured remotes, configured nodes (`nodes` peers) and
//! another local PU.

use etherparse::PacketBuilder;
use proptest::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::OnceLock;
use trireme_compiler::model::{Identity, NamedPort, Protocol};
use trireme_runtime::by_address::Cell;
use trireme_runtime::by_address::PuTables;
use trireme_runtime::enforcer::{Enforcer, Hook, Pu, Verdict};
use trireme_tokens::handshake::{Config, Credentials, Engine};
use trireme_tokens::keys::Psk;

const POLICIES: &str = r#"
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: partners-pass}
spec:
  priority: 5
  subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {role: dns}}}}
  ingress:
  - {name: pass-partners, action: Pass, from: [{namespaces: {matchLabels: {tier: partners}}}]}
  - {name: deny-bad, action: Deny, from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {role: bad}}}}]}
  egress:
  - name: no-high-udp
    action: Deny
    to: [{networks: [198.18.4.0/22, "fd00:4::/64"]}]
    ports: [{portRange: {protocol: UDP, start: 100, end: 200}}]
  - name: no-sctp-to-linux-nodes
    action: Deny
    to: [{nodes: {matchLabels: {kubernetes.io/os: linux}}}]
    ports: [{portNumber: {protocol: SCTP, port: 9003}}]
  - name: allow-lab
    action: Allow
    to: [{networks: [198.18.0.0/15]}]
    ports: [{portNumber: {protocol: SCTP, port: 9003}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: dns, namespace: svc}
spec:
  podSelector: {matchLabels: {role: dns}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from: [{podSelector: {matchLabels: {role: app}}}]
    ports: [{protocol: UDP, port: dns}, {protocol: TCP, port: 8080}]
  - from: [{ipBlock: {cidr: 198.18.0.0/16, except: [198.18.2.0/24, 198.18.1.128/25]}}]
    ports: [{protocol: UDP, port: 53}, {protocol: SCTP, port: 9003, endPort: 9010}, {protocol: TCP, port: 80}]
  - from: [{ipBlock: {cidr: "fd00::/16", except: ["fd00:2::/32"]}}]
    ports: [{protocol: UDP, port: 53}]
  egress:
  - to: [{ipBlock: {cidr: 198.18.4.0/24}}]
  - to: [{podSelector: {matchLabels: {role: app}}}]
    ports: [{protocol: UDP, port: app-port}]
---
apiVersion: policy.networking.k8s.io/v1alpha1
kind: BaselineAdminNetworkPolicy
metadata: {name: default}
spec:
  subject: {namespaces: {}}
  ingress:
  - {name: deny-partners, action: Deny, from: [{namespaces: {matchLabels: {tier: partners}}}]}
"#;

struct Fixture {
    e: Enforcer,
    tables: Vec<PuTables>,
}

fn id(ns: &str, ns_labels: &[(&str, &str)], labels: &[(&str, &str)]) -> Identity {
    let m = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    Identity::for_pod(ns, &m(ns_labels), &m(labels))
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("trdt{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("policies.yaml");
        std::fs::write(&src, POLICIES).unwrap();
        let loaded = trireme_compiler::source::load(&[src]).expect("policies compile");
        let rs = trireme_compiler::compile::compile(&loaded);
        let _ = std::fs::remove_dir_all(&dir);
        let engine = Engine::new(
            Config::new("n", "trireme"),
            Credentials::Psk(Box::new(Psk::new(&[42; 32]).unwrap())),
        )
        .unwrap();
        let udp = |name: &str, port| NamedPort {
            name: name.into(),
            port,
            protocol: Protocol::Udp,
        };
        let pus = vec![
            Pu::new(
                "dns",
                id("svc", &[], &[("role", "dns")]),
                vec![udp("dns", 53)],
            ),
            Pu::new(
                "app",
                id("svc", &[], &[("role", "app")]),
                vec![udp("app-port", 7000)],
            ),
        ];
        let mut by_ip = HashMap::new();
        let partner = id("partners", &[("tier", "partners")], &[("role", "partner")]);
        by_ip.insert("198.18.3.5".parse().unwrap(), partner.clone());
        by_ip.insert("fd00:3::5".parse().unwrap(), partner);
        by_ip.insert(
            "198.18.2.6".parse().unwrap(),
            id("legacy", &[], &[("role", "bad")]),
        );
        let node = |os: &str| -> Identity {
            [("kubernetes.io/os".to_string(), os.to_string())]
                .into_iter()
                .collect()
        };
        let e = Enforcer::new(engine, pus, rs, by_ip, 1000, 10_000)
            .unwrap()
            .with_nodes(HashMap::from([
                ("198.18.5.5".parse().unwrap(), node("linux")),
                ("fd00:5::5".parse().unwrap(), node("linux")),
                ("198.18.5.6".parse().unwrap(), node("windows")),
            ]));
        e.set_local_ips(HashMap::from([
            ("198.18.1.53".parse().unwrap(), 0),
            ("198.18.1.10".parse().unwrap(), 1),
            ("fd00:1::10".parse().unwrap(), 1),
        ]));
        let l = e.policy();
        let tables = (0..2).map(|pu| e.address_tables(&l, pu).0).collect();
        Fixture { e, tables }
    })
}

/// The first packet of a flow between `local` (the PU) and `remote`, in
/// the PU's view: a datagram, or a SYN without a token.
fn packet(hook: Hook, local: IpAddr, remote: IpAddr, protocol: Protocol, port: u16) -> Vec<u8> {
    let (src, dst) = match hook {
        Hook::In => (remote, local),
        Hook::Out => (local, remote),
    };
    let mut out = Vec::new();
    if protocol == Protocol::Tcp {
        let b = match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), 64),
            (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), 64),
            _ => unreachable!(),
        };
        b.tcp(40000, port, 1, 64240)
            .syn()
            .write(&mut out, &[])
            .unwrap();
    } else if protocol == Protocol::Sctp {
        // SCTP common header (ports, verification tag, checksum): all the
        // enforcer reads.
        let mut payload = vec![0u8; 12];
        payload[0..2].copy_from_slice(&40000u16.to_be_bytes());
        payload[2..4].copy_from_slice(&port.to_be_bytes());
        let proto = etherparse::IpNumber(132);
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let h = etherparse::Ipv4Header::new(12, 64, proto, s.octets(), d.octets()).unwrap();
                h.write(&mut out).unwrap();
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let h = etherparse::Ipv6Header {
                    payload_length: 12,
                    next_header: proto,
                    hop_limit: 64,
                    source: s.octets(),
                    destination: d.octets(),
                    ..Default::default()
                };
                h.write(&mut out).unwrap();
            }
            _ => unreachable!(),
        }
        out.extend_from_slice(&payload);
    } else {
        let b = match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), 64),
            (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), 64),
            _ => unreachable!(),
        };
        b.udp(40000, port).write(&mut out, b"x").unwrap();
    }
    out
}

fn addr_strategy(v6: bool) -> BoxedStrategy<IpAddr> {
    if v6 {
        let near = [
            "fd00::",
            "fd00:2::",
            "fd00:3::5",
            "fd00:4::",
            "fd00:5::5",
            "fd00:1::10",
            "fe80::",
        ]
        .map(|s| s.parse::<std::net::Ipv6Addr>().unwrap().into());
        prop_oneof![
            any::<u128>(),
            proptest::sample::select(near.to_vec()).prop_flat_map(|b: u128| {
                (0u128..4).prop_map(move |d| b.wrapping_add(d).wrapping_sub(1))
            }),
        ]
        .prop_map(|x| IpAddr::V6(x.into()))
        .boxed()
    } else {
        let near = [
            "198.18.0.0",
            "198.18.1.10",
            "198.18.1.53",
            "198.18.1.128",
            "198.18.2.0",
            "198.18.2.6",
            "198.18.3.0",
            "198.18.3.5",
            "198.18.4.0",
            "198.18.5.5",
            "198.18.5.6",
            "198.18.8.0",
            "198.20.0.0",
        ]
        .map(|s| u32::from(s.parse::<std::net::Ipv4Addr>().unwrap()));
        prop_oneof![
            any::<u32>(),
            proptest::sample::select(near.to_vec())
                .prop_flat_map(|b| (0u32..4).prop_map(move |d| b.wrapping_add(d).wrapping_sub(1))),
            (0u32..0x4_0000).prop_map(|x| 0xc612_0000 + x),
        ]
        .prop_map(|x| IpAddr::V4(x.into()))
        .boxed()
    }
}

fn port_strategy() -> impl Strategy<Value = u16> {
    prop_oneof![
        any::<u16>(),
        proptest::sample::select(vec![53u16, 80, 99, 150, 201, 7000, 8080, 9003, 9010])
            .prop_flat_map(|p| (0u16..3).prop_map(move |d| p.wrapping_add(d).wrapping_sub(1))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn kernel_tables_agree_with_the_enforcer(
        (remote, port) in any::<bool>().prop_flat_map(|v6| (addr_strategy(v6), port_strategy())),
        pu in 0usize..2,
        inbound in any::<bool>(),
        protocol in proptest::sample::select(vec![Protocol::Udp, Protocol::Sctp, Protocol::Tcp]),
    ) {
        let f = fixture();
        let local: IpAddr = match (pu, remote.is_ipv4()) {
            (0, true) => "198.18.1.53".parse().unwrap(),
            (1, true) => "198.18.1.10".parse().unwrap(),
            (0, false) => "fd00:1::53".parse().unwrap(),
            _ => "fd00:1::10".parse().unwrap(),
        };
        prop_assume!(remote != local);
        // A PU's own SYNs always carry a token: the handshake decides.
        prop_assume!(inbound || protocol != Protocol::Tcp);
        let hook = if inbound { Hook::In } else { Hook::Out };
        let t = &f.tables[pu];
        let table = match (hook, remote.is_ipv4()) {
            (Hook::In, true) => &t.in4,
            (Hook::In, false) => &t.in6,
            (Hook::Out, true) => &t.out4,
            (Hook::Out, false) => &t.out6,
        };
        let kernel = table.verdict(remote, protocol, port);
        let userspace = match f.e.handle(pu, hook, &packet(hook, local, remote, protocol, port), 0) {
            Verdict::Authorize(None) => Cell::Allow,
            Verdict::Drop(_) => Cell::Deny,
            other => panic!("{other:?}"),
        };
        prop_assert_eq!(kernel, userspace, "{:?} {} {:?} {}", hook, remote, protocol, port);
    }
}

/// The tables are small: cells alike are merged.
#[test]
fn tables_are_compact() {
    let f = fixture();
    for (pu, t) in f.tables.iter().enumerate() {
        let n: usize = [&t.in4, &t.in6, &t.out4, &t.out6]
            .iter()
            .map(|t| t.allow.len() + t.ask.len())
            .sum();
        assert!(n < 40, "PU {pu}: {n} elements: {t:#?}");
        assert!(n > 0);
    }
}

/// A `nodes` peer selects node addresses by the node's labels: SCTP to a
/// Linux node is denied (in the kernel tables and in userspace), to a
/// Windows node or a plain lab address allowed by the next rule.
#[test]
fn nodes_peers_select_node_addresses_by_labels() {
    let f = fixture();
    let local: IpAddr = "198.18.1.53".parse().unwrap();
    for (remote, want) in [
        ("198.18.5.5", Cell::Deny),
        ("198.18.5.6", Cell::Allow),
        ("198.18.5.7", Cell::Allow),
    ] {
        let remote: IpAddr = remote.parse().unwrap();
        assert_eq!(
            f.tables[0].out4.verdict(remote, Protocol::Sctp, 9003),
            want,
            "{remote}"
        );
        let v = f.e.handle(
            0,
            Hook::Out,
            &packet(Hook::Out, local, remote, Protocol::Sctp, 9003),
            0,
        );
        assert_eq!(
            matches!(v, Verdict::Drop(_)),
            want == Cell::Deny,
            "{remote}: {v:?}"
        );
    }
}
