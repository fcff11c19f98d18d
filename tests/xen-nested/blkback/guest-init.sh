#!/bin/sh
# PID 1 of the PV guest of the blkback-snap test (replaces /init of the test bed's guest
# initramfs; main.sh repacks it in dom0). Kernel cmdline: xsb.phase=write|verify.
#  write:  writes a data set of random chunks at several offsets of /dev/xvda (plus a few
#          single sectors), records "offset length sha256" lines in a manifest stored in the
#          first 4 KiB of the disk, syncs, drops the page cache, reads everything back through
#          blkfront and compares (XSB-GUEST-CHECK write-readback ok|bad).
#  verify: reads the manifest from the disk and checks every chunk (XSB-GUEST-CHECK persist ok|bad)
# Then prints XSB-GUEST-DONE and idles (dom0 destroys the domain).
PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev 2>/dev/null
for m in $(cat /modules.order); do insmod "/lib/modules/$m" 2>/dev/null; done
PHASE=none
for w in $(cat /proc/cmdline); do case $w in xsb.phase=*) PHASE=${w#xsb.phase=};; esac; done
up() { cut -d' ' -f1 /proc/uptime; }
echo "XSB-GUEST-BOOTED phase=$PHASE uptime=$(up) kernel=$(uname -r)"
D=/dev/xvda
i=0; while [ ! -b $D ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
if [ ! -b $D ]; then echo "XSB-GUEST-CHECK disk bad: $D missing ($(ls /sys/block | tr '\n' ' '))"; echo XSB-GUEST-DONE; while :; do sleep 10; done; fi
echo "XSB-GUEST-DISK sectors=$(cat /sys/block/xvda/size) ro=$(cat /sys/block/xvda/ro) max_sectors_kb=$(cat /sys/block/xvda/queue/max_sectors_kb 2>/dev/null) max_segments=$(cat /sys/block/xvda/queue/max_segments 2>/dev/null)"
sha() { sha256sum | cut -d' ' -f1; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
# "bs count seek" per chunk: 1 MiB chunks at 1, 5, 17, 40 and 62 MiB (bs=64k), a 4 MiB chunk
# at 20 MiB written with bs=1M (large requests -> indirect descriptors), and three odd sectors.
CHUNKS="65536:16:16 65536:16:80 65536:16:272 1048576:4:20 65536:16:640 65536:16:992 512:1:4099 512:3:8195 512:1:131071"
verify_all() {  # manifest on stdin; prints bad count
  bad=0; n=0
  while read -r bs cnt seek want; do
    [ -n "$want" ] || continue
    n=$((n+1))
    got=$(dd if=$D bs=$bs count=$cnt skip=$seek 2>/dev/null | sha)
    if [ "$got" != "$want" ]; then bad=$((bad+1)); echo "XSB-GUEST-MISMATCH bs=$bs count=$cnt skip=$seek want=$want got=$got"; fi
  done
  echo "$n $bad"
}
case $PHASE in
  write)
    : > /tmp/manifest
    for c in $CHUNKS; do
      bs=${c%%:*}; r=${c#*:}; cnt=${r%%:*}; seek=${r#*:}
      dd if=/dev/urandom of=/tmp/chunk bs=$bs count=$cnt 2>/dev/null
      s=$(sha < /tmp/chunk)
      dd if=/tmp/chunk of=$D bs=$bs seek=$seek conv=notrunc 2>/dev/null || echo "XSB-GUEST-WRITE-ERROR $c"
      echo "$bs $cnt $seek $s" >> /tmp/manifest
    done
    rm -f /tmp/chunk
    # the manifest itself: first 4 KiB of the disk, zero padded
    dd if=/tmp/manifest of=$D bs=4096 count=1 conv=sync,notrunc 2>/dev/null
    drop
    echo "XSB-GUEST-WROTE $(wc -l < /tmp/manifest) chunks uptime=$(up)"
    set -- $(verify_all < /tmp/manifest)
    if [ "$2" = 0 ] && [ "$1" -gt 0 ]; then echo "XSB-GUEST-CHECK write-readback ok ($1 chunks)"; else echo "XSB-GUEST-CHECK write-readback bad ($2 of $1 differ)"; fi
    m=$(dd if=$D bs=4096 count=1 2>/dev/null | tr -d '\000' | sha)
    [ "$m" = "$(sha < /tmp/manifest)" ] && echo "XSB-GUEST-CHECK manifest-readback ok" || echo "XSB-GUEST-CHECK manifest-readback bad"
    echo "XSB-GUEST-MANIFEST-SHA $(sha < /tmp/manifest)"
    ;;
  verify)
    dd if=$D bs=4096 count=1 2>/dev/null | tr -d '\000' > /tmp/manifest
    echo "XSB-GUEST-MANIFEST-SHA $(sha < /tmp/manifest) lines=$(wc -l < /tmp/manifest)"
    set -- $(verify_all < /tmp/manifest)
    if [ "$2" = 0 ] && [ "$1" -gt 0 ]; then echo "XSB-GUEST-CHECK persist ok ($1 chunks)"; else echo "XSB-GUEST-CHECK persist bad ($2 of $1 differ)"; fi
    # and the disk still takes writes after a restart of the backend
    dd if=/dev/urandom of=/tmp/c bs=65536 count=8 2>/dev/null; s=$(sha < /tmp/c)
    dd if=/tmp/c of=$D bs=65536 seek=800 conv=notrunc,fsync 2>/dev/null; drop
    [ "$(dd if=$D bs=65536 count=8 skip=800 2>/dev/null | sha)" = "$s" ] && echo "XSB-GUEST-CHECK second-boot-write ok" || echo "XSB-GUEST-CHECK second-boot-write bad"
    ;;
  *) echo "XSB-GUEST-CHECK phase bad: unknown phase '$PHASE'";;
esac
sync
echo "XSB-GUEST-DONE uptime=$(up)"
while :; do sleep 10; done
