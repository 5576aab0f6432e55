#!/usr/bin/env bash
# Install what is needed, build, and run every test:
#   1. C unit tests of the core (meson test)
#   2. short libFuzzer runs over the core (clang, ASan+UBSan): open, read
#      and extents (fuzz_image); check, repair, writes and snapshot
#      operations (fuzz_write); a workload over a backend failing one
#      write or flush (fuzz_fault)
#   3. the integration suite (pytest + libnbd, QEMU as the oracle), and
#      the command lines of examples/README.md (examples/test-examples.sh)
#   4. the system tests: real stacks on the export (a Linux guest under
#      QEMU, libvirt, nbdfuse, qemu-img, nbdcopy, guestfish, virt-v2v;
#      tests/system)
#   5. unit and integration tests again with the plugin built with
#      AddressSanitizer + UndefinedBehaviorSanitizer
#   6. the concurrency tests against a ThreadSanitizer build
# QUICK=1 runs only 1, 3 and 4 (4 without virt-v2v).  FUZZ_SECONDS sets each fuzzing time (60).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
"$top/scripts/bootstrap.sh"

# Debian's python has the nbd and pytest modules; others on PATH may not.
py=/usr/bin/python3
pytest_args=(-q -p no:cacheprovider "$top/tests/integration")

step() { printf '\n=== %s\n' "$*"; }

step "build"
scripts/build.sh build
step "unit tests"
meson test -C build --print-errorlogs

if [ -z "${QUICK:-}" ] && [ -x tests/fuzz/run.sh ]; then
  for target in fuzz_image fuzz_write fuzz_fault; do
    step "fuzzing $target for ${FUZZ_SECONDS:-60} s"
    FUZZ_TARGET=$target tests/fuzz/run.sh "${FUZZ_SECONDS:-60}"
  done
fi

step "integration tests"
$py -m pytest "${pytest_args[@]}"
step "the command lines of examples/README.md"
examples/test-examples.sh
# Real stacks on the export: a Linux guest under QEMU and libvirt,
# nbdfuse, qemu-img, nbdcopy, guestfish, and virt-v2v converting a guest
# that the plugin serves, then booting it from the plugin (minutes;
# skipped when QUICK=1).
step "system tests"
$py -m pytest -q -p no:cacheprovider -rs --durations=0 "$top/tests/system"

if [ -z "${QUICK:-}" ]; then
  step "ASan + UBSan build"
  scripts/build.sh build-asan -Db_sanitize=address,undefined -Db_lundef=false \
    -Dc_args=-fno-sanitize-recover=all
  ASAN_OPTIONS=detect_leaks=1 meson test -C build-asan --print-errorlogs
  step "integration tests against the sanitizer build"
  # nbdkit itself is not instrumented: preload the runtime, and leave leak
  # checking to the unit tests (nbdkit's own allocations are not ours).
  # The shim works around a hang in exit() under the preloaded runtime
  # (see the file).
  gcc -O2 -shared -fPIC -o build-asan/freelocale-shim.so \
    tests/fixtures/freelocale-shim.c
  QCOW2_PLUGIN=$top/build-asan/plugin/nbdkit-qcow2-plugin.so \
  QCOW2_FILTER=$top/build-asan/filters/qcow2/nbdkit-qcow2-filter.so \
  QCOW2_NBDKIT_ENV="LD_PRELOAD='$(gcc -print-file-name=libasan.so) $top/build-asan/freelocale-shim.so' ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1" \
    $py -m pytest "${pytest_args[@]}"

  step "ThreadSanitizer build: concurrency tests"
  scripts/tsan.sh
fi
