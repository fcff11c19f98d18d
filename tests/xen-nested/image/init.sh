#!/bin/bash
# dom0 PID 1 of the xensnap nested test bed (/usr/local/sbin/xtb-init; dom0 cmdline init=...).
# No systemd, no udev, no stdin. It
#  1. mounts the basic filesystems and creates the /dev/std* links that Xen's hotplug scripts
#     need (without /dev/stdin, locking.sh spins and `xl create` times out after 40 s);
#  2. does what Debian's xencommons does: xen modules, xenfs, oxenstored, xen-init-dom0,
#     xenconsoled (guest consoles logged to /var/log/xen/console/guest-NAME.log);
#  3. configures eth0 if the host gave it an address (xtb.ip=A.B.C.D/NN);
#  4. mounts the host's per-run 9p share (tag xtb) on /xtb, prints XTB-DOM0-READY, runs
#     /xtb/run.sh with a time limit (xtb.timeout=SECONDS), its output going to hvc0 and
#     /xtb/out/dom0.log;
#  5. copies Xen logs to /xtb/out, writes /xtb/out/rc, prints "XTB-RESULT rc=N" and reboots:
#     Xen restarts the machine and QEMU (-no-reboot) exits.
# Other cmdline knobs: xtb.hostname=NAME, xtb.shell=1 (interactive bash on hvc0 instead of run.sh).
export PATH=/xtb/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/usr/lib/xen-4.17/bin
export HOME=/root TERM=${TERM:-vt100} LANG=C.UTF-8
up() { cut -d' ' -f1 /proc/uptime; }
log() { echo "[xtb-init $(up)s] $*"; }
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys  || mount -t sysfs sysfs /sys
mountpoint -q /dev  || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs -o mode=755 tmpfs /run; mount -t tmpfs tmpfs /tmp
mount -o remount,rw /
ln -sfn /proc/self/fd /dev/fd; ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout; ln -sf /proc/self/fd/2 /dev/stderr
CMDLINE=$(cat /proc/cmdline)
arg() { local w; for w in $CMDLINE; do case $w in "$1="*) echo "${w#*=}"; return 0;; esac; done; return 1; }
hostname "$(arg xtb.hostname || echo dom0)"
log "XTB-DOM0-USERSPACE kernel=$(uname -r) cmdline: $CMDLINE"

finish() {
  local rc=$1
  log "XTB-RESULT rc=$rc"
  if mountpoint -q /xtb; then
    mkdir -p /xtb/out/xen-logs
    cp -r /var/log/xen/. /xtb/out/xen-logs/ 2>/dev/null
    xl dmesg > /xtb/out/xen-logs/xl-dmesg.txt 2>/dev/null
    dmesg > /xtb/out/xen-logs/dom0-dmesg.txt 2>/dev/null
    echo "$rc" > /xtb/out/rc; sync; umount /xtb
  fi
  sync
  log "XTB-POWEROFF"
  busybox reboot -f 2>/dev/null || echo b > /proc/sysrq-trigger
  sleep 30; echo b > /proc/sysrq-trigger
}

# ---- xencommons equivalent
T=$(up)
for m in xenfs xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xen-blkback xen-netback loop 9pnet_virtio 9p; do
  modprobe "$m" || log "WARN: modprobe $m failed"
done
mount -t xenfs xenfs /proc/xen || { log "XTB-FAIL xenfs mount"; finish 120; }
grep -q control_d /proc/xen/capabilities || { log "XTB-FAIL not dom0"; finish 121; }
mkdir -p -m 700 /run/xen; mkdir -p /run/xenstored /var/lib/xen/save /var/log/xen/console /var/lib/xen/dump /var/run/xen
export XENSTORED_ROOTDIR=/run/xenstored
XS=oxenstored; [ -x /usr/lib/xen-4.17/bin/oxenstored ] || XS=xenstored
/usr/lib/xen-4.17/bin/$XS --pid-file /run/xenstore.pid || { log "XTB-FAIL $XS"; finish 122; }
for _ in $(seq 1 200); do xenstore-read -s / >/dev/null 2>&1 && break; sleep 0.1; done
xen-init-dom0 >/dev/null || log "WARN: xen-init-dom0 failed"
xenconsoled --pid-file /run/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console || log "WARN: xenconsoled failed"
log "xen services up in $(awk -v a="$T" -v b="$(up)" 'BEGIN{printf "%.2f", b-a}')s ($XS, xenconsoled)"

# ---- network (only the QEMU link the host set up; no outside addresses)
ip link set lo up
if IP=$(arg xtb.ip); then
  modprobe virtio_net
  for _ in $(seq 1 50); do [ -e /sys/class/net/eth0 ] && break; sleep 0.1; done
  ip link set eth0 up && ip addr add "$IP" dev eth0 && log "eth0 $IP" || log "WARN: eth0 setup failed"
fi

# ---- per-run share + the run script
mkdir -p /xtb
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 xtb /xtb || log "WARN: no 9p share 'xtb'"
log "XTB-DOM0-READY uptime=$(up)"
if [[ " $CMDLINE " == *" xtb.shell=1 "* ]]; then
  log "xtb.shell=1: interactive shell on hvc0; exit to power off"
  setsid -c bash -l </dev/hvc0 >/dev/hvc0 2>&1
  finish 0
fi
mountpoint -q /xtb && [ -f /xtb/run.sh ] || { log "XTB-FAIL no /xtb/run.sh"; finish 123; }
mkdir -p /xtb/out
export XTB_DIR=/xtb XTB_OUT=/xtb/out
TMO=$(arg xtb.timeout || echo 600)
log "running /xtb/run.sh (limit ${TMO}s)"
cd /root
# Own session so the whole script can be killed; tee via process substitution, so background
# processes of run.sh that keep the output open cannot stop PID 1 from finishing.
setsid bash /xtb/run.sh </dev/null > >(tee /xtb/out/dom0.log) 2>&1 &
SPID=$!
# Builtins only (read, kill): under TCG, processes forked while xl creates/restores a domain
# sometimes crash (segfault/GP in libc), and a crashed `$(...)` here must not end the wait.
upsec() { local u; read -r u _ < /proc/uptime; UP=${u%.*}; }
upsec; END=$(( UP + TMO ))
while kill -0 $SPID 2>/dev/null; do upsec; [ "$UP" -ge "$END" ] && break; sleep 1; done
if kill -0 $SPID 2>/dev/null; then
  log "XTB-FAIL run.sh hit its ${TMO}s limit; processes (D = stuck in the kernel):"
  ps -eo pid,ppid,stat,wchan:28,etime,args | grep -v ' \[' | tee /xtb/out/ps-at-timeout.txt
  for p in $(ps -eo pid=,stat= | awk '$2 ~ /^D/{print $1}'); do echo "--- stack of $p ($(cat /proc/$p/comm)):"; cat /proc/$p/stack; done 2>/dev/null | tee -a /xtb/out/ps-at-timeout.txt
  kill -TERM -- -$SPID 2>/dev/null; sleep 5; kill -KILL -- -$SPID 2>/dev/null; sleep 1
  rc=124
else
  wait $SPID; rc=$?
fi
sleep 1
finish "$rc"
