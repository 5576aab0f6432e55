"""nbdkit-qcow2-filter over other nbdkit layers: the nbd transport (to
nbdkit and to qemu-nbd), a failing, a slow and a vanishing layer below, a
full container, creating an image in a container, and what the filter
refuses.  QEMU is the oracle: qemu-img check and qemu-img convert of the
file holding the image.

The read matrix and the write mirror tests also run through the filter
(conftest.py's layers); transports with servers of their own (ssh, HTTP,
S3) are in test_filter_transports.py, filters stacked above this one in
test_filter_stacks.py.
"""

import os
import random
import signal
import subprocess
import threading

import nbd
import pytest

from conftest import (FILTER, engine_args, lower_server,
                      nbdkit_env, nbdkit_server, qemu_img, qemu_raw, run,
                      serve)
from images import create, write
from mirror import (Driver, Geometry, Src, assert_same, connect_meta, drive,
                    drive_and_finish, finish, initial_mirror, make_image,
                    qemu_check, qemu_raw_bytes)

K = 1024
M = 1024 * K


def filter_layer(name):
    """Run a test in one layer (conftest.py's `layer` fixture)."""
    return pytest.mark.parametrize("layer", [name], indirect=True, ids=[name])


def assert_no_corruption(img):
    """qemu-img check: no corruption and no unreadable table; leaked
    clusters are allowed (a failure between allocation and use)."""
    rc, out = qemu_check(Src(img))
    assert rc in (0, 3), "qemu-img check exit %d:\n%s" % (rc, out)
    return out


# --------------------------------------------------------------------------
# The nbd transport: the write mirror over nbdkit and over qemu-nbd

@pytest.mark.usefixtures("nbd_layer")
@pytest.mark.parametrize("name,size,opts,seed", [
    ("4k", 16 * M, ["cluster_size=4096"], 101),
    ("extl2-64k", 32 * M, ["extended_l2=on"], 102),
], ids=["4k", "extl2-64k"])
def test_random_ops_over_nbd(tmp_path, name, size, opts, seed):
    img = make_image(tmp_path / "a.qcow2", size, *opts)
    drive_and_finish(img, tmp_path, seed, 250)


@filter_layer("filter-memory")
def test_random_ops_in_memory(tmp_path, layer):
    """The write mirror through the filter over nbdkit's data plugin (the
    image copied into memory, a sparse array as the memory plugin's): the
    reads during the run and a whole read at its end follow the mirror.
    QEMU cannot look into that memory afterwards: its check of the same
    runs is the file and nbd layers' part."""
    img = make_image(tmp_path / "a.qcow2", 16 * M, "cluster_size=4096")
    mirror = initial_mirror(Src(img), tmp_path)
    with serve(img) as srv:
        hs = [connect_meta(srv.uri) for _ in range(2)]
        d = Driver(hs, Geometry(img), mirror, 231)
        d.run(300)
        assert_same(hs[0].pread(len(mirror), 0), bytes(mirror),
                    "whole read")
        for h in hs:
            h.shutdown()


# --------------------------------------------------------------------------
# A layer below that fails, and one that is slow

