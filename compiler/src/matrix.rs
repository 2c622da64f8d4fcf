//! Reachability matrix: every ordered pair of workloads, per port.

use crate::cluster::Cluster;
use crate::eval::{Evaluator, Flow};
use crate::model::Protocol;
use std::io::{self, Write};

pub struct Matrix {
    pub names: Vec<String>,
    pub ports: Vec<(u16, Protocol)>,
    /// `allowed[port][from * n + to]`
    pub allowed: Vec<Vec<bool>>,
}

pub fn compute(ev: &Evaluator<'_>, cluster: &Cluster, ports: &[(u16, Protocol)]) -> Matrix {
    let ws = &cluster.workloads;
    let n = ws.len();
    // Which policies select each workload is computed once, not per pair.
    let endpoints: Vec<_> = ws.iter().map(|w| cluster.endpoint(w)).collect();
    let applicable: Vec<_> = endpoints
        .iter()
        .map(|e| e.identity.map(|id| ev.applicable(id)))
        .collect();
    let mut allowed = Vec::with_capacity(ports.len());
    for &(port, protocol) in ports {
        let mut cells = vec![false; n * n];
        for i in 0..n {
            for j in 0..n {
                let flow = Flow {
                    src: endpoints[i],
                    dst: endpoints[j],
                    port,
                    protocol,
                };
                cells[i * n + j] =
                    ev.allowed_with(&flow, applicable[i].as_ref(), applicable[j].as_ref());
            }
        }
        allowed.push(cells);
    }
    Matrix {
        names: ws.iter().map(|w| w.display_name()).collect(),
        ports: ports.to_vec(),
        allowed,
    }
}

impl Matrix {
    /// A truth table as the upstream e2e suite prints it ('.' allowed, 'X' denied).
    pub fn write_text(&self, out: &mut impl Write) -> io::Result<()> {
        let n = self.names.len();
        for (k, (port, proto)) in self.ports.iter().enumerate() {
            if k > 0 {
                writeln!(out)?;
            }
            writeln!(out, "{port}/{proto}:")?;
            write!(out, "-")?;
            for name in &self.names {
                write!(out, "\t{name}")?;
            }
            writeln!(out)?;
            for i in 0..n {
                write!(out, "{}", self.names[i])?;
                for j in 0..n {
                    write!(
                        out,
                        "\t{}",
                        if self.allowed[k][i * n + j] { '.' } else { 'X' }
                    )?;
                }
                writeln!(out)?;
            }
        }
        Ok(())
    }

    /// JSON contract: an array of {from, to, port, protocol, allowed}.
    pub fn write_json(&self, out: &mut impl Write) -> io::Result<()> {
        let n = self.names.len();
        let quoted: Vec<String> = self
            .names
            .iter()
            .map(|s| serde_json::to_string(s).expect("string"))
            .collect();
        write!(out, "[")?;
        let mut first = true;
        for (k, (port, proto)) in self.ports.iter().enumerate() {
            for i in 0..n {
                for j in 0..n {
                    if !first {
                        write!(out, ",")?;
                    }
                    first = false;
                    write!(
                        out,
                        "\n{{\"from\":{},\"to\":{},\"port\":{port},\"protocol\":\"{proto}\",\"allowed\":{}}}",
                        quoted[i],
                        quoted[j],
                        self.allowed[k][i * n + j]
                    )?;
                }
            }
        }
        writeln!(out, "{}]", if first { "" } else { "\n" })?;
        Ok(())
    }
}
