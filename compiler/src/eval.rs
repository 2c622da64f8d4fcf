//! The evaluator: one implementation of the semantics, used by `check`,
//! `matrix` and (later) the node runtime.
//!
//! A connection is allowed only when the source's egress and the
//! destination's ingress both allow it. Each direction is decided tier by
//! tier: admin rules in priority order (allow / deny end it, pass skips to the
//! namespace tier), then the namespace tier (a workload selected by any
//! policy for that direction is isolated: allowed only if some rule matches),
//! then baseline rules, then the default: allow.
//!
//! Policies that apply to an identity are found through an index on one
//! equality requirement of each subject selector (for NetworkPolicy, always
//! the namespace), so a decision costs a few hash lookups plus the rules of
//! the policies that really apply, not a scan of every policy.

use crate::model::*;
use crate::ruleset::Ruleset;
use crate::subjects::SubjectIndex;
use std::net::IpAddr;

/// One side of a connection.
#[derive(Debug, Clone, Copy, Default)]
pub struct Endpoint<'a> {
    /// `None` for endpoints that are not workloads (external addresses).
    pub identity: Option<&'a Identity>,
    pub ip: Option<IpAddr>,
    /// Declared container ports (used when this endpoint is the destination).
    pub ports: &'a [NamedPort],
    /// The node's labels when this endpoint is a cluster node (its address,
    /// or a host-networked pod on it): what `nodes` peers select.
    pub node: Option<&'a Identity>,
}

#[derive(Debug, Clone, Copy)]
pub struct Flow<'a> {
    pub src: Endpoint<'a>,
    pub dst: Endpoint<'a>,
    pub port: u16,
    pub protocol: Protocol,
}

/// What a decide plugin answered for an `ask` rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookAnswer {
    Abstain,
    Allow,
    Deny,
    /// The plugin failed (trap, timeout, bad output), or no plugin host is
    /// attached: the rule denies (fail-closed).
    Failed,
}

impl HookAnswer {
    pub fn as_str(self) -> &'static str {
        match self {
            HookAnswer::Abstain => "abstain",
            HookAnswer::Allow => "allow",
            HookAnswer::Deny => "deny",
            HookAnswer::Failed => "failed (deny)",
        }
    }
}

/// Runs decide plugins for `ask` rules. Implemented over wasmtime in
/// `plugins`; a trait so that evaluation does not depend on the sandbox.
pub trait Hooks: Sync {
    fn decide(&self, plugin: u32, dir: Direction, flow: &Flow<'_>) -> HookAnswer;
}

/// Why one direction was allowed or denied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// The endpoint is not a workload; nothing of ours governs it.
    NotAWorkload,
    /// A rule matched (index into the ruleset's policies, then into that
    /// policy's rules for the direction).
    Rule {
        policy: u32,
        rule: u32,
        /// What the rule did: for `ask` rules, the plugin's allow or deny.
        action: Action,
        /// For `ask` rules: the plugin's answer.
        answer: Option<HookAnswer>,
    },
    /// The workload's resolver plugin failed, so its identity is unknown:
    /// denied (fail-closed).
    Unresolved,
    /// Selected by these namespace-tier policies, and none of their rules matched.
    Isolated { policies: Vec<u32> },
    /// No policy governs this workload in this direction.
    Default,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectionVerdict {
    pub direction: Direction,
    pub allowed: bool,
    pub reason: Reason,
    /// Admin-tier `pass` rules that sent the decision down to the namespace tier.
    pub passed_by: Vec<(u32, u32)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub egress: DirectionVerdict,
    pub ingress: DirectionVerdict,
}

/// The policies whose subject selects an identity, in evaluation order,
/// and the identity's labels encoded for the rules of the other end (so a
/// holder that precomputes this per workload never encodes per decision).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applicable(Vec<u32>, Option<crate::subjects::Encoded>, bool);

impl Applicable {
    /// Policy indices in ascending (= evaluation) order.
    pub fn from_vec(mut v: Vec<u32>) -> Self {
        v.sort_unstable();
        v.dedup();
        Applicable(v, None, false)
    }

    pub fn policies(&self) -> &[u32] {
        &self.0
    }
}

pub struct Evaluator<'r> {
    rs: &'r Ruleset,
    subjects: std::borrow::Cow<'r, SubjectIndex>,
    hooks: Option<&'r dyn Hooks>,
}

impl<'r> Evaluator<'r> {
    pub fn new(rs: &'r Ruleset) -> Self {
        Evaluator {
            rs,
            subjects: std::borrow::Cow::Owned(SubjectIndex::new(&rs.policies)),
            hooks: None,
        }
    }

