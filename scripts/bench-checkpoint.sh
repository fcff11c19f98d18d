#!/usr/bin/env bash
# Two-phase checkpoint costs (taken / durable / revert switch) and the cluster-size trade-off,
# xensnap next to qemu-img, from one run.
#   ./scripts/bench-checkpoint.sh [--sizes 0,1,16,64] [--dir DIR] [--reps 5] [--clusters 4k,8k,16k,32k,64k]
#       [--pace 6] [--wait-share 0.05] [--idle-pace 1] [--budget 1] [--walk-chunk 256] [--flush-every 256] [--flushing-only] [--locked-driver] [--no-handoff] [--rounds 6] [--part1-clusters 16k,64k] [--iops-sizes 1,16] [--prealloc full|metadata] [--full-max-gib 16] [--no-table]
# Part 1 also prints guest 4 KiB random-write IOPS while a checkpoint becomes durable vs steady
# state (a guest thread through SharedImage, a paced durability thread), with and without guest flushes.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release -q -p xensnap-tests --bin bench-checkpoint
exec ./target/release/bench-checkpoint "$@"
