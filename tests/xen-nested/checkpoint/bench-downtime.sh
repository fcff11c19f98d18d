#!/usr/bin/env bash
# bench-downtime.sh - the downtime benchmark alone: CK_BENCH (30) interleaved pairs of `xl save -c`
# and `xl-snap checkpoint` of the same domain (order alternating), no checkpoint/revert rounds and
# no negative control; run.sh prints bench-stats.sh's summary (medians, per-pair ratio with its
# 95 % CI, bootstrap, xl-snap's direct bound). Same options as run.sh; run it under the VM lock:
#   flock /var/tmp/xensnap-vm.lock tests/xen-nested/checkpoint/bench-downtime.sh
# ~40 pairs in 15 min under TCG (each pair ~14 s after a ~4 min boot and setup).
HERE=$(cd "$(dirname "$0")" && pwd)
CK_ROUNDS=0 CK_NEG=0 CK_BENCH=${CK_BENCH:-30} exec "$HERE/run.sh" "$@"
