"""Image-building and checking helpers for the read-correctness suite.

Everything here uses QEMU (qemu-img, qemu-io) as the oracle; the tests in
test_*.py build images with these helpers, serve them with the plugin and
compare what an NBD client reads with what QEMU reads.
"""

import json
import os
import random
import struct
import subprocess
import tempfile
import time

import pytest

import conftest
from conftest import (engine_args, assert_same_as_raw, extents,
                      nbdkit_env, qemu_img, qemu_io, qemu_raw, run)

QCOW2_MAGIC = 0x514649FB
EXT_BACKING_FORMAT = 0xE2792ACA


# --------------------------------------------------------------------------
# Serving

def serve(image, *params, readonly=True):
    """conftest.serve, but read-only by default (nbdkit -r).

    The plugin opens an image for writing as soon as a client connects
    without -r; this suite is about reads, and some of its images (dirty or
    corrupt bit, stale bitmaps) must not be modified or even opened for
    writing.
    """
    return conftest.serve(image, *params, readonly=readonly)


def assert_reads_like_qemu(image, tmp_path, *params, readonly=True,
                           convert_args=()):
    """conftest.assert_image_reads_like_qemu, read-only by default."""
    raw = qemu_raw(image, tmp_path, *convert_args)
    try:
        serve_compare(image, raw, *params, readonly=readonly)
    finally:
        os.unlink(raw)


# --------------------------------------------------------------------------
# Building images

def create(path, size, *opts, fmt="qcow2", backing=None, backing_fmt=None,
           unsafe=False, extra=()):
    """qemu-img create; opts are "key=value" strings joined into -o."""
    args = ["create", "-q", "-f", fmt]
    if opts:
        args += ["-o", ",".join(opts)]
    if backing is not None:
        args += ["-b", str(backing)]
        if backing_fmt is not None:
            args += ["-F", backing_fmt]
    if unsafe:
        args.append("-u")
    args += list(extra)
    args += [str(path)]
    if size is not None:
        args.append(str(size))
    qemu_img(*args)
    return path


def write(img, *cmds, fmt="qcow2", extra=()):
    """Run qemu-io commands (strings) on img; fail the test on any error."""
    if not cmds:
        return
    p = qemu_io(img, *cmds, fmt=fmt, extra=extra)
    # qemu-io reports command errors on stdout/stderr but exits 0.
    out = p.stdout + p.stderr
    for bad in ("failed", "error", "Error"):
        assert bad not in out, "qemu-io: %s" % out
    return p


def write_patterns(img, items, fmt="qcow2", extra=()):
    """items: (pattern, offset, length[, flags]) -> qemu-io write commands.

    flags is a string of qemu-io write options, e.g. "-c" or "-z".
    A pattern of None writes zeros with -z.
    """
    cmds = []
    for it in items:
        pat, off, ln = it[:3]
        flags = it[3] if len(it) > 3 else ""
        if pat is None:
            cmds.append("write -z %s %d %d" % (flags, off, ln))
        else:
            cmds.append("write %s -P 0x%02x %d %d" % (flags, pat, off, ln))
    write(img, *cmds, fmt=fmt, extra=extra)


