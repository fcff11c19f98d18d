#!/usr/bin/env bash
# The one test command: installs what the tests need (apt, cargo tools), then runs every suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo nextest run --workspace --no-fail-fast
./tests/xen-nested/lib/boot-retry-test.sh   # the test bed's boot-and-retry rule, with a fake boot (no Xen)
./tests/xen-nested/ci.sh   # nested Xen 4.17 test bed: SKIPPED (loudly) where it cannot run; XENSNAP_TESTBED=required makes that a failure
