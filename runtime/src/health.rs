//! What the node's probes ask: is the runtime alive (every queue thread
//! still serving), and is it ready (every PU programmed, nothing left
//! broken by the last reload)? A queue thread that died leaves its queue
//! with no reader, which fail-closed rules turn into refused connections:
//! the one failure a liveness probe must catch, since only a restart heals it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub struct Health {
    ready: AtomicBool,
    /// Each queue thread's flag, cleared when it ends (even by a panic).
    workers: Mutex<Vec<(u16, Arc<AtomicBool>)>>,
    /// The PUs served, by name, with their namespaces (for queue figures).
    pus: Mutex<Vec<(String, PathBuf)>>,
    /// What the last start or reload could not do.
    problems: Mutex<Vec<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Health {
    pub fn set_workers(&self, w: Vec<(u16, Arc<AtomicBool>)>) {
        *lock(&self.workers) = w;
    }

    pub fn set_pus(&self, pus: Vec<(String, PathBuf)>) {
        *lock(&self.pus) = pus;
    }

    pub fn pus(&self) -> Vec<(String, PathBuf)> {
        lock(&self.pus).clone()
    }

    pub fn set_problems(&self, p: Vec<String>) {
        *lock(&self.problems) = p;
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// Alive: every queue thread runs.
    pub fn live(&self) -> Result<(), String> {
        let dead: Vec<String> = lock(&self.workers)
            .iter()
            .filter(|(_, alive)| !alive.load(Ordering::Acquire))
            .map(|(q, _)| format!("queue thread {q} ended"))
            .collect();
        if dead.is_empty() {
            Ok(())
        } else {
            Err(dead.join("\n"))
        }
    }

    /// Ready: alive, started, and nothing left broken.
    pub fn ready(&self) -> Result<(), String> {
        self.live()?;
        if !self.ready.load(Ordering::Acquire) {
            return Err("starting: PUs not programmed yet".into());
        }
        let p = lock(&self.problems);
        if p.is_empty() {
            Ok(())
        } else {
            Err(p.join("\n"))
        }
    }
}

/// Cleared when dropped: a queue thread holds one for its whole life, so
/// its flag falls when it returns or unwinds.
pub struct AliveGuard(pub Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_worker_fails_both_probes_and_problems_fail_readiness() {
        let h = Health::default();
        assert!(h.ready().is_err(), "not ready before start");
        let flag = Arc::new(AtomicBool::new(true));
        h.set_workers(vec![(0, flag.clone())]);
        h.set_ready(true);
        assert_eq!(h.ready(), Ok(()));
        h.set_problems(vec!["pu x: rules not removed".into()]);
        assert_eq!(h.ready(), Err("pu x: rules not removed".into()));
        assert_eq!(h.live(), Ok(()));
        h.set_problems(vec![]);
        let t = std::thread::spawn(move || {
            let _g = AliveGuard(flag);
            panic!("worker dies");
        });
        assert!(t.join().is_err());
        assert_eq!(h.live(), Err("queue thread 0 ended".into()));
        assert!(h.ready().is_err());
    }
}
