//! The handshake state machine (design.md §4), free of any kernel API so
//! that every transition is unit-tested with byte-exact packets.
//!
//! The kernel hands us, per PU namespace, the TCP packets of connections
//! that are not yet authorized, and the first packet of other flows:
//!
//! | hook   | packet  | role      | what happens                                         |
//! |--------|---------|-----------|------------------------------------------------------|
//! | OUTPUT | SYN     | initiator | attach the SYN token                                 |
//! | INPUT  | SYN     | responder | verify, strip, **ingress** decision on the labels     |
//! | OUTPUT | SYN-ACK | responder | attach the SYN-ACK token                             |
//! | INPUT  | SYN-ACK | initiator | verify, strip, **egress** decision on the labels      |
//! | OUTPUT | ACK     | initiator | attach the ACK token, authorize the flow provisionally |
//! | INPUT  | ACK     | responder | verify (once only), strip, authorize the flow        |
//!
//! "Authorize" sets a conntrack mark, after which the kernel carries the flow
//! without us. The initiator's mark is provisional: its token ACK may be
//! lost, so SYN-ACKs still come to us, and a re-sent one revokes the mark
//! (our kernel's answer then carries the token again). Its data leaves
//! without us and can overtake the token ACK on the way (another CPU,
//! another backlog), so the responder holds tokenless segments of a flow
//! awaiting its ACK until the ACK is verified, instead of dropping them. A SYN without our marker comes from a peer that does not
//! enforce: it is judged by its IP (ipBlock rules, or the identity of a
//! known workload at that IP). So is a SYN-ACK without the marker, and the
//! first packet of a UDP or SCTP flow, on the same evaluator.

use crate::by_address::{Boundaries, Cell, INBOUND, OUTBOUND, PuTables};
use crate::counters::Counters;
use crate::flowlog::{Direction, FlowEvent, FlowLog, Remote};
use crate::flows::{FlowKey, FlowTable};
use crate::metrics::Histogram;
use crate::packet::{self, ACK, RST, SYN};
use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use trireme_compiler::eval::{Applicable, Endpoint, Evaluator, Flow};
use trireme_compiler::model::{
    Action, Identity, NAMESPACE_KEY, NamedPort, Peer, Peers, PortMatch, Protocol, UNRESOLVED_KEY,
};
use trireme_compiler::plugins::Plugins;
use trireme_compiler::plugins::host::{Host, Limits, Workload};
use trireme_compiler::ruleset::Ruleset;
use trireme_compiler::subjects::SubjectIndex;
use trireme_tokens::handshake::{AwaitAck, Engine, LocalToken, SynReceived, SynSent};

/// Where the kernel saw the packet, from the PU's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// Arriving at the PU (netfilter INPUT in its namespace).
    In,
    /// Leaving the PU (netfilter OUTPUT).
    Out,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Let it through unchanged.
    Accept,
    /// Let it through rewritten (token attached or stripped).
    Rewrite(Vec<u8>),
    /// Let it through (rewritten if given) and mark the connection: from
    /// now on the kernel carries it.
    Authorize(Option<Vec<u8>>),
    /// The initiator's token ACK: let it through rewritten and mark the
    /// connection provisionally (the kernel carries it, but SYN-ACKs still
    /// come here, in case this ACK is lost).
    Provisional(Vec<u8>),
    /// A re-sent SYN-ACK at the initiator (its token ACK was lost): let it
    /// through stripped and clear the provisional mark, so that the ACK our
    /// kernel answers with comes here to carry the token again.
    Revoke(Vec<u8>),
    /// A tokenless segment of a flow whose token ACK has not been verified
    /// yet (the initiator's data overtook it): keep it in the queue until
    /// the flow is authorized (then accept it) or a deadline passes (then
    /// drop it as `ack_without_token`).
    Hold(FlowKey),
    /// Drop, counted under this name.
    Drop(&'static str),
}

/// A verified peer's identity: the labels its token carries.
fn identity_of(peer: &trireme_tokens::handshake::Peer) -> std::borrow::Cow<'_, Identity> {
    let make = || -> Identity {
        peer.labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    // Built once per verified token, which many connections share.
    match peer.view.get_or_init(make) {
        Some(id) => std::borrow::Cow::Borrowed(id),
        None => std::borrow::Cow::Owned(make()),
    }
}

/// A workload this node enforces for.
pub struct Pu {
    pub name: String,
    /// Its configured identity, before resolver plugins.
    pub identity: Identity,
    pub ports: Vec<NamedPort>,
    /// What resolver plugins see of it.
    pub workload: Workload,
}

impl Pu {
    pub fn new(name: &str, identity: Identity, ports: Vec<NamedPort>) -> Pu {
        Pu {
            name: name.to_string(),
            workload: Workload {
                kind: "netns".into(),
                name: name.to_string(),
                namespace: identity.get(NAMESPACE_KEY).unwrap_or_default().to_string(),
                ..Workload::default()
            },
            identity,
            ports,
        }
    }

    pub fn with_workload(mut self, w: Workload) -> Pu {
        self.workload = w;
        self
    }
}

/// What this node knows of workloads, besides the ruleset: its PUs,
/// their addresses, and the identities of peers that send no token. A
/// reload replaces it together with the ruleset, in one swap, so that a
/// packet never sees a PU of one and the addresses of the other.
#[derive(Clone, Default)]
pub struct Inventory {
    /// PUs by slot. A PU keeps its slot for its life (its queue sockets
    /// and its flows are keyed by it); a removed PU leaves a hole, which a
    /// PU added by a later reload may take.
    pub pus: Vec<Option<Arc<Pu>>>,
    /// This node's PUs by address (read from their namespaces), so that
    /// traffic between them is judged by their labels too.
    pub local_ips: HashMap<IpAddr, usize>,
    /// Identities of workloads known by IP, for peers that send no token.
    pub by_ip: HashMap<IpAddr, Identity>,
    /// Node labels by node address, for `nodes` peers.
    pub nodes: HashMap<IpAddr, Identity>,
}

impl Inventory {
    /// Slots in order, one per PU (the embedded configuration's order).
    pub fn of(pus: Vec<Pu>) -> Inventory {
        Inventory {
            pus: pus.into_iter().map(|p| Some(Arc::new(p))).collect(),
            ..Inventory::default()
        }
    }

    /// The live PUs with their slots.
    pub fn live(&self) -> impl Iterator<Item = (usize, &Arc<Pu>)> {
        self.pus
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().map(|p| (i, p)))
    }
}

/// One PU as a given ruleset sees it: its identity after the ruleset's
/// resolvers, the policies that select it, and the token carrying it.
struct Resolved {
    pu: Arc<Pu>,
    identity: Identity,
    labels: BTreeMap<String, String>,
    applicable: Applicable,
    token: Mutex<Option<LocalToken>>,
}

