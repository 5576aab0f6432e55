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
# Quiet when it works; ninja prints compiler errors on stdout, so show
# everything when it does not.
if ! log=$(ninja -C "$dir" 2>&1); then
  printf '%s\n' "$log" >&2
  exit 1
fi
