#!/usr/bin/env bash
# Installs what the build and the tests need on a fresh Debian 12 machine. Idempotent.
set -euo pipefail
need=()
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v qemu-io >/dev/null || need+=(qemu-utils)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}"
fi
command -v cargo >/dev/null || { echo "setup: cargo is missing (install Rust with rustup)" >&2; exit 1; }
cargo nextest --version >/dev/null 2>&1 || cargo install --locked cargo-nextest
