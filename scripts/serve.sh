#!/usr/bin/env bash
# Install what is needed, build, and serve a qcow2 image over NBD on a Unix
# socket, printing the NBD URI.  Without an image, serves a small demo image
# created on first use.  Extra key=value arguments go to the plugin.
#   scripts/serve.sh [IMAGE.qcow2] [key=value...]
# Environment: SOCKET (default /tmp/nbdkit-qcow2.sock).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
"$top/scripts/bootstrap.sh"
"$top/scripts/build.sh"

image=
if [ $# -gt 0 ] && [[ "$1" != *=* ]]; then
  image=$1
  shift
fi
if [ -z "$image" ]; then
  image=$top/build/demo.qcow2
  if [ ! -f "$image" ]; then
    qemu-img create -q -f qcow2 "$image" 1G
    qemu-io -f qcow2 -c 'write -P 0x51 0 4M' -c 'write -z 4M 4M' \
      -c 'write -P 0x43 512M 64k' "$image" >/dev/null
    echo "serve: created demo image $image (1 GiB, some data)" >&2
  fi
fi

sock=${SOCKET:-/tmp/nbdkit-qcow2.sock}
rm -f "$sock"
echo "serving $image"
echo "NBD URI: nbd+unix:///?socket=$sock"
echo "try:     nbdinfo 'nbd+unix:///?socket=$sock'"
exec nbdkit -f -U "$sock" "$top/build/plugin/nbdkit-qcow2-plugin.so" \
  file="$image" "$@"
