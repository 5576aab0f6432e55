"""The write path: after any sequence of client writes, zeroes, trims and
flushes, `qemu-img check` finds the image clean (exit 0: no corruption,
no leak) and QEMU reads exactly the bytes the client wrote.

The random-operation driver (mirror.py) runs over every kind of image:
v2 and v3, cluster sizes 512 B to 2 MiB, refcount widths 1 to 64 bits,
extended L2 with and without a backing file, backing chains, internal
snapshots, compressed, preallocated, zero clusters, encrypted (LUKS and
legacy AES), external data files, persistent bitmaps, lazy refcounts.
Then come targeted semantics: compressed clusters rewritten as normal
ones, COPIED flags, trim releasing space, huge zero requests, FAST_ZERO,
read-only serving and image locks.
"""

import json
import os
import struct
import subprocess
import time

import nbd
import pytest

from conftest import (engine_args, nbdkit_env, only_plugin,
                      qemu_img, qemu_io, run)
from conftest import serve as rw_serve
from images import (compressed_clusters, convert, create, luks_create,
                    raw_from_layout, read_header, serve as ro_serve,
                    text_like, write, write_file)
from mirror import (Geometry, Src, assert_check_clean, assert_same, drive,
                    drive_and_finish, extents_sane, finish, make_image,
                    prefill_cmds, qemu_raw_bytes, sha256_file, zero_or_prev,
                    connect_meta)

# Every test once per layer running the engine (conftest.py): the plugin,
# and the filter over a file that holds the image as a container.
pytestmark = pytest.mark.usefixtures("write_layer")

K = 1024
M = 1024 * K
PASS = "s3cr3t-pass"


# --------------------------------------------------------------------------
# The driver over the basic matrix

BASIC = [
    # id, size, create options, seed, ops
    ("v2-64k", 16 * M, ["compat=0.10"], 1, 300),
    ("v2-512", 8 * M, ["compat=0.10", "cluster_size=512"], 2, 250),
    ("v2-4k", 16 * M, ["compat=0.10", "cluster_size=4096"], 3, 250),
    ("v3-512", 16 * M, ["cluster_size=512"], 4, 300),
    ("v3-4k", 16 * M, ["cluster_size=4096"], 5, 300),
    ("v3-64k", 32 * M, [], 6, 400),
    ("v3-2M", 32 * M, ["cluster_size=2M"], 7, 200),
    ("rb1-512", 8 * M, ["refcount_bits=1", "cluster_size=512"], 11, 250),
    ("rb2-4k", 16 * M, ["refcount_bits=2", "cluster_size=4096"], 12, 250),
    ("rb4-64k", 16 * M, ["refcount_bits=4"], 13, 250),
    ("rb8-4k", 16 * M, ["refcount_bits=8", "cluster_size=4096"], 14, 250),
    ("rb32-512", 8 * M, ["refcount_bits=32", "cluster_size=512"], 15, 250),
    ("rb64-4k", 16 * M, ["refcount_bits=64", "cluster_size=4096"], 16, 250),
    ("lazy-refcounts", 16 * M, ["lazy_refcounts=on", "cluster_size=4096"],
     17, 250),
]


@pytest.mark.parametrize("name,size,opts,seed,nops", BASIC,
                         ids=[b[0] for b in BASIC])
def test_random_ops(tmp_path, name, size, opts, seed, nops):
    # refcount_bits=1 cannot share a host cluster between compressed
    # clusters; QEMU itself refuses to write them.
    compressed = "refcount_bits=1" not in opts
    img = make_image(tmp_path / "a.qcow2", size, *opts, compressed=compressed)
    assert_check_clean(Src(img))
    drive_and_finish(img, tmp_path, seed, nops)
    if "lazy_refcounts=on" in opts:
        # Still lazy, and not left dirty.
        info = json.loads(qemu_img("info", "--output=json", img).stdout)
        assert info["format-specific"]["data"]["lazy-refcounts"] is True
        assert not info.get("dirty-flag")


