"""Hostile images: every header field at absurd values, corrupt tables and
entries, truncated files (reference/qcow2-format.md sections 10 and 12).

Two kinds of expected behaviour:
- a bad header or table that is read at open: the server refuses to start,
  exits with a plain failure (not a signal), and prints ONE error line that
  names the field and its value, in QEMU's words where QEMU has some;
- bad data-path metadata (L1, L2, compressed descriptors): the server
  starts, a request touching the bad entry fails with EIO (the server log
  names the entry), and every other request still succeeds with the right
  data.
Never a crash, a hang or a sanitizer report.  Requests use libnbd's async
API with deadlines, so a hung server fails the test instead of stalling it.
The server runs read-only (nbdkit -r) except in the test_rw_* cases, which
check that hostile metadata cannot steer writes (file growth, overlaps).

Images are built once per module with qemu-img/qemu-io and then poked
with crafted.Qcow2.
"""

import contextlib
import errno
import os
import random
import shutil
import struct
import time

import nbd
import pytest

import crafted as C
import conftest
from conftest import PLUGIN, nbdkit_server, qemu_img, qemu_raw, start_fails

MiB = 1 << 20
TIMEOUT = 30

SANITIZER_MARKS = ("AddressSanitizer", "LeakSanitizer", "runtime error:",
                   "UndefinedBehaviorSanitizer", "ThreadSanitizer")


def no_sanitizer_report(text):
    for m in SANITIZER_MARKS:
        assert m not in text, "sanitizer report:\n" + text


@contextlib.contextmanager
def serve(image, *params):
    """conftest.serve, read-only (nbdkit -r): these tests are about reading
    hostile images, and a read-write connection would make the plugin
    enable writing, which refuses corrupt or dirty images and would change
    the file under test.  The server must not die of a signal other than
    our SIGTERM.
    """
    with nbdkit_server([PLUGIN, "file=" + str(image), *params],
                       readonly=True) as srv:
        yield srv
    rc = srv.process.returncode
    assert rc is not None and rc >= -15, "nbdkit died of signal %d" % -rc


# --------------------------------------------------------------------------
# Base images, built once per module

class Base:
    """A pristine image, its QEMU reading, and notes on its layout."""

    def __init__(self, path, raw, **notes):
        self.path = path
        self.raw = None
        if raw:
            with open(raw, "rb") as f:
                self.raw = f.read()
            os.unlink(raw)
        self.__dict__.update(notes)

    def copy(self, tmp_path, name="t.qcow2"):
        """A Qcow2 of a fresh copy, saving to tmp_path/name."""
        dst = tmp_path / name
        shutil.copyfile(self.path, dst)
        return C.Qcow2(dst)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    d = tmp_path_factory.mktemp("bases")
    b = {}

    # v3, 4 KiB clusters, 8 MiB: L1[0] and L1[1] have L2 tables, L1[2]
    # and L1[3] are empty.  Guest clusters: 0-1 data (host-contiguous),
    # 64k compressed, 128k zero (plain), 256k zero (preallocated), 2M-2M+8k
    # data, 3M data (the last cluster of the file).
    p = C.make_image(d / "v3.qcow2", "8M",
                     "write -P 0x11 0 8k", "write -c -P 0x22 64k 4k",
                     "write -z 128k 4k", "write -P 0x55 256k 4k",
                     "write -z 256k 4k", "write -P 0x33 2M 8k",
                     "write -P 0x44 3M 4k")
    b["v3"] = Base(p, qemu_raw(p, d))

    # v2 (compat 0.10), same geometry.
    p = C.make_image(d / "v2.qcow2", "8M", "write -P 0x11 0 8k",
                     "write -P 0x33 2M 4k", compat="0.10")
    b["v2"] = Base(p, qemu_raw(p, d))

    # Extended L2, 16 KiB clusters (512-byte subclusters).
    p = C.make_image(d / "extl2.qcow2", "8M", "write -P 0x55 0 1k",
                     "write -z 1k 512", "write -P 0x66 1M 16k",
                     "write -c -P 0x77 2M 16k", cluster_size=16384,
                     opts=["extended_l2=on"])
    b["extl2"] = Base(p, qemu_raw(p, d))

    # With an internal snapshot.
    p = C.make_image(d / "snap.qcow2", "8M", "write -P 0x11 0 8k")
    qemu_img("snapshot", "-c", "s1", p)
    C.run("qemu-io", "-f", "qcow2", "-c", "write -P 0x12 0 4k", p)
    b["snap"] = Base(p, qemu_raw(p, d))

    # External data file (kept next to the image, by absolute name).
    data = d / "data.raw"
    p = C.make_image(d / "ext.qcow2", "8M", "write -P 0x11 0 8k",
                     "write -P 0x33 2M 4k", opts=["data_file=%s" % data])
    b["datafile"] = Base(p, qemu_raw(p, d), data=data)

    # Compressed cluster written last, so it ends the file.
    p = C.make_image(d / "ctail.qcow2", "1M", "write -P 0x11 0 4k",
                     "write -c -P 0x22 64k 4k")
    b["ctail"] = Base(p, qemu_raw(p, d))
    return b


@pytest.fixture(scope="module")
def luks_base(tmp_path_factory):
    """LUKS1 as QEMU writes it by default (aes-xts-plain64, sha256, 4000
    stripes), passphrase PASS, built by crafted.make_luks_image: qemu-img
    would spend seconds timing PBKDF2.  qemu-img reads it back.
    """
    d = tmp_path_factory.mktemp("luks")
    p, luks = C.make_luks_image(d / "luks.qcow2", "PASS")
    return Base(p, None, luks=luks)


# --------------------------------------------------------------------------
# Helpers

def refused(path, *expect, params=(), lines=1):
    """The server refuses the image with one error line containing every
    string in expect (lines=2 allows a second line of context after it).
    Returns that line.
    """
    rc, err = start_fails(path, *params)
    no_sanitizer_report(err)
    assert rc >= 0, "nbdkit killed by signal %d:\n%s" % (-rc, err)
    assert rc != 0, "nbdkit accepted the image:\n" + err
    lines_ = [l for l in err.splitlines() if "error" in l]
    assert 1 <= len(lines_) <= lines, \
        "expected %d error line(s):\n%s" % (lines, err)
    lines = lines_
    for e in expect:
        assert e in lines[0], "%r not in %r" % (e, lines[0])
    return lines[0]


def wait(h, cookie, what):
    deadline = time.monotonic() + TIMEOUT
    while not h.aio_command_completed(cookie):
        if time.monotonic() > deadline:
            pytest.fail("%s: no reply in %d s" % (what, TIMEOUT))
        h.poll(200)


def pread(h, n, off):
    buf = nbd.Buffer(n)
    wait(h, h.aio_pread(buf, off), "read of %d at %d" % (n, off))
    return buf.to_bytearray()


def errno_of(e):
    """nbd.Error.errno is a name ("EIO") in some libnbd versions."""
    v = e.errno
    return getattr(errno, v) if isinstance(v, str) else v


def pread_fails(h, n, off, err=errno.EIO):
    with pytest.raises(nbd.Error) as e:
        pread(h, n, off)
    assert errno_of(e.value) == err, e.value


def block_status(h, n, off):
    out = []

    def cb(meta, o, entries, e):
        out.extend(entries)
        return 0
    wait(h, h.aio_block_status(n, off, cb), "block status at %d" % off)
    return out


def connect(srv):
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(srv.uri)
    return h


