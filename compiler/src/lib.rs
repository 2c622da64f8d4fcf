//! Trireme policy compiler.
//!
//! Data flows one way: `source` (YAML inputs) → `model` → `compile` →
//! `ruleset` (the portable artifact) → `eval` (decisions) → `matrix`.

pub mod assertions;
pub mod cluster;
pub mod compile;
pub mod diag;
pub mod diff;
pub mod eval;
pub mod explain;
pub mod inspect;
pub mod matrix;
pub mod model;
pub mod names;
pub mod plugin_test;
pub mod plugins;
pub mod rules;
pub mod ruleset;
pub mod source;
pub mod subjects;
