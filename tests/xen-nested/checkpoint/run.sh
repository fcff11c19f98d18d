#!/usr/bin/env bash
# run.sh - host side of the xl-snap checkpoint test: build blkback-snap + xl-snap, the guest
# checker, dom0's record scanner and a 1 GiB qcow2, boot the nested test bed with main.sh in dom0.
# usage: tests/xen-nested/checkpoint/run.sh [boot.sh options...]
# env: CK_ROUNDS (20) CK_NEG (3) CK_BENCH (5) CK_NEG_BEFORE_MS (1500) CK_NEG_MIN_WRITES (3)
#      CK_TIMEOUT (1500 s) CK_SMP (1: vCPUs of the nested host = dom0's vCPUs)
#      CK_RETRY (1: one reported retry of a boot that gave no result, rc 124/125; 0: none)
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd); ROOT=$(cd "$HERE/../../.." && pwd); XN=$(dirname "$HERE")
T0=$(date +%s)
(cd "$ROOT" && cargo build --release -q -p blkback-snap -p xl-plugin) || exit 2
W=$(mktemp -d /tmp/ck-run.XXXX); trap 'rm -rf "$W"' EXIT
mkdir -p "$W/bins"; cp "$ROOT/target/release/blkback-snap" "$ROOT/target/release/xl-snap" "$W/bins/"
gcc -O2 -static -o "$W/checker" "$HERE/checker.c" || exit 2
gcc -O2 -static -o "$W/ckscan" "$HERE/ckscan.c" || exit 2
qemu-img create -q -f qcow2 "$W/ck.qcow2" 1G || exit 2
echo "checkpoint suite: host load before: $(uptime)"
# One reported retry, but only of a boot that gave no result (time limit 124, boot failure 125;
# lib/boot-retry.sh): a failed check is a result of this suite and is never retried, and dom0
# crashes of xl-snap steps are already retried once inside dom0 (main.sh retry1).
# CK_RETRY=0: none (ci.sh retries on its own).
. "$XN/lib/boot-retry.sh"
P=no-result; [ "${CK_RETRY:-1}" = 1 ] || P=none
xtb_boot_retry ck $P "$XN/boot.sh" --timeout "${CK_TIMEOUT:-1500}" --bins "$W/bins" --smp "${CK_SMP:-1}" \
  --put "$ROOT/hooks/xensnap" --put "$HERE/guest-init.sh" --put "$W/checker" --put "$W/ckscan" --put "$W/ck.qcow2" \
  --env CK_ROUNDS="${CK_ROUNDS:-20}" --env CK_NEG="${CK_NEG:-3}" --env CK_BENCH="${CK_BENCH:-5}" \
  --env CK_NEG_BEFORE_MS="${CK_NEG_BEFORE_MS:-1500}" --env CK_NEG_MIN_WRITES="${CK_NEG_MIN_WRITES:-3}" \
  --env CK_REVERT_MIN_GAP_MS="${CK_REVERT_MIN_GAP_MS:-5000}" "$@" "$HERE/main.sh"
echo "checkpoint suite: host load after: $(uptime)"
grep -a -h '^DOWNTIME\|^DISK-BARRIER' "$RUN/share/out/bench.txt" 2>/dev/null
[ -s "$RUN/share/out/bench.txt" ] && "$HERE/bench-stats.sh" "$RUN/share/out/bench.txt" | sed 's/^/BENCH-STATS /'
echo "TIMING checkpoint-suite $(( $(date +%s) - T0 ))"
echo "run dir: $RUN (exit $RC)"
exit $RC
