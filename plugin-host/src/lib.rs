//! Host for Trireme's WebAssembly plugins (ABI v1, docs/plugin-abi.md).
//!
//! A plugin is untrusted code that runs on every node and in every CI run,
//! so everything here is about containment: a module that breaks the ABI is
//! refused at load, and a call that loops, recurses, allocates or answers
//! badly fails alone (counted, logged once) without touching the process or
//! other plugins. Callers treat a failed call as a failure, never as an
//! answer (fail-closed).

pub mod abi;
mod error;
mod host;
mod limits;
mod plugin;

pub use abi::{Metadata, Query, QueryDirection, Verdict, Workload};
pub use error::{CallError, LoadError};
pub use host::{Host, Level, LogSink, hex};
pub use limits::{Budget, Limits};
pub use plugin::{Hooks, Labels, Plugin, Stats};
