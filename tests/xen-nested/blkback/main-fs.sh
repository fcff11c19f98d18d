#!/bin/bash
# main-fs.sh - dom0 script of the filesystem / live-checkpoint / benchmark test (run via
# run-fs-bench.sh). One boot of the test bed:
#  S  (blkback-snap, qcow2): xen-blkback unloaded, `blkback-snap watch`; guest xsbfs with
#     xvda = fs.qcow2: mkfs.ext4, data set, umount/fsck/remount/verify, fstrim, file I/O, then a
#     writer during which dom0 takes checkpoint "during-write" over the image socket alias.
#     fs.qcow2 goes back to the host for the checkpoint checks.
#  B  benchmark, XSB_ROUNDS rounds; each round boots (order alternating with the round):
#     - guest xsbs<r>: xvdb = bench-s.qcow2 served by blkback-snap (watcher started with
#       BLKBACK_SNAP_IO_THREADS=$XSB_SNAP_THREADS, default 4) and xvdc = bench-q.qcow2 served by
#       QEMU qdisk; the guest alternates every test between the two disks;
#     - with XSB_SNAP0=1 also guest xsbz<r>: xvdb = bench-s.qcow2, blkback-snap with 0 I/O
#       threads (one request at a time), label snap0, and xvdc = bench-q.qcow2 on qdisk;
#     - guest xsbk<r>: xvdb = a raw file via loop, kernel xen-blkback (modprobe'd for it), and
#       xvdc = bench-q.qcow2 on qdisk.
#     Every guest has the same two-disk set-up (a qdisk QEMU in dom0 costs the single vCPU
#     something even while idle), so the guests compare with each other, and qdisk is
#     measured in each of them.
#  T  (if the host put an strace kit): guest xsbt, xvdb = bench-s.qcow2 on blkback-snap with 0
#     I/O threads, only 4 KiB randread QD1; `strace -c -f` on the serving process from the end
#     of the fill to the end of the test: system calls per request (slows it: not a benchmark).
#  D  the benchmark of B with single-disk guests (xvdb only: blkback-snap, or kernel blkback on
#     the raw file; no qdisk disk and no QEMU in dom0), XSB_ROUNDS rounds, order alternating.
#  C  copy costs in dom0 (copybench): 64 MiB of a cached file copied 1 MiB at a time by pread,
#     preadv of 4 KiB iovecs, and from a mapping of the file by memcpy / rep movsb / rep movsq /
#     8-byte loads: which copy is cheapest on this test bed.
#  R  blkback-snap's in-process ring benchmark (examples/ring_bench: sim frontend, no guest, no
#     Xen data path) in dom0, 1 MiB seqread / seqwrite and 4 KiB randread at QD1, persistent,
#     inline, with its user and system time: the serving code's own cost under this test bed.
#  F  dom0 event counts (ftrace hist triggers, counted in the kernel): guests
#     xsbf-<backend>-<test> with only xvdb (blkback-snap at $XSB_SNAP_THREADS I/O threads on
#     bench-s.qcow2, or kernel blkback on the raw file), one test each (1 MiB seqread, 1 MiB
#     seqwrite, 4 KiB randread, QD1); from the end of the fill to the end of the test: system
#     calls per task and call, context switches, wake-ups, interrupts, page-table switches
#     (xen_mmu_write_cr3), multicall flushes, page faults, workqueue items, block requests,
#     dom0's /proc/stat split and CPU (not a benchmark: the window's edges include the harness's
#     own xl calls).
# After every bench guest: the persistent-grant negotiation of xvdb (backend and frontend
# feature-persistent), blkback-snap's stats and CPU time, and the kernel blkback threads'
# CPU time.
# Benchmark lines (XSB-BENCH) of all guests -> $XTB_OUT/bench.txt. Env: XSB_SECS (per test),
# XSB_ROUNDS, XSB_PHASES (default "S B T"; C, D, F and R on request), XSB_SNAP_THREADS, XSB_SNAP0,
# XSB_F_BACKENDS (phase F: "snap kernel"), XSB_F_TESTS (phase F: the three tests above),
# XSB_R_TESTS (phase R: "seqread_1M seqwrite_1M randread_4K"), XSB_D_TESTS (phase D: the guests'
# tests, default all six), XSB_SETTLE (see below).
# /xtb/put: xensnap (hook), guest-fs.sh, xsbio (static), xsb-guest-overlay.tgz (e2fsprogs),
# fs.qcow2, bench-s.qcow2, bench-q.qcow2 (made on the host by qemu-img, same options).
. "$XTB_LIB/xtb.sh"
P=/xtb/put G=$XTB_GUESTDIR
INITRD=$G/xsbfs-initrd.gz
BS=$(command -v blkback-snap)
SECS=${XSB_SECS:-10} ROUNDS=${XSB_ROUNDS:-2} PHASES=${XSB_PHASES:-S B T}
XARGS=
SNAPT=${XSB_SNAP_THREADS:-4}
# XSB_SETTLE=N: bench guests sleep N s before each test, and dom0 writes dirty pages back after
# 3 s instead of 30 (checked every 1 s), so each test starts with little left to write back
SETTLE=${XSB_SETTLE:-0}
if [ "$SETTLE" -gt 0 ] 2>/dev/null; then
  echo 300 > /proc/sys/vm/dirty_expire_centisecs; echo 100 > /proc/sys/vm/dirty_writeback_centisecs
  xtb_info "settle: $SETTLE s before each test; vm.dirty_expire_centisecs=$(cat /proc/sys/vm/dirty_expire_centisecs) vm.dirty_writeback_centisecs=$(cat /proc/sys/vm/dirty_writeback_centisecs)"