/// A ruleset with what the hot path needs precomputed for the node's
/// inventory: the subject index, its plugins loaded, and per PU its
/// resolved identity and the policies that select it.
pub struct Loaded {
    pub rs: Arc<Ruleset>,
    subjects: Arc<SubjectIndex>,
    plugins: Option<Arc<Plugins>>,
    inv: Inventory,
    /// By slot, as `inv.pus`.
    pus: Vec<Option<Resolved>>,
    pub hash: String,
    /// PUs whose resolver failed (denied everything until a reload).
    pub unresolved: Vec<String>,
}

impl Loaded {
    /// Fails if a plugin of the ruleset cannot be loaded: a node never
    /// half-applies a ruleset.
    pub fn new(
        rs: Ruleset,
        inv: Inventory,
        host: &dyn Fn() -> Result<Host, String>,
    ) -> Result<Loaded, String> {
        let plugins = if rs.plugins.is_empty() {
            None
        } else {
            Some(Arc::new(Plugins::load(&rs, &host()?)?))
        };
        let subjects = Arc::new(SubjectIndex::new(&rs.policies));
        let hash = rs.content_hash();
        Ok(Loaded::resolve(Arc::new(rs), hash, subjects, plugins, inv))
    }

    /// The same ruleset (its plugins as loaded) for another inventory:
    /// the PUs are resolved again, the modules are not compiled again.
    pub fn with_inventory(&self, inv: Inventory) -> Loaded {
        Loaded::resolve(
            self.rs.clone(),
            self.hash.clone(),
            self.subjects.clone(),
            self.plugins.clone(),
            inv,
        )
    }

    fn resolve(
        rs: Arc<Ruleset>,
        hash: String,
        subjects: Arc<SubjectIndex>,
        plugins: Option<Arc<Plugins>>,
        inv: Inventory,
    ) -> Loaded {
        let mut unresolved = Vec::new();
        let ev = Evaluator::with_index(&rs, &subjects);
        let resolved: Vec<Option<Resolved>> = inv
            .pus
            .iter()
            .map(|slot| {
                let p = slot.as_ref()?;
                let mut identity = p.identity.clone();
                if let Some(pl) = plugins.as_ref().filter(|pl| pl.has_resolvers()) {
                    match pl.resolve(&p.workload) {
                        Ok(extra) => {
                            for (k, v) in extra {
                                identity.insert(k, v);
                            }
                        }
                        Err(f) => {
                            eprintln!(
                                "trireme-runtime: PU {}: {f}; denying it everything (fail-closed)",
                                p.name
                            );
                            unresolved.push(p.name.clone());
                            identity.insert(UNRESOLVED_KEY, f.plugin);
                        }
                    }
                }
                let labels = identity
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                Some(Resolved {
                    pu: p.clone(),
                    applicable: ev.applicable(&identity),
                    identity,
                    labels,
                    token: Mutex::new(None),
                })
            })
            .collect();
        Loaded {
            rs,
            subjects,
            plugins,
            inv,
            pus: resolved,
            hash,
            unresolved,
        }
    }

    fn slot(&self, pu: usize) -> Option<&Resolved> {
        self.pus.get(pu).and_then(Option::as_ref)
    }

    /// PU `pu`'s identity under this ruleset (none: no PU in that slot).
    pub fn identity(&self, pu: usize) -> Option<&Identity> {
        self.slot(pu).map(|r| &r.identity)
    }

    /// The inventory this ruleset was resolved for.
    pub fn inventory(&self) -> &Inventory {
        &self.inv
    }

    /// Counters of every plugin, by name.
    pub fn plugin_stats(&self) -> Vec<(String, trireme_compiler::plugins::host::Stats)> {
        self.plugins
            .iter()
            .flat_map(|p| p.plugins())
            .map(|p| (p.name().to_string(), p.stats()))
            .collect()
    }
}

/// The addresses, port and protocol one policy direction is decided on.
/// The query a TCP flow is decided on: the destination's port, whichever
/// end this PU is.
fn tcp_query(key: &FlowKey, hook: Hook) -> Query {
    Query {
        local: key.local.ip(),
        remote: key.remote.ip(),
        port: match hook {
            Hook::In => key.local.port(),
            Hook::Out => key.remote.port(),
        },
        protocol: Protocol::Tcp,
    }
}

#[derive(Clone, Copy)]
struct Query {
    local: IpAddr,
    remote: IpAddr,
    /// The destination port.
    port: u16,
    protocol: Protocol,
}

enum State {
    /// Initiator: SYN sent (the payload is kept so a retransmitted SYN
    /// carries the same nonce, which the responder recognises).
    SynSent {
        st: SynSent,
        payload: Arc<[u8]>,
        /// When the SYN left (`mono_us`), for the latency histogram.
        since: u64,
    },
    /// Initiator: SYN-ACK verified and allowed; the ACK payload waits for
    /// the kernel's ACK. `synack` is a keyed hash of the SYN-ACK token, by
    /// which a re-sent copy is recognised (the token itself is ~400 bytes,
    /// and this state lives for the handshake timeout).
    AckPending { synack: u64, ack: Vec<u8> },
    /// Initiator: the ACK token went out and the flow is provisionally
    /// authorized. If the ACK was lost, the responder re-sends its SYN-ACK:
    /// that revokes the mark, our kernel answers with another ACK, and that
    /// ACK carries the token again.
    AckSent { synack: u64, ack: Vec<u8> },
    /// Responder: SYN verified and allowed.
    SynReceived {
        syn: Vec<u8>,
        st: SynReceived,
        /// When the SYN arrived (`mono_us`).
        since: u64,
    },
    /// Responder: SYN-ACK sent, waiting for the ACK.
    AwaitAck {
        syn: Vec<u8>,
        synack: Arc<[u8]>,
        st: AwaitAck,
        since: u64,
    },
    /// Responder: authorized; packets queued before the conntrack mark took
    /// effect pass. It keeps the ACK token it accepted, so that a re-sent
    /// copy of that ACK passes and any other is a replay.
    Done { ack: Vec<u8> },
    /// Responder: this SYN was refused; its retransmissions are refused
    /// without another verification (and counted as denials, not replays).
    Denied { syn: Vec<u8> },
    /// Initiator, the peer a PU of this node: egress was decided on the
    /// SYN (the peer's identity is ours to know) and the flow is marked.
    LocalSynSent { payload: Arc<[u8]> },
    /// Responder-to-be, a PU of this node: this runtime let a SYN carrying
    /// exactly this token out of the initiator's namespace, on this tuple.
    Witnessed { syn: Arc<[u8]> },
    /// Responder of a same-node flow: the witnessed SYN was verified and
    /// admitted, the flow is marked. Its retransmissions pass.
    LocalDone { syn: Vec<u8> },
}

