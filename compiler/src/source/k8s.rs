//! Kubernetes objects → validated snapshot entries and model policies.
//!
//! Validation mirrors the API server's (apimachinery and networking
//! validation), so that what compiles here would also be admitted by a
//! cluster, and every rejection points at the offending field.

use super::ObjCtx;
use super::yaml::Seg;
use crate::cluster::{ClusterNamespace, ClusterNode, ClusterPod};
use crate::diag::Diagnostic;
use crate::model::*;
use crate::names::*;
use crate::path;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Container, Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::BTreeMap;
use std::net::IpAddr;

pub(super) struct V<'a, 'b> {
    pub(super) ctx: &'a ObjCtx<'b>,
    pub(super) diags: &'a mut Vec<Diagnostic>,
}

impl V<'_, '_> {
    pub(super) fn err(&mut self, path: &[Seg], msg: impl Into<String>) {
        self.diags.push(Diagnostic::at(self.ctx.loc(path), msg));
    }

    pub(super) fn key_err(&mut self, path: &[Seg], msg: impl Into<String>) {
        self.diags.push(Diagnostic::at(self.ctx.key_loc(path), msg));
    }

    pub(super) fn source(&self, path: &[Seg]) -> SourceRef {
        let loc = self.ctx.loc(path);
        SourceRef {
            file: self.ctx.file_index,
            line: loc.line,
            col: loc.col,
        }
    }

    pub(super) fn name(&mut self, meta: &ObjectMeta, kind: &str) -> Option<String> {
        match meta.name.as_deref() {
            None | Some("") => {
                if meta.generate_name.is_some() {
                    self.err(&path!["metadata"], format!("{kind} uses generateName; an offline snapshot needs a fixed metadata.name"));
                } else {
                    self.err(&path!["metadata"], format!("{kind} has no metadata.name"));
                }
                None
            }
            Some(n) => {
                if let Err(m) = check_dns_subdomain(n) {
                    self.err(
                        &path!["metadata", "name"],
                        format!("invalid {kind} name: {m}"),
                    );
                }
                Some(n.to_string())
            }
        }
    }

    /// As `name`, for a cluster-scoped kind: a namespace on it is an error
    /// (the object would otherwise be read as if it applied there).
    pub(super) fn cluster_scoped_name(&mut self, meta: &ObjectMeta, kind: &str) -> Option<String> {
        let name = self.name(meta, kind)?;
        if meta.namespace.is_some() {
            self.err(
                &path!["metadata", "namespace"],
                format!("{kind} is cluster-scoped: remove metadata.namespace"),
            );
        }
        Some(name)
    }

    /// `default` when absent, as `kubectl apply` does.
    fn namespace_of(&mut self, meta: &ObjectMeta) -> String {
        match meta.namespace.as_deref() {
            None | Some("") => "default".to_string(),
            Some(ns) => {
                if let Err(m) = check_dns_label(ns) {
                    self.err(
                        &path!["metadata", "namespace"],
                        format!("invalid namespace: {m}"),
                    );
                }
                ns.to_string()
            }
        }
    }

    fn labels(
        &mut self,
        labels: Option<&BTreeMap<String, String>>,
        base: &[Seg],
    ) -> BTreeMap<String, String> {
        let labels = labels.cloned().unwrap_or_default();
        for (k, v) in &labels {
            let mut p = base.to_vec();
            p.push(Seg::from(k.clone()));
            if let Err(m) = check_label_key(k) {
                self.key_err(&p, m);
            }
            if let Err(m) = check_label_value(v) {
                self.err(&p, m);
            }
        }
        labels
    }

    /// A label selector, with keys optionally moved under a system prefix
    /// (namespace selectors select on `@ns:` labels).
    pub(super) fn selector(&mut self, sel: &LabelSelector, base: &[Seg], prefix: &str) -> Selector {
        let mut reqs = Vec::new();
        let at = |extra: Vec<Seg>| {
            let mut p = base.to_vec();
            p.extend(extra);
            p
        };
        for (k, v) in sel.match_labels.iter().flatten() {
            let p = at(path!["matchLabels", k.clone()].to_vec());
            if let Err(m) = check_label_key(k) {
                self.key_err(&p, m);
            }
            if let Err(m) = check_label_value(v) {
                self.err(&p, m);
            }
            reqs.push(Requirement::equals(format!("{prefix}{k}"), v.clone()));
        }
        for (i, e) in sel.match_expressions.iter().flatten().enumerate() {
            let p = at(path!["matchExpressions", i].to_vec());
            let mut pk = p.clone();
            pk.push(Seg::key("key"));
            if let Err(m) = check_label_key(&e.key) {
                self.err(&pk, m);
            }
            let values = e.values.clone().unwrap_or_default();
            let mut pv = p.clone();
            pv.push(Seg::key("values"));
            for (j, v) in values.iter().enumerate() {
                if let Err(m) = check_label_value(v) {
                    let mut pj = pv.clone();
                    pj.push(Seg::Index(j));
                    self.err(&pj, m);
                }
            }
            let mut po = p.clone();
            po.push(Seg::key("operator"));
            let op = match e.operator.as_str() {
                "In" => Operator::In,
                "NotIn" => Operator::NotIn,
                "Exists" => Operator::Exists,
                "DoesNotExist" => Operator::DoesNotExist,
                other => {
                    self.err(&po, format!("unknown operator {other:?} (expected In, NotIn, Exists or DoesNotExist)"));
                    continue;
                }
            };
            match op {
                Operator::In | Operator::NotIn if values.is_empty() => {
                    self.err(
                        &p,
                        format!("operator {} requires a non-empty `values`", e.operator),
                    );
                }
                Operator::Exists | Operator::DoesNotExist if !values.is_empty() => {
                    self.err(
                        &pv,
                        format!("operator {} must not have `values`", e.operator),
                    );
                }
                _ => {}
            }
            reqs.push(Requirement::new(format!("{prefix}{}", e.key), op, values));
        }
        Selector::new(reqs)
    }

