#!/bin/bash
# Benchmark nbdkit-qcow2-plugin against qemu-nbd and nbdkit-file-plugin.
# Usage: bench/run.sh [--quick] [--json FILE] [more options: --help]
# See bench/README.md.
set -e
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# Debian's python3 (the script needs only the standard library, but other
# pythons earlier in PATH are not what the project tests with).
py=/usr/bin/python3
[ -x "$py" ] || py=python3
exec "$py" "$here/bench.py" "$@"
