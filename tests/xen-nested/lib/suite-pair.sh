#!/bin/bash
# suite-pair.sh - runs in BOTH dom0s of pair.sh (XTB_ROLE=a|b, XTB_PEER=the other's address).
#  link:  the peer answers ping; a TCP echo server (socat) on each side returns a token and
#         8 MiB of random data unchanged (md5), with the throughput as INFO;
#  cold migration over the link: a starts the PV guest, `xl save`s it and streams the save
#         file + the guest's disk to b (socat); b `xl restore`s it and the guest's tick counter
#         continues there. (Live `xl migrate`/`xl remus` of PV guests cannot work with Debian's
#         Xen: it is built without shadow paging, so PV log-dirty fails with error 95.)
#  a final barrier so neither host powers off while the other still needs it.
. "$XTB_LIB/xtb.sh"
ROLE=${XTB_ROLE:?} PEER=${XTB_PEER:?}
G=mig
# background servers: 7000 echo, 7002 barrier ("done" from the peer)
socat TCP-LISTEN:7000,reuseaddr,fork EXEC:cat 2>/dev/null &
( socat -u TCP-LISTEN:7002,reuseaddr - > /tmp/peer-done ) 2>/dev/null &
# send MSG to the peer's barrier port (retrying while the peer is not listening yet)
tell_peer() { xtb_wait "${2:-300}" sh -c "echo $1 | socat -u - TCP:$PEER:7002,connect-timeout=2"; }

xtb_section "link to the peer ($XTB_PEER_NAME, $PEER)"
ip -br addr show eth0 | sed 's/^/  /'
xl list >/dev/null; xtb_check xl-list $?
T=$(xtb_now)
xtb_wait 300 busybox ping -c1 -W1 "$PEER"; xtb_check peer-ping $? || xtb_abort "no link to the peer"
xtb_timing peer-reachable "$(xtb_since "$T")"
busybox ping -c3 "$PEER" | tail -1 | sed 's/^/  /'
xtb_wait 120 sh -c "echo hello-from-$ROLE | socat -T5 - TCP:$PEER:7000,connect-timeout=2 | grep -q hello-from-$ROLE"
xtb_check tcp-echo $?
head -c 8M /dev/urandom > /tmp/blob; W=$(md5sum < /tmp/blob | cut -d' ' -f1)
T=$(xtb_now)
R=$(timeout 120 socat -T10 - TCP:$PEER:7000 < /tmp/blob | md5sum | cut -d' ' -f1)
S=$(xtb_since "$T"); xtb_timing tcp-echo-8MiB "$S"
[ "$W" = "$R" ]; xtb_check tcp-bulk-echo-8MiB $? "$(awk -v s="$S" 'BEGIN{printf "%.1f MiB/s round trip", 8/s}')"

xtb_section "cold migration of a PV guest: xl save on a -> stream -> xl restore on b"
if [ "$ROLE" = a ]; then
  if xtb_guest_create $G; then
    xtb_wait_tick $G 2 60
    B=$(xtb_last_tick $G)
    xtb_step xl-save 120 xl save $G /var/lib/xen/save/$G.save
    echo "$B" > /var/lib/xen/save/$G.tick
    T=$(xtb_now)
    ( cd / && tar -cS var/lib/xen/save/$G.save var/lib/xen/save/$G.tick var/lib/xtb/$G.img var/lib/xtb/$G.cfg ) > /tmp/mig.tar
    xtb_wait 120 sh -c "socat -u FILE:/tmp/mig.tar TCP:$PEER:7001,connect-timeout=2"; xtb_check send-guest-to-peer $?
    xtb_timing send-save-and-disk "$(xtb_since "$T")"
    xtb_info "sent $(du -h --apparent-size /tmp/mig.tar | cut -f1) (save file + sparse disk) to $PEER"
  else
    xtb_wait 60 sh -c "socat -u /dev/null TCP:$PEER:7001,connect-timeout=2"   # b stops waiting
  fi
else
  T=$(xtb_now)
  timeout 400 socat -u TCP-LISTEN:7001,reuseaddr - > /tmp/mig.tar; rc=$?
  [ $rc = 0 ] && [ -s /tmp/mig.tar ]; xtb_check receive-guest-from-peer $?
  xtb_timing receive-save-and-disk "$(xtb_since "$T")"
  if (cd / && tar -xSf /tmp/mig.tar); then
    B=$(cat /var/lib/xen/save/$G.tick)
    rm -f "$(xtb_console $G)"
    T=$(xtb_now)
    xtb_step xl-restore-on-peer 120 xl restore /var/lib/xen/save/$G.save
    xtb_wait_tick $G "$B" 60; rc=$?
    xtb_timing restore-to-next-tick "$(xtb_since "$T")"
    xtb_check guest-resumed-on-peer $rc "tick $B on a -> $(xtb_tick_at $G 1) on b"
    xl list
    xl destroy $G
  fi
fi

xtb_section "barrier"
T=$(xtb_now)
tell_peer done 300; xtb_check barrier-sent $?
xtb_wait 300 grep -q done /tmp/peer-done; xtb_check barrier-peer-done $?
xtb_timing barrier-wait "$(xtb_since "$T")"
xtb_destroy_all
xtb_finish
