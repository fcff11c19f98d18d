#!/usr/bin/env bash
# Installs what the build and the tests need on a fresh Debian 12 machine. Idempotent.
#  - qemu-utils (qemu-img, qemu-io, qemu-nbd): the interop peers. The machine image ships 10.0
#    from bookworm-backports; never replace it with bookworm's 7.2.
#  - libnbd-bin (nbdinfo, nbdcopy): more NBD peers for the export's tests.
#  - libxen-dev: Xen's runtime libraries, so libxc-ffi's no-hypervisor tests load the real
#    libraries (they are opened at run time; nothing links against them at build time).
#  - cargo-nextest: the test runner.
set -euo pipefail
need=()
command -v qemu-img >/dev/null && command -v qemu-io >/dev/null || need+=(qemu-utils)
command -v nbdinfo >/dev/null && command -v nbdcopy >/dev/null || need+=(libnbd-bin)
[ -e /usr/include/xenstore.h ] || need+=(libxen-dev)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  if [[ " ${need[*]} " == *" qemu-utils "* ]] && apt-cache policy qemu-utils | grep -q bookworm-backports; then
    apt-get install -y -qq -t bookworm-backports qemu-utils
    need=("${need[@]/qemu-utils}")
  fi
  apt-get install -y -qq ${need[*]}
fi
command -v cargo >/dev/null || { echo "setup: cargo is missing (install Rust with rustup)" >&2; exit 1; }
cargo nextest --version >/dev/null 2>&1 || cargo install --locked cargo-nextest