pub struct Enforcer {
    engine: Engine,
    /// The ruleset and the inventory, swapped together.
    policy: RwLock<Arc<Loaded>>,
    flows: Mutex<FlowTable<State>>,
    timeout_ms: u64,
    /// Keys the SYN-ACK hashes of `AckPending`/`AckSent`, per process.
    synack_hash: std::hash::RandomState,
    /// Segments the queue workers hold without a verdict, node-wide.
    held: std::sync::atomic::AtomicUsize,
    pub counters: Counters,
    /// Drops by reason alone (they are in `counters` too), for metrics.
    pub drops: Counters,
    /// Between nodes: SYN out to SYN-ACK in, at the initiator.
    pub handshake_initiator: Histogram,
    /// Between nodes: SYN in to ACK verified, at the responder.
    pub handshake_responder: Histogram,
    /// Set once, before the queues start, when `flowLog` is configured.
    flow_log: OnceLock<FlowLog>,
    host: LazyHost,
}

/// The plugin host, made on first need: it runs an epoch thread, which a
/// node without plugins should not pay for.
struct LazyHost {
    host: OnceLock<Host>,
    limits: Limits,
    cache_dir: Option<PathBuf>,
}

impl LazyHost {
    fn get(&self) -> Result<Host, String> {
        if let Some(h) = self.host.get() {
            return Ok(h.clone());
        }
        let h = Host::build(
            self.limits.clone(),
            self.cache_dir.clone(),
            Arc::new(|p, l, m| eprintln!("trireme-runtime: plugin {p}: {l:?}: {m}")),
        )?;
        Ok(self.host.get_or_init(|| h).clone())
    }
}

