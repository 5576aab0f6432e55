#!/bin/sh
# nbdkit-qcow2
# Copyright (C) 2026 the nbdkit-qcow2 authors
# SPDX-License-Identifier: BSD-3-Clause (see LICENSE)
#
# Run a libFuzzer target over the core for SECONDS (default 60):
#
#   tests/fuzz/run.sh [SECONDS] [extra libFuzzer options...]
#
# Sets up and builds build-fuzz/ (clang, ASan + UBSan) if needed, copies
# the seed corpus into build-fuzz/fuzz-corpus-TARGET (kept between runs,
# so local runs build on each other; CI starts fresh), and runs the
# fuzzer.  Exits non-zero if it finds a crash, a sanitizer report, a leak
# or a timeout; the input is then in build-fuzz/fuzz-artifacts/, and
#   build-fuzz/tests/fuzz/TARGET ARTIFACT
# replays it.
#
# FUZZ_TARGET picks the target: fuzz_image (default: open, read, extents),
# fuzz_write (check, write, zero, trim) or fuzz_fault (a workload over a
# backend that fails one write or flush).  FUZZ_BUILD overrides the
# build directory.
set -eu

secs=${1:-60}
[ $# -gt 0 ] && shift
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
build=${FUZZ_BUILD:-$root/build-fuzz}
target=${FUZZ_TARGET:-fuzz_image}

if [ ! -f "$build/build.ninja" ]; then
    CC=${CC:-clang} meson setup "$build" "$root" -Dfuzzing=true \
        -Db_sanitize=address,undefined -Db_lundef=false
fi
ninja -C "$build" "tests/fuzz/$target"
fuzzer=$build/tests/fuzz/$target

corpus=$build/fuzz-corpus-$target
artifacts=$build/fuzz-artifacts
mkdir -p "$corpus" "$artifacts"
# fuzz_fault reads workloads, not images: its own seeds.
seeds=$here/seeds
[ -d "$here/seeds-$target" ] && seeds=$here/seeds-$target
cp "$seeds"/* "$corpus"/

# UBSan reports are fatal, as ASan's are; leaks are checked at exit of
# each input (libFuzzer's -detect_leaks).
export ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1:allocator_may_return_null=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:abort_on_error=1:print_stacktrace=1}

exec "$fuzzer" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
    -max_len=65536 -print_final_stats=1 \
    -artifact_prefix="$artifacts/" "$@" "$corpus"
