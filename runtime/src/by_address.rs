//! Flows judged by the peer's address alone, decided in the kernel: UDP
//! and SCTP in both directions, and inbound TCP SYNs that carry no token.
//! The verdict a PU's policy gives every (peer address, protocol, port) is
//! compiled into interval elements that one nftables set lookup matches.
//!
//! Why this is exact rather than an approximation: such a peer sends no
//! token, so the evaluator sees only its address (plus the labels of
//! configured remotes, each a single address). Addresses between two
//! consecutive CIDR boundaries, and ports between two consecutive port
//! boundaries, are indistinguishable to every rule; deciding one
//! representative per cell therefore decides the whole cell.
//!
//! Why tokenless SYNs too: the userspace answer for them is the same
//! lookup, and deciding them in the kernel spares connections from
//! outside the mesh (load balancers, unenforced nodes) a trip to the
//! queue, and keeps a flood of them from occupying the queue threads
//! that every PU's handshakes share.

use ipnet::IpNet;
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use trireme_compiler::model::Protocol;

/// What the kernel does with the first packet of a flow in a cell.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Cell {
    Allow,
    Deny,
    /// A decide plugin may answer per flow: userspace must see it.
    Ask,
}

/// Peer addresses `addrs.0..=addrs.1`, one protocol, ports
/// `ports.0..=ports.1`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Element {
    pub addrs: (IpAddr, IpAddr),
    pub protocol: Protocol,
    pub ports: (u16, u16),
}

/// One direction and family of a PU: cells not listed are denied.
#[derive(Clone, Default, Debug, PartialEq, Eq)]
pub struct Table {
    pub allow: Vec<Element>,
    pub ask: Vec<Element>,
}

/// Ports `.0..=.1` deciding alike.
type Run = (u16, u16, Cell);
/// An address range and the non-denied port runs it shares.
type Span = ((u128, u128), Vec<Run>);

/// A PU's datagram verdicts: ingress and egress, IPv4 and IPv6.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PuTables {
    pub in4: Table,
    pub in6: Table,
    pub out4: Table,
    pub out6: Table,
}

/// What a PU's inbound tables decide: datagrams, and TCP SYNs without a
/// token (a SYN with one goes to the handshake).
pub const INBOUND: &[Protocol] = &[Protocol::Tcp, Protocol::Udp, Protocol::Sctp];
/// What its outbound tables decide: its own SYNs always take a token.
pub const OUTBOUND: &[Protocol] = &[Protocol::Udp, Protocol::Sctp];

/// More cells than this and the table is not built: the PU's datagrams
/// go to userspace instead (same verdicts, slower first packets).
pub const MAX_CELLS: usize = 1 << 21;

/// Where verdicts may change, per address family and for ports.
#[derive(Clone, Debug)]
pub struct Boundaries {
    v6: bool,
    protocols: &'static [Protocol],
    addrs: BTreeSet<u128>,
    ports: BTreeSet<u32>,
}

impl Boundaries {
    pub fn new(v6: bool, protocols: &'static [Protocol]) -> Self {
        Boundaries {
            v6,
            protocols,
            addrs: BTreeSet::from([0]),
            ports: BTreeSet::from([0]),
        }
    }

    fn max(&self) -> u128 {
        if self.v6 { u128::MAX } else { u32::MAX as u128 }
    }

    /// A CIDR a rule names (other families are ignored).
    pub fn net(&mut self, n: &IpNet) {
        if let (Some(lo), Some(hi)) = (self.num(n.network()), self.num(n.broadcast())) {
            self.span(lo, hi);
        }
    }

    /// An address with labels of its own (a configured remote).
    pub fn host(&mut self, ip: IpAddr) {
        if let Some(x) = self.num(ip) {
            self.span(x, x);
        }
    }

    pub fn ports(&mut self, first: u16, last: u16) {
        self.ports.insert(first as u32);
        self.ports.insert(last as u32 + 1);
    }

    fn span(&mut self, lo: u128, hi: u128) {
        self.addrs.insert(lo);
        if hi < self.max() {
            self.addrs.insert(hi + 1);
        }
    }

