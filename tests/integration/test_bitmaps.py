"""Persistent dirty bitmaps kept up to date, with QEMU as the oracle.

Images and bitmaps are made with qemu-img; the plugin writes, zeroes and
trims from several connections; after it stops, QEMU must see every
bitmap consistent (no in-use flag), and the dirty set QEMU reports
(qemu-nbd -B NAME, metadata context qemu:dirty-bitmap:NAME) must be
exactly the granules QEMU had marked before plus those our requests
touched.  QEMU keeps counting on top of ours and we on top of QEMU's;
qemu-img check stays clean.  A SIGKILL leaves the bitmaps in use, which
QEMU refuses to trust, and nothing else damaged.  The bitmap:NAME export
gives the same map to any NBD client, and an incremental backup made
from it reproduces the disk.
"""
import json
import os
import random
import signal
import struct
import subprocess
import tempfile
import threading
import time
import urllib.parse

import nbd
import pytest

from conftest import PLUGIN, nbdkit_env, qemu_img, run, serve
from images import create, header_extensions, luks_create
from mirror import Src

K = 1024
M = 1024 * K
PASS = "bitmap-secret"
EXT_BITMAPS = 0x23852875


# --------------------------------------------------------------------------
# QEMU's view

def info(src):
    return json.loads(qemu_img("info", "--output=json", *src.args()).stdout)


def bitmaps_info(src):
    """{name: (granularity, flags)} as qemu-img info reports them."""
    data = info(src)["format-specific"]["data"]
    return {b["name"]: (b["granularity"], sorted(b["flags"]))
            for b in data.get("bitmaps", [])}


def check_clean(src):
    p = qemu_img("check", *src.args(), check=False)
    assert p.returncode == 0, "qemu-img check exit %d:\n%s%s" % (
        p.returncode, p.stdout, p.stderr)
    assert "leaked" not in p.stdout, p.stdout


def qemu_dirty(src, name):
    """(granule indices QEMU reports dirty in bitmap name, None), or
    (None, qemu-nbd's message) if it refuses to serve the bitmap."""
    d = tempfile.mkdtemp(prefix="qemu-nbd-")
    sock = os.path.join(d, "sock")
    p = subprocess.Popen(["qemu-nbd", "-r", "-t", "-k", sock, "-B", name,
                          *src.args()], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if p.poll() is not None:
                return None, p.stderr.read()
            assert time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.02)
        h = nbd.NBD()
        h.add_meta_context("qemu:dirty-bitmap:" + name)
        while True:
            try:
                h.connect_uri("nbd+unix:///?socket=" + sock)
                break
            except nbd.Error:
                # Bound but not listening yet, or it refused the bitmap
                # after binding.
                if p.poll() is not None:
                    return None, p.stderr.read()
                assert time.monotonic() < deadline, "qemu-nbd refuses"
                time.sleep(0.05)
                h = nbd.NBD()
                h.add_meta_context("qemu:dirty-bitmap:" + name)
        granularity = bitmaps_info(src)[name][0]
        dirty = set()
        size, off = h.get_size(), 0

        def cb(meta, start, entries, err):
            nonlocal off
            if meta != "qemu:dirty-bitmap:" + name:
                return 0
            pos = start
            for i in range(0, len(entries), 2):
                if entries[i + 1] & 1:
                    dirty.update(range(pos // granularity,
                                       (pos + entries[i] - 1) // granularity
                                       + 1))
                pos += entries[i]
            off = pos
            return 0

        while off < size:
            h.block_status(min(size - off, 1 << 30), off, cb)
        h.shutdown()
        return dirty, None
    finally:
        p.terminate()
        p.wait(10)
        os.unlink(sock) if os.path.exists(sock) else None
        os.rmdir(d)


def qemu_io_src(src, *cmds):
    args = ["qemu-io"]
    a = src.args()
    if a[0] == "-f":
        args += ["-f", "qcow2"]
    else:
        args += a[:-1]
    for c in cmds:
        args += ["-c", c]
    args.append(a[-1])
    p = run(*args)
    assert "failed" not in p.stdout + p.stderr, p.stdout + p.stderr