class FaultyRun:
    """Random writes, zeroes, trims, flushes and reads on one connection
    whose requests may fail.  A failed request must fail with `allowed`
    errnos only; its range is then unknown.  At every successful flush
    the known state is recorded as durable: after a restart, every byte
    known at the last successful flush and not touched since must read
    back."""

    def __init__(self, size, seed, initial):
        self.size = size
        self.rng = random.Random(seed)
        self.mirror = bytearray(initial)
        self.known = bytearray(b"\1") * size
        self.durable = (bytes(self.mirror), bytes(self.known))
        self.touched = bytearray(size)     # since the last good flush
        self.failures = 0

    def forget(self, off, ln):
        self.known[off:off + ln] = bytes(ln)

    def run(self, h, nops, allowed=("EIO",)):
        rng = self.rng
        for _ in range(nops):
            op = rng.choices(["write", "zero", "trim", "flush", "read"],
                             [50, 10, 8, 12, 20])[0]
            off = rng.randrange(self.size)
            ln = min(self.size - off,
                     rng.choice([1, 512, 4096, 65536, 300000, M]))
            try:
                if op == "write":
                    self.touched[off:off + ln] = b"\1" * ln
                    data = rng.randbytes(ln)
                    self.forget(off, ln)
                    h.pwrite(data, off)
                    self.mirror[off:off + ln] = data
                    self.known[off:off + ln] = b"\1" * ln
                elif op == "zero":
                    self.touched[off:off + ln] = b"\1" * ln
                    self.forget(off, ln)
                    h.zero(ln, off)
                    self.mirror[off:off + ln] = bytes(ln)
                    self.known[off:off + ln] = b"\1" * ln
                elif op == "trim":
                    # Unspecified afterwards (NBD): never checked again
                    # until rewritten.
                    self.touched[off:off + ln] = b"\1" * ln
                    self.forget(off, ln)
                    h.trim(ln, off)
                elif op == "flush":
                    h.flush()
                    self.durable = (bytes(self.mirror), bytes(self.known))
                    self.touched = bytearray(self.size)
                else:
                    got = h.pread(ln, off)
                    self.check(got, off)
            except nbd.Error as e:
                assert e.errno in allowed, \
                    "%s at %d+%d failed with %s, not one of %s" % (
                        op, off, ln, e, allowed)
                self.failures += 1

    def check(self, got, off, mirror=None, known=None, what="read"):
        mirror = self.mirror if mirror is None else mirror
        known = self.known if known is None else known
        for i in range(len(got)):
            if known[off + i] and got[i] != mirror[off + i]:
                pytest.fail("%s at %d: %02x, expected %02x"
                            % (what, off + i, got[i], mirror[off + i]))

    def check_durable(self, data):
        """data: the whole disk as read after a restart."""
        mirror, known = self.durable
        n = self.size
        mask = (int.from_bytes(known, "big") &
                ~int.from_bytes(self.touched, "big")).to_bytes(n, "big")
        for off in range(0, n, 64 * K):
            end = min(off + 64 * K, n)
            if data[off:end] != mirror[off:end]:
                self.check(data[off:end], off, mirror, mask, "after restart")


def faulty_image(tmp_path, opts=("cluster_size=4096",)):
    img = make_image(tmp_path / "a.qcow2", 16 * M, *opts)
    return img, qemu_raw_bytes(Src(img), tmp_path)


@filter_layer("filter-file")
@pytest.mark.parametrize("rate,seed,opts", [
    ("2%", 201, ("cluster_size=4096",)),
    ("10%", 202, ("cluster_size=4096",)),
    ("5%", 203, ("cluster_size=512", "refcount_bits=2")),
    ("5%", 204, ("extended_l2=on",)),
], ids=["2%-4k", "10%-4k", "5%-512-rb2", "5%-extl2"])
def test_error_filter_below(tmp_path, layer, rate, seed, opts):
    """nbdkit's error filter under ours fails reads, writes, trims and
    flushes with EIO at random: every request succeeds or fails with
    EIO, the server lives, and after a restart without it the image has
    no corruption and everything flushed reads back."""
    img, initial = faulty_image(tmp_path, opts)
    trigger = tmp_path / "errors-on"
    run_ = FaultyRun(len(initial), seed, initial)
    with serve(img, "error=EIO", "error-rate=" + rate,
               "error-file=%s" % trigger, below=["error"]) as srv:
        h = srv.connect()
        trigger.touch()
        run_.run(h, 400)
        assert srv.process.poll() is None, "the server died"
        h.shutdown()
    assert run_.failures > 0, "the error filter injected nothing"
    trigger.unlink()
    assert_no_corruption(img)
    with serve(img) as srv:
        h = srv.connect()
        run_.check_durable(h.pread(len(initial), 0))
        h.shutdown()
    assert_no_corruption(img)


