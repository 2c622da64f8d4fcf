//! Named event counters (accepted, dropped by reason, ...), written as JSON
//! for operators and tests. Names are static strings: every drop reason
//! has its own, so a dashboard can tell a replay from a bad key.

use std::collections::BTreeMap;
use std::sync::Mutex;

#[derive(Default)]
pub struct Counters(Mutex<BTreeMap<&'static str, u64>>);

impl Counters {
    pub fn add(&self, name: &'static str, n: u64) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry(name).or_default() += n;
    }

    pub fn inc(&self, name: &'static str) {
        self.add(name, 1);
    }

    pub fn get(&self, name: &str) -> u64 {
        let m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.get(name).copied().unwrap_or(0)
    }

    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
