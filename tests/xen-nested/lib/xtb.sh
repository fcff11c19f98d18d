# xtb.sh - helpers for scripts that run inside the test bed's dom0. Source it:
#     . "$XTB_LIB/xtb.sh"
# Output conventions the host greps (boot.sh echoes them live, ci.sh counts them):
#   CHECK PASS|FAIL <name> [detail]      one per check; xtb_finish exits with the number failed
#   TIMING <name> <seconds>              measured durations
#   INFO <text>                          anything worth seeing in the CI log
# Also appended to $XTB_OUT/checks.txt and $XTB_OUT/timings.txt.
export PATH=/xtb/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/usr/lib/xen-4.17/bin
XTB_OUT=${XTB_OUT:-/xtb/out}; mkdir -p "$XTB_OUT"
XTB_FAILS=0 XTB_PASSES=0
XTB_GUESTDIR=/var/lib/xtb; mkdir -p "$XTB_GUESTDIR" /var/lib/xen/save

# time = dom0 uptime (monotonic); dom0's wall clock can jump by minutes under TCG
# (builtins only: forked helpers occasionally crash under TCG while xl creates/restores a domain)
xtb_now()     { local u; read -r u _ < /proc/uptime; echo "$u"; }
xtb_upsec()   { local u; read -r u _ < /proc/uptime; echo "${u%.*}"; }
xtb_since()   { awk -v a="$1" -v b="$(xtb_now)" 'BEGIN{printf "%.1f", b-a}'; }
xtb_info()    { echo "INFO $*"; }
xtb_timing()  { echo "TIMING $1 $2"; echo "$1 $2" >> "$XTB_OUT/timings.txt"; }
xtb_section() { echo; echo "===== $* ====="; }
# xtb_check NAME RC [DETAIL...]: RC 0 = pass
xtb_check() {
  local n=$1 rc=$2; shift 2
  if [ "$rc" = 0 ]; then echo "CHECK PASS $n${*:+ ($*)}"; XTB_PASSES=$((XTB_PASSES+1)); echo "PASS $n" >> "$XTB_OUT/checks.txt"
  else echo "CHECK FAIL $n (rc=$rc)${*:+ ($*)}"; XTB_FAILS=$((XTB_FAILS+1)); echo "FAIL $n" >> "$XTB_OUT/checks.txt"; fi
  return "$rc"
}
# xtb_limit LIMIT CMD...: run CMD (in the background) for at most LIMIT seconds; rc 124 when
# it had to be stopped. Unlike timeout(1) it does not wait for a process stuck in the kernel
# (D state) to die: it reports it (ps, kernel stack) and moves on.
xtb_limit() {
  local lim=$1 pid end u; shift
  "$@" & pid=$!
  read -r u _ < /proc/uptime; end=$(( ${u%.*} + lim ))
  while kill -0 $pid 2>/dev/null; do
    read -r u _ < /proc/uptime
    if [ "${u%.*}" -ge $end ]; then
      echo "  TIME LIMIT ${lim}s hit: $*"; ps -o pid,stat,wchan:28,etime,args --ppid $pid -p $pid
      grep -q '^State:.*D' /proc/$pid/status 2>/dev/null && { echo "  stuck in the kernel:"; cat /proc/$pid/stack; }
      kill -TERM $pid 2>/dev/null; sleep 3; kill -KILL $pid 2>/dev/null; sleep 1
      kill -0 $pid 2>/dev/null && echo "  (still there after SIGKILL: left behind)"
      return 124
    fi
    sleep 0.2
  done
  wait $pid
}
# xtb_step NAME LIMIT CMD...: run CMD with a time limit, print its TIMING and CHECK
xtb_step() {
  local n=$1 lim=$2 t rc; shift 2
  t=$(xtb_now); xtb_limit "$lim" "$@"; rc=$?
  xtb_timing "$n" "$(xtb_since "$t")"
  xtb_check "$n" $rc
}
# xtb_wait LIMIT CMD...: retry CMD every 0.2 s until it succeeds (0) or LIMIT seconds pass (1)
xtb_wait() {
  local lim=$1 end u; shift; read -r u _ < /proc/uptime; end=$(( ${u%.*} + lim ))
  until "$@" >/dev/null 2>&1; do read -r u _ < /proc/uptime; [ "${u%.*}" -ge $end ] && return 1; sleep 0.2; done
}
# xtb_wait_text SECONDS FILE TEXT: like `xtb_wait SECONDS grep -aqF TEXT FILE`, without a process
# per poll (bash reads the file on from where it stopped and naps on a pipe with `read -t`):
# a fork and exec every 0.2 s costs a PV dom0 under TCG a large share of its CPU, which is
# wrong while a benchmark runs. 0 when a line holding TEXT is in FILE, 1 at the time limit.
xtb_wait_text() {
  local lim=$1 f=$2 pat=$3 end u fd= nap line part= rc=1
  read -r u _ < /proc/uptime; end=$(( ${u%.*} + lim ))
  exec {nap}<> <(:)
  while :; do
    if [ -z "$fd" ] && [ -r "$f" ]; then exec {fd}< "$f"; fi
    if [ -n "$fd" ]; then
      # whole lines; a last line without its newline yet is kept and completed next time
      while IFS= read -r -u "$fd" line; do
        line=$part$line part=
        [[ $line == *"$pat"* ]] && { rc=0; break 2; }
      done 2>/dev/null
      part+=$line
      [[ $part == *"$pat"* ]] && { rc=0; break; }
    fi
    read -r u _ < /proc/uptime; [ "${u%.*}" -ge $end ] && break
    read -r -t 0.2 -u "$nap" _
  done
  [ -n "$fd" ] && exec {fd}<&-
  exec {nap}<&-
  return $rc
}
# xtb_abort WHY: stop the script here (later steps depend on this one): summary + exit
xtb_abort() {
  echo "ABORT: $* - skipping the rest of this script"
  xl list 2>/dev/null; local c; for c in /var/log/xen/console/guest-*.log; do [ -f "$c" ] && { echo "--- $c:"; tail -5 "$c"; }; done
  xtb_finish
}
xtb_finish() {
  xtb_section "summary: $XTB_PASSES checks passed, $XTB_FAILS failed"
  exit "$XTB_FAILS"
}

