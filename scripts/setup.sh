#!/usr/bin/env bash
# Installs what the build and tests need on a fresh machine. Idempotent.
set -euo pipefail
# Rust itself, through rustup, when the machine has none (the callers put
# ~/.cargo/bin on PATH after this script).
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v cargo >/dev/null; then
  if ! command -v curl >/dev/null; then
    if command -v apt-get >/dev/null; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl ca-certificates
    else
      echo "setup: cargo not found and no curl to fetch rustup; install Rust first" >&2
      exit 1
    fi
  fi
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
    sh -s -- -y --profile minimal --default-toolchain stable || {
    echo "setup: could not install Rust with rustup (no network?); install it first" >&2
    exit 1
  }
fi
for comp in rustfmt clippy; do
  if ! cargo "${comp/rustfmt/fmt}" --version >/dev/null 2>&1; then
    rustup component add "$comp"
  fi
done
# WASM plugins: the Rust SDK and examples build for wasm32-unknown-unknown.
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
  rustup target add wasm32-unknown-unknown
fi
# aws-lc-sys (the crypto backend of the token library) compiles C: it needs a C compiler.
if ! command -v cc >/dev/null && ! command -v gcc >/dev/null; then
  if command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq gcc
  else
    echo "setup: a C compiler (gcc or clang) is required" >&2
    exit 1
  fi
fi
# The enforcer's tests and demo: network namespaces (iproute2), iptables-nft for the TCP chains, nft for the by-address sets (UDP/SCTP, tokenless SYNs),
# scapy for the replay and SCTP tests.
need=()
command -v ip >/dev/null || need+=(iproute2)
command -v iptables-restore >/dev/null || need+=(iptables)
command -v nft >/dev/null || need+=(nftables)
/usr/bin/python3 -c 'import scapy' 2>/dev/null || need+=(python3-scapy)
# The C and AssemblyScript plugin examples: clang + wasm-ld (lld), node + npm.
command -v clang >/dev/null || need+=(clang)
command -v wasm-ld >/dev/null || need+=(lld)
command -v npm >/dev/null || need+=(nodejs npm)
if [ ${#need[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
  else
    echo "setup: please install: ${need[*]}" >&2
    exit 1
  fi
fi
# Debian's iptables defaults to the nf_tables backend; make sure of it.
if command -v update-alternatives >/dev/null && [ -e /usr/sbin/iptables-nft ]; then
  update-alternatives --set iptables /usr/sbin/iptables-nft >/dev/null 2>&1 || true
  update-alternatives --set ip6tables /usr/sbin/ip6tables-nft >/dev/null 2>&1 || true
fi