    /// Attaches the plugins `ask` rules consult. Without them an `ask` rule
    /// fails closed.
    pub fn with_hooks(mut self, hooks: &'r dyn Hooks) -> Self {
        self.hooks = Some(hooks);
        self
    }

    /// The plugin's answer for an `ask` rule.
    pub fn ask(&self, plugin: u32, dir: Direction, flow: &Flow<'_>) -> HookAnswer {
        self.hooks
            .map_or(HookAnswer::Failed, |h| h.decide(plugin, dir, flow))
    }

    /// The action of a rule whose ports and peers match: its own, or the
    /// plugin's for `ask` (`None`: the plugin abstained; the rule does not apply).
    fn action_of(
        &self,
        r: &Rule,
        dir: Direction,
        flow: &Flow<'_>,
    ) -> (Option<Action>, Option<HookAnswer>) {
        match r.action {
            Action::Ask(k) => {
                let a = self.ask(k, dir, flow);
                let act = match a {
                    HookAnswer::Allow => Some(Action::Allow),
                    HookAnswer::Deny | HookAnswer::Failed => Some(Action::Deny),
                    HookAnswer::Abstain => None,
                };
                (act, Some(a))
            }
            a => (Some(a), None),
        }
    }

    /// With an index built beforehand for this ruleset: a long-lived holder
    /// (the node runtime, which swaps rulesets on update) keeps both and
    /// makes an evaluator per decision for free.
    pub fn with_index(rs: &'r Ruleset, subjects: &'r SubjectIndex) -> Self {
        Evaluator {
            rs,
            subjects: std::borrow::Cow::Borrowed(subjects),
            hooks: None,
        }
    }

