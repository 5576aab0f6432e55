"""Filters stacked above nbdkit-qcow2-filter (issue 9, "filters above").

The engine runs as the filter over nbdkit's file plugin holding the image
(conftest's filter-file layer: the file grown first as a container), and
another filter sits above it, the first --filter on the command line
being the outermost:

    nbdkit --filter=ABOVE --filter=qcow2 file IMAGE ...

Each stack is checked against QEMU's answer:

- cow: writes land in the overlay; reads are qemu-img convert's bytes
  with the writes on top, and the image file does not change by a byte;
- cache (writeback, writethrough) and blocksize (4 KiB minimum block,
  1 MiB maximum request: the random unaligned requests of mirror.py
  become read-modify-writes): the mirror driver's random writes, zeroes,
  trims and flushes, then qemu-img check clean and QEMU reads the mirror
  (mirror.finish);
- nbdkit-qcow2-snapshot-filter: every byte equals `qemu-img convert -l
  snapshot.name=NAME`;
- nbdkit-qcow2-compress-filter: nbdcopy of a raw file in, then qemu-img
  check clean, qemu-img compare identical, and the compressible clusters
  stored compressed.
"""
import subprocess

import pytest

import images
from conftest import (COMPRESS_FILTER, SNAPSHOT_FILTER, assert_same_as_raw,
                      qemu_img, qemu_raw, serve)
from mirror import (Driver, Geometry, Src, assert_check_clean, connect_meta,
                    drive, finish, qemu_raw_bytes, sha256_file)

K = 1 << 10
M = 1 << 20

pytestmark = [pytest.mark.usefixtures("layer"),
              pytest.mark.parametrize("layer", ["filter-file"],
                                      indirect=True)]


def used_image(path, size=32 * M, cluster=64 * K):
    """A qcow2 image with data in it: patterns, a compressed cluster, a
    zero cluster, an unaligned write straddling clusters."""
    images.create(path, size, "cluster_size=%d" % cluster)
    images.write_patterns(path, [
        (0x11, 0, 3 * cluster),
        (0x22, 5 * cluster, cluster, "-c"),
        (None, 7 * cluster, cluster),
        (0x33, 9 * cluster - 1000, 5000),
        (0x44, size // 2, 2 * M),
        (0x55, size - cluster, cluster),
    ])
    return path


# --------------------------------------------------------------------------
# cow: a throw-away overlay above the engine

def test_cow_keeps_the_image_unchanged(tmp_path):
    img = used_image(tmp_path / "cow.qcow2")
    raw = qemu_raw(img, tmp_path)
    with open(raw, "rb") as f:
        mirror = bytearray(f.read())
    with serve(img, filters=["cow"]) as srv:
        # serve() has grown the container: these are the bytes to keep.
        before = sha256_file(img)
        hs = [connect_meta(srv.uri) for _ in range(2)]
        assert not hs[0].is_read_only()
        assert_same_as_raw(hs[0], raw)
        # nbdkit 1.32's cow filter offers no zero requests.
        d = Driver(hs, Geometry(img), mirror, 901, zero=False)
        d.run(200)
        for h in hs:
            h.flush()
            h.shutdown()
    assert d.stats.get("write", 0) > 0
    assert sha256_file(img) == before, "a write through cow reached the image"
    assert_check_clean(Src(img))
    with open(raw, "rb") as f:
        assert qemu_raw_bytes(Src(img), tmp_path) == f.read()


# --------------------------------------------------------------------------
# cache and blocksize: every write reaches the image, through them

@pytest.mark.parametrize("mode", ["writeback", "writethrough"])
def test_cache_above(tmp_path, mode):
    img = used_image(tmp_path / "cache.qcow2")
    # A writeback cache writes to the engine on flush (or when it evicts):
    # the driver flushes before it disconnects, as a careful client does.
    mirror, _ = drive(img, tmp_path, 910 + len(mode), 250, filters=["cache"],
                      params=["cache=" + mode], final_flush=True)
    finish(img, tmp_path, mirror)


@pytest.mark.parametrize("cluster", [4 * K, 64 * K])
def test_blocksize_above(tmp_path, cluster):
    img = used_image(tmp_path / "bs.qcow2", cluster=cluster)
    mirror, d = drive(img, tmp_path, 920 + cluster // K, 250,
                      filters=["blocksize"],
                      params=["minblock=4096", "maxdata=1M"])
    assert d.stats.get("write", 0) > 0
    finish(img, tmp_path, mirror)


# --------------------------------------------------------------------------
# Our own filters above the filter

@pytest.fixture
def snapshotted(tmp_path):
    """Snapshots 'first' (id 1) and 'second' (id 2), then more writes."""
    img = used_image(tmp_path / "snap.qcow2", size=16 * M)
    qemu_img("snapshot", "-c", "first", img)
    images.write_patterns(img, [(0x66, 0, 512 * K), (None, 5 * 64 * K, 64 * K),
                                (0x77, 8 * M - 3000, 6000)])
    qemu_img("snapshot", "-c", "second", img)
    images.write_patterns(img, [(0x88, 256 * K, 64 * K)])
    return img


@pytest.mark.parametrize("snapshot,name", [("first", "first"),
                                           ("2", "second")])
def test_snapshot_filter_above(tmp_path, snapshotted, snapshot, name):
    img = snapshotted
    raw = qemu_raw(img, tmp_path, "-l", "snapshot.name=" + name)
    before = sha256_file(img)
    with serve(img, "snapshot=" + snapshot, filters=[SNAPSHOT_FILTER],
               readonly=True) as srv:
        # Whatever export the client names, it gets the snapshot.
        for export in ("", "anything"):
            h = srv.connect(export)
            assert h.is_read_only()
            assert_same_as_raw(h, raw)
            h.shutdown()
    assert sha256_file(img) == before


def test_compress_filter_above(tmp_path):
    size, cluster = 24 * M, 64 * K
    layout = [(0, 4 * M, "text"), (4 * M, 2 * M, "random"),
              (6 * M, 1 * M, 0), (8 * M, 3 * M + 5000, "text"),
              (16 * M, 1 * M, 0x5a), (size - 2 * M, 2 * M, "text")]
    src = images.raw_from_layout(tmp_path / "src.raw", size, layout)
    img = images.create(tmp_path / "out.qcow2", size,
                        "cluster_size=%d" % cluster)
    with serve(img, filters=[COMPRESS_FILTER]) as srv:
        p = subprocess.run(["nbdcopy", str(src), srv.uri], text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert p.returncode == 0, p.stderr + srv.stderr
    assert_check_clean(Src(img))
    p = qemu_img("compare", "-f", "raw", "-F", "qcow2", src, img,
                 check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    # Every whole cluster of text is stored compressed (it compresses to
    # about a third); random data does not compress and is stored plain.
    compressed = {g for g, _, _ in images.compressed_clusters(img)}
    text = {c for off, ln, kind in layout if kind == "text"
            for c in range(-(-off // cluster) * cluster, off + ln - cluster + 1,
                           cluster)}
    assert text and text <= compressed, \
        "text clusters not compressed: %s" % sorted(text - compressed)[:8]
    assert not compressed & set(range(4 * M, 6 * M, cluster)), \
        "random data stored compressed"