    pub(super) fn protocol(&mut self, p: Option<&str>, path: &[Seg]) -> Protocol {
        match p {
            None => Protocol::Tcp,
            Some(s) => match s {
                "TCP" => Protocol::Tcp,
                "UDP" => Protocol::Udp,
                "SCTP" => Protocol::Sctp,
                other => {
                    self.err(
                        path,
                        format!("unsupported protocol {other:?} (expected TCP, UDP or SCTP)"),
                    );
                    Protocol::Tcp
                }
            },
        }
    }

    fn port(&mut self, port: &NetworkPolicyPort, base: &[Seg]) -> PortRule {
        let at = |k: &'static str| {
            let mut p = base.to_vec();
            p.push(Seg::key(k));
            p
        };
        let protocol = self.protocol(port.protocol.as_deref(), &at("protocol"));
        let pm = match (&port.port, port.end_port) {
            (None, None) => PortMatch::Any,
            (None, Some(_)) => {
                self.err(&at("endPort"), "endPort requires a numeric `port`");
                PortMatch::Any
            }
            (Some(IntOrString::Int(p)), end) => {
                let first = self.port_number(*p, &at("port"));
                let last = match end {
                    None => first,
                    Some(e) => {
                        let e16 = self.port_number(e, &at("endPort"));
                        if e < *p {
                            self.err(
                                &at("endPort"),
                                format!("endPort {e} must be greater than or equal to port {p}"),
                            );
                        }
                        e16
                    }
                };
                PortMatch::Range {
                    first,
                    last: last.max(first),
                }
            }
            (Some(IntOrString::String(name)), end) => {
                if end.is_some() {
                    self.err(
                        &at("endPort"),
                        "endPort may only be used with a numeric `port`, not a named port",
                    );
                }
                if let Err(m) = check_port_name(name) {
                    self.err(&at("port"), m);
                }
                PortMatch::Named(name.clone())
            }
        };
        PortRule { protocol, port: pm }
    }

    pub(super) fn port_number(&mut self, p: i32, path: &[Seg]) -> u16 {
        if (1..=65535).contains(&p) {
            p as u16
        } else {
            self.err(path, format!("port {p} is out of range (1-65535)"));
            1
        }
    }

    pub(super) fn cidr(&mut self, s: &str, path: &[Seg]) -> Option<IpNet> {
        match s.parse::<IpNet>() {
            Ok(n) => Some(n.trunc()),
            Err(_) => {
                self.err(
                    path,
                    format!("{s:?} is not a valid CIDR (e.g. 198.18.0.0/15 or fd00::/8)"),
                );
                None
            }
        }
    }

    fn ip_block(&mut self, b: &IPBlock, base: &[Seg]) -> Option<CidrBlock> {
        let mut pc = base.to_vec();
        pc.push(Seg::key("cidr"));
        let cidr = self.cidr(&b.cidr, &pc)?;
        let mut except = Vec::new();
        for (i, e) in b.except.iter().flatten().enumerate() {
            let p = path!["except", i];
            let mut pe = base.to_vec();
            pe.extend(p);
            let Some(en) = self.cidr(e, &pe) else {
                continue;
            };
            if !cidr.contains(&en) || en.prefix_len() <= cidr.prefix_len() {
                self.err(
                    &pe,
                    format!("except {en} must be a strict subset of cidr {cidr}"),
                );
                continue;
            }
            except.push(en);
        }
        except.sort();
        except.dedup();
        Some(CidrBlock { cidr, except })
    }

    fn peer(&mut self, peer: &NetworkPolicyPeer, base: &[Seg], ns: &str) -> Option<Peer> {
        let sub = |k: &'static str| {
            let mut p = base.to_vec();
            p.push(Seg::key(k));
            p
        };
        match (&peer.ip_block, &peer.pod_selector, &peer.namespace_selector) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                self.err(
                    base,
                    "ipBlock cannot be combined with podSelector or namespaceSelector in one peer",
                );
                None
            }
            (Some(b), None, None) => self.ip_block(b, &sub("ipBlock")).map(Peer::Cidr),
            (None, None, None) => {
                self.err(
                    base,
                    "a peer must set podSelector, namespaceSelector or ipBlock",
                );
                None
            }
            (None, pods, nss) => {
                let pod_sel = pods
                    .as_ref()
                    .map(|s| self.selector(s, &sub("podSelector"), ""));
                let sel = match nss {
                    // namespaceSelector (alone or with podSelector): any matching namespace.
                    Some(n) => self.selector(n, &sub("namespaceSelector"), NS_LABEL_PREFIX),
                    // podSelector alone: the policy's own namespace.
                    None => Selector::new(vec![Requirement::equals(NAMESPACE_KEY, ns)]),
                };
                Some(Peer::Identity(match pod_sel {
                    Some(p) => sel.and(p),
                    None => sel,
                }))
            }
        }
    }

    fn rule(
        &mut self,
        peers: Option<&Vec<NetworkPolicyPeer>>,
        ports: Option<&Vec<NetworkPolicyPort>>,
        base: &[Seg],
        peer_key: &'static str,
        ns: &str,
    ) -> Rule {
        let peers = match peers {
            None => Peers::Any,
            Some(v) if v.is_empty() => Peers::Any,
            Some(v) => Peers::AnyOf(
                v.iter()
                    .enumerate()
                    .filter_map(|(i, p)| {
                        let mut pp = base.to_vec();
                        pp.extend(path![peer_key, i]);
                        self.peer(p, &pp, ns)
                    })
                    .collect(),
            ),
        };
        let mut port_rules: Vec<PortRule> = ports
            .iter()
            .flat_map(|v| v.iter())
            .enumerate()
            .map(|(i, p)| {
                let mut pp = base.to_vec();
                pp.extend(path!["ports", i]);
                self.port(p, &pp)
            })
            .collect();
        port_rules.sort();
        port_rules.dedup();
        Rule {
            action: Action::Allow,
            peers,
            ports: port_rules,
            source: self.source(base),
        }
    }
}

