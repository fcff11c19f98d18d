#!/usr/bin/env bash
# bench-stats.sh - statistics of the downtime benchmark (main.sh section 4) from its bench.txt.
# usage: tests/xen-nested/checkpoint/bench-stats.sh RUN/share/out/bench.txt   (host side; awk only)
# Pairs count only if both arms succeeded. Prints
#  - the median guest-measured pause of each arm and their ratio;
#  - the median of the per-pair ratios (xl-snap / xl save -c) with its distribution-free 95 %
#    confidence interval (order statistics of the binomial(n, 1/2) sign test), by order;
#  - a bootstrap 95 % interval (5000 resamples of the pairs, fixed seed) of the ratio of medians;
#  - xl-snap's direct bound on what the disk part adds (CPU of xl-snap + blkback-snap inside
#    the suspended window + barrier after the copy): median / max in ms and 1 + bound / median
#    of xl save -c; and its parts;
#  - the timeline of the pause on dom0's clock (from the checker's from_ms and dom0's wall
#    clocks around the command / xl-snap's report): xl start -> guest stopped, the pause,
#    xl exit - pause end, per arm and per-pair difference; where the pause caught the checker.
set -uo pipefail
F=${1:?usage: bench-stats.sh bench.txt}
[ -r "$F" ] || { echo "bench-stats: $F: not readable" >&2; exit 2; }
awk '
function val(line, key,   r) { if (match(line, " " key "=-?[0-9]+")) { r = substr(line, RSTART + length(key) + 2, RLENGTH - length(key) - 2); return r } return "" }
function isort(a, n,   i, j, t) { for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t } }
function med(a, n,   b, i) { if (n == 0) return "nan"; for (i = 1; i <= n; i++) b[i] = a[i]; isort(b, n); return (n % 2) ? b[(n + 1) / 2] : (b[n / 2] + b[n / 2 + 1]) / 2 }
# 95 % CI of a median from order statistics: the largest k with P(Bin(n,1/2) <= k-1) <= 0.025
function ci_k(n,   p, cdf, j, k) { p = 0.5 ^ n; cdf = 0; k = 0; for (j = 0; j < n; j++) { cdf += p; if (cdf > 0.025) break; k = j + 1; p = p * (n - j) / (j + 1) } return k }
function coverage(n, k,   p, cdf, j) { p = 0.5 ^ n; cdf = 0; for (j = 0; j < k; j++) { cdf += p; p = p * (n - j) / (j + 1) } return 1 - 2 * cdf }
function ms(us) { return (us == "" || us == "nan") ? "-" : sprintf("%.1f", us / 1000) }
/^BENCH / {
  p = val($0, "pair"); arm = ($0 ~ / arm=xl-snap /) ? "s" : "x"
  if ($0 !~ / rc=0 /) next
  g = val($0, "guest_gap_ms"); if (g == "") next
  gap[p, arm] = g + 0; if (!(p in seen)) { seen[p] = 1; order[++np] = p }
  v = val($0, "backend_cmd_cpu_us"); if (v != "") bcmd[p, arm] = v + 0
  v = val($0, "bg_wait_ms"); if (v != "") { nbw[arm]++; BW[arm, nbw[arm]] = v + 0 }
  if (arm == "s") { for (k = 1; k <= nk; k++) { v = val($0, keys[k]); if (v != "") kv[p, keys[k]] = v + 0 } }
  # the pause on the dom0 clock: xl start -> guest stopped (A), xl exit - pause end (C), in µs
  # (guest and dom0 clocks may differ by a constant: compare the arms, not the values)
  gfm = val($0, "gap_from_ms"); w0 = val($0, "cmd_start_wall_us"); w1 = val($0, "cmd_end_wall_us")
  if (gfm != "" && w0 != "" && w1 != "") {
    xs = w0 + 0; xe = w1 + 0
    if (arm == "s") { a = val($0, "xl_start_wall_us"); b = val($0, "xl_save_us"); if (a == "" || b == "" || a + 0 == 0) xs = ""; else { xs = a + 0; xe = a + b } }
    if (xs != "") { TA[p, arm] = gfm * 1000 - xs; TC[p, arm] = xe - (gfm + g) * 1000 }
    if (arm == "s") { ss = val($0, "suspend_seen_wall_us"); if (ss != "" && ss + 0 > 0) TS[p] = ss - gfm * 1000 }
  }
  if (match($0, / gap_seg_ms=[-0-9.]+\/[-0-9.]+\/[-0-9.]+/)) { split(substr($0, RSTART + 12, RLENGTH - 12), sg, "/"); SEG[p, arm] = (sg[1] > sg[2] && sg[1] > sg[3]) ? "read" : (sg[2] > sg[3]) ? "write" : "after-write" }
  v = val($0, "window_requests"); if (v != "" && arm == "s") WR[p] = v + 0
}
BEGIN { nk = split("added_bound_us added_bound_all_us cpu_own_window_us cpu_backend_window_us cpu_own_barrier_us cpu_backend_barrier_us cpu_own_pre_us barrier_after_copy_us barrier_us take_done_us copy_slack_us", keys, " ") }
END {
  n = 0
  for (i = 1; i <= np; i++) { p = order[i]; if (((p, "x") in gap) && ((p, "s") in gap) && gap[p, "x"] > 0) {
    n++; X[n] = gap[p, "x"]; S[n] = gap[p, "s"]; R[n] = S[n] / X[n]; P[n] = p
    if (p % 2) { n1++; R1[n1] = R[n] } else { n2++; R2[n2] = R[n] } } }
  printf "pairs with both arms measured: %d of %d\n", n, np
  if (n == 0) exit 1
  mx = med(X, n); mss = med(S, n)
  printf "guest-measured pause, median: xl save -c %.1f ms, xl-snap checkpoint %.1f ms, ratio of medians %.3f\n", mx, mss, mss / mx
  for (i = 1; i <= n; i++) RSO[i] = R[i]; isort(RSO, n)
  k = ci_k(n)
  if (k >= 1) ci = sprintf("[%.3f, %.3f] (order statistics %d and %d of %d, coverage %.1f %%)", RSO[k], RSO[n - k + 1], k, n - k + 1, n, 100 * coverage(n, k))
  else ci = "(too few pairs for a 95 % interval)"
  printf "per-pair ratio xl-snap / xl save -c: median %.3f, 95 %% CI %s; min %.3f max %.3f\n", med(R, n), ci, RSO[1], RSO[n]
  printf "  by order: xl save -c first %s (%d pairs), xl-snap first %s (%d pairs)\n", (n1 ? sprintf("%.3f", med(R1, n1)) : "-"), n1, (n2 ? sprintf("%.3f", med(R2, n2)) : "-"), n2
  srand(1); B = 5000
  for (b = 1; b <= B; b++) { for (i = 1; i <= n; i++) { j = int(rand() * n) + 1; bx[i] = X[j]; bs[i] = S[j]; br[i] = R[j] } RB[b] = med(bs, n) / med(bx, n); MB[b] = med(br, n) }
  isort(RB, B); isort(MB, B)
  printf "bootstrap 95 %% (%d resamples of the pairs): ratio of medians [%.3f, %.3f], median per-pair ratio [%.3f, %.3f]\n", B, RB[int(0.025 * B) + 1], RB[int(0.975 * B)], MB[int(0.025 * B) + 1], MB[int(0.975 * B)]
  for (q = 1; q <= nk; q++) { key = keys[q]; m = 0; delete V
    for (i = 1; i <= n; i++) if ((P[i], key) in kv) V[++m] = kv[P[i], key]
    if (m == 0) { MED[key] = ""; MAX[key] = ""; MIN[key] = ""; cnt[key] = 0; continue }
    isort(V, m); MED[key] = med(V, m); MAX[key] = V[m]; MIN[key] = V[1]; cnt[key] = m }
  m = 0; for (i = 1; i <= n; i++) if (((P[i], "x") in bcmd) && ((P[i], "s") in bcmd)) { m++; BX[m] = bcmd[P[i], "x"]; BS[m] = bcmd[P[i], "s"]; BD[m] = BS[m] - BX[m] }
  for (a = 1; a <= 2; a++) { arm = (a == 1) ? "x" : "s"; if (!nbw[arm]) continue; delete V; for (i = 1; i <= nbw[arm]; i++) V[i] = BW[arm, i]; isort(V, nbw[arm])
    printf "  waited for blkback-snap background work before the %s arms (%d): median %s ms, max %s ms\n", (arm == "x") ? "xl save -c" : "xl-snap", nbw[arm], med(V, nbw[arm]), V[nbw[arm]] }
  if (m) printf "blkback-snap CPU over the whole command (%d pairs), median: xl save -c %s ms, xl-snap %s ms, per-pair difference %s ms\n", m, ms(med(BX, m)), ms(med(BS, m)), ms(med(BD, m))
  b = "added_bound_us"; ba = "added_bound_all_us"
  if (cnt[b]) {
    printf "direct bound on the disk part (xl-snap arms, %d): median %s ms, max %s ms = %.2f %% / %.2f %% of the xl save -c median (ratio bound %.4f / %.4f)\n", cnt[b], ms(MED[b]), ms(MAX[b]), 100 * MED[b] / 1000 / mx, 100 * MAX[b] / 1000 / mx, 1 + MED[b] / 1000 / mx, 1 + MAX[b] / 1000 / mx
    printf "  incl. xl-snap CPU before the suspend: median %s ms, max %s ms (ratio bound %.4f / %.4f)\n", ms(MED[ba]), ms(MAX[ba]), 1 + MED[ba] / 1000 / mx, 1 + MAX[ba] / 1000 / mx
  } else print "direct bound: not reported (old xl-snap, or a backend pid unknown)"
  printf "  parts, median / max ms: CPU in the window xl-snap %s / %s (barrier %s / %s), blkback-snap %s / %s (barrier %s / %s); xl-snap before the suspend %s / %s; barrier after the copy %s / %s\n", ms(MED["cpu_own_window_us"]), ms(MAX["cpu_own_window_us"]), ms(MED["cpu_own_barrier_us"]), ms(MAX["cpu_own_barrier_us"]), ms(MED["cpu_backend_window_us"]), ms(MAX["cpu_backend_window_us"]), ms(MED["cpu_backend_barrier_us"]), ms(MAX["cpu_backend_barrier_us"]), ms(MED["cpu_own_pre_us"]), ms(MAX["cpu_own_pre_us"]), ms(MED["barrier_after_copy_us"]), ms(MAX["barrier_after_copy_us"])
  printf "  barrier (suspend seen -> backends resumed) median %s ms max %s; take done median %s ms; copy slack (copy end - barrier end) median %s ms min %s ms\n", ms(MED["barrier_us"]), ms(MAX["barrier_us"]), ms(MED["take_done_us"]), ms(MED["copy_slack_us"]), ms(MIN["copy_slack_us"])
  m = 0; for (i = 1; i <= n; i++) if ((P[i] in WR)) { m++; W[m] = WR[P[i]] }
  if (m) printf "  control requests inside the window per checkpoint: median %s (%d checkpoints)\n", med(W, m), m
  # where the pause lies on the dom0 clock (guest clock - dom0 clock is one constant for both arms)
  m = 0; for (i = 1; i <= n; i++) { p = P[i]; if (((p, "x") in TA) && ((p, "s") in TA)) { m++; AX[m] = TA[p, "x"]; AS[m] = TA[p, "s"]; AD[m] = AS[m] - AX[m]; CX[m] = TC[p, "x"]; CS[m] = TC[p, "s"]; CD[m] = CS[m] - CX[m]; GD[m] = S[i] - X[i] } }
  if (m) {
    printf "timeline (%d pairs, medians, ms; per-pair difference xl-snap - xl save -c): xl start -> guest stopped: %s / %s (diff %s); pause: %.1f / %.1f (diff %.1f); xl exit - pause end: %s / %s (diff %s)\n", m, ms(med(AX, m)), ms(med(AS, m)), ms(med(AD, m)), mx, mss, med(GD, m), ms(med(CX, m)), ms(med(CS, m)), ms(med(CD, m))
    m2 = 0; for (i = 1; i <= n; i++) if (P[i] in TS) { m2++; T2[m2] = TS[P[i]] }
    if (m2) printf "  xl-snap arms: guest stopped -> suspend seen by xl-snap median %s ms (min %s)\n", ms(med(T2, m2)), ms(min_of(T2, m2))
  } else print "timeline: not reported (no from_ms in the checker lines or no dom0 wall clocks)"
  for (i = 1; i <= n; i++) { p = P[i]; for (a = 1; a <= 2; a++) { arm = (a == 1) ? "x" : "s"; if ((p, arm) in SEG) NSEG[arm, SEG[p, arm]]++ } }
  if (length(NSEG)) printf "  the pause interrupted the checker (xl save -c / xl-snap): in its read %d / %d, in its write %d / %d, after its write %d / %d\n", NSEG["x", "read"], NSEG["s", "read"], NSEG["x", "write"], NSEG["s", "write"], NSEG["x", "after-write"], NSEG["s", "after-write"]
}
function min_of(a, n,   i, r) { r = a[1]; for (i = 2; i <= n; i++) if (a[i] < r) r = a[i]; return r }' "$F"
