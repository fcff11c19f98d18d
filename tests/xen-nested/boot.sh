#!/usr/bin/env bash
# boot.sh - boot one nested Xen host (Xen 4.17 + PV dom0 in QEMU/TCG), run a script inside
# dom0 non-interactively, collect its results, always stop QEMU. Exit code = the script's.
#
# usage: boot.sh [options] SCRIPT
#   SCRIPT            host path of a bash script to run in dom0 (as root, no stdin). It may
#                     `. "$XTB_DIR/lib/xtb.sh"` for helpers (checks, timings, PV guests).
#   --name NAME       run name / dom0 hostname (default: the script's basename)
#   --run-dir DIR     where this run's files go (default $XTB_RUNS/NAME-<time>; XTB_RUNS
#                     defaults to /var/tmp/xensnap-testbed/runs)
#   --timeout SEC     limit for the whole QEMU run (default 900); dom0 gives the script
#                     SEC-60 and then powers off, the host kills QEMU at SEC
#   --bins DIR        copy DIR's top-level executables (e.g. target/release) to dom0's /xtb/bin,
#                     which is first on the script's PATH
#   --put PATH        copy a file or directory into the share (/xtb/put/NAME); repeatable
#   --env K=V         export K=V to the script; repeatable
#   --ip A.B.C.D/NN   give dom0's eth0 this address (needs --netdev)
#   --netdev SPEC     a QEMU -netdev spec with id=n0 (e.g. dgram,...), attached as virtio-net
#   --mac MAC         MAC address of that NIC (default 52:54:00:99:00:01)
#   --mem MB          QEMU memory (default 3072)   --dom0-mem MB  (default 1024)
#   --smp N           vCPUs (default 1, env XTB_SMP)
#   --xen-args "..."  extra Xen cmdline             --dom0-args "..." extra dom0 kernel cmdline
#   --shell           interactive dom0 shell on the serial console instead of SCRIPT (debugging)
# Inside dom0: the share is /xtb (XTB_DIR); the script is /xtb/test/main.sh, helpers in
# /xtb/lib, binaries in /xtb/bin, files the script writes to $XTB_OUT (/xtb/out) come back.
# On the host: RUN_DIR/serial.log (host-timestamped serial console: Xen + dom0),
# RUN_DIR/share/out/{dom0.log,rc,xen-logs/,...}. Lines with CHECK/TIMING/XTB- are echoed live;
# XTB_VERBOSE=1 echoes the whole serial log.
# Exit: the dom0 script's exit code; 124 = time limit hit; 125 = no result (boot or
# infrastructure failure, see serial.log); 2 = usage/setup error.
# Env: XTB_CACHE (image cache, see build.sh), XTB_QEMU (default qemu-system-x86_64),
#      XTB_ACCEL=tcg|kvm (default tcg: KVM cannot run Xen on PVM hosts), XTB_TCG_THREAD=multi|single,
#      XTB_CPU (TCG cpu model, default max,-smap), XTB_QEMU_EXTRA (more QEMU args),
#      XTB_EAGER_FPU=0 (drop the default Xen option spec-ctrl=eager-fpu; only for experiments:
#      without it dom0 processes crash under TCG once a guest runs, see XEN_ARGS below)
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
NAME="" RUN="" TMO=900 BINS="" IP="" NETDEV="" MAC=52:54:00:99:00:01 MEM=3072 DOM0_MEM=1024 SMP=${XTB_SMP:-1}
XEN_EXTRA="" DOM0_EXTRA="" SHELLMODE=0 PUTS=() ENVS=()
usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2; }
while [ $# -gt 0 ]; do case $1 in
  --name) NAME=$2; shift 2;; --run-dir) RUN=$2; shift 2;; --timeout) TMO=$2; shift 2;;
  --bins) BINS=$2; shift 2;; --put) PUTS+=("$2"); shift 2;; --env) ENVS+=("$2"); shift 2;;
  --ip) IP=$2; shift 2;; --netdev) NETDEV=$2; shift 2;; --mac) MAC=$2; shift 2;;
  --mem) MEM=$2; shift 2;; --dom0-mem) DOM0_MEM=$2; shift 2;; --smp) SMP=$2; shift 2;;
  --xen-args) XEN_EXTRA=$2; shift 2;; --dom0-args) DOM0_EXTRA=$2; shift 2;;
  --shell) SHELLMODE=1; shift;; -h|--help) usage;;
  -*) echo "boot.sh: unknown option $1" >&2; exit 2;;
  *) break;; esac; done
SCRIPT=${1:-}
[ $SHELLMODE = 1 ] || [ -f "$SCRIPT" ] || { echo "boot.sh: no dom0 script given (or not a file): '$SCRIPT'" >&2; usage; }
NAME=${NAME:-$(basename "${SCRIPT:-shell}" .sh)}
IMG=$("$HERE/build.sh" --dir) || exit 2
QEMU=${XTB_QEMU:-qemu-system-x86_64}
command -v "$QEMU" >/dev/null || { echo "boot.sh: $QEMU not found (run $HERE/host-deps.sh)" >&2; exit 2; }
RUN=${RUN:-${XTB_RUNS:-/var/tmp/xensnap-testbed/runs}/$NAME-$(date +%Y%m%d-%H%M%S)-$$}
rm -rf "$RUN"; mkdir -p "$RUN/share/"{lib,test,bin,put,out}
S=$RUN/share

