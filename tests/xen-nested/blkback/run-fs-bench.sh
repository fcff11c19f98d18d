#!/usr/bin/env bash
# run-fs-bench.sh - host side of the filesystem / live-checkpoint / benchmark test of
# blkback-snap on real Xen (dom0 script main-fs.sh, guest guest-fs.sh; see README.md).
#  1. builds blkback-snap + xl-snap (release) and xsbio (static), packs e2fsprogs (mke2fs,
#     e2fsck + their libraries, from this host) for the guest, makes the qcow2 images;
#  2. boots the nested test bed once (one retry on the known TCG segfault flake / time limit);
#  3. on the fs image the guest wrote: qemu-img check; the checkpoint "during-write" (taken in
#     dom0 while the guest's writer ran) is read two ways - `qemu-img convert -l` and our own
#     engine's NBD export (`xl-snap image serve --read-only`, export checkpoint/during-write,
#     read by qemu-img over nbd+unix) - both must be identical; e2fsck -fn on it as taken; then
#     its journal is replayed on a copy (as a mount after a crash would), e2fsck -fn must be
#     clean, it must mount read-only, and every writer file whose fsync'd sum file exists in the
#     checkpoint must match its sum;
#  4. prints the benchmark table (blkback-snap qcow2 vs qdisk qcow2 vs kernel blkback raw): per
#     test the median over the rounds of each backend, the ratios snap/qdisk and snap/kernel,
#     and every round's value (see main-fs.sh for how the rounds alternate the backends).
# Exit = failed checks (dom0 + host); 124/125 as boot.sh. Env: XSB_SECS, XSB_ROUNDS,
# XSB_TIMEOUT, XSB_SNAP_THREADS (blkback-snap I/O threads, default 4), XSB_SNAP0=1 (also
# measure blkback-snap with 0 I/O threads), XSB_PHASES, XSB_CLOCK / XSB_ICOUNT_SHIFT / XSB_ERMS
# (below), and main-fs.sh's knobs (passed on).
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd); ROOT=$(cd "$HERE/../../.." && pwd); XN=$(dirname "$HERE")
# bench_table FILE: XSB-BENCH lines -> per test (mode, size, queue depth): median over rounds per
# backend (IOPS for 4 KiB, MiB/s for 1 MiB), snap/qdisk and snap/kernel (and snap0/...) ratios
bench_table() {
  awk '
    function med(s,   a, n, i, j, t) { n = split(s, a, " "); for (i = 2; i <= n; i++) { t = a[i] + 0; for (j = i - 1; j >= 1 && a[j] + 0 > t; j--) a[j+1] = a[j]; a[j+1] = t }
      return n == 0 ? 0 : (n % 2 ? a[(n+1)/2] : (a[n/2] + a[n/2+1]) / 2) }
    $1 == "XSB-BENCH" { lab = $2; sub(/-r[0-9]+$/, "", lab); mode = $3; if (mode == "fill") next
      delete v; for (i = 4; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
      if (v["qd"] == "") v["qd"] = 1
      t = mode " " (v["bs"] >= 1048576 ? "1M" : v["bs"]/1024 "K") " QD" v["qd"]
      if (!(t in seen)) { seen[t] = 1; order[++nt] = t; unit[t] = (v["bs"] >= 1048576 ? "MiB/s" : "IOPS") }
      val = (v["bs"] >= 1048576 ? v["mibps"] : v["iops"]); vals[lab, t] = vals[lab, t] " " sprintf("%.1f", val); labs[lab] = 1 }
    $1 == "XSB-CPU" { lab = $2; sub(/-r[0-9]+$/, "", lab); mode = $3; if (mode == "fill") next
      delete v; for (i = 4; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
      if (v["qd"] == "") v["qd"] = 1
      if (v["ops"] + 0 == 0) next
      t = mode " " (v["bs"] >= 1048576 ? "1M" : v["bs"]/1024 "K") " QD" v["qd"]
      # USER_HZ ticks (10 ms) per request, in us
      busy[lab, t] = busy[lab, t] " " sprintf("%.0f", v["busy"] * 10000 / v["ops"])
      away[lab, t] = away[lab, t] " " sprintf("%.0f", (v["idle"] + v["steal"]) * 10000 / v["ops"]); cpu = 1
      if (v["blkirq"] != "") { birq[lab, t] = birq[lab, t] " " sprintf("%.2f", v["blkirq"] / v["ops"]); irqs = 1 } }
    END {
      z = ("snap0" in labs)
      printf "%-20s %-5s %9s %9s %9s %s %10s %11s %s  %s\n", "test", "unit", "snap", "qdisk", "kernel", (z ? sprintf("%9s", "snap0") : ""), "snap/qdisk", "snap/kernel", (z ? "snap0/qdisk snap0/kernel" : ""), "rounds: snap | qdisk | kernel" (z ? " | snap0" : "")
      for (i = 1; i <= nt; i++) { t = order[i]
        s = med(vals["snap", t]); q = med(vals["qdisk", t]); k = med(vals["kernel", t]); s0 = med(vals["snap0", t])
        printf "%-20s %-5s %9.1f %9.1f %9.1f %s %10s %11s %s  %s |%s |%s%s\n", t, unit[t], s, q, k, (z ? sprintf("%9.1f", s0) : ""),
          (q > 0 ? sprintf("%.2fx", s/q) : "-"), (k > 0 ? sprintf("%.2fx", s/k) : "-"),
          (z ? sprintf("%11s %12s", (q > 0 ? sprintf("%.2fx", s0/q) : "-"), (k > 0 ? sprintf("%.2fx", s0/k) : "-")) : ""),
          vals["snap", t], vals["qdisk", t], vals["kernel", t], (z ? " |" vals["snap0", t] : "") }
      print "goals: snap/qdisk >= 1.20x, snap/kernel >= 0.80x"
      if (!cpu) exit
      print ""
      print "per request, seen from the guest (us, median of the rounds): busy = the guest'"'"'s own CPU, away = idle + steal"
      print "(on the one physical CPU of the test bed: dom0 and Xen, i.e. the backend'"'"'s share); one request of 1M = 8 of 128K"
      printf "%-20s %13s %13s %13s %s\n", "test", "snap", "qdisk", "kernel", (z ? sprintf("%13s", "snap0") : "")
      printf "%-20s %13s %13s %13s %s\n", "", "busy/away", "busy/away", "busy/away", (z ? sprintf("%13s", "busy/away") : "")
      for (i = 1; i <= nt; i++) { t = order[i]
        printf "%-20s %13s %13s %13s %s\n", t, med(busy["snap", t]) "/" med(away["snap", t]), med(busy["qdisk", t]) "/" med(away["qdisk", t]),
          med(busy["kernel", t]) "/" med(away["kernel", t]), (z ? sprintf("%13s", med(busy["snap0", t]) "/" med(away["snap0", t])) : "") }
      if (!irqs) exit
      print ""
      print "blkfront interrupts in the guest per request (all its disks; median of the rounds)"
      printf "%-20s %13s %13s %13s %s\n", "test", "snap", "qdisk", "kernel", (z ? sprintf("%13s", "snap0") : "")
      for (i = 1; i <= nt; i++) { t = order[i]
        printf "%-20s %13s %13s %13s %s\n", t, med(birq["snap", t]), med(birq["qdisk", t]), med(birq["kernel", t]), (z ? sprintf("%13s", med(birq["snap0", t])) : "") }
    }' "$1"
}
# `run-fs-bench.sh --table bench.txt` prints the table of an earlier run's bench.txt.
[ "${1:-}" = --table ] && { bench_table "$2"; exit 0; }
# The benchmark's clock (XSB_CLOCK): `icount` (default) runs QEMU with `-icount shift=N,sleep=on`
# (N = XSB_ICOUNT_SHIFT, default 3: every executed instruction is 8 ns of the test bed's time;
# an idle CPU waits in real time). A test's IOPS then count the work done, not the emulator's
# speed at that moment: in plain TCG the same 10 s test repeated in one guest swung up to 2x
# while the split of its time did not change (RESULTS-fs-bench.md, run T); under icount it
# repeats within a few percent (runs U-W). `wall` = plain multi-threaded TCG, the host's time.
# icount needs a single TCG thread (one vCPU anyway) and a CPU model without x2APIC (QEMU 10.0
# aborts with "Bad icount read" when Xen reads the x2APIC timer by MSR).
# The CPU model also leaves out ERMS and FSRM (XSB_ERMS=1 keeps them): with them Linux copies
# with `rep movsb`, which TCG runs one byte per step (phase C: 2.5-5.5 ms per MiB against
# 0.44-0.75 for `rep movsq` in wall time), where hardware runs it at full speed. Copies then
# weigh 4-7x more in the test bed than anything else, and more so on blkback-snap's path
# (`preadv`/`pwritev` into and out of user pages) than on loop's: run V, 1 MiB reads 0.76x
# with ERMS, 0.99x without. Both backends run on the same CPU model either way.
case ${XSB_ICOUNT_SHIFT:-3} in [0-9]|10) ;; *) echo "run-fs-bench: XSB_ICOUNT_SHIFT must be 0-10, not '$XSB_ICOUNT_SHIFT'" >&2; exit 2;; esac
case ${XSB_SETTLE:-0} in ''|*[!0-9]*) echo "run-fs-bench: XSB_SETTLE must be a number of seconds, not '$XSB_SETTLE'" >&2; exit 2;; esac
CLOCK=${XSB_CLOCK:-icount}
case $CLOCK in
  icount) export XTB_TCG_THREAD=single
          CPU=max,-smap,-x2apic
          export XTB_QEMU_EXTRA="${XTB_QEMU_EXTRA:+$XTB_QEMU_EXTRA }-icount shift=${XSB_ICOUNT_SHIFT:-3},sleep=on";;
  wall)   CPU=max,-smap;;
  *) echo "run-fs-bench: XSB_CLOCK must be icount or wall, not '$CLOCK'" >&2; exit 2;;
