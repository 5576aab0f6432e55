"""A random-operation driver for the write path, checked against an
in-memory raw mirror and, at the end, against QEMU.

The driver sends seeded random sequences of writes (tiny and unaligned,
cluster-, subcluster- and L2-table-straddling, whole clusters, large),
zeroes (with and without MAY_TRIM, FUA, FAST_ZERO), trims, flushes and
batches of concurrent non-overlapping requests, over one or two
connections (the plugin advertises multi-conn), and applies each to a
bytearray mirror.  Reads in between compare with the mirror.

Trim (and a refused or failed FAST_ZERO) leave the range unspecified for
NBD; the plugin promises that a trimmed range reads either zeros or what
was there before, never older backing data.  The driver reads such a range
back, checks each byte is 0 or the previous mirror byte, and adopts it.

Finishing (finish()): close the server (the plugin syncs on close), then
`qemu-img check` must exit 0 (no corruption, no leak), `qemu-img convert
-O raw` must equal the mirror byte for byte, and a read-only re-serve must
read the mirror, never report data as a hole or zero, and leave the file
unchanged.
"""

import hashlib
import os
import random
import struct
import subprocess
import signal
import tempfile
import threading

import nbd
import pytest

from conftest import extents, qemu_img, serve as rw_serve
from images import create, read_header, serve as ro_serve, write

K = 1024
M = 1024 * K

HOLE = nbd.STATE_HOLE
ZERO = nbd.STATE_ZERO


# --------------------------------------------------------------------------
# How QEMU is told about an image (plain, encrypted)

class Src:
    """How qemu-img names an image: plain file, or --image-opts with a
    secret for encrypted images."""

    def __init__(self, path, passphrase=None, extra_opts=""):
        self.path = str(path)
        self.passphrase = passphrase
        self.extra_opts = extra_opts

    def args(self, *opts):
        """Source arguments for check/convert/info (opts: extra
        comma-separated image options, e.g. for the plain case none)."""
        if self.passphrase is None and not self.extra_opts:
            return ["-f", "qcow2", self.path]
        spec = "driver=qcow2,file.filename=%s" % self.path
        obj = []
        if self.passphrase is not None:
            spec += ",encrypt.key-secret=s0"
            obj = ["--object", "secret,id=s0,data=%s" % self.passphrase]
        if self.extra_opts:
            spec += "," + self.extra_opts
        return obj + ["--image-opts", spec]

    def serve_params(self):
        return [] if self.passphrase is None else \
            ["passphrase=%s" % self.passphrase]


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                return h.hexdigest()
            h.update(b)


def qemu_check(src):
    """qemu-img check; returns (returncode, output)."""
    p = qemu_img("check", *src.args(), check=False)
    return p.returncode, p.stdout + p.stderr


def assert_check_clean(src):
    rc, out = qemu_check(src)
    assert rc == 0, "qemu-img check exit %d:\n%s" % (rc, out)
    assert "OFLAG_COPIED" not in out, out
    assert "leaked" not in out, out
    return out


def qemu_raw_bytes(src, tmpdir, *convert_args):
    fd, out = tempfile.mkstemp(dir=str(tmpdir), suffix=".raw")
    os.close(fd)
    try:
        qemu_img("convert", *convert_args, *src.args(), "-O", "raw", out)
        with open(out, "rb") as f:
            return f.read()
    finally:
        os.unlink(out)


def first_diff(a, b, step=4096):
    n = min(len(a), len(b))
    for o in range(0, n, step):
        if a[o:o + step] != b[o:o + step]:
            for i in range(o, min(o + step, n)):
                if a[i] != b[i]:
                    return i
    return n if len(a) != len(b) else None


def assert_same(got, expect, what, base=0):
    if got == expect:
        return
    i = first_diff(got, expect)
    if i is None:
        return
    if i >= min(len(got), len(expect)):
        pytest.fail("%s: length %d != %d" % (what, len(got), len(expect)))
    pytest.fail("%s: differs at offset %d (%#x): got %02x, want %02x "
                "(%d differing bytes in the next 64 KiB)"
                % (what, base + i, base + i, got[i], expect[i],
                   sum(1 for j in range(i, min(i + 65536, len(got)))
                       if got[j] != expect[j])))


