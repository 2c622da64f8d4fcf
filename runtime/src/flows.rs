//! The bounded table of connections in handshake.
//!
//! Only handshakes live here: once a flow is authorized the kernel carries
//! it under a conntrack mark and its entry goes. Every entry has a
//! deadline; the table never grows past its capacity (the oldest entry is
//! evicted, and counted), so a SYN flood costs bounded memory.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;

/// Milliseconds since the epoch: the clock of the table's deadlines (the
/// queues pass it to every decision) and of the flow log's lines.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A flow as seen from one PU: its own address first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowKey {
    pub pu: u32,
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

/// One write of the key's bytes: the derived hash feeds the keyed hasher
/// field by field (enum tags, each address, each port), several times the
/// work, on every handshake packet. Equal keys give equal bytes (flow
/// labels and scope ids are left out, which only merges hash buckets).
impl std::hash::Hash for FlowKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        fn put(b: &mut [u8], a: &SocketAddr) {
            let ip = match a {
                SocketAddr::V4(v4) => v4.ip().to_ipv6_mapped().octets(),
                SocketAddr::V6(v6) => v6.ip().octets(),
            };
            b[..16].copy_from_slice(&ip);
            b[16..].copy_from_slice(&a.port().to_ne_bytes());
        }
        let mut b = [0u8; 40];
        b[..4].copy_from_slice(&self.pu.to_ne_bytes());
        put(&mut b[4..22], &self.local);
        put(&mut b[22..], &self.remote);
        state.write(&b);
    }
}

struct Slot<S> {
    state: S,
    deadline: u64,
    /// Insertion stamp; the FIFO's records name one and skip stale ones.
    stamp: u64,
}

/// An insertion, oldest first. It carries the deadline so that the sweep
/// on every insert reads the front record alone: looking the key up cost a
/// (cold) hash and probe per handshake packet, for an entry rarely due.
struct Record {
    key: FlowKey,
    stamp: u64,
    deadline: u64,
}

pub struct FlowTable<S> {
    map: HashMap<FlowKey, Slot<S>>,
    order: VecDeque<Record>,
    capacity: usize,
    next: u64,
    pub evicted: u64,
    pub expired: u64,
}

