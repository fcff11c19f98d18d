#!/usr/bin/env bash
# Two-phase checkpoint costs (taken / durable / revert switch) and the cluster-size trade-off,
# xensnap next to qemu-img, from one run.
#   ./scripts/bench-checkpoint.sh [--sizes 0,1,16,64] [--dir DIR] [--reps 5] [--clusters 4k,8k,16k,32k,64k]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release -q -p xensnap-tests --bin bench-checkpoint
exec ./target/release/bench-checkpoint "$@"
