#!/bin/sh
# PID 1 of the checkpoint test's PV guest: load blkfront, run the checker on /dev/xvda.
PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev 2>/dev/null
for m in $(cat /modules.order); do insmod "/lib/modules/$m" 2>/dev/null; done
i=0; while [ ! -b /dev/xvda ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
echo "CK-GUEST-BOOTED xvda=$(cat /sys/block/xvda/size 2>/dev/null)"
/checker /dev/xvda
echo "CK-GUEST-CHECKER-EXITED rc=$?"
while :; do sleep 10; done