/// A TCP packet's flow as seen from PU `pu`: its own address first.
fn key_of(pu: usize, hook: Hook, m: &packet::TcpMeta) -> FlowKey {
    let (local, remote) = match hook {
        Hook::In => (m.dst, m.src),
        Hook::Out => (m.src, m.dst),
    };
    FlowKey {
        pu: pu as u32,
        local,
        remote,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The counter, and flow-log reason, of a policy decision.
fn decision_reason(direction: Direction, allowed: bool, by_ip: bool) -> &'static str {
    match (direction, allowed, by_ip) {
        (Direction::Ingress, true, false) => "ingress_allowed",
        (Direction::Ingress, false, false) => "ingress_denied",
        (Direction::Ingress, true, true) => "ingress_allowed_by_ip",
        (Direction::Ingress, false, true) => "ingress_denied_by_ip",
        (Direction::Egress, true, false) => "egress_allowed",
        (Direction::Egress, false, false) => "egress_denied",
        (Direction::Egress, true, true) => "egress_allowed_by_ip",
        (Direction::Egress, false, true) => "egress_denied_by_ip",
    }
}

/// Drops that are policy decisions: logged where they are made, with
/// the peer's identity, and not again for each retransmission.
fn is_policy_denial(reason: &str) -> bool {
    [Direction::Ingress, Direction::Egress].iter().any(|&d| {
        reason == decision_reason(d, false, false) || reason == decision_reason(d, false, true)
    })
}

/// The datagram protocols policies govern, by IP protocol number.
fn datagram_protocol(number: u8) -> Option<Protocol> {
    match number {
        17 => Some(Protocol::Udp),
        132 => Some(Protocol::Sctp),
        _ => None,
    }
}

/// A datagram's flow key and direction, from the PU's side.
fn datagram_key(pu: usize, hook: Hook, m: &packet::IpMeta) -> (FlowKey, Direction) {
    let src = std::net::SocketAddr::new(m.src, m.src_port);
    let dst = std::net::SocketAddr::new(m.dst, m.dst_port);
    let (local, remote, direction) = match hook {
        Hook::In => (dst, src, Direction::Ingress),
        Hook::Out => (src, dst, Direction::Egress),
    };
    let key = FlowKey {
        pu: pu as u32,
        local,
        remote,
    };
    (key, direction)
}

/// Microseconds on a monotonic clock, for handshake latencies (the
/// wall clock that timestamps tokens may step).
fn mono_us() -> u64 {
    static BASE: OnceLock<std::time::Instant> = OnceLock::new();
    BASE.get_or_init(std::time::Instant::now)
        .elapsed()
        .as_micros() as u64
}

/// The connection's direction as one packet tells it: a SYN is sent by
/// the side that opens, a SYN-ACK by the other, and any later segment
/// arriving at a PU is counted against its ingress.
fn direction_of(hook: Hook, flags: u8) -> Direction {
    let opener = flags & SYN != 0 && flags & ACK == 0;
    let synack = flags & SYN != 0 && flags & ACK != 0;
    match (hook, opener, synack) {
        (Hook::In, _, true) | (Hook::Out, true, _) => Direction::Egress,
        (Hook::Out, _, true) => Direction::Ingress,
        (Hook::In, _, _) => Direction::Ingress,
        (Hook::Out, _, _) => Direction::Egress,
    }
}

fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

impl Enforcer {
    /// Fails when the ruleset's plugins cannot be loaded.
    pub fn new(
        engine: Engine,
        pus: Vec<Pu>,
        rs: Ruleset,
        by_ip: HashMap<IpAddr, Identity>,
        max_flows: usize,
        timeout_ms: u64,
    ) -> Result<Enforcer, String> {
        Enforcer::with_plugin_limits(
            engine,
            pus,
            rs,
            by_ip,
            max_flows,
            timeout_ms,
            Limits::runtime(),
            None,
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub fn with_plugin_limits(
        engine: Engine,
        pus: Vec<Pu>,
        rs: Ruleset,
        by_ip: HashMap<IpAddr, Identity>,
        max_flows: usize,
        timeout_ms: u64,
        limits: Limits,
        cache_dir: Option<PathBuf>,
    ) -> Result<Enforcer, String> {
        let host = LazyHost {
            host: OnceLock::new(),
            limits,
            cache_dir,
        };
        let inv = Inventory {
            by_ip,
            ..Inventory::of(pus)
        };
        let loaded = Loaded::new(rs, inv, &|| host.get())?;
        Ok(Enforcer {
            engine,
            policy: RwLock::new(Arc::new(loaded)),
            flows: Mutex::new(FlowTable::new(max_flows)),
            timeout_ms,
            synack_hash: std::hash::RandomState::new(),
            held: std::sync::atomic::AtomicUsize::new(0),
            counters: Counters::default(),
            drops: Counters::default(),
            handshake_initiator: Histogram::default(),
            handshake_responder: Histogram::default(),
            flow_log: OnceLock::new(),
            host,
        })
    }

    /// The cluster's nodes (labels by address), which `nodes` peers select.
    pub fn with_nodes(self, nodes: HashMap<IpAddr, Identity>) -> Self {
        self.install_inventory(Inventory {
            nodes,
            ..self.policy().inventory().clone()
        });
        self
    }

    /// The addresses of this node's PUs (PU slot by address), in force at
    /// once for the ruleset in force.
    pub fn set_local_ips(&self, ips: HashMap<IpAddr, usize>) {
        self.install_inventory(Inventory {
            local_ips: ips,
            ..self.policy().inventory().clone()
        });
    }

    /// The live PUs, with their slots.
    pub fn pus(&self) -> Vec<(usize, Arc<Pu>)> {
        let l = self.policy();
        l.inventory().live().map(|(i, p)| (i, p.clone())).collect()
    }

    pub fn policy(&self) -> Arc<Loaded> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Swap in a new ruleset; it applies to connections that start after
    /// this returns (authorized flows keep their conntrack mark).
    /// A ruleset whose plugins cannot be loaded is refused and the current
    /// one stays.
    pub fn update_policy(&self, rs: Ruleset) -> Result<(), String> {
        let l = self.prepare(rs)?;
        self.install(l);
        Ok(())
    }

    /// A ruleset loaded for this node's PUs, not yet in force (so that the
    /// kernel's tables can be built from it first).
    pub fn prepare(&self, rs: Ruleset) -> Result<Arc<Loaded>, String> {
        self.prepare_with(rs, self.policy().inventory().clone())
    }

    /// A ruleset loaded for another inventory (a reload that adds, removes
    /// or relabels PUs), not yet in force.
    pub fn prepare_with(&self, rs: Ruleset, inv: Inventory) -> Result<Arc<Loaded>, String> {
        Ok(Arc::new(Loaded::new(rs, inv, &|| self.host.get())?))
    }

    /// Forget the handshakes of the PU in slot `pu` (removed from the
    /// node), so that a PU that takes the slot later inherits none.
    pub fn forget_pu(&self, pu: usize) {
        lock(&self.flows).forget_pu(pu as u32);
    }

    /// Put a new ruleset (and inventory) in force: a policy update.
    pub fn install(&self, l: Arc<Loaded>) {
        self.swap(l);
        self.counters.inc("policy_updates");
    }

    /// Put in force the ruleset in force for another inventory (the PUs'
    /// addresses learnt at start): not a policy update.
    pub fn install_inventory(&self, inv: Inventory) {
        self.swap(Arc::new(self.policy().with_inventory(inv)));
    }

    /// Put back what `policy()` returned before a reload that failed
    /// half-way (not a policy update: nothing new came into force).
    pub fn restore(&self, l: Arc<Loaded>) {
        self.swap(l);
    }

    fn swap(&self, l: Arc<Loaded>) {
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = l;
    }

    /// Record a handshake state with the handshake deadline.
    fn remember(&self, t: &mut FlowTable<State>, key: FlowKey, state: State, now_ms: u64) {
        t.insert(key, state, now_ms + self.timeout_ms, now_ms);
    }

    /// Flows in handshake, evictions and expiries.
    pub fn flow_stats(&self) -> (usize, u64, u64) {
        let t = lock(&self.flows);
        (t.len(), t.evicted, t.expired)
    }

    fn local_token(&self, l: &Loaded, pu: usize, now_s: u64) -> Result<LocalToken, &'static str> {
        let p = l.slot(pu).ok_or("unknown_pu")?;
        let mut slot = lock(&p.token);
        if let Some(t) = slot.as_ref().filter(|t| !t.needs_refresh(now_s)) {
            return Ok(t.clone());
        }
        match self.engine.local_token(&p.labels, now_s) {
            Ok(t) => {
                *slot = Some(t.clone());
                Ok(t)
            }
            Err(e) => Err(e.counter()),
        }
    }

    fn allowed_under(
        &self,
        l: &Loaded,
        pu: usize,
        hook: Hook,
        q: Query,
        peer: Option<&Identity>,
    ) -> bool {
        let Query {
            local,
            remote,
            port,
            protocol,
        } = q;
        let ev = match &l.plugins {
            Some(p) => Evaluator::with_index(&l.rs, &l.subjects).with_hooks(&**p),
            None => Evaluator::with_index(&l.rs, &l.subjects),
        };
        // A slot emptied by a reload while its packet was queued: nothing
        // is allowed for a PU that is gone.
        let Some(me) = l.slot(pu) else {
            return false;
        };
        let mine = Endpoint {
            identity: Some(&me.identity),
            ip: Some(local),
            ports: &me.pu.ports,
            node: None,
        };
        let local_pu = l.inv.local_ips.get(&remote).and_then(|&j| l.slot(j));
        let peer = peer
            .or_else(|| l.inv.by_ip.get(&remote))
            .or_else(|| local_pu.map(|r| &r.identity));
        let them = Endpoint {
            identity: peer,
            ip: Some(remote),
            ports: local_pu.map_or(&[][..], |r| &r.pu.ports),
            node: l.inv.nodes.get(&remote),
        };
        let app = Some(&me.applicable);
        match hook {
            Hook::In => {
                let f = Flow {
                    src: them,
                    dst: mine,
                    port,
                    protocol,
                };
                ev.allowed_with(&f, None, app)
            }
            Hook::Out => {
                let f = Flow {
                    src: mine,
                    dst: them,
                    port,
                    protocol,
                };
                ev.allowed_with(&f, app, None)
            }
        }
    }

    /// The kernel's verdicts on peers known by address for PU `pu` under
    /// `l` (UDP and SCTP both ways, tokenless TCP SYNs in), both families
    /// (by_address.rs says why this is exact).
    /// The notes say where a PU's datagrams still go to userspace.
    pub fn address_tables(&self, l: &Loaded, pu: usize) -> (PuTables, Vec<String>) {
        let mut notes = Vec::new();
        let Some(me) = l.slot(pu) else {
            let t = PuTables {
                in4: Boundaries::new(false, INBOUND).uniform(Cell::Deny),
                in6: Boundaries::new(true, INBOUND).uniform(Cell::Deny),
                out4: Boundaries::new(false, OUTBOUND).uniform(Cell::Deny),
                out6: Boundaries::new(true, OUTBOUND).uniform(Cell::Deny),
            };
            return (t, vec![format!("slot {pu}: no PU")]);
        };
        let mut table = |hook: Hook, v6: bool| {
            let protocols = match hook {
                Hook::In => INBOUND,
                Hook::Out => OUTBOUND,
            };
            let mut b = Boundaries::new(v6, protocols);
            let mut ask = false;
            for &i in me.applicable.policies() {
                let p = &l.rs.policies[i as usize];
                let rules = match hook {
                    Hook::In => &p.ingress,
                    Hook::Out => &p.egress,
                };
                for r in rules.iter().flatten() {
                    ask |= matches!(r.action, Action::Ask(_));
                    if let Peers::AnyOf(peers) = &r.peers {
                        for peer in peers {
                            if let Peer::Cidr(c) = peer {
                                b.net(&c.cidr);
                                c.except.iter().for_each(|e| b.net(e));
                            }
                        }
                    }
                    for pr in &r.ports {
                        match &pr.port {
                            PortMatch::Any => {}
                            PortMatch::Range { first, last } => b.ports(*first, *last),
                            // Named ports resolve against the destination:
                            // this PU on ingress, another local PU on egress.
                            PortMatch::Named(n) => {
                                let dsts: Vec<&Pu> = match hook {
                                    Hook::In => vec![&me.pu],
                                    Hook::Out => l.inv.live().map(|(_, p)| &**p).collect(),
                                };
                                dsts.iter()
                                    .flat_map(|d| &d.ports)
                                    .filter(|np| np.name == *n)
                                    .for_each(|np| b.ports(np.port, np.port))
                            }
                        }
                    }
                }
            }
            let known = l.inv.by_ip.keys().chain(l.inv.nodes.keys());
            for ip in known.chain(l.inv.local_ips.keys()) {
                b.host(*ip);
            }
            if ask {
                return b.uniform(Cell::Ask);
            }
            let local = if v6 {
                IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
            } else {
                IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
            };
            let decide = |remote, protocol, port| {
                let q = Query {
                    local,
                    remote,
                    port,
                    protocol,
                };
                if self.allowed_under(l, pu, hook, q, None) {
                    Cell::Allow
                } else {
                    Cell::Deny
                }
            };
            b.compile(decide).unwrap_or_else(|cells| {
                notes.push(format!(
                    "{} cells for {hook:?}/IPv{}: decided in userspace",
                    cells,
                    if v6 { 6 } else { 4 }
                ));
                b.uniform(Cell::Ask)
            })
        };
        let t = PuTables {
            in4: table(Hook::In, false),
            in6: table(Hook::In, true),
            out4: table(Hook::Out, false),
            out6: table(Hook::Out, true),
        };
        (t, notes)
    }

    /// The verdict for one queued packet of PU `pu`. Never panics on any
    /// input; every drop is counted under its reason.
    pub fn handle(&self, pu: usize, hook: Hook, pkt: &[u8], now_ms: u64) -> Verdict {
        let v = self.decide(pu, hook, pkt, now_ms);
        match &v {
            Verdict::Drop(reason) => {
                self.count_drop(reason);
                // Policy decisions are logged where they are made, with
                // the peer's identity; this logs the rest (bad tokens,
                // replays, strays), once per packet.
                if self.flow_log.get().is_some() && !is_policy_denial(reason) {
                    self.log_dropped_packet(pu, hook, pkt, reason);
                }
            }
            Verdict::Authorize(_) | Verdict::Provisional(_) => self.counters.inc("authorized"),
            Verdict::Revoke(_) => self.counters.inc("revoked"),
            _ => {}
        }
        v
    }

    /// Count a drop under its reason (the queues count theirs here too).
    pub fn count_drop(&self, reason: &'static str) {
        self.counters.inc("dropped");
        self.counters.inc(reason);
        self.drops.inc(reason);
    }

    /// Log every decision from now on (`flowLog`). Once per process.
    pub fn set_flow_log(&self, log: FlowLog) -> Result<(), String> {
        self.flow_log
            .set(log)
            .map_err(|_| "the flow log is already set".to_string())
    }

    /// A segment the responder held for its token ACK, dropped (the ACK
    /// never came in time, or the hold was full): counted and logged.
    pub fn drop_held(&self, key: &FlowKey, reason: &'static str) {
        self.count_drop(reason);
        if self.flow_log.get().is_some() {
            let l = self.policy();
            let (d, p) = (Direction::Ingress, Protocol::Tcp);
            self.log_flow(&l, key, d, p, false, reason, || Remote::Address);
        }
    }

    /// Log a policy decision under the reason it is counted as.
    #[allow(clippy::too_many_arguments)]
    fn log_decision(
        &self,
        l: &Loaded,
        key: &FlowKey,
        direction: Direction,
        protocol: Protocol,
        allowed: bool,
        by_ip: bool,
        peer: impl FnOnce() -> Remote,
    ) {
        let reason = decision_reason(direction, allowed, by_ip);
        self.log_flow(l, key, direction, protocol, allowed, reason, peer);
    }

    /// SIGHUP: reopen the flow log's file (log rotation).
    pub fn reopen_flow_log(&self) {
        if let Some(log) = self.flow_log.get() {
            log.reopen();
        }
    }

    /// Log one decision, if flow logs are on (a branch, when they are not).
    #[allow(clippy::too_many_arguments)]
    fn log_flow(
        &self,
        l: &Loaded,
        key: &FlowKey,
        direction: Direction,
        protocol: Protocol,
        allowed: bool,
        reason: &'static str,
        peer: impl FnOnce() -> Remote,
    ) {
        // Nothing is built, not even a reference count taken, when off.
        let Some(log) = self.flow_log.get() else {
            return;
        };
        let ev = FlowEvent {
            at_ms: crate::flows::now_ms(),
            pu: l.inventory().pus.get(key.pu as usize).cloned().flatten(),
            direction,
            protocol: protocol_name(protocol),
            local: key.local,
            remote: key.remote,
            allowed,
            reason,
            peer: peer(),
        };
        log.send(ev, &self.counters);
    }

    /// A packet dropped for another reason than policy, logged from its
    /// headers (a packet too malformed to give a tuple is counted only).
    fn log_dropped_packet(&self, pu: usize, hook: Hook, pkt: &[u8], reason: &'static str) {
        let l = self.policy();
        let (key, direction, protocol) = match packet::tcp_meta(pkt) {
            Ok(m) => (
                key_of(pu, hook, &m),
                direction_of(hook, m.flags),
                Protocol::Tcp,
            ),
            Err(_) => {
                let Ok(m) = packet::ip_meta(pkt) else { return };
                let Some(protocol) = datagram_protocol(m.protocol) else {
                    return;
                };
                let (key, direction) = datagram_key(pu, hook, &m);
                (key, direction, protocol)
            }
        };
        self.log_flow(&l, &key, direction, protocol, false, reason, || {
            Remote::Address
        });
    }

    /// Segments held node-wide at most (each keeps a ~72 KiB receive buffer
    /// of its queue alive, so this bounds their memory to ~18 MiB).
    pub const HOLD_MAX: usize = 256;

    /// Reserve a place for one held segment; false when the node is full.
    pub fn try_hold(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.held
            .fetch_update(Relaxed, Relaxed, |n| (n < Self::HOLD_MAX).then_some(n + 1))
            .is_ok()
    }

    /// A held segment got its verdict.
    pub fn unhold(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let _ = self
            .held
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1));
    }

    /// Whether the responder has authorized this flow: the queues release
    /// the segments a `Hold` kept once it has.
    pub fn authorized(&self, key: &FlowKey, now_ms: u64) -> bool {
        matches!(
            lock(&self.flows).get_mut(key, now_ms),
            Some(State::Done { .. })
        )
    }

    fn decide(&self, pu: usize, hook: Hook, pkt: &[u8], now_ms: u64) -> Verdict {
        // Read once per packet: the whole decision sees one ruleset and
        // one inventory, even if a reload swaps them meanwhile.
        let l = self.policy();
        let l = &*l;
        if l.slot(pu).is_none() {
            return Verdict::Drop("unknown_pu");
        }
        let m = match packet::tcp_meta(pkt) {
            Ok(m) => m,
            Err(packet::PacketError::NotTcp) => return self.other(l, pu, hook, pkt),
            Err(e) => return Verdict::Drop(e.counter()),
        };
        let key = key_of(pu, hook, &m);
        let now_s = now_ms / 1000;
        let syn = m.flags & SYN != 0;
        let ack = m.flags & ACK != 0;
        if m.flags & RST != 0 {
            lock(&self.flows).remove(&key);
            return Verdict::Accept;
        }
        // Live time per kind of packet, for operators and the benchmark:
        // a warm benchmark loop says little about a runtime whose caches
        // are cold after every wake-up (two clock reads per packet).
        let t0 = std::time::Instant::now();
        let (v, [count, ns]) = match (hook, syn, ack) {
            (Hook::Out, true, false) => (
                self.out_syn(l, pu, key, pkt, now_ms, now_s),
                ["handled_syn_out", "handled_syn_out_ns"],
            ),
            (Hook::In, true, false) => (
                self.in_syn(l, pu, key, pkt, now_ms, now_s),
                ["handled_syn_in", "handled_syn_in_ns"],
            ),
            (Hook::Out, true, true) => (
                self.out_synack(l, pu, key, pkt, now_ms, now_s),
                ["handled_synack_out", "handled_synack_out_ns"],
            ),
            (Hook::In, true, true) => (
                self.in_synack(l, pu, key, pkt, now_ms, now_s),
                ["handled_synack_in", "handled_synack_in_ns"],
            ),
            (Hook::Out, false, _) => (
                self.out_ack(key, pkt, m.payload_len, now_ms),
                ["handled_ack_out", "handled_ack_out_ns"],
            ),
            (Hook::In, false, _) => (
                self.in_ack(key, pkt, now_ms),
                ["handled_ack_in", "handled_ack_in_ns"],
            ),
        };
        self.counters.inc(count);
        self.counters.add(ns, t0.elapsed().as_nanos() as u64);
        v
    }

    fn out_syn(
        &self,
        l: &Loaded,
        pu: usize,
        key: FlowKey,
        pkt: &[u8],
        now_ms: u64,
        now_s: u64,
    ) -> Verdict {
        // The peer is a PU of this node when its address is one of ours
        // (not this PU's own: that goes over loopback).
        let local_peer = l
            .inv
            .local_ips
            .get(&key.remote.ip())
            .copied()
            .filter(|&j| j != pu && l.slot(j).is_some());
        let mut t = lock(&self.flows);
        let (payload, local) = match t.get_mut(&key, now_ms) {
            Some(State::SynSent { payload, .. }) => {
                self.counters.inc("syn_retransmitted");
                (payload.clone(), false)
            }
            Some(State::LocalSynSent { payload }) => {
                self.counters.inc("syn_retransmitted");
                (payload.clone(), true)
            }
            _ => {
                drop(t);
                // Same node: this runtime knows the peer's identity (and
                // named ports) first-hand, so egress is decided now, and
                // the flow marked with the SYN. The peer's ingress is still
                // decided on our token, which it sees as any SYN.
                if let Some(j) = local_peer {
                    let ok = self.allowed_under(l, pu, Hook::Out, tcp_query(&key, Hook::Out), None);
                    let peer = || match l.inventory().pus.get(j).cloned().flatten() {
                        Some(p) => Remote::Local(p),
                        None => Remote::Address,
                    };
                    self.log_decision(l, &key, Direction::Egress, Protocol::Tcp, ok, false, peer);
                    if !ok {
                        lock(&self.flows).remove(&key);
                        return Verdict::Drop("egress_denied");
                    }
                }
                let tok = match self.local_token(l, pu, now_s) {
                    Ok(tok) => tok,
                    Err(c) => return Verdict::Drop(c),
                };
                let (payload, st) = self.engine.syn(&tok, None, now_s);
                let payload: Arc<[u8]> = payload.into();
                t = lock(&self.flows);
                let state = if local_peer.is_some() {
                    State::LocalSynSent {
                        payload: payload.clone(),
                    }
                } else {
                    State::SynSent {
                        st,
                        payload: payload.clone(),
                        since: mono_us(),
                    }
                };
                self.remember(&mut t, key, state, now_ms);
                (payload, local_peer.is_some())
            }
        };
        if local && let Some(j) = local_peer {
            // The responder's side of the same flow, as it will key it.
            let theirs = FlowKey {
                pu: j as u32,
                local: key.remote,
                remote: key.local,
            };
            // Unless the responder has decided on this very SYN already (a
            // retransmission): its decision stands.
            let decided = match t.get_mut(&theirs, now_ms) {
                Some(State::LocalDone { syn }) | Some(State::Denied { syn }) => **syn == *payload,
                _ => false,
            };
            if !decided {
                self.remember(
                    &mut t,
                    theirs,
                    State::Witnessed {
                        syn: payload.clone(),
                    },
                    now_ms,
                );
            }
        }
        drop(t);
        match packet::attach(pkt, &payload) {
            Ok(p) => {
                self.counters.inc("syn_sent");
                if local {
                    Verdict::Authorize(Some(p))
                } else {
                    Verdict::Rewrite(p)
                }
            }
            Err(e) => {
                lock(&self.flows).remove(&key);
                Verdict::Drop(e.counter())
            }
        }
    }

    fn in_syn(
        &self,
        l: &Loaded,
        pu: usize,
        key: FlowKey,
        pkt: &[u8],
        now_ms: u64,
        now_s: u64,
    ) -> Verdict {
        let stripped = match packet::strip(pkt) {
            Ok(Some(s)) => s,
            Ok(None) => {
                // No marker: a peer that does not enforce, judged by IP.
                lock(&self.flows).remove(&key);
                let ok = self.allowed_under(l, pu, Hook::In, tcp_query(&key, Hook::In), None);
                self.log_decision(l, &key, Direction::Ingress, Protocol::Tcp, ok, true, || {
                    Remote::Address
                });
                return if ok {
                    self.counters.inc("ingress_allowed_by_ip");
                    Verdict::Authorize(None)
                } else {
                    Verdict::Drop("ingress_denied_by_ip")
                };
            }
            Err(e) => return Verdict::Drop(e.counter()),
        };
        {
            let mut t = lock(&self.flows);
            match t.get_mut(&key, now_ms) {
                // A retransmitted SYN: the same bytes were already verified
                // and allowed (a replay from elsewhere would come from
                // another port, or find no state).
                Some(State::SynReceived { syn, .. }) | Some(State::AwaitAck { syn, .. })
                    if *syn == stripped.token =>
                {
                    self.counters.inc("syn_retransmitted");
                    return Verdict::Rewrite(stripped.packet);
                }
                Some(State::Denied { syn }) if *syn == stripped.token => {
                    return Verdict::Drop("ingress_denied");
                }
                Some(State::LocalDone { syn }) if *syn == stripped.token => {
                    self.counters.inc("syn_retransmitted");
                    return Verdict::Authorize(Some(stripped.packet));
                }
                _ => {}
            }
        }
        let st = match self.engine.accept_syn(&stripped.token, now_s) {
            Ok(st) => st,
            Err(e) => return Verdict::Drop(e.counter()),
        };
        let peer = identity_of(&st.peer);
        let ok = self.allowed_under(l, pu, Hook::In, tcp_query(&key, Hook::In), Some(&*peer));
        self.log_decision(
            l,
            &key,
            Direction::Ingress,
            Protocol::Tcp,
            ok,
            false,
            || Remote::Token(st.peer.clone()),
        );
        if !ok {
            self.remember(
                &mut lock(&self.flows),
                key,
                State::Denied {
                    syn: stripped.token,
                },
                now_ms,
            );
            return Verdict::Drop("ingress_denied");
        }
        self.counters.inc("ingress_allowed");
        let mut t = lock(&self.flows);
        // A SYN this runtime saw leave a PU of its own, token and tuple
        // exactly: the initiator decided egress then, and no replay can
        // match (a captured SYN carries a spent token, and the witness is
        // replaced by this verdict). Both sides are decided: mark the
        // flow now, and the kernel carries the SYN-ACK and the ACK, four
        // trips to userspace fewer than a handshake between nodes.
        if matches!(t.get_mut(&key, now_ms), Some(State::Witnessed { syn }) if **syn == *stripped.token)
        {
            self.remember(
                &mut t,
                key,
                State::LocalDone {
                    syn: stripped.token,
                },
                now_ms,
            );
            self.counters.inc("local_handshakes");
            return Verdict::Authorize(Some(stripped.packet));
        }
        // A new SYN on a tuple in another state (source-port reuse, or a
        // simultaneous open) replaces it.
        self.remember(
            &mut t,
            key,
            State::SynReceived {
                syn: stripped.token,
                st,
                since: mono_us(),
            },
            now_ms,
        );
        Verdict::Rewrite(stripped.packet)
    }

    fn out_synack(
        &self,
        l: &Loaded,
        pu: usize,
        key: FlowKey,
        pkt: &[u8],
        now_ms: u64,
        now_s: u64,
    ) -> Verdict {
        let mut t = lock(&self.flows);
        let payload: Arc<[u8]> = match t.get_mut(&key, now_ms) {
            Some(State::AwaitAck { synack, .. }) => {
                self.counters.inc("synack_retransmitted");
                synack.clone()
            }
            Some(State::SynReceived { .. }) => {
                let Some(State::SynReceived { syn, st, since }) = t.remove(&key) else {
                    return Verdict::Drop("flow_state_lost");
                };
                drop(t);
                let tok = match self.local_token(l, pu, now_s) {
                    Ok(tok) => tok,
                    Err(c) => return Verdict::Drop(c),
                };
                let (payload, st) = self.engine.syn_ack(&tok, &st);
                let payload: Arc<[u8]> = payload.into();
                t = lock(&self.flows);
                self.remember(
                    &mut t,
                    key,
                    State::AwaitAck {
                        syn,
                        synack: payload.clone(),
                        st,
                        since,
                    },
                    now_ms,
                );
                payload
            }
            // Simultaneous open: both sides sent a SYN and the kernel
            // answers a SYN with a SYN-ACK. Our SYN already carried our
            // identity and the peer decides on it; we decided nothing yet,
            // so refuse (the peer's kernel retries with a plain handshake).
            Some(State::SynSent { .. }) => return Verdict::Drop("simultaneous_open"),
            // A same-node flow, decided and marked on the SYN: its SYN-ACK
            // only comes here if the mark was not in place yet.
            Some(State::LocalDone { .. }) => return Verdict::Authorize(None),
            _ => return Verdict::Drop("synack_without_flow"),
        };
        drop(t);
        match packet::attach(pkt, &payload) {
            Ok(p) => Verdict::Rewrite(p),
            Err(e) => Verdict::Drop(e.counter()),
        }
    }

    fn in_synack(
        &self,
        l: &Loaded,
        pu: usize,
        key: FlowKey,
        pkt: &[u8],
        now_ms: u64,
        now_s: u64,
    ) -> Verdict {
        let stripped = match packet::strip(pkt) {
            Ok(s) => s,
            Err(e) => return Verdict::Drop(e.counter()),
        };
        let mut t = lock(&self.flows);
        let Some(state) = t.get_mut(&key, now_ms) else {
            return Verdict::Drop("synack_without_flow");
        };
        let Some(stripped) = stripped else {
            // A same-node flow: egress was decided on the SYN, and the
            // responder, a PU of ours, answers without a token.
            if matches!(state, State::LocalSynSent { .. }) {
                return Verdict::Authorize(None);
            }
            // The destination does not enforce: egress by IP.
            if !matches!(state, State::SynSent { .. }) {
                return Verdict::Drop("synack_without_token");
            }
            t.remove(&key);
            drop(t);
            let ok = self.allowed_under(l, pu, Hook::Out, tcp_query(&key, Hook::Out), None);
            self.log_decision(l, &key, Direction::Egress, Protocol::Tcp, ok, true, || {
                Remote::Address
            });
            return if ok {
                self.counters.inc("egress_allowed_by_ip");
                Verdict::Authorize(None)
            } else {
                Verdict::Drop("egress_denied_by_ip")
            };
        };
        let seen = self.synack_hash.hash_one(&stripped.token);
        match state {
            State::AckPending { synack, .. } if *synack == seen => {
                self.counters.inc("synack_retransmitted");
                Verdict::Rewrite(stripped.packet)
            }
            // Our token ACK was lost (or is late): the kernel's answer to
            // this SYN-ACK must come back here to carry the token again.
            State::AckSent { synack, .. } if *synack == seen => {
                self.counters.inc("synack_retransmitted");
                Verdict::Revoke(stripped.packet)
            }
            State::SynSent { st, since, .. } => {
                let (st, since) = (st.clone(), *since);
                drop(t);
                let (signer, ack) = match self.engine.accept_syn_ack(&st, &stripped.token, now_s) {
                    Ok(x) => x,
                    Err(e) => return Verdict::Drop(e.counter()),
                };
                let peer = identity_of(&signer);
                let ok =
                    self.allowed_under(l, pu, Hook::Out, tcp_query(&key, Hook::Out), Some(&*peer));
                self.log_decision(l, &key, Direction::Egress, Protocol::Tcp, ok, false, || {
                    Remote::Token(signer.clone())
                });
                if ok {
                    self.handshake_initiator
                        .observe_us(mono_us().saturating_sub(since));
                }
                if !ok {
                    lock(&self.flows).remove(&key);
                    return Verdict::Drop("egress_denied");
                }
                self.remember(
                    &mut lock(&self.flows),
                    key,
                    State::AckPending { synack: seen, ack },
                    now_ms,
                );
                self.counters.inc("egress_allowed");
                Verdict::Rewrite(stripped.packet)
            }
            _ => Verdict::Drop("synack_unexpected"),
        }
    }

    fn out_ack(&self, key: FlowKey, pkt: &[u8], payload_len: usize, now_ms: u64) -> Verdict {
        let mut t = lock(&self.flows);
        match t.get_mut(&key, now_ms) {
            Some(State::AckPending { .. }) => {
                let Some(State::AckPending { synack, ack }) = t.remove(&key) else {
                    return Verdict::Drop("flow_state_lost");
                };
                let v = match packet::attach(pkt, &ack) {
                    Ok(p) => Verdict::Provisional(p),
                    Err(e) => return Verdict::Drop(e.counter()),
                };
                self.remember(&mut t, key, State::AckSent { synack, ack }, now_ms);
                v
            }
            // A pure ACK on a revoked flow (our kernel answering a re-sent
            // SYN-ACK): it carries the token again, and marks again. Data
            // segments queued meanwhile pass as they are.
            Some(State::AckSent { ack, .. }) if payload_len == 0 => {
                self.counters.inc("ack_resent");
                match packet::attach(pkt, ack) {
                    Ok(p) => Verdict::Provisional(p),
                    Err(e) => Verdict::Drop(e.counter()),
                }
            }
            Some(State::AckSent { .. }) => Verdict::Accept,
            Some(State::Done { .. }) | Some(State::LocalSynSent { .. }) => Verdict::Authorize(None),
            // Responder: our kernel answered the SYN we passed with a bare
            // ACK, not a SYN-ACK: it still holds an older connection on this
            // tuple (the peer restarted and reused the port, or a pod reused
            // the address). The ACK lets the peer's kernel reset that stale
            // connection; the peer's next SYN then opens a new one.
            Some(State::SynReceived { .. }) if payload_len == 0 => {
                self.counters.inc("stale_connection_ack");
                Verdict::Accept
            }
            _ => Verdict::Drop("unauthorized_flow"),
        }
    }

    fn in_ack(&self, key: FlowKey, pkt: &[u8], now_ms: u64) -> Verdict {
        let mut t = lock(&self.flows);
        match t.get_mut(&key, now_ms) {
            Some(State::AwaitAck { st, since, .. }) => {
                let stripped = match packet::strip(pkt) {
                    Ok(Some(s)) => s,
                    // Most likely the initiator's data, which overtook its
                    // token ACK; a spoofer's segment expires in the hold.
                    Ok(None) => return Verdict::Hold(key),
                    Err(e) => return Verdict::Drop(e.counter()),
                };
                if let Err(e) = self.engine.accept_ack(st, &stripped.token) {
                    return Verdict::Drop(e.counter());
                }
                self.handshake_responder
                    .observe_us(mono_us().saturating_sub(*since));
                self.remember(
                    &mut t,
                    key,
                    State::Done {
                        ack: stripped.token,
                    },
                    now_ms,
                );
                drop(t);
                Verdict::Authorize(Some(stripped.packet))
            }
            // Initiator, on a revoked flow: a segment of the responder proves
            // that our ACK arrived after all. (The state stays, so that a
            // late copy of the SYN-ACK is still recognised.)
            Some(State::AckSent { .. }) => match packet::strip(pkt) {
                Ok(None) => Verdict::Authorize(None),
                Ok(Some(_)) => Verdict::Drop("token_unexpected"),
                Err(e) => Verdict::Drop(e.counter()),
            },
            // Initiator: the other half of the case above. A segment without
            // SYN cannot open anything in SYN_SENT: our kernel answers it
            // with a reset, which clears the peer's stale connection.
            Some(State::SynSent { .. }) => {
                self.counters.inc("stale_connection_ack");
                Verdict::Accept
            }
            Some(State::LocalDone { .. }) => match packet::strip(pkt) {
                Ok(None) => Verdict::Authorize(None),
                Ok(Some(_)) => Verdict::Drop("token_unexpected"),
                Err(e) => Verdict::Drop(e.counter()),
            },
            Some(State::Done { ack }) => match packet::strip(pkt) {
                Ok(None) => Verdict::Authorize(None),
                // The initiator re-sent the ACK we accepted (its copy of our
                // SYN-ACK was lost or late): the same bytes pass again.
                Ok(Some(s)) if *ack == s.token => {
                    self.counters.inc("ack_resent");
                    Verdict::Authorize(Some(s.packet))
                }
                _ => Verdict::Drop("ack_replayed"),
            },
            _ => Verdict::Drop("unauthorized_flow"),
        }
    }

    /// UDP, SCTP and anything else: the first packet of a flow, judged by
    /// IP on the same evaluator; the kernel carries the rest.
    fn other(&self, l: &Loaded, pu: usize, hook: Hook, pkt: &[u8]) -> Verdict {
        let m = match packet::ip_meta(pkt) {
            Ok(m) => m,
            Err(e) => return Verdict::Drop(e.counter()),
        };
        let Some(protocol) = datagram_protocol(m.protocol) else {
            return Verdict::Drop("protocol_not_governed");
        };
        let (local, remote) = match hook {
            Hook::In => (m.dst, m.src),
            Hook::Out => (m.src, m.dst),
        };
        let ok = self.allowed_under(
            l,
            pu,
            hook,
            Query {
                local,
                remote,
                port: m.dst_port,
                protocol,
            },
            None,
        );
        let (key, direction) = datagram_key(pu, hook, &m);
        self.log_decision(l, &key, direction, protocol, ok, true, || Remote::Address);
        if ok {
            self.counters.inc(match hook {
                Hook::In => "ingress_allowed_by_ip",
                Hook::Out => "egress_allowed_by_ip",
            });
            Verdict::Authorize(None)
        } else {
            Verdict::Drop(match hook {
                Hook::In => "ingress_denied_by_ip",
                Hook::Out => "egress_denied_by_ip",
            })
        }
    }
}
