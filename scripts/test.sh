#!/usr/bin/env bash
# The one test command: installs what the tests need (apt, cargo tools), then runs every suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo nextest run --workspace --no-fail-fast