fi
: > "$XTB_OUT/bench.txt"

if command -v xen_probe >/dev/null; then
  xtb_section "libxc-ffi xen_probe"
  timeout 120 xen_probe > "$XTB_OUT/xen_probe.txt" 2>&1; rc=$?; sed 's/^/  /' "$XTB_OUT/xen_probe.txt"
  l=$(grep 'evtchn loopback' "$XTB_OUT/xen_probe.txt"); [ "${l%% *}" = OK ]; xtb_check xen-probe-evtchn-loopback $? "$l"
  xtb_info "xen_probe exit $rc (= failed probe checks)"
fi
xtb_section "setup: guest initramfs (test bed guest + e2fsprogs + ext4 modules + xsbio)"
command -v cpio >/dev/null || cpio() { busybox cpio "$@"; }
KV=$(uname -r)
rm -rf /tmp/gi && mkdir /tmp/gi && cd /tmp/gi && zcat /opt/xtb/guest/initrd.gz | cpio -id --quiet
tar xzf "$P/xsb-guest-overlay.tgz" -C /tmp/gi && install -m 755 "$P/xsbio" bin/xsbio && install -m 755 "$P/guest-fs.sh" init
for f in $(modprobe --show-depends -a crc32c_generic ext4 | awk '$1=="insmod"{print $2}' | awk '!s[$0]++'); do
  r=${f#/lib/modules/$KV/}; mkdir -p "lib/modules/$(dirname "$r")"; cp "$f" "lib/modules/$r"; echo "$r" >> modules.order
done
find . | cpio -o -H newc --quiet | gzip -1 > "$INITRD"; rc=$?; cd /
xtb_check guest-initrd $rc "$(ls -la "$INITRD" | awk '{print $5}') bytes; modules: $(sed 's|.*/||' /tmp/gi/modules.order | tr '\n' ' ')"
install -m 755 "$P/xensnap" /etc/xen/scripts/xensnap
for f in fs.qcow2 bench-s.qcow2 bench-q.qcow2; do cp "$P/$f" "$G/$f"; done
truncate -s 128M "$G/bench-k.raw"

mkcfg() {  # NAME PHASE DEVS ROUND DISK...
  local n=$1 ph=$2 dv=$3 rd=$4 d; shift 4
  {
    echo "name = \"$n\""; echo 'type = "pv"'; echo 'kernel = "/opt/xtb/guest/vmlinuz"'; echo "ramdisk = \"$INITRD\""
    echo "extra = \"console=hvc0 loglevel=4 xsb.phase=$ph xsb.devs=$dv xsb.round=$rd xsb.secs=$SECS xsb.settle=$SETTLE${XARGS:+ $XARGS}\""
    echo 'memory = 256'; echo 'vcpus = 1'; echo 'on_crash = "destroy"'
    printf 'disk = [ '; for d in "$@"; do printf "'%s', " "$d"; done; echo ']'
  } > "$G/$n.cfg"; echo "$G/$n.cfg"
}
# guest_checks NAME: every XSB-GUEST-CHECK line of the guest as a dom0 check
guest_checks() {
  local con; con=$(xtb_console "$1")
  grep -a 'XSB-GUEST-CHECK' "$con" | tr -d '\r' | while read -r _ name res rest; do
    echo "$1-$name $([ "$res" = ok ] && echo 0 || echo 1) $rest"
  done > /tmp/gc.txt
  while read -r name rc rest; do xtb_check "$name" "$rc" "$rest"; done < /tmp/gc.txt
  grep -a 'XSB-BENCH\|XSB-CPU' "$con" | tr -d '\r' >> "$XTB_OUT/bench.txt"
  grep -a 'XSB-BENCH\|XSB-GUEST-DISK\|XSB-GUEST-DATASET\|XSB-WRITER' "$con" | tr -d '\r' | sed 's/^/  guest: /'
}
# run_guest NAME CFG LIMIT: create, wait for XSB-GUEST-DONE
run_guest() {
  local n=$1 cfg=$2 lim=$3 con t; con=$(xtb_console "$n"); rm -f "$con"; t=$(xtb_now)
  DOM0T=$(xl list 0 | awk 'NR==2{print $6}'); GT=$t
  xtb_step "$n-create" 180 xl create "$cfg" || { tail -30 /var/log/xen/xl-$n.log 2>/dev/null; return 1; }
  xtb_wait_text "$lim" "$con" XSB-GUEST-DONE; local rc=$?
  xtb_timing "$n-create-to-done" "$(xtb_since "$t")"
  xtb_check "$n-guest-done" $rc || tail -40 "$con"
  guest_checks "$n"
}
lastw() { grep -ao 'XSB-W [0-9]*' "$(xtb_console "$1")" | tail -1 | awk '{print $2+0}'; }

# watcher_start THREADS / watcher_stop: blkback-snap's dom0 service (xen-blkback must be out)
WPID=
watcher_start() {
  rmmod xen-blkback 2>/dev/null; xtb_wait 20 eval '! test -e /sys/bus/xen-backend/drivers/vbd && ! grep -q "^xen_blkback " /proc/modules'
  [ ! -e /sys/bus/xen-backend/drivers/vbd ]; xtb_check kernel-blkback-unloaded $?
  mkdir -p /run/xensnap
  BLKBACK_SNAP_IO_THREADS=$1 BLKBACK_SNAP_LOG=info "$BS" watch --log-dir /var/log/xen >> /var/log/xen/xensnap-watch.log 2>&1 & WPID=$!
  sleep 1; kill -0 $WPID 2>/dev/null; xtb_check watcher-running $? "io threads $1"
}
watcher_stop() { [ -n "$WPID" ] && kill $WPID 2>/dev/null; WPID=; sleep 1; }
# bench_guest NAME DEVS ROUND DISK...: boot a bench guest, wait, collect, destroy
bench_guest() {
  local n=$1 dv=$2 rd=$3 nd cfg pids; shift 3
  nd=$(echo "$dv" | tr ',' '\n' | wc -l)
  cfg=$(mkcfg $n bench "$dv" "$rd" "$@")
  run_guest $n "$cfg" $(( 300 + 6 * (SECS + SETTLE) * nd * 3 ))
  dom=$(xl domid $n 2>/dev/null)
  pids=$(for d in 51728 51744; do xenstore-read /local/domain/0/backend/vbd/$dom/$d/xensnap-pid 2>/dev/null; done)
  echo "  persistent grants $n xvdb: backend feature-persistent=$(xenstore-read /local/domain/0/backend/vbd/$dom/51728/feature-persistent 2>/dev/null) frontend feature-persistent=$(xenstore-read /local/domain/$dom/device/vbd/51728/feature-persistent 2>/dev/null)"
  for s in "$G/bench-s.qcow2.xensnap.sock"; do [ -S "$s" ] && echo "  stats $n snap disk: $("$BS" ctl "$s" stats 2>/dev/null | tr -d '\n ' | cut -c1-1000)"; done
  # CPU time (clock ticks of 1/100 s) since start: blkback-snap's serving process, kernel blkback threads
  for p in $pids; do [ -r /proc/$p/stat ] && echo "  cpu $n blkback-snap pid $p: $(awk '{print "utime=" $14 " stime=" $15}' /proc/$p/stat) threads=$(ls /proc/$p/task | wc -l) ctxt=$(awk '/ctxt_switches/{printf "%s%s ", $1, $2}' /proc/$p/status)"; done
  for t in /proc/[0-9]*; do c=$(cat $t/comm 2>/dev/null); case $c in blkback-snap) ;; *blk*|loop[0-9]*) echo "  cpu $n kernel thread $c: $(awk '{print "utime=" $14 " stime=" $15}' $t/stat)";; esac; done
  # CPU seconds (xl list) of dom0 and of the guest since the guest was created
  echo "  cpu $n domains: dom0 $(xl list 0 | awk -v a="$DOM0T" 'NR==2{printf "%.1f", $6 - a}') s, guest $(xl list $n | awk 'NR==2{print $6}') s, since create $(xtb_since "$GT") s"
  xtb_step $n-destroy 60 xl destroy $n
  for p in $pids; do xtb_wait 60 eval "! kill -0 $p"; done
}