esac
case ${XSB_ERMS:-0} in 0) CPU=$CPU,-erms,-fsrm;; 1) ;; *) echo "run-fs-bench: XSB_ERMS must be 0 or 1, not '$XSB_ERMS'" >&2; exit 2;; esac
# XTB_CPU, when set, replaces the model (under icount keep -x2apic in it)
export XTB_CPU=${XTB_CPU:-$CPU}
CLOCK_DESC="clock: $CLOCK${XTB_QEMU_EXTRA:+ ($XTB_QEMU_EXTRA)}, cpu $XTB_CPU"
echo "run-fs-bench: $CLOCK_DESC"
BINS=${XSB_BINS:-}
if [ -z "$BINS" ]; then
  (cd "$ROOT" && cargo build --release -q -p blkback-snap -p xl-plugin --bins && cargo build --release -q -p libxc-ffi --example xen_probe && cargo build --release -q -p blkback-snap --example ring_bench) || exit 2
  BINS=$ROOT/target/release
fi
W=$(mktemp -d /tmp/xsbfs-run.XXXX); trap 'umount "$W/mnt" 2>/dev/null; rm -rf "$W"' EXIT
mkdir -p "$W/bins" "$W/ov/usr/sbin" "$W/ov/etc" "$W/mnt"
PUTS=()
cp "$BINS/blkback-snap" "$W/bins/" || exit 2
cp "$BINS/examples/xen_probe" "$W/bins/" 2>/dev/null || echo "INFO no xen_probe example in $BINS/examples"
cp "$BINS/examples/ring_bench" "$W/" 2>/dev/null && PUTS+=(--put "$W/ring_bench") || echo "INFO no ring_bench example in $BINS/examples"
gcc -O2 -static -pthread -o "$W/xsbio" "$HERE/xsbio.c" || exit 2
gcc -O2 -static -o "$W/copybench" "$HERE/copybench.c" || exit 2
# e2fsprogs for the guest (the busybox guest has mke2fs without ext4 journal support and no e2fsck)
for b in mke2fs e2fsck; do
  cp /usr/sbin/$b "$W/ov/usr/sbin/" || exit 2
  for l in $(ldd /usr/sbin/$b | grep -o '/[^ ]*'); do mkdir -p "$W/ov$(dirname "$l")"; cp -L "$l" "$W/ov$l"; done