    pub fn ruleset(&self) -> &'r Ruleset {
        self.rs
    }

    /// Policies selecting `id`, in ruleset order (= tier, then priority).
    pub fn applicable(&self, id: &Identity) -> Applicable {
        let labels = self.subjects.encode(id);
        let unresolved = id.get(UNRESOLVED_KEY).is_some();
        Applicable(
            self.subjects.lookup_encoded(&labels),
            Some(labels),
            unresolved,
        )
    }

    pub fn evaluate(&self, flow: &Flow<'_>) -> Decision {
        let src_app = flow.src.identity.map(|id| self.applicable(id));
        let dst_app = flow.dst.identity.map(|id| self.applicable(id));
        self.evaluate_with(flow, src_app.as_ref(), dst_app.as_ref())
    }

    /// As `evaluate`, with the applicable policies computed beforehand (the
    /// matrix computes them once per workload, not once per pair).
    pub fn evaluate_with(
        &self,
        flow: &Flow<'_>,
        src: Option<&Applicable>,
        dst: Option<&Applicable>,
    ) -> Decision {
        let egress = match src {
            Some(a) => self.with_labels(&flow.dst, dst, |l| {
                self.direction(a, Direction::Egress, &flow.dst, l, flow)
            }),
            None => not_a_workload(Direction::Egress),
        };
        let ingress = match dst {
            Some(a) => self.with_labels(&flow.src, src, |l| {
                self.direction(a, Direction::Ingress, &flow.src, l, flow)
            }),
            None => not_a_workload(Direction::Ingress),
        };
        Decision {
            allowed: egress.allowed && ingress.allowed,
            egress,
            ingress,
        }
    }

    /// `f` with the peer's encoded labels: from its precomputed
    /// `Applicable` when there is one, else encoded now (a peer known only
    /// by its token) into a stack buffer, so that the enforcement hot path
    /// allocates nothing per decision.
    fn with_labels<T>(
        &self,
        e: &Endpoint<'_>,
        app: Option<&Applicable>,
        f: impl FnOnce(Option<&[u32]>) -> T,
    ) -> T {
        match app.and_then(|a| a.1.as_deref()) {
            Some(l) => f(Some(l)),
            None => self.with_encoded(e.identity, f),
        }
    }

    fn with_encoded<T>(&self, id: Option<&Identity>, f: impl FnOnce(Option<&[u32]>) -> T) -> T {
        const INLINE: usize = 32;
        match id {
            None => f(None),
            Some(id) if self.subjects.width() <= INLINE => {
                let mut buf = [0u32; INLINE];
                let l = &mut buf[..self.subjects.width()];
                self.subjects.encode_into(id, l);
                f(Some(l))
            }
            Some(id) => f(Some(&self.subjects.encode(id))),
        }
    }

    /// Only whether it is allowed: the same walk as `direction`, without
    /// building explanations (the enforcement hot path).
    pub fn allowed_with(
        &self,
        flow: &Flow<'_>,
        src: Option<&Applicable>,
        dst: Option<&Applicable>,
    ) -> bool {
        src.is_none_or(|a| {
            self.with_labels(&flow.dst, dst, |l| {
                self.allowed_dir(a, Direction::Egress, &flow.dst, l, flow)
            })
        }) && dst.is_none_or(|a| {
            self.with_labels(&flow.src, src, |l| {
                self.allowed_dir(a, Direction::Ingress, &flow.src, l, flow)
            })
        })
    }

    /// Whether a flow is allowed, finding applicable policies through the
    /// index (each identity is encoded once, for the lookup and the rules).
    pub fn allowed(&self, flow: &Flow<'_>) -> bool {
        let (src_id, dst_id) = (flow.src.identity, flow.dst.identity);
        self.with_encoded(src_id, |sl| {
            self.with_encoded(dst_id, |dl| {
                let app = |id: Option<&Identity>, l: Option<&[u32]>| {
                    l.zip(id).map(|(l, id)| {
                        Applicable(
                            self.subjects.lookup_encoded(l),
                            None,
                            id.get(UNRESOLVED_KEY).is_some(),
                        )
                    })
                };
                let (src, dst) = (app(src_id, sl), app(dst_id, dl));
                src.as_ref()
                    .is_none_or(|a| self.allowed_dir(a, Direction::Egress, &flow.dst, dl, flow))
                    && dst.as_ref().is_none_or(|a| {
                        self.allowed_dir(a, Direction::Ingress, &flow.src, sl, flow)
                    })
            })
        })
    }

    /// A rule of policy `pi` against a peer: ports, then peers (identity
    /// selectors through the interned index, CIDRs on the IP).
    #[allow(clippy::too_many_arguments)]
    fn rule_ok(
        &self,
        pi: u32,
        dir: Direction,
        ri: usize,
        r: &Rule,
        peer: &Endpoint<'_>,
        labels: Option<&[u32]>,
        flow: &Flow<'_>,
    ) -> bool {
        if !ports_match(&r.ports, flow) {
            return false;
        }
        match &r.peers {
            Peers::Any => true,
            Peers::AnyOf(list) => list.iter().enumerate().any(|(k, p)| match p {
                Peer::Identity(_) => {
                    labels.is_some_and(|l| self.subjects.peer_matches(pi, dir, ri, k, l))
                }
                Peer::Cidr(block) => peer.ip.is_some_and(|ip| block.contains(&ip)),
                Peer::Nodes(sel) => peer.node.is_some_and(|n| sel.matches(n)),
            }),
        }
    }

    fn allowed_dir(
        &self,
        app: &Applicable,
        dir: Direction,
        peer: &Endpoint<'_>,
        labels: Option<&[u32]>,
        flow: &Flow<'_>,
    ) -> bool {
        if app.2 {
            return false;
        }
        let policies = &self.rs.policies;
        let mut in_admin = true;
        let mut isolated = false;
        for &pi in &app.0 {
            let p = &policies[pi as usize];
            match p.tier {
                Tier::Admin if !in_admin => continue,
                Tier::Admin => {
                    for (ri, r) in p.rules(dir).into_iter().flatten().enumerate() {
                        if !self.rule_ok(pi, dir, ri, r, peer, labels, flow) {
                            continue;
                        }
                        match self.action_of(r, dir, flow).0 {
                            Some(Action::Allow) => return true,
                            Some(Action::Deny) => return false,
                            Some(_) => {
                                in_admin = false;
                                break;
                            }
                            None => {}
                        }
                    }
                }
                Tier::Namespace => {
                    let Some(rules) = p.rules(dir) else { continue };
                    isolated = true;
                    if rules.iter().enumerate().any(|(ri, r)| {
                        self.rule_ok(pi, dir, ri, r, peer, labels, flow)
                            && self.action_of(r, dir, flow).0 == Some(Action::Allow)
                    }) {
                        return true;
                    }
                }
                Tier::Baseline => {
                    if isolated {
                        return false;
                    }
                    for (ri, r) in p.rules(dir).into_iter().flatten().enumerate() {
                        if !self.rule_ok(pi, dir, ri, r, peer, labels, flow) {
                            continue;
                        }
                        // Pass in the baseline tier hands over to the default: allow.
                        if let Some(a) = self.action_of(r, dir, flow).0 {
                            return a != Action::Deny;
                        }
                    }
                }
            }
        }
        !isolated
    }

    fn direction(
        &self,
        app: &Applicable,
        dir: Direction,
        peer: &Endpoint<'_>,
        labels: Option<&[u32]>,
        flow: &Flow<'_>,
    ) -> DirectionVerdict {
        let mut passed_by = Vec::new();
        let verdict = |allowed, reason, passed_by| DirectionVerdict {
            direction: dir,
            allowed,
            reason,
            passed_by,
        };
        if app.2 {
            return verdict(false, Reason::Unresolved, passed_by);
        }
        let policies = &self.rs.policies;
        let mut tier_start = 0;
        // Admin tier.
        'admin: for (n, &pi) in app.0.iter().enumerate() {
            let p = &policies[pi as usize];
            if p.tier != Tier::Admin {
                tier_start = n;
                break;
            }
            tier_start = n + 1;
            for (ri, r) in p.rules(dir).into_iter().flatten().enumerate() {
                if !self.rule_ok(pi, dir, ri, r, peer, labels, flow) {
                    continue;
                }
                let (Some(action), answer) = self.action_of(r, dir, flow) else {
                    continue;
                };
                let reason = Reason::Rule {
                    policy: pi,
                    rule: ri as u32,
                    action,
                    answer,
                };
                match action {
                    Action::Allow => return verdict(true, reason, passed_by),
                    Action::Deny => return verdict(false, reason, passed_by),
                    _ => {
                        passed_by.push((pi, ri as u32));
                        // Skip the rest of the admin tier.
                        tier_start = app
                            .0
                            .iter()
                            .position(|&q| policies[q as usize].tier != Tier::Admin)
                            .unwrap_or(app.0.len());
                        break 'admin;
                    }
                }
            }
        }
        // Namespace tier.
        let mut isolating = Vec::new();
        let mut n = tier_start;
        while n < app.0.len() {
            let pi = app.0[n];
            let p = &policies[pi as usize];
            if p.tier != Tier::Namespace {
                break;
            }
            n += 1;
            let Some(rules) = p.rules(dir) else { continue };
            isolating.push(pi);
            for (ri, r) in rules.iter().enumerate() {
                if !self.rule_ok(pi, dir, ri, r, peer, labels, flow) {
                    continue;
                }
                // This tier only allows: an ask answered otherwise is no match.
                if let (Some(Action::Allow), answer) = self.action_of(r, dir, flow) {
                    let reason = Reason::Rule {
                        policy: pi,
                        rule: ri as u32,
                        action: Action::Allow,
                        answer,
                    };
                    return verdict(true, reason, passed_by);
                }
            }
        }
        if !isolating.is_empty() {
            return verdict(
                false,
                Reason::Isolated {
                    policies: isolating,
                },
                passed_by,
            );
        }
        // Baseline tier.
        for &pi in &app.0[n..] {
            let p = &policies[pi as usize];
            for (ri, r) in p.rules(dir).into_iter().flatten().enumerate() {
                if !self.rule_ok(pi, dir, ri, r, peer, labels, flow) {
                    continue;
                }
                let (Some(action), answer) = self.action_of(r, dir, flow) else {
                    continue;
                };
                if action == Action::Pass {
                    // The next tier after the baseline is the default.
                    passed_by.push((pi, ri as u32));
                    return verdict(true, Reason::Default, passed_by);
                }
                let reason = Reason::Rule {
                    policy: pi,
                    rule: ri as u32,
                    action,
                    answer,
                };
                return verdict(action == Action::Allow, reason, passed_by);
            }
        }
        verdict(true, Reason::Default, passed_by)
    }
}

