//! Our nftables table in a PU's namespace: UDP and SCTP decided by set
//! lookups (see by_address.rs), replaced as one transaction.
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
//!   filter at 0). Inbound, a TCP SYN without our marker option (a peer
//!   that sends no token) jumps to `in_new`; other TCP passes on (the
//!   handshake chains judge it); a new UDP/SCTP flow jumps to `in_new` /
//!   `out_new`;
//! - there, loopback passes; a flow whose peer, protocol and port are in
//!   `allow` gets the conntrack mark (and, inbound, the nfmark that the
//!   iptables chain turns into the conntrack mark after its first rule has
//!   cleared it from a SYN); one in `ask` passes on to the queue;
//! - a denied flow passes on to the queue too, at most
//!   [`QUEUED_DENIALS_PER_SECOND`] per chain, so that userspace counts and
//!   logs it with its reason; beyond that rate the kernel drops it, counted
//!   in the named counter `{in,out}_dropped` (`{in,out}_allowed` counts the
//!   flows allowed here). A flood from outside the mesh costs the queue
//!   threads at most that rate per PU.

use crate::by_address::{Element, PuTables};
use crate::firewall::{AUTH_MARK, CT_MARK};
use crate::netns;
use crate::packet::OPTION_KIND;
use nftables::{
    batch::Batch,
    expr::{BinaryOperation, Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField},
    schema::{self, NfListObject, SetFlag, SetType, SetTypeValue},
    stmt::{Counter, Limit, Mangle, Match, Operator, Statement},
    types::{NfChainPolicy, NfChainType, NfFamily, NfHook},
};
use std::borrow::Cow;
use std::collections::HashSet;
use std::path::Path;
use trireme_compiler::model::Protocol;

pub const TABLE: &str = "trireme";

/// Before iptables-nft's filter chains (priority 0).
const PRIORITY: i32 = -10;

/// Denied flows per second and chain that still reach userspace, to be
/// counted and logged there with their reason (the same lookup decides
/// them again). Low enough that a flood of them is no load.
pub const QUEUED_DENIALS_PER_SECOND: u32 = 100;

/// The JSON schema of the `nftables` crate names TCP options only by
/// their names; ours has none. The rule carries this placeholder, and
/// [`json`] swaps in the raw form (kind, offset, length).
const MARKER_PLACEHOLDER: &str = "trireme-marker";

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

/// `tcp flags & (syn | ack | rst) == syn tcp option <ours> missing`: a
/// SYN from a peer that sends no token (RSTs pass as in the iptables
/// chain).
fn tokenless_syn() -> Vec<Statement<'static>> {
    let flags = Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: "tcp".into(),
            field: "flags".into(),
        },
    )));
    vec![
        matches(
            Expression::BinaryOperation(Box::new(BinaryOperation::AND(
                flags,
                Expression::List(vec![s("syn"), s("ack"), s("rst")]),
            ))),
            Operator::EQ,
            s("syn"),
        ),
        matches(
            Expression::Named(NamedExpression::TcpOption(nftables::expr::TcpOption {
                name: MARKER_PLACEHOLDER.into(),
                field: None,
            })),
            Operator::EQ,
            Expression::Boolean(false),
        ),
    ]
}