class Served:
    """Serve an image; check reads against expected bytes."""

    def __init__(self, srv, h, expect):
        self.srv, self.h, self.expect = srv, h, expect

    def good(self, off, n):
        data = pread(self.h, n, off)
        if self.expect is not None:
            assert data == self.expect[off:off + n], \
                "wrong data at %d+%d" % (off, n)

    def bad(self, off, n, *log):
        pread_fails(self.h, n, off)
        text = self.srv.stderr
        for s in log:
            assert s in text, "%r not in server log:\n%s" % (s, text)


class served:
    def __init__(self, path, expect=None, params=()):
        self.path, self.expect, self.params = path, expect, params

    def __enter__(self):
        self.cm = serve(self.path, *self.params)
        srv = self.cm.__enter__()
        h = connect(srv)
        self.s = Served(srv, h, self.expect)
        return self.s

    def __exit__(self, *exc):
        try:
            if exc[0] is None:
                # Still alive and well after whatever went before.
                pread(self.s.h, 512, 0 if self.expect is None else
                      self.s.h.get_size() - 512)
                no_sanitizer_report(self.s.srv.stderr)
            self.s.h.shutdown()
        finally:
            self.cm.__exit__(*exc)


def reads_like_qemu(path, tmp_path):
    """The image opens and reads exactly what qemu-img convert reads."""
    raw = qemu_raw(path, tmp_path)
    with open(raw, "rb") as f:
        expect = f.read()
    os.unlink(raw)
    with served(path, expect) as s:
        size = s.h.get_size()
        assert size == len(expect)
        for off in range(0, size, 2 * MiB):
            s.good(off, min(2 * MiB, size - off))


# --------------------------------------------------------------------------
# Header fields refused at open (H1-H3, H5, H8, H10-H14)

def setter(**fields):
    def f(q):
        for k, v in fields.items():
            q.set(k, v)
    return f


def feature(group, bit):
    return lambda q: q.set_feature(group, bit)


def compose(*fs):
    def f(q):
        for g in fs:
            g(q)
    return f


