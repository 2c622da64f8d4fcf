#![allow(dead_code)]
pub use trireme_runtime::lab::*;

/// A lab running this build's `trireme-runtime`.
pub fn lab(tag: &str) -> Lab {
    Lab::new(tag, env!("CARGO_BIN_EXE_trireme-runtime"))
}