# ---- the test bed's PV guest (busybox; see image/guest-init.sh) ----
# console log of guest NAME (xenconsoled --log=guest)
xtb_console() { echo "/var/log/xen/console/guest-$1.log"; }
# xtb_guest_cfg NAME [DISK] : write /var/lib/xtb/NAME.cfg (and a 64 MiB raw DISK if missing); prints cfg path.
# Edit the file (e.g. disk line, memory) before xtb_guest_create for variations.
xtb_guest_cfg() {
  local n=$1 d=${2:-$XTB_GUESTDIR/$1.img}
  [ -e "$d" ] || truncate -s 64M "$d"
  sed -e "s|@NAME@|$n|" -e "s|@DISK@|$d|" /opt/xtb/guest/guest.cfg > "$XTB_GUESTDIR/$n.cfg"
  echo "$XTB_GUESTDIR/$n.cfg"
}
# xtb_guest_create NAME [CFG] : xl create + wait for GUEST-READY (checks guest-create, guest-ready)
xtb_guest_create() {
  local n=$1 cfg=${2:-} t
  [ -n "$cfg" ] || cfg=$(xtb_guest_cfg "$n")
  rm -f "$(xtb_console "$n")"
  t=$(xtb_now)
  xtb_step guest-create 180 xl create "$cfg" || return 1
  xtb_wait 240 grep -aq GUEST-READY "$(xtb_console "$n")"; local rc=$?
  xtb_timing guest-create-to-ready "$(xtb_since "$t")"
  xtb_check guest-ready $rc || { echo "--- console of $n:"; tail -30 "$(xtb_console "$n")"; return 1; }
}
# last GUEST-TICK number on NAME's console (0 if none)
xtb_last_tick() { grep -ao 'GUEST-TICK [0-9]*' "$(xtb_console "$1")" 2>/dev/null | tail -1 | awk '{n=$2} END{print n+0}'; }
# xtb_wait_tick NAME N LIMIT : wait until a tick > N is logged
xtb_wait_tick() { local n=$1 v=$2; xtb_wait "$3" eval '[ "$(xtb_last_tick '"$n"')" -gt '"$v"' ]'; }
# number of GUEST-TICK lines so far, and the tick value of line K (1-based)
xtb_tick_count() { grep -ac 'GUEST-TICK' "$(xtb_console "$1")" 2>/dev/null || echo 0; }
xtb_tick_at() { grep -ao 'GUEST-TICK [0-9]*' "$(xtb_console "$1")" | sed -n "$2p" | awk '{print $2}'; }
xtb_destroy_all() { local d; for d in $(xl list | awk 'NR>2{print $1}'); do xl destroy "$d"; done; }

# dom0's userspace PV disk backend (QEMU 7.2 qdisk, from qemu-system-xen): the anchor to
# compare blkback-snap with. Guests use it with backendtype=qdisk in their disk spec.
xtb_start_qdisk() {
  pgrep -f xen-qemu-system-i386 >/dev/null && return 0
  /usr/libexec/xen-qemu-system-i386 -xen-domid 0 -xen-attach -name dom0 -nographic -M xenpv \
    -daemonize -monitor none -serial none -parallel none -pidfile /run/qemu-dom0.pid
}
