"""Images whose metadata is in states a reader must cope with: internal
snapshots (the active layer is served), persistent dirty bitmaps, lazy
refcounts, and the dirty and corrupt bits.  Serving is read-only, so none
of these may stop the image from being read, and none may change what is
read."""

import pytest

from conftest import qemu_img, qemu_raw
from images import (assert_files_equal, convert, create, raw_from_layout,
                    read_header, serve_compare, set_feature_bit,
                    write_patterns, odd_ranges)

K = 1024
M = 1024 * 1024


def snapshot(img, name):
    qemu_img("snapshot", "-c", name, img)


def snapshot_raw(img, name, out):
    qemu_img("convert", "-l", "snapshot.name=" + name, "-O", "raw", img, out)
    return out


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_internal_snapshots_active_layer(tmp_path, compat):
    img = create(tmp_path / "a.qcow2", 4 * M, "compat=" + compat,
                 "cluster_size=4096")
    write_patterns(img, [(0x11, 0, 4 * M)])
    snapshot(img, "s1")
    write_patterns(img, [(0x22, 100 * K + 3, 300 * K),    # COW of shared
                         (None, 1 * M, 64 * K),
                         (0x23, 2 * M, 4096)])
    snapshot(img, "s2")
    write_patterns(img, [(0x33, 120 * K, 10), (None, 3 * M, 8192, "-u")])
    assert read_header(img)["nb_snapshots"] == 2
    raw = qemu_raw(img, tmp_path)
    s1 = snapshot_raw(img, "s1", tmp_path / "s1.raw")
    with open(raw, "rb") as a, open(s1, "rb") as b:
        differ = a.read() != b.read()
    assert differ, "snapshot equals the active layer"
    serve_compare(img, raw, ranges=odd_ranges(4 * M, 4096) +
                  [(100 * K, 4096), (120 * K - 1, 12), (3 * M - 1, 8194)])


def test_snapshot_applied(tmp_path):
    """After qemu-img snapshot -a the active L1 is the snapshot's copy."""
    img = create(tmp_path / "a.qcow2", 2 * M)
    write_patterns(img, [(0x51, 0, 1 * M)])
    snapshot(img, "s1")
    write_patterns(img, [(0x52, 0, 512 * K), (None, 768 * K, 64 * K)])
    s1 = snapshot_raw(img, "s1", tmp_path / "s1.raw")
    qemu_img("snapshot", "-a", "s1", img)
    raw = qemu_raw(img, tmp_path)
    assert_files_equal(raw, s1)
    serve_compare(img, raw)


def test_snapshot_deleted(tmp_path):
    img = create(tmp_path / "a.qcow2", 2 * M)
    write_patterns(img, [(0x61, 0, 2 * M)])
    snapshot(img, "s1")
    write_patterns(img, [(0x62, 64 * K, 64 * K)])
    snapshot(img, "s2")
    qemu_img("snapshot", "-d", "s1", img)
    write_patterns(img, [(0x63, 1 * M + 1, 10)])
    assert read_header(img)["nb_snapshots"] == 1
    raw = qemu_raw(img, tmp_path)
    serve_compare(img, raw)


def test_many_snapshots(tmp_path):
    img = create(tmp_path / "a.qcow2", 1 * M, "cluster_size=512")
    for i in range(20):
        write_patterns(img, [(i + 1, i * 5000 + i, 3000)])
        snapshot(img, "snap%d" % i)
    assert read_header(img)["nb_snapshots"] == 20
    raw = qemu_raw(img, tmp_path)
    serve_compare(img, raw)


def test_compressed_clusters_shared_with_snapshot(tmp_path):
    src = raw_from_layout(tmp_path / "src.raw", 2 * M, [(0, 2 * M, "text")])
    img = convert(src, tmp_path / "a.qcow2", compress=True)
    snapshot(img, "s1")
    write_patterns(img, [(0x71, 64 * K + 5, 100), (None, 1 * M, 64 * K)])
    raw = qemu_raw(img, tmp_path)
    serve_compare(img, raw, ranges=[(64 * K, 4096), (1 * M - 10, 20)])


@pytest.mark.parametrize("n", [1, 3])
def test_persistent_bitmaps(tmp_path, n):
    img = create(tmp_path / "a.qcow2", 4 * M)
    write_patterns(img, [(0x81, 0, 64 * K)])
    for i in range(n):
        qemu_img("bitmap", "--add", "-g", "%d" % (64 * K << i), img,
                 "b%d" % i)
    # qemu-io updates the enabled bitmaps as it writes.
    write_patterns(img, [(0x82, 1 * M + 3, 200 * K), (None, 3 * M, 64 * K)])
    qemu_img("bitmap", "--disable", img, "b0")
    write_patterns(img, [(0x83, 2 * M, 4096)])
    h = read_header(img)
    assert h["autoclear"] & 1, "bitmaps autoclear bit not set"
    info = qemu_img("info", img).stdout
    assert "b0" in info and "bitmaps" in info
    raw = qemu_raw(img, tmp_path)
    serve_compare(img, raw)