for PH in $PHASES; do case $PH in
S)
  xtb_section "phase S: blkback-snap (qcow2): filesystem and live checkpoint"
  watcher_start "$SNAPT"
  n=xsbfs; con=$(xtb_console $n); rm -f "$con"
  cfg=$(mkcfg $n fs - 0 "vdev=xvda, access=rw, script=xensnap, target=$G/fs.qcow2")
  t=$(xtb_now)
  if xtb_step $n-create 180 xl create "$cfg"; then
    BE=/local/domain/0/backend/vbd/$(xl domid $n)/51712; PIDA=$(xenstore-read $BE/xensnap-pid)
    xtb_wait 600 grep -aqE 'XSB-W 5([^0-9]|$)' "$con"; xtb_check writer-running $? "$(xtb_since "$t") s after create"
    W0=$(lastw $n)
    "$BS" ctl "$G/fs.qcow2.xensnap.sock" '{"op":"checkpoint-create","name":"during-write"}' > /tmp/ck.json; rc=$?
    W1=$(lastw $n)
    xtb_check checkpoint-create-while-writing $rc "writer at file $W0 before, $W1 after the call; $(tr -d '\n ' < /tmp/ck.json | cut -c1-200)"
    echo "$W0 $W1" > "$XTB_OUT/checkpoint-writer-index.txt"
    xtb_wait_text 300 "$con" XSB-WRITER-DONE
    WF=$(grep -ao 'XSB-WRITER-DONE files=[0-9]*' "$con" | grep -o '[0-9]*$')
    [ -n "$WF" ] && [ "$WF" -gt "$W1" ]; xtb_check writer-continued-after-checkpoint $? "final file $WF > $W1"
    "$BS" ctl "$G/fs.qcow2.xensnap.sock" checkpoint-list | tr -d '\n ' | cut -c1-400; echo
    xtb_wait_text 300 "$con" XSB-GUEST-DONE; rc=$?
    xtb_timing $n-create-to-done "$(xtb_since "$t")"; xtb_check $n-guest-done $rc || tail -40 "$con"
    guest_checks $n
    echo "  stats fs disk: $("$BS" ctl "$G/fs.qcow2.xensnap.sock" stats | tr -d '\n ' | cut -c1-600)"
    xtb_step $n-destroy 60 xl destroy $n
    xtb_wait 60 eval "! kill -0 $PIDA"; xtb_check serving-process-exited $?
    out=$("$BS" check-image "$G/fs.qcow2" 2>&1); rc=$?; echo "  check-image: $(echo "$out" | tr -d '\n' | cut -c1-300)"
    xtb_check fs-image-check-clean $rc
    cp "$G/fs.qcow2" "$XTB_OUT/fs.qcow2"; xtb_check fs-image-copied-to-host $?
  fi
  watcher_stop
  ;;
