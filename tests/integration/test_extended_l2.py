"""Extended L2 entries: 32 subclusters per cluster, each allocated, zero or
unallocated (falling through to the backing file)."""

import pytest

from conftest import qemu_raw
from images import (serve, check_extents, connect_meta, create, l2_entries, odd_ranges,
                    raw_from_layout, serve_compare, write_patterns)

K = 1024
M = 1024 * 1024


def sub_layout(cluster):
    """Writes that leave clusters with mixed subcluster states."""
    c, s = cluster, cluster // 32
    return [
        (0x11, 0, s),                       # one subcluster, rest unallocated
        (0x12, c + 5 * s, s),               # a single middle subcluster
        (0x13, c + 7 * s + 100, 10),        # partial subcluster (COW inside)
        (0x14, 2 * c + 31 * s, 2 * s),      # last subcluster + next cluster
        (0x15, 3 * c, c), (None, 3 * c + 4 * s, 2 * s),   # zero inside data
        (None, 4 * c + 3 * s, s),           # zero subcluster, no data
        (0x16, 5 * c, c), (None, 5 * c, c, "-u"),          # whole-cluster zero
        (0x17, 6 * c + s - 1, 2),           # across subclusters
        (0x18, 8 * c, c, "-c"),             # compressed
        (0x19, 9 * c + 9 * s, 5 * s),
        (None, 9 * c + 10 * s, s, "-u"),    # unmap one subcluster
    ]


def assert_mixed_bitmaps(img, cluster):
    entries = l2_entries(img)
    assert entries, "no L2 entries"
    alloc_mix = [b for _, e, b in entries
                 if (b & 0xffffffff) not in (0, 0xffffffff)]
    zero_bits = [b for _, e, b in entries if b >> 32]
    assert alloc_mix, "no cluster with partly allocated subclusters"
    assert zero_bits, "no zero subclusters"
    return entries


@pytest.mark.parametrize("cluster", [32 * K, 64 * K, 2 * M])
def test_subclusters(tmp_path, cluster):
    size = 12 * cluster + 777 * 512
    img = create(tmp_path / "a.qcow2", size, "extended_l2=on",
                 "cluster_size=%d" % cluster)
    write_patterns(img, sub_layout(cluster))
    assert_mixed_bitmaps(img, cluster)
    raw = qemu_raw(img, tmp_path)
    s = cluster // 32
    serve_compare(img, raw, ranges=odd_ranges(size, cluster) +
                  [(s - 3, 6), (cluster + 4 * s, 4 * s + 17), (3 * cluster + 3 * s, 4 * s),
                   (9 * cluster + 8 * s + 1, 4 * s)])
    with serve(img) as srv:
        h = connect_meta(srv)
        check_extents(h, img, raw, zero_required=True)
        h.shutdown()


@pytest.mark.parametrize("cluster", [32 * K, 64 * K, 2 * M])
def test_subclusters_over_backing(tmp_path, cluster):
    """Unallocated subclusters of an allocated cluster read the backing
    file; zero subclusters mask it."""
    size = 12 * cluster
    base = raw_from_layout(tmp_path / "base.raw", size,
                           [(0, size, "random")])
    img = create(tmp_path / "a.qcow2", None, "extended_l2=on",
                 "cluster_size=%d" % cluster, backing="base.raw",
                 backing_fmt="raw")
    write_patterns(img, sub_layout(cluster))
    assert_mixed_bitmaps(img, cluster)
    raw = qemu_raw(img, tmp_path)
    with open(raw, "rb") as f, open(base, "rb") as b:
        data, bdata = f.read(), b.read()
    s = cluster // 32
    # Subcluster 1 of cluster 0 is unallocated: backing data shows.
    shows = data[s:2 * s] == bdata[s:2 * s]
    assert shows
    serve_compare(img, raw, ranges=odd_ranges(size, cluster) +
                  [(s - 5, 10), (cluster + 4 * s - 1, 3 * s + 2),
                   (4 * cluster + 2 * s, 3 * s)])
    with serve(img) as srv:
        h = connect_meta(srv)
        check_extents(h, img, raw)
        h.shutdown()


def test_extended_l2_over_qcow2_extended_l2(tmp_path):
    c = 64 * K
    s = c // 32
    base = create(tmp_path / "base.qcow2", 2 * M, "extended_l2=on",
                  "cluster_size=%d" % c)
    write_patterns(base, [(0x21, 0, 2 * M), (None, 3 * s, s),
                          (0x22, c + 2 * s, s)])
    top = create(tmp_path / "top.qcow2", None, "extended_l2=on",
                 "cluster_size=%d" % c, backing="base.qcow2",
                 backing_fmt="qcow2")
    write_patterns(top, [(0x31, s, s), (None, 5 * s, s),
                         (0x32, c + 2 * s + 7, 3)])
    raw = qemu_raw(top, tmp_path)
    serve_compare(top, raw, ranges=[(0, 8 * s), (c + s, 3 * s)])


def test_extended_l2_with_data_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = 64 * K
    img = create(tmp_path / "a.qcow2", 2 * M, "extended_l2=on",
                 "data_file=a.data")
    write_patterns(img, [l for l in sub_layout(c) if "-c" not in l[3:]])
    raw = qemu_raw(img, tmp_path)
    serve_compare(img, raw, ranges=odd_ranges(2 * M, c))