def test_bitmaps_extension_without_autoclear_bit(tmp_path):
    """A writer that does not know bitmaps cleared the autoclear bit: the
    extension is stale and ignored."""
    img = create(tmp_path / "a.qcow2", 2 * M)
    qemu_img("bitmap", "--add", img, "b0")
    write_patterns(img, [(0x91, 5000, 5000)])
    set_feature_bit(img, "autoclear", 0, on=False)
    raw = qemu_raw(img, tmp_path)
    serve_compare(img, raw)


def test_bitmap_in_use(tmp_path):
    """A bitmap left in_use (its writer died): only the bitmap is stale."""
    import struct
    img = create(tmp_path / "a.qcow2", 2 * M)
    qemu_img("bitmap", "--add", img, "b0")
    write_patterns(img, [(0x92, 0, 4096)])
    from images import header_extensions
    ext = [d for m, d in header_extensions(img) if m == 0x23852875]
    assert ext
    dir_off = struct.unpack(">Q", ext[0][16:24])[0]
    with open(img, "r+b") as f:
        f.seek(dir_off + 12)
        flags = struct.unpack(">I", f.read(4))[0]
        f.seek(dir_off + 12)
        f.write(struct.pack(">I", flags | 1))
    raw = qemu_raw(img, tmp_path)
    serve_compare(img, raw)


def test_lazy_refcounts(tmp_path):
    img = create(tmp_path / "a.qcow2", 4 * M, "lazy_refcounts=on",
                 "cluster_size=4096")
    assert read_header(img)["compatible"] & 1
    write_patterns(img, [(0xa1, 66, 42), (0xa2, 1 * M - 1, 2),
                         (0xa3, 2 * M, 512 * K), (None, 2 * M + 4096, 4096)])
    raw = qemu_raw(img, tmp_path)
    serve_compare(img, raw, ranges=odd_ranges(4 * M, 4096))


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "eager"])
def test_dirty_bit(tmp_path, lazy):
    """The dirty bit as a crash leaves it: refcounts may be stale, the L1/L2
    mapping is right.  A read-only reader serves the data."""
    opts = ["cluster_size=4096"] + (["lazy_refcounts=on"] if lazy else [])
    img = create(tmp_path / "a.qcow2", 4 * M, *opts)
    write_patterns(img, [(0xb1, 0, 1 * M), (0xb2, 3 * M + 7, 9)])
    raw = qemu_raw(img, tmp_path)
    set_feature_bit(img, "incompatible", 0)
    assert read_header(img)["incompatible"] & 1
    # QEMU still reads it the same (read-only open does not repair).
    raw2 = qemu_raw(img, tmp_path)
    assert_files_equal(raw, raw2)
    assert read_header(img)["incompatible"] & 1
    serve_compare(img, raw)
    # We never write: the bit is still set.
    assert read_header(img)["incompatible"] & 1


def test_dirty_with_leaked_refcounts(tmp_path):
    """Dirty image whose refcounts really are stale (a cluster's refcount
    zeroed): reads follow L1/L2 only."""
    img = create(tmp_path / "a.qcow2", 2 * M, "lazy_refcounts=on")
    write_patterns(img, [(0xc1, 0, 256 * K)])
    raw = qemu_raw(img, tmp_path)
    # Zero the refcount block: every refcount is now 0.
    import struct
    h = read_header(img)
    csize = 1 << h["cluster_bits"]
    with open(img, "r+b") as f:
        f.seek(48)
        rt_off = struct.unpack(">Q", f.read(8))[0]
        f.seek(rt_off)
        rb = struct.unpack(">Q", f.read(8))[0]
        f.seek(rb + 2 * (rb // csize) + 2)   # keep the block's own refcount
        f.write(b"\0" * 64)
    set_feature_bit(img, "incompatible", 0)
    serve_compare(img, raw)


def test_corrupt_bit(tmp_path):
    """QEMU opens an image marked corrupt read-only, and reads it."""
    img = create(tmp_path / "a.qcow2", 2 * M)
    write_patterns(img, [(0xd1, 4096, 8192)])
    set_feature_bit(img, "incompatible", 1)
    raw = qemu_raw(img, tmp_path)
    with open(raw, "rb") as f:
        f.seek(4096)
        assert f.read(1) == b"\xd1"
    serve_compare(img, raw)


def test_unknown_compatible_and_autoclear_bits(tmp_path):
    img = create(tmp_path / "a.qcow2", 2 * M)
    write_patterns(img, [(0xe1, 0, 4096)])
    set_feature_bit(img, "compatible", 42)
    set_feature_bit(img, "autoclear", 42)
    raw = qemu_raw(img, tmp_path)
    serve_compare(img, raw)
