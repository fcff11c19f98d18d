#!/usr/bin/env bash
# The demo: an image, a workload through the NBD export, checkpoints while it is served,
# a revert, and QEMU's own tools agreeing with every step.
#   ./scripts/demo.sh [WORKDIR]     (default: a fresh temporary directory)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release -q -p xl-plugin
XL=$PWD/target/release/xl-snap
W=${1:-$(mktemp -d /tmp/xensnap-demo.XXXXXX)}
mkdir -p "$W"
IMG=$W/demo.qcow2
SOCK=$W/nbd.sock
rm -f "$IMG" "$SOCK"
step() { printf '\n== %s\n' "$*"; }
ok() { printf 'DEMO-OK: %s\n' "$*"; }
fail() { printf 'DEMO-FAIL: %s\n' "$*"; exit 1; }
qio() { qemu-io -f raw "nbd+unix:///$1?socket=$SOCK" "${@:2}"; }
# passes: DESC CMD... — the command must exit 0 and print no pattern mismatch.
passes() {
  local desc=$1 out; shift
  if out=$("$@" 2>&1) && ! grep -q "verification failed" <<<"$out"; then ok "$desc"; else printf '%s\n' "$out"; fail "$desc"; fi
}
# refuses: DESC CMD... — the command must fail (or report a pattern mismatch).
refuses() {
  local desc=$1 out; shift
  if out=$("$@" 2>&1) && ! grep -q "verification failed" <<<"$out"; then printf '%s\n' "$out"; fail "$desc"; else ok "$desc"; fi
}

step "create a 1 GiB qcow2 v3 image"
"$XL" image create "$IMG" --size 1G
"$XL" image info "$IMG"

step "serve it over NBD (active disk read-write, checkpoints read-only)"
"$XL" image serve "$IMG" --socket "$SOCK" > "$W/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 50); do [ -S "$SOCK" ] && [ -S "$IMG.xensnap.sock" ] && break; sleep 0.1; done
[ -S "$SOCK" ] || fail "server did not start: $(cat "$W/serve.log")"

step "workload through NBD: qemu-io writes 8 MiB of 0x11 and 1 MiB of 0x22"
qio "" -c "write -P 0x11 0 8M" -c "write -P 0x22 512M 1M" -c flush
step "checkpoint 'before' while the image is served"
"$XL" image checkpoint create "$IMG" before
step "more writes after the checkpoint (copy-on-write): 0x33 over the first MiB, 4 KiB of 0x44 at 4 MiB"
qio "" -c "write -P 0x33 0 1M" -c "write -P 0x44 4M 4k" -c flush
step "checkpoint 'after' with --no-wait: returns once taken (the point in time is fixed, in memory); the server makes it durable in the background"
"$XL" image checkpoint create --no-wait "$IMG" after
"$XL" image checkpoint list "$IMG"
for _ in $(seq 100); do grep -q "after .* durable" <("$XL" image checkpoint list "$IMG") && break; sleep 0.1; done
grep -q "after .* durable" <("$XL" image checkpoint list "$IMG") && ok "'after' became durable in the background" || fail "'after' did not become durable"
"$XL" image checkpoint list "$IMG"

step "the checkpoint export still reads the old data while the disk has the new"
passes "checkpoint/before reads 0x11 at 0..8M and 0x22 at 512M" qio checkpoint/before -r -c "read -P 0x11 0 8M" -c "read -P 0x22 512M 1M"
passes "the active disk reads the new data" qio "" -c "read -P 0x33 0 1M" -c "read -P 0x44 4M 4k" -c "read -P 0x11 1M 3M"
refuses "checkpoint/before does not see writes made after it" qio checkpoint/before -r -c "read -P 0x33 0 1M"
refuses "a checkpoint export refuses writes" qio checkpoint/before -c "write -P 0x55 0 4k"

step "revert to 'before' while served"
"$XL" image checkpoint revert "$IMG" before
passes "after the revert the active disk reads 0x11 again" qio "" -c "read -P 0x11 0 8M"
"$XL" image check "$IMG"

step "stop the server; QEMU's tools inspect the image"
kill -TERM $SERVER; wait $SERVER || true; trap - EXIT
qemu-img check "$IMG" && ok "qemu-img check: no errors, no leaks" || fail "qemu-img check: no errors, no leaks"
qemu-img snapshot -l "$IMG"
grep -q " before " <(qemu-img snapshot -l "$IMG") && ok "qemu-img lists checkpoint 'before'" || fail "qemu-img lists checkpoint 'before'"
qemu-img convert -l snapshot.name=after -O raw "$IMG" "$W/after.raw"
passes "qemu-img convert -l after: the data as it was at checkpoint 'after'" \
  qemu-io -f raw -r "$W/after.raw" -c "read -P 0x33 0 1M" -c "read -P 0x11 1M 3M" -c "read -P 0x44 4M 4k" -c "read -P 0x11 4100k 4092k" -c "read -P 0x22 512M 1M"
qemu-img convert -O raw "$IMG" "$W/active.raw"
qemu-img convert -l snapshot.name=before -O raw "$IMG" "$W/before.raw"
cmp "$W/active.raw" "$W/before.raw" && ok "qemu-img: the reverted disk equals checkpoint 'before' byte for byte" || fail "qemu-img: the reverted disk equals checkpoint 'before' byte for byte"
"$XL" image map "$IMG" | head -20
rm -f "$W"/*.raw
printf '\nDEMO PASSED (work dir %s)\n' "$W"
