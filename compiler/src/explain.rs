//! Human-readable explanations of decisions, citing policies and rules by
//! source location.

use crate::eval::{Decision, DirectionVerdict, Reason};
use crate::model::Policy;
use crate::ruleset::Ruleset;

fn loc(rs: &Ruleset, file: u32, line: u32, col: u32) -> String {
    match rs.sources.get(file as usize) {
        Some(f) => format!("{f}:{line}:{col}"),
        None => format!("<unknown>:{line}:{col}"),
    }
}

fn policy_ref(rs: &Ruleset, p: &Policy) -> String {
    format!(
        "{} ({})",
        p.name,
        loc(rs, p.source.file, p.source.line, p.source.col)
    )
}

/// One line for one direction of a decision.
pub fn direction(rs: &Ruleset, v: &DirectionVerdict, who: &str) -> String {
    let verdict = if v.allowed { "allowed" } else { "denied" };
    let dir = v.direction;
    let mut s = match &v.reason {
        Reason::NotAWorkload => {
            format!("{verdict}: {who} is not a workload; no {dir} policy applies")
        }
        Reason::Default => format!("{verdict}: no policy selects {who} for {dir} (default allow)"),
        Reason::Rule {
            policy,
            rule,
            action,
        } => {
            let p = &rs.policies[*policy as usize];
            let r = &p.rules(dir).expect("rule of this direction")[*rule as usize];
            format!(
                "{verdict}: {dir} rule #{} of {} ({action}) at {}",
                rule + 1,
                policy_ref(rs, p),
                loc(rs, r.source.file, r.source.line, r.source.col)
            )
        }
        Reason::Isolated { policies } => {
            let names: Vec<String> = policies
                .iter()
                .map(|p| policy_ref(rs, &rs.policies[*p as usize]))
                .collect();
            format!(
                "{verdict}: {who} is isolated for {dir} by {}; no {dir} rule of {} matches",
                names.join(", "),
                if names.len() == 1 { "it" } else { "them" }
            )
        }
    };
    for (p, r) in &v.passed_by {
        let p = &rs.policies[*p as usize];
        s.push_str(&format!(
            " (after pass by {dir} rule #{} of {})",
            r + 1,
            policy_ref(rs, p)
        ));
    }
    s
}

/// The whole explanation, one line per direction (egress first).
pub fn decision(rs: &Ruleset, d: &Decision, from: &str, to: &str) -> Vec<String> {
    vec![
        format!("egress  (at {from}): {}", direction(rs, &d.egress, from)),
        format!("ingress (at {to}): {}", direction(rs, &d.ingress, to)),
    ]
}