HEADER_REFUSALS = [
    # H1
    ("magic", setter(magic=0x514649fc), ["Image is not in qcow2 format"]),
    ("magic-zero", setter(magic=0), ["Image is not in qcow2 format"]),
    ("version-1", setter(version=1), ["Unsupported qcow2 version 1"]),
    ("version-4", setter(version=4), ["Unsupported qcow2 version 4"]),
    ("version-max", setter(version=0xffffffff),
     ["Unsupported qcow2 version 4294967295"]),
    # H2
    ("cluster_bits-8", setter(cluster_bits=8),
     ["Unsupported cluster size: 2^8"]),
    ("cluster_bits-22", setter(cluster_bits=22),
     ["Unsupported cluster size: 2^22"]),
    ("cluster_bits-ff", setter(cluster_bits=0xff),
     ["Unsupported cluster size: 2^255"]),
    ("cluster_bits-0", setter(cluster_bits=0),
     ["Unsupported cluster size: 2^0"]),
    ("cluster_bits-huge", setter(cluster_bits=0xffffffff),
     ["Unsupported cluster size: 2^4294967295"]),
    # H3
    ("header_length-ffffffff", setter(header_length=0xffffffff),
     ["qcow2 header exceeds cluster size", "header_length 4294967295"]),
    ("header_length-7fffffff", setter(header_length=0x7fffffff),
     ["qcow2 header exceeds cluster size", "header_length 2147483647"]),
    ("header_length-cluster+8", setter(header_length=4096 + 8),
     ["qcow2 header exceeds cluster size", "header_length 4104"]),
    ("header_length-72", setter(header_length=72),
     ["qcow2 header too short", "header_length 72"]),
    ("header_length-103", setter(header_length=103),
     ["qcow2 header too short", "header_length 103"]),
    ("header_length-0", setter(header_length=0),
     ["qcow2 header too short", "header_length 0"]),
    # virtual size
    ("size-2^63", setter(size=1 << 63), ["virtual size", "too large"]),
    ("size-max", setter(size=0xffffffffffffffff),
     ["virtual size 18446744073709551615 too large"]),
    # H5: named in QEMU's words, hex mask of the bit
    ("incompat-bit5", feature("incompatible", 5),
     ["Unsupported qcow2 feature(s): Unknown incompatible feature: 20"]),
    ("incompat-bit63", feature("incompatible", 63),
     ["Unknown incompatible feature: 8000000000000000"]),
    ("incompat-all-unknown", setter(incompatible_features=0xffffffffffffffe0),
     ["Unknown incompatible feature: 20"]),
    # H8
    ("compression-bit-without-field",
     compose(setter(header_length=104), feature("incompatible", 3)),
     ["Compression type incompatible feature bit must not be set"]),
    ("compression-bit-with-zlib", feature("incompatible", 3),
     ["Compression type incompatible feature bit must not be set"]),
    ("compression-field-without-bit", setter(compression_type=1),
     ["Compression type incompatible feature bit must be set"]),
    ("compression-type-2",
     compose(setter(compression_type=2), feature("incompatible", 3)),
     ["unknown compression type: 2"]),
    ("compression-type-ff",
     compose(setter(compression_type=0xff), feature("incompatible", 3)),
     ["unknown compression type: 255"]),
    # H10
    ("refcount_order-7", setter(refcount_order=7),
     ["Reference count entry width too large", "refcount_order 7"]),
    ("refcount_order-max", setter(refcount_order=0xffffffff),
     ["refcount_order 4294967295"]),
    # H11
    ("reftable-offset-unaligned",
     setter(refcount_table_offset=0x1234567890abcdef),
     ["Reference count table offset invalid: 0x1234567890abcdef"]),
    ("reftable-offset-unaligned-small", setter(refcount_table_offset=0x1200),
     ["Reference count table offset invalid: 0x1200"]),
    ("reftable-offset-huge", setter(refcount_table_offset=0xffffffffffff0000),
     ["0xffffffffffff0000"]),
    ("reftable-offset-past-eof", setter(refcount_table_offset=0x100000),
     ["reference count table at 0x100000 extends past the end of the file"]),
    ("reftable-offset-0", setter(refcount_table_offset=0),
     ["Reference count table offset invalid: 0"]),
    ("reftable-clusters-0", setter(refcount_table_clusters=0),
     ["Image does not contain a reference count table"]),
    ("reftable-clusters-ffffffff", setter(refcount_table_clusters=0xffffffff),
     ["Reference count table too large (4294967295 clusters)"]),
    ("reftable-clusters-20001", setter(refcount_table_clusters=0x00020001),
     ["Reference count table too large (131073 clusters)"]),
    ("reftable-clusters-past-eof", setter(refcount_table_clusters=100),
     ["reference count table at 0x1000 extends past the end of the file"]),
    # H12
    ("l1_size-ffffffff", setter(l1_size=0xffffffff),
     ["Active L1 table too large", "l1_size 4294967295"]),
    ("l1_size-7fffffff", setter(l1_size=0x7fffffff),
     ["Active L1 table too large", "l1_size 2147483647"]),
    ("l1_size-too-small", setter(l1_size=1),
     ["L1 table is too small", "l1_size 1"]),
    ("l1_size-0", setter(l1_size=0), ["L1 table is too small", "l1_size 0"]),
    ("l1_size-past-eof", setter(l1_size=0x100000),
     ["L1 table at 0x3000 (1048576 entries) extends past the end of the "
      "file"]),
    ("l1-offset-unaligned", setter(l1_table_offset=0x3200),
     ["Active L1 table offset invalid: 0x3200"]),
    ("l1-offset-7fffffffffff0000", setter(l1_table_offset=0x7fffffffffff0000),
     ["L1 table at 0x7fffffffffff0000", "extends past the end of the file"]),
    ("l1-offset-max", setter(l1_table_offset=0xfffffffffffff000),
     ["0xfffffffffffff000"]),
    ("l1-offset-0", setter(l1_table_offset=0),
     ["Active L1 table offset invalid: 0"]),
    # H13 (header side)
    ("nb_snapshots-ffffffff", setter(nb_snapshots=0xffffffff),
     ["Snapshot table too large (4294967295 snapshots)"]),
    ("nb_snapshots-7fffffff", setter(nb_snapshots=0x7fffffff),
     ["Snapshot table too large (2147483647 snapshots)"]),
    ("nb_snapshots-65537", setter(nb_snapshots=65537),
     ["Snapshot table too large (65537 snapshots)"]),
    ("snapshots_offset-unaligned", setter(nb_snapshots=1,
                                          snapshots_offset=0x1234),
     ["Snapshot table offset invalid: 0x1234"]),
    ("snapshots_offset-huge", setter(nb_snapshots=1,
                                     snapshots_offset=0xffffffffffff0000),
     ["Snapshot table offset invalid: 0xffffffffffff0000"]),
    ("snapshots_offset-0", setter(nb_snapshots=1, snapshots_offset=0),
     ["Snapshot table offset invalid: 0"]),
    # H14
    ("backing-offset-max", setter(backing_file_offset=0xffffffffffffffff,
                                  backing_file_size=4),
     ["Invalid backing file offset 0xffffffffffffffff"]),
    ("backing-offset-past-cluster0", setter(backing_file_offset=4096 + 8,
                                            backing_file_size=4),
     ["Invalid backing file offset 0x1008"]),
    ("backing-size-ffffffff", setter(backing_file_offset=0x800,
                                     backing_file_size=0xffffffff),
     ["Backing file name too long (4294967295 bytes)"]),
    ("backing-size-1024", setter(backing_file_offset=0x200,
                                 backing_file_size=1024),
     ["Backing file name too long (1024 bytes)"]),
    ("backing-name-past-cluster0", setter(backing_file_offset=4096 - 16,
                                          backing_file_size=100),
     ["Backing file name too long (100 bytes)"]),
    # E1
    ("ext-len-7fffffff", lambda q: q.add_ext(0x12345678, b"", 0x7fffffff),
     ["Header extension too large"]),
    ("ext-len-past-area", lambda q: q.add_ext(0x12345678, b"", 4096),
     ["Header extension too large"]),
    ("ext-len-past-backing-name",
     compose(lambda q: q.poke(0x400, b"backing.img"),
             setter(backing_file_offset=0x400, backing_file_size=11),
             lambda q: q.add_ext(0x12345678, b"x" * 8, 0x800)),
     ["Header extension too large"]),
    ("ext-header-past-area", setter(header_length=4096 - 4),
     ["Header extension too large"]),
    ("backing-format-too-long",
     lambda q: q.add_ext(C.EXT_BACKING_FORMAT, b"q" * 16),
     ["backing format extension: length 16 too large"]),
    # E3
    ("crypto-ext-without-luks",
     lambda q: q.add_ext(C.EXT_CRYPTO, C.crypto_ext(0x1000, 0x1000)),
     ["CRYPTO header extension only expected with LUKS encryption method"]),
    ("crypto-ext-length-8",
     compose(setter(crypt_method=2),
             lambda q: q.add_ext(C.EXT_CRYPTO, b"\0" * 8)),
     ["CRYPTO header extension size 8, but expected size 16"]),
    ("crypto-ext-length-7fffffff",
     compose(setter(crypt_method=2),
             lambda q: q.add_ext(C.EXT_CRYPTO, b"", 0x7fffffff)),
     ["Header extension too large"]),
    ("crypto-ext-unaligned",
     compose(setter(crypt_method=2),
             lambda q: q.add_ext(C.EXT_CRYPTO, C.crypto_ext(0x1200, 0x1000))),
     ["CRYPTO header extension: invalid offset 0x1200"]),
    ("crypto-ext-offset-0",
     compose(setter(crypt_method=2),
             lambda q: q.add_ext(C.EXT_CRYPTO, C.crypto_ext(0, 0x1000))),
     ["CRYPTO header extension: invalid offset 0"]),
    ("crypto-ext-past-eof",
     compose(setter(crypt_method=2),
             lambda q: q.add_ext(C.EXT_CRYPTO,
                                 C.crypto_ext(0x1000, 0xffffffffffff0000))),
     ["CRYPTO header extension: invalid offset 0x1000 length "
      "0xffffffffffff0000"]),
    ("luks-without-crypto-ext", setter(crypt_method=2),
     ["LUKS encryption without a CRYPTO header extension"]),
    ("crypt_method-3", setter(crypt_method=3),
     ["Unsupported encryption method: 3"]),
    ("crypt_method-max", setter(crypt_method=0xffffffff),
     ["Unsupported encryption method: 4294967295"]),
    # E4
    ("bitmaps-ext-length-23",
     lambda q: q.add_ext(C.EXT_BITMAPS, b"\0" * 23),
     ["bitmaps extension: invalid length 23"]),
    ("bitmaps-ext-length-7fffffff",
     lambda q: q.add_ext(C.EXT_BITMAPS, b"", 0x7fffffff),
     ["Header extension too large"]),
    ("bitmaps-ext-reserved",
     compose(feature("autoclear", 0),
             lambda q: q.add_ext(C.EXT_BITMAPS,
                                 C.bitmaps_ext(1, 1, 64, 0x10000))),
     ["bitmaps extension: reserved field is not zero"]),
    ("bitmaps-ext-nb-0",
     compose(feature("autoclear", 0),
             lambda q: q.add_ext(C.EXT_BITMAPS,
                                 C.bitmaps_ext(0, 0, 64, 0x10000))),
     ["bitmaps extension: invalid number of bitmaps 0"]),
    ("bitmaps-ext-nb-65536",
     compose(feature("autoclear", 0),
             lambda q: q.add_ext(C.EXT_BITMAPS,
                                 C.bitmaps_ext(65536, 0, 64, 0x10000))),
     ["bitmaps extension: invalid number of bitmaps 65536"]),
    ("bitmaps-ext-dir-unaligned",
     compose(feature("autoclear", 0),
             lambda q: q.add_ext(C.EXT_BITMAPS,
                                 C.bitmaps_ext(1, 0, 64, 0x10001))),
     ["bitmaps extension: directory offset 0x10001 unaligned"]),
    ("bitmaps-ext-dir-too-large",
     compose(feature("autoclear", 0),
             lambda q: q.add_ext(C.EXT_BITMAPS,
                                 C.bitmaps_ext(1, 0, (64 << 20) + 1,
                                               0x10000))),
     ["bitmaps extension: directory size 67108865 too large"]),
    # E5
    ("data-file-bit-without-name", feature("incompatible", 2),
     ["external data file but names none"]),
    ("data-raw-without-data-file", feature("autoclear", 1),
     ["data-file-raw requires a data file"]),
    ("data-file-protocol",
     compose(feature("incompatible", 2),
             lambda q: q.add_ext(C.EXT_DATA_FILE, b"nbd://example.com/x")),
     ["data file name 'nbd://example.com/x' is not a plain path"]),
    ("data-file-json",
     compose(feature("incompatible", 2),
             lambda q: q.add_ext(C.EXT_DATA_FILE,
                                 b'json:{"file.filename":"/etc/passwd"}')),
     ["is not a plain path"]),
    ("data-file-empty-name",
     compose(feature("incompatible", 2),
             lambda q: q.add_ext(C.EXT_DATA_FILE, b"")),
     ["empty data file name"]),
    ("data-file-missing",
     compose(feature("incompatible", 2),
             lambda q: q.add_ext(C.EXT_DATA_FILE, b"no-such-file.raw")),
     ["could not open data file", "no-such-file.raw"]),
]


