#!/bin/sh
# PID 1 of the PV guest of the filesystem / checkpoint / benchmark test (main-fs.sh repacks the
# test bed's guest initramfs with this as /init, plus e2fsprogs, ext4 modules and xsbio).
# Kernel cmdline: xsb.phase=fs|bench  xsb.devs=LABEL:DEV,...  xsb.round=N  xsb.secs=N (per test)
#   xsb.tests=MODE:BS:QD,... (bench: only these tests; default the six below)
#   xsb.settle=N (bench: sleep N s before each test, so dom0 can write back what the fill and
#   the earlier tests left dirty before the next test starts; default 0)
#  fs:    on /dev/xvda: mkfs.ext4, mount, a data set with sha256 sums, sync, umount, e2fsck -fn,
#         drop caches, remount, verify; fstrim; then a writer (files + fsync'd sum files) for
#         XSB_WRITER_SECS during which dom0 takes a checkpoint; umount, e2fsck -fn.
#  bench: on every device of xsb.devs: fill the span once, then 4 KiB randread QD1 and QD8,
#         4 KiB randwrite QD1 and QD8, 1 MiB seqread and seqwrite QD1 (xsbio, O_DIRECT), each
#         test on every device in turn (the order alternates with the round), labelled
#         LABEL-rN. XSB-FILLED is printed when the fill is done.
# Lines for dom0: XSB-GUEST-CHECK <name> ok|bad ..., XSB-BENCH ..., XSB-W <i>, XSB-GUEST-DONE.
PATH=/bin:/sbin:/usr/sbin:/usr/bin
# busybox ash prefers its own applets (its mke2fs makes no ext4 journal): e2fsprogs by full path
MKE2FS=/usr/sbin/mke2fs E2FSCK=/usr/sbin/e2fsck
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev 2>/dev/null
for m in $(cat /modules.order); do insmod "/lib/modules/$m" 2>/dev/null; done
PHASE=none DEVS= ROUND=1 SECS=10 WSECS=25 SETTLE=0
TESTS="randread:4096:1 randread:4096:8 randwrite:4096:1 randwrite:4096:8 seqread:1048576:1 seqwrite:1048576:1"
for w in $(cat /proc/cmdline); do case $w in
  xsb.phase=*) PHASE=${w#*=};; xsb.devs=*) DEVS=${w#*=};; xsb.secs=*) SECS=${w#*=};;
  xsb.round=*) ROUND=${w#*=};; xsb.wsecs=*) WSECS=${w#*=};; xsb.tests=*) TESTS=$(echo "${w#*=}" | tr ',' ' ');;
  xsb.settle=*) SETTLE=${w#*=};; esac; done
up() { cut -d' ' -f1 /proc/uptime; }
upi() { cut -d. -f1 /proc/uptime; }
ck() { if [ "$2" = 0 ]; then echo "XSB-GUEST-CHECK $1 ok${3:+ $3}"; else echo "XSB-GUEST-CHECK $1 bad (rc=$2)${3:+ $3}"; return 1; fi; }
echo "XSB-GUEST-BOOTED phase=$PHASE devs=$DEVS round=$ROUND uptime=$(up) kernel=$(uname -r)"
waitdev() { i=0; while [ ! -b "$1" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; [ -b "$1" ]; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
M=/mnt; mkdir -p $M

fs_test() {
  D=/dev/xvda
  waitdev $D || { ck disk 1 "$D missing"; return; }
  echo "XSB-GUEST-DISK xvda sectors=$(cat /sys/block/xvda/size) discard_max_bytes=$(cat /sys/block/xvda/queue/discard_max_bytes) discard_granularity=$(cat /sys/block/xvda/queue/discard_granularity) write_cache=$(cat /sys/block/xvda/queue/write_cache 2>/dev/null) fua=$(cat /sys/block/xvda/queue/fua 2>/dev/null)"
  $MKE2FS -q -F -t ext4 -L xsbfs $D; ck mkfs-ext4 $? "$($MKE2FS -V 2>&1 | head -1)" || return
  mount -t ext4 $D $M; ck mount $? "$(grep " $M " /proc/mounts)" || return
  # data set: 48 files of 1 KiB .. 3 MiB + a small tree; sums kept in /tmp (outside the fs) too
  mkdir -p $M/data/a/b $M/data/c
  i=0; for kb in 1 3 4 8 17 64 100 128 256 511 1024 3072; do
    for d in data data/a data/a/b data/c; do
      i=$((i+1)); dd if=/dev/urandom of=$M/$d/f$i.bin bs=1024 count=$kb 2>/dev/null
    done
  done
  (cd $M && find data -type f | sort | xargs sha256sum) > /tmp/sums; cp /tmp/sums $M/SUMS
  echo "XSB-GUEST-DATASET files=$(wc -l < /tmp/sums) kib=$(du -sk $M/data | cut -f1) sums-sha=$(sha256sum < /tmp/sums | cut -c1-16)"
  sync; umount $M; ck umount $?
  $E2FSCK -fn $D > /tmp/fsck.out 2>&1; r=$?; ck fsck-after-umount $r "$(tail -1 /tmp/fsck.out)"
  [ $r = 0 ] || sed 's/^/  fsck: /' /tmp/fsck.out | head -20
  drop
  mount -t ext4 $D $M; ck remount $? || return
  (cd $M && sha256sum -c /tmp/sums > /tmp/verify.out 2>&1); r=$?
  ck dataset-verify-after-remount $r "$(grep -c ': OK$' /tmp/verify.out) of $(wc -l < /tmp/sums) OK"
  cmp -s /tmp/sums $M/SUMS; ck sums-file-on-fs $?
  # discard: delete half the data set, fstrim
  rm -rf $M/data/a; sync
  o=$(fstrim -v $M 2>&1); r=$?; ck fstrim $r "$o"
  (cd $M && grep ' data/c/\| data/f' /tmp/sums | sha256sum -c > /dev/null 2>&1); ck verify-after-fstrim $?
  # random + sequential I/O through the filesystem (busybox dd, several block sizes/offsets)
  dd if=/dev/urandom of=/tmp/pat bs=1024 count=4096 2>/dev/null; ps=$(sha256sum < /tmp/pat | cut -d' ' -f1)
  dd if=/dev/zero of=$M/big bs=1M count=24 2>/dev/null
  bad=0; for spec in 4096:0:17 512:7:301 65536:3:100 1048576:4:2 131072:1:150; do
    bs=${spec%%:*}; r2=${spec#*:}; cnt=${r2%%:*}; seek=${r2#*:}
    dd if=/tmp/pat of=$M/big bs=$bs count=$cnt seek=$seek conv=notrunc,fsync 2>/dev/null
    echo "$bs $cnt $seek $(dd if=/tmp/pat bs=$bs count=$cnt 2>/dev/null | sha256sum | cut -d' ' -f1)" >> /tmp/big.man
  done
  drop
  while read -r bs cnt seek s; do
    [ "$(dd if=$M/big bs=$bs count=$cnt skip=$seek 2>/dev/null | sha256sum | cut -d' ' -f1)" = "$s" ] || bad=$((bad+1))
  done < /tmp/big.man
  ck file-io-offsets-blocksizes $bad "$(wc -l < /tmp/big.man) ranges, $bad bad"
  # writer during which dom0 takes a checkpoint (dom0 waits for "XSB-W 5")
  mkdir -p $M/w; rm -f /tmp/pat
  echo "XSB-WRITER-START uptime=$(up) secs=$WSECS"
  end=$(( $(upi) + WSECS )); i=0
  while [ "$(upi)" -lt $end ]; do
    i=$((i+1)); kb=$(( (i % 7 + 1) * 32 ))
    dd if=/dev/urandom of=$M/w/f$i bs=1024 count=$kb conv=fsync 2>/dev/null
    sha256sum < $M/w/f$i | cut -d' ' -f1 | dd of=$M/w/s$i conv=fsync 2>/dev/null
    echo "XSB-W $i"
  done
  n=0; bad=0; for s in $M/w/s*; do j=${s##*/s}; n=$((n+1)); [ "$(sha256sum < $M/w/f$j | cut -d' ' -f1)" = "$(cat $s)" ] || bad=$((bad+1)); done
  echo "XSB-WRITER-DONE files=$i uptime=$(up)"
  ck writer-files-verify $bad "$n pairs, $bad bad"
  umount $M; ck umount-2 $?
  $E2FSCK -fn $D > /tmp/fsck.out 2>&1; r=$?; ck fsck-final $r "$(tail -1 /tmp/fsck.out)"
}

# cpus: ticks of the guest's one CPU (busy idle steal), then its blkfront interrupts (the
# event channels named blkif, all disks) and all its interrupts
cpus() {
  read -r _ u n sy i w q sq st _ < /proc/stat
  b=0 a=0
  while read -r irq c rest; do
    case $irq in *:) ;; *) continue;; esac
    case $c in *[!0-9]*|'') continue;; esac
    a=$((a + c)); case $rest in *blkif*) b=$((b + c));; esac
  done < /proc/interrupts
  echo "$((u + n + sy + q + sq)) $((i + w)) $st $b $a $((u + n)) $sy $((q + sq))"
}
# busy = usr + sys + sirq (user, system, irq + softirq ticks), as split after irq=
cpu_delta() { set -- $1 $2; echo "busy=$(($9 - $1)) idle=$((${10} - $2)) steal=$((${11} - $3)) blkirq=$((${12} - $4)) irq=$((${13} - $5)) usr=$((${14} - $6)) sys=$((${15} - $7)) sirq=$((${16} - $8))"; }

bench() {
  SPAN=64 list=$(echo "$DEVS" | tr ',' ' ')
  for ld in $list; do
    lab=${ld%%:*} D=${ld#*:}; b=${D##*/}
    waitdev $D || { ck bench-disk-$lab 1 "$D missing"; return; }
    echo "XSB-GUEST-DISK $lab $b sectors=$(cat /sys/block/$b/size) max_sectors_kb=$(cat /sys/block/$b/queue/max_sectors_kb) max_segments=$(cat /sys/block/$b/queue/max_segments) nr_requests=$(cat /sys/block/$b/queue/nr_requests) write_cache=$(cat /sys/block/$b/queue/write_cache 2>/dev/null)"
    # fill the span once (allocates every cluster of a qcow2 / every block of a raw file)
    xsbio $D fill 1048576 $SPAN 0 "$lab-r$ROUND" || ck bench-fill-$lab 1
  done
  echo "XSB-FILLED uptime=$(up)"
  # odd rounds in the order given, even rounds reversed (drift of the host load cancels out)
  [ $((ROUND % 2)) = 0 ] && { r=; for ld in $list; do r="$ld $r"; done; list=$r; }
  for t in $TESTS; do
    set -- $(echo "$t" | tr ':' ' ')
    for ld in $list; do
      [ "$SETTLE" -gt 0 ] 2>/dev/null && sleep "$SETTLE"
      c0=$(cpus)
      o=$(xsbio ${ld#*:} $1 $2 $SPAN $SECS "${ld%%:*}-r$ROUND" $3) || ck "bench-$1-${ld%%:*}" 1
      echo "$o"
      # where the time of the test went, seen from the guest (USER_HZ ticks): busy = the
      # guest's own CPU (user, system, irq, softirq); away = idle + steal, which on the test
      # bed's one physical CPU is dom0's and Xen's time (the backend's share of a request)
      c1=$(cpus); echo "$o" | grep -q '^XSB-BENCH' && echo "XSB-CPU ${o#XSB-BENCH } $(cpu_delta "$c0" "$c1")"
    done
  done
  ck bench-ran 0
}

case $PHASE in
  fs) fs_test;;
  bench) bench;;
  *) echo "XSB-GUEST-CHECK phase bad: '$PHASE'";;
esac
sync
echo "XSB-GUEST-DONE uptime=$(up)"
while :; do sleep 10; done
