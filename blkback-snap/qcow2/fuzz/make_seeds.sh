#!/bin/sh
# Generate a small seed corpus for the open_check_read target with qemu-img / qemu-io.
# Usage: ./make_seeds.sh [corpus dir]   (default: corpus/open_check_read)
set -eu
out=${1:-corpus/open_check_read}
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mk() { # name, create options, size, qemu-io commands...
    name=$1; opts=$2; size=$3; shift 3
    qemu-img create -q -f qcow2 -o "$opts" "$tmp/$name" "$size"
    for c in "$@"; do qemu-io -f qcow2 -c "$c" "$tmp/$name" >/dev/null; done
    cp "$tmp/$name" "$out/$name"
}
mk c512 cluster_size=512 64k "write -P 0x11 0 3k" "write -z 8k 1k"
mk c4k cluster_size=4096 256k "write -P 0x22 4k 8k"
mk r1 cluster_size=4096,refcount_bits=1 128k "write -P 0x33 0 4k"
mk r64 cluster_size=4096,refcount_bits=64 128k "write -P 0x44 0 4k"
mk ext cluster_size=16384,extended_l2=on 256k "write -P 0x55 2k 1k"
mk snap cluster_size=4096 128k "write -P 0x66 0 8k"
qemu-img snapshot -c s1 "$tmp/snap"
qemu-io -f qcow2 -c "write -P 0x67 4k 4k" "$tmp/snap" >/dev/null
cp "$tmp/snap" "$out/snap"
# compressed clusters (zlib and zstd)
head -c 16384 /dev/zero | tr '\0' 'a' > "$tmp/raw"
qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=4096 "$tmp/raw" "$out/zlib"
qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=4096,compression_type=zstd "$tmp/raw" "$out/zstd"
du -sh "$out"