B)
  r=1; while [ $r -le $ROUNDS ]; do
    steps="S K"; [ "${XSB_SNAP0:-0}" = 1 ] && steps="S Z K"
    [ $((r % 2)) = 0 ] && steps=$(echo $steps | tr ' ' '\n' | tac | tr '\n' ' ')
    for st in $steps; do case $st in
    S)
      xtb_section "bench round $r: blkback-snap ($SNAPT I/O threads, qcow2) and QEMU qdisk (qcow2) in one guest"
      watcher_start "$SNAPT"
      bench_guest xsbs$r "snap:/dev/xvdb,qdisk:/dev/xvdc" $r \
        "vdev=xvdb, access=rw, script=xensnap, target=$G/bench-s.qcow2" \
        "vdev=xvdc, access=rw, backendtype=qdisk, format=qcow2, target=$G/bench-q.qcow2"
      watcher_stop
      ;;
    Z)
      xtb_section "bench round $r: blkback-snap (0 I/O threads, qcow2)"
      watcher_start 0
      bench_guest xsbz$r "snap0:/dev/xvdb,qdisk:/dev/xvdc" $r "vdev=xvdb, access=rw, script=xensnap, target=$G/bench-s.qcow2" \
        "vdev=xvdc, access=rw, backendtype=qdisk, format=qcow2, target=$G/bench-q.qcow2"
      watcher_stop
      ;;
    K)
      xtb_section "bench round $r: kernel xen-blkback (raw file via loop)"
      modprobe xen-blkback; xtb_wait 10 test -e /sys/bus/xen-backend/drivers/vbd; xtb_check kernel-blkback-loaded $?
      bench_guest xsbk$r "kernel:/dev/xvdb,qdisk:/dev/xvdc" $r "vdev=xvdb, access=rw, format=raw, target=$G/bench-k.raw" \
        "vdev=xvdc, access=rw, backendtype=qdisk, format=qcow2, target=$G/bench-q.qcow2"
      losetup -a | sed 's/^/  /'
      ;;
    esac; done
    r=$((r+1))
  done
  ;;