# ---- per-run share: helpers, the script, binaries, extra files, env
cp -r "$HERE/lib/." "$S/lib/"
[ -n "$SCRIPT" ] && cp "$SCRIPT" "$S/test/main.sh"
if [ -n "$BINS" ]; then
  n=0
  while IFS= read -r -d '' f; do cp "$f" "$S/bin/"; n=$((n+1)); done \
    < <(find "$BINS" -maxdepth 1 -type f -executable ! -name '*.so' ! -name '*.d' -print0)
  echo "boot.sh: $n binaries from $BINS -> dom0:/xtb/bin ($(ls "$S/bin" | tr '\n' ' '))"
fi
for p in "${PUTS[@]}"; do cp -r "$p" "$S/put/"; done
# each --env K=V quoted for bash (a value with spaces, e.g. XSB_PHASES="B P", stays one value)
for e in "${ENVS[@]}"; do
  [[ $e =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || { echo "boot.sh: --env wants NAME=VALUE, got '$e'" >&2; exit 2; }
done
{ echo "XTB_NAME=$NAME"; [ -n "$IP" ] && echo "XTB_IP=${IP%/*}"; for e in "${ENVS[@]}"; do printf '%s=%q\n' "${e%%=*}" "${e#*=}"; done; } > "$S/env"
cat > "$S/run.sh" <<'EOF'
# generated by boot.sh: environment for the dom0 script, then the script itself
set -a; . /xtb/env; set +a
export PATH=/xtb/bin:$PATH XTB_LIB=/xtb/lib
exec bash /xtb/test/main.sh
EOF

# ---- QEMU command line
# spec-ctrl=eager-fpu: Xen's default on this (AMD-looking) TCG CPU is LAZY FPU switching
# (CR0.TS + #NM), and under QEMU TCG that corrupts dom0's vector registers as soon as a second
# domain runs: a dom0 program holding fixed values in ymm0-15 saw them change in 343 of 46673
# checks while a PV guest ran (0 with eager-fpu, 0 before the guest existed). glibc keeps
# pointers in xmm registers (memcpy, malloc), which is where the "segfault at 10"/GP crashes of
# processes around xl create/restore came from. XTB_EAGER_FPU=0 turns it off (for experiments).
XEN_FPU=""; [ "${XTB_EAGER_FPU:-1}" = 0 ] || XEN_FPU="spec-ctrl=eager-fpu"
XEN_ARGS="console=com1 com1=115200 dom0_mem=${DOM0_MEM}M,max:${DOM0_MEM}M dom0_max_vcpus=$SMP loglvl=all guest_loglvl=all $XEN_FPU $XEN_EXTRA"
# (no commas in the dom0 line: QEMU's -initrd separates multiboot modules with ',')
DOM0_ARGS="root=/dev/vda ro console=hvc0 earlyprintk=xen init=/usr/local/sbin/xtb-init xtb.hostname=$NAME xtb.timeout=$((TMO > 120 ? TMO - 60 : TMO * 2 / 3))"
[ -n "$IP" ] && DOM0_ARGS="$DOM0_ARGS xtb.ip=$IP"
[ $SHELLMODE = 1 ] && DOM0_ARGS="$DOM0_ARGS xtb.shell=1"
DOM0_ARGS="$DOM0_ARGS $DOM0_EXTRA"
case ${XTB_ACCEL:-tcg} in
  kvm) ACCEL=(-accel kvm -cpu host,-arch-capabilities);;   # only with real nested VMX/SVM (untested)
  *)   # -smap: bookworm's QEMU 7.2 TCG mis-emulates SMAP for a PV dom0 (#PF at its first instruction).
       # (the dom0 crashes around xl create/restore were lazy FPU switching, see XEN_ARGS above)
       ACCEL=(-accel "tcg,thread=${XTB_TCG_THREAD:-multi},tb-size=512" -cpu "${XTB_CPU:-max,-smap}");;
esac
NET=(-nic none)
[ -n "$NETDEV" ] && NET=(-netdev "$NETDEV" -device "virtio-net-pci,netdev=n0,mac=$MAC")
# dom0's disk: a throw-away qcow2 overlay on the cached raw image (never modified)
qemu-img create -q -f qcow2 -b "$IMG/dom0.img" -F raw "$RUN/dom0-overlay.qcow2" || exit 2
CMD=("$QEMU" "${ACCEL[@]}" -m "$MEM" -smp "$SMP" -nographic -no-reboot -monitor none -serial stdio
     -pidfile "$RUN/qemu.pid" -name "xtb-$NAME"
     -kernel "$IMG/xen" -append "$XEN_ARGS"
     -initrd "$IMG/vmlinuz $DOM0_ARGS,$IMG/initrd.img"
     -drive "file=$RUN/dom0-overlay.qcow2,format=qcow2,if=virtio,cache=unsafe"
     -virtfs "local,path=$S,mount_tag=xtb,security_model=none,id=xtb"
     "${NET[@]}")
