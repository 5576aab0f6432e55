#!/usr/bin/env bash
# Build the plugin and the qcow2 filter with ThreadSanitizer into
# build-tsan/ and run the concurrency tests against them.  Fails if TSan
# reports anything.
#
# nbdkit itself is not instrumented, so the TSan runtime is preloaded into
# it.  GCC's runtime (libtsan.so) is used: clang 14's shared runtime
# crashes at startup on current kernels, and its static one cannot be
# preloaded.  halt_on_error makes the server die at the first report (the
# test then fails); reports also go to log files, checked at the end, so
# that a race during shutdown is not missed.
#
# Usage: scripts/tsan.sh [extra pytest arguments]
# QCOW2_STRESS scales the test workload (default 1).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

py=/usr/bin/python3
dir=build-tsan
runtime=$(gcc -print-file-name=libtsan.so)
if [ ! -e "$runtime" ]; then
  echo "tsan.sh: GCC's ThreadSanitizer runtime is not installed (libtsan)" >&2
  exit 1
fi

if [ ! -f "$dir/build.ninja" ]; then
  CC=gcc meson setup "$dir" -Db_sanitize=thread -Db_lundef=false \
    -Dbuildtype=debugoptimized >/dev/null
fi
# The concurrency tests run the engine as the plugin and as the qcow2
# filter (conftest takes the filter from the plugin's build tree).
ninja -C "$dir" plugin/nbdkit-qcow2-plugin.so \
  filters/qcow2/nbdkit-qcow2-filter.so >/dev/null

logs=$(mktemp -d /tmp/qcow2-tsan.XXXXXX)
trap 'rm -rf "$logs"' EXIT

# report_signal_unsafe=0: nbdkit's own signal handlers are not ours.
tsan_options="halt_on_error=1:report_signal_unsafe=0:second_deadlock_stack=1"
tsan_options+=":history_size=4:log_path=$logs/tsan"

rc=0
QCOW2_PLUGIN=$top/$dir/plugin/nbdkit-qcow2-plugin.so \
QCOW2_NBDKIT_ENV="LD_PRELOAD=$runtime TSAN_OPTIONS=$tsan_options" \
QCOW2_STRESS=${QCOW2_STRESS:-1} \
  $py -m pytest -q -p no:cacheprovider \
    "$top/tests/integration/test_concurrency.py" "$@" || rc=$?

if compgen -G "$logs/tsan*" >/dev/null; then
  echo "tsan.sh: ThreadSanitizer reports:" >&2
  cat "$logs"/tsan* >&2
  rc=1
fi
if [ "$rc" -ne 0 ]; then
  echo "tsan.sh: FAILED" >&2
else
  echo "tsan.sh: no ThreadSanitizer reports"
fi
exit "$rc"
