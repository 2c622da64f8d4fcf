//! Our nftables table in a PU's namespace: UDP and SCTP decided by set
//! lookups (see datagram.rs), replaced as one transaction.
//!
//! Why a table of our own beside the iptables-nft chains: the kernel
//! lacks the nftables `queue` expression on machines like our CI, so the
//! TCP handshake still goes through the xtables NFQUEUE target
//! (firewall.rs). Datagram verdicts need no queue, so they live here,
//! written with the `nftables` crate. The two cooperate through the
//! conntrack mark: a flow this table allows gets the mark, and the
//! iptables chain's first rule accepts marked flows. A cell whose verdict
//! needs a decide plugin is accepted here unmarked, and the iptables chain
//! queues it to userspace as before.
//!
//! Layout of `table inet trireme`:
//! - sets `{in,out}{4,6}_{allow,ask}` of `addr . inet_proto . inet_service`
//!   with intervals;
//! - base chains `input` and `output` at priority -10 (before iptables'
//!   filter at 0): TCP passes on at the first rule (the handshake chains
//!   judge it); a new UDP/SCTP flow jumps to `in_new` / `out_new`;
//! - there, loopback passes; a flow whose peer, protocol and port are in
//!   `allow` gets the conntrack mark; one in `ask` passes on to the queue;
//!   any other is counted and dropped.

use crate::datagram::{Element, PuTables};
use crate::firewall::CT_MARK;
use crate::netns;
use nftables::{
    batch::Batch,
    expr::{BinaryOperation, Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField},
    schema::{self, NfListObject, SetFlag, SetType, SetTypeValue},
    stmt::{Counter, Mangle, Match, Operator, Statement},
    types::{NfChainPolicy, NfChainType, NfFamily, NfHook},
};
use std::borrow::Cow;
use std::collections::HashSet;
use std::path::Path;
use trireme_compiler::model::Protocol;

pub const TABLE: &str = "trireme";

/// Before iptables-nft's filter chains (priority 0).
const PRIORITY: i32 = -10;

fn s(x: &str) -> Expression<'static> {
    Expression::String(Cow::Owned(x.to_string()))
}

fn proto_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

fn range(a: Expression<'static>, b: Expression<'static>) -> Expression<'static> {
    Expression::Range(Box::new(nftables::expr::Range { range: [a, b] }))
}

fn element(e: &Element) -> Expression<'static> {
    let addr = if e.addrs.0 == e.addrs.1 {
        s(&e.addrs.0.to_string())
    } else {
        range(s(&e.addrs.0.to_string()), s(&e.addrs.1.to_string()))
    };
    let port = if e.ports.0 == e.ports.1 {
        Expression::Number(e.ports.0 as u32)
    } else {
        range(
            Expression::Number(e.ports.0 as u32),
            Expression::Number(e.ports.1 as u32),
        )
    };
    Expression::Named(NamedExpression::Concat(vec![
        addr,
        s(proto_name(e.protocol)),
        port,
    ]))
}

fn set(name: &str, v6: bool, elems: &[Element]) -> NfListObject<'static> {
    let addr = if v6 {
        SetType::Ipv6Addr
    } else {
        SetType::Ipv4Addr
    };
    NfListObject::Set(Box::new(schema::Set {
        family: NfFamily::INet,
        table: TABLE.into(),
        name: Cow::Owned(name.to_string()),
        set_type: SetTypeValue::Concatenated(Cow::Owned(vec![
            addr,
            SetType::InetProto,
            SetType::InetService,
        ])),
        flags: Some(HashSet::from([SetFlag::Interval])),
        elem: (!elems.is_empty()).then(|| Cow::Owned(elems.iter().map(element).collect())),
        ..schema::Set::default()
    }))
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn ct(key: &str) -> Expression<'static> {
    Expression::Named(NamedExpression::CT(nftables::expr::CT {
        key: Cow::Owned(key.to_string()),
        family: None,
        dir: None,
    }))
}

fn matches(
    left: Expression<'static>,
    op: Operator,
    right: Expression<'static>,
) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

/// `meta l4proto { udp, sctp } ct state new`
fn new_datagram() -> Vec<Statement<'static>> {
    vec![
        matches(
            meta(MetaKey::L4proto),
            Operator::EQ,
            Expression::Named(NamedExpression::Set(vec![
                nftables::expr::SetItem::Element(s("udp")),
                nftables::expr::SetItem::Element(s("sctp")),
            ])),
        ),
        matches(ct("state"), Operator::IN, s("new")),
    ]
}

