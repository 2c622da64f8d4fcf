//! Bounded caches. Every cache an attacker can fill from the network has a
//! hard entry bound; eviction is oldest-first, which is enough because each
//! cache only saves work (a miss costs a verification, never a wrong verdict).

use rustc_hash::FxHashMap as HashMap;
use std::collections::VecDeque;
use std::collections::hash_map::Entry;
use std::hash::Hash;

pub struct Bounded<K, V> {
    map: HashMap<K, V>,
    order: VecDeque<K>,
    cap: usize,
}

impl<K: Hash + Eq + Clone, V> Bounded<K, V> {
    pub fn new(cap: usize) -> Self {
        Bounded {
            map: HashMap::default(),
            order: VecDeque::new(),
            cap: cap.max(1),
        }
    }

    pub fn get<Q>(&self, k: &Q) -> Option<&V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.get(k)
    }

    pub fn insert(&mut self, k: K, v: V) {
        if self.map.insert(k.clone(), v).is_none() {
            self.order.push_back(k);
            while self.order.len() > self.cap {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }

    pub fn remove(&mut self, k: &K) {
        self.map.remove(k);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Remembers recently seen SYN nonces for `window` seconds, at most `cap` of
/// them. A replay outside this memory still cannot complete a handshake: the
/// ACK must be authenticated with a key the replayer does not have.
pub struct ReplayGuard {
    /// Keyed (SipHash, a random key per process): a nonce is the sender's
    /// choice, and in PKI mode without `require_syn_mac` a captured JWT lets
    /// anyone send SYNs with nonces made to collide under an unkeyed hash,
    /// turning every lookup into a scan of the table.
    seen: std::collections::HashMap<[u8; 16], u64>,
    order: VecDeque<([u8; 16], u64)>,
    cap: usize,
    window: u64,
}

impl ReplayGuard {
    pub fn new(cap: usize, window: u64) -> Self {
        ReplayGuard {
            seen: std::collections::HashMap::new(),
            order: VecDeque::new(),
            cap: cap.max(1),
            window,
        }
    }

    /// False when `nonce` was already seen inside the window.
    pub fn first_sighting(&mut self, nonce: [u8; 16], now: u64) -> bool {
        while let Some(&(n, t)) = self.order.front() {
            if t + self.window >= now && self.order.len() < self.cap {
                break;
            }
            self.order.pop_front();
            if let Entry::Occupied(e) = self.seen.entry(n)
                && *e.get() == t
            {
                e.remove();
            }
        }
        // One lookup per SYN (each a cold probe in a live runtime).
        match self.seen.entry(nonce) {
            Entry::Occupied(_) => false,
            Entry::Vacant(v) => {
                v.insert(now);
                self.order.push_back((nonce, now));
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_evicts_oldest() {
        let mut c = Bounded::new(2);
        c.insert(1, "a");
        c.insert(2, "b");
        c.insert(3, "c");
        assert_eq!(c.len(), 2);
        assert!(c.get(&1).is_none());
        assert_eq!(c.get(&3), Some(&"c"));
    }

    #[test]
    fn replay_window_and_bound() {
        let mut g = ReplayGuard::new(2, 10);
        assert!(g.first_sighting([1; 16], 100));
        assert!(!g.first_sighting([1; 16], 105));
        // Forgotten after the window.
        assert!(g.first_sighting([1; 16], 200));
        assert!(g.first_sighting([2; 16], 200));
        assert!(g.first_sighting([3; 16], 200));
        assert!(g.seen.len() <= 2);
    }
}
