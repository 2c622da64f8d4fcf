//! AdminNetworkPolicy and BaselineAdminNetworkPolicy
//! (policy.networking.k8s.io/v1alpha1) and their successor
//! ClusterNetworkPolicy (v1alpha2, with a `tier` field), from the
//! Kubernetes network-policy-api → admin- and baseline-tier model policies.
//!
//! Precedence (in the evaluator): admin rules by priority, lower first, each
//! policy's rules in order (Allow and Deny decide, Pass skips to the
//! namespace tier) → NetworkPolicy → baseline rules in order → allow.
//! Validation follows the CRD's schema and CEL rules, each rejection at the
//! offending field.

use super::k8s::V;
use super::yaml::Seg;
use crate::model::*;
use crate::names::check_port_name;
use crate::path;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdminPolicy {
    // apiVersion, kind and status are declared so that they are not
    // reported as unknown fields; their values were checked by the reader.
    #[serde(default)]
    #[allow(dead_code)]
    pub api_version: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    pub kind: Option<String>,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: Spec,
    #[serde(default)]
    #[allow(dead_code)]
    pub status: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    #[serde(default)]
    pub priority: Option<i64>,
    pub subject: Subject,
    #[serde(default)]
    pub ingress: Option<Vec<IngressRule>>,
    #[serde(default)]
    pub egress: Option<Vec<EgressRule>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subject {
    #[serde(default)]
    pub namespaces: Option<LabelSelector>,
    #[serde(default)]
    pub pods: Option<NamespacedPod>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NamespacedPod {
    /// Required in v1alpha1; optional (all namespaces) in ClusterNetworkPolicy.
    #[serde(default)]
    pub namespace_selector: Option<LabelSelector>,
    pub pod_selector: LabelSelector,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IngressRule {
    #[serde(default)]
    pub name: Option<String>,
    pub action: String,
    pub from: Vec<Peer>,
    #[serde(default)]
    pub ports: Option<Vec<Port>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressRule {
    #[serde(default)]
    pub name: Option<String>,
    pub action: String,
    pub to: Vec<Peer>,
    #[serde(default)]
    pub ports: Option<Vec<Port>>,
}

/// Ingress peers use namespaces/pods; egress peers add nodes/networks
/// (and, in ClusterNetworkPolicy, domainNames).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Peer {
    #[serde(default)]
    pub namespaces: Option<LabelSelector>,
    #[serde(default)]
    pub pods: Option<NamespacedPod>,
    #[serde(default)]
    pub nodes: Option<LabelSelector>,
    #[serde(default)]
    pub networks: Option<Vec<String>>,
    #[serde(default)]
    pub domain_names: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Port {
    #[serde(default)]
    pub port_number: Option<PortNumber>,
    #[serde(default)]
    pub named_port: Option<String>,
    #[serde(default)]
    pub port_range: Option<PortRange>,
}

#[derive(Deserialize)]
pub struct PortNumber {
    #[serde(default)]
    pub protocol: Option<String>,
    pub port: i32,
}

#[derive(Deserialize)]
pub struct PortRange {
    #[serde(default)]
    pub protocol: Option<String>,
    pub start: i32,
    pub end: i32,
}

fn at(base: &[Seg], extra: &[Seg]) -> Vec<Seg> {
    let mut p = base.to_vec();
    p.extend_from_slice(extra);
    p
}

/// Which of the two admin kinds.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum AdminKind {
    Admin,
    Baseline,
}

impl AdminKind {
    fn name(self) -> &'static str {
        match self {
            AdminKind::Admin => "AdminNetworkPolicy",
            AdminKind::Baseline => "BaselineAdminNetworkPolicy",
        }
    }
}

impl V<'_, '_> {
    fn namespaced(&mut self, sel: &NamespacedPod, base: &[Seg]) -> Selector {
        let ns = match &sel.namespace_selector {
            Some(ns) => self.selector(ns, &at(base, &path!["namespaceSelector"]), NS_LABEL_PREFIX),
            None => Selector::all(),
        };
        let pods = self.selector(&sel.pod_selector, &at(base, &path!["podSelector"]), "");
        ns.and(pods)
    }

    /// Exactly one of namespaces / pods (subjects and ingress peers).
    fn who(
        &mut self,
        namespaces: Option<&LabelSelector>,
        pods: Option<&NamespacedPod>,
        base: &[Seg],
        what: &str,
    ) -> Option<Selector> {
        match (namespaces, pods) {
            (Some(n), None) => {
                Some(self.selector(n, &at(base, &path!["namespaces"]), NS_LABEL_PREFIX))
            }
            (None, Some(p)) => Some(self.namespaced(p, &at(base, &path!["pods"]))),
            (Some(_), Some(_)) => {
                self.err(
                    base,
                    format!("{what} must set exactly one of namespaces or pods, not both"),
                );
                None
            }
            (None, None) => {
                self.err(base, format!("{what} must set namespaces or pods"));
                None
            }
        }
    }

    fn admin_peer(&mut self, p: &Peer, base: &[Seg], egress: bool) -> Vec<crate::model::Peer> {
        if p.domain_names.is_some() {
            self.key_err(
                &at(base, &path!["domainNames"]),
                "`domainNames` peers are not supported offline (no DNS): use networks",
            );
            return vec![];
        }
        let set = [
            p.namespaces.is_some(),
            p.pods.is_some(),
            p.nodes.is_some(),
            p.networks.is_some(),
        ]
        .iter()
        .filter(|x| **x)
        .count();
        if !egress && (p.nodes.is_some() || p.networks.is_some()) {
            let k = if p.nodes.is_some() {
                "nodes"
            } else {
                "networks"
            };
            self.key_err(
                &at(base, &[Seg::key(k)]),
                format!("`{k}` peers are allowed in egress rules only"),
            );
            return vec![];
        }
        if set != 1 {
            self.err(
                base,
                if egress {
                    "a peer must set exactly one of namespaces, pods, nodes or networks"
                } else {
                    "a peer must set exactly one of namespaces or pods"
                },
            );
            return vec![];
        }
        if let Some(n) = &p.nodes {
            // Matched against node labels only, so no system-label prefix.
            let sel = self.selector(n, &at(base, &path!["nodes"]), "");
            return vec![crate::model::Peer::Nodes(sel)];
        }
        if let Some(nets) = &p.networks {
            if nets.is_empty() || nets.len() > 25 {
                self.err(
                    &at(base, &path!["networks"]),
                    "networks must list 1 to 25 CIDRs",
                );
            }
            let mut out = Vec::new();
            for (i, n) in nets.iter().enumerate() {
                let path = at(base, &path!["networks", i]);
                if !n.contains('/') {
                    self.err(&path, format!("{n:?} is not a CIDR (address/prefix)"));
                    continue;
                }
                if let Some(c) = self.cidr(n, &path) {
                    out.push(crate::model::Peer::Cidr(CidrBlock {
                        cidr: c,
                        except: vec![],
                    }));
                }
            }
            return out;
        }
        self.who(p.namespaces.as_ref(), p.pods.as_ref(), base, "a peer")
            .map(crate::model::Peer::Identity)
            .into_iter()
            .collect()
    }

    fn admin_port(&mut self, p: &Port, base: &[Seg]) -> Option<PortRule> {
        let set = [
            p.port_number.is_some(),
            p.named_port.is_some(),
            p.port_range.is_some(),
        ]
        .iter()
        .filter(|x| **x)
        .count();
        if set != 1 {
            self.err(
                base,
                "a port must set exactly one of portNumber, namedPort or portRange",
            );
            return None;
        }
        if let Some(n) = &p.port_number {
            let b = at(base, &path!["portNumber"]);
            let protocol = self.protocol(n.protocol.as_deref(), &at(&b, &path!["protocol"]));
            let port = self.port_number(n.port, &at(&b, &path!["port"]));
            return Some(PortRule {
                protocol,
                port: PortMatch::Range {
                    first: port,
                    last: port,
                },
            });
        }
        if let Some(name) = &p.named_port {
            if let Err(m) = check_port_name(name) {
                self.err(&at(base, &path!["namedPort"]), m);
            }
            // A named port matches the container port of that name, any protocol.
            return Some(PortRule {
                protocol: Protocol::Tcp,
                port: PortMatch::Named(name.clone()),
            });
        }
        let r = p.port_range.as_ref()?;
        let b = at(base, &path!["portRange"]);
        let protocol = self.protocol(r.protocol.as_deref(), &at(&b, &path!["protocol"]));
        let first = self.port_number(r.start, &at(&b, &path!["start"]));
        let last = self.port_number(r.end, &at(&b, &path!["end"]));
        if r.end <= r.start {
            self.err(
                &at(&b, &path!["end"]),
                format!("end {} must be greater than start {}", r.end, r.start),
            );
        }
        Some(PortRule {
            protocol,
            port: PortMatch::Range {
                first,
                last: last.max(first),
            },
        })
    }

    fn admin_rule(
        &mut self,
        kind: AdminKind,
        action: &str,
        peers: &[Peer],
        ports: Option<&Vec<Port>>,
        base: &[Seg],
        peers_key: &'static str,
    ) -> Vec<Rule> {
        // Egress rules list their peers under `to`.
        let egress = peers_key == "to";
        let act = match (action, kind) {
            ("Allow", _) => Action::Allow,
            ("Deny", _) => Action::Deny,
            ("Pass", AdminKind::Admin) => Action::Pass,
            (other, AdminKind::Admin) => {
                self.err(
                    &at(base, &path!["action"]),
                    format!("unknown action {other:?} (expected Allow, Deny or Pass)"),
                );
                Action::Deny
            }
            (other, AdminKind::Baseline) => {
                self.err(&at(base, &path!["action"]), format!("unknown action {other:?} (a BaselineAdminNetworkPolicy allows Allow or Deny)"));
                Action::Deny
            }
        };
        if peers.is_empty() || peers.len() > 100 {
            self.err(
                &at(base, &[Seg::key(peers_key)]),
                format!("`{peers_key}` must list 1 to 100 peers"),
            );
        }
        let mut model_peers = Vec::new();
        for (i, p) in peers.iter().enumerate() {
            model_peers.extend(self.admin_peer(
                p,
                &at(base, &[Seg::key(peers_key), Seg::Index(i)]),
                egress,
            ));
        }
        let mut model_ports = Vec::new();
        if let Some(ps) = ports {
            if ps.is_empty() || ps.len() > 100 {
                self.err(
                    &at(base, &path!["ports"]),
                    "`ports` must list 1 to 100 ports (omit it for all ports)",
                );
            }
            for (i, p) in ps.iter().enumerate() {
                if let Some(r) = self.admin_port(p, &at(base, &path!["ports", i])) {
                    // namedPort carries no protocol: match it for every protocol.
                    if let PortMatch::Named(n) = &r.port {
                        for protocol in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
                            model_ports.push(PortRule {
                                protocol,
                                port: PortMatch::Named(n.clone()),
                            });
                        }
                    } else {
                        model_ports.push(r);
                    }
                }
            }
        }
        if model_peers.is_empty() {
            // Every peer was invalid (already reported): a rule with no peers matches nothing.
            return vec![];
        }
        vec![Rule {
            action: act,
            peers: Peers::AnyOf(model_peers),
            ports: model_ports,
            source: self.source(base),
        }]
    }
}

pub(super) fn admin_policy(
    ctx: &super::ObjCtx<'_>,
    kind: AdminKind,
    p: &AdminPolicy,
    diags: &mut Vec<crate::diag::Diagnostic>,
) -> Option<Policy> {
    let mut v = V { ctx, diags };
    let name = v.cluster_scoped_name(&p.metadata, kind.name())?;
    let priority = match (kind, p.spec.priority) {
        (AdminKind::Admin, Some(pr)) if (0..=1000).contains(&pr) => pr as i32,
        (AdminKind::Admin, Some(pr)) => {
            v.err(
                &path!["spec", "priority"],
                format!("priority {pr} is out of range (0-1000)"),
            );
            0
        }
        (AdminKind::Admin, None) => {
            v.err(
                &path!["spec"],
                "an AdminNetworkPolicy needs spec.priority (0-1000; lower runs first)",
            );
            0
        }
        (AdminKind::Baseline, Some(_)) => {
            v.key_err(
                &path!["spec", "priority"],
                "a BaselineAdminNetworkPolicy has no priority",
            );
            0
        }
        (AdminKind::Baseline, None) => 0,
    };
    if kind == AdminKind::Baseline && name != "default" {
        v.err(
            &path!["metadata", "name"],
            "a BaselineAdminNetworkPolicy must be named \"default\" (there is one per cluster)",
        );
    }
    // v1alpha1 requires namespaceSelector wherever `pods` appears.
    let missing = |pods: &Option<NamespacedPod>| {
        pods.as_ref()
            .is_some_and(|p| p.namespace_selector.is_none())
    };
    let mut bad: Vec<Vec<Seg>> = Vec::new();
    if missing(&p.spec.subject.pods) {
        bad.push(path!["spec", "subject", "pods"].to_vec());
    }
    let rule_peers: [(&str, &str, Vec<&Vec<Peer>>); 2] = [
        (
            "ingress",
            "from",
            p.spec.ingress.iter().flatten().map(|r| &r.from).collect(),
        ),
        (
            "egress",
            "to",
            p.spec.egress.iter().flatten().map(|r| &r.to).collect(),
        ),
    ];
    for (dir, key, rules) in rule_peers {
        for (i, peers) in rules.into_iter().enumerate() {
            for (k, _) in peers.iter().enumerate().filter(|(_, q)| missing(&q.pods)) {
                bad.push(path!["spec", dir, i, key, k, "pods"].to_vec());
            }
        }
    }
    for at_path in bad {
        v.err(
            &at_path,
            format!(
                "{} (v1alpha1) requires pods.namespaceSelector ({{}} selects every namespace)",
                kind.name()
            ),
        );
    }
    let subject = v.who(
        p.spec.subject.namespaces.as_ref(),
        p.spec.subject.pods.as_ref(),
        &path!["spec", "subject"],
        "the subject",
    )?;
    let mut ingress = Vec::new();
    for (i, r) in p.spec.ingress.iter().flatten().enumerate() {
        let _ = &r.name;
        ingress.extend(v.admin_rule(
            kind,
            &r.action,
            &r.from,
            r.ports.as_ref(),
            &path!["spec", "ingress", i],
            "from",
        ));
    }
    let mut egress = Vec::new();
    for (i, r) in p.spec.egress.iter().flatten().enumerate() {
        let _ = &r.name;
        egress.extend(v.admin_rule(
            kind,
            &r.action,
            &r.to,
            r.ports.as_ref(),
            &path!["spec", "egress", i],
            "to",
        ));
    }
    for (dir, n) in [
        ("ingress", p.spec.ingress.as_ref().map_or(0, Vec::len)),
        ("egress", p.spec.egress.as_ref().map_or(0, Vec::len)),
    ] {
        if n > 100 {
            v.err(
                &path!["spec", dir],
                format!("at most 100 {dir} rules ({n} given)"),
            );
        }
    }
    Some(Policy {
        tier: match kind {
            AdminKind::Admin => Tier::Admin,
            AdminKind::Baseline => Tier::Baseline,
        },
        priority,
        name: PolicyName {
            kind: kind.name().into(),
            namespace: None,
            name,
        },
        subject,
        ingress: p.spec.ingress.as_ref().map(|_| ingress),
        egress: p.spec.egress.as_ref().map(|_| egress),
        source: v.source(&[]),
    })
}

// ClusterNetworkPolicy (v1alpha2).

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterPolicy {
    #[serde(default)]
    #[allow(dead_code)]
    pub api_version: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    pub kind: Option<String>,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: ClusterSpec,
    #[serde(default)]
    #[allow(dead_code)]
    pub status: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSpec {
    pub tier: String,
    pub priority: i64,
    pub subject: Subject,
    #[serde(default)]
    pub ingress: Option<Vec<ClusterIngressRule>>,
    #[serde(default)]
    pub egress: Option<Vec<ClusterEgressRule>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterIngressRule {
    #[serde(default)]
    pub name: Option<String>,
    pub action: String,
    pub from: Vec<Peer>,
    #[serde(default)]
    pub protocols: Option<Vec<ClusterProtocol>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterEgressRule {
    #[serde(default)]
    pub name: Option<String>,
    pub action: String,
    pub to: Vec<Peer>,
    #[serde(default)]
    pub protocols: Option<Vec<ClusterProtocol>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterProtocol {
    #[serde(default)]
    pub tcp: Option<ProtocolPorts>,
    #[serde(default)]
    pub udp: Option<ProtocolPorts>,
    #[serde(default)]
    pub sctp: Option<ProtocolPorts>,
    #[serde(default)]
    pub destination_named_port: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProtocolPorts {
    #[serde(default)]
    pub destination_port: Option<ClusterPort>,
}

#[derive(Deserialize)]
pub struct ClusterPort {
    #[serde(default)]
    pub number: Option<i32>,
    #[serde(default)]
    pub range: Option<ClusterRange>,
}

#[derive(Deserialize)]
pub struct ClusterRange {
    pub start: i32,
    pub end: i32,
}

impl V<'_, '_> {
    fn cluster_protocol(&mut self, p: &ClusterProtocol, base: &[Seg]) -> Vec<PortRule> {
        let set = [
            p.tcp.is_some(),
            p.udp.is_some(),
            p.sctp.is_some(),
            p.destination_named_port.is_some(),
        ]
        .iter()
        .filter(|x| **x)
        .count();
        if set != 1 {
            self.err(
                base,
                "a protocol entry must set exactly one of tcp, udp, sctp or destinationNamedPort",
            );
            return vec![];
        }
        if let Some(n) = &p.destination_named_port {
            if let Err(m) = check_port_name(n) {
                self.err(&at(base, &path!["destinationNamedPort"]), m);
            }
            return [Protocol::Tcp, Protocol::Udp, Protocol::Sctp]
                .into_iter()
                .map(|protocol| PortRule {
                    protocol,
                    port: PortMatch::Named(n.clone()),
                })
                .collect();
        }
        let (protocol, key, ports) = match (&p.tcp, &p.udp, &p.sctp) {
            (Some(t), _, _) => (Protocol::Tcp, "tcp", t),
            (_, Some(u), _) => (Protocol::Udp, "udp", u),
            (_, _, Some(s)) => (Protocol::Sctp, "sctp", s),
            _ => return vec![],
        };
        let b = at(base, &[Seg::key(key)]);
        let Some(dp) = &ports.destination_port else {
            self.err(&b, format!("{key} needs destinationPort"));
            return vec![];
        };
        let b = at(&b, &path!["destinationPort"]);
        let port = match (dp.number, &dp.range) {
            (Some(n), None) => {
                let n = self.port_number(n, &at(&b, &path!["number"]));
                PortMatch::Range { first: n, last: n }
            }
            (None, Some(r)) => {
                let rb = at(&b, &path!["range"]);
                let first = self.port_number(r.start, &at(&rb, &path!["start"]));
                let last = self.port_number(r.end, &at(&rb, &path!["end"]));
                if r.start >= r.end {
                    self.err(
                        &rb,
                        format!(
                            "start port {} must be less than end port {}",
                            r.start, r.end
                        ),
                    );
                }
                PortMatch::Range {
                    first,
                    last: last.max(first),
                }
            }
            _ => {
                self.err(
                    &b,
                    "destinationPort must set exactly one of number or range",
                );
                return vec![];
            }
        };
        vec![PortRule { protocol, port }]
    }

    fn cluster_rule(
        &mut self,
        action: &str,
        peers: &[&Peer],
        protocols: Option<&Vec<ClusterProtocol>>,
        base: &[Seg],
        peers_key: &'static str,
    ) -> Option<Rule> {
        let act = match action {
            "Accept" => Action::Allow,
            "Deny" => Action::Deny,
            "Pass" => Action::Pass,
            other => {
                self.err(
                    &at(base, &path!["action"]),
                    format!("unknown action {other:?} (expected Accept, Deny or Pass)"),
                );
                return None;
            }
        };
        if peers.is_empty() || peers.len() > 25 {
            self.err(
                &at(base, &[Seg::key(peers_key)]),
                format!("`{peers_key}` must list 1 to 25 peers"),
            );
        }
        let egress = peers_key == "to";
        let mut model_peers = Vec::new();
        let mut network_peer = false;
        for (i, p) in peers.iter().enumerate() {
            network_peer |= p.networks.is_some() || p.nodes.is_some();
            model_peers.extend(self.admin_peer(
                p,
                &at(base, &[Seg::key(peers_key), Seg::Index(i)]),
                egress,
            ));
        }
        let mut ports = Vec::new();
        if let Some(ps) = protocols {
            if ps.is_empty() || ps.len() > 25 {
                self.err(
                    &at(base, &path!["protocols"]),
                    "`protocols` must list 1 to 25 entries (omit it for all)",
                );
            }
            for (i, p) in ps.iter().enumerate() {
                if p.destination_named_port.is_some() && network_peer {
                    self.err(&at(base, &path!["protocols", i]), "networks/nodes peers cannot be combined with destinationNamedPort (they have no named ports)");
                }
                ports.extend(self.cluster_protocol(p, &at(base, &path!["protocols", i])));
            }
        }
        if model_peers.is_empty() {
            return None;
        }
        Some(Rule {
            action: act,
            peers: Peers::AnyOf(model_peers),
            ports,
            source: self.source(base),
        })
    }
}

pub(super) fn cluster_policy(
    ctx: &super::ObjCtx<'_>,
    p: &ClusterPolicy,
    diags: &mut Vec<crate::diag::Diagnostic>,
) -> Option<Policy> {
    let mut v = V { ctx, diags };
    let name = v.cluster_scoped_name(&p.metadata, "ClusterNetworkPolicy")?;
    let tier = match p.spec.tier.as_str() {
        "Admin" => Tier::Admin,
        "Baseline" => Tier::Baseline,
        other => {
            v.err(
                &path!["spec", "tier"],
                format!("unknown tier {other:?} (expected Admin or Baseline)"),
            );
            Tier::Admin
        }
    };
    if !(0..=1000).contains(&p.spec.priority) {
        v.err(
            &path!["spec", "priority"],
            format!("priority {} is out of range (0-1000)", p.spec.priority),
        );
    }
    let subject = v.who(
        p.spec.subject.namespaces.as_ref(),
        p.spec.subject.pods.as_ref(),
        &path!["spec", "subject"],
        "the subject",
    )?;
    for (dir, n) in [
        ("ingress", p.spec.ingress.as_ref().map_or(0, Vec::len)),
        ("egress", p.spec.egress.as_ref().map_or(0, Vec::len)),
    ] {
        if n > 25 {
            v.err(
                &path!["spec", dir],
                format!("at most 25 {dir} rules ({n} given)"),
            );
        }
    }
    let mut ingress = Vec::new();
    for (i, r) in p.spec.ingress.iter().flatten().enumerate() {
        let _ = &r.name;
        let peers: Vec<&Peer> = r.from.iter().collect();
        ingress.extend(v.cluster_rule(
            &r.action,
            &peers,
            r.protocols.as_ref(),
            &path!["spec", "ingress", i],
            "from",
        ));
    }
    let mut egress = Vec::new();
    for (i, r) in p.spec.egress.iter().flatten().enumerate() {
        let _ = &r.name;
        let peers: Vec<&Peer> = r.to.iter().collect();
        egress.extend(v.cluster_rule(
            &r.action,
            &peers,
            r.protocols.as_ref(),
            &path!["spec", "egress", i],
            "to",
        ));
    }
    Some(Policy {
        tier,
        priority: p.spec.priority.clamp(0, 1000) as i32,
        name: PolicyName {
            kind: "ClusterNetworkPolicy".into(),
            namespace: None,
            name,
        },
        subject,
        ingress: p.spec.ingress.as_ref().map(|_| ingress),
        egress: p.spec.egress.as_ref().map(|_| egress),
        source: v.source(&[]),
    })
}
