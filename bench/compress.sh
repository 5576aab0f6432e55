#!/bin/bash
# Compression on write: nbdcopy into nbdkit --filter=qcow2-compress against
# qemu-img convert -c, same source, same image options, one run each.
#
# Usage: bench/compress.sh [--size SIZE] [--cluster BYTES] [--types LIST]
#                          [--keep]
#   --size     virtual disk size (default 1G; a multiple of 1M)
#   --cluster  cluster size (default 65536)
#   --types    compression types (default deflate,zstd)
#   --keep     keep the work directory (printed)
# Environment: QCOW2_PLUGIN, QCOW2_COMPRESS_FILTER, TMPDIR (default
# /var/tmp).
#
# The source is mixed, like a used disk: text-like data (bench.py's
# make_text_raw: random words, about 60% with deflate) with every eighth
# MiB zeros and every eighth MiB random.  Both results are checked with
# qemu-img check and qemu-img compare before their row is printed.  Speed
# is measured here, never asserted by a test; the source is in the page
# cache for both tools.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
plugin="${QCOW2_PLUGIN:-$root/build/plugin/nbdkit-qcow2-plugin.so}"
filter="${QCOW2_COMPRESS_FILTER:-$(dirname "$(dirname "$plugin")")/filters/compress/nbdkit-qcow2-compress-filter.so}"
py=/usr/bin/python3
[ -x "$py" ] || py=python3

size=1G cluster=65536 types=deflate,zstd keep=
while [ $# -gt 0 ]; do
  case "$1" in
    --size) size="$2"; shift 2 ;;
    --cluster) cluster="$2"; shift 2 ;;
    --types) types="$2"; shift 2 ;;
    --keep) keep=1; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "$0: unknown option $1" >&2; exit 1 ;;
  esac
done
for f in "$plugin" "$filter"; do
  [ -f "$f" ] || { echo "$0: $f not found: build first (ninja -C build)" >&2; exit 1; }
done

work="$(mktemp -d "${TMPDIR:-/var/tmp}/qcow2-compress-bench.XXXXXX")"
if [ -n "$keep" ]; then
  echo "work directory: $work"
else
  trap 'rm -rf "$work"' EXIT
fi

bytes="$(numfmt --from=iec "$size")"
"$py" - "$work/src.raw" "$bytes" "$here" <<'EOF'
import os, random, sys
sys.path.insert(0, sys.argv[3])
from bench import make_text_raw
path, size, M = sys.argv[1], int(sys.argv[2]), 1 << 20
make_text_raw(path, size)
rnd = random.Random(7)
with open(path, "r+b") as f:
    for i in range(size // M):
        if i % 8 in (3, 6):
            f.seek(i * M)
            f.write(bytes(M) if i % 8 == 3 else rnd.randbytes(M))
EOF

now () { date +%s.%N; }

# Print one row after checking the image.
row () {
  local tool="$1" type="$2" t0="$3" t1="$4" img="$5"
  qemu-img check -q "$img"
  qemu-img compare -q -f raw -F qcow2 "$work/src.raw" "$img"
  "$py" - "$tool" "$type" "$t0" "$t1" "$img" "$bytes" <<'EOF'
import os, sys
tool, ctype, t0, t1, img, size = sys.argv[1:]
secs = float(t1) - float(t0)
st = os.stat(img)
M = 1 << 20
print("%-16s %-8s %8.2f %9.1f %10.1f %10.1f %7.1f%%" % (
    tool, ctype, secs, int(size) / M / secs, st.st_size / M,
    st.st_blocks * 512 / M, 100.0 * st.st_blocks * 512 / int(size)))
EOF
}

echo "source: $size mixed (text-like, 1/8 zeros, 1/8 random), cluster $cluster, $(nproc) CPUs"
printf "%-16s %-8s %8s %9s %10s %10s %8s\n" tool type seconds "MiB/s" "size MiB" "disk MiB" "ratio"
IFS=, read -ra list <<< "$types"
for type in "${list[@]}"; do
  case "$type" in
    deflate) ct=zlib ;;
    zstd) ct=zstd ;;
    *) echo "$0: unknown compression type $type" >&2; exit 1 ;;
  esac
  opts="compression_type=$ct,cluster_size=$cluster"

  img="$work/qemu-$type.qcow2"
  t0="$(now)"
  qemu-img convert -c -O qcow2 -o "$opts" "$work/src.raw" "$img"
  t1="$(now)"
  row "qemu-img -c" "$type" "$t0" "$t1" "$img"

  img="$work/nbdkit-$type.qcow2"
  qemu-img create -q -f qcow2 -o "$opts" "$img" "$bytes"
  t0="$(now)"
  nbdcopy "$work/src.raw" -- [ nbdkit --filter="$filter" "$plugin" "$img" ]
  t1="$(now)"
  row "nbdcopy+filter" "$type" "$t0" "$t1" "$img"
done
