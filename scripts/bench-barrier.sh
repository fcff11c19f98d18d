#!/usr/bin/env bash
# The disk part of a memory+disk checkpoint, natively (no Xen): blkback-snap's serving loop
# over the in-process blkif sim with a guest writing, `checkpoint-barrier` round trips over a
# kept control connection, next to `qemu-img snapshot -c` on the same image (one run).
#   ./scripts/bench-barrier.sh [--rounds 200] [--virtual-gib 64] [--alloc-mib 1024] [--gap-ms 5] [--dir /var/tmp]
# Hold the machine-wide lock on a shared machine: flock /var/tmp/xensnap-vm.lock ./scripts/bench-barrier.sh
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release -q -p blkback-snap --example barrier_bench
exec ./target/release/examples/barrier_bench "$@"
