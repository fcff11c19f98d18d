#!/bin/bash
# main.sh - dom0 script of the blkback-snap real-Xen test (run via run.sh / boot.sh).
# A PV guest boots with xvda served by blkback-snap from a qcow2 image (disk spec
# script=xensnap, hook hooks/xensnap, watcher `blkback-snap watch`); the guest writes a data
# set with sha256 sums, syncs, drops its cache, reads back and verifies; the guest is
# destroyed and a second guest on the same image verifies the data again; the image is
# checked from dom0 after each destroy and copied back to the host ($XTB_OUT/xsb.qcow2) for
# `qemu-img check` there. Also: libxc-ffi's xen_probe, the control socket (status,
# quiesce/resume, a live checkpoint), and the serving process's exit on device removal.
# Needs in /xtb/bin: blkback-snap (xen_probe optional); in /xtb/put: xensnap (hook),
# guest-init.sh, xsb.qcow2 (64 MiB qcow2 made on the host).
. "$XTB_LIB/xtb.sh"
P=/xtb/put
IMG=$XTB_GUESTDIR/xsb.qcow2
INITRD=$XTB_GUESTDIR/xsb-initrd.gz
BS=$(command -v blkback-snap)

xtb_section "setup"
if command -v xen_probe >/dev/null; then
  timeout 120 xen_probe > "$XTB_OUT/xen_probe.txt" 2>&1
  xtb_info "xen_probe: $(tail -1 "$XTB_OUT/xen_probe.txt"); failures: $(grep '^FAIL' "$XTB_OUT/xen_probe.txt" | tr '\n' ' ')"
fi
[ -x "$BS" ]; xtb_check blkback-snap-present $? "$BS"
# The kernel backend would claim the same vbds: unload it (no guest is running yet).
rmmod xen-blkback 2>/dev/null; [ ! -e /sys/bus/xen-backend/drivers/vbd ]; xtb_check kernel-blkback-unloaded $?
install -m 755 "$P/xensnap" /etc/xen/scripts/xensnap; xtb_check hook-installed $?
cp "$P/xsb.qcow2" "$IMG"; xtb_check image-copied $? "$(ls -la "$IMG")"
# guest initramfs: the test bed's one with our /init (dom0 has busybox but no cpio command)
command -v cpio >/dev/null || cpio() { busybox cpio "$@"; }
rm -rf /tmp/gi && mkdir /tmp/gi && (cd /tmp/gi && zcat /opt/xtb/guest/initrd.gz | cpio -id --quiet && install -m 755 "$P/guest-init.sh" init && find . | cpio -o -H newc --quiet | gzip -1 > "$INITRD")
xtb_check guest-initrd $? "$(ls -la "$INITRD" | awk '{print $5}') bytes"
mkdir -p /run/xensnap
BLKBACK_SNAP_LOG=info "$BS" watch --log-dir /var/log/xen > /var/log/xen/xensnap-watch.log 2>&1 &
WPID=$!
sleep 1; kill -0 $WPID 2>/dev/null; xtb_check watcher-running $? "pid $WPID"

mkcfg() {  # NAME PHASE
  cat > "$XTB_GUESTDIR/$1.cfg" <<CFG
name    = "$1"
type    = "pv"
kernel  = "/opt/xtb/guest/vmlinuz"
ramdisk = "$INITRD"
extra   = "console=hvc0 loglevel=4 xsb.phase=$2"
memory  = 128
vcpus   = 1
disk    = [ 'vdev=xvda, access=rw, script=xensnap, target=$IMG' ]
on_crash = "destroy"
CFG
  echo "$XTB_GUESTDIR/$1.cfg"
}
# boot NAME PHASE: xl create + wait for XSB-GUEST-DONE; prints the guest's XSB lines
boot() {
  local n=$1 cfg con t
  cfg=$(mkcfg "$1" "$2"); con=$(xtb_console "$n"); rm -f "$con"
  t=$(xtb_now)
  xtb_step "$n-create" 120 xl -v create "$cfg" || { tail -30 /var/log/xen/xl-$n.log 2>/dev/null; return 1; }
  xtb_wait 300 grep -aq XSB-GUEST-DONE "$con"; local rc=$?
  xtb_timing "$n-create-to-done" "$(xtb_since "$t")"
  grep -a 'XSB-' "$con" | sed 's/^/  guest: /'
  xtb_check "$n-guest-done" $rc || { tail -40 "$con"; return 1; }
}
devpath() { echo "/local/domain/0/backend/vbd/$(xl domid "$1")/51712"; }
# after destroy: serving process gone, backend dir gone, image check from dom0
after_destroy() {
  local n=$1 pid=$2 be=$3
  xtb_wait 30 eval "! kill -0 $pid"; xtb_check "$n-serving-process-exited" $? "pid $pid"
  xtb_wait 30 eval "! xenstore-exists $be"; xtb_check "$n-backend-dir-removed" $?
  out=$("$BS" check-image "$IMG" 2>&1); rc=$?
  echo "$out" | tr -d '\n' | cut -c1-400 | sed 's/^/  check-image: /'; echo
  xtb_check "$n-image-check-clean" $rc
  if command -v qemu-img >/dev/null; then qemu-img check "$IMG"; xtb_check "$n-qemu-img-check" $?; else xtb_info "no qemu-img in dom0 (host checks the copy)"; fi
}