D)
  # the same benchmark with single-disk guests: blkback-snap or kernel blkback alone in the
  # guest and in dom0 (no qdisk disk, no QEMU process), guests alternating every round
  # XSB_D_TESTS: the guests' tests (default: all six), e.g. one test repeated
  XARGS=${XSB_D_TESTS:+xsb.tests=$(echo $XSB_D_TESTS | tr ' ' ,)}
  r=1; while [ $r -le $ROUNDS ]; do
    steps="S K"; [ $((r % 2)) = 0 ] && steps="K S"
    for st in $steps; do case $st in
    S)
      xtb_section "single-disk round $r: blkback-snap ($SNAPT I/O threads, qcow2) alone"
      watcher_start "$SNAPT"
      bench_guest xsbds$r "snap:/dev/xvdb" $r "vdev=xvdb, access=rw, script=xensnap, target=$G/bench-s.qcow2"
      watcher_stop
      ;;
    K)
      xtb_section "single-disk round $r: kernel xen-blkback (raw file via loop) alone"
      modprobe xen-blkback; xtb_wait 10 test -e /sys/bus/xen-backend/drivers/vbd; xtb_check kernel-blkback-loaded $?
      bench_guest xsbdk$r "kernel:/dev/xvdb" $r "vdev=xvdb, access=rw, format=raw, target=$G/bench-k.raw"
      ;;
    esac; done
    r=$((r+1))
  done
  XARGS=
  ;;