fn not_a_workload(direction: Direction) -> DirectionVerdict {
    DirectionVerdict {
        direction,
        allowed: true,
        reason: Reason::NotAWorkload,
        passed_by: Vec::new(),
    }
}

/// Whether a rule's ports and its peers match, separately (for `explain`).
pub fn rule_parts(r: &Rule, peer: &Endpoint<'_>, flow: &Flow<'_>) -> (bool, bool) {
    (ports_match(&r.ports, flow), peers_match(&r.peers, peer))
}

fn ports_match(ports: &[PortRule], flow: &Flow<'_>) -> bool {
    ports.is_empty()
        || ports.iter().any(|pr| {
            pr.protocol == flow.protocol
                && match &pr.port {
                    PortMatch::Any => true,
                    PortMatch::Range { first, last } => (*first..=*last).contains(&flow.port),
                    // Resolved against the destination's container ports, protocol included.
                    PortMatch::Named(name) => flow.dst.ports.iter().any(|np| {
                        np.name == *name && np.protocol == pr.protocol && np.port == flow.port
                    }),
                }
        })
}

fn peers_match(peers: &Peers, peer: &Endpoint<'_>) -> bool {
    match peers {
        Peers::Any => true,
        Peers::AnyOf(list) => list.iter().any(|p| match p {
            Peer::Identity(sel) => peer.identity.is_some_and(|id| sel.matches(id)),
            Peer::Cidr(block) => peer.ip.is_some_and(|ip| block.contains(&ip)),
            Peer::Nodes(sel) => peer.node.is_some_and(|n| sel.matches(n)),
        }),
    }
}
