//! The policy model every source compiles into (design.md §2).
//!
//! Identities are label sets. Sources add *system labels* under the reserved
//! `@` prefix, which no Kubernetes label key can contain, so a user label can
//! never impersonate a namespace. Policies live in tiers so that admin and
//! baseline policies fit beside NetworkPolicy without a model change.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

/// System label holding the workload's namespace name.
pub const NAMESPACE_KEY: &str = "@namespace";
/// Prefix of system labels copied from the workload's namespace labels.
pub const NS_LABEL_PREFIX: &str = "@ns:";
/// System label marking a workload whose resolver plugin failed: it is
/// denied everything (fail-closed). The value names the plugin.
pub const UNRESOLVED_KEY: &str = "@unresolved";
/// Label the API server puts on every namespace (immutable, = its name).
pub const K8S_NS_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A workload identity: labels, including system labels. Sorted, so that
/// lookups are binary searches and equal identities compare equal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Identity(BTreeMap<String, String>);

impl Identity {
    pub fn new() -> Self {
        Identity(BTreeMap::new())
    }

    /// A Kubernetes pod's identity: its labels, its namespace and the
    /// namespace's labels (including the implicit name label).
    pub fn for_pod<'a>(
        namespace: &str,
        ns_labels: impl IntoIterator<Item = (&'a String, &'a String)>,
        pod_labels: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Self {
        let mut m = BTreeMap::new();
        for (k, v) in pod_labels {
            m.insert(k.clone(), v.clone());
        }
        m.insert(NAMESPACE_KEY.to_string(), namespace.to_string());
        for (k, v) in ns_labels {
            m.insert(format!("{NS_LABEL_PREFIX}{k}"), v.clone());
        }
        m.insert(
            format!("{NS_LABEL_PREFIX}{K8S_NS_NAME_LABEL}"),
            namespace.to_string(),
        );
        Identity(m)
    }

    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.0.insert(key.into(), value.into());
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<(String, String)> for Identity {
    fn from_iter<T: IntoIterator<Item = (String, String)>>(iter: T) -> Self {
        Identity(iter.into_iter().collect())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn parse(s: &str) -> Option<Protocol> {
        match s.to_ascii_uppercase().as_str() {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Direction {
    Ingress,
    Egress,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// One label requirement. `values` is sorted and deduplicated.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Requirement {
    pub key: String,
    pub op: Operator,
    pub values: Vec<String>,
}

impl Requirement {
    pub fn new(
        key: impl Into<String>,
        op: Operator,
        values: impl IntoIterator<Item = String>,
    ) -> Self {
        let mut values: Vec<String> = values.into_iter().collect();
        values.sort();
        values.dedup();
        Requirement {
            key: key.into(),
            op,
            values,
        }
    }

    pub fn equals(key: impl Into<String>, value: impl Into<String>) -> Self {
        Requirement::new(key, Operator::In, [value.into()])
    }

    /// Kubernetes semantics: NotIn and DoesNotExist match when the key is absent.
    pub fn matches(&self, id: &Identity) -> bool {
        let v = id.get(&self.key);
        match self.op {
            Operator::In => {
                v.is_some_and(|v| self.values.binary_search_by(|x| x.as_str().cmp(v)).is_ok())
            }
            Operator::NotIn => {
                v.is_none_or(|v| self.values.binary_search_by(|x| x.as_str().cmp(v)).is_err())
            }
            Operator::Exists => v.is_some(),
            Operator::DoesNotExist => v.is_none(),
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.op {
            Operator::In if self.values.len() == 1 => write!(f, "{}={}", self.key, self.values[0]),
            Operator::NotIn if self.values.len() == 1 => {
                write!(f, "{}!={}", self.key, self.values[0])
            }
            Operator::In => write!(f, "{} in ({})", self.key, self.values.join(",")),
            Operator::NotIn => write!(f, "{} notin ({})", self.key, self.values.join(",")),
            Operator::Exists => write!(f, "{}", self.key),
            Operator::DoesNotExist => write!(f, "!{}", self.key),
        }
    }
}

/// A conjunction of requirements; the empty selector matches every identity.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Selector {
    pub requirements: Vec<Requirement>,
}

impl Selector {
    pub fn all() -> Self {
        Selector::default()
    }

    pub fn new(mut requirements: Vec<Requirement>) -> Self {
        requirements.sort();
        requirements.dedup();
        Selector { requirements }
    }

    pub fn and(mut self, other: Selector) -> Self {
        self.requirements.extend(other.requirements);
        Selector::new(self.requirements)
    }

    pub fn matches(&self, id: &Identity) -> bool {
        self.requirements.iter().all(|r| r.matches(id))
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.requirements.is_empty() {
            return f.write_str("{all}");
        }
        f.write_str("{")?;
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{r}")?;
        }
        f.write_str("}")
    }
}

/// A CIDR with exceptions (NetworkPolicy ipBlock).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CidrBlock {
    pub cidr: IpNet,
    pub except: Vec<IpNet>,
}

impl CidrBlock {
    pub fn contains(&self, ip: &IpAddr) -> bool {
        self.cidr.contains(ip) && !self.except.iter().any(|e| e.contains(ip))
    }
}

impl fmt::Display for CidrBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.cidr)?;
        for e in &self.except {
            write!(f, " except {e}")?;
        }
        Ok(())
    }
}

