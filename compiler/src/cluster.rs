//! The cluster snapshot: namespaces and pods, each pod with its identity,
//! IPs and named container ports. It is an input to `check`/`matrix`, never
//! part of a ruleset (rulesets are independent of pod instances).

use crate::model::{Identity, NamedPort};
use std::collections::BTreeMap;
use std::net::IpAddr;

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
}

impl Cluster {
    pub fn new(namespaces: Vec<ClusterNamespace>, pods: Vec<ClusterPod>) -> Self {
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