@pytest.mark.parametrize("opts", [["cluster_size=512"],
                                  ["cluster_size=65536", "extended_l2=on"],
                                  ["cluster_size=4096", "compat=0.10"]],
                         ids=["512", "extl2-64k", "v2-4k"])
def test_concurrent_requests(tmp_path, opts):
    """Batches of up to 48 requests in flight over 4 connections, many
    inside the same few clusters: writes merging partial clusters, zeroes,
    trims and reads all at once."""
    img = make_image(tmp_path / "a.qcow2", 8 * M, *opts)
    drive_and_finish(img, tmp_path, 24, 60, connections=4, storm=True)


SMALL_CACHE = [
    ("512", 16 * M, ["cluster_size=512"]),
    ("512-rb64", 16 * M, ["cluster_size=512", "refcount_bits=64"]),
    ("4k-v2", 16 * M, ["cluster_size=4096", "compat=0.10"]),
    ("extl2-32k", 16 * M, ["cluster_size=32768", "extended_l2=on"]),
]


@pytest.mark.parametrize("name,size,opts", SMALL_CACHE,
                         ids=[c[0] for c in SMALL_CACHE])
def test_small_cache(tmp_path, name, size, opts):
    """cache-size=1 (the minimum number of L2 slices): dirty L2 slices
    are evicted and written back under pressure all the time.  With
    512-byte clusters and 64-bit refcounts the refcount blocks (512 of
    them) do not fit their cache either."""
    img = make_image(tmp_path / "a.qcow2", size, *opts)
    drive_and_finish(img, tmp_path, 25, 250, params=["cache-size=1"])


def test_preallocated_zero_clusters(tmp_path):
    """Every cluster a preallocated zero cluster, or a plain one."""
    img = create(tmp_path / "a.qcow2", 8 * M, "cluster_size=4096")
    write(img, "write -P 0x5a 0 8M", "write -z 0 4M", "write -z -u 4M 4M")
    kinds = {(e["zero"], "offset" in e)
             for e in json.loads(qemu_img("map", "--output=json",
                                          img).stdout)}
    assert (True, True) in kinds and (True, False) in kinds
    drive_and_finish(img, tmp_path, 21, 250)


@pytest.mark.parametrize("prealloc", ["metadata", "falloc", "full"])
def test_preallocation(tmp_path, prealloc):
    img = create(tmp_path / "a.qcow2", 8 * M, "preallocation=" + prealloc,
                 "cluster_size=4096")
    drive_and_finish(img, tmp_path, 22, 200)


def test_refcount_table_grows(tmp_path):
    """512-byte clusters with 64-bit refcounts: one refcount table cluster
    covers 64 refcount blocks of 64 clusters, 2 MiB of file.  Writing 6 MiB
    must grow (and move) the table, and the old table's cluster becomes
    free space that later allocations may reuse."""
    img = create(tmp_path / "a.qcow2", 8 * M, "cluster_size=512",
                 "refcount_bits=64")
    rt_clusters = struct.unpack(">I", open(img, "rb").read(60)[56:60])[0]
    assert rt_clusters == 1
    mirror = bytearray(8 * M)
    import random
    rnd = random.Random(31)
    with rw_serve(img) as srv:
        h = srv.connect()
        for off in range(0, 6 * M, 256 * K):
            data = rnd.randbytes(256 * K - 512)
            h.pwrite(data, off + 300)
            mirror[off + 300:off + 300 + len(data)] = data
        h.flush()
        hdr = open(img, "rb").read(64)
        rt_off, rt_clusters = struct.unpack(">QI", hdr[48:60])
        assert rt_clusters > 1, "the refcount table did not grow"
        assert rt_off != 512
        # Free everything and write again: the freed space (the old table
        # included) is reused and must not collide with metadata.
        h.zero(8 * M, 0)
        mirror[:] = bytes(8 * M)
        for off in range(0, 6 * M, 300 * K):
            data = rnd.randbytes(100 * K + 7)
            h.pwrite(data, off)
            mirror[off:off + len(data)] = data
        h.shutdown()
    info = json.loads(qemu_img("info", "--output=json", img).stdout)
    assert info["format-specific"]["data"]["refcount-bits"] == 64
    finish(img, tmp_path, mirror)
    # And the driver on top of the grown table.
    drive_and_finish(img, tmp_path, 32, 200)