T)
  ST=$P/strace-kit
  if [ -x "$ST/strace" ]; then
    xtb_section "trace: system calls of blkback-snap (0 I/O threads) per 4 KiB randread QD1 request (strace -c -f; slowed, not a benchmark)"
    rmmod xen-blkback 2>/dev/null; watcher_start 0
    n=xsbt; XARGS="xsb.tests=randread:4096:1"; cfg=$(mkcfg $n bench "trace:/dev/xvdb" 1 "vdev=xvdb, access=rw, script=xensnap, target=$G/bench-s.qcow2"); XARGS=
    con=$(xtb_console $n); rm -f "$con"
    if xtb_step $n-create 180 xl create "$cfg"; then
      dom=$(xl domid $n); pid=$(xenstore-read /local/domain/0/backend/vbd/$dom/51728/xensnap-pid)
      xtb_wait_text 600 "$con" XSB-FILLED
      echo "  persistent grants $n xvdb: backend feature-persistent=$(xenstore-read /local/domain/0/backend/vbd/$dom/51728/feature-persistent 2>/dev/null) frontend feature-persistent=$(xenstore-read /local/domain/$dom/device/vbd/51728/feature-persistent 2>/dev/null)"
      req() { "$BS" ctl "$G/bench-s.qcow2.xensnap.sock" stats 2>/dev/null | tr -d '\n ' | grep -o '"requests":[0-9]*' | cut -d: -f2; }
      s0=$(req)
      LD_LIBRARY_PATH=$ST "$ST/strace" -c -f -o "$XTB_OUT/strace-c.txt" -p "$pid" & SPID=$!
      xtb_wait_text $(( 300 + 10 * SECS )) "$con" XSB-GUEST-DONE; rc=$?
      kill -INT $SPID 2>/dev/null; wait $SPID; s1=$(req)
      xtb_check trace-guest-done $rc
      echo "  requests while traced: $(( ${s1:-0} - ${s0:-0} )) (stats requests $s0 -> $s1)"
      grep -a 'XSB-BENCH' "$con" | tr -d '\r' | sed 's/^/  guest (traced): /'
      echo "  stats: $("$BS" ctl "$G/bench-s.qcow2.xensnap.sock" stats 2>/dev/null | tr -d '\n ' | cut -c1-1000)"
      sed 's/^/  /' "$XTB_OUT/strace-c.txt"
      xtb_step $n-destroy 60 xl destroy $n
      xtb_wait 60 eval "! kill -0 $pid"
    fi
    watcher_stop
  else
    xtb_info "no strace kit in /xtb/put: phase T skipped"
  fi
  ;;
C)
  xtb_section "copy costs in dom0: 64 MiB of a cached file, by each way of copying (copybench)"
  if [ -x "$P/copybench" ]; then
    dd if=/dev/urandom of=/tmp/xsb-copy.dat bs=1M count=64 2>/dev/null
    timeout 600 "$P/copybench" /tmp/xsb-copy.dat 64 | sed 's/^/  /'; xtb_check copybench "${PIPESTATUS[0]}"
    rm -f /tmp/xsb-copy.dat
  else
    xtb_info "no copybench in /xtb/put: phase C skipped"
  fi
  ;;
R)
  xtb_section "the in-process ring benchmark in dom0 (no guest: blkif's sim frontend, qcow2 and raw, persistent grants, inline)"
  if [ -x "$P/ring_bench" ]; then
    for t in ${XSB_R_TESTS:-seqread_1M seqwrite_1M randread_4K}; do
      # bash's `time`: the process's wall, user and system time
      { time timeout 600 "$P/ring_bench" --secs 5 --reps 1 --workers 0 --persistent --only "${t//_/ }" --qd 1 --dir /var/tmp; } 2>&1 | sed 's/^/  /'
    done
  else
    xtb_info "no ring_bench in /xtb/put: phase R skipped"
  fi
  ;;
