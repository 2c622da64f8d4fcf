//! Rule language syntax tree → model policies, with validation errors and
//! lints, each at its source position.

use super::ast::*;
use crate::model::*;
use crate::names::{check_label_key, check_label_value, check_port_name};
use std::collections::BTreeMap;

/// A problem at a byte offset.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub offset: usize,
    pub message: String,
}

#[derive(Default)]
pub struct Lowered {
    pub policies: Vec<Policy>,
    pub errors: Vec<Finding>,
    pub warnings: Vec<Finding>,
}

struct Ctx<'a> {
    file_index: u32,
    /// Decide plugins given to the compiler, sorted: `ask NAME` lowers to
    /// the index of NAME here (= its index in the ruleset).
    plugins: &'a [String],
    lines: &'a super::LineIndex,
    out: Lowered,
}

impl Ctx<'_> {
    fn err(&mut self, p: Pos, message: impl Into<String>) {
        self.out.errors.push(Finding {
            offset: p.0,
            message: message.into(),
        });
    }
    fn warn(&mut self, p: Pos, message: impl Into<String>) {
        self.out.warnings.push(Finding {
            offset: p.0,
            message: message.into(),
        });
    }
    fn source(&self, p: Pos) -> SourceRef {
        let (line, col) = self.lines.line_col(p.0);
        SourceRef {
            file: self.file_index,
            line,
            col,
        }
    }

    fn key(&mut self, r: &ReqAst) {
        if let Some(sys) = r.key.strip_prefix('@') {
            let ok = sys == "namespace"
                || sys
                    .strip_prefix("ns:")
                    .is_some_and(|k| check_label_key(k).is_ok());
            if !ok {
                self.warn(
                    r.pos,
                    format!(
                        "`{}` is a reserved system key: only @namespace and @ns:<namespace label> are set by trireme, so this never matches",
                        r.key
                    ),
                );
            }
        } else if let Err(m) = check_label_key(&r.key) {
            self.err(r.pos, m);
        }
    }

    fn selector(&mut self, reqs: &[ReqAst]) -> Selector {
        let mut out = Vec::new();
        for r in reqs {
            self.key(r);
            let vals: Vec<String> = match &r.kind {
                ReqKind::Eq(v) | ReqKind::Ne(v) => vec![v.clone()],
                ReqKind::In(v) | ReqKind::NotIn(v) => v.clone(),
                ReqKind::Exists | ReqKind::NotExists => vec![],
            };
            for v in &vals {
                if let Err(m) = check_label_value(v) {
                    self.err(r.pos, m);
                }
            }
            let op = match r.kind {
                ReqKind::Eq(_) | ReqKind::In(_) => Operator::In,
                ReqKind::Ne(_) | ReqKind::NotIn(_) => Operator::NotIn,
                ReqKind::Exists => Operator::Exists,
                ReqKind::NotExists => Operator::DoesNotExist,
            };
            out.push(Requirement::new(r.key.clone(), op, vals));
        }
        self.contradictions(reqs);
        Selector::new(out)
    }

    /// Lint: requirements on one key that no label set can satisfy together.
    fn contradictions(&mut self, reqs: &[ReqAst]) {
        let mut by_key: BTreeMap<&str, Vec<&ReqAst>> = BTreeMap::new();
        for r in reqs {
            by_key.entry(&r.key).or_default().push(r);
        }
        for (key, rs) in by_key {
            // The values the key may take (None: unconstrained), and whether it must exist.
            let mut allowed: Option<Vec<&str>> = None;
            let mut forbidden: Vec<&str> = Vec::new();
            let (mut must, mut must_not) = (false, false);
            for r in &rs {
                match &r.kind {
                    ReqKind::Eq(v) => {
                        must = true;
                        allowed = Some(match allowed {
                            None => vec![v.as_str()],
                            Some(a) => a.into_iter().filter(|x| x == v).collect(),
                        });
                    }
                    ReqKind::In(vs) => {
                        must = true;
                        allowed = Some(match allowed {
                            None => vs.iter().map(String::as_str).collect(),
                            Some(a) => a
                                .into_iter()
                                .filter(|x| vs.iter().any(|v| v == x))
                                .collect(),
                        });
                    }
                    ReqKind::Ne(v) => forbidden.push(v),
                    ReqKind::NotIn(vs) => forbidden.extend(vs.iter().map(String::as_str)),
                    ReqKind::Exists => must = true,
                    ReqKind::NotExists => must_not = true,
                }
            }
            let empty = allowed
                .as_ref()
                .is_some_and(|a| a.iter().all(|x| forbidden.contains(x)));
            if (must && must_not) || empty {
                self.warn(
                    rs[rs.len() - 1].pos,
                    format!("the requirements on `{key}` contradict each other: this selector can never match"),
                );
            }
        }
    }

    fn peers(&mut self, peers: &Option<Vec<PeerAst>>) -> Peers {
        let Some(list) = peers else {
            return Peers::Any;
        };
        let mut out = Vec::new();
        for p in list {
            match p {
                PeerAst::Labels(reqs) => out.push(Peer::Identity(self.selector(reqs))),
                PeerAst::Cidr { pos, cidr, except } => {
                    let Some(net) = self.cidr(cidr, *pos) else {
                        continue;
                    };
                    let mut ex = Vec::new();
                    for (e, epos) in except {
                        if let Some(en) = self.cidr(e, *epos) {
                            if !(net.contains(&en) && en.prefix_len() > net.prefix_len()) {
                                self.err(
                                    *epos,
                                    format!("except {en} must be a strict subset of {net}"),
                                );
                            }
                            ex.push(en);
                        }
                    }
                    ex.sort();
                    ex.dedup();
                    out.push(Peer::Cidr(CidrBlock {
                        cidr: net,
                        except: ex,
                    }));
                }
            }
        }
        Peers::AnyOf(out)
    }

    fn cidr(&mut self, s: &str, p: Pos) -> Option<ipnet::IpNet> {
        match s.parse::<ipnet::IpNet>() {
            Ok(n) => Some(n.trunc()),
            Err(_) => {
                self.err(p, format!("{s:?} is not a CIDR (address/prefix)"));
                None
            }
        }
    }

    fn ports(&mut self, ports: &[PortAst]) -> Vec<PortRule> {
        let mut out = Vec::new();
        for p in ports {
            let port = match &p.spec {
                PortSpec::Any => PortMatch::Any,
                PortSpec::Range(a, b) => {
                    if !(1..=65535).contains(a) || !(1..=65535).contains(b) {
                        self.err(p.pos, "ports are 1-65535");
                        continue;
                    }
                    if b < a {
                        self.err(p.pos, format!("range {a}-{b} ends before it starts"));
                        continue;
                    }
                    PortMatch::Range {
                        first: *a as u16,
                        last: *b as u16,
                    }
                }
                PortSpec::Named(n) => {
                    if let Err(m) = check_port_name(n) {
                        self.err(p.pos, m);
                    }
                    PortMatch::Named(n.clone())
                }
            };
            out.push(PortRule {
                protocol: p.protocol,
                port,
            });
        }
        out
    }

    fn policy(&mut self, p: &PolicyAst) {
        let tier = match p.tier.unwrap_or(TierAst::Namespace) {
            TierAst::Admin => Tier::Admin,
            TierAst::Namespace => Tier::Namespace,
            TierAst::Baseline => Tier::Baseline,
        };
        let priority = match (tier, p.priority) {
            (Tier::Admin, Some((n, pos))) => {
                if !(0..=1000).contains(&n) {
                    self.err(pos, format!("priority {n} is out of range (0-1000)"));
                }
                n as i32
            }
            (Tier::Admin, None) => {
                self.err(
                    p.name_pos,
                    "a `tier admin` policy needs a `priority` (0-1000; lower runs first)",
                );
                0
            }
            (Tier::Namespace, Some((_, pos))) => {
                self.err(pos, "namespace-tier policies have no priority (they are a union of allows); use `tier admin` for ordered rules");
                0
            }
            (Tier::Baseline, Some((n, pos))) => {
                if !(0..=1000).contains(&n) {
                    self.err(pos, format!("priority {n} is out of range (0-1000)"));
                }
                n as i32
            }
            (_, None) => 0,
        };
        let subject = self.selector(&p.select);
        let mut ingress: Option<Vec<Rule>> = None;
        let mut egress: Option<Vec<Rule>> = None;
        for (k, r) in p.rules.iter().enumerate() {
            let slot = match r.direction {
                Direction::Ingress => &mut ingress,
                Direction::Egress => &mut egress,
            };
            let rules = slot.get_or_insert_with(Vec::new);
            let action = match (&r.verb, tier) {
                (Verb::Isolate, Tier::Namespace) => continue,
                (Verb::Isolate, _) => {
                    self.err(r.pos, "`isolate` is for namespace-tier policies; in an ordered tier write `deny ... ` as the last rule");
                    continue;
                }
                (Verb::Act(Action::Allow), _) => Action::Allow,
                (Verb::Act(Action::Deny), Tier::Namespace) => {
                    self.err(r.pos, "namespace-tier policies only allow (a selected workload is isolated and allowed the union of the allows); deny needs `tier admin` or `tier baseline`");
                    continue;
                }
                (Verb::Act(Action::Pass), Tier::Namespace | Tier::Baseline) => {
                    self.err(r.pos, "`pass` is for `tier admin` policies (it hands the decision to the namespace tier)");
                    continue;
                }
                (Verb::Ask(name), _) => match self.plugins.binary_search(name) {
                    Ok(k) => Action::Ask(k as u32),
                    Err(_) => {
                        let known = if self.plugins.is_empty() {
                            "none were given".to_string()
                        } else {
                            format!("given: {}", self.plugins.join(", "))
                        };
                        self.err(r.pos, format!("unknown plugin {name:?} ({known}); pass it to the compiler as --plugin {name}=FILE.wasm"));
                        continue;
                    }
                },
                (Verb::Act(a), _) => *a,
            };
            // Lint: an earlier rule of this direction that matches everything, or the same rule.
            for earlier in &p.rules[..k] {
                if earlier.direction != r.direction || earlier.verb == Verb::Isolate {
                    continue;
                }
                let (l, c) = self.lines.line_col(earlier.pos.0);
                if earlier.peers.is_none() && earlier.ports.is_empty() {
                    self.warn(r.pos, format!("this rule is shadowed by the rule at line {l}:{c}, which matches every peer and port"));
                    break;
                }
                if earlier == r {
                    self.warn(r.pos, format!("this rule repeats the rule at line {l}:{c}"));
                    break;
                }
            }
            let peers = self.peers(&r.peers);
            let ports = self.ports(&r.ports);
            let source = self.source(r.pos);
            rules.push(Rule {
                action,
                peers,
                ports,
                source,
            });
        }
        let source = self.source(p.pos);
        self.out.policies.push(Policy {
            tier,
            priority,
            name: PolicyName {
                kind: "Policy".into(),
                namespace: None,
                name: p.name.clone(),
            },
            subject,
            ingress,
            egress,
            source,
        });
    }
}

pub fn lower(
    file: &File,
    lines: &super::LineIndex,
    file_index: u32,
    plugins: &[String],
) -> Lowered {
    let mut cx = Ctx {
        file_index,
        plugins,
        lines,
        out: Lowered::default(),
    };
    let mut seen: BTreeMap<&str, Pos> = BTreeMap::new();
    for p in &file.policies {
        if p.name.is_empty() {
            cx.err(p.name_pos, "a policy name cannot be empty");
        }
        if let Some(first) = seen.get(p.name.as_str()) {
            let (l, c) = lines.line_col(first.0);
            cx.err(
                p.name_pos,
                format!(
                    "duplicate policy {:?} (first defined at line {l}:{c})",
                    p.name
                ),
            );
        } else {
            seen.insert(&p.name, p.name_pos);
        }
        cx.policy(p);
    }
    cx.out
}