/// `<peer addr> . meta l4proto . th dport @set`
fn lookup(v6: bool, input: bool, set: &str) -> Statement<'static> {
    let field = if input { "saddr" } else { "daddr" };
    let addr = Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: (if v6 { "ip6" } else { "ip" }).into(),
            field: field.into(),
        },
    )));
    let dport = Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: "th".into(),
            field: "dport".into(),
        },
    )));
    matches(
        Expression::Named(NamedExpression::Concat(vec![
            addr,
            meta(MetaKey::L4proto),
            dport,
        ])),
        Operator::EQ,
        s(&format!("@{set}")),
    )
}

fn ours() -> NfListObject<'static> {
    NfListObject::Table(schema::Table {
        family: NfFamily::INet,
        name: TABLE.into(),
        handle: None,
    })
}

/// A batch that starts by deleting our table; `add` first, so that the
/// delete never fails on a namespace that has none.
fn without_table() -> Batch<'static> {
    let mut b = Batch::new();
    b.add(ours());
    b.delete(ours());
    b
}

/// How `render` brings the table to its new content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Keep the table and its chains; empty and refill its chains and
    /// sets. The base chains stay registered: unregistering a netfilter
    /// hook makes the kernel drop every packet waiting in the
    /// namespace's NFQUEUEs (the handshake packets our workers have not
    /// answered yet), which then wait for a retransmission, 1 s for a
    /// SYN. So a reload uses this.
    InPlace,
    /// Delete the table and build it again: for a table left by a version
    /// whose sets or chains were declared otherwise, where `InPlace`
    /// fails.
    Replace,
}

/// The whole table, in one transaction.
pub fn render(t: &PuTables, mode: Mode) -> nftables::schema::Nftables<'static> {
    use nftables::schema::{FlushObject, NfCmd};
    let mut b = match mode {
        Mode::InPlace => Batch::new(),
        Mode::Replace => without_table(),
    };
    b.add(ours());
    let dirs = [
        ("in", true, [&t.in4, &t.in6]),
        ("out", false, [&t.out4, &t.out6]),
    ];
    for (dir, _, tables) in &dirs {
        for (v6, tab) in [(false, tables[0]), (true, tables[1])] {
            let fam = if v6 { 6 } else { 4 };
            for (kind, elems) in [("allow", &tab.allow), ("ask", &tab.ask)] {
                let name = format!("{dir}{fam}_{kind}");
                if mode == Mode::InPlace {
                    b.add(set(&name, v6, &[]));
                    if let NfListObject::Set(decl) = set(&name, v6, &[]) {
                        b.add_cmd(NfCmd::Flush(FlushObject::Set(decl)));
                    }
                }
                b.add(set(&name, v6, elems));
            }
        }
    }
    let chain = |name: String, hook: Option<NfHook>| {
        NfListObject::Chain(schema::Chain {
            family: NfFamily::INet,
            table: TABLE.into(),
            name: name.into(),
            _type: hook.map(|_| NfChainType::Filter),
            prio: hook.map(|_| PRIORITY),
            policy: hook.map(|_| NfChainPolicy::Accept),
            hook,
            ..schema::Chain::default()
        })
    };
    let rule = |chain: String, expr: Vec<Statement<'static>>| {
        NfListObject::Rule(schema::Rule {
            family: NfFamily::INet,
            table: TABLE.into(),
            chain: chain.into(),
            expr: Cow::Owned(expr),
            ..schema::Rule::default()
        })
    };
    let mark = Statement::Mangle(Mangle {
        key: ct("mark"),
        value: Expression::BinaryOperation(Box::new(BinaryOperation::OR(vec![
            ct("mark"),
            Expression::Number(CT_MARK),
        ]))),
    });
    // Declared (a no-op for a chain that exists), then emptied: the
    // rules below are the chains' whole content.
    let mut declare = |c: NfListObject<'static>| {
        b.add(c.clone());
        if let (Mode::InPlace, NfListObject::Chain(c)) = (mode, c) {
            b.add_cmd(NfCmd::Flush(FlushObject::Chain(c)));
        }
    };
    for (dir, input, _) in &dirs {
        declare(chain(format!("{dir}_new"), None));
        let base = if *input { "input" } else { "output" };
        let hook = if *input {
            NfHook::Input
        } else {
            NfHook::Output
        };
        declare(chain(base.into(), Some(hook)));
    }
    for (dir, input, _) in &dirs {
        let new = format!("{dir}_new");
        let lo = if *input {
            MetaKey::Iifname
        } else {
            MetaKey::Oifname
        };
        b.add(rule(
            new.clone(),
            vec![
                matches(meta(lo), Operator::EQ, s("lo")),
                Statement::Accept(None),
            ],
        ));
        for fam in [4, 6] {
            b.add(rule(
                new.clone(),
                vec![
                    lookup(fam == 6, *input, &format!("{dir}{fam}_allow")),
                    mark.clone(),
                    Statement::Accept(None),
                ],
            ));
        }
        for fam in [4, 6] {
            b.add(rule(
                new.clone(),
                vec![
                    lookup(fam == 6, *input, &format!("{dir}{fam}_ask")),
                    Statement::Accept(None),
                ],
            ));
        }
        b.add(rule(
            new.clone(),
            vec![
                Statement::Counter(Counter::Anonymous(None)),
                Statement::Drop(None),
            ],
        ));
        let base = if *input { "input" } else { "output" };
        // Every TCP packet crosses this chain; one comparison sends it on
        // to the handshake chains instead of a set lookup in each of five
        // rules.
        b.add(rule(
            base.into(),
            vec![
                matches(meta(MetaKey::L4proto), Operator::EQ, s("tcp")),
                Statement::Accept(None),
            ],
        ));
        let mut r = new_datagram();
        r.push(Statement::Jump(nftables::stmt::JumpTarget {
            target: new.clone().into(),
        }));
        b.add(rule(base.into(), r));
    }
    b.to_nftables()
}