/// The JSON `nft -j` takes for `n`.
pub fn json(n: &nftables::schema::Nftables<'_>) -> String {
    fn raw_marker(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(o) => {
                let ours = o
                    .get("tcp option")
                    .and_then(|t| t.get("name"))
                    .is_some_and(|n| n == MARKER_PLACEHOLDER);
                if ours {
                    o.insert(
                        "tcp option".into(),
                        serde_json::json!({"base": OPTION_KIND, "offset": 0, "len": 8}),
                    );
                } else {
                    o.values_mut().for_each(raw_marker);
                }
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(raw_marker),
            _ => {}
        }
    }
    let mut v = serde_json::to_value(n).expect("nftables JSON serializes");
    raw_marker(&mut v);
    v.to_string()
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
    // A SYN's conntrack mark is cleared by the iptables chain's first
    // rule (firewall.rs); this nfmark has it set again there, as for a
    // SYN our queue authorized.
    let authorized = Statement::Mangle(Mangle {
        key: meta(MetaKey::Mark),
        value: Expression::BinaryOperation(Box::new(BinaryOperation::OR(vec![
            meta(MetaKey::Mark),
            Expression::Number(AUTH_MARK),
        ]))),
    });
    let named = |n: String| Statement::Counter(Counter::Named(n.into()));
    // Declared only (a no-op for a counter that exists): they count
    // across reloads.
    for (dir, _, _) in &dirs {
        for what in ["allowed", "dropped"] {
            b.add(NfListObject::Counter(schema::Counter {
                family: NfFamily::INet,
                table: TABLE.into(),
                name: format!("{dir}_{what}").into(),
                handle: None,
                packets: None,
                bytes: None,
            }));
        }
    }
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
            let mut r = vec![
                lookup(fam == 6, *input, &format!("{dir}{fam}_allow")),
                named(format!("{dir}_allowed")),
                mark.clone(),
            ];
            if *input {
                r.push(authorized.clone());
            }
            r.push(Statement::Accept(None));
            b.add(rule(new.clone(), r));
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
        // Denied: on to the queue while under the rate (userspace decides
        // the same, counts and logs it), dropped here beyond it.
        b.add(rule(
            new.clone(),
            vec![
                Statement::Limit(Limit {
                    rate: QUEUED_DENIALS_PER_SECOND,
                    rate_unit: None,
                    per: Some("second".into()),
                    burst: Some(QUEUED_DENIALS_PER_SECOND),
                    burst_unit: None,
                    inv: None,
                }),
                Statement::Accept(None),
            ],
        ));
        b.add(rule(
            new.clone(),
            vec![named(format!("{dir}_dropped")), Statement::Drop(None)],
        ));
        let base = if *input { "input" } else { "output" };
        if *input {
            let mut r = tokenless_syn();
            r.push(Statement::Jump(nftables::stmt::JumpTarget {
                target: new.clone().into(),
            }));
            b.add(rule(base.into(), r));
        }
        // Every other TCP packet crosses this chain; one comparison sends
        // it on to the handshake chains instead of a set lookup in each of
        // five rules. (Inbound, the flags test above comes first: a
        // segment without SYN fails it at its first comparison.)
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
        nftables::helper::apply_ruleset_raw(&json(&n), Some("nft"), std::iter::empty::<&str>())
            .map(drop)
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

/// The named counters of our table in the calling thread's namespace
/// (packets), read with one netlink dump: a scrape does this for every PU,
/// and spawning `nft` for each would cost milliseconds apiece.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    pub in_allowed: u64,
    pub in_dropped: u64,
    pub out_allowed: u64,
    pub out_dropped: u64,
}

/// Netlink and nf_tables constants (linux/netlink.h, netfilter/nfnetlink.h,
/// netfilter/nf_tables.h).
mod nl {
    pub const NETLINK_NETFILTER: i32 = 12;
    pub const NLM_F_REQUEST: u16 = 0x1;
    pub const NLM_F_DUMP: u16 = 0x300;
    pub const NLMSG_ERROR: u16 = 2;
    pub const NLMSG_DONE: u16 = 3;
    pub const SUBSYS_NFTABLES: u16 = 10;
    pub const MSG_NEWOBJ: u16 = 18;
    pub const MSG_GETOBJ: u16 = 19;
    pub const NFPROTO_INET: u8 = 1;
    pub const OBJ_TABLE: u16 = 1;
    pub const OBJ_NAME: u16 = 2;
    pub const OBJ_TYPE: u16 = 3;
    pub const OBJ_DATA: u16 = 4;
    pub const OBJECT_COUNTER: u32 = 1;
    pub const COUNTER_PACKETS: u16 = 2;
}

/// Netlink attributes `(type, payload)` in `b`; a truncated one ends the
/// walk rather than being guessed at.
fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let kind = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if len < 4 || len > b.len() {
            return None;
        }
        let payload = &b[4..len];
        b = &b[((len + 3) & !3).min(b.len())..];
        Some((kind, payload))
    })
}

fn attr(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    out.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(out.len() + (4 - out.len() % 4) % 4, 0);
}

/// The dump request for our table's counters.
fn counters_request() -> Vec<u8> {
    let mut m = vec![0u8; 16];
    m.extend_from_slice(&[nl::NFPROTO_INET, 0, 0, 0]);
    attr(&mut m, nl::OBJ_TABLE, format!("{TABLE}\0").as_bytes());
    attr(&mut m, nl::OBJ_TYPE, &nl::OBJECT_COUNTER.to_be_bytes());
    let len = m.len() as u32;
    m[0..4].copy_from_slice(&len.to_ne_bytes());
    let kind = (nl::SUBSYS_NFTABLES << 8) | nl::MSG_GETOBJ;
    m[4..6].copy_from_slice(&kind.to_ne_bytes());
    m[6..8].copy_from_slice(&(nl::NLM_F_REQUEST | nl::NLM_F_DUMP).to_ne_bytes());
    m
}

