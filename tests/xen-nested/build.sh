#!/usr/bin/env bash
# build.sh - cached build of the nested Xen test bed, from Debian packages only.
#
# Produces, in $XTB_CACHE/<key>/ (default XTB_CACHE=/var/cache/xensnap/testbed):
#   xen         Xen 4.17 hypervisor (xen-hypervisor-4.17-amd64, gunzipped: QEMU's multiboot
#               loader wants the plain ELF image)
#   vmlinuz     the bookworm kernel behind linux-image-amd64 (dom0 and guest kernel)
#   initrd.img  tiny busybox initrd for dom0 (virtio-blk + ext4 modules, image/initrd-init.sh)
#   dom0.img    raw ext4 (sparse): debootstrap'd bookworm minbase + xen-utils-4.17,
#               xenstore-utils, qemu-system-xen (qdisk anchor), busybox, iproute2, socat,
#               the kernel's modules, /usr/local/sbin/xtb-init (image/init.sh) and the PV guest
#               payload in /opt/xtb/guest (kernel, busybox initramfs from image/guest-init.sh,
#               guest.cfg template)
#   MANIFEST    package versions; build.log, TIMINGS
# <key> = first 16 hex digits of sha256 over this script and image/*: the image is rebuilt
# only when the recipe changes (not when Debian publishes updates: bump RECIPE_REV below to
# pick those up). The project's binaries and the in-dom0 test scripts are NOT in the image;
# boot.sh hands them to dom0 per run over 9p.
#
# usage: build.sh            build if needed; prints "TIMING build <s>" or "TIMING cache-hit <s>"
#        build.sh --dir      print the cache dir of the current recipe (exit 1 if not built)
#        build.sh --key      print the key
#        build.sh --force    rebuild even on a cache hit
# Env: XTB_CACHE, XTB_MIRROR (default: URIs of the machine's Debian apt source), XTB_KEEP=2
#      (how many older keys to keep)
set -euo pipefail
RECIPE_REV=1
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${XTB_CACHE:-/var/cache/xensnap/testbed}
KEY=$( (echo "rev $RECIPE_REV"; cd "$HERE" && sha256sum build.sh image/*) | sha256sum | cut -c1-16)
OUT=$CACHE/$KEY
case ${1:-} in
  --key) echo "$KEY"; exit 0;;
  --dir) [ -f "$OUT/.complete" ] && { echo "$OUT"; exit 0; }; echo "xen-nested: image $KEY not built (run $HERE/build.sh)" >&2; exit 1;;
esac
usec() { echo "${EPOCHREALTIME/./}"; }
fmt()  { printf '%d.%01d' $(($1/1000000)) $(( ($1%1000000)/100000 )); }
T0=$(usec)
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"; flock 9          # one build at a time; a waiting caller then hits the cache
if [ -f "$OUT/.complete" ] && [ "${1:-}" != --force ]; then
  echo "xen-nested: image cache hit: $OUT"
  echo "TIMING cache-hit $(fmt $(( $(usec) - T0 )))"
  exit 0
fi

[ "$(id -u)" = 0 ] || { echo "xen-nested build: needs root (debootstrap, chroot)" >&2; exit 1; }
"$HERE/host-deps.sh"
MIRROR=${XTB_MIRROR:-$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECMIRROR=${XTB_SECURITY_MIRROR:-${MIRROR%/debian}/debian-security}
W=$CACHE/$KEY.build; rm -rf "$W"; mkdir -p "$W/img" "$W/debs" "$W/x"
R=$W/rootfs
LOG=$W/img/build.log; : > "$LOG"
step() { STEP=$1; ST=$(usec); echo "xen-nested build: $1 ..."; }
done_() { local d; d=$(fmt $(( $(usec) - ST ))); echo "  $STEP ${d}s"; echo "$STEP $d" >> "$W/img/TIMINGS"; }
fail() { echo "xen-nested build FAILED at $STEP: $*" >&2; tail -40 "$LOG" >&2; exit 1; }
cleanup() { for m in proc sys dev; do mountpoint -q "$R/$m" 2>/dev/null && umount -l "$R/$m"; done; true; }
trap cleanup EXIT

step download   # the hypervisor and the exact kernel ABI package behind linux-image-amd64
KPKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
[ -n "$KPKG" ] || { apt-get update -q >>"$LOG" 2>&1; KPKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}'); }
[ -n "$KPKG" ] || fail "cannot resolve linux-image-amd64"
KVER=${KPKG#linux-image-}
(cd "$W/debs" && apt-get download xen-hypervisor-4.17-amd64 "$KPKG") >>"$LOG" 2>&1 || fail "apt-get download"
for d in "$W"/debs/*.deb; do dpkg -x "$d" "$W/x"; dpkg-deb -f "$d" Package Version | awk "{print \$2}" | paste -sd' ' >> "$W/img/MANIFEST"; done
gunzip -c "$W"/x/boot/xen-4.17-amd64.gz > "$W/img/xen"
cp "$W/x/boot/vmlinuz-$KVER" "$W/img/vmlinuz"
echo "$KVER" > "$W/img/kernel-version"
done_

step debootstrap
debootstrap --variant=minbase bookworm "$R" "$MIRROR" >>"$LOG" 2>&1 || fail "debootstrap"
done_

step dom0-packages
cat > "$R/etc/apt/sources.list" <<SRC
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb $SECMIRROR bookworm-security main
SRC
printf '#!/bin/sh\nexit 101\n' > "$R/usr/sbin/policy-rc.d"; chmod +x "$R/usr/sbin/policy-rc.d"   # no daemons in the chroot
for m in proc sys dev; do mount --bind "/$m" "$R/$m"; done
# No kernel package in dom0: it would pull initramfs-tools + udev; modules come from the .deb.
chroot "$R" /bin/bash -ec '
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends xen-utils-4.17 xenstore-utils qemu-system-xen \
      busybox util-linux mount kmod procps e2fsprogs iproute2 socat
  dpkg-query -W -f "\${Package} \${Version}\n" xen-utils-4.17 xenstore-utils qemu-system-xen busybox
  apt-get clean; rm -rf /var/lib/apt/lists/* /usr/share/doc /usr/share/man /usr/share/locale
' >>"$LOG" 2>&1 || fail "chroot apt-get"
grep -E '^(xen-utils-4.17|xenstore-utils|qemu-system-xen|busybox) ' "$LOG" | tail -4 >> "$W/img/MANIFEST"
cleanup
done_

step modules
rm -rf "$R/lib/modules" "$R/boot/"*; mkdir -p "$R/lib/modules"
cp -a "$W/x/lib/modules/$KVER" "$R/lib/modules/"
# hardware that never appears inside QEMU (~200 MB)
( cd "$R/lib/modules/$KVER/kernel" && rm -rf sound drivers/gpu drivers/media drivers/net/wireless \
    drivers/infiniband drivers/staging drivers/iio drivers/bluetooth drivers/scsi/qla2xxx drivers/scsi/lpfc \
    drivers/net/ethernet/mellanox drivers/net/ethernet/intel drivers/net/ethernet/broadcom \
    net/bluetooth net/mac80211 net/wireless )
depmod -b "$R" "$KVER"
done_

# mkinitramfs DIR INIT MODULE... : busybox initramfs with the modules (and their dependencies,
# in load order) and INIT as /init
mkinitramfs() {
  local out=$1 init=$2 t f; shift 2
  t=$(mktemp -d "$W/ird.XXXX"); mkdir -p "$t"/{bin,proc,sys,dev,tmp,newroot,lib/modules}
  cp /bin/busybox "$t/bin/"; for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -sf busybox "$t/bin/$a"; done
  for f in $(modprobe -d "$R" -S "$KVER" --show-depends -a "$@" | awk '$1=="insmod"{print $2}' | awk '!s[$0]++'); do
    f=${f#"$R/lib/modules/$KVER/"}; mkdir -p "$t/lib/modules/$(dirname "$f")"; cp "$R/lib/modules/$KVER/$f" "$t/lib/modules/$f"
    echo "$f" >> "$t/modules.order"
  done
  install -m 755 "$init" "$t/init"
  (cd "$t" && find . | cpio -o -H newc --quiet | gzip -1) > "$out"
  echo "  $(basename "$out"): $(sed 's|.*/||' "$t/modules.order" | tr '\n' ' ')"; rm -rf "$t"
}
step initrds
# crc32c_generic: ext4's metadata_csum needs a crc32c driver (a soft dependency)
mkinitramfs "$W/img/initrd.img" "$HERE/image/initrd-init.sh" crc32c_generic virtio_pci virtio_blk ext4
mkdir -p "$R/opt/xtb/guest"
cp "$W/img/vmlinuz" "$R/opt/xtb/guest/vmlinuz"
mkinitramfs "$R/opt/xtb/guest/initrd.gz" "$HERE/image/guest-init.sh" xen-blkfront xen-netfront
install -m 644 "$HERE/image/guest.cfg" "$R/opt/xtb/guest/guest.cfg"
install -m 755 "$HERE/image/init.sh" "$R/usr/local/sbin/xtb-init"
echo dom0 > "$R/etc/hostname"; printf '/dev/vda / ext4 defaults 0 1\n' > "$R/etc/fstab"
echo "recipe $KEY built $(date -u +%FT%TZ) kernel $KVER" > "$R/etc/xtb-image"
done_

step mkfs
truncate -s 4G "$W/img/dom0.img"
mkfs.ext4 -q -F -L xtbdom0 -d "$R" "$W/img/dom0.img" >>"$LOG" 2>&1 || fail "mkfs.ext4 -d"
done_

rm -rf "$R" "$W/x" "$W/debs"
T=$(fmt $(( $(usec) - T0 )))
echo "total $T" >> "$W/img/TIMINGS"
touch "$W/img/.complete"
rm -rf "$OUT"; mv "$W/img" "$OUT"; rm -rf "$W"
# keep the newest XTB_KEEP other images, drop older ones
{ ls -1dt "$CACHE"/*/ 2>/dev/null | grep -v "/$KEY/\$" | tail -n +$(( ${XTB_KEEP:-2} + 1 )) | xargs -r rm -rf; } || true
echo "xen-nested: built $OUT ($(du -sh --apparent-size "$OUT/dom0.img" | cut -f1) apparent, $(du -sh "$OUT/dom0.img" | cut -f1) used)"
sed 's/^/  /' "$OUT/MANIFEST"
echo "TIMING build $T"
