//! `trireme-runtime`: the node enforcer. This issue ships only its first
//! step, loading and validating a compiled ruleset with the compiler's own
//! loader (one implementation of the format); the NFQUEUE enforcer, PU
//! sources and nftables programming come with the enforcer issue.

use std::process::ExitCode;
use trireme_compiler::ruleset::Ruleset;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, path] = args.as_slice() else {
        eprintln!(
            "usage: trireme-runtime RULESET\n(loads and validates a compiled ruleset; enforcement is not implemented yet)"
        );
        return ExitCode::from(2);
    };
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: {path}: {e}");
            return ExitCode::from(2);
        }
    };
    match Ruleset::decode(&bytes) {
        Ok(rs) => {
            println!(
                "loaded {path}: {} policies, {} rules, sha256:{} (enforcement not implemented yet)",
                rs.policies.len(),
                rs.rule_count(),
                rs.content_hash()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {path}: {e}");
            ExitCode::from(2)
        }
    }
}
