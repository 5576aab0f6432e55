"""Concurrent writers: many NBD connections (and many requests in flight
on each) writing, zeroing and trimming the same image at once.

- fio with its nbd engine, one connection per job, crc32c verification,
  each job in its own range (allocating writes on an empty image);
- fio hammering one shared region (writes, trims, flushes) with
  verification off: afterwards the image must check clean and read the
  same through the plugin and through QEMU;
- libnbd threads that each own interleaved units (512-byte sectors, or
  whole subclusters with extended L2) of the same clusters, so writers,
  zeroes, trims and readers race inside every cluster, including its
  first allocation and, over a backing file, its copy-on-write; every
  unit is checked against what its owner last wrote, on the fly, through
  the plugin at the end, and through QEMU after the server has stopped;
- readers scanning extended L2 clusters while writers allocate and trim
  them (an entry and its subcluster bitmap change together);
- encrypted images, where threads write disjoint bytes of the same
  sectors (read-modify-write of whole sectors);
- flushes racing with the first write, which makes the image writable.

The fio tests run with the engine as the plugin and as
nbdkit-qcow2-filter, over nbdkit's file plugin and over its nbd plugin
connected to a second nbdkit serving the image file raw (conftest's
layers).

After every test: `qemu-img check` exit 0 (not even leaks: the server was
stopped cleanly).

QCOW2_STRESS scales the amount of work (default 1); QCOW2_SEED fixes the
random seed (printed in failures).  The server comes from conftest.serve
(QCOW2_PLUGIN, QCOW2_FILTER, QCOW2_NBDKIT_ENV): scripts/tsan.sh runs this
file against a ThreadSanitizer build.
"""
import os
import random
import shutil
import struct
import subprocess
import threading
import time

import nbd
import pytest

from conftest import qemu_img, qemu_raw, run, serve, assert_same_as_raw

K = 1024
M = 1024 * K
SCALE = float(os.environ.get("QCOW2_STRESS", "1"))
SEED = int(os.environ.get("QCOW2_SEED", str(random.randrange(1 << 30))))

FIO = shutil.which("fio")
needs_fio = pytest.mark.skipif(
    FIO is None or "uri" not in subprocess.run(
        [FIO or "false", "--enghelp=nbd"], text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT).stdout,
    reason="fio with the nbd engine is not installed")


def scaled(n, minimum=1):
    return max(minimum, int(n * SCALE))


# --- images -------------------------------------------------------------

def pattern_raw(path, size, seed):
    """A raw file whose every 512-byte sector is distinct."""
    rnd = random.Random(seed)
    salt = rnd.getrandbits(64)
    with open(path, "wb") as f:
        for off in range(0, size, M):
            f.write(b"".join(struct.pack("<QQ", salt, (off + s) | 1 << 63) * 32
                             for s in range(0, M, 512)))


def make_image(tmp_path, kind, size):
    """Create an image of one of the layouts; return (path, backing raw
    path or None)."""
    img = tmp_path / ("%s.qcow2" % kind)
    opts = {"plain": "cluster_size=64k",
            "c4k": "cluster_size=4k",
            "overlay": "cluster_size=64k",
            "extl2": "cluster_size=64k,extended_l2=on",
            "extl2-overlay": "cluster_size=64k,extended_l2=on"}[kind]
    base_raw = None
    if kind.endswith("overlay"):
        base_raw = tmp_path / "base.raw"
        base = tmp_path / "base.qcow2"
        pattern_raw(base_raw, size, SEED)
        qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=64k",
                 base_raw, base)
        qemu_img("create", "-f", "qcow2", "-o", opts, "-b", base.name,
                 "-F", "qcow2", img, str(size))
    else:
        qemu_img("create", "-f", "qcow2", "-o", opts, img, str(size))
    return img, base_raw


def check_clean(img):
    """qemu-img check must find nothing at all (clean shutdown)."""
    p = run("qemu-img", "check", img, check=False)
    assert p.returncode == 0, "qemu-img check exit %d:\n%s%s" % (
        p.returncode, p.stdout, p.stderr)


def assert_no_tsan(srv):
    err = srv.stderr
    assert "WARNING: ThreadSanitizer" not in err, err
    assert "ERROR: AddressSanitizer" not in err, err
    assert "runtime error:" not in err, err


