#!/bin/bash
# fpu-regs.sh - dom0 script: do dom0's AVX registers survive while a PV guest runs?
#   gcc -O2 -mavx -static -o /tmp/fpu-regs tests/xen-nested/probes/fpu-regs.c
#   tests/xen-nested/boot.sh --name fpu-regs --put /tmp/fpu-regs tests/xen-nested/probes/fpu-regs.sh
#   (XTB_EAGER_FPU=0 in the host environment reproduces the lazy-FPU corruption)
# Checks: registers intact without a guest and with one, and no dom0 process crashed meanwhile.
. "$XTB_LIB/xtb.sh"
F=/xtb/put/fpu-regs
[ -x "$F" ] || xtb_abort "no $F (build it on the host and pass --put, see the header)"
xtb_info "cpu flags: $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx|avx2|xsave|xsaveopt|xsavec|xsaves|fsgsbase|pku|pcid)$' | tr '\n' ' ')"
xl dmesg | grep -E 'xstate|Xen settings|Command line' | sed 's/^/INFO xen: /'
$F 15 > /tmp/fp0.txt; xtb_check fpu-regs-no-guest $? "$(tail -1 /tmp/fp0.txt)"
xtb_guest_create g1 || { xl destroy g1; xtb_guest_create g1; } || xtb_abort "no guest"
n0=$(dmesg | grep -c -E 'segfault|general protection')
( for _ in $(seq 400); do /bin/true; done ) &
$F 60 > /tmp/fp1.txt; rc=$?; head -8 /tmp/fp1.txt
xtb_check fpu-regs-with-guest $rc "$(tail -1 /tmp/fp1.txt)"
wait
n1=$(dmesg | grep -c -E 'segfault|general protection')
xtb_check no-dom0-crashes $((n1 - n0)) "$((n1 - n0)) segfault/GP lines in dom0's dmesg"
xl destroy g1
xtb_finish
