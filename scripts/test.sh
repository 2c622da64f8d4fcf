#!/usr/bin/env bash
# Every test: formatting, lints, unit/integration/conformance tests, the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
# A one-shot build gains nothing from incremental state, which is a tenth of
# target/ (and CI machines can be short of disk). Set it to 1 to keep it.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
cargo fmt --all -- --check
cargo fmt --all --manifest-path policies-wasm/Cargo.toml -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The example plugins, from source (Rust SDK, C, AssemblyScript): the tests use them.
bash policies-wasm/build.sh
cargo clippy --manifest-path policies-wasm/Cargo.toml --target wasm32-unknown-unknown -- -D warnings
cargo test --manifest-path policies-wasm/Cargo.toml --quiet
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace 2>&1 | tee "$log"
passed=$(grep -Eo '[0-9]+ passed' "$log" | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' "$log" | awk '{s+=$1} END {print s+0}')
# The benchmarks (run by hand: see README) are type-checked by clippy
# --all-targets above; building them with optimizations here would double
# the time of a cold run for no test. The demo reuses the test build.
TRIREME_DEMO_PROFILE=dev bash scripts/demo.sh > target/demo.out 2>&1 || { cat target/demo.out; exit 1; }
echo "demo: ok"
echo "tests: $passed passed, $failed failed"
echo "disk: $(du -sh target 2>/dev/null | cut -f1) in target/, $(du -sh policies-wasm/target 2>/dev/null | cut -f1) in policies-wasm/target/"