done
cp /etc/mke2fs.conf "$W/ov/etc/"; ln -sf mke2fs "$W/ov/usr/sbin/mkfs.ext4"
tar czf "$W/xsb-guest-overlay.tgz" -C "$W/ov" . || exit 2
# strace and its libraries for dom0 (phase T of main-fs.sh), if this host has it
if command -v strace > /dev/null; then
  mkdir -p "$W/strace-kit" && cp "$(command -v strace)" "$W/strace-kit/" &&
    for l in $(ldd "$(command -v strace)" | grep -o '/[^ ]*' | grep -v 'ld-linux\|/libc\.so'); do cp -L "$l" "$W/strace-kit/"; done &&
    PUTS+=(--put "$W/strace-kit")
fi
qemu-img create -q -f qcow2 "$W/fs.qcow2" 256M || exit 2
# the two benchmark images: same qemu-img options (default 64 KiB clusters) for both backends
qemu-img create -q -f qcow2 "$W/bench-s.qcow2" 128M && qemu-img create -q -f qcow2 "$W/bench-q.qcow2" 128M || exit 2
ENV=(); for v in XSB_SECS XSB_ROUNDS XSB_PHASES XSB_SNAP_THREADS XSB_SNAP0 XSB_F_BACKENDS XSB_F_TESTS XSB_R_TESTS XSB_D_TESTS XSB_SETTLE; do [ -n "${!v:-}" ] && ENV+=(--env "$v=${!v}"); done
# one reported retry on the known TCG flakes (dom0 segfault, time limit; lib/boot-retry.sh)
. "$XN/lib/boot-retry.sh"
P=flake; [ "${XSB_RETRY:-1}" = 1 ] || P=none
xtb_boot_retry xsbfs $P "$XN/boot.sh" \
  --timeout "${XSB_TIMEOUT:-2400}" --bins "$W/bins" "${ENV[@]}" \
  --put "$ROOT/hooks/xensnap" --put "$HERE/guest-fs.sh" --put "$W/xsbio" --put "$W/copybench" --put "$W/xsb-guest-overlay.tgz" \
  --put "$W/fs.qcow2" --put "$W/bench-s.qcow2" --put "$W/bench-q.qcow2" "${PUTS[@]}" "$@" "$HERE/main-fs.sh"