    fn num(&self, ip: IpAddr) -> Option<u128> {
        match (ip, self.v6) {
            (IpAddr::V4(a), false) => Some(u32::from(a) as u128),
            (IpAddr::V6(a), true) => Some(u128::from(a)),
            _ => None,
        }
    }

    fn ip(&self, x: u128) -> IpAddr {
        if self.v6 {
            IpAddr::V6(Ipv6Addr::from(x))
        } else {
            IpAddr::V4(Ipv4Addr::from(x as u32))
        }
    }

    /// Inclusive intervals covering the whole address space, in order.
    fn addr_cells(&self) -> Vec<(u128, u128)> {
        let pts: Vec<u128> = self.addrs.iter().copied().collect();
        let max = self.max();
        (0..pts.len())
            .map(|i| (pts[i], pts.get(i + 1).map_or(max, |n| n - 1)))
            .collect()
    }

    fn port_cells(&self) -> Vec<(u16, u16)> {
        let pts: Vec<u32> = self.ports.iter().copied().filter(|p| *p <= 65535).collect();
        (0..pts.len())
            .map(|i| {
                let end = pts.get(i + 1).map_or(65535, |n| n - 1);
                (pts[i] as u16, end as u16)
            })
            .collect()
    }

    pub fn cells(&self) -> usize {
        self.addrs.len() * self.ports.len() * self.protocols.len()
    }

    /// One table deciding everything alike (no per-cell work).
    pub fn uniform(&self, cell: Cell) -> Table {
        let all: Vec<Element> = self
            .protocols
            .iter()
            .map(|p| Element {
                addrs: (self.ip(0), self.ip(self.max())),
                protocol: *p,
                ports: (0, 65535),
            })
            .collect();
        match cell {
            Cell::Allow => Table {
                allow: all,
                ask: Vec::new(),
            },
            Cell::Ask => Table {
                allow: Vec::new(),
                ask: all,
            },
            Cell::Deny => Table::default(),
        }
    }

    /// Decide one representative per cell and merge neighbours alike.
    /// `Err(cells)` when there are more than [`MAX_CELLS`].
    pub fn compile(
        &self,
        mut decide: impl FnMut(IpAddr, Protocol, u16) -> Cell,
    ) -> Result<Table, usize> {
        if self.cells() > MAX_CELLS {
            return Err(self.cells());
        }
        let ports = self.port_cells();
        let mut table = Table::default();
        for &protocol in self.protocols {
            let mut open: Option<Span> = None;
            for (lo, hi) in self.addr_cells() {
                let mut runs: Vec<Run> = Vec::new();
                for &(first, last) in &ports {
                    let c = decide(self.ip(lo), protocol, first);
                    match runs.last_mut() {
                        Some(r) if r.2 == c && r.1 as u32 + 1 == first as u32 => r.1 = last,
                        _ => runs.push((first, last, c)),
                    }
                }
                runs.retain(|r| r.2 != Cell::Deny);
                match &mut open {
                    Some((range, prev)) if *prev == runs => range.1 = hi,
                    _ => {
                        if let Some(o) = open.take() {
                            self.emit(&mut table, protocol, o);
                        }
                        open = Some(((lo, hi), runs));
                    }
                }
            }
            if let Some(o) = open {
                self.emit(&mut table, protocol, o);
            }
        }
        Ok(table)
    }

    fn emit(&self, t: &mut Table, protocol: Protocol, ((lo, hi), runs): Span) {
        for (first, last, c) in runs {
            let e = Element {
                addrs: (self.ip(lo), self.ip(hi)),
                protocol,
                ports: (first, last),
            };
            match c {
                Cell::Allow => t.allow.push(e),
                Cell::Ask => t.ask.push(e),
                Cell::Deny => {}
            }
        }
    }
}

