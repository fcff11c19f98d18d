#!/usr/bin/env bash
# Disk-checkpoint and 4 KiB I/O numbers, xensnap next to qemu-img, from one run.
#   ./scripts/bench-image.sh [--sizes 1,16] [--dir DIR] [--reps 3]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release -q -p xl-plugin -p xensnap-tests --bins
exec ./target/release/bench-image --xl-snap target/release/xl-snap "$@"
