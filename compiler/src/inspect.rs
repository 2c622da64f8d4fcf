//! `trireme inspect`: a compiled ruleset in readable form.

use crate::model::{Direction, Peers, Rule};
use crate::ruleset::Ruleset;
use std::io::{self, Write};

fn write_rules(
    out: &mut impl Write,
    rs: &Ruleset,
    dir: Direction,
    rules: &[Rule],
) -> io::Result<()> {
    if rules.is_empty() {
        writeln!(out, "    {dir}: isolated, no rules (deny all {dir})")?;
    }
    for (i, r) in rules.iter().enumerate() {
        let file = rs
            .sources
            .get(r.source.file as usize)
            .map_or("?", String::as_str);
        writeln!(
            out,
            "    {dir} rule #{} {} ({file}:{}:{})",
            i + 1,
            crate::explain::action(rs, r.action),
            r.source.line,
            r.source.col
        )?;
        match &r.peers {
            Peers::Any => writeln!(out, "      peers: any")?,
            Peers::AnyOf(ps) => {
                for p in ps {
                    writeln!(out, "      peer: {p}")?;
                }
            }
        }
        if r.ports.is_empty() {
            writeln!(out, "      ports: any")?;
        } else {
            let ports: Vec<String> = r.ports.iter().map(|p| p.to_string()).collect();
            writeln!(out, "      ports: {}", ports.join(", "))?;
        }
    }
    Ok(())
}

pub fn write(rs: &Ruleset, out: &mut impl Write) -> io::Result<()> {
    let (major, minor) = rs.format_version();
    writeln!(out, "trireme ruleset format {major}.{minor}")?;
    writeln!(out, "sha256: {}", rs.content_hash())?;
    writeln!(
        out,
        "policies: {}, rules: {}",
        rs.policies.len(),
        rs.rule_count()
    )?;
    writeln!(out, "label keys read: {}", rs.label_keys.join(", "))?;
    if !rs.plugins.is_empty() {
        writeln!(out, "plugins:")?;
        for p in &rs.plugins {
            writeln!(
                out,
                "  {}: {} bytes, sha256:{}{}{}",
                p.name,
                p.wasm.len(),
                crate::ruleset::hex(&p.sha256),
                if p.settings.is_some() {
                    ", with settings"
                } else {
                    ""
                },
                if p.fail_open { ", FAIL-OPEN" } else { "" }
            )?;
        }
    }
    writeln!(out, "sources:")?;
    for s in &rs.sources {
        writeln!(out, "  {s}")?;
    }
    for p in &rs.policies {
        let file = rs
            .sources
            .get(p.source.file as usize)
            .map_or("?", String::as_str);
        writeln!(out)?;
        writeln!(
            out,
            "{} [tier {}, priority {}] ({file}:{}:{})",
            p.name, p.tier, p.priority, p.source.line, p.source.col
        )?;
        writeln!(out, "  subject: {}", p.subject)?;
        for dir in [Direction::Ingress, Direction::Egress] {
            match p.rules(dir) {
                Some(rules) => write_rules(out, rs, dir, rules)?,
                None => writeln!(out, "    {dir}: not governed")?,
            }
        }
    }
    Ok(())
}
