#!/usr/bin/env bash
# The one test command: installs what the tests need (apt, cargo tools), then runs every suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# formatting (rustfmt.toml): a check, not a rewrite; a toolchain without rustfmt skips it, loudly
if cargo fmt --version >/dev/null 2>&1; then
  cargo fmt --all -- --check
else
  echo "test: rustfmt is not installed; formatting not checked" >&2
fi
cargo nextest run --workspace --no-fail-fast
./tests/xen-nested/lib/boot-retry-test.sh   # the test bed's boot-and-retry rule, with a fake boot (no Xen)
# Nested Xen 4.17 test bed: required by default, so a run that could not test against real
# Xen is a failure, not a quiet pass; XENSNAP_TESTBED=auto lets it skip (loudly) on a machine
# that cannot run it (not root, < 6 GB free memory, QEMU not installable), =skip skips it.
XENSNAP_TESTBED=${XENSNAP_TESTBED:-required} ./tests/xen-nested/ci.sh
