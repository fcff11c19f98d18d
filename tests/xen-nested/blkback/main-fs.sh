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
#  F  dom0 kernel profile (ftrace's function_graph tracer on a fixed list of functions, time
#     with children, sleep excluded): guests xsbf-<backend>-<test> with only xvdb (blkback-snap at
#     $XSB_SNAP_THREADS I/O threads on bench-s.qcow2, or kernel blkback on the raw file), one
#     test each (1 MiB seqread, 1 MiB seqwrite, QD1), profiled from the end of the fill to the
#     end of the test, with dom0's and the serving process's CPU over the same span: where
#     dom0's extra time per MiB goes (the profiler slows what it counts: not a benchmark).
# After every bench guest: the persistent-grant negotiation of xvdb (backend and frontend
# feature-persistent), blkback-snap's stats and CPU time, and the kernel blkback threads'
# CPU time.
# Benchmark lines (XSB-BENCH) of all guests -> $XTB_OUT/bench.txt. Env: XSB_SECS (per test),
# XSB_ROUNDS, XSB_PHASES (default "S B T"; D and F on request), XSB_SNAP_THREADS, XSB_SNAP0.
# /xtb/put: xensnap (hook), guest-fs.sh, xsbio (static), xsb-guest-overlay.tgz (e2fsprogs),
# fs.qcow2, bench-s.qcow2, bench-q.qcow2 (made on the host by qemu-img, same options).
. "$XTB_LIB/xtb.sh"
P=/xtb/put G=$XTB_GUESTDIR
INITRD=$G/xsbfs-initrd.gz
BS=$(command -v blkback-snap)
SECS=${XSB_SECS:-10} ROUNDS=${XSB_ROUNDS:-2} PHASES=${XSB_PHASES:-S B T}
XARGS=
SNAPT=${XSB_SNAP_THREADS:-4}
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
    echo "extra = \"console=hvc0 loglevel=4 xsb.phase=$ph xsb.devs=$dv xsb.round=$rd xsb.secs=$SECS${XARGS:+ $XARGS}\""
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
  xtb_wait "$lim" grep -aq XSB-GUEST-DONE "$con"; local rc=$?
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
  run_guest $n "$cfg" $(( 300 + 6 * SECS * nd * 3 ))
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
    xtb_wait 300 grep -aq XSB-WRITER-DONE "$con"
    WF=$(grep -ao 'XSB-WRITER-DONE files=[0-9]*' "$con" | grep -o '[0-9]*$')
    [ -n "$WF" ] && [ "$WF" -gt "$W1" ]; xtb_check writer-continued-after-checkpoint $? "final file $WF > $W1"
    "$BS" ctl "$G/fs.qcow2.xensnap.sock" checkpoint-list | tr -d '\n ' | cut -c1-400; echo
    xtb_wait 300 grep -aq XSB-GUEST-DONE "$con"; rc=$?
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
      xtb_wait 600 grep -aq XSB-FILLED "$con"
      echo "  persistent grants $n xvdb: backend feature-persistent=$(xenstore-read /local/domain/0/backend/vbd/$dom/51728/feature-persistent 2>/dev/null) frontend feature-persistent=$(xenstore-read /local/domain/$dom/device/vbd/51728/feature-persistent 2>/dev/null)"
      req() { "$BS" ctl "$G/bench-s.qcow2.xensnap.sock" stats 2>/dev/null | tr -d '\n ' | grep -o '"requests":[0-9]*' | cut -d: -f2; }
      s0=$(req)
      LD_LIBRARY_PATH=$ST "$ST/strace" -c -f -o "$XTB_OUT/strace-c.txt" -p "$pid" & SPID=$!
      xtb_wait $(( 300 + 10 * SECS )) grep -aq XSB-GUEST-DONE "$con"; rc=$?
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
F)
  TR=/sys/kernel/tracing
  [ -e $TR/available_tracers ] || mount -t tracefs nodev $TR 2>/dev/null
  xtb_info "tracers: $(cat $TR/available_tracers 2>/dev/null); function profiler: $([ -e $TR/function_profile_enabled ] && echo yes || echo no)"
  if grep -qw function_graph $TR/available_tracers 2>/dev/null; then
    # the data path of both backends, their wake-ups and system calls; function_graph with
    # only these functions traced: each call's time with its children (sleep excluded)
    FNS="__x64_sys_preadv __x64_sys_pwritev __x64_sys_preadv2 __x64_sys_pwritev2 __x64_sys_ioctl
      __x64_sys_read __x64_sys_write __x64_sys_poll __x64_sys_ppoll __x64_sys_futex
      ext4_file_read_iter ext4_file_write_iter filemap_read copy_page_to_iter
      copy_page_from_iter_atomic generic_perform_write ext4_da_write_begin ext4_da_write_end
      balance_dirty_pages_ratelimited_flags lo_rw_aio loop_process_work loop_queue_rq
      do_block_io_op dispatch_rw_block_io xen_blkbk_map __end_block_io_op xen_blkbk_unmap
      make_response submit_bio gntdev_ioctl evtchn_read evtchn_write evtchn_ioctl
      __xen_evtchn_do_upcall handle_mm_fault xen_mc_flush schedule __do_softirq"
    prof_on() { echo 0 > $TR/tracing_on; echo nop > $TR/current_tracer; echo > $TR/set_ftrace_filter
      for f in $FNS; do echo "$f" >> $TR/set_ftrace_filter 2>/dev/null; done
      # an empty filter would trace every function (tracefs files report size 0: read it)
      grep -q . $TR/set_ftrace_filter || return 1
      echo 65536 > $TR/buffer_size_kb; echo 0 > $TR/options/sleep-time 2>/dev/null
      echo 1 > $TR/options/funcgraph-tail 2>/dev/null; echo 0 > $TR/options/funcgraph-irqs 2>/dev/null
      echo function_graph > $TR/current_tracer; echo > $TR/trace; echo 1 > $TR/tracing_on; }
    prof_off() { echo 0 > $TR/tracing_on; }
    # "<us> <name>" per finished call, summed per function: total ms, calls, mean us
    prof_sum() { sed -n 's/^.*[ !+#*@$]\([0-9][0-9]*\.[0-9][0-9]*\) us *| *\(.*\)$/\1 \2/p' $TR/trace |
      awk '{ n = ""; if ($2 ~ /\(\);$/) n = $2; else if ($2 == "}" && $3 == "/*") n = $4; if (n == "") next; sub(/\(\);$/, "", n); t[n] += $1; c[n]++ }
        END { for (k in t) printf "%10.1f ms %8d calls %9.1f us  %s\n", t[k] / 1000, c[k], t[k] / c[k], k }' | sort -rn | head -40
      echo "lost events: $(grep -c 'LOST' $TR/trace) trace lines: $(wc -l < $TR/trace)"; }
    cpu_now() {  # dom0 CPU s (xl list), serving process utime+stime ticks, blk/loop/kworker ticks
      local p=$1 b=0 k=0 t c
      [ -n "$p" ] && [ -r /proc/$p/stat ] && b=$(awk '{print $14 + $15}' /proc/$p/stat)
      for t in /proc/[0-9]*; do c=$(cat $t/comm 2>/dev/null); case $c in blkback-snap) ;; *blk*|loop[0-9]*|kworker*) k=$((k + $(awk '{print $14 + $15}' $t/stat 2>/dev/null || echo 0)));; esac; done
      echo "$(xl list 0 | awk 'NR==2{print $6}') $b $k"
    }
    xtb_section "profile: dom0 kernel functions per 1 MiB sequential transfer, blkback-snap vs kernel blkback"
    for be in snap kernel; do
      if [ $be = snap ]; then rmmod xen-blkback 2>/dev/null; watcher_start "$SNAPT"; disk="vdev=xvdb, access=rw, script=xensnap, target=$G/bench-s.qcow2"
      else watcher_stop; modprobe xen-blkback; xtb_wait 10 test -e /sys/bus/xen-backend/drivers/vbd; disk="vdev=xvdb, access=rw, format=raw, target=$G/bench-k.raw"; fi
      for t in seqread:1048576:1 seqwrite:1048576:1; do
        n=xsbf-$be-${t%%:*}; XARGS="xsb.tests=$t"; cfg=$(mkcfg $n bench "$be:/dev/xvdb" 1 "$disk"); XARGS=
        con=$(xtb_console $n); rm -f "$con"
        xtb_step $n-create 180 xl create "$cfg" || continue
        dom=$(xl domid $n); pid=
        [ $be = snap ] && pid=$(xenstore-read /local/domain/0/backend/vbd/$dom/51728/xensnap-pid 2>/dev/null)
        xtb_wait 600 grep -aq XSB-FILLED "$con"
        c0=$(cpu_now "$pid"); g0=$(xl list $n | awk 'NR==2{print $6}'); w0=$(xtb_now)
        prof_on || xtb_info "no function of the list can be traced"
        xtb_wait $(( 300 + 10 * SECS )) grep -aq XSB-GUEST-DONE "$con"; rc=$?
        prof_off
        c1=$(cpu_now "$pid"); g1=$(xl list $n | awk 'NR==2{print $6}')
        xtb_check $n-done $rc
        grep -a 'XSB-BENCH' "$con" | tr -d '\r' | sed 's/^/  guest: /'
        read -r d0 b0 k0 <<< "$c0"; read -r d1 b1 k1 <<< "$c1"
        echo "  cpu $n over $(xtb_since "$w0") s: dom0 $(awk -v a="$d0" -v b="$d1" 'BEGIN{printf "%.1f", b - a}') s, guest $(awk -v a="$g0" -v b="$g1" 'BEGIN{printf "%.1f", b - a}') s, serving process $(( b1 - b0 )) ticks, blk/loop/kworker threads $(( k1 - k0 )) ticks"
        echo "  profile $n ($(wc -l < $TR/set_ftrace_filter) functions traced; time with children, sleep excluded):"
        prof_sum | sed 's/^/    /'
        echo nop > $TR/current_tracer
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
    xtb_info "no function_graph tracer in this kernel: phase F skipped"
  fi
  ;;
esac; done

xtb_section "results"
sed 's/^/  /' "$XTB_OUT/bench.txt"
for f in /var/log/xen/xensnap-*.log; do [ -f "$f" ] && { echo "--- $f"; tail -8 "$f"; }; done
xl list
xtb_finish