/// Who a rule talks about on the other side of the connection.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Peer {
    /// Workloads whose identity matches the selector.
    Identity(Selector),
    /// Any endpoint (workload or not) whose IP is in the block.
    Cidr(CidrBlock),
    /// Cluster nodes whose labels match (admin tiers' `nodes` egress peers):
    /// the node's own addresses, and host-networked pods on it. Node labels
    /// are a separate namespace from workload labels, so a pod can never
    /// match a node selector nor a node a pod selector.
    Nodes(Selector),
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Identity(s) => write!(f, "identities {s}"),
            Peer::Cidr(c) => write!(f, "cidr {c}"),
            Peer::Nodes(s) => write!(f, "nodes {s}"),
        }
    }
}

/// Which ports a rule covers for one protocol.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PortMatch {
    /// Every port of the protocol.
    Any,
    /// An inclusive range (a single port is `first == last`).
    Range { first: u16, last: u16 },
    /// A container port name, resolved against the *destination* workload.
    Named(String),
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortRule {
    pub protocol: Protocol,
    pub port: PortMatch,
}

impl fmt::Display for PortRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.port {
            PortMatch::Any => write!(f, "any/{}", self.protocol),
            PortMatch::Range { first, last } if first == last => {
                write!(f, "{first}/{}", self.protocol)
            }
            PortMatch::Range { first, last } => write!(f, "{first}-{last}/{}", self.protocol),
            PortMatch::Named(n) => write!(f, "{n}/{}", self.protocol),
        }
    }
}

/// A container port a workload declares (for named-port resolution).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NamedPort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Action {
    Allow,
    Deny,
    /// Admin tier only: skip the remaining admin rules, continue at the namespace tier.
    Pass,
    /// Ask a decide plugin (index into the ruleset's plugins): its allow or
    /// deny is this rule's action; abstain means the rule does not match.
    Ask(u32),
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Allow => f.write_str("allow"),
            Action::Deny => f.write_str("deny"),
            Action::Pass => f.write_str("pass"),
            Action::Ask(k) => write!(f, "ask plugin #{k}"),
        }
    }
}

/// Tiers, in evaluation order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Tier {
    Admin,
    Namespace,
    Baseline,
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::Admin => "admin",
            Tier::Namespace => "namespace",
            Tier::Baseline => "baseline",
        })
    }
}

/// Where a policy or rule came from, for explanations.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SourceRef {
    /// Index into the ruleset's source file table.
    pub file: u32,
    pub line: u32,
    pub col: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Peers {
    /// No peer restriction (NetworkPolicy: `from`/`to` absent or empty).
    Any,
    /// Any of these.
    AnyOf(Vec<Peer>),
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Rule {
    pub action: Action,
    pub peers: Peers,
    /// Empty means every port of every protocol.
    pub ports: Vec<PortRule>,
    pub source: SourceRef,
}

/// Stable, human-readable policy identity.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PolicyName {
    /// What produced it, e.g. `NetworkPolicy`.
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
}

impl fmt::Display for PolicyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {}/{}", self.kind, ns, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Policy {
    pub tier: Tier,
    /// Lower runs first (admin and baseline tiers); 0 in the namespace tier.
    pub priority: i32,
    pub name: PolicyName,
    /// The workloads this policy applies to.
    pub subject: Selector,
    /// `None`: the policy does not govern this direction. `Some(rules)`: it
    /// does (in the namespace tier, selecting a workload isolates it, even
    /// with no rules).
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
    pub source: SourceRef,
}

impl Policy {
    pub fn rules(&self, dir: Direction) -> Option<&[Rule]> {
        match dir {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }

    /// Every selector in the policy (for label-key collection and linting).
    pub fn selectors(&self) -> impl Iterator<Item = &Selector> {
        let rules = self.ingress.iter().chain(self.egress.iter()).flatten();
        std::iter::once(&self.subject).chain(
            rules
                .flat_map(|r| match &r.peers {
                    Peers::Any => [].iter(),
                    Peers::AnyOf(p) => p.iter(),
                })
                .filter_map(|p| match p {
                    Peer::Identity(s) => Some(s),
                    Peer::Cidr(_) | Peer::Nodes(_) => None,
                }),
        )
    }
}
