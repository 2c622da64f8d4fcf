//! Named event counters (accepted, dropped by reason, ...), written as JSON
//! for operators and tests. Names are static strings: every drop reason
//! has its own, so a dashboard can tell a replay from a bad key.
//!
//! Every queued packet bumps two or three of them from whichever queue
//! thread (one per CPU, serving every PU) handles it, so they are lock-free: a fixed
//! open-addressed table of atomics, each slot claimed once by a name. A
//! mutex here was the one lock every thread of the node shared.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Slots (a power of two); the code names a few dozen counters.
const SLOTS: usize = 256;

struct Slot {
    name: OnceLock<&'static str>,
    n: AtomicU64,
}

pub struct Counters {
    slots: Box<[Slot]>,
    /// Increments whose name found no free slot (never, with static names
    /// far fewer than `SLOTS`; reported rather than lost).
    overflow: AtomicU64,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            slots: (0..SLOTS)
                .map(|_| Slot {
                    name: OnceLock::new(),
                    n: AtomicU64::new(0),
                })
                .collect(),
            overflow: AtomicU64::new(0),
        }
    }
}

/// FNV-1a: names are short, and the same text from two crates (two
/// addresses) must land in the same slot.
fn home(name: &str) -> usize {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    h as usize & (SLOTS - 1)
}

impl Counters {
    /// The slot of `name`, claimed for it if `claim` and it has none yet.
    fn slot(&self, name: &'static str, claim: bool) -> Option<&Slot> {
        let start = home(name);
        for i in 0..SLOTS {
            let slot = &self.slots[(start + i) & (SLOTS - 1)];
            let owner = if claim {
                *slot.name.get_or_init(|| name)
            } else {
                *slot.name.get()?
            };
            if std::ptr::eq(owner, name) || owner == name {
                return Some(slot);
            }
        }
        None
    }

    pub fn add(&self, name: &'static str, n: u64) {
        match self.slot(name, true) {
            Some(s) => s.n.fetch_add(n, Relaxed),
            None => self.overflow.fetch_add(n, Relaxed),
        };
    }

    pub fn inc(&self, name: &'static str) {
        self.add(name, 1);
    }

    pub fn get(&self, name: &str) -> u64 {
        // A probe that stops at the first free slot: names are never removed.
        let start = home(name);
        for i in 0..SLOTS {
            let slot = &self.slots[(start + i) & (SLOTS - 1)];
            match slot.name.get() {
                None => return 0,
                Some(owner) if *owner == name => return slot.n.load(Relaxed),
                Some(_) => {}
            }
        }
        0
    }

    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        let mut m: BTreeMap<&'static str, u64> = self
            .slots
            .iter()
            .filter_map(|s| Some((*s.name.get()?, s.n.load(Relaxed))))
            .collect();
        let overflow = self.overflow.load(Relaxed);
        if overflow > 0 {
            m.insert("counters_overflow", overflow);
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_name_across_threads() {
        let c = std::sync::Arc::new(Counters::default());
        let names: Vec<&'static str> = (0..60)
            .map(|i| &*Box::leak(format!("reason_{i}").into_boxed_str()))
            .collect();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (c, names) = (c.clone(), names.clone());
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        for n in &names {
                            c.inc(n);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let snap = c.snapshot();
        assert_eq!(snap.len(), 60);
        assert!(snap.values().all(|&v| v == 4000), "{snap:?}");
        // The same text at another address is the same counter.
        let copy: &'static str = Box::leak("reason_7".to_string().into_boxed_str());
        c.add(copy, 5);
        assert_eq!(c.get("reason_7"), 4005);
        assert_eq!(c.get("never_counted"), 0);
    }

    #[test]
    fn a_full_table_reports_overflow() {
        let c = Counters::default();
        for i in 0..SLOTS + 3 {
            c.inc(Box::leak(format!("n{i}").into_boxed_str()));
        }
        let snap = c.snapshot();
        assert_eq!(snap.get("counters_overflow"), Some(&3));
        assert_eq!(snap.len(), SLOTS + 1);
    }
}