def granules(ops, granularity):
    """Granules touched by requests [(offset, length)]."""
    out = set()
    for off, n in ops:
        out.update(range(off // granularity, (off + n - 1) // granularity + 1))
    return out


# --------------------------------------------------------------------------
# Driving the plugin

def random_ops(rnd, size, count, max_len=256 * K):
    """Random (kind, offset, length) requests inside the disk."""
    ops = []
    for _ in range(count):
        n = rnd.choice([1, 512, 4 * K, 64 * K, rnd.randrange(1, max_len)])
        off = rnd.randrange(0, size - n)
        ops.append((rnd.choice(["write", "write", "zero", "trim"]), off, n))
    return ops


def drive(srv, ops, nconn=4):
    """Run ops split across nconn connections at once."""
    errors = []

    def worker(part):
        try:
            h = srv.connect()
            for kind, off, n in part:
                if kind == "write":
                    h.pwrite(os.urandom(n), off)
                elif kind == "zero":
                    h.zero(n, off)
                else:
                    h.trim(n, off)
            h.flush()
            h.shutdown()
        except Exception as e:   # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(ops[i::nconn],))
               for i in range(nconn)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def write_through_plugin(src, ops, *params):
    with serve(src.path, *src.serve_params(), *params) as srv:
        drive(srv, ops)
    return [(off, n) for _, off, n in ops]


def assert_maps(src, expect):
    """Every bitmap consistent; QEMU's dirty sets equal expect[name]."""
    bms = bitmaps_info(src)
    for name, want in expect.items():
        assert "in-use" not in bms[name][1], bms
        got, err = qemu_dirty(src, name)
        assert err is None, err
        assert got == want, "bitmap %s: QEMU says %d granules dirty, " \
            "expected %d; missing %s, extra %s" % (
                name, len(got), len(want), sorted(want - got)[:10],
                sorted(got - want)[:10])
    check_clean(src)


def plain(tmp_path, size, *opts):
    return Src(create(tmp_path / "a.qcow2", size, *opts))


# --------------------------------------------------------------------------
# Tracking writes exactly

GRANULARITIES = [512, 4 * K, 64 * K, 2 * M]


@pytest.mark.parametrize("cluster", [4 * K, 64 * K])
def test_writes_marked_exactly(tmp_path, cluster):
    """Four bitmaps (512 B to 2 MiB) at once; QEMU wrote before us and
    writes after us; every count adds up."""
    size = 48 * M
    src = plain(tmp_path, size, "cluster_size=%d" % cluster)
    for g in GRANULARITIES:
        qemu_img("bitmap", "--add", "-g", str(g), src.path, "g%d" % g)
    qemu_io_src(src, "write -P 1 100k 300k", "write -z 20M 1M")
    before = {"g%d" % g: qemu_dirty(src, "g%d" % g)[0] for g in GRANULARITIES}
    assert all(before.values())

    rnd = random.Random(12)
    touched = write_through_plugin(src, random_ops(rnd, size, 120))
    expect = {"g%d" % g: before["g%d" % g] | granules(touched, g)
              for g in GRANULARITIES}
    assert_maps(src, expect)

    # QEMU counts on top of ours.
    qemu_io_src(src, "write -P 2 40M 5000", "discard 30M 2M")
    more = [(40 * M, 5000), (30 * M, 2 * M)]
    expect = {n: s | granules(more, int(n[1:])) for n, s in expect.items()}
    assert_maps(src, expect)

    # And we on top of QEMU's again, across a second open.
    touched = write_through_plugin(src, random_ops(rnd, size, 40))
    expect = {n: s | granules(touched, int(n[1:])) for n, s in expect.items()}
    assert_maps(src, expect)


def test_disabled_and_in_use_bitmaps_unchanged(tmp_path):
    size = 16 * M
    src = plain(tmp_path, size)
    for name in ("on", "off", "stale"):
        qemu_img("bitmap", "--add", src.path, name)
    qemu_io_src(src, "write 0 64k")
    qemu_img("bitmap", "--disable", src.path, "off")
    off_before = qemu_dirty(src, "off")[0]
    # "stale" left in use, as by a writer that died.
    ext = [d for m, d in header_extensions(src.path) if m == EXT_BITMAPS][0]
    dir_off, pos = struct.unpack(">Q", ext[16:24])[0], 0
    with open(src.path, "r+b") as f:
        f.seek(dir_off)
        d = f.read(struct.unpack(">Q", ext[8:16])[0])
        while pos < len(d):
            name_len = struct.unpack(">H", d[pos + 18:pos + 20])[0]
            name = d[pos + 24:pos + 24 + name_len]
            if name == b"stale":
                flags = struct.unpack(">I", d[pos + 12:pos + 16])[0]
                f.seek(dir_off + pos + 12)
                f.write(struct.pack(">I", flags | 1))
                stale_entry = d[pos:pos + 12]
            pos += (24 + name_len + 7) & ~7

    touched = write_through_plugin(src, [("write", 8 * M, 4096),
                                         ("zero", 1 * M, 3 * M)])
    bms = bitmaps_info(src)
    assert bms["off"] == (65536, []), bms
    assert bms["stale"] == (65536, ["auto", "in-use"]), bms
    assert bms["on"] == (65536, ["auto"]), bms
    assert qemu_dirty(src, "off")[0] == off_before
    assert qemu_dirty(src, "on")[0] == {0} | granules(touched, 64 * K)
    got, err = qemu_dirty(src, "stale")
    assert got is None and "inconsistent" in err.lower(), err
    # The in-use bitmap's table is the one it had: untouched.
    ext = [d for m, d in header_extensions(src.path) if m == EXT_BITMAPS][0]
    dir_off = struct.unpack(">Q", ext[16:24])[0]
    with open(src.path, "rb") as f:
        f.seek(dir_off)
        d = f.read(struct.unpack(">Q", ext[8:16])[0])
    assert stale_entry in d
    check_clean(src)


def test_sigkill_leaves_bitmaps_in_use(tmp_path):
    size = 32 * M
    src = plain(tmp_path, size, "cluster_size=4096")
    qemu_img("bitmap", "--add", src.path, "b0")
    qemu_io_src(src, "write -P 3 0 1M")
    stop = threading.Event()
    with serve(src.path) as srv:
        def writer():
            h = srv.connect()
            rnd = random.Random(5)
            try:
                while not stop.is_set():
                    h.pwrite(os.urandom(8192),
                             rnd.randrange(2 * M, size - 8192))
            except nbd.Error:
                pass     # the server died under us

        t = threading.Thread(target=writer)
        t.start()
        time.sleep(1)
        pid = int(open(os.path.join(os.path.dirname(srv.sock),
                                    "pid")).read())
        os.kill(pid, signal.SIGKILL)
        stop.set()
        t.join()
    assert bitmaps_info(src)["b0"][1] == ["auto", "in-use"]
    got, err = qemu_dirty(src, "b0")
    assert got is None and "inconsistent" in err.lower(), err
    p = qemu_img("check", src.path, check=False)
    assert p.returncode in (0, 3), p.stdout + p.stderr   # leaks at worst
    assert "ERROR" not in p.stdout + p.stderr
    # The bytes QEMU wrote before are intact.
    qemu_io_src(src, "read -P 3 0 4k")


@pytest.mark.parametrize("kind", ["extended-l2", "luks", "overlay"])
def test_image_kinds(tmp_path, kind):
    size = 16 * M
    if kind == "extended-l2":
        src = plain(tmp_path, size, "extended_l2=on", "cluster_size=64k")
    elif kind == "luks":
        src = Src(luks_create(tmp_path / "a.qcow2", size, PASS,
                              "cluster_size=4096"), PASS)
    else:
        base = create(tmp_path / "base.qcow2", size)
        qemu_img("bitmap", "--add", str(base), "base-bitmap")
        src = Src(create(tmp_path / "a.qcow2", size, backing=base,
                         backing_fmt="qcow2"))
    qemu_img("bitmap", "--add", "-g", "4096", *src.args(), "b0") \
        if kind != "luks" else \
        qemu_img("bitmap", "--add", "-g", "4096", *src.args()[:-2],
                 "--image-opts", src.args()[-1], "b0")
    rnd = random.Random(7)
    touched = write_through_plugin(src, random_ops(rnd, size, 60))
    assert_maps(src, {"b0": granules(touched, 4096)})
    if kind == "overlay":
        # Only the image written keeps bitmaps; the backing file's is
        # untouched and consistent.
        base_src = Src(tmp_path / "base.qcow2")
        assert bitmaps_info(base_src)["base-bitmap"][1] == ["auto"]
        assert qemu_dirty(base_src, "base-bitmap")[0] == set()


def test_compressed_writes_and_snapshot_apply(tmp_path):
    """Compressed writes count; reverting to a snapshot dirties the whole
    disk, as QEMU counts it."""
    size = 8 * M
    src = plain(tmp_path, size)
    qemu_img("bitmap", "--add", src.path, "b0")
    with serve(src.path) as srv:
        h = srv.connect("qcow2:compressed")
        h.pwrite(b"c" * 64 * K, 2 * M)
        h.shutdown()
    assert_maps(src, {"b0": {32}})
    qemu_img("snapshot", "-c", "s1", src.path)
    with serve(src.path, "snapshot-apply=s1"):
        pass
    assert_maps(src, {"b0": set(range(size // (64 * K)))})


def test_resize_grows_bitmaps(tmp_path):
    """QEMU 7.2 resizes images with bitmaps and grows the bitmaps, the new
    part clean: so do we."""
    src = plain(tmp_path, 4 * M)
    qemu_img("bitmap", "--add", src.path, "b0")
    with serve(src.path, "size=12M", "resize=true") as srv:
        h = srv.connect()
        assert h.get_size() == 12 * M
        h.pwrite(b"r" * 512, 10 * M)
        h.shutdown()
    assert info(src)["virtual-size"] == 12 * M
    assert_maps(src, {"b0": {160}})


# --------------------------------------------------------------------------
# The bitmap export and an incremental backup

def export_map(srv, name):
    """nbdinfo --map --json of bitmap:NAME -> dirty [(offset, length)]."""
    uri = "nbd+unix:///%s?socket=%s" % (urllib.parse.quote("bitmap:" + name),
                                        srv.sock)
    out = run("nbdinfo", "--map", "--json", uri).stdout
    return [(e["offset"], e["length"]) for e in json.loads(out)
            if e["type"] == 0]


def test_bitmap_export_incremental_backup(tmp_path):
    size = 32 * M
    src = plain(tmp_path, size, "cluster_size=4096")
    qemu_io_src(src, "write -P 5 0 10M")
    full = tmp_path / "full.raw"
    qemu_img("convert", "-O", "raw", src.path, str(full))
    qemu_img("bitmap", "--add", "-g", "4096", src.path, "since-full")
    rnd = random.Random(9)
    ops = random_ops(rnd, size, 80)
    write_through_plugin(src, ops)

    with serve(src.path, readonly=True) as srv:
        listed = run("nbdinfo", "--list", "--json",
                     "nbd+unix:///?socket=" + srv.sock).stdout
        names = [e["export-name"] for e in json.loads(listed)["exports"]]
        assert "bitmap:since-full" in names
        dirty = export_map(srv, "since-full")
        # The export's map is QEMU's dirty map.
        assert granules(dirty, 4096) == qemu_dirty(src, "since-full")[0]
        h = srv.connect("bitmap:since-full")
        assert h.is_read_only()
        backup = bytearray(open(full, "rb").read())
        for off, n in dirty:
            backup[off:off + n] = h.pread(n, off)
        h.shutdown()
    now = tmp_path / "now.raw"
    qemu_img("convert", "-O", "raw", src.path, str(now))
    assert bytes(backup) == open(now, "rb").read()


def test_inconsistent_bitmap_export_refused(tmp_path):
    src = plain(tmp_path, 4 * M)
    qemu_img("bitmap", "--add", src.path, "b0")
    stop_hard = subprocess.Popen(
        ["nbdkit", "-f", "-U", str(tmp_path / "s"), PLUGIN,
         "file=" + src.path], env=nbdkit_env())
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(tmp_path / "s"):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        h = nbd.NBD()
        h.connect_uri("nbd+unix:///?socket=%s" % (tmp_path / "s"))
        h.pwrite(b"x", 0)
        h.shutdown()
    finally:
        stop_hard.kill()
        stop_hard.wait()
    os.unlink(tmp_path / "s")
    with serve(src.path, readonly=True) as srv:
        with pytest.raises(nbd.Error):
            srv.connect("bitmap:b0")
        assert "inconsistent" in srv.stderr


# --------------------------------------------------------------------------
# Management keys

def test_management_keys(tmp_path):
    src = plain(tmp_path, 16 * M)
    qemu_img("bitmap", "--add", src.path, "old")
    qemu_img("bitmap", "--add", src.path, "gone")
    qemu_io_src(src, "write 0 1M")
    with serve(src.path, "bitmap-granularity=1M", "bitmap-add=new",
               "bitmap-add=new2", "bitmap-granularity=512",
               "bitmap-add=fine", "bitmap-remove=gone",
               "bitmap-disable=old", "bitmap-disable=new2",
               "bitmap-enable=new2") as srv:
        h = srv.connect()
        h.pwrite(b"n" * 4096, 5 * M)
        h.shutdown()
    assert bitmaps_info(src) == {
        "old": (64 * K, []), "new": (M, ["auto"]), "new2": (M, ["auto"]),
        "fine": (512, ["auto"])}
    assert_maps(src, {"old": set(range(16)), "new": {5},
                      "fine": set(range(10240, 10248))})
    with serve(src.path, "bitmap-clear=old", "bitmap-remove=new2"):
        pass
    assert set(bitmaps_info(src)) == {"old", "new", "fine"}
    assert_maps(src, {"old": set(), "new": {5}})
    # Removing every bitmap drops the extension.
    with serve(src.path, "bitmap-remove=old", "bitmap-remove=new",
               "bitmap-remove=fine"):
        pass
    assert bitmaps_info(src) == {}
    assert EXT_BITMAPS not in [m for m, _ in header_extensions(src.path)]
    assert not info(src)["format-specific"]["data"].get("bitmaps")
    check_clean(src)


@pytest.mark.parametrize("params,message", [
    (["bitmap-add=b0"], "Bitmap already exists"),
    (["bitmap-remove=nope"], "no bitmap named 'nope'"),
    (["bitmap-clear=nope"], "no bitmap named 'nope'"),
    (["bitmap-granularity=1000", "bitmap-add=x"], "power of 2"),
    (["bitmap-granularity=256", "bitmap-add=x"], "power of 2"),
    (["bitmap-add=" + "n" * 1024], "1 to 1023 bytes"),
])
def test_management_errors(tmp_path, params, message):
    from conftest import start_fails
    src = plain(tmp_path, 4 * M)
    qemu_img("bitmap", "--add", src.path, "b0")
    rc, err = start_fails(src.path, *params)
    assert rc == 1 and message in err, err
    assert set(bitmaps_info(src)) == {"b0"}
    check_clean(src)


def test_v2_image_refuses_bitmaps(tmp_path):
    from conftest import start_fails
    src = plain(tmp_path, 4 * M, "compat=0.10")
    rc, err = start_fails(src.path, "bitmap-add=b0")
    assert rc == 1 and "v2" in err, err


def test_add_moves_backing_name(tmp_path):
    """512-byte clusters: the new bitmaps extension needs the bytes where
    QEMU put the backing file name, which moves after it, as QEMU lays
    the header out."""
    base = create(tmp_path / ("base-with-a-long-name-" + "x" * 60 +
                              ".qcow2"), 4 * M)
    src = Src(create(tmp_path / "a.qcow2", 4 * M, "cluster_size=512",
                     backing=base, backing_fmt="qcow2"))
    with serve(src.path, "bitmap-add=b0") as srv:
        h = srv.connect()
        h.pwrite(b"m" * 512, 3 * M)
        h.shutdown()
    i = info(src)
    assert i["backing-filename"] == str(base)
    assert i["backing-filename-format"] == "qcow2"
    assert_maps(src, {"b0": {(3 * M) // (4 * K)}})
    qemu_img("bitmap", "--add", src.path, "b1")    # QEMU can go on
    assert set(bitmaps_info(src)) == {"b0", "b1"}
    check_clean(src)
