#!/usr/bin/env bash
# run.sh - host side of the xl-snap checkpoint test: build blkback-snap + xl-snap, the guest
# checker and a 1 GiB qcow2, boot the nested test bed with main.sh in dom0.
# usage: tests/xen-nested/checkpoint/run.sh [boot.sh options...]   env: CK_ROUNDS CK_NEG CK_BENCH
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd); ROOT=$(cd "$HERE/../../.." && pwd); XN=$(dirname "$HERE")
(cd "$ROOT" && cargo build --release -q -p blkback-snap -p xl-plugin) || exit 2
W=$(mktemp -d /tmp/ck-run.XXXX); trap 'rm -rf "$W"' EXIT
mkdir -p "$W/bins"; cp "$ROOT/target/release/blkback-snap" "$ROOT/target/release/xl-snap" "$W/bins/"
gcc -O2 -static -o "$W/checker" "$HERE/checker.c" || exit 2
qemu-img create -q -f qcow2 "$W/ck.qcow2" 1G || exit 2
RUN=${XTB_RUNS:-/var/tmp/xensnap-testbed/runs}/ck-$(date +%Y%m%d-%H%M%S)-$$
"$XN/boot.sh" --name ck --run-dir "$RUN" --timeout "${CK_TIMEOUT:-1500}" --bins "$W/bins" \
  --put "$ROOT/hooks/xensnap" --put "$HERE/guest-init.sh" --put "$W/checker" --put "$W/ck.qcow2" \
  --env CK_ROUNDS="${CK_ROUNDS:-20}" --env CK_NEG="${CK_NEG:-3}" --env CK_BENCH="${CK_BENCH:-5}" \
  --env CK_NEG_BEFORE_MS="${CK_NEG_BEFORE_MS:-1500}" --env CK_REVERT_MIN_GAP_MS="${CK_REVERT_MIN_GAP_MS:-5000}" "$@" "$HERE/main.sh"
RC=$?
echo "run dir: $RUN (exit $RC)"
exit $RC
