#!/usr/bin/env bash
# pair.sh - boot TWO nested Xen hosts at once, linked by a private network, and run a dom0
# script on each (for migration/Remus-style tests). Exit 0 only if both scripts exit 0.
#
# usage: pair.sh [options] SCRIPT_A [SCRIPT_B]
#   SCRIPT_B defaults to SCRIPT_A; each script sees XTB_ROLE=a|b, XTB_IP (its own address),
#   XTB_PEER (the other dom0's address) and XTB_PEER_NAME.
#   --name NAME     run name prefix (default: pair); the hosts are NAME-a and NAME-b
#   --timeout SEC   limit per host (default 1200)
#   --bins DIR      project binaries for both dom0s (see boot.sh)
#   --smp N --mem MB   per host (default 1 vCPU, 2048 MB: two TCG machines share the cores)
#   other options (--put, --env, --dom0-mem, --xen-args, --dom0-args) are passed to both hosts.
# Network: QEMU `-netdev dgram` - each host's virtio NIC sends UDP datagrams to the other
# QEMU on 127.0.0.1 (two free local ports), so the link exists on this machine only; there is
# no route to anything else. Inside: eth0 10.99.0.1/24 (a) and 10.99.0.2/24 (b).
# Results: the two run dirs printed at the end (RUN/share/out, RUN/serial.log).
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
NAME=pair TMO=1200 SMP=1 MEM=2048 PASS=()
while [ $# -gt 0 ]; do case $1 in
  --name) NAME=$2; shift 2;; --timeout) TMO=$2; shift 2;; --smp) SMP=$2; shift 2;; --mem) MEM=$2; shift 2;;
  --bins|--put|--env|--dom0-mem|--xen-args|--dom0-args) PASS+=("$1" "$2"); shift 2;;
  -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2;;
  -*) echo "pair.sh: unknown option $1" >&2; exit 2;;
  *) break;; esac; done
A=${1:?usage: pair.sh [options] SCRIPT_A [SCRIPT_B]}; B=${2:-$1}
"$HERE/build.sh" --dir >/dev/null || exit 2
free_udp_port() {  # a random local UDP port nobody listens on
  local p; while :; do p=$(( 20000 + RANDOM % 40000 )); ss -Hlun "sport = :$p" 2>/dev/null | grep -q . || { echo $p; return; }; done
}
PA=$(free_udp_port); PB=$(free_udp_port); while [ "$PB" = "$PA" ]; do PB=$(free_udp_port); done
net() { echo "dgram,id=n0,local.type=inet,local.host=127.0.0.1,local.port=$1,remote.type=inet,remote.host=127.0.0.1,remote.port=$2"; }
RUNS=${XTB_RUNS:-/var/tmp/xensnap-testbed/runs}; STAMP=$(date +%Y%m%d-%H%M%S)-$$
RA=$RUNS/$NAME-a-$STAMP RB=$RUNS/$NAME-b-$STAMP
echo "pair.sh: $NAME-a 10.99.0.1 (udp 127.0.0.1:$PA) <-> $NAME-b 10.99.0.2 (udp 127.0.0.1:$PB)"
PIDS=()
cleanup() { local p; for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done; for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done; }
trap 'echo "pair.sh: interrupted"; cleanup; exit 130' INT TERM HUP
trap cleanup EXIT
"$HERE/boot.sh" --name "$NAME-a" --run-dir "$RA" --timeout "$TMO" --smp "$SMP" --mem "$MEM" "${PASS[@]}" \
    --netdev "$(net "$PA" "$PB")" --mac 52:54:00:99:00:01 --ip 10.99.0.1/24 \
    --env XTB_ROLE=a --env XTB_PEER=10.99.0.2 --env "XTB_PEER_NAME=$NAME-b" "$A" &
PIDS+=($!)
"$HERE/boot.sh" --name "$NAME-b" --run-dir "$RB" --timeout "$TMO" --smp "$SMP" --mem "$MEM" "${PASS[@]}" \
    --netdev "$(net "$PB" "$PA")" --mac 52:54:00:99:00:02 --ip 10.99.0.2/24 \
    --env XTB_ROLE=b --env XTB_PEER=10.99.0.1 --env "XTB_PEER_NAME=$NAME-a" "$B" &
PIDS+=($!)
# if one host fails, the other gets 120 s to finish (its peer waits would time out anyway)
declare -A RC
LEFT=("${PIDS[@]}")
while [ ${#LEFT[@]} -gt 0 ]; do
  wait -n -p done_pid "${LEFT[@]}"; rc=$?
  RC[$done_pid]=$rc
  LEFT=(); for p in "${PIDS[@]}"; do [ -n "${RC[$p]:-}" ] || LEFT+=("$p"); done
  if [ "$rc" != 0 ] && [ ${#RC[@]} = 1 ]; then
    other=${PIDS[0]}; [ "$other" = "$done_pid" ] && other=${PIDS[1]}
    for _ in $(seq 120); do kill -0 "$other" 2>/dev/null || break; sleep 1; done
    kill -0 "$other" 2>/dev/null && { echo "pair.sh: stopping the other host (its peer failed)"; kill -TERM "$other"; }
  fi
done
RCA=${RC[${PIDS[0]}]} RCB=${RC[${PIDS[1]}]}
PIDS=()
echo "pair.sh: $NAME-a rc=$RCA ($RA), $NAME-b rc=$RCB ($RB)"
[ "$RCA" != 0 ] && exit "$RCA"
exit "$RCB"