def text_like(size, seed=1):
    """Compressible but varied bytes: words, numbers, line breaks and a few
    short random tokens (compresses to roughly a third)."""
    rnd = random.Random(seed)
    vocab = [b"qcow2", b"cluster", b"refcount", b"nbdkit", b"backing",
             b"snapshot", b"the", b"of", b"and", b"sector", b"offset",
             b"L2", b"table", b"deflate", b"zstd", b"guest", b"host",
             b"\n", b"the", b"a", b"of"]
    vocab += [b"%d" % rnd.randrange(1 << 32) for _ in range(200)]
    vocab += [rnd.randbytes(rnd.randrange(1, 12)) for _ in range(60)]
    out = b" ".join(rnd.choices(vocab, k=size // 5 + 16))
    while len(out) < size:
        out += out
    return out[:size]


def write_file(path, data):
    with open(path, "wb") as f:
        f.write(data)
    return path


def raw_from_layout(path, size, layout, seed=7):
    """A raw file of size bytes: layout is [(offset, length, kind)] with
    kind "text" (compressible), "random", or an int byte pattern.
    Unlisted ranges are sparse zeros.
    """
    with open(path, "wb") as f:
        f.truncate(size)
        for i, (off, ln, kind) in enumerate(layout):
            if kind == "text":
                data = text_like(ln, seed + i)
            elif kind == "random":
                data = random.Random(seed + i).randbytes(ln)
            else:
                data = bytes([kind]) * ln
            f.seek(off)
            f.write(data)
    return path


def convert(src, dst, *opts, src_fmt="raw", compress=False):
    args = ["convert", "-q", "-f", src_fmt, "-O", "qcow2"]
    if compress:
        args.append("-c")
    if opts:
        args += ["-o", ",".join(opts)]
    qemu_img(*args, str(src), str(dst))
    return dst


# --------------------------------------------------------------------------
# Header surgery (python, for states qemu-img cannot produce)

def read_header(path):
    with open(path, "rb") as f:
        hdr = f.read(112)
    (magic, version, backing_off, backing_size, cluster_bits, size,
     crypt, l1_size, l1_off, rt_off, rt_clusters, nb_snap,
     snap_off) = struct.unpack(">IIQIIQIIQQIIQ", hdr[:72])
    assert magic == QCOW2_MAGIC
    h = dict(version=version, backing_file_offset=backing_off,
             backing_file_size=backing_size, cluster_bits=cluster_bits,
             size=size, crypt_method=crypt, l1_size=l1_size,
             l1_table_offset=l1_off, nb_snapshots=nb_snap,
             incompatible=0, compatible=0, autoclear=0, refcount_order=4,
             header_length=72)
    if version >= 3:
        (h["incompatible"], h["compatible"], h["autoclear"],
         h["refcount_order"], h["header_length"]) = struct.unpack(
             ">QQQII", hdr[72:104])
    return h


def set_feature_bit(path, group, bit, on=True):
    """Set or clear a v3 feature bit: group is "incompatible" (byte 72),
    "compatible" (80) or "autoclear" (88)."""
    off = {"incompatible": 72, "compatible": 80, "autoclear": 88}[group]
    with open(path, "r+b") as f:
        f.seek(off)
        v = struct.unpack(">Q", f.read(8))[0]
        v = v | (1 << bit) if on else v & ~(1 << bit)
        f.seek(off)
        f.write(struct.pack(">Q", v))


def header_extensions(path):
    """[(magic, data)] of the header extension area."""
    h = read_header(path)
    csize = 1 << h["cluster_bits"]
    end = h["backing_file_offset"] or csize
    with open(path, "rb") as f:
        f.seek(h["header_length"])
        area = f.read(end - h["header_length"])
    exts, pos = [], 0
    while pos + 8 <= len(area):
        magic, ln = struct.unpack(">II", area[pos:pos + 8])
        if magic == 0:
            break
        exts.append((magic, area[pos + 8:pos + 8 + ln]))
        pos += 8 + ((ln + 7) & ~7)
    return exts


def drop_header_extension(path, magic_to_drop):
    """Rewrite the extension area without extensions of one magic."""
    h = read_header(path)
    csize = 1 << h["cluster_bits"]
    end = h["backing_file_offset"] or csize
    exts = [e for e in header_extensions(path) if e[0] != magic_to_drop]
    area = b""
    for magic, data in exts:
        area += struct.pack(">II", magic, len(data)) + data
        area += b"\0" * (-len(data) % 8)
    area += b"\0" * 8
    assert h["header_length"] + len(area) <= end
    area += b"\0" * (end - h["header_length"] - len(area))
    with open(path, "r+b") as f:
        f.seek(h["header_length"])
        f.write(area)


def drop_backing_format(path):
    """Remove the backing format extension (what an old qemu-img wrote
    without -F): the backing file's format is then probed."""
    drop_header_extension(path, EXT_BACKING_FORMAT)
    assert all(m != EXT_BACKING_FORMAT for m, _ in header_extensions(path))


# --------------------------------------------------------------------------
# QEMU's view

def qemu_raw_of(img, out, *args):
    """qemu-img convert -O raw with arbitrary source arguments."""
    qemu_img("convert", *args, "-O", "raw", str(img), str(out))
    return out


def qemu_map(img, *args):
    """qemu-img map --output=json as a list of dicts."""
    p = qemu_img("map", "--output=json", *args, str(img))
    return json.loads(p.stdout)


def qemu_range(img, offset, length, tmpdir, fmt="qcow2"):
    """Bytes [offset, offset+length) as QEMU reads them (qemu-img dd)."""
    bs = 1
    while bs < (1 << 20) and offset % (bs * 2) == 0 and length % (bs * 2) == 0:
        bs *= 2
    fd, out = tempfile.mkstemp(dir=str(tmpdir), suffix=".dd")
    os.close(fd)
    os.unlink(out)
    try:
        # qemu-img 7.2's dd counts the skipped blocks in count=.
        qemu_img("dd", "-f", fmt, "-O", "raw", "bs=%d" % bs,
                 "skip=%d" % (offset // bs),
                 "count=%d" % ((offset + length) // bs),
                 "if=" + str(img), "of=" + out)
        with open(out, "rb") as f:
            data = f.read()
    finally:
        if os.path.exists(out):
            os.unlink(out)
    assert len(data) == length
    return data


def qemu_verify_pattern(img, offset, length, pattern, fmt="qcow2"):
    """qemu-io read -P: QEMU itself sees pattern at [offset, +length)."""
    p = qemu_io(img, "read -P 0x%02x %d %d" % (pattern, offset, length),
                fmt=fmt)
    out = p.stdout + p.stderr
    assert "Pattern verification failed" not in out, out
    assert "read %d/%d bytes" % (length, length) in out, out


# --------------------------------------------------------------------------
# Comparisons

def assert_bytes_equal(got, expect, base=0, what="data"):
    if got != expect:
        assert len(got) == len(expect), "%s: length %d != %d" % (
            what, len(got), len(expect))
        first = next(i for i in range(len(got)) if got[i] != expect[i])
        pytest.fail("%s differs from qemu at offset %d (got %02x, want %02x)"
                    % (what, base + first, got[first], expect[first]))


def assert_ranges_like_raw(h, raw_path, ranges):
    """pread each (offset, length) and compare with the raw file."""
    with open(raw_path, "rb") as f:
        for off, ln in ranges:
            f.seek(off)
            assert_bytes_equal(h.pread(ln, off), f.read(ln), off,
                               "pread(%d, %d)" % (ln, off))


def serve_compare(img, raw, *params, ranges=(), readonly=True):
    """Serve img, compare the whole export and some odd ranges with raw."""
    with serve(img, *params, readonly=readonly) as srv:
        h = srv.connect()
        assert_same_as_raw(h, raw)
        if ranges:
            assert_ranges_like_raw(h, raw, ranges)
        h.shutdown()


def odd_ranges(size, cluster):
    """A handful of unaligned reads crossing cluster boundaries."""
    cands = [(0, 1), (66, 42), (cluster - 1, 2), (cluster - 7, cluster + 14),
             (3 * cluster + 511, 513), (size - 1, 1), (size - 3000, 3000),
             (size // 2 - 77, 4096 + 77)]
    return [(o, n) for o, n in cands if 0 <= o and n > 0 and o + n <= size]


# --------------------------------------------------------------------------
# Block status

ZERO = 2
HOLE = 1


def connect_meta(srv):
    """Connect to a served image with base:allocation negotiated."""
    import nbd
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(srv.uri)
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    return h


def check_extents(h, img, raw_path=None, map_args=(), zero_required=False,
                  offset=0, length=None):
    """Compare our base:allocation with qemu-img map.

    Rules:
    - where qemu says data:true we must say data (flags 0: neither hole
      nor zero);
    - anything we call zero must read as zeros (checked against raw_path
      when given);
    - with zero_required, where qemu says zero:true we must say zero too
      (a plain image has no reason to say otherwise).
    Returns our extents.
    """
    ours = extents(h, offset, length)
    end = offset + (h.get_size() - offset if length is None else length)
    assert ours[0][0] == offset and ours[-1][0] + ours[-1][1] == end
    for a, b in zip(ours, ours[1:]):
        assert a[0] + a[1] == b[0]
    qmap = [e for e in qemu_map(img, *map_args)
            if e["start"] < end and e["start"] + e["length"] > offset]

    def ours_over(s, ln):
        for o, n, fl in ours:
            if o < s + ln and o + n > s:
                yield max(o, s), min(o + n, s + ln), fl

    for e in qmap:
        s, ln = max(e["start"], offset), min(e["start"] + e["length"], end)
        ln -= s
        for a, b, fl in ours_over(s, ln):
            if e["data"]:
                assert fl == 0, (
                    "qemu says data at [%d, %d) but we report flags %d"
                    % (a, b, fl))
            if zero_required and e["zero"]:
                assert fl & ZERO, (
                    "qemu says zero at [%d, %d) but we report flags %d"
                    % (a, b, fl))
    if raw_path is not None:
        with open(raw_path, "rb") as f:
            for o, n, fl in ours:
                if fl & ZERO:
                    f.seek(o)
                    pos = 0
                    while pos < n:
                        k = min(n - pos, 8 << 20)
                        chunk = f.read(k)
                        assert chunk == bytes(k), (
                            "we report zero at [%d, %d) but it reads data"
                            % (o, o + n))
                        pos += k
    return ours


# --------------------------------------------------------------------------
# Running nbdkit directly (for fd/stdin passphrases and --run)

def nbdkit_run(image, *params, run_cmd, stdin=None, pass_fds=(),
               timeout=60):
    """nbdkit -r -U - (the engine on image) params --run run_cmd; returns
    CompletedProcess (text)."""
    cmd = ["nbdkit", "-r", "-U", "-", *engine_args(image, params, True),
           "--run", run_cmd]
    return subprocess.run(cmd, text=True, stdin=stdin, pass_fds=pass_fds,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=nbdkit_env(), timeout=timeout)


def nbdcopy_export(image, out, *params, stdin=None, pass_fds=()):
    """Copy the whole export to out with nbdcopy; returns the process."""
    p = nbdkit_run(image, *params,
                   run_cmd="nbdcopy \"$uri\" %s" % str(out),
                   stdin=stdin, pass_fds=pass_fds)
    assert p.returncode == 0, "nbdkit/nbdcopy failed: %s" % p.stderr
    return p


def assert_files_equal(a, b):
    sa, sb = os.path.getsize(a), os.path.getsize(b)
    assert sa == sb, "%s: %d bytes, %s: %d bytes" % (a, sa, b, sb)
    with open(a, "rb") as fa, open(b, "rb") as fb:
        off = 0
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if not x:
                return
            assert_bytes_equal(x, y, off, "%s vs %s" % (a, b))
            off += len(x)


# --------------------------------------------------------------------------
# Encryption

def secret_args(passphrase, sid="s0"):
    # QEMU's option syntax doubles commas inside a value.
    return ["--object", "secret,id=%s,data=%s"
            % (sid, passphrase.replace(",", ",,"))]


def luks_create(path, size, passphrase, *opts, backing=(), tries=40):
    """Create a LUKS-encrypted qcow2 image (size None: the backing file's,
    given as qemu-img arguments in backing).  qemu-img's PBKDF2 benchmark
    fails now and then on small VMs ("Unable to get accurate CPU usage"):
    retry."""
    o = ["encrypt.format=luks", "encrypt.key-secret=s0",
         "encrypt.iter-time=10", *opts]
    size_arg = [] if size is None else [str(size)]
    last = None
    for _ in range(tries):
        p = qemu_img("create", "-q", "-f", "qcow2", *secret_args(passphrase),
                     "-o", ",".join(o), *backing, str(path), *size_arg,
                     check=False)
        if p.returncode == 0:
            return path
        last = p.stderr
        if os.path.exists(path):
            os.unlink(path)
        time.sleep(0.1)
    pytest.fail("qemu-img create (luks) failed %d times: %s" % (tries, last))


def image_opts(img, passphrase_id="s0"):
    return "driver=qcow2,file.filename=%s,encrypt.key-secret=%s" % (
        img, passphrase_id)


def crypt_write(img, passphrase, *cmds):
    args = ["qemu-io", *secret_args(passphrase), "--image-opts",
            image_opts(img)]
    for c in cmds:
        args += ["-c", c]
    p = run(*args)
    out = p.stdout + p.stderr
    assert "failed" not in out and "rror" not in out, out
    return p


def crypt_raw(img, passphrase, out):
    qemu_img("convert", *secret_args(passphrase), "--image-opts",
             image_opts(img), "-O", "raw", str(out))
    return out


# --------------------------------------------------------------------------
# Reading the mapping directly (to check that an image has the shape a test
# wants: compressed clusters sharing sectors, subcluster bitmaps, ...)

L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1


def l2_entries(path):
    """[(guest_offset, entry, bitmap)] for every non-zero active L2 entry
    (bitmap is 0 without extended L2)."""
    h = read_header(path)
    cbits = h["cluster_bits"]
    csize = 1 << cbits
    ext = bool(h["incompatible"] & 16)
    esize = 16 if ext else 8
    n = csize // esize
    out = []
    with open(path, "rb") as f:
        f.seek(h["l1_table_offset"])
        l1 = struct.unpack(">%dQ" % h["l1_size"], f.read(8 * h["l1_size"]))
        for i, l1e in enumerate(l1):
            l2 = l1e & L2E_OFFSET_MASK
            if not l2:
                continue
            f.seek(l2)
            table = f.read(csize)
            for j in range(n):
                e, = struct.unpack(">Q", table[j * esize:j * esize + 8])
                b = struct.unpack(">Q", table[j * esize + 8:j * esize + 16])[0] \
                    if ext else 0
                if e or b:
                    out.append(((i * n + j) << cbits, e, b))
    return out


def compressed_clusters(path):
    """[(guest_offset, host_byte_offset, nb_sectors)] of compressed
    clusters."""
    cbits = read_header(path)["cluster_bits"]
    shift = 62 - (cbits - 8)
    mask = (1 << (cbits - 8)) - 1
    out = []
    for g, e, _ in l2_entries(path):
        if e & OFLAG_COMPRESSED:
            out.append((g, e & ((1 << shift) - 1), ((e >> shift) & mask) + 1))
    return out


def shared_sectors(path):
    """How many compressed clusters start in the middle of a 512-byte
    sector, i.e. share their first sector with the previous one (QEMU packs
    compressed clusters at byte granularity)."""
    return sum(1 for _, off, _ in compressed_clusters(path) if off % 512)
