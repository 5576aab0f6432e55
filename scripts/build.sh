#!/usr/bin/env bash
# Configure (once) and build into DIR (default build/).  Extra arguments go
# to `meson setup`, e.g. -Db_sanitize=address,undefined.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-build}
shift || true
werror=()
[ "${CI:-}" = true ] && werror=(-Dwerror=true)
if [ ! -f "$dir/build.ninja" ]; then
  meson setup "$dir" "${werror[@]}" "$@" >/dev/null
fi
ninja -C "$dir" >/dev/null
