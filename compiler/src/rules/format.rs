//! `trireme fmt`: the canonical form of a rule file. Idempotent, and the
//! output parses back to an equal syntax tree. Comments are kept: each is
//! printed on its own line before the policy or rule that follows it.

use super::ast::*;
use super::parse::comments;
use crate::model::{Action, Direction};

const KEYWORDS: &[&str] = &[
    "policy", "tier", "priority", "select", "allow", "deny", "pass", "isolate", "ingress",
    "egress", "from", "to", "on", "or", "and", "in", "not", "any", "cidr", "except",
];

fn bare(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/' | '@' | ':'))
}

fn word(s: &str) -> String {
    if bare(s) {
        s.to_string()
    } else {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

fn list(v: &[String]) -> String {
    v.iter().map(|x| word(x)).collect::<Vec<_>>().join(", ")
}

pub fn selector(reqs: &[ReqAst]) -> String {
    if reqs.is_empty() {
        return "any".into();
    }
    reqs.iter()
        .map(|r| {
            let k = word(&r.key);
            match &r.kind {
                ReqKind::Eq(v) => format!("{k} = {}", word(v)),
                ReqKind::Ne(v) => format!("{k} != {}", word(v)),
                ReqKind::In(v) => format!("{k} in ({})", list(v)),
                ReqKind::NotIn(v) => format!("{k} not in ({})", list(v)),
                // Bare, a keyword would end the selector.
                ReqKind::Exists if KEYWORDS.contains(&r.key.as_str()) => format!("\"{}\"", r.key),
                ReqKind::Exists => k,
                ReqKind::NotExists => format!("!{k}"),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn peer(p: &PeerAst) -> String {
    match p {
        PeerAst::Labels(r) => selector(r),
        PeerAst::Cidr { cidr, except, .. } => {
            let mut s = format!("cidr {cidr}");
            if !except.is_empty() {
                let e: Vec<&str> = except.iter().map(|(e, _)| e.as_str()).collect();
                s += &format!(" except {}", e.join(", "));
            }
            s
        }
    }
}

fn port(p: &PortAst) -> String {
    let proto = p.protocol.as_str().to_ascii_lowercase();
    match &p.spec {
        PortSpec::Any => format!("{proto}/any"),
        PortSpec::Range(a, b) if a == b => format!("{proto}/{a}"),
        PortSpec::Range(a, b) => format!("{proto}/{a}-{b}"),
        PortSpec::Named(n) => format!("{proto}/{n}"),
    }
}

pub fn rule(r: &RuleAst) -> String {
    let verb = match &r.verb {
        Verb::Act(Action::Allow) => "allow".to_string(),
        Verb::Act(Action::Deny) => "deny".to_string(),
        Verb::Act(Action::Pass) => "pass".to_string(),
        Verb::Act(Action::Ask(_)) => unreachable!("the parser makes Verb::Ask"),
        Verb::Ask(name) => format!("ask {name}"),
        Verb::Isolate => "isolate".to_string(),
    };
    let (dir, word) = match r.direction {
        Direction::Ingress => ("ingress", "from"),
        Direction::Egress => ("egress", "to"),
    };
    let mut s = format!("{verb} {dir}");
    if let Some(ps) = &r.peers {
        let ps: Vec<String> = ps.iter().map(peer).collect();
        s += &format!(" {word} {}", ps.join(" or "));
    }
    if !r.ports.is_empty() {
        let ps: Vec<String> = r.ports.iter().map(port).collect();
        s += &format!(" on {}", ps.join(", "));
    }
    s
}

/// The canonical text. `text` is the source the tree came from (for its
/// comments); pass "" for a tree built in memory.
pub fn format(file: &File, text: &str) -> String {
    let cs = comments(text);
    let mut ci = 0;
    let mut out = String::new();
    let flush = |out: &mut String, upto: usize, indent: &str, ci: &mut usize| {
        while *ci < cs.len() && cs[*ci].0 < upto {
            out.push_str(indent);
            out.push_str(cs[*ci].1);
            out.push('\n');
            *ci += 1;
        }
    };
    for (n, p) in file.policies.iter().enumerate() {
        if n > 0 {
            out.push('\n');
        }
        flush(&mut out, p.pos.0, "", &mut ci);
        out += &format!("policy {}", word(&p.name));
        match p.tier {
            Some(TierAst::Admin) => out += " tier admin",
            Some(TierAst::Baseline) => out += " tier baseline",
            Some(TierAst::Namespace) => out += " tier namespace",
            None => {}
        }
        if let Some((pr, _)) = p.priority {
            out += &format!(" priority {pr}");
        }
        out += " {\n";
        out += &format!("  select {}\n", selector(&p.select));
        for r in &p.rules {
            flush(&mut out, r.pos.0, "  ", &mut ci);
            out += &format!("  {}\n", rule(r));
        }
        let end = file.policies.get(n + 1).map_or(text.len(), |q| q.pos.0);
        // Comments after the last rule, up to the closing brace's line.
        let close = text[..end.min(text.len())].rfind('}').unwrap_or(0);
        flush(&mut out, close, "  ", &mut ci);
        out += "}\n";
    }
    if ci < cs.len() {
        if !file.policies.is_empty() {
            out.push('\n');
        }
        flush(&mut out, usize::MAX, "", &mut ci);
    }
    out
}