def plugin_matches_qemu(img, tmp_path):
    """Serve the image read-only and compare every byte with QEMU."""
    raw = qemu_raw(img, tmp_path)
    try:
        with serve(img, readonly=True) as srv:
            h = srv.connect()
            assert_same_as_raw(h, raw)
            h.shutdown()
    finally:
        os.unlink(raw)


# --- fio ----------------------------------------------------------------

def fio(*args, timeout=600):
    p = subprocess.run([FIO, "--output-format=terse", "--minimal", *args],
                       text=True, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=timeout)
    assert p.returncode == 0, "fio failed (%d):\n%s\n%s" % (
        p.returncode, p.stdout[-4000:], p.stderr[-4000:])
    # terse v3: field 5 is the job's error number
    for line in p.stdout.splitlines():
        fields = line.split(";")
        if len(fields) > 5 and fields[0] == "3":
            assert fields[4] == "0", "fio job %s error %s" % (fields[2], fields[4])
    return p


# The plugin, and the filter over the file plugin and over the nbd plugin.
fio_layers = pytest.mark.parametrize(
    "layer", ["plugin", "filter-file", "filter-nbd"], indirect=True)


@needs_fio
@pytest.mark.parametrize("kind", ["plain", "c4k", "extl2", "overlay"])
@fio_layers
def test_fio_disjoint_verify(tmp_path, layer, kind):
    """Four (or more) connections, each randomly writing its own range
    with 4k and 64k requests, allocating as they go; fio verifies every
    block with crc32c while the other jobs still write."""
    jobs = 4
    per_job = scaled(16 * M, 4 * M) // M * M
    img, _ = make_image(tmp_path, kind, jobs * per_job + 8 * M)
    with serve(img) as srv:
        fio("--name=disjoint", "--ioengine=nbd", "--uri=" + srv.uri,
            "--rw=randwrite", "--bssplit=4k/50:64k/50", "--blockalign=4k",
            "--numjobs=%d" % jobs, "--size=%d" % per_job,
            "--offset_increment=%d" % per_job, "--iodepth=8",
            "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
            "--randseed=%d" % SEED)
        # A second pass over the now allocated ranges: in-place overwrites.
        fio("--name=overwrite", "--ioengine=nbd", "--uri=" + srv.uri,
            "--rw=randwrite", "--bssplit=4k/30:16k/30:64k/40",
            "--blockalign=4k", "--numjobs=%d" % jobs,
            "--size=%d" % per_job, "--offset_increment=%d" % per_job,
            "--iodepth=8", "--verify=crc32c", "--do_verify=1",
            "--verify_fatal=1", "--randseed=%d" % (SEED + 1))
        assert_no_tsan(srv)
    check_clean(img)
    plugin_matches_qemu(img, tmp_path)


@needs_fio
@pytest.mark.parametrize("kind", ["plain", "extl2-overlay"])
@fio_layers
def test_fio_shared_region(tmp_path, layer, kind):
    """All jobs on the same small region: random writes of every size,
    trims and flushes overlap freely.  No verification is possible per
    job; the image must stay consistent."""
    region = 8 * M
    img, _ = make_image(tmp_path, kind, 32 * M)
    runtime = max(1, round(3 * SCALE))
    jobfile = tmp_path / "shared.fio"
    with serve(img) as srv:
        jobfile.write_text("""\
[global]
ioengine=nbd
uri=%s
size=%d
time_based
runtime=%d
iodepth=8
randseed=%d

[writers]
rw=randwrite
numjobs=4
bssplit=512/15:4k/35:64k/35:256k/15
blockalign=512
fsync=16

[trimmer]
rw=randtrim
numjobs=1
bssplit=4k/30:64k/50:1m/20
blockalign=4k
""" % (srv.uri, region, runtime, SEED))
        fio(jobfile)
        assert_no_tsan(srv)
    check_clean(img)
    plugin_matches_qemu(img, tmp_path)


# --- interleaved owners -------------------------------------------------

