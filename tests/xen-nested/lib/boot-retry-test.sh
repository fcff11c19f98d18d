#!/usr/bin/env bash
# boot-retry-test.sh - tests xtb_boot_retry (boot-retry.sh) with a fake boot.sh, without Xen,
# QEMU or root: each fake attempt writes a serial.log and exits with a scripted code.
# usage: tests/xen-nested/lib/boot-retry-test.sh   (exit = number of failed checks)
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/boot-retry.sh"
T=$(mktemp -d /tmp/boot-retry-test.XXXX); trap 'rm -rf "$T"' EXIT
export XTB_RUNS=$T/runs FAKE_DIR=$T
# the fake boot.sh: attempt N takes line N of $FAKE_DIR/plan ("RC SERIAL-LINE"), records its
# arguments, writes RUN_DIR/serial.log like boot.sh (host timestamps) and exits RC
cat > "$T/fake-boot.sh" <<'EOF'
#!/usr/bin/env bash
n=$(( $(cat "$FAKE_DIR/count" 2>/dev/null || echo 0) + 1 )); echo $n > "$FAKE_DIR/count"
[ "$1" = --name ] && [ "$3" = --run-dir ] || { echo "fake-boot: unexpected args: $*"; exit 2; }
RUN=$4; rm -rf "$RUN"; mkdir -p "$RUN/share/out"
printf '%s\n' "$@" > "$RUN/args"; printf '%s\n' "$@" > "$FAKE_DIR/args.$n"
read -r rc line < <(sed -n "${n}p" "$FAKE_DIR/plan")
{ echo "[   0.10] Xen 4.17 booting"; [ -n "$line" ] && echo "[ 100.00] $line"; echo "[ 101.00] XTB-HOST qemu exited rc=0"; } > "$RUN/serial.log"
echo "fake-boot[$2]: attempt $n rc=$rc run dir $RUN"
exit "$rc"
EOF
chmod +x "$T/fake-boot.sh"
FAILS=0 PASSES=0
check() { if eval "$2"; then echo "CHECK PASS $1"; PASSES=$((PASSES+1)); else echo "CHECK FAIL $1 ($2)"; FAILS=$((FAILS+1)); fi; }
# scenario NAME POLICY PLAN-LINES...: run xtb_boot_retry with the fake; sets OUT, ATTEMPTS, RUNS
scenario() {
  local name=$1 policy=$2; shift 2
  echo; echo "===== $name (policy $policy)"
  rm -rf "$T/runs" "$T/count" "$T"/args.*; printf '%s\n' "$@" > "$T/plan"
  RUN="" RC=""
  xtb_boot_retry xt "$policy" "$T/fake-boot.sh" --timeout 600 --bins "$T/bins" --put "$T/a b.qcow2" --env K=v "$T/main.sh" > "$T/out" 2>&1
  RET=$?
  sed 's/^/  | /' "$T/out"
  OUT=$(cat "$T/out"); ATTEMPTS=$(cat "$T/count" 2>/dev/null || echo 0); RUNS=$(ls "$T/runs" 2>/dev/null | wc -l)
}
SEGV='xl[1234]: segfault at 10 ip 00007f0000001234 sp 00007ffc00000000 error 4 in libc.so.6'
LIMIT='XTB-FAIL run.sh hit its 540s limit; processes (D = stuck in the kernel):'