impl Table {
    /// The table's verdict for one flow (what the kernel will do).
    pub fn verdict(&self, ip: IpAddr, protocol: Protocol, port: u16) -> Cell {
        let hit = |es: &[Element]| {
            es.iter().any(|e| {
                e.protocol == protocol
                    && e.addrs.0 <= ip
                    && ip <= e.addrs.1
                    && e.ports.0 <= port
                    && port <= e.ports.1
            })
        };
        if hit(&self.allow) {
            Cell::Allow
        } else if hit(&self.ask) {
            Cell::Ask
        } else {
            Cell::Deny
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    /// A little policy over addresses and ports, as the evaluator would
    /// answer for a PU: 10.0.0.0/8 except 10.1.0.0/16 on 53/udp, a
    /// labelled remote 10.1.2.3 on 5000-5010/udp and 9003/sctp, and
    /// everything from 192.168.0.0/16 (any protocol, any port).
    fn policy(ip: IpAddr, p: Protocol, port: u16) -> Cell {
        let in_ = |n: &str| net(n).contains(&ip);
        let ok = (in_("10.0.0.0/8") && !in_("10.1.0.0/16") && p == Protocol::Udp && port == 53)
            || (ip == "10.1.2.3".parse::<IpAddr>().unwrap()
                && ((p == Protocol::Udp && (5000..=5010).contains(&port))
                    || (p == Protocol::Sctp && port == 9003)))
            || in_("192.168.0.0/16");
        if ok { Cell::Allow } else { Cell::Deny }
    }

    fn bounds() -> Boundaries {
        let mut b = Boundaries::new(false, OUTBOUND);
        for n in ["10.0.0.0/8", "10.1.0.0/16", "192.168.0.0/16"] {
            b.net(&net(n));
        }
        b.host("10.1.2.3".parse().unwrap());
        b.ports(53, 53);
        b.ports(5000, 5010);
        b.ports(9003, 9003);
        b
    }

    #[test]
    fn cells_are_merged() {
        let t = bounds().compile(policy).unwrap();
        // 10.0/8 minus 10.1/16 is two ranges × 53/udp; the remote has
        // two; 192.168/16 has one per protocol.
        assert_eq!(t.allow.len(), 2 + 2 + 2, "{t:#?}");
        assert!(t.ask.is_empty());
    }

    #[test]
    fn uniform_tables() {
        let b = Boundaries::new(true, INBOUND);
        let all = b.uniform(Cell::Allow);
        assert_eq!(
            all.verdict("fd00::1".parse().unwrap(), Protocol::Sctp, 1),
            Cell::Allow
        );
        assert_eq!(
            all.verdict("fd00::1".parse().unwrap(), Protocol::Tcp, 443),
            Cell::Allow
        );
        assert_eq!(
            Boundaries::new(true, OUTBOUND)
                .uniform(Cell::Allow)
                .verdict("fd00::1".parse().unwrap(), Protocol::Tcp, 443),
            Cell::Deny,
            "outbound tables never decide TCP"
        );
        assert_eq!(b.uniform(Cell::Deny), Table::default());
        assert_eq!(
            b.compile(|_, _, _| Cell::Ask).unwrap(),
            b.uniform(Cell::Ask)
        );
    }

    #[test]
    fn too_many_cells_are_refused() {
        let mut b = Boundaries::new(false, OUTBOUND);
        for i in 0..1100u32 {
            b.host(IpAddr::V4(Ipv4Addr::from(i * 7)));
            b.ports(i as u16, i as u16);
        }
        assert!(b.compile(|_, _, _| Cell::Allow).is_err());
    }

    proptest! {
        /// The compiled table answers exactly what the policy answers,
        /// everywhere (near boundaries especially).
        #[test]
        fn table_equals_policy(
            a in prop_oneof![any::<u32>(), 0x0a00_0000u32..0x0a02_0000, 0xc0a7_fff0u32..0xc0a9_0010],
            port in prop_oneof![any::<u16>(), 50u16..60, 4990u16..5020, 9000u16..9010],
            sctp in any::<bool>(),
        ) {
            let t = bounds().compile(policy).unwrap();
            let ip = IpAddr::V4(Ipv4Addr::from(a));
            let p = if sctp { Protocol::Sctp } else { Protocol::Udp };
            prop_assert_eq!(t.verdict(ip, p, port), policy(ip, p, port));
        }
    }
}
