"""Compressed clusters: deflate and zstd, small to huge clusters, clusters
packed so that they share sectors, partial-cluster reads."""

import pytest

from conftest import qemu_raw
from images import (compressed_clusters, convert, serve,
                    create, odd_ranges, raw_from_layout, read_header,
                    serve_compare, shared_sectors, write_patterns)

K = 1024
M = 1024 * 1024


def source(tmp_path, size=6 * M):
    """Text-like data, a random (incompressible) stretch, sparse zeros and
    a pattern, ending in an odd size."""
    return raw_from_layout(tmp_path / "src.raw", size, [
        (0, 2 * M + 4321, "text"),
        (2 * M + 4321, 300 * K, "random"),
        (3 * M, 5000, 0x5a),
        (4 * M + 17, 1 * M, "text"),
        (size - 70000, 70000, "text"),
    ])


def partial_ranges(cluster, size):
    c = cluster
    cands = [(12345, 4096),                 # inside one compressed cluster
            (c + 3, 1), (2 * c - 1, 2),     # at cluster edges
            (c - 100, c + 200),             # spans three clusters
            (5 * c + 511, 4097),
            (2 * M + 4000, 1000),           # text/random edge
            (size - 1234, 1234)]            # the last, partial cluster
    return [(o, n) for o, n in cands if o + n <= size]


CASES = [("zlib", 4 * K), ("zlib", 64 * K), ("zlib", 2 * M),
         ("zstd", 4 * K), ("zstd", 64 * K), ("zstd", 2 * M)]


@pytest.mark.parametrize("ctype,cluster", CASES,
                         ids=["%s-%d" % c for c in CASES])
def test_convert_compressed(tmp_path, ctype, cluster):
    size = 6 * M + 12345 // 512 * 512
    src = source(tmp_path, size)
    img = convert(src, tmp_path / "c.qcow2", "cluster_size=%d" % cluster,
                  "compression_type=" + ctype, compress=True)
    h = read_header(img)
    assert bool(h["incompatible"] & 8) == (ctype == "zstd")
    cc = compressed_clusters(img)
    assert len(cc) >= 3
    if cluster < 2 * M:
        assert shared_sectors(img) >= 2, "no compressed clusters share sectors"
    raw = qemu_raw(img, tmp_path)
    with open(src, "rb") as a, open(raw, "rb") as b:
        same = a.read() == b.read()
    assert same, "qemu's conversion lost data"
    serve_compare(img, raw, ranges=partial_ranges(cluster, size) +
                  odd_ranges(size, cluster))


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_compressed_writes(tmp_path, ctype):
    """qemu-io write -c: each a whole cluster, packed one after another."""
    c = 64 * K
    img = create(tmp_path / "a.qcow2", 2 * M,
                 "compression_type=" + ctype)
    items = [(0x10 + i, i * c, c, "-c") for i in range(0, 12)]
    items += [(0x41, 20 * c, 3 * c, "-c"),       # a multi-cluster write
              (0x99, 3 * c + 100, 50),           # COW out of a compressed one
              (None, 5 * c, c),                  # zero over compressed
              (0x77, 30 * c, c, "-c")]
    write_patterns(img, items)
    assert len(compressed_clusters(img)) >= 12
    assert shared_sectors(img) >= 2
    raw = qemu_raw(img, tmp_path)
    serve_compare(img, raw, ranges=[(3 * c + 50, 200), (7 * c + 1, c),
                                    (20 * c + c // 2, 2 * c),
                                    (31 * c - 7, 7)])


def test_compressed_text_writes_with_qemu_io(tmp_path):
    """Compressed writes of varied data from a file (qemu-io write -s)."""
    c = 4 * K
    img = create(tmp_path / "a.qcow2", 1 * M, "cluster_size=%d" % c)
    data = tmp_path / "chunk"
    raw_from_layout(data, 16 * c, [(0, 16 * c, "text")])
    from images import write
    write(img, "write -c -s %s 0 %d" % (data, 16 * c),
          "write -c -s %s %d %d" % (data, 40 * c, 16 * c))
    assert len(compressed_clusters(img)) == 32
    raw = qemu_raw(img, tmp_path)
    serve_compare(img, raw, ranges=[(c // 2 + 1, c), (41 * c - 3, 2 * c)])


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_compressed_over_backing(tmp_path, ctype):
    base = raw_from_layout(tmp_path / "base.raw", 2 * M,
                           [(0, 2 * M, "random")])
    img = create(tmp_path / "a.qcow2", None, "compression_type=" + ctype,
                 backing="base.raw", backing_fmt="raw")
    c = 64 * K
    write_patterns(img, [(0x31, c, c, "-c"), (0x32, 4 * c, 2 * c, "-c"),
                         (0x33, 4 * c + 10, 10)])
    raw = qemu_raw(img, tmp_path)
    serve_compare(img, raw, ranges=[(c - 5, c + 10), (4 * c, 3 * c)])


def test_compressed_small_clusters_v2(tmp_path):
    src = source(tmp_path, 3 * M)
    img = convert(src, tmp_path / "c.qcow2", "cluster_size=512",
                  "compat=0.10", compress=True)
    assert read_header(img)["version"] == 2
    assert shared_sectors(img) >= 2
    raw = qemu_raw(img, tmp_path)
    serve_compare(img, raw, ranges=partial_ranges(512, 3 * M))


def test_many_parallel_reads_of_compressed(tmp_path):
    """Many requests in flight at once on compressed clusters (per-thread
    scratch buffers)."""
    src = source(tmp_path, 4 * M)
    img = convert(src, tmp_path / "c.qcow2", "compression_type=zstd",
                  compress=True)
    raw = qemu_raw(img, tmp_path)
    with open(raw, "rb") as f:
        expect = f.read()
    import random
    import nbd
    rnd = random.Random(3)
    with serve(img) as srv:
        h = srv.connect()
        bufs = []
        for _ in range(200):
            off = rnd.randrange(4 * M - 70000)
            ln = rnd.randrange(1, 70000)
            buf = nbd.Buffer(ln)
            h.aio_pread(buf, off)
            bufs.append((off, ln, buf))
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for off, ln, buf in bufs:
            ok = buf.to_bytearray() == expect[off:off + ln]
            assert ok, "aio_pread(%d, %d) differs from qemu" % (ln, off)
        h.shutdown()
