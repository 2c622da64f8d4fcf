#![allow(dead_code)]
pub use trireme_runtime::lab::*;

/// A lab running this build's `trireme-runtime`.
pub fn lab(tag: &str) -> Lab {
    Lab::new(tag, env!("CARGO_BIN_EXE_trireme-runtime"))
}

/// A named counter of our nftables table in `h`'s namespace (packets).
pub fn nft_counter(h: &Host, name: &str) -> u64 {
    let out = std::process::Command::new("ip")
        .args([
            "netns", "exec", &h.ns, "nft", "list", "counter", "inet", "trireme", name,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("packets ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter {name} in {}: {text}", h.ns))
}