# --------------------------------------------------------------------------
# Extended L2, backing chains

def random_raw(path, size, seed):
    return raw_from_layout(path, size, [(0, size // 2, "random"),
                                        (size // 2, size // 4, "text"),
                                        (size * 3 // 4 + 4096, size // 8, 0xb7)],
                           seed=seed)


@pytest.mark.parametrize("cs", ["64k", "32k"])
@pytest.mark.parametrize("backing", [False, True], ids=["alone", "backed"])
def test_extended_l2(tmp_path, cs, backing):
    size = 16 * M
    kw = {}
    hashes = {}
    if backing:
        base = make_image(tmp_path / "base.qcow2", size, "cluster_size=4096")
        write(base, "write -P 0x77 1M 6M", "write -P 0x78 9M 3M")
        kw = dict(backing="base.qcow2", backing_fmt="qcow2")
        hashes["base"] = sha256_file(base)
    img = make_image(tmp_path / "a.qcow2", size if not backing else None,
                     "extended_l2=on", "cluster_size=" + cs,
                     compressed=True, **kw)
    drive_and_finish(img, tmp_path, 41 + backing, 300)
    if backing:
        assert sha256_file(tmp_path / "base.qcow2") == hashes["base"]


CHAINS = [
    # id, top options, mid options
    ("top64k-mid4k", ["cluster_size=65536"], ["cluster_size=4096"]),
    ("top512-mid64k", ["cluster_size=512"], ["cluster_size=65536"]),
    ("top4k-v2-mid64k", ["cluster_size=4096", "compat=0.10"],
     ["cluster_size=65536"]),
    ("topv2-64k-midv2-512", ["compat=0.10"],
     ["compat=0.10", "cluster_size=512"]),
]


@pytest.mark.parametrize("name,top_opts,mid_opts", CHAINS,
                         ids=[c[0] for c in CHAINS])
def test_backing_chain(tmp_path, name, top_opts, mid_opts):
    """qcow2 over qcow2 over raw: partial writes merge what lies below,
    zeroes and trims never let lower data show through, and the lower
    files are never written."""
    size = 16 * M
    base = random_raw(tmp_path / "base.raw", size, 5)
    mid = create(tmp_path / "mid.qcow2", None, *mid_opts, backing="base.raw",
                 backing_fmt="raw")
    write(mid, "write -P 0x21 1M 2M", "write -z 4M 1M",
          "write -P 0x22 %d 100000" % (size - 100000))
    if "compat=0.10" not in mid_opts:
        write(mid, "write -c -P 0x23 6M 256k")
    top = create(tmp_path / "top.qcow2", None, *top_opts, backing="mid.qcow2",
                 backing_fmt="qcow2")
    write(top, "write -P 0x31 2M 64k", "write -z 8M 512k",
          "write -P 0x32 %d 777" % (10 * M + 5))
    hashes = {p: sha256_file(tmp_path / p) for p in ("base.raw", "mid.qcow2")}
    drive_and_finish(top, tmp_path, 51, 300)
    for p, hsh in hashes.items():
        assert sha256_file(tmp_path / p) == hsh, "%s changed" % p
    assert_check_clean(Src(tmp_path / "mid.qcow2"))


def test_backing_shorter_than_top(tmp_path):
    """A backing file smaller than the top image: past its end the top
    reads zeros, and COW of the boundary cluster merges both."""
    base = random_raw(tmp_path / "base.raw", 5 * M + 1234, 6)
    top = create(tmp_path / "top.qcow2", 12 * M, "cluster_size=65536",
                 backing="base.raw", backing_fmt="raw")
    h0 = sha256_file(base)
    drive_and_finish(top, tmp_path, 52, 250)
    assert sha256_file(base) == h0


# --------------------------------------------------------------------------
# Snapshots, compressed images

def snapshot_raw(img, tmp_path, name):
    return qemu_raw_bytes(Src(img), tmp_path, "-l", "snapshot.name=" + name)


@pytest.mark.parametrize("opts,compressed", [
    (["cluster_size=65536"], True),
    # Not compressed: a host cluster shared by a hundred compressed
    # clusters has a refcount per reference, and QEMU's own `snapshot -c`
    # fails (-EINVAL, leaving leaks and OFLAG_COPIED errors) when that
    # overflows 4 bits.
    (["cluster_size=4096", "refcount_bits=4"], False),
    (["cluster_size=512", "compat=0.10"], False),
    (["extended_l2=on", "cluster_size=32768"], True)],
    ids=["64k", "4k-rb4", "512-v2", "extl2"])
def test_snapshots(tmp_path, opts, compressed):
    """Clusters shared with internal snapshots are copied on write (their
    refcounts > 1 clear COPIED); the snapshots keep their content byte for
    byte; deleting a snapshot afterwards with QEMU leaves a clean image
    that we can write in place again."""
    size = 16 * M
    img = make_image(tmp_path / "a.qcow2", size, *opts, compressed=compressed)
    qemu_img("snapshot", "-c", "s1", img)
    write(img, "write -P 0x41 0 5M", "write -z 7M 1M")
    if compressed:
        write(img, "write -c -P 0x42 13M 512k")
    qemu_img("snapshot", "-c", "s2", img)
    write(img, "write -P 0x43 3M 3M")
    snaps = {s: snapshot_raw(img, tmp_path, s) for s in ("s1", "s2")}
    out = assert_check_clean(Src(img))

    drive_and_finish(img, tmp_path, 61, 300)
    for s, data in snaps.items():
        assert_same(snapshot_raw(img, tmp_path, s), data, "snapshot " + s)

    # QEMU drops s1: refcounts fall, COPIED comes back where exclusive.
    qemu_img("snapshot", "-d", "s1", img)
    assert_check_clean(Src(img))
    drive_and_finish(img, tmp_path, 62, 150)
    assert_same(snapshot_raw(img, tmp_path, "s2"), snaps["s2"], "snapshot s2")


COMPRESSED = [("64k", ["cluster_size=65536"]),
              ("4k", ["cluster_size=4096"]),
              ("512", ["cluster_size=512"]),
              ("extl2-64k", ["cluster_size=65536", "extended_l2=on"]),
              ("rb2-4k", ["cluster_size=4096", "refcount_bits=2"])]


@pytest.mark.parametrize("name,opts", COMPRESSED, ids=[c[0] for c in COMPRESSED])
def test_compressed_image(tmp_path, name, opts):
    size = 8 * M
    raw = raw_from_layout(tmp_path / "src.raw", size,
                          [(0, 3 * M, "text"), (3 * M + 5, 1 * M, 0x61),
                           (5 * M, 2 * M, "text"), (7 * M + 1, 512 * K, "random")])
    img = convert(raw, tmp_path / "a.qcow2", *opts, compress=True)
    assert len(compressed_clusters(img)) > 0
    drive_and_finish(img, tmp_path, 71, 250)


def test_overwrite_compressed(tmp_path):
    """Writing over a compressed cluster, partly or wholly, makes it a
    normal cluster; what the write did not cover keeps the decompressed
    bytes; check stays clean (the shared compressed host clusters' refcounts
    drop exactly)."""
    size = 4 * M
    cs = 64 * K
    raw = raw_from_layout(tmp_path / "src.raw", size, [(0, size, "text")])
    img = convert(raw, tmp_path / "a.qcow2", compress=True)
    comp = {g for g, _, _ in compressed_clusters(img)}
    assert len(comp) == size // cs
    mirror = bytearray(open(raw, "rb").read())
    with rw_serve(img) as srv:
        h = srv.connect()
        writes = [(0, cs),                # whole cluster
                  (cs + 100, 1),          # one byte
                  (3 * cs - 10, 20),      # straddling two
                  (5 * cs, 3 * cs),       # three whole
                  (10 * cs + 7, cs)]      # unaligned, one cluster's worth
        for i, (off, ln) in enumerate(writes):
            data = bytes([0x80 + i]) * ln
            h.pwrite(data, off)
            mirror[off:off + ln] = data
        # A zero without trim and a trim over compressed clusters too.
        h.zero(2 * cs, 20 * cs, nbd.CMD_FLAG_NO_HOLE)
        mirror[20 * cs:22 * cs] = bytes(2 * cs)
        h.trim(cs, 30 * cs)
        got = h.pread(cs, 30 * cs)
        assert zero_or_prev(got, bytes(mirror[30 * cs:31 * cs])) is None
        mirror[30 * cs:31 * cs] = got
        h.shutdown()
    touched = {0, cs, 2 * cs, 3 * cs, 5 * cs, 6 * cs, 7 * cs, 10 * cs,
               11 * cs}
    now = {g for g, _, _ in compressed_clusters(img)}
    assert not (touched & now), "still compressed: %s" % sorted(touched & now)
    assert now == comp - touched - {20 * cs, 21 * cs, 30 * cs}
    qmap = json.loads(qemu_img("map", "--output=json", img).stdout)
    for e in qmap:
        for g in touched:
            if e["start"] <= g < e["start"] + e["length"]:
                # QEMU reports no host offset for compressed data.
                assert e["data"] and "offset" in e, e
    out = finish(img, tmp_path, mirror)
    assert "0.00% compressed" not in out


# --------------------------------------------------------------------------
# Encryption, external data files, bitmaps

def test_luks(tmp_path):
    img = luks_create(tmp_path / "a.qcow2", 8 * M, PASS, "cluster_size=4096")
    src = Src(img, PASS)
    run("qemu-io", "--object", "secret,id=s0,data=%s" % PASS, "--image-opts",
        src.args()[-1], "-c", "write -P 0x51 100k 300k",
        "-c", "write -z 1M 64k", "-c", "write -P 0x52 8380000 8608")
    drive_and_finish(img, tmp_path, 81, 200, src=src)


def test_legacy_aes(tmp_path):
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "--object",
             "secret,id=s0,data=%s" % PASS, "-o",
             "encrypt.format=aes,encrypt.key-secret=s0,cluster_size=4096",
             img, "8M")
    src = Src(img, PASS)
    run("qemu-io", "--object", "secret,id=s0,data=%s" % PASS, "--image-opts",
        src.args()[-1], "-c", "write -P 0x53 10000 200000")
    drive_and_finish(img, tmp_path, 82, 200, src=src)


@pytest.mark.parametrize("raw_data", [False, True], ids=["data-file",
                                                         "data-file-raw"])
def test_external_data_file(tmp_path, raw_data):
    opts = ["data_file=%s" % (tmp_path / "d.raw"), "cluster_size=4096"]
    if raw_data:
        opts.append("data_file_raw=on")
    img = make_image(tmp_path / "a.qcow2", 8 * M, *opts, compressed=False)
    mirror, _ = drive(img, tmp_path, 83 + raw_data, 250)
    finish(img, tmp_path, mirror)
    if raw_data:
        # The data file is itself the disk, byte for byte.
        with open(tmp_path / "d.raw", "rb") as f:
            data = f.read()
        data += bytes(len(mirror) - len(data))
        assert_same(data, bytes(mirror), "raw data file vs mirror")


def test_persistent_bitmaps(tmp_path):
    """Persistent bitmaps (with data clusters: QEMU wrote dirty bits into
    them) are kept up to date through a long random workload, leaving a
    clean image and consistent bitmaps (test_bitmaps.py checks their
    contents)."""
    img = create(tmp_path / "a.qcow2", 16 * M, "cluster_size=4096")
    qemu_img("bitmap", "--add", img, "b0")
    qemu_img("bitmap", "--add", "--granularity", "512", img, "b1")
    write(img, *prefill_cmds(16 * M, 4096, compressed=True))
    info = json.loads(qemu_img("info", "--output=json", img).stdout)
    assert len(info["format-specific"]["data"]["bitmaps"]) == 2
    assert_check_clean(Src(img))
    drive_and_finish(img, tmp_path, 85, 250)
    p = qemu_img("check", img, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    info = json.loads(qemu_img("info", "--output=json", img).stdout)
    bitmaps = info["format-specific"]["data"]["bitmaps"]
    assert [(b["name"], b["flags"]) for b in bitmaps] == \
        [("b0", ["auto"]), ("b1", ["auto"])], bitmaps


# --------------------------------------------------------------------------
# Targeted semantics

def test_copied_flags(tmp_path):
    """COPIED exactly where the refcount is 1: after a snapshot every
    cluster is shared; writes copy them (setting COPIED on the copies and
    on the new L2 tables), and qemu-img check, which verifies COPIED
    against refcounts, finds nothing."""
    img = create(tmp_path / "a.qcow2", 4 * M, "cluster_size=4096")
    write(img, "write -P 0x61 0 4M")
    qemu_img("snapshot", "-c", "s1", img)

    def l2_copied():
        out = {}
        from images import l2_entries
        for g, e, _ in l2_entries(img):
            out[g] = bool(e >> 63)
        return out

    assert not any(l2_copied().values())
    mirror = bytearray(b"\x61" * 4 * M)
    with rw_serve(img) as srv:
        h = srv.connect()
        for off, ln in [(0, 1), (8 * K + 5, 4 * K), (1 * M, 64 * K),
                        (2 * M - 1, 2)]:
            h.pwrite(b"\x62" * ln, off)
            mirror[off:off + ln] = b"\x62" * ln
        h.shutdown()
    copied = l2_copied()
    touched = {0, 8 * K, 12 * K, 2 * M - 4 * K, 2 * M}
    touched |= set(range(1 * M, 1 * M + 64 * K, 4 * K))
    assert {g for g, c in copied.items() if c} == touched
    rc, out = subprocess.getstatusoutput("qemu-img check %s" % img)
    assert rc == 0 and "OFLAG_COPIED" not in out, out
    finish(img, tmp_path, mirror)


def du_bytes(path):
    return os.stat(path).st_blocks * 512


def test_trim_releases_space(tmp_path):
    """Trim of whole clusters gives the space back (hole punched once the
    metadata is synced), and reads zeros."""
    import random
    img = create(tmp_path / "a.qcow2", 32 * M)
    data = random.Random(91).randbytes(16 * M)
    with rw_serve(img) as srv:
        h = srv.connect()
        h.pwrite(data, 4 * M)
        h.flush()
        full = du_bytes(img)
        assert full >= 16 * M
        h.trim(16 * M, 4 * M)
        h.flush()
        # The decrements of the freed clusters reach the disk at the next
        # sync: one more flush.
        h.flush()
        after = du_bytes(img)
        assert after < full - 12 * M, (full, after)
        got = h.pread(16 * M, 4 * M)
        assert zero_or_prev(got, data) is None
        h.shutdown()
    mirror = bytearray(32 * M)
    mirror[4 * M:20 * M] = got
    finish(img, tmp_path, mirror)


@pytest.mark.parametrize("opts", [[], ["compat=0.10"],
                                  ["extended_l2=on", "cluster_size=32768"]],
                         ids=["v3", "v2", "extl2"])
def test_trim_over_backing(tmp_path, opts):
    """Trimmed clusters over a backing file read zeros or what the client
    wrote, never the backing file's data."""
    import random
    size = 8 * M
    base = random_raw(tmp_path / "base.raw", size, 9)
    top = create(tmp_path / "top.qcow2", None, *opts, backing="base.raw",
                 backing_fmt="raw")
    h0 = sha256_file(base)
    mirror = bytearray(open(base, "rb").read())
    rnd = random.Random(92)
    with rw_serve(top) as srv:
        h = srv.connect()
        data = rnd.randbytes(4 * M)
        h.pwrite(data, 2 * M + 5)
        mirror[2 * M + 5:6 * M + 5] = data
        for off, ln in [(0, size), (2 * M, 1 * M), (100, 3 * M), (3 * M, 64 * K)]:
            h.trim(ln, off)
            got = h.pread(ln, off)
            bad = zero_or_prev(got, bytes(mirror[off:off + ln]))
            assert bad is None, "trim exposed %02x at %d (was %02x, base %02x)" % (
                got[bad], off + bad, mirror[off + bad],
                open(base, "rb").read()[off + bad])
            mirror[off:off + ln] = got
        h.shutdown()
    assert sha256_file(base) == h0
    finish(top, tmp_path, mirror)


@pytest.mark.parametrize("opts", [[], ["compat=0.10"],
                                  ["cluster_size=512"]],
                         ids=["v3", "v2", "512"])
def test_zero_over_64M(tmp_path, opts):
    """One zero request of 128 MiB (nbdkit 1.32.5's fallback breaks above
    64 MiB; ours is native) reads back zeros, with and without trim."""
    size = 144 * M
    img = create(tmp_path / "a.qcow2", size, *opts)
    spots = [0, 5 * M + 3, 63 * M, 64 * M - 1, 100 * M, 127 * M + 999,
             128 * M - 10, 128 * M, 140 * M]
    with rw_serve(img) as srv:
        h = srv.connect()
        for i, off in enumerate(spots):
            h.pwrite(bytes([0x90 + i]) * 70000, off)
        h.zero(128 * M, 0)
        h.zero(64 * M + 512, 70 * M - 256,
               nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
        mirror = bytearray(size)
        for i, off in enumerate(spots):
            mirror[off:off + 70000] = bytes([0x90 + i]) * 70000
        mirror[0:128 * M] = bytes(128 * M)
        mirror[70 * M - 256:134 * M + 256] = bytes(64 * M + 512)
        for off in range(0, size, 16 * M):
            assert_same(h.pread(16 * M, off), bytes(mirror[off:off + 16 * M]),
                        "after the big zeroes", off)
        h.shutdown()
    finish(img, tmp_path, mirror)


def test_fast_zero(tmp_path):
    """FAST_ZERO succeeds on whole clusters (v3: only L2 entries change)
    and fails with ENOTSUP, changing nothing, where data would have to be
    written: partial clusters, v2 over a backing file."""
    cs = 64 * K
    img = create(tmp_path / "a.qcow2", 4 * M)
    write(img, "write -P 0x71 0 4M")
    F = nbd.CMD_FLAG_FAST_ZERO
    mirror = bytearray(b"\x71" * 4 * M)
    with rw_serve(img) as srv:
        h = srv.connect()
        assert h.can_fast_zero()
        h.zero(2 * cs, cs, F)
        mirror[cs:3 * cs] = bytes(2 * cs)
        h.zero(cs, 10 * cs, F | nbd.CMD_FLAG_NO_HOLE)
        mirror[10 * cs:11 * cs] = bytes(cs)
        for off, ln in [(20 * cs + 1, cs), (30 * cs, 100), (40 * cs, cs + 512),
                        (50 * cs - 1, 2)]:
            with pytest.raises(nbd.Error) as e:
                h.zero(ln, off, F)
            assert e.value.errno == "ENOTSUP", e.value
            # Refused before changing anything.
            assert h.pread(ln, off) == bytes(mirror[off:off + ln])
        # The same without FAST_ZERO succeed.
        h.zero(cs, 20 * cs + 1)
        mirror[20 * cs + 1:21 * cs + 1] = bytes(cs)
        assert_same(h.pread(4 * M, 0), bytes(mirror), "after fast zeroes")
        h.shutdown()
    finish(img, tmp_path, mirror)

    # Extended L2: whole subclusters are fast.
    img2 = create(tmp_path / "b.qcow2", 4 * M, "extended_l2=on")
    write(img2, "write -P 0x72 0 4M")
    sub = cs // 32
    with rw_serve(img2) as srv:
        h = srv.connect()
        h.zero(3 * sub, cs + sub, F)
        with pytest.raises(nbd.Error) as e:
            h.zero(sub, 5 * cs + 1, F)
        assert e.value.errno == "ENOTSUP"
        h.shutdown()
    m2 = bytearray(b"\x72" * 4 * M)
    m2[cs + sub:cs + 4 * sub] = bytes(3 * sub)
    finish(img2, tmp_path, m2)

    # v2 over a backing file has no zero flag: zeroes are data writes.
    base = random_raw(tmp_path / "base.raw", 4 * M, 3)
    img3 = create(tmp_path / "c.qcow2", None, "compat=0.10",
                  backing="base.raw", backing_fmt="raw")
    with rw_serve(img3) as srv:
        h = srv.connect()
        with pytest.raises(nbd.Error) as e:
            h.zero(cs, 0, F)
        assert e.value.errno == "ENOTSUP"
        h.zero(cs, 0)
        assert h.pread(cs, 0) == bytes(cs)
        h.shutdown()
    m3 = bytearray(open(base, "rb").read())
    m3[0:cs] = bytes(cs)
    finish(img3, tmp_path, m3)


def nbdkit_ro(img, run_cmd, *params):
    return subprocess.run(["nbdkit", "-r", "-U", "-",
                           *engine_args(img, params, True), "--run", run_cmd],
                          text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=nbdkit_env(), timeout=60)


def test_readonly_serve(tmp_path):
    """nbdkit -r: the export is read-only, writes fail, the file stays
    byte-identical, and QEMU readers without -U coexist with it (shared
    read locks) while QEMU writers are kept out."""
    only_plugin("QEMU's image locks")
    img = make_image(tmp_path / "a.qcow2", 8 * M, "cluster_size=4096")
    h0 = sha256_file(img)
    mirror = qemu_raw_bytes(Src(img), tmp_path)
    with ro_serve(img) as srv:
        h = connect_meta(srv.uri)
        assert h.is_read_only()
        h.set_strict_mode(0)    # send the writes anyway
        for call in (lambda: h.pwrite(b"x" * 512, 0),
                     lambda: h.zero(4096, 0),
                     lambda: h.trim(4096, 0)):
            with pytest.raises(nbd.Error):
                call()
        h.flush()
        assert h.pread(len(mirror), 0) == mirror
        extents_sane(h, bytearray(mirror))
        p = qemu_img("info", img, check=False)
        assert p.returncode == 0, p.stderr
        p = qemu_io(img, "read -P 0x11 0 512", extra=["-r"])
        assert "read 512/512" in p.stdout, p.stdout + p.stderr
        p = run("qemu-io", "-f", "qcow2", "-c", "write 0 512", img, check=False)
        assert 'Failed to get "write" lock' in p.stdout + p.stderr
        h.shutdown()
    assert sha256_file(img) == h0


def test_rw_lock(tmp_path):
    """Once the plugin writes, QEMU cannot open the image (not even to
    read, as QEMU itself behaves); with locking=false it can."""
    only_plugin("QEMU's image locks")
    img = make_image(tmp_path / "a.qcow2", 8 * M, "cluster_size=4096")
    for locking in (True, False):
        params = [] if locking else ["locking=false"]
        with rw_serve(img, *params) as srv:
            h = srv.connect()
            h.pwrite(b"\x99" * 512, 4096)
            h.flush()
            p = run("qemu-io", "-f", "qcow2", "-c", "read 0 512", img,
                    check=False)
            out = p.stdout + p.stderr
            i = run("qemu-img", "info", img, check=False)
            if locking:
                assert "lock" in out and "read 512/512" not in out, out
                assert i.returncode != 0 and \
                    'Failed to get shared "write" lock' in i.stderr, i.stderr
            else:
                assert "read 512/512" in out, out
                assert i.returncode == 0, i.stderr
            h.shutdown()
    assert_check_clean(Src(img))