@filter_layer("filter-file")
def test_delay_filter_below(tmp_path, layer):
    """Slow storage below (nbdkit's delay filter): the write mirror with
    its concurrent batches, then QEMU's check and bytes.  The client
    flushes before it leaves: the delay filter fails every request once
    nbdkit is shutting down (nbdkit_nanosleep aborts), so what the engine
    writes back at close does not arrive, and only flushed data is
    promised."""
    img = make_image(tmp_path / "a.qcow2", 16 * M, "cluster_size=4096")
    mirror, _ = drive(img, tmp_path, 211, 120, below=["delay"],
                      params=["rdelay=2ms", "wdelay=5ms"], timeout=300,
                      final_flush=True)
    finish(img, tmp_path, mirror)


@filter_layer("filter-nbd")
def test_lower_server_killed(tmp_path, layer):
    """The server below vanishes mid-write (SIGKILL of the lower nbdkit):
    requests fail with an errno, ours keeps running and stops cleanly,
    and the file has no corruption and keeps what was flushed."""
    img, initial = faulty_image(tmp_path)
    run_ = FaultyRun(len(initial), 221, initial)
    # What nbdkit's nbd plugin reports once its server is gone (EINVAL:
    # libnbd refuses commands on a dead handle), passed on unchanged.
    allowed = ("EIO", "EINVAL", "ESHUTDOWN", "ENOTCONN", "EPIPE",
               "ECONNRESET")
    with serve(img) as srv:
        h = srv.connect()
        run_.run(h, 150)
        killer = threading.Timer(0.3, srv.lower.send_signal, [signal.SIGKILL])
        killer.start()
        run_.run(h, 300, allowed)
        killer.join()
        assert srv.process.poll() is None, "the server died"
        h.shutdown()
    assert run_.failures > 0
    assert_no_corruption(img)
    with serve(img) as srv:
        h = srv.connect()
        run_.check_durable(h.pread(len(initial), 0))
        h.shutdown()


# --------------------------------------------------------------------------
# A full container

