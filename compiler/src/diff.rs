//! `trireme diff`: which flows of a cluster snapshot change verdict between
//! two policy sets. The question a reviewer asks of a pull request.

use crate::cluster::Cluster;
use crate::eval::Flow;
use crate::explain;
use crate::matrix;
use crate::model::{PortMatch, Protocol};
use crate::plugins::{self, Plugins};
use crate::ruleset::Ruleset;
use std::collections::BTreeSet;
use std::io::{self, Write};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Change {
    pub from: String,
    pub to: String,
    pub port: u16,
    #[serde(serialize_with = "protocol_name")]
    pub protocol: Protocol,
    pub allowed_before: bool,
    pub allowed_after: bool,
    /// The new verdict explained, egress then ingress.
    pub why: Vec<String>,
}

fn protocol_name<S: serde::Serializer>(p: &Protocol, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(p.as_str())
}

/// Ports worth comparing when none are given: every declared container
/// port, and both ends of every numeric port or range either side names.
pub fn default_ports(cluster: &Cluster, rulesets: &[&Ruleset]) -> Vec<(u16, Protocol)> {
    let mut out = BTreeSet::new();
    for w in &cluster.workloads {
        for p in &w.pod.ports {
            out.insert((p.port, p.protocol));
        }
    }
    for rs in rulesets {
        for p in &rs.policies {
            for r in p.ingress.iter().chain(p.egress.iter()).flatten() {
                for pr in &r.ports {
                    if let PortMatch::Range { first, last } = pr.port {
                        out.insert((first, pr.protocol));
                        out.insert((last, pr.protocol));
                    }
                }
            }
        }
    }
    out.into_iter().collect()
}

/// The snapshot as a ruleset sees it: resolved by its resolver plugins
/// (warnings to stderr, as `matrix` prints them).
fn side(rs: &Ruleset, cluster: &Cluster) -> Result<(Cluster, Option<Plugins>), String> {
    let mut c = cluster.clone();
    let (p, warnings) = plugins::offline_view(rs, &mut c)?;
    for w in warnings {
        eprintln!("warning: {w}");
    }
    Ok((c, p))
}

/// Fails only when a ruleset's plugins cannot be loaded. Each side runs its
/// own plugins (a resolver change is a policy change too).
pub fn compute(
    old: &Ruleset,
    new: &Ruleset,
    cluster: &Cluster,
    ports: &[(u16, Protocol)],
) -> Result<Vec<Change>, String> {
    let (co, po) = side(old, cluster)?;
    let (cn, pn) = side(new, cluster)?;
    let (eo, en) = (
        plugins::evaluator(old, po.as_ref()),
        plugins::evaluator(new, pn.as_ref()),
    );
    let (mo, mn) = (
        matrix::compute(&eo, &co, ports),
        matrix::compute(&en, &cn, ports),
    );
    let cluster = &cn;
    let n = cluster.workloads.len();
    let mut out = Vec::new();
    for (k, &(port, protocol)) in ports.iter().enumerate() {
        for i in 0..n * n {
            let (before, after) = (mo.allowed[k][i], mn.allowed[k][i]);
            if before == after || i / n == i % n {
                continue;
            }
            let (a, b) = (&cluster.workloads[i / n], &cluster.workloads[i % n]);
            let d = en.evaluate(&Flow {
                src: cluster.endpoint(a),
                dst: cluster.endpoint(b),
                port,
                protocol,
            });
            let (from, to) = (a.display_name(), b.display_name());
            out.push(Change {
                why: explain::decision(new, &d, &from, &to),
                from,
                to,
                port,
                protocol,
                allowed_before: before,
                allowed_after: after,
            });
        }
    }
    out.sort_by(|x, y| {
        (x.allowed_after, &x.from, &x.to, x.port, x.protocol).cmp(&(
            y.allowed_after,
            &y.from,
            &y.to,
            y.port,
            y.protocol,
        ))
    });
    Ok(out)
}

/// Grouped by direction of change, then by pair, ports listed together.
pub fn write_text(changes: &[Change], ports: usize, out: &mut impl Write) -> io::Result<()> {
    let allowed = changes.iter().filter(|c| c.allowed_after).count();
    if changes.is_empty() {
        return writeln!(out, "no flow changed ({ports} port(s) compared)");
    }
    writeln!(
        out,
        "{} flow(s) changed: {} newly allowed, {} newly denied ({ports} port(s) compared)",
        changes.len(),
        allowed,
        changes.len() - allowed
    )?;
    for (title, after) in [("newly DENIED", false), ("newly ALLOWED", true)] {
        let group: Vec<&Change> = changes
            .iter()
            .filter(|c| c.allowed_after == after)
            .collect();
        if group.is_empty() {
            continue;
        }
        writeln!(out, "\n{title}:")?;
        let mut i = 0;
        while i < group.len() {
            let (from, to) = (&group[i].from, &group[i].to);
            let mut j = i;
            let mut ps = Vec::new();
            while j < group.len() && group[j].from == *from && group[j].to == *to {
                ps.push(format!("{}/{}", group[j].port, group[j].protocol));
                j += 1;
            }
            writeln!(out, "  {from} -> {to}  {}", ps.join(", "))?;
            for line in &group[i].why {
                writeln!(out, "      {line}")?;
            }
            i = j;
        }
    }
    Ok(())
}

pub fn write_json(changes: &[Change], out: &mut impl Write) -> io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, changes).map_err(io::Error::other)?;
    writeln!(out)
}
