#!/usr/bin/env bash
# host-deps.sh - install (idempotently) what the nested Xen test bed needs on a Debian 12 host:
#   qemu-system-x86 (+ qemu-utils) from bookworm-backports, debootstrap, busybox-static, cpio,
#   e2fsprogs, kmod.
# Why backports: the machine image ships qemu-utils 10.0.2 from bookworm-backports; installing
# bookworm's own qemu-system-x86 (7.2) would REMOVE it. So both come from backports, which is
# added as an extra suite of the same Debian archive the machine already uses.
# Exit 0 = everything present; non-zero = could not install (callers turn this into SKIPPED).
set -uo pipefail
need_cmds=(qemu-system-x86_64 qemu-img debootstrap cpio mkfs.ext4 depmod gzip)
missing() { local c; for c in "${need_cmds[@]}"; do command -v "$c" >/dev/null || echo "$c"; done
            [ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx switch_root || echo busybox-static; }
if [ -z "$(missing)" ]; then exit 0; fi
echo "xen-nested host-deps: missing: $(missing | tr '\n' ' ')"
[ "$(id -u)" = 0 ] || { echo "xen-nested host-deps: not root, cannot apt-get install" >&2; exit 1; }
command -v apt-get >/dev/null || { echo "xen-nested host-deps: no apt-get" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
BPO=/etc/apt/sources.list.d/xensnap-bookworm-backports.sources
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  URI=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null)
  [ -n "$URI" ] || URI=$(awk '$1=="deb" && $3=="bookworm"{print $2; exit}' /etc/apt/sources.list 2>/dev/null)
  URI=${URI:-http://deb.debian.org/debian}
  printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$URI" > "$BPO"
  echo "xen-nested host-deps: added $BPO ($URI bookworm-backports)"
fi
apt-get update -q >/dev/null || { echo "xen-nested host-deps: apt-get update failed" >&2; exit 1; }
apt-get install -y -q --no-install-recommends -t bookworm-backports qemu-system-x86 qemu-utils >/dev/null \
  || { echo "xen-nested host-deps: installing qemu-system-x86 from bookworm-backports failed" >&2; exit 1; }
apt-get install -y -q --no-install-recommends debootstrap busybox-static cpio gzip e2fsprogs kmod >/dev/null \
  || { echo "xen-nested host-deps: apt-get install failed" >&2; exit 1; }
if [ -n "$(missing)" ]; then echo "xen-nested host-deps: still missing: $(missing | tr '\n' ' ')" >&2; exit 1; fi
echo "xen-nested host-deps: ok ($(qemu-system-x86_64 --version | head -1))"