impl<S> FlowTable<S> {
    pub fn new(capacity: usize) -> Self {
        FlowTable {
            map: HashMap::with_capacity(capacity.min(4096)),
            order: VecDeque::new(),
            capacity,
            next: 0,
            evicted: 0,
            expired: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The live entry for `key` (an expired one counts as absent). One
    /// lookup: every handshake packet makes one.
    pub fn get_mut(&mut self, key: &FlowKey, now: u64) -> Option<&mut S> {
        match self.map.entry(*key) {
            Entry::Occupied(e) if e.get().deadline <= now => {
                e.remove();
                self.expired += 1;
                None
            }
            Entry::Occupied(e) => Some(&mut e.into_mut().state),
            Entry::Vacant(_) => None,
        }
    }

    /// Insert or replace, with a fresh deadline.
    pub fn insert(&mut self, key: FlowKey, state: S, deadline: u64, now: u64) {
        self.sweep(now);
        // Only a full table needs to know whether `key` is new.
        if self.map.len() >= self.capacity && !self.map.contains_key(&key) {
            while self.map.len() >= self.capacity {
                if !self.pop_oldest() {
                    break;
                }
                self.evicted += 1;
            }
        }
        self.next += 1;
        let stamp = self.next;
        self.map.insert(
            key,
            Slot {
                state,
                deadline,
                stamp,
            },
        );
        self.order.push_back(Record {
            key,
            stamp,
            deadline,
        });
        // Replaced entries leave stale FIFO records; keep them bounded.
        if self.order.len() > 2 * self.capacity {
            let map = &self.map;
            self.order
                .retain(|r| map.get(&r.key).is_some_and(|s| s.stamp == r.stamp));
        }
    }

    pub fn remove(&mut self, key: &FlowKey) -> Option<S> {
        self.map.remove(key).map(|s| s.state)
    }

    /// Drop every entry of one PU (removed from the node). Their FIFO
    /// records stay, stale, and are skipped as a replaced key's are.
    pub fn forget_pu(&mut self, pu: u32) {
        self.map.retain(|k, _| k.pu != pu);
    }

    /// Drop expired entries from the old end (deadlines grow with stamps
    /// for a fixed timeout, so the front is where they are). A record
    /// whose deadline passed may be stale (its key was replaced or
    /// removed since): only a matching stamp removes the entry.
    fn sweep(&mut self, now: u64) {
        while let Some(r) = self.order.front() {
            if r.deadline > now {
                break;
            }
            if let Entry::Occupied(e) = self.map.entry(r.key)
                && e.get().stamp == r.stamp
            {
                e.remove();
                self.expired += 1;
            }
            self.order.pop_front();
        }
    }

    fn pop_oldest(&mut self) -> bool {
        while let Some(r) = self.order.pop_front() {
            if let Entry::Occupied(e) = self.map.entry(r.key)
                && e.get().stamp == r.stamp
            {
                e.remove();
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> FlowKey {
        FlowKey {
            pu: 0,
            local: "198.18.0.1:80".parse().unwrap(),
            remote: SocketAddr::new("198.18.0.2".parse().unwrap(), port),
        }
    }

    #[test]
    fn bounded_with_fifo_eviction() {
        let mut t = FlowTable::new(16);
        for p in 0..100u16 {
            t.insert(key(p), p, 1_000, 0);
        }
        assert_eq!(t.len(), 16);
        assert_eq!(t.evicted, 84);
        assert!(t.get_mut(&key(83), 1).is_none());
        assert_eq!(t.get_mut(&key(99), 1), Some(&mut 99));
        assert!(t.order.len() <= 32);
    }

    /// A removed PU's handshakes go; a PU that takes its slot later
    /// finds none of them, and the stale records expire harmlessly.
    #[test]
    fn forgetting_a_pu_drops_its_entries_only() {
        let mut t = FlowTable::new(16);
        let other = |port| FlowKey { pu: 1, ..key(port) };
        for p in 0..4u16 {
            t.insert(key(p), p, 10, 0);
            t.insert(other(p), p + 100, 10, 0);
        }
        t.forget_pu(0);
        assert_eq!(t.len(), 4);
        assert!((0..4).all(|p| t.get_mut(&key(p), 1).is_none()));
        assert_eq!(t.get_mut(&other(3), 1), Some(&mut 103));
        // The insert sweeps what is due at 11: pu 1's four entries, and
        // pu 0's stale records, which count for nothing.
        t.insert(key(0), 7, 30, 11);
        assert_eq!(
            t.expired, 4,
            "only pu 1's entries expired; pu 0's were forgotten"
        );
        assert_eq!(t.len(), 1);
        assert_eq!(t.get_mut(&key(0), 12), Some(&mut 7));
        assert!(t.get_mut(&key(0), 30).is_none());
    }

    #[test]
    fn entries_expire() {
        let mut t = FlowTable::new(16);
        t.insert(key(1), 1, 10, 0);
        t.insert(key(2), 2, 20, 0);
        assert!(t.get_mut(&key(1), 10).is_none());
        assert_eq!(t.expired, 1);
        t.insert(key(3), 3, 40, 25);
        assert_eq!(t.len(), 1, "the sweep dropped key 2");
        assert_eq!(t.expired, 2);
    }

    #[test]
    fn a_stale_record_never_expires_the_entry_that_replaced_it() {
        let mut t = FlowTable::new(16);
        t.insert(key(1), 1, 10, 0);
        t.insert(key(1), 2, 100, 5);
        t.insert(key(2), 3, 100, 50);
        assert_eq!(t.expired, 0);
        assert_eq!(t.get_mut(&key(1), 60), Some(&mut 2));
        // Removed, then its record comes due: nothing to expire either.
        t.remove(&key(2));
        t.insert(key(3), 4, 300, 150);
        assert_eq!(t.expired, 1, "only key 1 was due");
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn replacing_keeps_one_entry_and_bounded_order() {
        let mut t = FlowTable::new(16);
        for i in 0..1000u64 {
            t.insert(key(7), i, 1_000_000, 0);
        }
        assert_eq!(t.len(), 1);
        assert_eq!(t.evicted, 0);
        assert!(t.order.len() <= 32);
        assert_eq!(t.remove(&key(7)), Some(999));
    }
}