xtb_section "guest 1: write a data set through blkback-snap"
G=xsb1
if boot $G write; then
  CON=$(xtb_console $G)
  grep -aq 'XSB-GUEST-CHECK write-readback ok' "$CON"; xtb_check guest-write-readback $? "$(grep -ao 'XSB-GUEST-CHECK write-readback.*' "$CON")"
  grep -aq 'XSB-GUEST-CHECK manifest-readback ok' "$CON"; xtb_check guest-manifest-readback $?
  BE=$(devpath $G)
  xenstore-ls -f "$BE" | grep -vE '/(frontend|params)$' | sed 's/^/  /'
  [ "$(xenstore-read $BE/state)" = 4 ]; xtb_check backend-connected $?
  [ "$(xenstore-read $BE/xensnap-status)" = ready ]; xtb_check backend-xensnap-status-ready $?
  [ "$(xenstore-read $BE/hotplug-status)" = connected ]; xtb_check hook-wrote-hotplug-status $?
  SOCK=$(xenstore-read $BE/xensnap-socket); PID1=$(xenstore-read $BE/xensnap-pid)
  "$BS" ctl "$SOCK" status > /tmp/st.json; rc=$?; sed 's/^/  /' /tmp/st.json
  [ $rc = 0 ] && grep -q '"connected": true' /tmp/st.json && grep -q '"format": "qcow2"' /tmp/st.json; xtb_check ctl-status $rc
  "$BS" ctl "$SOCK" '{"op":"quiesce","timeout_ms":5000}' > /tmp/q.json; rc=$?; tr -d '\n ' < /tmp/q.json; echo
  xtb_check ctl-quiesce $rc
  "$BS" ctl "$SOCK" status | grep -q '"quiesced": true'; xtb_check ctl-status-shows-quiesced $?
  "$BS" ctl "$SOCK" resume >/dev/null; xtb_check ctl-resume $?
  "$BS" ctl "$SOCK" '{"op":"checkpoint-create","name":"after-write"}' > /tmp/c.json; rc=$?; tr -d '\n ' < /tmp/c.json | cut -c1-300; echo
  xtb_check ctl-live-checkpoint $rc
  "$BS" ctl "$IMG.xensnap.sock" checkpoint-list | grep -q after-write; xtb_check ctl-image-socket-alias $?
  "$BS" ctl "$SOCK" stats | tr -d '\n ' ; echo
  xl block-list $G
  xtb_step $G-destroy 60 xl destroy $G
  after_destroy $G "$PID1" "$BE"
fi

xtb_section "guest 2: a new domain on the same image verifies the data"
G=xsb2
if boot $G verify; then
  CON=$(xtb_console $G)
  grep -aq 'XSB-GUEST-CHECK persist ok' "$CON"; xtb_check guest-data-persisted $? "$(grep -ao 'XSB-GUEST-CHECK persist.*' "$CON")"
  grep -aq 'XSB-GUEST-CHECK second-boot-write ok' "$CON"; xtb_check guest-second-boot-write $?
  M1=$(grep -ao 'XSB-GUEST-MANIFEST-SHA [0-9a-f]*' "$(xtb_console xsb1)" | awk '{print $2}')
  M2=$(grep -ao 'XSB-GUEST-MANIFEST-SHA [0-9a-f]*' "$CON" | awk '{print $2}')
  [ -n "$M1" ] && [ "$M1" = "$M2" ]; xtb_check manifest-same-in-both-guests $? "$M1"
  BE=$(devpath $G); PID2=$(xenstore-read $BE/xensnap-pid)
  xtb_step $G-destroy 60 xl destroy $G
  after_destroy $G "$PID2" "$BE"
fi

xtb_section "results"
cp "$IMG" "$XTB_OUT/xsb.qcow2" && xtb_info "image copied to the host: out/xsb.qcow2"
kill $WPID 2>/dev/null
for f in /var/log/xen/xensnap-*.log; do echo "--- $f"; tail -25 "$f"; done
grep -h 'xensnap\|hotplug\|error' /var/log/xen/xl-xsb*.log 2>/dev/null | tail -20 | sed 's/^/  xl: /'
xl list
xtb_finish
