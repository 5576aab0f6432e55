"""Read correctness across format versions, cluster sizes, refcount widths,
virtual sizes and cluster kinds.  QEMU (qemu-img convert -O raw) is the
oracle for every byte."""

import struct

import pytest

from conftest import assert_same_as_raw, qemu_img, qemu_raw
from images import (serve, assert_reads_like_qemu, convert, raw_from_layout,
                    assert_bytes_equal, assert_ranges_like_raw, create,
                    odd_ranges, qemu_range, qemu_verify_pattern,
                    read_header, serve_compare, write_patterns)

# Every test once per layer running the engine (conftest.py): the plugin,
# the filter over a file, the filter over memory.
pytestmark = pytest.mark.usefixtures("read_layer")

K = 1024
M = 1024 * 1024
G = 1024 * M
T = 1024 * G


def layout(cluster, size):
    """Patterns at unaligned offsets, across clusters and L2 tables, plus
    zero writes of every flavour."""
    c = cluster
    l2_span = c * (c // 8)
    items = [
        (0x11, 66, 42),                         # inside the first cluster
        (0x22, c - 5, 10),                      # across a cluster boundary
        (0x33, 2 * c + 100, 3 * c),             # several clusters, unaligned
        (0x44, 6 * c, 2 * c),                   # whole clusters
        (None, 6 * c + c // 2, 17),             # small -z inside data
        (0x55, 9 * c, c),                       # to be zeroed (alloc kept)
        (None, 9 * c, c),                       # ZERO_ALLOC in v3
        (0x66, 10 * c, c),                      # to be zeroed and unmapped
        (None, 10 * c, c, "-u"),                # ZERO_PLAIN in v3
        (None, 12 * c, 2 * c),                  # -z on unallocated
        (0x77, size - 1000, 1000),              # the very end
    ]
    items = [it for it in items if it[1] + it[2] <= size]
    if l2_span + 300 < size - 1000:
        items.append((0x88, l2_span - 100, 300))   # across an L2 table
    if 2 * l2_span + c < size - 1000:
        items.append((0x99, 2 * l2_span - c // 2, c))
    return items


MATRIX = [
    # (compat, cluster_size, virtual size)
    ("0.10", 512, 1 * M + 513),
    ("1.1", 512, 1 * M + 513),
    ("0.10", 4 * K, 12345678),
    ("1.1", 4 * K, 12345678),
    ("0.10", 64 * K, 3 * M + 7),
    ("1.1", 64 * K, 3 * M + 7),
    ("0.10", 2 * M, 3 * 12345678),
    ("1.1", 2 * M, 3 * 12345678),
]


@pytest.mark.parametrize("compat,cluster,size", MATRIX,
                         ids=["v%s-%d-%d" % m for m in MATRIX])
def test_version_cluster_size(tmp_path, compat, cluster, size):
    img = tmp_path / "a.qcow2"
    create(img, size, "compat=" + compat, "cluster_size=%d" % cluster)
    h = read_header(img)
    assert h["version"] == (2 if compat == "0.10" else 3)
    assert h["cluster_bits"] == cluster.bit_length() - 1
    # qemu-img rounds virtual sizes up to a multiple of 512.
    vsize = h["size"]
    write_patterns(img, layout(cluster, vsize))
    raw = qemu_raw(img, tmp_path)
    serve_compare(img, raw, ranges=odd_ranges(vsize, cluster))


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_refcount_bits(tmp_path, bits):
    img = tmp_path / "a.qcow2"
    create(img, 2 * M, "refcount_bits=%d" % bits, "cluster_size=4096")
    assert read_header(img)["refcount_order"] == bits.bit_length() - 1
    write_patterns(img, layout(4096, 2 * M))
    assert_reads_like_qemu(img, tmp_path)


def test_refcount_bits_v2_needs_16(tmp_path):
    # v2 implies 16-bit refcounts; qemu-img refuses anything else.
    p = qemu_img("create", "-f", "qcow2", "-o", "compat=0.10,refcount_bits=8",
                 tmp_path / "x.qcow2", "1M", check=False)
    assert p.returncode != 0


def test_unaligned_virtual_size(tmp_path):
    """A header size that is not a multiple of 512.  qemu-img cannot make
    one (it rounds up), and QEMU itself rounds such a size down to whole
    sectors; we serve the exact header size, whose bytes are the ones
    written before the size was cut."""
    img = tmp_path / "a.qcow2"
    create(img, 1 * M + 1024, "cluster_size=512")
    write_patterns(img, [(0x5a, 1 * M - 100, 1124), (0x11, 66, 42)])
    raw = qemu_raw(img, tmp_path)
    odd = 1 * M + 513
    with open(img, "r+b") as f:
        f.seek(24)
        f.write(struct.pack(">Q", odd))
    with open(raw, "rb") as f:
        expect = f.read(odd)
    with serve(img) as srv:
        h = srv.connect()
        assert h.get_size() == odd
        assert_bytes_equal(h.pread(odd, 0), expect)
        assert_bytes_equal(h.pread(3, odd - 3), expect[-3:], odd - 3)
        h.shutdown()


@pytest.mark.parametrize("prealloc", ["metadata", "falloc", "full"])
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_preallocation(tmp_path, prealloc, compat):
    img = tmp_path / "a.qcow2"
    create(img, 3 * M + 512, "preallocation=" + prealloc, "compat=" + compat,
           "cluster_size=4096")
    write_patterns(img, [(0x11, 66, 42), (0x22, 4096 - 5, 10),
                         (0x33, 1 * M + 3, 70000), (None, 2 * M, 8192)])
    raw = qemu_raw(img, tmp_path)
    serve_compare(img, raw, ranges=odd_ranges(3 * M + 512, 4096))


def test_all_cluster_kinds_v3(tmp_path):
    """Unallocated, ZERO_PLAIN, ZERO_ALLOC, normal and compressed clusters
    side by side, each checked in QEMU's own map before we read them."""
    img = tmp_path / "a.qcow2"
    c = 64 * K
    create(img, 1 * M, "cluster_size=%d" % c)
    write_patterns(img, [
        (0x11, 0, c),                 # normal
        (0x22, c, c), (None, c, c),   # ZERO_ALLOC
        (0x33, 2 * c, c), (None, 2 * c, c, "-u"),   # ZERO_PLAIN
        (None, 3 * c, c),             # zero on unallocated -> ZERO_PLAIN
        (0x44, 4 * c, c, "-c"),       # compressed
        (0x55, 6 * c + 3, 5),         # normal, mostly zero bytes
    ])
    from images import qemu_map
    m = {e["start"]: e for e in qemu_map(img)}
    assert m[0]["data"] and not m[0]["zero"]
    assert m[c]["zero"] and "offset" in m[c]          # ZERO_ALLOC
    assert m[2 * c]["zero"] and "offset" not in m[2 * c]
    assert m[4 * c]["data"] and "offset" not in m[4 * c]   # compressed
    raw = qemu_raw(img, tmp_path)
    serve_compare(img, raw, ranges=[(c - 10, 20), (2 * c - 1, c + 2),
                                    (4 * c + 12345, 4096), (6 * c, 10)])


def test_sparse_4t(tmp_path):
    """A 4 TiB image with data near the far end.  Only a few ranges are
    read; QEMU's bytes come from qemu-img dd and qemu-io read -P."""
    img = tmp_path / "big.qcow2"
    size = 4 * T
    create(img, size)
    writes = [(0x11, 66, 42),
              (0x5a, size - 1 * M - 37, 5000),
              (0xa5, size - 4096, 4096),
              (0x3c, 2 * T - 100, 200),
              (0x77, 3 * T + 512 * M - 7, 14)]    # across an L2 table
    write_patterns(img, writes)
    for pat, off, ln in writes:
        qemu_verify_pattern(img, off, ln, pat)
    ranges = [(0, 256 * K), (size - 2 * M, 2 * M), (size - 512, 512),
              (2 * T - 64 * K, 128 * K), (3 * T + 512 * M - 64 * K, 128 * K),
              (1 * T + 12345, 4096)]
    with serve(img) as srv:
        h = srv.connect()
        assert h.get_size() == size
        for off, ln in ranges:
            assert_bytes_equal(h.pread(ln, off),
                               qemu_range(img, off, ln, tmp_path), off)
        for pat, off, ln in writes:
            assert h.pread(ln, off) == bytes([pat]) * ln
            # Bytes right around each write are zero.
            if off >= 1:
                assert h.pread(1, off - 1) == b"\0"
            if off + ln < size:
                assert h.pread(1, off + ln) == b"\0"
        h.shutdown()


@pytest.mark.parametrize("cluster", [64 * K, 2 * M])
def test_l2_boundary_large_clusters(tmp_path, cluster):
    """Reads across L2 tables with big clusters (an L2 table covers 512 MiB
    with 64 KiB clusters, 512 GiB with 2 MiB): sparse images, range reads."""
    img = tmp_path / "a.qcow2"
    span = cluster * (cluster // 8)
    size = 2 * span + 4 * M
    create(img, size, "cluster_size=%d" % cluster)
    write_patterns(img, [(0x21, span - 1000, 3000),
                         (0x42, 2 * span - cluster - 3, cluster + 6)])
    with serve(img) as srv:
        h = srv.connect()
        for off, ln in [(span - 64 * K, 128 * K),
                        (2 * span - cluster - 4096, cluster + 8192),
                        (size - 4 * M, 4 * M)]:
            assert_bytes_equal(h.pread(ln, off),
                               qemu_range(img, off, ln, tmp_path), off)
        h.shutdown()


def test_many_small_writes_one_image(tmp_path):
    """A dense patchwork of unaligned writes with 512-byte clusters (many
    L2 tables, host clusters out of guest order)."""
    import random
    rnd = random.Random(42)
    img = tmp_path / "a.qcow2"
    size = 2 * M
    create(img, size, "cluster_size=512")
    items = []
    for i in range(150):
        off = rnd.randrange(size - 5000)
        ln = rnd.randrange(1, 5000)
        kind = rnd.random()
        if kind < 0.15:
            items.append((None, off, ln))
        else:
            items.append((rnd.randrange(1, 256), off, ln))
    write_patterns(img, items)
    raw = qemu_raw(img, tmp_path)
    with serve(img) as srv:
        h = srv.connect()
        assert_same_as_raw(h, raw)
        assert_ranges_like_raw(h, raw, [(o, n) for _, o, n in items[:60]])
        h.shutdown()


def _kind_image(tmp_path, kind):
    img = tmp_path / "a.qcow2"
    if kind == "v2":
        create(img, 2 * M, "compat=0.10", "cluster_size=4096")
    elif kind == "extended_l2":
        create(img, 2 * M, "extended_l2=on")
    elif kind == "chain":
        base = create(tmp_path / "base.qcow2", 2 * M)
        write_patterns(base, [(0x61, 0, 2 * M)])
        create(img, None, backing="base.qcow2", backing_fmt="qcow2")
    else:
        create(img, 2 * M, "cluster_size=512")
    write_patterns(img, [(0x11, 66, 42), (0x22, 4095, 2),
                         (0x33, 100 * K + 1, 200 * K), (None, 1 * M, 64 * K),
                         (0x44, 1536 * K, 64 * K, "-c")])
    return img


@pytest.mark.parametrize("kind", ["v3-512", "v2", "extended_l2", "chain"])
def test_reads_through_writable_open(tmp_path, kind):
    """The default server (no -r) opens the image for writing when a client
    connects; reads must be the same, and reading alone must leave the
    image as QEMU sees it, and clean."""
    img = _kind_image(tmp_path, kind)
    raw = qemu_raw(img, tmp_path)
    serve_compare(img, raw, ranges=odd_ranges(2 * M, 512), readonly=False)
    raw2 = qemu_raw(img, tmp_path)
    with open(raw, "rb") as a, open(raw2, "rb") as b:
        same = a.read() == b.read()
    assert same, "reading through a writable open changed the disk"
    p = qemu_img("check", img, check=False)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("cache", ["1", "0"])
def test_cache_size(tmp_path, cache):
    """Many L2 tables (512-byte clusters: one per 32 KiB) through caches
    too small to hold them, with many requests in flight at once."""
    import random
    import nbd
    size = 8 * M
    # Data in every L2 table, holes between.
    src = raw_from_layout(tmp_path / "src.raw", size, [
        (i * 32 * K + (i * 37) % 30000, 1000, (i % 250) + 1)
        for i in range(size // (32 * K))])
    img = convert(src, tmp_path / "a.qcow2", "cluster_size=512")
    raw = qemu_raw(img, tmp_path)
    with open(raw, "rb") as f:
        expect = f.read()
    rnd = random.Random(11)
    with serve(img, "cache-size=" + cache) as srv:
        h = srv.connect()
        assert_same_as_raw(h, raw)
        bufs = []
        for _ in range(300):
            off = rnd.randrange(size - 70000)
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
