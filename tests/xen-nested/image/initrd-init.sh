#!/bin/sh
# /init of dom0's tiny busybox initrd: load virtio-pci/virtio-blk/ext4 (list in /modules.order,
# dependencies first), mount root= read-only and switch_root to init=. Every failure path
# reboots (Xen then restarts the machine and QEMU -no-reboot exits), so CI never hangs here.
PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
die() { echo "XTB-INITRD-FAIL: $*"; ls /dev; sleep 1; reboot -f; sleep 10; echo b > /proc/sysrq-trigger; }
for m in $(cat /modules.order); do insmod "/lib/modules/$m" 2>/dev/null; done
ROOT=/dev/vda INIT=/sbin/init
for w in $(cat /proc/cmdline); do case $w in root=*) ROOT=${w#root=};; init=*) INIT=${w#init=};; esac; done
i=0; while [ ! -b "$ROOT" ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done
mkdir -p /newroot
mount -t ext4 -o ro "$ROOT" /newroot || die "cannot mount $ROOT"
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot "$INIT"
die "switch_root failed"
