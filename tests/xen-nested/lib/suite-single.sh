#!/bin/bash
# suite-single.sh - the single-host suite, run inside dom0 by ci.sh (via boot.sh).
#  toolstack: xenstored + xenconsoled running, `xl list` works, /dev/xen backend devices;
#  project binaries: each /xtb/bin program answers --help (when the host delivered any);
#  guest: `xl create` of the busybox PV guest with a raw file disk (loop + kernel blkback),
#    the guest writes 1 MiB through blkfront, drops its cache, reads it back and compares;
#  xl save / xl restore: the domain is gone after save, and after restore its tick counter
#    continues (same instance resumed);
#  xl save -c: the domain keeps running; after destroy + restore of the checkpoint the counter
#    restarts from the checkpoint's value (the guest really went back);
#  and from dom0 the guest's disk file holds what the guest wrote.
. "$XTB_LIB/xtb.sh"
G=guest1
CON=$(xtb_console $G)

xtb_section "dom0 toolstack"
xtb_info "dom0 uptime $(cut -d' ' -f1 /proc/uptime)s, $(cat /etc/xtb-image)"
pgrep -x oxenstored >/dev/null || pgrep -x xenstored >/dev/null; xtb_check xenstored-running $?
pgrep -x xenconsoled >/dev/null; xtb_check xenconsoled-running $?
xl list > /tmp/xl-list 2>&1; rc=$?; cat /tmp/xl-list
[ $rc = 0 ] && grep -q '^Domain-0 ' /tmp/xl-list; xtb_check xl-list $?
xl info | grep -E '^(xen_version|xen_caps|virt_caps|total_memory|free_memory|nr_cpus)' | sed 's/^/  /'
[ -e /dev/xen/gntdev ] && [ -e /dev/xen/evtchn ] && [ -e /dev/xen/privcmd ]; xtb_check dev-xen-gntdev-evtchn-privcmd $?

xtb_section "project binaries (host build of the workspace, delivered over 9p)"
if ls /xtb/bin/* >/dev/null 2>&1; then
  for b in /xtb/bin/*; do
    out=$(timeout 30 "$b" --help 2>&1); rc=$?
    echo "$out" | head -5 | sed "s|^|  $(basename "$b"): |"
    xtb_check "bin-$(basename "$b")-help" $rc
  done
else
  xtb_info "no project binaries delivered (boot.sh --bins not given)"
fi

xtb_section "PV guest with a file-backed disk (loop + kernel blkback)"
xtb_guest_create $G || xtb_abort "guest did not start"
xtb_wait_tick $G 2 60
grep -a 'GUEST-' "$CON" | grep -v TICK | sed 's/^/  /'
grep -aq 'GUEST-DISK-CHECK ok' "$CON"; xtb_check guest-disk-write-read $? "$(grep -ao 'GUEST-DISK-CHECK.*' "$CON" | head -1)"
xl block-list $G; losetup -a | sed 's/^/  /'
xenstore-ls /local/domain/0/backend 2>/dev/null | grep -E '^ *vbd' | head -1 | grep -q vbd; xtb_check blkback-vbd-in-xenstore $?

xtb_section "xl save / xl restore"
B=$(xtb_last_tick $G); echo "  tick before save: $B"
xtb_step xl-save 120 xl save $G /var/lib/xen/save/$G.save || xtb_abort "xl save failed"
ls -la /var/lib/xen/save/$G.save | sed 's/^/  /'
! xl list $G >/dev/null 2>&1; xtb_check domain-gone-after-save $?
T=$(xtb_now)
xtb_step xl-restore 120 xl restore /var/lib/xen/save/$G.save || xtb_abort "xl restore failed"
xtb_wait_tick $G "$B" 60; rc=$?
xtb_timing restore-to-next-tick "$(xtb_since "$T")"
A=$(xtb_last_tick $G); echo "  tick after restore: $A"
xtb_check guest-resumed-after-restore $rc "tick $B -> $A" || xtb_abort "guest not running after restore"
rm -f /var/lib/xen/save/$G.save

xtb_section "xl save -c (checkpoint; the domain keeps running) and restore of the checkpoint"
xtb_wait_tick $G "$A" 30
CK0=$(xtb_last_tick $G)   # the checkpoint's tick is between CK0 and CK (the guest ticks while xl save -c copies)
xtb_step xl-save-checkpoint 120 xl save -c $G /var/lib/xen/save/$G.ckpt || xtb_abort "xl save -c failed"
CK=$(xtb_last_tick $G); echo "  tick at checkpoint: $CK0..$CK"
xl list $G >/dev/null 2>&1; xtb_check domain-running-after-save-c $?
xtb_wait_tick $G $((CK + 2)) 60; xtb_check guest-ticking-after-save-c $?
LATE=$(xtb_last_tick $G); echo "  tick before destroy: $LATE"
xtb_step xl-destroy 60 xl destroy $G
L0=$(xtb_tick_count $G)
T=$(xtb_now)
xtb_step xl-restore-checkpoint 120 xl restore /var/lib/xen/save/$G.ckpt || xtb_abort "restore of the checkpoint failed"
xtb_wait 60 eval '[ "$(xtb_tick_count '$G')" -gt '"$L0"' ]'
xtb_timing restore-checkpoint-to-next-tick "$(xtb_since "$T")"
NEXT=$(xtb_tick_at $G $((L0 + 1)))
echo "  first tick after restoring the checkpoint: ${NEXT:-none} (checkpoint $CK0..$CK, before destroy $LATE)"
# back in time: the first tick after the restore follows the checkpoint's (CK0..CK), not LATE
[ -n "$NEXT" ] && [ "$NEXT" -ge "$CK0" ] && [ "$NEXT" -le $((CK + 1)) ] && [ "$NEXT" -le "$LATE" ]
xtb_check checkpoint-state-restored $? "tick $LATE -> $NEXT, checkpoint $CK0..$CK"
xtb_wait_tick $G "$NEXT" 30; xtb_check guest-running-after-checkpoint-restore $?

xtb_section "guest's disk seen from dom0"
xtb_step xl-destroy-final 60 xl destroy $G
head -c 512 $XTB_GUESTDIR/$G.img | grep -aq GUEST-WROTE-XVDA; xtb_check disk-file-has-guest-marker $?
dd if=$XTB_GUESTDIR/$G.img bs=512 skip=1 count=1 2>/dev/null | grep -ao 'TICK [0-9]*' | sed 's/^/  last tick on disk: /'
xl list
xtb_finish