@pytest.mark.parametrize("name,poke,expect", HEADER_REFUSALS,
                         ids=[r[0] for r in HEADER_REFUSALS])
def test_header_refused(bases, tmp_path, name, poke, expect):
    q = bases["v3"].copy(tmp_path)
    poke(q)
    refused(q.save(), *expect)


def test_incompat_bit_named_from_feature_table(bases, tmp_path):
    """H5: the image's own feature-name table names the unknown bit."""
    q = bases["v3"].copy(tmp_path)
    q.set_feature("incompatible", 5)
    q.set_feature("incompatible", 40)
    q.add_ext(C.EXT_FEATURE_TABLE,
              C.feature_name_entry(0, 0, "dirty bit") +
              C.feature_name_entry(0, 5, "frobnicated clusters") +
              C.feature_name_entry(1, 40, "not this one"))
    line = refused(q.save(), "Unsupported qcow2 feature(s)",
                   "frobnicated clusters",
                   "Unknown incompatible feature: 10000000000")
    assert "not this one" not in line


def test_feature_table_name_unterminated(bases, tmp_path):
    """A 46-byte name without a NUL is cut at 46 bytes, not read past."""
    q = bases["v3"].copy(tmp_path)
    q.set_feature("incompatible", 7)
    q.add_ext(C.EXT_FEATURE_TABLE, C.feature_name_entry(0, 7, "N" * 46))
    refused(q.save(), "N" * 46)


# --------------------------------------------------------------------------
# Header values that must still open (H6, H7, H9, E2, E4 without autoclear)

ACCEPTED = [
    ("corrupt-bit", feature("incompatible", 1)),
    ("dirty-bit", feature("incompatible", 0)),
    ("unknown-compat-bits", setter(compatible_features=0xfffffffffffffffe)),
    ("unknown-autoclear-bits", setter(autoclear_features=0xfffffffffffffffc)),
    ("unknown-extension",
     lambda q: q.add_ext(0x12345678, b"unknown extension data")),
    ("many-unknown-extensions",
     lambda q: q.set_extensions([(0x1000 + i, b"") for i in range(400)])),
    ("stale-bitmaps-ext",   # autoclear bit 0 clear: ignored, even if absurd
     lambda q: q.add_ext(C.EXT_BITMAPS,
                         C.bitmaps_ext(0, 7, 1 << 40, 0x123))),
    ("feature-table-odd-length",
     lambda q: q.add_ext(C.EXT_FEATURE_TABLE, b"\0" * 50)),
    ("refcount_order-0", setter(refcount_order=0)),
    ("refcount_order-6", setter(refcount_order=6)),
    # R1/R2: refcounts are not read by a read-only open.
    ("reftable-entry-unaligned", lambda q: q.set_reftable_entry(0, 0x22a00)),
    ("reftable-entry-huge",
     lambda q: q.set_reftable_entry(0, 0x00ffffff00000000)),
    ("reftable-zeroed", lambda q: q.poke(q.get("refcount_table_offset"),
                                         b"\0" * 4096)),
    # 060: L1 entry pointing at the L1 table itself, L2 entry pointing at a
    # refcount block: read without complaint, as QEMU does.
    ("l1-entry-at-l1",
     lambda q: q.set_l1_entry(1, C.COPIED | q.get("l1_table_offset"))),
    ("l2-entry-at-refblock",
     lambda q: q.set_l2_entry(0, C.COPIED | (q.peek_be(
         q.get("refcount_table_offset"), ">Q") & C.OFFSET_MASK))),
    # M3: reserved bits in L2 entries are reported by check, not by reads.
    ("l2-entry-reserved-bits",
     lambda q: q.set_l2_entry(0, q.l2_entry(0) | 0x3f000000000001fe)),
    # M6: compressed entry with COPIED set.
    ("compressed-with-copied",
     lambda q: q.set_l2_entry(64 << 10, q.l2_entry(64 << 10) | C.COPIED)),
    # M5: sector count running past the end of the file is clipped.
    ("compressed-sectors-past-eof",
     lambda q: q.set_l2_entry(64 << 10, q.make_compressed_entry(
         q.compressed_descriptor(64 << 10)[0], 8))),
]