F)
  TR=/sys/kernel/tracing
  [ -e $TR/events ] || mount -t tracefs nodev $TR 2>/dev/null
  # dom0 event counts per backend and test, by hist triggers (counted in the kernel, no trace
  # buffer to overflow): which tasks run, make system calls, switch page tables, take which
  # interrupts, what the workqueues run and what goes to dom0's own disk, per MiB moved
  EVS="raw_syscalls/sys_enter:common_pid.execname,id.syscall sched/sched_switch:next_comm
    sched/sched_wakeup:comm irq/irq_handler_entry:irq,name xen/xen_mmu_write_cr3:common_pid.execname
    xen/xen_mc_flush:common_pid.execname xen/xen_mmu_flush_tlb_multi:common_pid.execname
    exceptions/page_fault_user:common_pid.execname exceptions/page_fault_kernel:common_pid.execname
    workqueue/workqueue_execute_start:function.sym block/block_rq_issue:dev,rwbs"
  ev_on() { local e k; for e in $EVS; do k=${e#*:} e=${e%%:*}
      [ -w $TR/events/$e/trigger ] && echo "hist:keys=$k:vals=hitcount:sort=hitcount.descending:size=4096" > $TR/events/$e/trigger 2>/dev/null; done; }
  ev_off() { local e k; for e in $EVS; do k=${e#*:} e=${e%%:*}
      [ -w $TR/events/$e/trigger ] && echo "!hist:keys=$k:vals=hitcount:sort=hitcount.descending:size=4096" > $TR/events/$e/trigger 2>/dev/null; done; }
  ev_dump() {  # per event: total hits, then the 12 largest keys
    local e; for e in $EVS; do e=${e%%:*}
      if [ -r $TR/events/$e/hist ]; then
        echo "  $e: $(sed -n 's/^ *Hits: *//p' $TR/events/$e/hist) hits"
        grep '^{' $TR/events/$e/hist | head -12 | sed 's/  */ /g; s/^/      /'
      else echo "  $e: not available"; fi; done; }
  stat_now() { awk '/^cpu /{print $2, $3, $4, $5, $6, $7, $8, $9}' /proc/stat; }
  vm_now() { awk '$1 ~ /^(pgfault|nr_dirtied|nr_written|pgpgout|pgpgin)$/ {printf "%s=%s ", $1, $2}' /proc/vmstat; }
  cpu_now() {  # dom0 CPU s (xl list), serving process utime+stime ticks
    local p=$1 b=0
    [ -n "$p" ] && [ -r /proc/$p/stat ] && b=$(awk '{print $14 + $15}' /proc/$p/stat)
    echo "$(xl list 0 | awk 'NR==2{print $6}') $b"
  }
  threads_now() {  # "<tid>:<comm>:<utime>:<stime>" per thread of the serving process
    local p=$1 t; [ -n "$p" ] || return 0
    for t in /proc/$p/task/*; do
      awk -v c="$(cat $t/comm 2>/dev/null)" '{ print FILENAME ":" c ":" $14 ":" $15 }' $t/stat 2>/dev/null; done | sed 's|/proc/[0-9]*/task/||; s|/stat||'
  }
  if [ -w $TR/events/raw_syscalls/sys_enter/trigger ]; then
    xtb_section "dom0 event counts per 1 MiB sequential transfer and 4 KiB read, blkback-snap vs kernel blkback"
    for be in ${XSB_F_BACKENDS:-snap kernel}; do
      if [ $be = snap ]; then rmmod xen-blkback 2>/dev/null; watcher_start "$SNAPT"; disk="vdev=xvdb, access=rw, script=xensnap, target=$G/bench-s.qcow2"
      else watcher_stop; modprobe xen-blkback; xtb_wait 10 test -e /sys/bus/xen-backend/drivers/vbd; disk="vdev=xvdb, access=rw, format=raw, target=$G/bench-k.raw"; fi
      for t in ${XSB_F_TESTS:-seqread:1048576:1 seqwrite:1048576:1 randread:4096:1}; do
        n=xsbf-$be-${t%%:*}; XARGS="xsb.tests=$t"; cfg=$(mkcfg $n bench "$be:/dev/xvdb" 1 "$disk"); XARGS=
        con=$(xtb_console $n); rm -f "$con"
        xtb_step $n-create 180 xl create "$cfg" || continue
        dom=$(xl domid $n); pid=
        [ $be = snap ] && pid=$(xenstore-read /local/domain/0/backend/vbd/$dom/51728/xensnap-pid 2>/dev/null)
        xtb_wait_text 600 "$con" XSB-FILLED
        c0=$(cpu_now "$pid"); s0=$(stat_now); v0=$(vm_now); g0=$(xl list $n | awk 'NR==2{print $6}'); w0=$(xtb_now); th0=$(threads_now "$pid")
        ev_on
        xtb_wait_text $(( 300 + 10 * SECS )) "$con" XSB-GUEST-DONE; rc=$?
        c1=$(cpu_now "$pid"); s1=$(stat_now); v1=$(vm_now); g1=$(xl list $n | awk 'NR==2{print $6}'); th1=$(threads_now "$pid")
        xtb_check $n-done $rc
        grep -a 'XSB-BENCH\|XSB-CPU' "$con" | tr -d '\r' | sed 's/^/  guest: /'
        read -r d0 b0 <<< "$c0"; read -r d1 b1 <<< "$c1"
        echo "  cpu $n over $(xtb_since "$w0") s: dom0 $(awk -v a="$d0" -v b="$d1" 'BEGIN{printf "%.1f", b - a}') s, guest $(awk -v a="$g0" -v b="$g1" 'BEGIN{printf "%.1f", b - a}') s, serving process $(( b1 - b0 )) ticks"
        [ -n "$pid" ] && echo "  serving threads, user/system ticks over the test: $(printf '%s\n%s\n' "$th0" "$th1" | awk -F: 'NF == 4 { if ($1 in u) { du = $3 - u[$1]; ds = $4 - s[$1]; if (du + ds > 0) printf "%s %d/%d  ", $2, du, ds } else { u[$1] = $3; s[$1] = $4 } }')"
        echo "  dom0 /proc/stat ticks (user nice system idle iowait irq softirq steal): $(awk -v a="$s0" -v b="$s1" 'BEGIN{n = split(a, x, " "); split(b, y, " "); for (i = 1; i <= n; i++) printf "%d ", y[i] - x[i]}')"
        echo "  dom0 vmstat: before $v0 / after $v1"
        ev_dump
        ev_off
        xtb_step $n-destroy 60 xl destroy $n
        [ -n "$pid" ] && xtb_wait 60 eval "! kill -0 $pid"
      done
    done
    watcher_stop; rmmod xen-blkback 2>/dev/null
    # the copy alone, in dom0: the raw file through the page cache into a user buffer (what a
    # preadv does) and through a loop device into user pages by O_DIRECT (what loop does for
    # kernel blkback), 64 MiB each, warm cache
    cat "$G/bench-k.raw" > /dev/null
    t=$(xtb_now); dd if="$G/bench-k.raw" of=/dev/null bs=1M count=64 2>/dev/null; echo "  copy: page cache -> user buffer (dd bs=1M, 64 MiB): $(xtb_since "$t") s"
    ld=$(losetup -f --show "$G/bench-k.raw") && {
      dd if="$ld" of=/dev/null bs=1M count=64 iflag=direct 2>/dev/null
      t=$(xtb_now); dd if="$ld" of=/dev/null bs=1M count=64 iflag=direct 2>/dev/null; echo "  copy: loop device O_DIRECT (page cache -> user pages via bio, 64 MiB): $(xtb_since "$t") s"
      losetup -d "$ld"; }
  else
    xtb_info "no hist trigger for raw_syscalls/sys_enter in this kernel: phase F skipped"
  fi
  ;;
esac; done

xtb_section "results"
sed 's/^/  /' "$XTB_OUT/bench.txt"
for f in /var/log/xen/xensnap-*.log; do [ -f "$f" ] && { echo "--- $f"; tail -8 "$f"; }; done
xl list
xtb_finish
