#!/usr/bin/env bash
# run.sh - host side of the blkback-snap real-Xen test: build, make the qcow2 image, boot the
# nested Xen test bed with main.sh in dom0, then check the image the guest wrote with the
# host's qemu-img. Exit = number of failed checks (dom0 + host), 124/125 as boot.sh.
# usage: tests/xen-nested/blkback/run.sh [--probe-only] [boot.sh options...]
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd); ROOT=$(cd "$HERE/../../.." && pwd); XN=$(dirname "$HERE")
SCRIPT=$HERE/main.sh
[ "${1:-}" = --probe-only ] && { SCRIPT=$HERE/probe.sh; shift; }
(cd "$ROOT" && cargo build --release -q -p blkback-snap && cargo build --release -q -p libxc-ffi --example xen_probe) || exit 2
W=$(mktemp -d /tmp/xsb-run.XXXX); trap 'rm -rf "$W"' EXIT
mkdir -p "$W/bins"; cp "$ROOT/target/release/blkback-snap" "$ROOT/target/release/examples/xen_probe" "$W/bins/"
qemu-img create -q -f qcow2 "$W/xsb.qcow2" 64M || exit 2
# One automatic retry, reported, when dom0 userspace segfaulted or the script hit its time
# limit (known flakes of dom0 under TCG; lib/boot-retry.sh). XSB_RETRY=0: none (ci.sh retries).
. "$XN/lib/boot-retry.sh"
P=flake; [ "${XSB_RETRY:-1}" = 1 ] || P=none
xtb_boot_retry xsb $P "$XN/boot.sh" \
  --timeout "${XSB_TIMEOUT:-600}" --bins "$W/bins" \
  --put "$ROOT/hooks/xensnap" --put "$HERE/guest-init.sh" --put "$W/xsb.qcow2" "$@" "$SCRIPT"
OUT=$RUN/share/out
if [ -f "$OUT/xsb.qcow2" ]; then
  qemu-img check "$OUT/xsb.qcow2"; c=$?
  echo "CHECK $([ $c = 0 ] && echo PASS || echo FAIL) host-qemu-img-check (rc=$c)"; [ $c = 0 ] || RC=$((RC+1))
  qemu-img snapshot -l "$OUT/xsb.qcow2"
  qemu-img snapshot -l "$OUT/xsb.qcow2" | grep -q after-write; c=$?
  echo "CHECK $([ $c = 0 ] && echo PASS || echo FAIL) host-qemu-img-sees-live-checkpoint"; [ $c = 0 ] || RC=$((RC+1))
fi
echo "run dir: $RUN (exit $RC)"
exit $RC
