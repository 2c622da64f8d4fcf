//! What one plugin call may consume. Every limit has a safe default; the
//! embedder picks the budget kind: fuel where answers must be reproducible
//! (the CLI: the same input always stops at the same instruction), an epoch
//! deadline where speed matters (the node runtime: fuel metering costs every
//! instruction, an epoch check costs one load per loop back-edge).

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// Instructions (wasmtime fuel units) per call.
    Fuel(u64),
    /// Wall-clock time per call, checked every millisecond.
    Deadline(Duration),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Linear memory cap per instance; growing beyond it traps.
    pub memory_bytes: usize,
    /// Native stack the guest may use; deeper recursion traps.
    pub stack_bytes: usize,
    pub budget: Budget,
    /// Largest `resolve` output accepted.
    pub max_output: usize,
    /// Most labels one `resolve` may return.
    pub max_labels: usize,
    /// Calls after which an instance is dropped and a fresh one made, so a
    /// guest that leaks memory cannot run out of it in the long run.
    pub recycle_after: u64,
    /// Memoized answers kept per plugin before the memo is cleared; 0
    /// turns memoization off.
    pub memo_entries: usize,
}

impl Limits {
    /// For the CLI: deterministic fuel.
    pub fn offline() -> Limits {
        Limits {
            budget: Budget::Fuel(50_000_000),
            ..Limits::runtime()
        }
    }

    /// For the node runtime: a wall-clock deadline.
    pub fn runtime() -> Limits {
        Limits {
            memory_bytes: 16 << 20,
            stack_bytes: 256 << 10,
            budget: Budget::Deadline(Duration::from_millis(20)),
            max_output: 64 << 10,
            max_labels: 64,
            recycle_after: 100_000,
            memo_entries: 65_536,
        }
    }
}