pub(super) fn network_policy(
    ctx: &ObjCtx<'_>,
    np: &NetworkPolicy,
    diags: &mut Vec<Diagnostic>,
) -> Option<Policy> {
    let mut v = V { ctx, diags };
    let name = v.name(&np.metadata, "NetworkPolicy")?;
    let ns = v.namespace_of(&np.metadata);
    v.labels(np.metadata.labels.as_ref(), &path!["metadata", "labels"]);
    let spec = np.spec.clone().unwrap_or_default();
    let pod_sel = spec.pod_selector.clone().unwrap_or_default();
    let subject = Selector::new(vec![Requirement::equals(NAMESPACE_KEY, ns.clone())])
        .and(v.selector(&pod_sel, &path!["spec", "podSelector"], ""));
    let (mut ingress_on, mut egress_on) = (false, false);
    match &spec.policy_types {
        // The API server's defaulting: Ingress always, Egress only with egress rules.
        None => {
            ingress_on = true;
            egress_on = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
        }
        Some(types) => {
            if types.len() > 2 {
                v.err(
                    &path!["spec", "policyTypes"],
                    "policyTypes may list at most Ingress and Egress",
                );
            }
            for (i, t) in types.iter().enumerate() {
                let flag = match t.as_str() {
                    "Ingress" => &mut ingress_on,
                    "Egress" => &mut egress_on,
                    other => {
                        v.err(
                            &path!["spec", "policyTypes", i],
                            format!("unknown policy type {other:?} (expected Ingress or Egress)"),
                        );
                        continue;
                    }
                };
                if *flag {
                    v.err(
                        &path!["spec", "policyTypes", i],
                        format!("duplicate policy type {t}"),
                    );
                }
                *flag = true;
            }
        }
    }
    // Rules are validated even for a direction the policy does not govern:
    // the API server validates them too.
    let ingress: Vec<Rule> = spec
        .ingress
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| {
            v.rule(
                r.from.as_ref(),
                r.ports.as_ref(),
                &path!["spec", "ingress", i],
                "from",
                &ns,
            )
        })
        .collect();
    let egress: Vec<Rule> = spec
        .egress
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| {
            v.rule(
                r.to.as_ref(),
                r.ports.as_ref(),
                &path!["spec", "egress", i],
                "to",
                &ns,
            )
        })
        .collect();
    Some(Policy {
        tier: Tier::Namespace,
        priority: 0,
        name: PolicyName {
            kind: "NetworkPolicy".into(),
            namespace: Some(ns),
            name,
        },
        subject,
        ingress: ingress_on.then_some(ingress),
        egress: egress_on.then_some(egress),
        source: v.source(&[]),
    })
}

