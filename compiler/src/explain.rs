//! Human-readable explanations of decisions, citing policies and rules by
//! source location.

use crate::eval::{Decision, DirectionVerdict, Evaluator, Flow, Reason, rule_parts};
use crate::model::{Action, Direction, Policy, Tier};
use crate::ruleset::Ruleset;

fn loc(rs: &Ruleset, file: u32, line: u32, col: u32) -> String {
    match rs.sources.get(file as usize) {
        Some(f) => format!("{f}:{line}:{col}"),
        None => format!("<unknown>:{line}:{col}"),
    }
}

/// A rule's action with plugins named (`ask deny-list`).
pub fn action(rs: &Ruleset, a: Action) -> String {
    match a {
        Action::Ask(k) => match rs.plugins.get(k as usize) {
            Some(p) => format!("ask {}", p.name),
            None => format!("ask plugin #{k} (missing from the ruleset)"),
        },
        a => a.to_string(),
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
            action: act,
            answer,
        } => {
            let p = &rs.policies[*policy as usize];
            let r = &p.rules(dir).expect("rule of this direction")[*rule as usize];
            let what = match answer {
                Some(a) => format!("{}: {}", action(rs, r.action), a.as_str()),
                None => act.to_string(),
            };
            format!(
                "{verdict}: {dir} rule #{} of {} ({what}) at {}",
                rule + 1,
                policy_ref(rs, p),
                loc(rs, r.source.file, r.source.line, r.source.col)
            )
        }
        Reason::Unresolved => format!(
            "{verdict}: the resolver plugin failed for {who}, so its identity is unknown (fail-closed)"
        ),
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

/// A decision walked tier by tier and rule by rule, as someone debugging a
/// denied connection reads it: every applicable policy in evaluation order,
/// every rule with whether its ports and its peers match, up to the rule
/// (or the isolation, or the default) that decided. The verdict lines come
/// from the evaluator itself, so the walk can never disagree with it.
pub fn walk(ev: &Evaluator<'_>, flow: &Flow<'_>, from: &str, to: &str) -> Vec<String> {
    let rs = ev.ruleset();
    let d = ev.evaluate(flow);
    let mut out = Vec::new();
    for (dir, me, who, peer, v) in [
        (Direction::Egress, &flow.src, from, &flow.dst, &d.egress),
        (Direction::Ingress, &flow.dst, to, &flow.src, &d.ingress),
    ] {
        out.push(format!("{dir} at {who}:"));
        let Some(id) = me.identity else {
            out.push(format!(
                "  {who} is not a workload: nothing of ours governs its {dir}"
            ));
            out.push(format!("  => {}", direction(rs, v, who)));
            continue;
        };
        let app = ev.applicable(id);
        let decided = match &v.reason {
            Reason::Rule { policy, rule, .. } => Some((*policy, *rule)),
            _ => None,
        };
        let mut skipping_admin = false;
        let mut tier = None;
        let mut shown = 0;
        'policies: for &pi in app.policies() {
            let p = &rs.policies[pi as usize];
            let Some(rules) = p.rules(dir) else { continue };
            if p.tier == Tier::Admin && skipping_admin {
                continue;
            }
            if matches!(v.reason, Reason::Isolated { .. }) && p.tier == Tier::Baseline {
                break;
            }
            if tier != Some(p.tier) {
                tier = Some(p.tier);
                out.push(format!("  {} tier:", p.tier));
            }
            shown += 1;
            let prio = if p.tier != Tier::Admin {
                String::new()
            } else {
                format!(", priority {}", p.priority)
            };
            out.push(format!(
                "    {}{prio}: {} rule(s)",
                policy_ref(rs, p),
                rules.len()
            ));
            if rules.is_empty() {
                out.push(format!(
                    "      no rules: selecting {who} isolates it for {dir}"
                ));
            }
            for (ri, r) in rules.iter().enumerate() {
                let (ports, peers) = rule_parts(r, peer, flow);
                let what = match (ports, peers, r.action) {
                    (true, true, Action::Ask(k)) => {
                        format!(
                            "matches -> {}: {}",
                            action(rs, r.action),
                            ev.ask(k, dir, flow).as_str()
                        )
                    }
                    (true, true, _) => format!("matches -> {}", r.action),
                    (false, true, _) => "ports do not match".to_string(),
                    (true, false, _) => "peers do not match".to_string(),
                    (false, false, _) => "neither ports nor peers match".to_string(),
                };
                out.push(format!(
                    "      rule #{} ({}) at {}: {what}",
                    ri + 1,
                    action(rs, r.action),
                    loc(rs, r.source.file, r.source.line, r.source.col)
                ));
                if decided == Some((pi, ri as u32)) {
                    break 'policies;
                }
                if ports && peers && r.action == Action::Pass && p.tier == Tier::Admin {
                    out.push("      pass: the rest of the admin tier is skipped".into());
                    skipping_admin = true;
                    continue 'policies;
                }
            }
        }
        if shown == 0 {
            out.push(format!("  no policy selects {who} for {dir}"));
        }
        out.push(format!("  => {}", direction(rs, v, who)));
    }
    out.push(format!(
        "verdict: {}",
        if d.allowed { "ALLOWED" } else { "DENIED" }
    ));
    out
}