scenario "dom0 segfault, then a pass" flake "3 $SEGV" "0"
check retried-once '[ "$ATTEMPTS" = 2 ]'
check rc-of-attempt-2 '[ "$RC" = 0 ] && [ "$RET" = 0 ]'
check info-line '[[ $OUT == *"INFO xt: attempt 1 failed (rc=3): [ 100.00] xl[1234]: segfault at 10 ip 00007f0000001234 sp 00007ffc00000000 error 4 in libc.so.6; retrying once"* ]]'
check two-run-dirs-kept '[ "$RUNS" = 2 ] && [ "$(ls "$T"/runs/xt-*/serial.log | wc -l)" = 2 ]'
check run-is-attempt-2 '[ "$RUN" = "$(grep -x -A1 -- --run-dir "$T/args.2" | tail -1)" ] && [ "$RUN" != "$(grep -x -A1 -- --run-dir "$T/args.1" | tail -1)" ]'
check run-dir-name '[[ ${RUN#"$T"/runs/} =~ ^xt-[0-9]{8}-[0-9]{6}-$$$ ]]'
check args-passed-both '[ "$(tail -n +5 "$T/args.1")" = "$(printf "%s\n" --timeout 600 --bins "$T/bins" --put "$T/a b.qcow2" --env K=v "$T/main.sh")" ] && cmp -s <(tail -n +5 "$T/args.1") <(tail -n +5 "$T/args.2")'

scenario "a failed check, no crash: no retry" flake "5 CHECK FAIL guest-data-matches"
check not-retried '[ "$ATTEMPTS" = 1 ] && [ "$RUNS" = 1 ]'
check rc-kept '[ "$RC" = 5 ] && [ "$RET" = 5 ]'
check no-info-line '[[ $OUT != *"retrying once"* ]]'

scenario "time limit twice: one retry only, 124 kept" flake "124 $LIMIT" "124 $LIMIT" "0"
check retried-once '[ "$ATTEMPTS" = 2 ] && [ "$RUNS" = 2 ]'
check rc-124 '[ "$RC" = 124 ] && [ "$RET" = 124 ]'
check info-line '[[ $OUT == *"INFO xt: attempt 1 failed (rc=124): [ 100.00] XTB-FAIL run.sh hit its 540s limit; processes (D = stuck in the kernel):; retrying once"* ]]'

scenario "QEMU killed at its limit (124, no dom0 line)" flake "124" "0"
check retried '[ "$ATTEMPTS" = 2 ] && [ "$RC" = 0 ]'
check info-line '[[ $OUT == *"INFO xt: attempt 1 failed (rc=124): ; retrying once"* ]]'

scenario "no result (125) without a segfault: flake policy does not retry" flake "125"
check not-retried '[ "$ATTEMPTS" = 1 ] && [ "$RC" = 125 ]'

scenario "segfault, then a failed check: rc of attempt 2" flake "3 $SEGV" "4 CHECK FAIL x"
check rc-of-attempt-2 '[ "$ATTEMPTS" = 2 ] && [ "$RC" = 4 ]'

scenario "XSB_RETRY=0 (none): no retry even after a segfault" none "3 $SEGV" "0"
check not-retried '[ "$ATTEMPTS" = 1 ] && [ "$RC" = 3 ]'
check no-info-line '[[ $OUT != *"retrying once"* ]]'

scenario "checkpoint (no-result): boot failure 125 retried" no-result "125" "0"
check retried '[ "$ATTEMPTS" = 2 ] && [ "$RC" = 0 ]'
check info-line '[[ $OUT == *"INFO xt: attempt 1 failed (rc=125): ; retrying once"* ]]'

scenario "checkpoint (no-result): time limit retried" no-result "124 $LIMIT" "7"
check retried '[ "$ATTEMPTS" = 2 ] && [ "$RC" = 7 ]'

scenario "checkpoint (no-result): failed check after a dom0 segfault is not retried" no-result "2 $SEGV" "0"
check not-retried '[ "$ATTEMPTS" = 1 ] && [ "$RC" = 2 ]'
check no-info-line '[[ $OUT != *"retrying once"* ]]'

scenario "unknown policy" sometimes "0"
check refused '[ "$RET" = 2 ] && [ "$RC" = 2 ] && [ "$ATTEMPTS" = 0 ]'

echo; echo "boot-retry-test: $PASSES checks passed, $FAILS failed"
exit "$FAILS"
