#!/bin/sh
# PID 1 of the tiny busybox PV guest (packed into the guest initramfs in dom0's image).
# 1. disk check: writes a 1 MiB random pattern at offset 1 MiB of /dev/xvda, drops the page
#    cache, reads it back through blkfront and compares checksums (GUEST-DISK-CHECK ok|bad);
#    sector 0 gets a marker line that dom0 can see in the backing file.
# 2. then ticks once a second: "GUEST-TICK n" on hvc0 and "TICK n" in sector 1, so dom0 can
#    tell whether save/restore resumed the same instance (the counter continues) or went
#    back to a checkpoint (the counter restarts from the checkpoint's value).
# Guest kernel cmdline knobs: xtb.nodisk=1 (skip the disk check).
PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev 2>/dev/null
up() { cut -d' ' -f1 /proc/uptime; }
for m in $(cat /modules.order); do insmod "/lib/modules/$m" 2>/dev/null; done
echo "GUEST-BOOTED uptime=$(up) kernel=$(uname -r)"
D=/dev/xvda
if ! grep -qw xtb.nodisk=1 /proc/cmdline; then
  i=0; while [ ! -b $D ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
  if [ -b $D ]; then
    echo "GUEST-DISK present $(cat /sys/block/xvda/size) sectors"
    echo "GUEST-WROTE-XVDA uptime=$(up)" | dd of=$D bs=512 count=1 conv=sync,notrunc,fsync 2>/dev/null
    dd if=/dev/urandom of=/tmp/pat bs=64k count=16 2>/dev/null
    W=$(md5sum < /tmp/pat | cut -d' ' -f1)
    dd if=/tmp/pat of=$D bs=64k seek=16 count=16 conv=notrunc,fsync 2>/dev/null
    sync; echo 3 > /proc/sys/vm/drop_caches
    R=$(dd if=$D bs=64k skip=16 count=16 2>/dev/null | md5sum | cut -d' ' -f1)
    if [ "$W" = "$R" ]; then echo "GUEST-DISK-CHECK ok md5=$W"; else echo "GUEST-DISK-CHECK bad wrote=$W read=$R"; fi
    rm -f /tmp/pat
  else
    echo "GUEST-DISK-CHECK bad: $D missing"; ls /sys/block
  fi
fi
echo "GUEST-READY uptime=$(up)"
n=0
while true; do
  n=$((n+1))
  echo "GUEST-TICK $n uptime=$(up)"
  [ -b $D ] && printf 'TICK %08d\n' $n | dd of=$D bs=512 seek=1 count=1 conv=sync,notrunc,fsync 2>/dev/null
  sleep 1
done