@pytest.mark.parametrize("name,poke", ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_accepted_reads_like_qemu(bases, tmp_path, name, poke):
    q = bases["v3"].copy(tmp_path)
    poke(q)
    reads_like_qemu(q.save(), tmp_path)


def test_compressed_past_eof_at_end_of_file(bases, tmp_path):
    """M5: the last compressed cluster with the largest sector count."""
    q = bases["ctail"].copy(tmp_path)
    host, _ = q.compressed_descriptor(64 << 10)
    q.set_l2_entry(64 << 10, q.make_compressed_entry(host, 16))
    q.save()
    with served(q.path, bases["ctail"].raw) as s:
        s.good(64 << 10, 4096)
        s.good(0, 1 * MiB)


def test_zstd_image_reads(tmp_path):
    p = C.make_image(tmp_path / "z.qcow2", "1M", "write -c -P 0x5a 0 64k",
                     opts=["compression_type=zstd"])
    reads_like_qemu(p, tmp_path)


# --------------------------------------------------------------------------
# Snapshot table (H13, 080, 261)

def test_snapshot_extra_data_too_large(bases, tmp_path):
    q = bases["snap"].copy(tmp_path)
    q.set_snapshot_field(0, "extra_data_size", 1025)
    refused(q.save(), "Too much extra metadata in snapshot table entry 0",
            "1025 bytes")


def test_snapshot_extra_data_huge(bases, tmp_path):
    q = bases["snap"].copy(tmp_path)
    q.set_snapshot_field(0, "extra_data_size", 0xffffffff)
    refused(q.save(), "Too much extra metadata in snapshot table entry 0",
            "4294967295 bytes")


def test_snapshot_count_past_table(bases, tmp_path):
    """More snapshots than the table holds: entries run past the EOF."""
    q = bases["snap"].copy(tmp_path)
    q.set("nb_snapshots", 65536)
    refused(q.save(), "snapshot table entry")


def test_snapshot_table_at_eof(bases, tmp_path):
    q = bases["snap"].copy(tmp_path)
    q.set("snapshots_offset", len(q.data))
    refused(q.save(), "Snapshot table offset invalid")


def test_snapshot_name_past_eof(bases, tmp_path):
    q = bases["snap"].copy(tmp_path)
    sn = q.snapshots()[0]
    q.truncate(sn["at"] + 64)     # cut inside the entry's id/name
    q.set_snapshot_field(0, "name_len", 0xffff)
    refused(q.save(), "snapshot table entry 0 runs past the end of the file")


def test_snapshot_table_too_big(tmp_path):
    """Entries of 131 KiB each add up past QEMU's 64 MiB table limit; the
    file is sparse.
    """
    base = tmp_path / "b.qcow2"
    C.make_image(base, "1M")
    q = C.Qcow2(base)
    entry = (40 + 65535 * 2 + 7) & ~7
    n = (64 << 20) // entry + 2
    table = 1 << 20
    q.set("nb_snapshots", n)
    q.set("snapshots_offset", table)
    hdr = struct.pack(C.SNAPSHOT_HEADER, 0, 0, 0xffff, 0xffff, 0, 0, 0, 0, 0)
    path = tmp_path / "t.qcow2"
    C.sparse_file(path, table + n * entry + 4096,
                  [(0, bytes(q.data))] +
                  [(table + i * entry, hdr) for i in range(n)])
    refused(path, "Snapshot table is too big")


def test_snapshot_bad_l1_still_serves_active(bases, tmp_path):
    """080: a snapshot's L1 is checked only when that snapshot is used."""
    q = bases["snap"].copy(tmp_path)
    q.set_snapshot_field(0, "l1_table_offset", 0x12345)
    q.set_snapshot_field(0, "l1_size", 0xffffffff)
    q.save()
    with served(q.path, bases["snap"].raw) as s:
        s.good(0, 8192)


def test_snapshot_without_extra_data(bases, tmp_path):
    """261: a v3 entry with no extra data; QEMU repairs it in check, we
    read the active image.  Either way: no crash.
    """
    q = bases["snap"].copy(tmp_path)
    q.set_snapshot_field(0, "extra_data_size", 0)
    path = q.save()
    rc, err = start_fails(path)
    no_sanitizer_report(err)
    assert rc >= 0


def test_l1_size_zero_with_snapshots(bases, tmp_path):
    q = bases["snap"].copy(tmp_path)
    q.set("l1_size", 0)
    refused(q.save(), "L1 table is too small", "l1_size 0")


# --------------------------------------------------------------------------
# Truncated files

def test_truncated_inside_fixed_header(bases, tmp_path):
    q = bases["v3"].copy(tmp_path)
    q.truncate(50)
    refused(q.save(), "file too short (50 bytes)")


def test_truncated_inside_v3_fields(bases, tmp_path):
    q = bases["v3"].copy(tmp_path)
    q.truncate(90)
    refused(q.save(), "file too short for a qcow2 v3 header")


def test_truncated_inside_extensions(bases, tmp_path):
    q = bases["v3"].copy(tmp_path)
    q.add_ext(0x12345678, b"x" * 200)
    q.truncate(q.header_length + 8 + 100)
    refused(q.save(), "header extension 0x12345678 runs past the end of the "
            "file")


def test_truncated_inside_backing_name(bases, tmp_path):
    q = bases["v3"].copy(tmp_path)
    q.poke(0x800, b"backing-file-name")
    q.set("backing_file_offset", 0x800)
    q.set("backing_file_size", 17)
    q.truncate(0x808)
    refused(q.save(), "backing file name runs past the end of the file")


def test_truncated_inside_reftable(bases, tmp_path):
    q = bases["v3"].copy(tmp_path)
    q.truncate(q.get("refcount_table_offset") + 8)
    refused(q.save(), "extends past the end of the file")


def test_truncated_inside_l1(bases, tmp_path):
    q = bases["v3"].copy(tmp_path)
    l1 = q.get("l1_table_offset")
    q.truncate(l1 + 8)
    refused(q.save(), "L1 table at %#x (4 entries) extends past the end of "
            "the file" % l1)


def test_truncated_inside_l2(bases, tmp_path):
    """Both L2 tables are gone: reads under them fail, the rest reads."""
    b = bases["v3"]
    q = b.copy(tmp_path)
    l2 = q.l1_entry(0) & C.OFFSET_MASK
    q.truncate(l2 + 100)
    q.save()
    with served(q.path, b.raw) as s:
        s.bad(0, 4096, "L2 table offset %#x" % l2, "past the end of the file")
        s.bad(2 * MiB, 4096)
        s.good(4 * MiB, 4 * MiB)


def test_truncated_inside_data(bases, tmp_path):
    b = bases["v3"]
    q = b.copy(tmp_path)
    host = q.host_offset(3 * MiB)
    assert host + 4096 == len(q.data)   # the last cluster of the file
    q.truncate(host + 100)
    q.save()
    with served(q.path, b.raw) as s:
        s.bad(3 * MiB, 4096, "data cluster at host offset %#x" % host)
        s.bad(3 * MiB + 2048, 100)
        s.good(0, 2 * MiB)
        s.good(2 * MiB, 1 * MiB)
        s.good(3 * MiB + 4096, 1 * MiB - 4096)


def test_truncated_inside_compressed(bases, tmp_path):
    b = bases["ctail"]
    q = b.copy(tmp_path)
    host, _ = q.compressed_descriptor(64 << 10)
    q.truncate(host + 10)
    q.save()
    with served(q.path, b.raw) as s:
        s.bad(64 << 10, 4096, "could not decompress the cluster at guest "
              "offset 0x10000")
        s.good(0, 64 << 10)


@pytest.mark.parametrize("cut", [1, 71, 104, 4095, 4096, 4097, 12288 + 7])
def test_truncated_anywhere(bases, tmp_path, cut):
    """Any cut: a clean refusal or a server that survives every read."""
    q = bases["v3"].copy(tmp_path)
    q.truncate(cut)
    survives(q.save())


# --------------------------------------------------------------------------
# L1 / L2 entries: EIO on access, the rest keeps working (M1-M10, 080)

L1_BAD = [
    ("unaligned-42a00", 0x42a00, ["L2 table offset 0x42a00 unaligned "
                                  "(L1 index: 0)"]),
    ("past-eof", 0x100000, ["L2 table offset 0x100000 (L1 index: 0) lies past "
                            "the end of the file"]),
    ("huge", 0x00fffffffffff000, ["L2 table offset 0xfffffffffff000"]),
    ("all-bits", 0xffffffffffffffff, ["L2 table offset 0xfffffffffffe00 "
                                      "unaligned"]),
]


@pytest.mark.parametrize("name,entry,log", L1_BAD,
                         ids=[x[0] for x in L1_BAD])
def test_bad_l1_entry(bases, tmp_path, name, entry, log):
    b = bases["v3"]
    q = b.copy(tmp_path)
    q.set_l1_entry(0, entry)
    q.save()
    with served(q.path, b.raw) as s:
        s.bad(0, 4096, *log)
        s.bad(1 * MiB, 512)
        with pytest.raises(nbd.Error) as e:
            block_status(s.h, 4096, 0)
        assert errno_of(e.value) == errno.EIO
        s.good(2 * MiB, 2 * MiB)
        s.good(4 * MiB, 4 * MiB)
        # A read spanning good and bad L1 ranges fails as a whole.
        pread_fails(s.h, 8192, 2 * MiB - 4096)


L2_BAD = [
    ("unaligned-52a00", C.COPIED | 0x52a00,
     ["Cluster allocation offset 0x52a00 unaligned (L2 offset: 0x4000, L2 "
      "index: 0)"]),
    ("past-eof", C.COPIED | 0x100000,
     ["data cluster at host offset 0x100000 lies past the end of the file"]),
    ("huge-bfff", 0xbfffffffffff0000, ["past the end of the file"]),
    ("huge-8000", 0x800000ffffff0000,
     ["data cluster at host offset 0xffffff0000 lies past the end"]),
    ("zero-alloc-unaligned", 0x52a00 | C.ZERO,
     ["Cluster allocation offset 0x52a00 unaligned"]),
    ("compressed-past-eof", C.COMPRESSED | 0x100000,
     ["compressed cluster at guest offset 0 has invalid host offset "
      "0x100000"]),
    ("compressed-offset-0", C.COMPRESSED,
     ["compressed cluster at guest offset 0 has invalid host offset 0"]),
    ("compressed-garbage", C.COMPRESSED | (1 << 58) | 0x2000,
     ["could not decompress the cluster at guest offset 0 (host offset "
      "0x2000)"]),
    ("compressed-all-bits", 0x7fffffffffffffff,
     ["compressed cluster at guest offset 0 has invalid host offset"]),
]


@pytest.mark.parametrize("name,entry,log", L2_BAD,
                         ids=[x[0] for x in L2_BAD])
def test_bad_l2_entry(bases, tmp_path, name, entry, log):
    b = bases["v3"]
    q = b.copy(tmp_path)
    q.set_l2_entry(0, entry)
    q.save()
    with served(q.path, b.raw) as s:
        s.bad(0, 4096, *log)
        s.bad(100, 1)
        pread_fails(s.h, 8192, 0)       # spans into the good cluster 1
        s.good(4096, 4096)
        s.good(8192, 2 * MiB - 8192)
        s.good(2 * MiB, 6 * MiB)


def test_garbage_compressed_data(bases, tmp_path):
    b = bases["v3"]
    q = b.copy(tmp_path)
    host, nsec = q.compressed_descriptor(64 << 10)
    rnd = random.Random(1)
    q.poke(host, bytes(rnd.randrange(256) for _ in range(nsec * 512)))
    q.save()
    with served(q.path, b.raw) as s:
        s.bad(64 << 10, 4096, "could not decompress")
        s.bad((64 << 10) + 1000, 10)
        s.good(0, 64 << 10)
        s.good(68 << 10, 1 * MiB)


def test_zero_flag_in_v2_image(bases, tmp_path):
    """H4: a v2 image opens; the zero flag is fatal on access only."""
    b = bases["v2"]
    q = b.copy(tmp_path)
    q.set_l2_entry(0, q.l2_entry(0) | C.ZERO)
    q.save()
    with served(q.path, b.raw) as s:
        s.bad(0, 4096, "Zero cluster entry found in pre-v3 image (L2 offset: "
              "%#x, L2 index: 0)" % (q.l1_entry(0) & C.OFFSET_MASK))
        s.good(4096, 4096)
        s.good(2 * MiB, 4096)


def test_v2_image_reads(bases, tmp_path):
    reads_like_qemu(bases["v2"].path, tmp_path)


# Extended L2 (M7-M9)

def test_extl2_alloc_and_zero_both_set(bases, tmp_path):
    b = bases["extl2"]
    q = b.copy(tmp_path)
    q.set_l2_bitmap(0, q.l2_bitmap(0) | (1 << 32))   # sc 0: alloc + zero
    q.save()
    with served(q.path, b.raw) as s:
        s.bad(0, 512, "Invalid cluster entry found (L2 offset: %#x, L2 "
              "index: 0)" % (q.l1_entry(0) & C.OFFSET_MASK))
        s.bad(8192, 512)                  # same cluster, other subcluster
        s.good(16384, 16384)
        s.good(1 * MiB, 16384)


def test_extl2_alloc_bits_on_unallocated_cluster(bases, tmp_path):
    b = bases["extl2"]
    q = b.copy(tmp_path)
    guest = 64 << 10                      # cluster 4: unallocated
    assert q.l2_entry(guest) == 0
    q.set_l2_bitmap(guest, 0x1)
    q.save()
    with served(q.path, b.raw) as s:
        s.bad(guest, 512, "Invalid cluster entry found")
        s.good(0, 16384)
        s.good(guest + 16384, 16384)


def test_extl2_unaligned_offset(bases, tmp_path):
    b = bases["extl2"]
    q = b.copy(tmp_path)
    q.set_l2_entry(0, C.COPIED | 0x52a00)
    q.save()
    with served(q.path, b.raw) as s:
        s.bad(0, 512, "Cluster allocation offset 0x52a00 unaligned")
        s.good(1 * MiB, 16384)


def test_extl2_ignored_bits_read_like_qemu(bases, tmp_path):
    """M8: compressed entry with a non-zero bitmap; M9: descriptor bit 0."""
    q = bases["extl2"].copy(tmp_path)
    q.set_l2_bitmap(2 * MiB, 0xffffffffffffffff)
    q.set_l2_entry(1 * MiB, q.l2_entry(1 * MiB) | 1)
    reads_like_qemu(q.save(), tmp_path)


def test_extl2_image_reads(bases, tmp_path):
    reads_like_qemu(bases["extl2"].path, tmp_path)


# External data file (M10)

def test_datafile_host_offset_mismatch(bases, tmp_path):
    b = bases["datafile"]
    q = b.copy(tmp_path)
    q.set_l2_entry(0, C.COPIED | 0x5000)
    q.save()
    with served(q.path, b.raw) as s:
        s.bad(0, 4096, "External data file host cluster offset 0x5000 does "
              "not match guest cluster offset: 0")
        s.good(4096, 4096)
        s.good(2 * MiB, 4096)


def test_datafile_compressed_entry(bases, tmp_path):
    b = bases["datafile"]
    q = b.copy(tmp_path)
    q.set_l2_entry(4096, C.COMPRESSED | 0x2000)
    q.save()
    with served(q.path, b.raw) as s:
        s.bad(4096, 4096, "Compressed cluster entry found in image with "
              "external data file")
        s.good(0, 4096)
        s.good(2 * MiB, 4096)


def test_datafile_reads(bases, tmp_path):
    reads_like_qemu(bases["datafile"].path, tmp_path)


# --------------------------------------------------------------------------
# LUKS header (the crypto extension points at it): every field validated
# before use.  The engine adds a second line naming the image.

def luks_field(off, fmt, value):
    return lambda q, at: q.poke_be(at + off, fmt, value)


def luks_bytes(off, data):
    return lambda q, at: q.poke(at + off, data)


SLOT0 = 208
LUKS_REFUSALS = [
    ("magic", luks_bytes(0, b"LUKS\xba\xbf"), "LUKS: bad magic"),
    ("version-2", luks_field(6, ">H", 2),
     "LUKS: version 2 is not supported"),
    ("cipher-name-unterminated", luks_bytes(8, b"a" * 32),
     "LUKS: header field cipher_name is not nul-terminated"),
    ("cipher-twofish", luks_bytes(8, b"twofish\0"),
     'LUKS: cipher "twofish" is not supported'),
    ("cipher-mode-ecb", luks_bytes(40, b"ecb\0"),
     'LUKS: cipher mode "ecb" is not supported'),
    ("ivgen-unknown", luks_bytes(40, b"xts-benbi\0"),
     'IV generator "benbi"'),
    ("hash-md5", luks_bytes(72, b"md5\0"),
     'LUKS: hash_spec hash "md5" is not supported'),
    ("key-bytes-max", luks_field(108, ">I", 0xffffffff),
     "LUKS: key_bytes 4294967295 does not fit cipher aes-xts"),
    ("key-bytes-0", luks_field(108, ">I", 0),
     "LUKS: key_bytes 0 does not fit"),
    ("mk-iter-0", luks_field(164, ">I", 0),
     "LUKS: invalid master key digest iteration count 0"),
    ("mk-iter-max", luks_field(164, ">I", 0xffffffff),
     "LUKS: invalid master key digest iteration count 4294967295"),
    ("slot-state", luks_field(SLOT0, ">I", 0x12345678),
     "LUKS: key slot 0 has invalid state 0x12345678"),
    ("slot-iter-0", luks_field(SLOT0 + 4, ">I", 0),
     "LUKS: key slot 0 has invalid iteration count 0"),
    ("slot-stripes-0", luks_field(SLOT0 + 44, ">I", 0),
     "LUKS: key slot 0 has invalid stripes 0"),
    ("slot-stripes-huge", luks_field(SLOT0 + 44, ">I", 0xffffffff),
     "LUKS: key slot 0 has invalid stripes 4294967295"),
    ("slot-km-in-header", luks_field(SLOT0 + 40, ">I", 0),
     "LUKS: key slot 0 key material overlaps the LUKS header"),
    ("slot-km-past-area", luks_field(SLOT0 + 40, ">I", 0xffffffff),
     "LUKS: key slot 0 key material [2199023255040, +256000) lies outside "
     "the LUKS area"),
    ("slot-km-overlap",
     lambda q, at: (q.poke_be(at + SLOT0 + 48, ">I", 0x00AC71F3),
                    q.poke_be(at + SLOT0 + 48 + 4, ">I", 1000),
                    q.poke_be(at + SLOT0 + 48 + 40, ">I", 100),
                    q.poke_be(at + SLOT0 + 48 + 44, ">I", 100)),
     "LUKS: key slot 1 key material overlaps key slot 0"),
    ("no-active-slot", luks_field(SLOT0, ">I", 0xdead),
     "LUKS: no key slot is enabled"),
    ("digest-mismatch", luks_bytes(112, b"\0" * 20),
     "LUKS: the passphrase does not unlock any key slot"),
]


@pytest.mark.parametrize("name,poke,expect", LUKS_REFUSALS,
                         ids=[x[0] for x in LUKS_REFUSALS])
def test_luks_header_refused(luks_base, tmp_path, name, poke, expect):
    b = luks_base
    q = b.copy(tmp_path)
    poke(q, b.luks)
    refused(q.save(), expect, params=["passphrase=PASS"], lines=2)


def test_luks_area_too_small(luks_base, tmp_path):
    b = luks_base
    q = b.copy(tmp_path)
    q.set_extensions([(C.EXT_CRYPTO, C.crypto_ext(b.luks, 591))])
    refused(q.save(), "LUKS: area of 591 bytes is too small for a LUKS "
            "header", params=["passphrase=PASS"], lines=2)


def test_luks_wrong_and_missing_passphrase(luks_base, tmp_path):
    path = luks_base.path
    refused(path, "LUKS: the passphrase does not unlock any key slot",
            params=["passphrase=WRONG"], lines=2)
    refused(path, "the image is encrypted: give its passphrase")


def test_luks_opens(luks_base, tmp_path):
    with served(luks_base.path, params=["passphrase=PASS"]) as s:
        assert s.h.get_size() == 1 * MiB
        s.good(0, 1 * MiB)


# --------------------------------------------------------------------------
# Read-write connections on hostile images: enabling writes reads the
# refcount and snapshot tables; writes meet hostile L2 entries.  Found by
# tests/fuzz/fuzz_write.

def rw_connect(srv):
    h = nbd.NBD()
    h.connect_uri(srv.uri)
    return h


def pwrite_result(h, data, off):
    """None on success, else the errno."""
    try:
        wait(h, h.aio_pwrite(data, off), "write at %d" % off)
        wait(h, h.aio_flush(), "flush")
    except nbd.Error as e:
        return errno_of(e)
    return None


def test_rw_snapshot_l1_size_huge(bases, tmp_path):
    """A snapshot L1 of 0xffffffff entries (never used) must not make
    enabling writes enter 32 GiB of clusters in the overlap set.
    """
    q = bases["snap"].copy(tmp_path)
    q.set_snapshot_field(0, "l1_size", 0xffffffff)
    q.set_snapshot_field(0, "l1_table_offset", 0xfffffffffffff000)
    q.save()
    with conftest.serve(q.path) as srv:
        h = rw_connect(srv)
        assert pwrite_result(h, b"\x77" * 4096, 4096) is None
        assert pread(h, 4096, 4096) == b"\x77" * 4096
        h.shutdown()


def test_rw_cow_of_cluster_past_eof(bases, tmp_path):
    """Copy-on-write of a shared (no COPIED) cluster that a hostile L2
    entry puts at 56 GiB: releasing it must not create refcount
    structures out there.
    """
    q = bases["v3"].copy(tmp_path)
    q.set_l2_entry(3 * MiB, 0xe00000000)
    q.save()
    size = os.path.getsize(q.path)
    with conftest.serve(q.path) as srv:
        h = rw_connect(srv)
        pwrite_result(h, b"\x66" * 4096, 3 * MiB)   # EIO allowed
        h.shutdown()
        no_sanitizer_report(srv.stderr)
    assert os.path.getsize(q.path) < size + 4 * MiB


def test_rw_in_place_write_past_eof(bases, tmp_path):
    """An owned (COPIED) cluster past the end of the file: EIO, as for
    reads, not a write that extends the file to 2^40.
    """
    q = bases["v3"].copy(tmp_path)
    q.set_l2_entry(3 * MiB, C.COPIED | (1 << 40))
    q.save()
    size = os.path.getsize(q.path)
    with conftest.serve(q.path) as srv:
        h = rw_connect(srv)
        assert pwrite_result(h, b"\x66" * 4096, 3 * MiB) == errno.EIO
        assert pwrite_result(h, b"\x67" * 4096, 0) is None
        h.shutdown()
        assert "lies past the end of the file" in srv.stderr
    assert os.path.getsize(q.path) < size + 4 * MiB


def test_rw_write_over_metadata_refused(bases, tmp_path):
    """060: an owned L2 entry pointing at the L1 table.  The write is
    refused with EIO and the image marked corrupt; reads keep working.
    """
    q = bases["v3"].copy(tmp_path)
    q.set_l2_entry(3 * MiB, C.COPIED | q.get("l1_table_offset"))
    q.save()
    with conftest.serve(q.path) as srv:
        h = rw_connect(srv)
        assert pwrite_result(h, b"\x66" * 4096, 3 * MiB) == errno.EIO
        assert pread(h, 4096, 0) == bases["v3"].raw[:4096]
        h.shutdown()
    assert C.Qcow2(q.path).get("incompatible_features") & C.INCOMPAT_CORRUPT


# --------------------------------------------------------------------------
# Random mutations: refuse cleanly or serve without crashing

def survives(path):
    """Either a clean refusal, or a server that answers every request
    (errors allowed) and is still alive afterwards.
    """
    rc, err = start_fails(path)
    no_sanitizer_report(err)
    assert rc >= 0, "nbdkit killed by signal %d:\n%s" % (-rc, err)
    if rc != 0:
        assert len([l for l in err.splitlines() if "error" in l]) >= 1, err
        return
    with serve(path) as srv:
        h = connect(srv)
        size = h.get_size()
        step = max(size // 64, 4096)
        for off in range(0, min(size, 64 * MiB), step):
            n = min(step, size - off)
            try:
                pread(h, n, off)
            except nbd.Error as e:
                assert errno_of(e) == errno.EIO, e
            try:
                block_status(h, n, off)
            except nbd.Error as e:
                assert errno_of(e) == errno.EIO, e
        h.shutdown()
        no_sanitizer_report(srv.stderr)


@pytest.mark.parametrize("seed", range(12))
def test_random_metadata_mutations(bases, tmp_path, seed):
    rnd = random.Random(seed)
    kind = ["v3", "v2", "extl2", "snap"][seed % 4]
    q = bases[kind].copy(tmp_path)
    regions = [(0, 112), (q.get("l1_table_offset"), 32),
               (q.l1_entry(0) & C.OFFSET_MASK, 256)]
    if kind == "snap":
        regions.append((q.get("snapshots_offset"), 128))
    for _ in range(rnd.randrange(1, 8)):
        start, n = rnd.choice(regions)
        off = start + rnd.randrange(n)
        if rnd.random() < 0.5:
            q.data[off] ^= 1 << rnd.randrange(8)
        else:
            q.data[off] = rnd.choice([0, 0xff, 0x7f, 0x80, rnd.randrange(256)])
    survives(q.save())


# --------------------------------------------------------------------------
# Hostile bitmap directories.  Reads do not need bitmaps, so the image is
# served; but writing would either lose its bitmaps or free clusters on the
# word of a directory we cannot trust, so writing is refused (the export
# is read-only, or the first write fails) with one line saying why, and
# the file is not changed at all.

@pytest.fixture(scope="module")
def bitmap_base(tmp_path_factory):
    d = tmp_path_factory.mktemp("bitmaps")
    img = C.make_image(d / "base.qcow2", "4M", cluster_size=4096)
    for name, g in (("b0", "4096"), ("b1", "512")):
        C.run("qemu-img", "bitmap", "--add", "-g", g, img, name)
    C.run("qemu-io", "-f", "qcow2", "-c", "write -P 9 0 64k", img)
    return img


def bitmap_image(bitmap_base, tmp_path, poke):
    path = tmp_path / "a.qcow2"
    shutil.copy(bitmap_base, path)
    q = C.Qcow2(path)
    poke(q)
    return q.save()


def set_bitmaps_ext(q, nb=None, size=None, offset=None):
    """Change fields of the bitmaps extension."""
    o, sz, n = q.bitmap_directory()
    ext = C.bitmaps_ext(n if nb is None else nb, 0, sz if size is None
                        else size, o if offset is None else offset)
    q.set_extensions([(m, ext if m == C.EXT_BITMAPS else d)
                      for m, d in q.extensions()])


def first_data_table_entry(q, index):
    """Offset of bitmap index's first table entry that has a data cluster."""
    e = q.bitmap_entries()[index]
    for i in range(e["table_size"]):
        at = e["table_offset"] + 8 * i
        if q.peek_be(at, ">Q") & C.OFFSET_MASK:
            return at
    raise AssertionError("no data cluster")


BITMAP_DIRECTORY_REFUSALS = [
    ("table-offset-unaligned",
     lambda q: q.set_bitmap_field(0, "table_offset",
                                  q.bitmap_entries()[0]["table_offset"] + 8),
     "doesn't satisfy the constraints"),
    ("table-offset-0", lambda q: q.set_bitmap_field(0, "table_offset", 0),
     "doesn't satisfy the constraints"),
    ("table-past-eof",
     lambda q: q.set_bitmap_field(0, "table_offset", 1 << 40),
     "lies past the end of the file"),
    ("table-size-0", lambda q: q.set_bitmap_field(1, "table_size", 0),
     "doesn't satisfy the constraints"),
    ("table-size-absurd",
     lambda q: q.set_bitmap_field(1, "table_size", 0xffffffff),
     "doesn't satisfy the constraints"),
    ("table-size-wrong", lambda q: q.set_bitmap_field(1, "table_size", 3),
     "table has 3 entries, its size needs 1"),
    ("granularity-8", lambda q: q.set_bitmap_field(0, "granularity_bits", 8),
     "doesn't satisfy the constraints"),
    ("granularity-32",
     lambda q: q.set_bitmap_field(0, "granularity_bits", 32),
     "doesn't satisfy the constraints"),
    ("reserved-flag", lambda q: q.set_bitmap_field(0, "flags", 2 | 4),
     "doesn't satisfy the constraints"),
    ("type-2", lambda q: q.set_bitmap_field(0, "type", 2),
     "doesn't satisfy the constraints"),
    ("name-size-0", lambda q: q.set_bitmap_field(0, "name_size", 0),
     "bitmap name size 0 is invalid"),
    ("name-size-past-directory",
     lambda q: q.set_bitmap_field(1, "name_size", 1000),
     "bitmap directory is truncated"),
    ("name-with-nul",
     lambda q: q.poke(q.bitmap_entries()[0]["at"] + 24, b"\0"),
     "a bitmap name contains a NUL byte"),
    ("duplicate-names",
     lambda q: q.poke(q.bitmap_entries()[1]["at"] + 24, b"b0"),
     "two bitmaps are named 'b0'"),
    ("extra-data", lambda q: q.set_bitmap_field(0, "extra_data_size", 8),
     "bitmap extra data is not supported"),
    ("more-entries-than-header", lambda q: set_bitmaps_ext(q, nb=1),
     "More bitmaps found than specified in header extension"),
    ("fewer-entries-than-header", lambda q: set_bitmaps_ext(q, nb=3),
     "Less bitmaps found than specified in header extension"),
    ("directory-past-eof", lambda q: set_bitmaps_ext(q, offset=1 << 40),
     "is not inside the file"),
    ("directory-size-absurd", lambda q: set_bitmaps_ext(q, size=60 << 20),
     "is not inside the file"),
    ("table-entry-reserved-bits",
     lambda q: q.poke_be(first_data_table_entry(q, 0), ">Q",
                         q.peek_be(first_data_table_entry(q, 0), ">Q") | 2),
     "invalid table entry"),
    ("table-entry-unaligned",
     lambda q: q.poke_be(first_data_table_entry(q, 1), ">Q",
                         q.peek_be(first_data_table_entry(q, 1), ">Q")
                         + 0x200),
     "invalid table entry"),
    ("table-entry-past-eof",
     lambda q: q.poke_be(first_data_table_entry(q, 1), ">Q", 1 << 40),
     "invalid table entry"),
]


def assert_not_written(path, before, srv, expect, readonly_export):
    h = srv.connect()
    assert h.is_read_only() == readonly_export
    assert h.pread(4096, 0) == b"\x09" * 4096
    if not readonly_export:
        with pytest.raises(nbd.Error):
            h.pwrite(b"w" * 512, 1 << 20)
    h.shutdown()
    assert expect in srv.stderr, srv.stderr
    with open(path, "rb") as f:
        assert f.read() == before, "the image was changed"


@pytest.mark.parametrize("name,poke,expect", BITMAP_DIRECTORY_REFUSALS,
                         ids=[r[0] for r in BITMAP_DIRECTORY_REFUSALS])
def test_bitmap_directory_refused(bitmap_base, tmp_path, name, poke, expect):
    path = bitmap_image(bitmap_base, tmp_path, poke)
    before = open(path, "rb").read()
    with conftest.serve(path) as srv:
        assert_not_written(path, before, srv, expect, True)
        assert "serving the image read-only" in srv.stderr


def share_table(q):
    """Bitmap 1 uses bitmap 0's table (same size with equal granularity)."""
    q.set_bitmap_field(1, "granularity_bits", 12)
    q.set_bitmap_field(1, "table_offset", q.bitmap_entries()[0]["table_offset"])


def point_at_new_cluster(q):
    """A data cluster appended to the file, which no refcount counts."""
    end = (len(q.data) + q.cluster_size - 1) // q.cluster_size * \
        q.cluster_size
    q.poke(end, b"\xff" * q.cluster_size)
    q.poke_be(first_data_table_entry(q, 0), ">Q", end)


BITMAP_CLUSTER_REFUSALS = [
    ("table-on-reftable", lambda q: q.set_bitmap_field(
        1, "table_offset", q.get("refcount_table_offset")),
     "also other metadata"),
    ("table-on-l1", lambda q: q.set_bitmap_field(
        0, "table_offset", q.get("l1_table_offset")),
     "invalid table entry"),     # L1 entries carry flags: never a table
    ("table-on-header",
     lambda q: q.set_bitmap_field(0, "table_offset", 0),
     "doesn't satisfy the constraints"),
    ("data-on-l2",
     lambda q: q.poke_be(first_data_table_entry(q, 0), ">Q",
                         q.l1_entry(0) & C.OFFSET_MASK),
     "also other metadata"),
    ("data-uncounted", point_at_new_cluster, "not counted exactly once"),
    ("two-bitmaps-one-table", share_table, "used twice"),
]


@pytest.mark.parametrize("name,poke,expect", BITMAP_CLUSTER_REFUSALS,
                         ids=[r[0] for r in BITMAP_CLUSTER_REFUSALS])
def test_bitmap_clusters_refused(bitmap_base, tmp_path, name, poke, expect):
    """Overlaps show only against refcounts and metadata, when writing is
    enabled: the first write fails, nothing is written, nothing is marked
    corrupt."""
    path = bitmap_image(bitmap_base, tmp_path, poke)
    before = open(path, "rb").read()
    readonly_export = expect in ("doesn't satisfy the constraints",
                                 "invalid table entry")
    with conftest.serve(path) as srv:
        assert_not_written(path, before, srv, expect, readonly_export)
