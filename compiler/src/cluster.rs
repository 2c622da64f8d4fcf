//! The cluster snapshot: namespaces, nodes and pods, each pod with its
//! identity, IPs and named container ports. It is an input to
//! `check`/`matrix`, never part of a ruleset (rulesets are independent of
//! pod instances).

use crate::eval::Endpoint;
use crate::model::{Identity, NamedPort};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// A cluster node: what `nodes` peers select (by these labels) and where
/// host-networked pods live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNode {
    pub name: String,
    /// The node's labels as an identity (no system labels: node selectors
    /// are matched only against nodes).
    pub labels: Identity,
    /// status.addresses that are IPs (hostnames are skipped).
    pub ips: Vec<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNamespace {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterPod {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Primary first (status.podIP), then the other status.podIPs.
    pub ips: Vec<IpAddr>,
    pub ports: Vec<NamedPort>,
    /// For resolver plugins.
    pub annotations: BTreeMap<String, String>,
    /// Container images (init containers last), for resolver plugins.
    pub images: Vec<String>,
    /// spec.hostNetwork: the pod shares its node's addresses and is no
    /// workload of ours: no policy selects it, as subject or as peer;
    /// traffic to and from it is traffic of its node.
    pub host_network: bool,
    /// spec.nodeName, if scheduled.
    pub node_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub pod: ClusterPod,
    pub identity: Identity,
}

impl Workload {
    pub fn display_name(&self) -> String {
        format!("{}/{}", self.pod.namespace, self.pod.name)
    }
}

#[derive(Debug, Clone, Default)]
pub struct Cluster {
    /// Declared namespaces, plus those only implied by a pod (labelled with
    /// just the implicit `kubernetes.io/metadata.name`).
    pub namespaces: BTreeMap<String, ClusterNamespace>,
    /// Sorted by namespace, then name.
    pub workloads: Vec<Workload>,
    /// Sorted by name.
    pub nodes: Vec<ClusterNode>,
}

impl Cluster {
    pub fn new(
        namespaces: Vec<ClusterNamespace>,
        pods: Vec<ClusterPod>,
        mut nodes: Vec<ClusterNode>,
    ) -> Self {
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        let mut ns_map: BTreeMap<String, ClusterNamespace> = namespaces
            .into_iter()
            .map(|n| (n.name.clone(), n))
            .collect();
        for p in &pods {
            ns_map
                .entry(p.namespace.clone())
                .or_insert_with(|| ClusterNamespace {
                    name: p.namespace.clone(),
                    labels: BTreeMap::new(),
                });
        }
        let mut workloads: Vec<Workload> = pods
            .into_iter()
            .map(|pod| {
                let ns = &ns_map[&pod.namespace];
                let identity = Identity::for_pod(&pod.namespace, &ns.labels, &pod.labels);
                Workload { pod, identity }
            })
            .collect();
        workloads
            .sort_by(|a, b| (&a.pod.namespace, &a.pod.name).cmp(&(&b.pod.namespace, &b.pod.name)));
        Cluster {
            namespaces: ns_map,
            workloads,
            nodes,
        }
    }

    /// The node that owns `ip`, if any.
    pub fn node_at(&self, ip: IpAddr) -> Option<&ClusterNode> {
        self.nodes.iter().find(|n| n.ips.contains(&ip))
    }

    /// The node a host-networked pod runs on: by spec.nodeName, else by its
    /// address.
    fn node_of(&self, pod: &ClusterPod) -> Option<&ClusterNode> {
        if let Some(name) = &pod.node_name
            && let Ok(i) = self.nodes.binary_search_by(|n| n.name.as_str().cmp(name))
        {
            return Some(&self.nodes[i]);
        }
        pod.ips.iter().find_map(|ip| self.node_at(*ip))
    }

    /// How the evaluator sees a workload: a pod with its identity, or, for
    /// a host-networked pod, its node (no identity, the node's labels).
    pub fn endpoint<'a>(&'a self, w: &'a Workload) -> Endpoint<'a> {
        if w.pod.host_network {
            return Endpoint {
                identity: None,
                ip: w.pod.ips.first().copied(),
                ports: &w.pod.ports,
                node: self.node_of(&w.pod).map(|n| &n.labels),
            };
        }
        Endpoint {
            identity: Some(&w.identity),
            ip: w.pod.ips.first().copied(),
            ports: &w.pod.ports,
            node: None,
        }
    }

    /// How the evaluator sees a bare address: a node's when a node owns it.
    pub fn ip_endpoint(&self, ip: IpAddr) -> Endpoint<'_> {
        Endpoint {
            identity: None,
            ip: Some(ip),
            ports: &[],
            node: self.node_at(ip).map(|n| &n.labels),
        }
    }

    /// Finds `NS/POD` (or `POD` in namespace `default`).
    pub fn find(&self, name: &str) -> Option<&Workload> {
        let (ns, pod) = name.split_once('/').unwrap_or(("default", name));
        self.workloads
            .binary_search_by(|w| (w.pod.namespace.as_str(), w.pod.name.as_str()).cmp(&(ns, pod)))
            .ok()
            .map(|i| &self.workloads[i])
    }
}