/// Fold one datagram of the dump's answer into `c`; `Ok(true)` at its end.
fn parse_counters(mut b: &[u8], c: &mut Counted) -> Result<bool, String> {
    while b.len() >= 16 {
        let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
        let kind = u16::from_ne_bytes([b[4], b[5]]);
        if len < 16 || len > b.len() {
            return Err("truncated netlink message".into());
        }
        let body = &b[16..len];
        match kind {
            nl::NLMSG_DONE => return Ok(true),
            nl::NLMSG_ERROR => {
                let errno = body
                    .get(..4)
                    .map(|e| -i32::from_ne_bytes([e[0], e[1], e[2], e[3]]))
                    .unwrap_or(0);
                // No table (yet): nothing counted.
                if errno == nix::libc::ENOENT {
                    return Ok(true);
                }
                return Err(format!(
                    "nf_tables: {}",
                    std::io::Error::from_raw_os_error(errno)
                ));
            }
            k if k == (nl::SUBSYS_NFTABLES << 8) | nl::MSG_NEWOBJ && body.len() >= 4 => {
                let (mut name, mut packets) = (None, None);
                for (t, v) in attrs(&body[4..]) {
                    match t {
                        nl::OBJ_NAME => name = std::str::from_utf8(v).ok(),
                        nl::OBJ_DATA => {
                            packets = attrs(v)
                                .find(|(t, v)| *t == nl::COUNTER_PACKETS && v.len() == 8)
                                .map(|(_, v)| u64::from_be_bytes(v.try_into().unwrap_or([0; 8])))
                        }
                        _ => {}
                    }
                }
                let slot = match name.map(|n| n.trim_end_matches('\0')) {
                    Some("in_allowed") => Some(&mut c.in_allowed),
                    Some("in_dropped") => Some(&mut c.in_dropped),
                    Some("out_allowed") => Some(&mut c.out_allowed),
                    Some("out_dropped") => Some(&mut c.out_dropped),
                    _ => None,
                };
                if let Some(slot) = slot {
                    *slot = packets.unwrap_or(0);
                }
            }
            _ => {}
        }
        b = &b[((len + 3) & !3).min(b.len())..];
    }
    Ok(false)
}