/// Hand `n` to `nft -j` from a thread inside the namespace at `netns`
/// (the process inherits it: no `nsenter`).
fn run_in(netns: &Path, n: nftables::schema::Nftables<'static>) -> Result<(), String> {
    netns::run_in(netns, move || {
        nftables::helper::apply_ruleset_with_args(&n, Some("nft"), std::iter::empty::<&str>())
            .map_err(|e| e.to_string())
    })
    .map_err(|e| format!("nft in {e}"))
}

/// Install our table in the namespace at `netns`, or bring it to `t` in
/// one transaction without unregistering its hooks (`Mode::InPlace`);
/// a table that cannot be updated in place (declared otherwise by an
/// older version) is replaced.
pub fn apply(netns: &Path, t: &PuTables) -> Result<Mode, String> {
    run_in(netns, render(t, Mode::InPlace))
        .map(|()| Mode::InPlace)
        .or_else(|_| run_in(netns, render(t, Mode::Replace)).map(|()| Mode::Replace))
}

/// Remove our table (absent is fine).
pub fn remove(netns: &Path) -> Result<(), String> {
    run_in(netns, without_table().to_nftables())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datagram::Boundaries;

    #[test]
    fn renders_one_transaction_with_sets_and_fail_closed_chains() {
        let mut b = Boundaries::new(false);
        b.net(&"198.18.0.0/24".parse().unwrap());
        b.ports(53, 53);
        let in4 = b
            .compile(|ip, p, port| {
                if ip.to_string().starts_with("198.18.0.") && p == Protocol::Udp && port == 53 {
                    crate::datagram::Cell::Allow
                } else {
                    crate::datagram::Cell::Deny
                }
            })
            .unwrap();
        let t = PuTables {
            in4,
            ..PuTables::default()
        };
        let json = serde_json::to_string(&render(&t, Mode::Replace)).unwrap();
        assert!(
            json.starts_with(r#"{"nftables":[{"add":{"table""#),
            "{json}"
        );
        assert!(json.contains(r#"{"delete":{"table":{"family":"inet","name":"trireme"}}}"#));
        // In place: nothing is deleted (the base chains keep their hooks);
        // every set and chain is emptied, then refilled.
        let in_place = serde_json::to_string(&render(&t, Mode::InPlace)).unwrap();
        assert!(!in_place.contains("delete"), "{in_place}");
        assert_eq!(in_place.matches(r#"{"flush":{"set""#).count(), 8);
        assert_eq!(in_place.matches(r#"{"flush":{"chain""#).count(), 4);
        assert!(in_place.find(r#"{"flush":{"set""#) < in_place.find(r#""elem""#));
        let body = |j: &str| j[j.find(r#"{"add":{"rule""#).unwrap()..].to_string();
        assert_eq!(body(&json), body(&in_place), "the same rules either way");
        assert!(
            json.contains(
                r#""elem":[{"concat":[{"range":["198.18.0.0","198.18.0.255"]},"udp",53]}]"#
            )
        );
        assert!(json.contains(r#""right":"@in4_allow""#));
        assert!(json.contains(r#"{"mangle":{"key":{"ct":{"key":"mark"}},"value":{"|":[{"ct":{"key":"mark"}},536870912]}}}"#));
        // The last rule of each chain counts and drops new datagram flows.
        assert_eq!(json.matches(r#"{"counter":null},{"drop":null}"#).count(), 2);
    }
}