class Owner:
    """One client thread: owns unit u of every cluster when
    u % nthreads == index, so its requests never overlap another
    thread's, yet every cluster is shared by all threads."""

    def __init__(self, test, index):
        self.t = test
        self.index = index
        self.rnd = random.Random(SEED * 1000 + index)
        self.expect = {}     # unit number -> bytes it must read
        self.seq = 0
        self.error = None
        self.ops = 0

    def initial(self, unit):
        return self.t.initial(unit)

    def current(self, unit):
        got = self.expect.get(unit)
        return self.initial(unit) if got is None else got

    def my_units(self, cluster):
        per = self.t.units_per_cluster
        first = cluster * per
        return [first + u for u in range(self.index, per, self.t.nthreads)]

    def data(self, unit, length):
        self.seq += 1
        rec = struct.pack("<IIQ", 0x51C0FFEE, self.index, self.seq)
        rec += struct.pack("<Q", unit)
        return (rec * (length // len(rec) + 1))[:length]

    def read_check(self, h, unit, what):
        u = self.t.unit
        got = h.pread(u, unit * u)
        want = self.current(unit)
        if got != want:
            raise AssertionError(
                "thread %d: unit %d (offset %#x) after %s reads %r..., "
                "expected %r..." % (self.index, unit, unit * u, what,
                                    bytes(got[:24]), want[:24]))

    def op(self, h, unit, fresh):
        u = self.t.unit
        off = unit * u
        r = self.rnd.random()
        if r < (0.55 if fresh else 0.35):
            d = self.data(unit, u)
            h.pwrite(d, off, nbd.CMD_FLAG_FUA if self.rnd.random() < 0.02 else 0)
            self.expect[unit] = d
        elif r < 0.55:
            # A part of the unit, in 512-byte sectors.
            sectors = u // 512
            a = self.rnd.randrange(sectors)
            b = self.rnd.randrange(a + 1, sectors + 1)
            d = self.data(unit, (b - a) * 512)
            h.pwrite(d, off + a * 512)
            cur = bytearray(self.current(unit))
            cur[a * 512:b * 512] = d
            self.expect[unit] = bytes(cur)
        elif r < 0.70:
            flags = nbd.CMD_FLAG_NO_HOLE if self.rnd.random() < 0.5 else 0
            h.zero(u, off, flags)
            self.expect[unit] = bytes(u)
        elif r < 0.80:
            h.trim(u, off)
            # Trim is advisory: the old contents or zeros, nothing else.
            got = bytes(h.pread(u, off))
            if got != self.current(unit) and got != bytes(u):
                raise AssertionError(
                    "thread %d: unit %d (offset %#x) after trim reads %r..., "
                    "neither the old contents nor zeros" % (
                        self.index, unit, off, got[:24]))
            self.expect[unit] = got
        elif r < 0.98:
            self.read_check(h, unit, "read")
        else:
            h.flush()
        self.ops += 1

    def run(self, h, barrier):
        try:
            t = self.t
            for batch in range(t.batches):
                barrier.wait(timeout=300)
                fresh = list(range(batch * t.batch_clusters,
                                   (batch + 1) * t.batch_clusters))
                self.rnd.shuffle(fresh)
                # Everybody into the same unallocated clusters at once.
                for c in fresh:
                    for unit in self.rnd.sample(self.my_units(c), 2):
                        self.op(h, unit, True)
                # Then anywhere in what has been touched so far.
                touched = (batch + 1) * t.batch_clusters
                for _ in range(t.mixed_ops):
                    c = self.rnd.randrange(touched)
                    self.op(h, self.rnd.choice(self.my_units(c)), False)
            # Everything this thread owns, read back before it leaves.
            for c in range(t.batches * t.batch_clusters):
                for unit in self.my_units(c):
                    self.read_check(h, unit, "the run")
        except BaseException as e:  # noqa: B902 - reported by the test
            self.error = e
            barrier.abort()


class Interleaved:
    def __init__(self, tmp_path, kind, nthreads=4):
        self.kind = kind
        self.nthreads = nthreads
        self.cluster = 64 * K
        # With extended L2 a unit is one subcluster, so zero and trim
        # change only the subcluster bitmap, racing with allocations in
        # the same cluster.
        self.unit = 2 * K if kind.startswith("extl2") else 512
        self.units_per_cluster = self.cluster // self.unit
        self.batches = scaled(16, 2)
        self.batch_clusters = 8
        self.mixed_ops = scaled(150, 20)
        self.size = 16 * M
        assert self.batches * self.batch_clusters * self.cluster <= self.size
        self.img, base_raw = make_image(tmp_path, kind, self.size)
        self.base = open(base_raw, "rb").read() if base_raw else None

    def initial(self, unit):
        u = self.unit
        if self.base is None:
            return bytes(u)
        return self.base[unit * u:(unit + 1) * u]

    def expected_image(self, owners):
        data = bytearray(self.base) if self.base else bytearray(self.size)
        for o in owners:
            for unit, d in o.expect.items():
                data[unit * self.unit:(unit + 1) * self.unit] = d
        return bytes(data)

    def run(self, tmp_path):
        owners = [Owner(self, i) for i in range(self.nthreads)]
        barrier = threading.Barrier(self.nthreads)
        with serve(self.img) as srv:
            handles = [srv.connect() for _ in owners]
            threads = [threading.Thread(target=o.run, args=(h, barrier))
                       for o, h in zip(owners, handles)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            # The first real error (the others then see a broken barrier).
            errors = sorted((o.error for o in owners if o.error is not None),
                            key=lambda e: isinstance(
                                e, threading.BrokenBarrierError))
            if errors:
                raise AssertionError(
                    "seed %d: %r\nserver stderr:\n%s" % (
                        SEED, errors[0], srv.stderr[-4000:])) from errors[0]
            expect = self.expected_image(owners)
            h = handles[0]
            got = h.pread(len(expect), 0)
            assert got == expect, "seed %d: the image differs at %#x" % (
                SEED, next(i for i in range(len(expect)) if got[i] != expect[i]))
            for h in handles:
                h.shutdown()
            assert_no_tsan(srv)
        check_clean(self.img)
        raw = qemu_raw(self.img, tmp_path)
        with open(raw, "rb") as f:
            got = f.read()
        os.unlink(raw)
        if got != expect:
            first = next(i for i in range(len(expect)) if got[i] != expect[i])
            pytest.fail("seed %d: QEMU reads different data at %#x" % (
                SEED, first))
        return sum(o.ops for o in owners)


@pytest.mark.parametrize("kind", ["plain", "overlay", "extl2", "extl2-overlay"])
def test_interleaved_owners(tmp_path, kind):
    """Threads share every cluster, each owning alternate units: writes
    (whole and partial), zeroes, trims and reads race inside the same
    clusters, from their first allocation (and copy-on-write from the
    backing file) on.  Every unit must read what its owner last wrote;
    untouched units keep the backing file's data."""
    ops = Interleaved(tmp_path, kind).run(tmp_path)
    assert ops > 0


def test_readers_during_allocation(tmp_path):
    """Readers scanning clusters while writers allocate and release them
    (one subcluster written per new cluster, then the cluster trimmed),
    so the entry and the subcluster bitmap of an extended L2 entry keep
    changing together: a reader must see either the old or the new entry
    (never an error: it used to read the old entry with the new bitmap,
    "Invalid cluster entry"), and every subcluster whole."""
    size = 16 * M
    region = 64           # clusters
    img = tmp_path / "r.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=64k,extended_l2=on",
             img, str(size))
    stop = threading.Event()
    errors = []
    sub = 2 * K
    allowed = {bytes(sub), b"\x01" * sub, b"\x02" * sub}
    deadline = time.monotonic() + max(1.0, 2.5 * SCALE)
    counts = [0, 0]
    with serve(img) as srv:
        def writer(i):
            h = srv.connect()
            try:
                rnd = random.Random(SEED + i)
                n = 0
                while not stop.is_set():
                    c = (i + 2 * n) % region
                    h.pwrite(bytes([i + 1]) * sub,
                             c * 64 * K + rnd.randrange(32) * sub)
                    old = (i + 2 * (n - 8)) % region
                    if n >= 8:
                        h.trim(64 * K, old * 64 * K)
                    n += 1
                counts[0] += n
                h.shutdown()
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        def reader():
            h = srv.connect()
            try:
                while not stop.is_set():
                    data = h.pread(region * 64 * K, 0)
                    counts[1] += 1
                    for off in range(0, len(data), sub):
                        if bytes(data[off:off + sub]) not in allowed:
                            raise AssertionError(
                                "subcluster at %#x reads mixed data" % off)
                h.shutdown()
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        ts = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
        ts += [threading.Thread(target=reader) for _ in range(2)]
        for t in ts:
            t.start()
        while time.monotonic() < deadline and not errors:
            time.sleep(0.05)
        stop.set()
        for t in ts:
            t.join()
        assert not errors, "%s\nserver stderr:\n%s" % (errors[0], srv.stderr[-3000:])
        assert_no_tsan(srv)
    assert counts[0] > 0 and counts[1] > 0
    check_clean(img)


@pytest.mark.parametrize("fmt", ["luks", "aes"])
def test_encrypted_sub_sector_writers(tmp_path, fmt):
    """Encrypted data is written in whole 512-byte sectors: a write that
    covers part of a sector reads, decrypts, merges and re-encrypts it.
    Threads writing disjoint bytes of the same sectors (each owns a
    quarter of every sector) must not undo each other's writes, and a
    read must not see a sector in the middle of another thread's rewrite
    (half old, half new ciphertext decrypts to garbage)."""
    import images
    img = tmp_path / "enc.qcow2"
    pw = "concurrency"
    size = 4 * M
    if fmt == "luks":
        images.luks_create(img, size, pw)
    else:
        qemu_img("create", "-q", "-f", "qcow2", *images.secret_args(pw),
                 "-o", "encrypt.format=aes,encrypt.key-secret=s0",
                 img, str(size))
    nthreads, piece = 4, 128
    sectors = 8                       # few sectors: constant collisions
    ops = scaled(1500, 200)
    expect = bytearray(size)
    errors = []
    with serve(img, "passphrase=" + pw) as srv:
        h = srv.connect()
        h.pwrite(bytes(sectors * 512), 0)   # allocate: later writes in place
        handles = [srv.connect() for _ in range(nthreads)]

        def run_owner(t, h):
            rnd = random.Random(SEED * 10 + t)
            try:
                for i in range(ops):
                    s = rnd.randrange(sectors)
                    off = s * 512 + t * piece
                    d = struct.pack("<HHI", t, i & 0xffff, s) * (piece // 8)
                    h.pwrite(d, off)
                    expect[off:off + piece] = d
                    # Our own pieces must keep what we wrote.
                    s = rnd.randrange(sectors)
                    off = s * 512 + t * piece
                    got = h.pread(piece, off)
                    if got != expect[off:off + piece]:
                        raise AssertionError(
                            "thread %d: its piece at %#x read back wrong: "
                            "undone by, or read in the middle of, another "
                            "thread's write to the same sector" % (t, off))
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        ts = [threading.Thread(target=run_owner, args=(t, hh))
              for t, hh in enumerate(handles)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errors, errors[0]
        got = h.pread(sectors * 512, 0)
        for hh in handles + [h]:
            hh.shutdown()
        assert_no_tsan(srv)
    bad = [i for i in range(0, sectors * 512, piece)
           if got[i:i + piece] != expect[i:i + piece]]
    assert not bad, "%d of %d pieces lost (first at %#x): concurrent " \
        "read-modify-write of a sector" % (len(bad), sectors * 4, bad[0])
    p = run("qemu-img", "check", *images.secret_args(pw), "--image-opts",
            images.image_opts(img), check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    raw = tmp_path / "enc.raw"
    images.crypt_raw(img, pw, raw)
    with open(raw, "rb") as f:
        assert f.read(sectors * 512) == bytes(expect[:sectors * 512])


def test_flush_while_writing_is_enabled(tmp_path):
    """The image turns writable at the first write request; flushes on
    other connections at that moment must neither crash nor touch a
    writer that is still being set up (TSan found qcow2_flush reading
    img->w while qcow2_enable_write filled it in)."""
    img = tmp_path / "e.qcow2"
    for attempt in range(scaled(6, 2)):
        qemu_img("create", "-f", "qcow2", img, "64M")
        stop = threading.Event()
        errors = []
        with serve(img) as srv:
            def flusher():
                h = srv.connect()
                try:
                    while not stop.is_set():
                        h.flush()
                    h.shutdown()
                except Exception as e:  # noqa: BLE001
                    errors.append(e)

            ts = [threading.Thread(target=flusher) for _ in range(3)]
            h = srv.connect()
            for t in ts:
                t.start()
            time.sleep(0.05)
            try:
                h.pwrite(b"\x5a" * 64 * K, 0)
                h.flush()
                assert h.pread(64 * K, 0) == b"\x5a" * 64 * K
            finally:
                stop.set()
                for t in ts:
                    t.join()
            assert not errors, "%s\n%s" % (errors[0], srv.stderr[-3000:])
            h.shutdown()
            assert_no_tsan(srv)
        check_clean(img)