/// Our table's counters, in the calling thread's network namespace.
pub fn counters() -> Result<Counted, String> {
    use nix::libc;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            nl::NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        return Err(format!("netlink: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a new descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: a valid option value of the size given; a scrape must never
    // hang on a kernel that does not answer.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
    }
    let req = counters_request();
    // SAFETY: a zeroed sockaddr_nl is the kernel's address; the buffer is
    // valid for its length.
    let sent = unsafe {
        let mut to: libc::sockaddr_nl = std::mem::zeroed();
        to.nl_family = libc::AF_NETLINK as u16;
        libc::sendto(
            fd.as_raw_fd(),
            req.as_ptr().cast(),
            req.len(),
            0,
            (&to as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(format!("netlink send: {}", std::io::Error::last_os_error()));
    }
    let mut c = Counted::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: the buffer is valid for its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(format!("netlink recv: {}", std::io::Error::last_os_error()));
        }
        if parse_counters(&buf[..n as usize], &mut c)? {
            return Ok(c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::by_address::Boundaries;

    /// One NEWOBJ message as the kernel sends it for a named counter.
    fn counter_msg(name: &str, packets: u64) -> Vec<u8> {
        let mut data = Vec::new();
        attr(&mut data, 1, &(packets * 100).to_be_bytes());
        attr(&mut data, nl::COUNTER_PACKETS, &packets.to_be_bytes());
        let mut m = vec![0u8; 16];
        m.extend_from_slice(&[nl::NFPROTO_INET, 0, 0, 0]);
        attr(&mut m, nl::OBJ_TABLE, b"trireme\0");
        attr(&mut m, nl::OBJ_NAME, format!("{name}\0").as_bytes());
        attr(&mut m, nl::OBJ_TYPE, &1u32.to_be_bytes());
        attr(&mut m, nl::OBJ_DATA | 0x8000, &data);
        let len = m.len() as u32;
        m[0..4].copy_from_slice(&len.to_ne_bytes());
        let kind = (nl::SUBSYS_NFTABLES << 8) | nl::MSG_NEWOBJ;
        m[4..6].copy_from_slice(&kind.to_ne_bytes());
        m
    }

    fn control(kind: u16, errno: i32) -> Vec<u8> {
        let mut m = vec![0u8; 16];
        m.extend_from_slice(&(-errno).to_ne_bytes());
        m.extend_from_slice(&[0u8; 16]);
        let len = m.len() as u32;
        m[0..4].copy_from_slice(&len.to_ne_bytes());
        m[4..6].copy_from_slice(&kind.to_ne_bytes());
        m
    }

    #[test]
    fn counters_are_read_from_a_netlink_dump() {
        let req = counters_request();
        assert_eq!(req.len() % 4, 0);
        assert_eq!(
            u32::from_ne_bytes(req[0..4].try_into().unwrap()) as usize,
            req.len()
        );
        assert_eq!(
            u16::from_ne_bytes([req[4], req[5]]),
            0x0a13,
            "NFT_MSG_GETOBJ"
        );

        let mut c = Counted::default();
        let mut dump = counter_msg("in_allowed", 7);
        dump.extend(counter_msg("someone_elses", 99));
        dump.extend(counter_msg("out_dropped", 3));
        assert_eq!(parse_counters(&dump, &mut c), Ok(false), "more to come");
        assert_eq!(
            parse_counters(&control(nl::NLMSG_DONE, 0), &mut c),
            Ok(true)
        );
        assert_eq!(
            c,
            Counted {
                in_allowed: 7,
                out_dropped: 3,
                ..Counted::default()
            }
        );
        // No table in the namespace: nothing counted, no error.
        let mut none = Counted::default();
        let enoent = control(nl::NLMSG_ERROR, nix::libc::ENOENT);
        assert_eq!(parse_counters(&enoent, &mut none), Ok(true));
        assert_eq!(none, Counted::default());
        let eperm = control(nl::NLMSG_ERROR, nix::libc::EPERM);
        assert!(parse_counters(&eperm, &mut none).is_err());
        // A truncated message is an error, never a panic.
        let mut cut = counter_msg("in_allowed", 1);
        cut.truncate(cut.len() - 5);
        assert!(parse_counters(&cut, &mut none).is_err());
        for n in 0..cut.len() {
            let _ = parse_counters(&cut[..n], &mut none);
        }
    }

    #[test]
    fn renders_one_transaction_with_sets_and_fail_closed_chains() {
        let mut b = Boundaries::new(false, crate::by_address::INBOUND);
        b.net(&"198.18.0.0/24".parse().unwrap());
        b.ports(53, 53);
        let in4 = b
            .compile(|ip, p, port| {
                if ip.to_string().starts_with("198.18.0.") && p == Protocol::Udp && port == 53 {
                    crate::by_address::Cell::Allow
                } else {
                    crate::by_address::Cell::Deny
                }
            })
            .unwrap();
        let t = PuTables {
            in4,
            ..PuTables::default()
        };
        let json = json(&render(&t, Mode::Replace));
        assert!(
            json.starts_with(r#"{"nftables":[{"add":{"table""#),
            "{json}"
        );
        assert!(json.contains(r#"{"delete":{"table":{"family":"inet","name":"trireme"}}}"#));
        // In place: nothing is deleted (the base chains keep their hooks);
        // every set and chain is emptied, then refilled.
        let in_place = super::json(&render(&t, Mode::InPlace));
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
        // Denials go on to the queue under a rate limit, then are counted
        // and dropped.
        assert_eq!(
            json.matches(r#"{"limit":{"burst":100,"per":"second","rate":100}},{"accept":null}"#)
                .count(),
            2
        );
        assert!(json.contains(r#"{"counter":"in_dropped"},{"drop":null}"#));
        assert!(json.contains(r#"{"counter":"out_dropped"},{"drop":null}"#));
        // Inbound SYNs without our marker option are decided here, and an
        // allowed one carries the nfmark the iptables chain needs.
        assert!(
            json.contains(r#"{"match":{"left":{"tcp option":{"base":253,"len":8,"offset":0}},"op":"==","right":false}},{"jump":{"target":"in_new"}}"#),
            "{json}"
        );
        assert!(!json.contains("trireme-marker"));
        assert_eq!(
            json.matches(r#"{"mangle":{"key":{"meta":{"key":"mark"}}"#)
                .count(),
            2
        );
    }
}
