//! Nodes and host-networked pods: `nodes` peers select node addresses by
//! node labels; a host-networked pod is its node's traffic, never selected
//! by a pod or namespace selector; rulesets with node peers are format 3.

use std::path::PathBuf;
use std::process::Command;
use trireme_compiler::eval::{Evaluator, Flow};
use trireme_compiler::model::Protocol;
use trireme_compiler::ruleset::Ruleset;

const SNAPSHOT: &str = r#"
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Namespace, metadata: {name: app, labels: {team: a}}}
- {apiVersion: v1, kind: Namespace, metadata: {name: infra, labels: {team: a}}}
- apiVersion: v1
  kind: Node
  metadata: {name: n1, labels: {kubernetes.io/os: linux, pool: edge}}
  status: {addresses: [{type: Hostname, address: n1}, {type: InternalIP, address: 198.18.30.1}, {type: InternalIP, address: "fd00:30::1"}]}
- apiVersion: v1
  kind: Node
  metadata: {name: n2, labels: {kubernetes.io/os: linux, pool: core}}
  status: {addresses: [{type: InternalIP, address: 198.18.30.2}]}
- {apiVersion: v1, kind: Pod, metadata: {name: web, namespace: app, labels: {app: web}}, status: {podIP: 198.18.31.1}}
- {apiVersion: v1, kind: Pod, metadata: {name: db, namespace: app, labels: {app: db}}, status: {podIP: 198.18.31.2}}
# Host-networked, with the labels every selector below would match.
- apiVersion: v1
  kind: Pod
  metadata: {name: agent, namespace: infra, labels: {app: web}}
  spec: {hostNetwork: true, nodeName: n1, containers: [{name: c, image: x}]}
  status: {podIP: 198.18.30.1}
- apiVersion: v1
  kind: Pod
  metadata: {name: agent2, namespace: infra, labels: {app: web}}
  spec: {hostNetwork: true, containers: [{name: c, image: x}]}
  status: {podIP: 198.18.30.2}
"#;

const POLICIES: &str = r#"
apiVersion: policy.networking.k8s.io/v1beta1
kind: ClusterNetworkPolicy
metadata: {name: nodes}
spec:
  tier: Admin
  priority: 1
  subject: {namespaces: {matchLabels: {team: a}}}
  ingress:
  - {name: no-web-pods, action: Deny, from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: web}}}}]}
  egress:
  - name: kubelet-on-edge
    action: Accept
    to: [{nodes: {matchLabels: {pool: edge}}}]
    protocols: [{tcp: {destinationPort: {number: 10250}}}]
  - name: no-other-nodes
    action: Deny
    to: [{nodes: {matchExpressions: [{key: kubernetes.io/os, operator: Exists}]}}]
  - name: no-web-pods
    action: Deny
    to: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: web}}}}]
"#;

fn write(dir: &std::path::Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("trnodes-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn node_peers_and_host_network_pods() {
    let d = tmp("eval");
    let files = [
        write(&d, "snapshot.yaml", SNAPSHOT),
        write(&d, "policies.yaml", POLICIES),
    ];
    let loaded = trireme_compiler::source::load(&files).expect("compiles");
    let rs = trireme_compiler::compile::compile(&loaded);
    let c = &loaded.cluster;
    assert_eq!(c.nodes.len(), 2);
    assert_eq!(
        c.nodes[0].ips,
        [
            "198.18.30.1".parse::<std::net::IpAddr>().unwrap(),
            "fd00:30::1".parse().unwrap()
        ],
        "InternalIPs only, hostnames skipped"
    );
    let ev = Evaluator::new(&rs);
    let allowed = |from: &str, to: &str, port| {
        let (a, b) = (c.find(from).unwrap(), c.find(to).unwrap());
        ev.evaluate(&Flow {
            src: c.endpoint(a),
            dst: c.endpoint(b),
            port,
            protocol: Protocol::Tcp,
        })
        .allowed
    };
    let to_ip = |from: &str, ip: &str, port| {
        ev.evaluate(&Flow {
            src: c.endpoint(c.find(from).unwrap()),
            dst: c.ip_endpoint(ip.parse().unwrap()),
            port,
            protocol: Protocol::Tcp,
        })
        .allowed
    };
    // The node (by nodeName) is in the edge pool: the kubelet port only.
    assert!(allowed("app/db", "infra/agent", 10250));
    assert!(!allowed("app/db", "infra/agent", 80));
    // agent2 has no nodeName: its node is found by address (core pool).
    assert!(!allowed("app/db", "infra/agent2", 10250));
    // A node's address is the node, whether or not a pod lives there; its
    // other addresses too.
    assert!(to_ip("app/db", "198.18.30.1", 10250));
    assert!(to_ip("app/db", "fd00:30::1", 10250));
    assert!(!to_ip("app/db", "198.18.30.2", 10250));
    assert!(to_ip("app/db", "198.18.30.9", 10250), "no node there");
    // Pod selectors never match host-networked pods, as subjects or peers:
    // agent carries app=web in a team=a namespace, yet nothing governs it,
    // and the pod-peer Deny rules do not see it.
    assert!(
        !allowed("app/db", "app/web", 80),
        "a real web pod is denied"
    );
    assert!(
        allowed("infra/agent", "app/db", 80),
        "agent's ingress at db"
    );
    assert!(
        allowed("infra/agent", "infra/agent2", 80),
        "no subject at all"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn node_peers_need_format_3() {
    let d = tmp("fmt");
    let p = write(&d, "policies.yaml", POLICIES);
    let out = d.join("rs.bin");
    let o = Command::new(env!("CARGO_BIN_EXE_trireme"))
        .args(["compile", "-f"])
        .arg(&p)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(&bytes[8..12], &[3, 0, 0, 0], "format 3.0");
    let rs = Ruleset::decode(&bytes).unwrap();
    assert_eq!(rs.format_version(), (3, 0));
    assert_eq!(rs.encode(), bytes);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn bad_nodes_are_reported_at_the_field() {
    let d = tmp("bad");
    let p = write(
        &d,
        "nodes.yaml",
        "apiVersion: v1\nkind: Node\nmetadata: {name: n1, namespace: x}\nstatus:\n  addresses:\n  - {type: InternalIP, address: 10.0.0.300}\n",
    );
    let Err(err) = trireme_compiler::source::load(std::slice::from_ref(&p)) else {
        panic!("a bad Node was accepted");
    };
    let err = err.to_string();
    assert!(err.contains("Node is cluster-scoped"), "{err}");
    assert!(
        err.contains(":6:") && err.contains("\"10.0.0.300\" is not a valid IP address"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&d);
}
