#!/usr/bin/env bash
# Builds every example plugin from source into OUT (default: target/plugins
# at the repository root): the Rust SDK examples, the C resolver (clang +
# lld, freestanding) and the AssemblyScript resolver (asc from npm).
# Used by the tests, the demo and the benchmarks; fast when nothing changed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/../target/plugins}"
mkdir -p "$out"

cargo build --quiet --release --target wasm32-unknown-unknown --manifest-path "$here/Cargo.toml"
for m in image_team deny_list; do
  cp "$here/target/wasm32-unknown-unknown/release/$m.wasm" "$out/$m.wasm"
done

clang --target=wasm32 -O2 -nostdlib -fno-builtin -Wall -Wextra -Werror \
  -Wl,--no-entry -Wl,--export-dynamic \
  -o "$out/image_team_c.wasm" "$here/examples/c/image_team.c"

as="$here/examples/assemblyscript"
if [ ! -x "$as/node_modules/.bin/asc" ]; then
  (cd "$as" && npm ci --no-audit --no-fund --loglevel=error)
fi
(cd "$as" && ./node_modules/.bin/asc assembly/index.ts --outFile "$out/image_team_as.wasm" \
  --runtime stub --use abort= --optimizeLevel 3 --shrinkLevel 1 --noAssert)