# --------------------------------------------------------------------------
# Geometry

class Geometry:
    def __init__(self, path):
        h = read_header(path)
        self.version = h["version"]
        self.cluster = 1 << h["cluster_bits"]
        self.size = h["size"]
        self.extended = bool(h["incompatible"] & 16)
        entry = 16 if self.extended else 8
        self.sub = self.cluster // 32 if self.extended else self.cluster
        self.l2_span = self.cluster * (self.cluster // entry)
        self.refcount_bits = 1 << h["refcount_order"]


# --------------------------------------------------------------------------
# The driver

def is_zero(b):
    """All bytes zero (at C speed: any() would iterate in Python)."""
    return not b.strip(b"\0")


def zero_or_prev(got, prev):
    """Every byte of got is 0 or the byte of prev at the same place."""
    if got == prev or is_zero(got):
        return None
    step = 512
    for o in range(0, len(got), step):
        g, p = got[o:o + step], prev[o:o + step]
        if g == p or is_zero(g):
            continue
        for i in range(len(g)):
            if g[i] != 0 and g[i] != p[i]:
                return o + i
    return None


class Driver:
    """Random operations against a served image and a mirror.

    handles: one or more libnbd handles to the same export.
    geo: Geometry of the image.
    mirror: bytearray of the initial guest content.
    """

    def __init__(self, handles, geo, mirror, seed, max_large=4 * M,
                 fast_zero=True, trim=True, batches=True, zero=True, log=None,
                 record=None):
        self.hs = handles
        self.geo = geo
        self.m = mirror
        self.size = len(mirror)
        self.rng = random.Random(seed)
        self.seed = seed
        self.max_large = min(max_large, self.size)
        self.fast_zero = fast_zero
        self.trim = trim
        self.zero = zero          # False: the server cannot zero (cow)
        self.batches = batches
        self.log = log if log is not None else []
        self.stats = {}
        # record: a list receiving replayable operations (see replay()).
        self.record = record
        assert handles[0].get_size() == self.size

    # ---- helpers

    def h(self):
        return self.rng.choice(self.hs)

    def note(self, *what):
        self.log.append(what)
        self.stats[what[0]] = self.stats.get(what[0], 0) + 1

    def fail(self, msg):
        tail = "\n".join(repr(x) for x in self.log[-25:])
        pytest.fail("seed %d: %s\nlast operations:\n%s"
                    % (self.seed, msg, tail))

    def clip(self, off, ln):
        off = max(0, min(off, self.size - 1))
        ln = max(1, min(ln, self.size - off))
        return off, ln

    def shape(self):
        """A random (offset, length) of one of the interesting kinds."""
        r = self.rng
        g = self.geo
        cs, sub = g.cluster, g.sub
        nclusters = self.size // cs
        kind = r.choices(
            ["tiny", "small", "straddle", "whole", "sub", "l2", "large",
             "end", "sector"],
            [10, 16, 16, 14, 8 if g.extended else 0,
             8 if g.l2_span < self.size else 0, 6, 4, 8])[0]
        if kind == "tiny":
            off, ln = r.randrange(self.size), r.randint(1, 16)
        elif kind == "small":
            off, ln = r.randrange(self.size), r.randint(1, 2 * cs)
        elif kind == "straddle":
            b = r.randint(1, max(1, nclusters - 1)) * cs
            off = b - r.randint(1, min(cs, 8 * K))
            ln = (b - off) + r.randint(1, min(cs, 8 * K))
        elif kind == "whole":
            off = r.randrange(nclusters) * cs
            ln = r.randint(1, max(1, min(8, (256 * K) // cs))) * cs
        elif kind == "sub":
            off = r.randrange(self.size // sub) * sub
            ln = r.randint(1, 40) * sub
        elif kind == "l2":
            b = r.randint(1, (self.size - 1) // g.l2_span) * g.l2_span
            off = b - r.randint(1, 3 * cs)
            ln = (b - off) + r.randint(1, 3 * cs)
        elif kind == "large":
            ln = r.randint(self.max_large // 4, self.max_large)
            off = r.randrange(self.size - ln + 1)
            if r.random() < 0.5:
                off -= off % cs
        elif kind == "end":
            ln = r.randint(1, 3 * cs)
            off = self.size - ln
        else:
            off = r.randrange(self.size // 512) * 512
            ln = r.randint(1, 16) * 512
        return self.clip(off, ln), kind

    def payload(self, ln):
        r = self.rng
        x = r.random()
        if x < 0.75:
            return r.randbytes(ln)
        if x < 0.9:
            return bytes([r.randint(1, 255)]) * ln
        return bytes(ln)          # a data write of zeros

    def check_range(self, h, off, ln, what="read"):
        got = h.pread(ln, off)
        exp = bytes(self.m[off:off + ln])
        if got != exp:
            i = first_diff(got, exp)
            self.fail("%s [%d, +%d): byte at %d is %02x, mirror %02x"
                      % (what, off, ln, off + i, got[i], exp[i]))

    def adopt(self, h, off, ln, what):
        """After a trim (or a failed fast zero): each byte reads 0 or what
        it was before; the mirror takes what the server now reads."""
        got = h.pread(ln, off)
        bad = zero_or_prev(got, bytes(self.m[off:off + ln]))
        if bad is not None:
            self.fail("%s [%d, +%d): byte at %d reads %02x, neither 0 nor "
                      "the previous %02x" % (what, off, ln, off + bad,
                                             got[bad], self.m[off + bad]))
        self.m[off:off + ln] = got

    # ---- operations

    def op_write(self, fua=False):
        (off, ln), kind = self.shape()
        data = self.payload(ln)
        flags = nbd.CMD_FLAG_FUA if fua else 0
        self.note("write", off, ln, kind, "fua" if fua else "")
        if self.record is not None:
            self.record.append(("w", off, data, flags))
        self.h().pwrite(data, off, flags)
        self.m[off:off + ln] = data

    def op_zero(self):
        (off, ln), kind = self.shape()
        r = self.rng
        flags = 0
        if r.random() < 0.5:
            flags |= nbd.CMD_FLAG_NO_HOLE
        if r.random() < 0.2:
            flags |= nbd.CMD_FLAG_FUA
        fast = self.fast_zero and r.random() < 0.2
        if fast:
            flags |= nbd.CMD_FLAG_FAST_ZERO
        self.note("zero", off, ln, kind, flags)
        if self.record is not None:
            self.record.append(("z", off, ln, flags))
        h = self.h()
        try:
            h.zero(ln, off, flags)
        except nbd.Error as e:
            if not fast or e.errno != "ENOTSUP":
                self.fail("zero(%d, %d, %#x) failed: %s" % (ln, off, flags, e))
            self.note("fast-zero-refused", off, ln)
            self.adopt(h, off, ln, "refused fast zero")
            return
        self.m[off:off + ln] = bytes(ln)

    def op_trim(self):
        (off, ln), kind = self.shape()
        flags = nbd.CMD_FLAG_FUA if self.rng.random() < 0.2 else 0
        self.note("trim", off, ln, kind, flags)
        if self.record is not None:
            self.record.append(("t", off, ln, flags))
        h = self.h()
        h.trim(ln, off, flags)
        self.adopt(h, off, ln, "trim")

    def op_read(self):
        (off, ln), kind = self.shape()
        self.note("read", off, ln, kind)
        self.check_range(self.h(), off, ln)

    def op_flush(self):
        self.note("flush")
        if self.record is not None:
            self.record.append(("f",))
        self.h().flush()

    def op_zero_all(self):
        flags = 0 if self.rng.random() < 0.5 else nbd.CMD_FLAG_NO_HOLE
        self.note("zero-all", flags)
        if self.record is not None:
            self.record.append(("z", 0, self.size, flags))
        self.h().zero(self.size, 0, flags)
        self.m[:] = bytes(self.size)

    def op_batch(self, max_pieces=8):
        """Concurrent non-overlapping requests, often inside the same
        clusters: the range locks, the merging of partial clusters and
        lock-free reads run in parallel."""
        r = self.rng
        cs = self.geo.cluster
        k = r.randint(2, max_pieces)
        if r.random() < 0.5:
            # Pieces of a few neighbouring clusters.
            base = r.randrange(max(1, self.size // cs - 4)) * cs
            span = min(4 * cs, self.size - base)
        else:
            span = min(self.size, r.randint(64 * K, 2 * M))
            base = r.randrange(self.size - span + 1)
        cuts = sorted(r.sample(range(1, span), min(k, span - 1)))
        pieces = []
        prev = 0
        for c in cuts + [span]:
            if c > prev and r.random() < 0.85:
                pieces.append((base + prev, c - prev))
            prev = c
        r.shuffle(pieces)
        cmds, trims, batch, reads = [], [], [], []
        for off, ln in pieces:
            h = self.h()
            kind = r.choices(["write", "zero", "trim", "read"],
                             [60, 18 if self.zero else 0,
                              10 if self.trim else 0, 12])[0]
            if kind == "read":
                buf = nbd.Buffer(ln)
                cmds.append((h, h.aio_pread(buf, off)))
                reads.append((buf, off, ln, bytes(self.m[off:off + ln])))
            elif kind == "write":
                data = self.payload(ln)
                batch.append(("w", off, data, 0))
                cmds.append((h, h.aio_pwrite(nbd.Buffer.from_bytearray(
                    bytearray(data)), off)))
                self.m[off:off + ln] = data
            elif kind == "zero":
                flags = r.choice([0, nbd.CMD_FLAG_NO_HOLE])
                batch.append(("z", off, ln, flags))
                cmds.append((h, h.aio_zero(ln, off, flags=flags)))
                self.m[off:off + ln] = bytes(ln)
            else:
                batch.append(("t", off, ln, 0))
                cmds.append((h, h.aio_trim(ln, off)))
                trims.append((h, off, ln))
        self.note("batch", base, span, len(pieces))
        if self.record is not None:
            self.record.append(("batch", list(batch)))
        for h, cookie in cmds:
            while not h.aio_command_completed(cookie):
                h.poll(-1)
        for buf, off, ln, exp in reads:
            got = buf.to_bytearray()
            if got != exp:
                i = first_diff(got, exp)
                self.fail("concurrent read [%d, +%d): byte at %d is %02x, "
                          "expected %02x" % (off, ln, off + i, got[i], exp[i]))
        for h, off, ln in trims:
            self.adopt(h, off, ln, "trim in batch")

    def run(self, nops, storm=False):
        """nops random operations; storm: mostly large batches of
        concurrent requests."""
        ops = [(self.op_write, 36), (lambda: self.op_write(True), 5),
               (self.op_zero, 14 if self.zero else 0),
               (self.op_trim, 10 if self.trim else 0),
               (self.op_read, 20), (self.op_flush, 5),
               (self.op_batch, 8 if self.batches else 0),
               (self.op_zero_all, 0.4 if self.zero else 0)]
        if storm:
            ops = [(lambda: self.op_batch(48), 90), (self.op_flush, 5),
                   (self.op_write, 5)]
        fns = [f for f, _ in ops]
        weights = [w for _, w in ops]
        for i in range(nops):
            self.rng.choices(fns, weights)[0]()
            if i % 97 == 96:
                self.verify_all()
        self.verify_all()

    def verify_all(self):
        h = self.h()
        chunk = 8 * M
        for off in range(0, self.size, chunk):
            ln = min(chunk, self.size - off)
            self.check_range(h, off, ln, "full read")


# --------------------------------------------------------------------------
# Building the starting images

def prefill_cmds(size, cs, sub=None, compressed=True, zero=True):
    """qemu-io commands that leave a bit of everything: data clusters,
    partial ones, compressed clusters, preallocated and plain zero
    clusters, data across an L2 boundary and at the end of the disk."""
    nc = size // cs

    def at(frac):
        return (int(nc * frac) % nc) * cs

    cmds = ["write -P 0x11 0 %d" % min(size, 3 * cs + 100),
            "write -P 0x12 %d %d" % (at(0.3) + 7, min(cs, 5000)),
            "write -P 0x13 %d %d" % (at(0.5), min(2 * cs, size - at(0.5))),
            "write -P 0x14 %d %d" % (size - min(size, 3 * cs + 33),
                                     min(size, 3 * cs + 33))]
    if zero:
        a = at(0.5)
        cmds.append("write -z %d %d" % (a, cs))             # zero, allocated
        if a + 2 * cs <= size:
            cmds.append("write -z -u %d %d" % (a + cs, cs))  # zero, plain
        cmds.append("write -z -u %d %d" % (at(0.7), min(4 * cs, size - at(0.7))))
    if compressed and at(0.6) + 2 * cs <= size:
        cmds.append("write -c -P 0x15 %d %d" % (at(0.6), 2 * cs))
        cmds.append("write -c -P 0x16 %d %d" % (at(0.6) + 2 * cs, cs)
                    if at(0.6) + 3 * cs <= size else "write -P 0x16 0 1")
    if sub:
        b = at(0.4)
        cmds += ["write -P 0x17 %d %d" % (b + 3 * sub, 5 * sub),
                 "write -P 0x18 %d %d" % (b + cs + 17, sub),
                 "write -z %d %d" % (b + 4 * sub, 2 * sub)]
    span = cs * (cs // (16 if sub else 8))
    if span < size:
        cmds.append("write -P 0x19 %d %d" % (span - cs - 300, 2 * cs + 600))
    return cmds


def make_image(path, size, *opts, prefill=True, compressed=True, **kw):
    img = create(path, size, *opts, **kw)
    if prefill:
        h = read_header(img)
        cs = 1 << h["cluster_bits"]
        size = h["size"]
        sub = cs // 32 if h["incompatible"] & 16 else None
        write(img, *prefill_cmds(size, cs, sub, compressed=compressed))
    return img


# --------------------------------------------------------------------------
# Whole runs

def extents_sane(h, mirror, what=""):
    """Nothing that holds nonzero bytes is reported as a hole or zero."""
    size = len(mirror)
    out = extents(h, 0, size)
    pos = 0
    for off, ln, fl in out:
        assert off == pos
        pos += ln
        ln = min(ln, size - off)
        if fl & (HOLE | ZERO) and not is_zero(mirror[off:off + ln]):
            i = next(j for j in range(off, off + ln) if mirror[j])
            pytest.fail("%sextent [%d, +%d) flags %d but byte %d is %02x"
                        % (what, off, ln, fl, i, mirror[i]))
    return out


def connect_meta(uri):
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


def initial_mirror(src, tmpdir, *convert_args):
    return bytearray(qemu_raw_bytes(src, tmpdir, *convert_args))


class Watchdog:
    """Kill a server that takes too long (a hung request would otherwise
    hang the test forever) or whose file grows without bound."""

    def __init__(self, srv, img, timeout, max_file_size):
        self.pidfile = os.path.join(os.path.dirname(srv.sock), "pid")
        self.img = str(img)
        self.timeout = timeout
        self.max_file_size = max_file_size
        self.fired = None
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        waited = 0.0
        while not self._stop.wait(0.5):
            waited += 0.5
            why = None
            if waited > self.timeout:
                why = "no end after %d s" % self.timeout
            elif os.path.getsize(self.img) > self.max_file_size:
                why = "image file grew past %d bytes" % self.max_file_size
            if why:
                self.fired = why
                try:
                    with open(self.pidfile) as f:
                        os.kill(int(f.read()), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
                return

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        if self.fired:
            pytest.fail("watchdog killed the server: %s" % self.fired)


def drive(img, tmpdir, seed, nops, src=None, params=(), connections=2,
          mirror=None, timeout=120, max_file_size=None, storm=False,
          filters=(), below=(), final_flush=False, **driver_kw):
    """Serve img read-write, run the driver, close.  Returns the mirror
    and the driver (for stats).  filters, below: nbdkit filters above and
    under the engine (conftest.serve).  final_flush: flush before closing,
    for a writeback cache above (it writes back only then) and for layers
    below that refuse I/O once nbdkit shuts down (NBD promises only
    flushed data)."""
    src = src or Src(img)
    if mirror is None:
        mirror = initial_mirror(src, tmpdir)
    geo = Geometry(img)
    if max_file_size is None:
        # Data, metadata and a snapshot or two: never more than a few
        # times the disk (or the file as it was).
        max_file_size = 4 * len(mirror) + 2 * os.path.getsize(img) + 64 * M
    with rw_serve(img, *src.serve_params(), *params, filters=filters,
                  below=below) as srv, \
            Watchdog(srv, img, timeout, max_file_size):
        hs = [connect_meta(srv.uri) for _ in range(connections)]
        for h in hs:
            assert not h.is_read_only()
        d = Driver(hs, geo, mirror, seed, **driver_kw)
        try:
            d.run(nops, storm=storm)
            for h in hs if final_flush else ():
                h.flush()
        except nbd.Error as e:
            d.fail("%s\nserver stderr (tail):\n%s"
                   % (e, "\n".join(srv.stderr.splitlines()[-15:])))
        for h in hs:
            h.shutdown()
    return mirror, d


def finish(img, tmpdir, mirror, src=None, params=(), convert_args=()):
    """After the server closed: check clean, QEMU reads the mirror, and a
    read-only re-serve reads it too with sane extents and changes
    nothing."""
    src = src or Src(img)
    out = assert_check_clean(src)
    got = qemu_raw_bytes(src, tmpdir, *convert_args)
    assert_same(got, bytes(mirror), "qemu-img convert vs mirror")
    before = sha256_file(img)
    with ro_serve(img, *src.serve_params(), *params) as srv:
        h = connect_meta(srv.uri)
        assert h.is_read_only()
        extents_sane(h, mirror, "re-served: ")
        for off in range(0, len(mirror), 8 * M):
            ln = min(8 * M, len(mirror) - off)
            assert_same(h.pread(ln, off), bytes(mirror[off:off + ln]),
                        "re-served read", off)
        h.shutdown()
    assert sha256_file(img) == before, "a read-only serve changed the file"
    return out


def drive_and_finish(img, tmpdir, seed, nops, src=None, params=(), **kw):
    mirror, d = drive(img, tmpdir, seed, nops, src=src, params=params, **kw)
    finish(img, tmpdir, mirror, src=src, params=params)
    return mirror, d


def replay(h, ops):
    """Send recorded operations (Driver(record=...)) again, batches
    concurrently.  Errors of refused fast zeroes are ignored."""
    def one(op, aio):
        if op[0] == "w":
            if aio:
                return h.aio_pwrite(nbd.Buffer.from_bytearray(
                    bytearray(op[2])), op[1], flags=op[3])
            return h.pwrite(op[2], op[1], op[3])
        if op[0] == "z":
            if aio:
                return h.aio_zero(op[2], op[1], flags=op[3])
            try:
                return h.zero(op[2], op[1], op[3])
            except nbd.Error as e:
                if e.errno != "ENOTSUP":
                    raise
                return None
        if op[0] == "t":
            return (h.aio_trim if aio else h.trim)(op[2], op[1], flags=op[3])
        if op[0] == "f":
            return h.flush()
        raise ValueError(op)

    for op in ops:
        if op[0] == "batch":
            cookies = [one(x, True) for x in op[1]]
            for c in cookies:
                while not h.aio_command_completed(c):
                    h.poll(-1)
        else:
            one(op, False)