pub(super) fn namespace(
    ctx: &ObjCtx<'_>,
    n: &Namespace,
    diags: &mut Vec<Diagnostic>,
) -> Option<ClusterNamespace> {
    let mut v = V { ctx, diags };
    let name = v.name(&n.metadata, "Namespace")?;
    if let Err(m) = check_dns_label(&name) {
        v.err(
            &path!["metadata", "name"],
            format!("invalid Namespace name: {m}"),
        );
    }
    let labels = v.labels(n.metadata.labels.as_ref(), &path!["metadata", "labels"]);
    Some(ClusterNamespace { name, labels })
}

pub(super) fn pod(ctx: &ObjCtx<'_>, p: &Pod, diags: &mut Vec<Diagnostic>) -> Option<ClusterPod> {
    let mut v = V { ctx, diags };
    let name = v.name(&p.metadata, "Pod")?;
    let namespace = v.namespace_of(&p.metadata);
    let labels = v.labels(p.metadata.labels.as_ref(), &path!["metadata", "labels"]);
    let mut ports = Vec::new();
    let mut images = Vec::new();
    if let Some(spec) = &p.spec {
        let groups: [(&'static str, &[Container]); 2] = [
            ("containers", &spec.containers),
            (
                "initContainers",
                spec.init_containers.as_deref().unwrap_or(&[]),
            ),
        ];
        for (group, containers) in groups {
            for (ci, c) in containers.iter().enumerate() {
                images.extend(c.image.clone());
                for (pi, cp) in c.ports.iter().flatten().enumerate() {
                    let base = path!["spec", group, ci, "ports", pi];
                    let at = |k: &'static str| {
                        let mut p = base.to_vec();
                        p.push(Seg::key(k));
                        p
                    };
                    let port = v.port_number(cp.container_port, &at("containerPort"));
                    let protocol = v.protocol(cp.protocol.as_deref(), &at("protocol"));
                    if let Some(name) = &cp.name {
                        if let Err(m) = check_port_name(name) {
                            v.err(&at("name"), m);
                        }
                        ports.push(NamedPort {
                            name: name.clone(),
                            port,
                            protocol,
                        });
                    }
                }
            }
        }
    }
    ports.sort();
    ports.dedup();
    let mut ips = Vec::new();
    if let Some(st) = &p.status {
        if let Some(ip) = &st.pod_ip {
            match ip.parse::<IpAddr>() {
                Ok(a) => ips.push(a),
                Err(_) => v.err(
                    &path!["status", "podIP"],
                    format!("{ip:?} is not a valid IP address"),
                ),
            }
        }
        for (i, pip) in st.pod_ips.iter().flatten().enumerate() {
            match pip.ip.parse::<IpAddr>() {
                Ok(a) => {
                    if !ips.contains(&a) {
                        ips.push(a)
                    }
                }
                Err(_) => v.err(
                    &path!["status", "podIPs", i, "ip"],
                    format!("{:?} is not a valid IP address", pip.ip),
                ),
            }
        }
    }
    let annotations = p.metadata.annotations.clone().unwrap_or_default();
    let spec = p.spec.as_ref();
    Some(ClusterPod {
        namespace,
        name,
        labels,
        ips,
        ports,
        annotations,
        images,
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        node_name: spec.and_then(|s| s.node_name.clone()),
    })
}

/// A Node: its labels (what `nodes` peers select) and its IP addresses
/// (status.addresses of type InternalIP / ExternalIP; host names are not
/// addresses a packet carries).
pub(super) fn node(ctx: &ObjCtx<'_>, n: &Node, diags: &mut Vec<Diagnostic>) -> Option<ClusterNode> {
    let mut v = V { ctx, diags };
    let name = v.cluster_scoped_name(&n.metadata, "Node")?;
    let labels = v.labels(n.metadata.labels.as_ref(), &path!["metadata", "labels"]);
    let mut ips = Vec::new();
    let addresses = n.status.as_ref().and_then(|s| s.addresses.as_ref());
    for (i, a) in addresses.into_iter().flatten().enumerate() {
        if !matches!(a.type_.as_str(), "InternalIP" | "ExternalIP") {
            continue;
        }
        match a.address.parse::<IpAddr>() {
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            Ok(_) => {}
            Err(_) => v.err(
                &path!["status", "addresses", i, "address"],
                format!("{:?} is not a valid IP address ({})", a.address, a.type_),
            ),
        }
    }
    Some(ClusterNode {
        name,
        labels: labels.into_iter().collect(),
        ips,
    })
}
