"""The -D qcow2.FLAG=1 debug flags (core/debug.h): nbdkit sets the
exported qcow2_debug_FLAG variable in the plugin's or the filter's .so,
and with -v each event is logged through nbdkit_debug.

Each test runs in the plugin and in nbdkit-qcow2-filter over a file.  The
clusters the alloc messages name are checked against where QEMU finds the
written data (qemu-img map), and without the flag the same run logs none.
"""

import re

import nbd
import pytest

from conftest import engine_args, nbdkit_server
from images import create, qemu_map
from mirror import assert_check_clean, Src

pytestmark = pytest.mark.usefixtures("write_layer")

K = 1024
M = 1024 * K
CLUSTER = 64 * K

ALLOC = re.compile(r"debug: alloc: .*: (\d+) clusters at 0x([0-9a-f]+)$",
                   re.M)


def write_and_flush(img, *flags):
    """Serve img with nbdkit -v and the given -D flags, write two clusters'
    worth at 1 MiB, flush, and return nbdkit's stderr."""
    debug = [a for f in flags for a in ("-D", f)]
    args = ["-v", *debug, *engine_args(img, (), False)]
    with nbdkit_server(args) as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri)
        h.pwrite(b"\x5a" * (2 * CLUSTER), 1 * M)
        h.flush()
        h.shutdown()
        return srv.stderr


def allocations(stderr):
    """[(host offset, cluster count)] of the alloc messages."""
    return [(int(off, 16), int(n)) for n, off in ALLOC.findall(stderr)]


def test_alloc_flag_logs_each_allocation(tmp_path):
    img = tmp_path / "a.qcow2"
    create(img, 8 * M)
    err = write_and_flush(img, "qcow2.alloc=1")
    allocs = allocations(err)
    assert allocs, "no alloc message with -D qcow2.alloc=1:\n" + err
    # Every host cluster that QEMU finds the written data in was logged
    # as allocated.
    logged = {off + i * CLUSTER for off, n in allocs for i in range(n)}
    data = [m for m in qemu_map(img)
            if m["data"] and "offset" in m and m["start"] >= 1 * M
            and m["start"] < 1 * M + 2 * CLUSTER]
    assert data, qemu_map(img)
    for m in data:
        for o in range(m["offset"], m["offset"] + m["length"], CLUSTER):
            assert o in logged, (hex(o), allocs)
    # The L2 table for the written range was allocated too.
    assert len(logged) >= 3, allocs
    assert_check_clean(Src(str(img)))


def test_no_alloc_messages_without_the_flag(tmp_path):
    img = tmp_path / "a.qcow2"
    create(img, 8 * M)
    err = write_and_flush(img)
    # The run did log (-v), just not the allocations.
    assert "debug:" in err
    assert allocations(err) == [], err
    assert "debug: alloc:" not in err
    assert_check_clean(Src(str(img)))


def test_metadata_flag_logs_write_back_and_sync(tmp_path):
    img = tmp_path / "a.qcow2"
    create(img, 8 * M)
    err = write_and_flush(img, "qcow2.metadata=1")
    assert re.search(r"debug: metadata: .*: sync$", err, re.M), err
    assert re.search(r"debug: metadata: wrote back \d+ bytes at 0x", err), err
    assert allocations(err) == [], err
    assert_check_clean(Src(str(img)))


def test_cache_flag_logs_evictions(tmp_path):
    """On 4 KiB clusters each L2 table is one cache slice and maps 2 MiB:
    writes 2 MiB apart touch 128 slices, twice the smallest cache the
    engine makes (64 slices, asked for with cache-size=4K), so clean ones
    are evicted, and each eviction is logged."""
    img = tmp_path / "a.qcow2"
    create(img, 256 * M, "cluster_size=4096")
    args = ["-v", "-D", "qcow2.cache=1",
            *engine_args(img, ("cache-size=4K",), False)]
    with nbdkit_server(args) as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri)
        for i in range(128):
            h.pwrite(b"\xa5" * 4096, i * 2 * M)
            if i % 8 == 7:
                h.flush()
        for i in range(128):
            assert h.pread(4096, i * 2 * M) == b"\xa5" * 4096
        h.shutdown()
        err = srv.stderr
    assert re.search(r"debug: cache: evict the slice at 0x", err), err
    assert_check_clean(Src(str(img)))