def write_until_full(h, size, seed, total):
    """Random 1 MiB writes, a flush after every 8, until total bytes were
    asked for.  Returns (mirror, known-at-last-flush mask, number of
    ENOSPC failures)."""
    rng = random.Random(seed)
    mirror = bytearray(size)
    known = bytearray(b"\1") * size
    flushed = (bytes(mirror), bytes(known))
    enospc = 0
    for i in range(total // M):
        off = rng.randrange(size // M) * M
        data = rng.randbytes(M)
        known[off:off + M] = bytes(M)
        try:
            h.pwrite(data, off)
            mirror[off:off + M] = data
            known[off:off + M] = b"\1" * M
        except nbd.Error as e:
            assert e.errno == "ENOSPC", e
            enospc += 1
        if i % 8 == 7:
            h.flush()
            flushed = (bytes(mirror), bytes(known))
    h.flush()
    return (bytes(mirror), bytes(known)), flushed, enospc


def assert_known_bytes(data, state):
    mirror, known = state
    for off in range(0, len(data), M):
        got, want = data[off:off + M], mirror[off:off + M]
        if got != want:
            bad = [i for i in range(len(got))
                   if known[off + i] and got[i] != want[i]]
            assert not bad, "byte %d differs" % (off + bad[0])


@filter_layer("filter-file")
def test_container_full(tmp_path, layer):
    """A 64 MiB container, a 256 MiB disk and 256 MiB of random writes:
    ENOSPC, the image stays clean and keeps every acknowledged write,
    and writing resumes once the container is enlarged."""
    img = create(tmp_path / "a.qcow2", 256 * M, "cluster_size=65536")
    os.truncate(img, 64 * M)
    with serve(img, room=False) as srv:
        h = srv.connect()
        last, flushed, enospc = write_until_full(h, 256 * M, 301, 256 * M)
        assert enospc > 0, "the container never filled"
        assert "is full" in srv.stderr
        # Still serving: reads work, and what was written reads back.
        assert_known_bytes(h.pread(32 * M, 0), (last[0][:32 * M], last[1]))
        h.shutdown()
    assert os.path.getsize(img) == 64 * M, "the container grew"
    rc, out = qemu_check(Src(img))
    assert rc == 0, out
    raw = qemu_raw_bytes(Src(img), tmp_path)
    assert_known_bytes(raw, last)

    os.truncate(img, 512 * M)
    with serve(img, room=False) as srv:
        h = srv.connect()
        h.pwrite(b"\x5a" * (64 * M), 128 * M)
        h.flush()
        h.shutdown()
    rc, out = qemu_check(Src(img))
    assert rc == 0, out
    raw = qemu_raw_bytes(Src(img), tmp_path)
    assert raw[128 * M:192 * M] == b"\x5a" * (64 * M)


# --------------------------------------------------------------------------
# Creating an image in a container

def nbdkit_filter_run(args, run_cmd, readonly=False):
    return subprocess.run(
        ["nbdkit", *(["-r"] if readonly else []), "-U", "-",
         "--filter=" + FILTER, *args, "--run", run_cmd],
        text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=nbdkit_env(), timeout=120)


def test_create_in_container(tmp_path):
    """create=true formats an empty container (qcow2-size= is the disk,
    the file's size is the container's); QEMU reads what we wrote, and a
    container that is not empty is refused without overwrite."""
    img = tmp_path / "c.img"
    with open(img, "wb") as f:
        f.truncate(64 * M)
    p = nbdkit_filter_run(
        ["file", str(img), "create=true", "qcow2-size=1G",
         "cluster-size=4096"],
        "qemu-io -f raw -c 'write -P 0x77 1M 3M' \"$uri\"")
    assert p.returncode == 0, p.stderr
    assert os.path.getsize(img) == 64 * M
    info = run("qemu-img", "info", "--output=json", img).stdout
    assert '"virtual-size": 1073741824' in info, info
    rc, out = qemu_check(Src(img))
    assert rc == 0, out
    p = run("qemu-io", "-f", "qcow2", "-c", "read -P 0x77 1M 3M", img)
    assert "read 3145728/3145728" in p.stdout

    p = nbdkit_filter_run(["file", str(img), "create=true", "qcow2-size=1G"],
                          "true")
    assert p.returncode != 0
    assert "not empty" in p.stderr and "overwrite" in p.stderr, p.stderr
    p = nbdkit_filter_run(["file", str(img), "create=true", "qcow2-size=2G",
                           "overwrite=true"], "true")
    assert p.returncode == 0, p.stderr
    info = run("qemu-img", "info", "--output=json", img).stdout
    assert '"virtual-size": 2147483648' in info, info


def test_create_in_memory(tmp_path):
    """The memory plugin as a container: create, write, read back, and
    the engine's own check calls it clean."""
    script = tmp_path / "t.py"
    script.write_text(
        "import nbd, os\n"
        "h = nbd.NBD()\n"
        "h.connect_uri(os.environ['uri'])\n"
        "assert h.get_size() == 4 << 30\n"
        "h.pwrite(b'\\x42' * (8 << 20), 1 << 30)\n"
        "h.flush()\n"
        "assert h.pread(8 << 20, 1 << 30) == b'\\x42' * (8 << 20)\n"
        "assert h.pread(4096, 0) == bytes(4096)\n")
    p = nbdkit_filter_run(["memory", "size=256M", "create=true",
                           "qcow2-size=4G"],
                          "uri=\"$uri\" /usr/bin/python3 %s" % script)
    assert p.returncode == 0, p.stderr


# --------------------------------------------------------------------------
# What the filter refuses, and read-only layers

def start_filter(args):
    return nbdkit_filter_run(args, "true")


def test_backing_needs_backing_dir(tmp_path):
    base = create(tmp_path / "base.qcow2", 8 * M)
    write(base, "write -P 0x31 0 1M")
    top = create(tmp_path / "top.qcow2", 8 * M, backing=base,
                 backing_fmt="qcow2")
    write(top, "write -P 0x32 1M 1M")
    p = start_filter(["file", str(top)])
    assert p.returncode != 0
    assert "backing-dir" in p.stderr, p.stderr

    expect = qemu_raw(top, tmp_path)
    with open(expect, "rb") as f:
        want = f.read()
    p = nbdkit_filter_run(["file", str(top), "backing-dir=%s" % tmp_path],
                          "nbdcopy \"$uri\" %s" % (tmp_path / "out.raw"),
                          readonly=True)
    assert p.returncode == 0, p.stderr
    assert_same((tmp_path / "out.raw").read_bytes(), want, "overlay")

    # A backing file outside backing-dir is refused, relative names that
    # climb out of it too.
    other = tmp_path / "other"
    other.mkdir()
    p = start_filter(["file", str(top), "backing-dir=%s" % other])
    assert p.returncode != 0 and "outside" in p.stderr, p.stderr
    top2 = create(other / "top2.qcow2", 8 * M, backing="../base.qcow2",
                  backing_fmt="qcow2")
    p = start_filter(["file", str(top2), "backing-dir=%s" % other])
    assert p.returncode != 0 and "outside" in p.stderr, p.stderr


@pytest.mark.parametrize("key", ["data-file=/tmp/x", "locking=false",
                                 "preallocation=metadata"])
def test_plugin_keys_refused(tmp_path, key):
    img = create(tmp_path / "a.qcow2", 8 * M)
    p = start_filter(["file", str(img), key])
    assert p.returncode != 0
    assert "nbdkit-qcow2-plugin" in p.stderr, p.stderr


@filter_layer("filter-nbd")
def test_read_only_layer_below(tmp_path, layer):
    """A layer below that cannot be written (here an nbd server with -r)
    gives a read-only export; the image is not changed."""
    img = make_image(tmp_path / "a.qcow2", 8 * M, "cluster_size=4096")
    before = open(img, "rb").read()
    with lower_server(img, "filter-nbd", readonly=True) as (sock, _), \
            nbdkit_server(engine_args(img, [], False,
                                      lower_sock=sock)) as srv:
        h = srv.connect()
        assert h.is_read_only()
        h.set_strict_mode(0)
        with pytest.raises(nbd.Error):
            h.pwrite(b"x" * 512, 0)
        assert h.pread(4096, 0) == qemu_raw_bytes(Src(img), tmp_path)[:4096]
        h.shutdown()
    assert open(img, "rb").read() == before


def test_snapshot_exports(tmp_path):
    """Snapshots are exports through the filter too."""
    img = make_image(tmp_path / "a.qcow2", 8 * M, "cluster_size=4096")
    qemu_img("snapshot", "-c", "snap1", img)
    write(img, "write -P 0x99 0 2M")
    want = qemu_raw_bytes(Src(img), tmp_path, "-l", "snapshot.name=snap1")
    p = nbdkit_filter_run(["file", str(img)], "nbdinfo --list \"$uri\"",
                          readonly=True)
    assert p.returncode == 0 and "snap1" in p.stdout, p.stdout + p.stderr
    out = tmp_path / "s.raw"
    p = nbdkit_filter_run(
        ["file", str(img)],
        "nbdcopy 'nbd+unix:///snap1?socket='\"$unixsocket\" %s" % out,
        readonly=True)
    assert p.returncode == 0, p.stderr
    assert_same(out.read_bytes(), want, "snapshot export")


def test_layer_below_with_large_blocks(tmp_path):
    """A layer below that wants aligned blocks (here 4K, as S3 wants its
    object size) is refused with the remedy, and works through nbdkit's
    blocksize filter."""
    img = make_image(tmp_path / "a.qcow2", 8 * M, "cluster_size=4096")
    policy = ["--filter=blocksize-policy", "file", str(img),
              "blocksize-minimum=4096"]
    p = start_filter(policy)
    assert p.returncode != 0 and "--filter=blocksize" in p.stderr, p.stderr
    want = qemu_raw_bytes(Src(img), tmp_path)
    out = tmp_path / "out.raw"
    p = nbdkit_filter_run(["--filter=blocksize", *policy],
                          "nbdcopy \"$uri\" %s" % out)
    assert p.returncode == 0, p.stderr
    assert_same(out.read_bytes(), want, "through blocksize")
