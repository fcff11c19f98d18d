# boot-retry.sh - HOST-side helper (unlike xtb.sh, which runs in dom0; boot.sh copies this
# directory into the share anyway, where nothing uses it) for the suites' run.sh scripts: boot
# the test bed, and boot it once more, reported, when the first attempt failed in a known-flaky
# way. Source it:
#     . "$XN/lib/boot-retry.sh"          # XN = tests/xen-nested
# Tested without Xen by lib/boot-retry-test.sh.

# xtb_boot_retry NAME POLICY BOOT [ARGS...]
#   runs `BOOT --name NAME --run-dir DIR ARGS...` (BOOT: boot.sh, or a fake in tests), DIR being
#   a new $XTB_RUNS/NAME-<date>-<pid> per attempt (XTB_RUNS defaults to
#   /var/tmp/xensnap-testbed/runs), so both attempts keep their run directory and logs.
#   POLICY says when attempt 1's failure is retried:
#     flake      a dom0 userspace segfault ('segfault at' in its serial.log) or the time limit
#                (rc 124: dom0's limit for the script, or QEMU's) - the known flakes of dom0
#                under TCG (see /work/shared/testbed/NOTES.md; seen: xl segfaulting in libc, a
#                `date +%s` spinning for minutes in state R)
#     no-result  only a boot that gave no result: rc 124 (time limit) or 125 (boot/infra failure);
#                a failed check is a result and is not retried
#     none       never (e.g. when the caller, like ci.sh, retries on its own)
#   A retry is announced, never hidden, with this line (other tooling greps it):
#     INFO NAME: attempt 1 failed (rc=RC): <first 'segfault at'/'hit its' line of serial.log>; retrying once
# Sets RUN (the last attempt's run dir) and RC (its exit code: boot.sh's, 124/125 included);
# returns RC.
xtb_boot_retry() {
  local name=$1 policy=$2 boot=$3 attempt retry; shift 3
  case $policy in flake|no-result|none) ;; *) echo "xtb_boot_retry: unknown policy '$policy'" >&2; RC=2; return 2;; esac
  for attempt in 1 2; do
    RUN=${XTB_RUNS:-/var/tmp/xensnap-testbed/runs}/$name-$(date +%Y%m%d-%H%M%S)-$$
    # a quick failure could get attempt 1's name again, and boot.sh empties its run dir first
    while [ -e "$RUN" ]; do sleep 1; RUN=${XTB_RUNS:-/var/tmp/xensnap-testbed/runs}/$name-$(date +%Y%m%d-%H%M%S)-$$; done
    "$boot" --name "$name" --run-dir "$RUN" "$@"
    RC=$?
    [ "$RC" = 0 ] && break
    [ "$attempt" = 1 ] || break
    case $policy in
      flake)     grep -aq 'segfault at' "$RUN/serial.log" 2>/dev/null || [ "$RC" = 124 ]; retry=$?;;
      no-result) [ "$RC" = 124 ] || [ "$RC" = 125 ]; retry=$?;;
      *)         retry=1;;
    esac
    [ "$retry" = 0 ] || break
    echo "INFO $name: attempt 1 failed (rc=$RC): $(grep -a -m1 'segfault at\|hit its' "$RUN/serial.log" 2>/dev/null | cut -c1-160); retrying once"
  done
  return "$RC"
}
