#!/bin/bash
# probe.sh - dom0 script: run libxc-ffi's xen_probe example (delivered in /xtb/bin) in a real
# Xen 4.17 dom0 and report every line. One CHECK per probe line, plus the overall result.
. "$XTB_LIB/xtb.sh"
xtb_section "libxc-ffi xen_probe in real dom0"
xtb_info "dom0 $(uname -r); modules: $(lsmod | awk 'NR>1 && /xen/{printf "%s ", $1}')"
command -v xen_probe >/dev/null || { xtb_check xen-probe-present 1 "no xen_probe in /xtb/bin"; xtb_finish; }
timeout 120 xen_probe > "$XTB_OUT/xen_probe.txt" 2>&1; rc=$?
sed 's/^/  /' "$XTB_OUT/xen_probe.txt"
n=0
while IFS= read -r l; do
  case $l in
    OK*)   n=$((n+1)); xtb_check "probe-$n" 0 "${l#OK }";;
    FAIL*) n=$((n+1)); xtb_check "probe-$n" 1 "${l#FAIL }";;
  esac
done < "$XTB_OUT/xen_probe.txt"
xtb_check xen-probe-exit $rc "exit status = number of failed probe checks"
xtb_finish
