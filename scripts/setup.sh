#!/usr/bin/env bash
# Installs what the build and tests need on a fresh machine. Idempotent.
set -euo pipefail
if ! command -v cargo >/dev/null; then
  echo "setup: cargo not found; install Rust (rustup) first" >&2
  exit 1
fi
for comp in rustfmt clippy; do
  if ! cargo "${comp/rustfmt/fmt}" --version >/dev/null 2>&1; then
    rustup component add "$comp"
  fi
done
# aws-lc-sys (the crypto backend of the token library) compiles C: it needs a C compiler.
if ! command -v cc >/dev/null && ! command -v gcc >/dev/null; then
  if command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq gcc
  else
    echo "setup: a C compiler (gcc or clang) is required" >&2
    exit 1
  fi
fi