# shellcheck disable=SC2206
[ -n "${XTB_QEMU_EXTRA:-}" ] && CMD+=(${XTB_QEMU_EXTRA})
printf '%q ' "${CMD[@]}" > "$RUN/qemu-cmdline"; echo >> "$RUN/qemu-cmdline"

# ---- run it; whatever happens, QEMU is stopped when this script ends
QPID=""
stop_qemu() {
  trap '' PIPE                        # our reader may be gone already: never die before the kill
  local p t; t=$(cat "$RUN/timeout.pid" 2>/dev/null)
  # before QEMU wrote its pidfile: TERM to `timeout` is passed on to QEMU
  [ -n "$t" ] && grep -qa "xtb-$NAME" "/proc/$t/cmdline" 2>/dev/null && kill -TERM "$t" 2>/dev/null
  rm -f "$RUN/timeout.pid"
  p=$(cat "$RUN/qemu.pid" 2>/dev/null) || return 0
  if [ -n "$p" ] && grep -qa "xtb-$NAME" "/proc/$p/cmdline" 2>/dev/null; then
    kill -TERM "$p" 2>/dev/null; for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$p" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$p" 2>/dev/null
    echo "boot.sh[$NAME]: stopped QEMU pid $p" 2>/dev/null
  fi
  rm -f "$RUN/qemu.pid"
}
trap 'stop_qemu' EXIT
trap 'stop_qemu; echo "boot.sh[$NAME]: interrupted" 2>/dev/null; exit 130' INT TERM HUP
T0=${EPOCHREALTIME/./}
echo "boot.sh[$NAME]: run dir $RUN, limit ${TMO}s, $("$QEMU" --version | head -1), accel ${XTB_ACCEL:-tcg}"
if [ $SHELLMODE = 1 ]; then "${CMD[@]}"; exit $?; fi
# `timeout` is a second safety net: it stops QEMU even if this script is SIGKILLed. The
# pipeline runs in the background so that a signal to this script runs its trap at once.
( timeout -k 10 "$TMO" "${CMD[@]}" </dev/null 2>&1 & echo $! > "$RUN/timeout.pid"; wait $!
  echo "XTB-HOST qemu exited rc=$?" ) | \
  while IFS= read -r line; do
    d=$(( ${EPOCHREALTIME/./} - T0 ))
    line="[$(printf '%4d.%02d' $((d/1000000)) $(( (d%1000000)/10000 )))] ${line//$'\r'/}"
    printf '%s\n' "$line" >> "$RUN/serial.log"
    if [ "${XTB_VERBOSE:-0}" = 1 ]; then printf '%s\n' "$line"
    else case $line in *CHECK\ *|*TIMING\ *|*XTB-*|*INFO\ *|*ABORT:*|*Panic*|*panic*|*"Hardware Dom0 crashed"*|*segfault*) printf '[%s] %s\n' "$NAME" "$line";; esac
    fi
  done &
wait $!
stop_qemu
[ "${XTB_KEEP_OVERLAY:-0}" = 1 ] || rm -f "$RUN/dom0-overlay.qcow2"   # dom0's writes (save files...): not needed
# ---- result
stamp() { grep -a -m1 -F "$1" "$RUN/serial.log" | sed -n 's/^\[ *\([0-9.]*\)\].*/\1/p'; }
RC=$(cat "$S/out/rc" 2>/dev/null) || RC=$(grep -a -o 'XTB-RESULT rc=[0-9]*' "$RUN/serial.log" | tail -1 | cut -d= -f2)
QRC=$(grep -a -o 'XTB-HOST qemu exited rc=[0-9]*' "$RUN/serial.log" | tail -1 | cut -d= -f2)
if [ -z "$RC" ]; then
  if [ "$QRC" = 124 ] || [ "$QRC" = 137 ]; then RC=124; echo "boot.sh[$NAME]: FAIL: QEMU hit the ${TMO}s limit without a result"
  else RC=125; echo "boot.sh[$NAME]: FAIL: no result from dom0 (QEMU rc=$QRC)"; fi
  echo "----- last 60 serial lines ($RUN/serial.log)"; tail -60 "$RUN/serial.log"; echo "-----"
fi
for m in "Linux version:dom0-kernel" "XTB-DOM0-USERSPACE:dom0-init" "XTB-DOM0-READY:dom0-ready" "XTB-RESULT:script-done" "XTB-HOST qemu exited:qemu-exit"; do
  t=$(stamp "${m%%:*}"); [ -n "$t" ] && echo "TIMING [$NAME] boot-${m##*:} $t"
done
NP=$(grep -a -c 'CHECK PASS' "$S/out/dom0.log" 2>/dev/null); NF=$(grep -a -c 'CHECK FAIL' "$S/out/dom0.log" 2>/dev/null)
echo "boot.sh[$NAME]: rc=$RC checks passed=${NP:-0} failed=${NF:-0}; results in $S/out, serial log $RUN/serial.log"
exit "$RC"