OUT=$RUN/share/out
hc() { echo "CHECK $([ "$2" = 0 ] && echo PASS || echo FAIL) host-$1${3:+ ($3)}"; [ "$2" = 0 ] || RC=$((RC+1)); }

echo; echo "===== host: the checkpoint taken while the guest wrote ====="
if [ -f "$OUT/fs.qcow2" ]; then
  F=$OUT/fs.qcow2 C=during-write
  qemu-img check -q "$F"; hc fs-qemu-img-check $?
  qemu-img snapshot -l "$F"
  qemu-img convert -l snapshot.name=$C -O raw "$F" "$W/ck-qemu.raw"; hc checkpoint-qemu-img-convert $?
  # our engine's NBD export of the checkpoint, read-only
  XLS=$BINS/xl-snap
  "$XLS" image serve --read-only --socket "$W/nbd.sock" --control "$W/ctl.sock" "$F" > "$W/serve.log" 2>&1 & SP=$!
  for _ in $(seq 50); do [ -S "$W/nbd.sock" ] && break; sleep 0.1; done
  qemu-img convert -f raw -O raw "nbd+unix:///checkpoint/$C?socket=$W/nbd.sock" "$W/ck-nbd.raw"; hc checkpoint-nbd-export-read $?
  qemu-img convert -f raw -O raw "nbd+unix:///?socket=$W/nbd.sock" "$W/active-nbd.raw" 2>/dev/null
  kill $SP; wait $SP 2>/dev/null
  cmp "$W/ck-qemu.raw" "$W/ck-nbd.raw"; hc checkpoint-nbd-equals-qemu-img-view $? "sha256 $(sha256sum < "$W/ck-nbd.raw" | cut -c1-16)"
  cmp -s "$W/ck-nbd.raw" "$W/active-nbd.raw"; [ $? = 1 ]; hc checkpoint-differs-from-final-disk $?
  e2fsck -fn "$W/ck-qemu.raw" > "$W/fsck-as-taken.txt" 2>&1; r=$?
  echo "INFO e2fsck -fn on the checkpoint as taken (a crash-consistent image of a mounted ext4): rc=$r"; sed 's/^/  /' "$W/fsck-as-taken.txt" | head -20
  dumpe2fs -h "$W/ck-qemu.raw" 2>/dev/null | grep -i 'features\|state' | sed 's/^/  /'
  cp "$W/ck-qemu.raw" "$W/ck-replayed.raw"
  e2fsck -E journal_only -y "$W/ck-replayed.raw" > "$W/replay.txt" 2>&1; r=$?
  echo "INFO journal replay (e2fsck -E journal_only): rc=$r $(tr '\n' ' ' < "$W/replay.txt" | cut -c1-200)"
  e2fsck -fn "$W/ck-replayed.raw" > "$W/fsck.txt" 2>&1; r=$?; sed 's/^/  /' "$W/fsck.txt"
  hc checkpoint-fsck-clean-after-journal-replay $r
  mount -o ro,loop "$W/ck-replayed.raw" "$W/mnt"; r=$?; hc checkpoint-mounts-read-only $r "$(grep " $W/mnt " /proc/mounts | cut -d' ' -f3,4)"
  if [ $r = 0 ]; then
    (cd "$W/mnt" && sha256sum -c SUMS 2>/dev/null | grep -c ': OK$') > "$W/n"; echo "INFO data set files present in the checkpoint and OK: $(cat "$W/n") (part deleted before fstrim)"
    n=0 bad=0 maxi=0
    for s in "$W/mnt"/w/s*; do
      [ -e "$s" ] || continue; j=${s##*/s}; want=$(cat "$s")
      [ ${#want} = 64 ] || { echo "  incomplete sum file s$j (${#want} chars): not yet durable, allowed"; continue; }
      n=$((n+1)); [ "$j" -gt $maxi ] && maxi=$j
      [ "$(sha256sum < "$W/mnt/w/f$j" | cut -d' ' -f1)" = "$want" ] || { bad=$((bad+1)); echo "  MISMATCH f$j"; }
    done
    read -r W0 W1 < "$OUT/checkpoint-writer-index.txt" 2>/dev/null || W0=? W1=?
    [ $n -gt 0 ] && [ $bad = 0 ]; hc checkpoint-writer-files-match-their-sums $? "$n files with a complete sum, $bad bad, newest f$maxi; guest writer was at $W0..$W1 around the call"
    umount "$W/mnt"
  fi
  cp "$W"/*.txt "$OUT/" 2>/dev/null
else
  hc fs-image-returned 1 "no $OUT/fs.qcow2"
fi

echo; echo "===== benchmark (xsbio O_DIRECT in the same guest kernel, ${XSB_SECS:-10} s per test, median of ${XSB_ROUNDS:-2} rounds; TCG: only ratios mean anything) ====="
echo "$CLOCK_DESC"
if [ -s "$OUT/bench.txt" ]; then
  bench_table "$OUT/bench.txt" | tee "$OUT/bench-table.txt"
else
  echo "no benchmark results"
fi
echo "run dir: $RUN (exit $RC)"
exit $RC
