"""nbdkit-qcow2-compress-filter: compression on write.

QEMU is the oracle: after each copy `qemu-img check` must be clean,
`qemu-img compare` must find the image identical to its source, and
`qemu-img map` must show compressed clusters where the data compresses,
plain clusters where it does not (random data) and zero clusters for zeros.
"""
import json
import os
import random
import shutil
import subprocess
import tempfile
import time

import pytest

from conftest import (PLUGIN, COMPRESS_FILTER as FILTER,
                      FILTER as QCOW2_FILTER, container_room, nbdkit_env,
                      qemu_img, qemu_io)

K = 1 << 10
M = 1 << 20
SIZE = 64 * M

# Kind of each MiB of the source disk: text-like, zeros written as data,
# random, or a hole (never written: the source file is sparse there).
def region_kind(i):
    if i >= 60:
        return "hole"
    return {3: "zero", 6: "random"}.get(i % 8, "text")


def make_text(rnd, vocab, n):
    """n bytes of text-like data: lines of random words."""
    out, have = [], 0
    while have < n:
        line = " ".join(rnd.choices(vocab, k=14)) + "\n"
        out.append(line)
        have += len(line)
    return "".join(out).encode()[:n]


def make_source(path, size=SIZE):
    rnd = random.Random(20240601)
    vocab = ["".join(rnd.choices("abcdefghijklmnopqrstuvwxyz",
                                 k=rnd.randint(2, 11))) for _ in range(500)]
    with open(path, "wb") as f:
        for i in range(size // M):
            kind = region_kind(i)
            if kind == "hole":
                f.seek(M, os.SEEK_CUR)
                continue
            f.write(bytes(M) if kind == "zero" else
                    rnd.randbytes(M) if kind == "random" else
                    make_text(rnd, vocab, M))
        f.truncate(size)
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return str(make_source(tmp_path_factory.mktemp("src") / "src.raw"))


def create(path, size=SIZE, *opts):
    args = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", ",".join(opts)]
    qemu_img(*args, str(path), str(size))
    return str(path)


COMPRESSION = {"deflate": [], "zstd": ["compression_type=zstd"]}
CLUSTERS = {"64k": "cluster_size=65536", "4k": "cluster_size=4096"}


def nbdkit_cmd(image, filters, params=(), plugin=None):
    cmd = ["nbdkit", "-U", "-"]
    for f in filters:
        cmd.append("--filter=" + f)
    return cmd + (plugin or [PLUGIN, "file=" + str(image)]) + list(params)


class Result:
    def __init__(self, returncode, stderr):
        self.returncode = returncode
        self.stderr = stderr


def run_nbdkit(image, script, filters=(FILTER,), params=(), env=None,
               timeout=300, readonly=False, plugin=None):
    """Serve image through filters (default: just ours) and run script, a
    shell command or Python lines (see python_script), with $unixsocket
    and $uri set; then stop the server (which syncs the image).

    Not nbdkit --run: QCOW2_NBDKIT_ENV may preload a sanitizer runtime,
    which must reach nbdkit but not the shell and clients --run starts.
    """
    d = tempfile.mkdtemp(prefix="qcow2-compress-")
    sock = os.path.join(d, "sock")
    pidfile = os.path.join(d, "pid")
    cmd = nbdkit_cmd(image, filters, params, plugin)
    cmd[1:3] = ["-f", "-U", sock, "-P", pidfile] + (["-r"] if readonly else [])
    e = dict(os.environ)
    e.update(env or {})
    e.update(unixsocket=sock, uri="nbd+unix://?socket=" + sock)
    if isinstance(script, list):
        e["PYSCRIPT"] = "\n".join(script)
        script = '/usr/bin/python3 -c "$PYSCRIPT" "$unixsocket"'
    errlog = open(os.path.join(d, "stderr"), "w+")
    srv = subprocess.Popen(cmd, stderr=errlog, env=nbdkit_env())
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(pidfile) and srv.poll() is None:
            assert time.monotonic() < deadline, "nbdkit did not start"
            time.sleep(0.02)
        if srv.poll() is not None:
            errlog.seek(0)
            return Result(srv.returncode, errlog.read())
        p = subprocess.run(script, shell=True, text=True, capture_output=True,
                           env=e, timeout=timeout)
    finally:
        srv.terminate()
        try:
            srv.wait(120)
        except subprocess.TimeoutExpired:
            srv.kill()
            srv.wait()
        errlog.seek(0)
        server_err = errlog.read()
        errlog.close()
        shutil.rmtree(d, ignore_errors=True)
    return Result(p.returncode or srv.returncode, p.stderr + server_err)


def nbdcopy_in(src, image, filters=(FILTER,)):
    r = run_nbdkit(image, 'nbdcopy "$SRC" "$uri"', filters,
                   env={"SRC": str(src)})
    assert r.returncode == 0, r.stderr


def python_script(*lines):
    """Python for --run, with nbd, os, sys imported, h a new handle and
    the server's socket in sys.argv[1]."""
    return ["import nbd, os, sys", "h = nbd.NBD()", *lines]


def assert_clean(image):
    r = qemu_img("check", str(image), check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "No errors were found" in r.stdout, r.stdout


def assert_identical(image, raw):
    r = qemu_img("compare", "-f", "qcow2", "-F", "raw", str(image), str(raw),
                 check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def qemu_map(image):
    """[(start, length, kind)] with kind compressed / plain / zero.

    qemu-img 7.2 has no "compressed" key: compressed clusters are data
    without a host offset.
    """
    out = []
    for e in json.loads(qemu_img("map", "--output=json", str(image)).stdout):
        if not e["data"]:
            kind = "zero"
        elif e.get("compressed") or "offset" not in e:
            kind = "compressed"
        else:
            kind = "plain"
        out.append((e["start"], e["length"], kind))
    return out


def kinds_in(mapping, start, length):
    return {k for s, n, k in mapping if s < start + length and s + n > start}


def assert_regions(image, size=SIZE):
    """Text compressed, random plain, zeros and holes zero."""
    mapping = qemu_map(image)
    expect = {"text": "compressed", "random": "plain", "zero": "zero",
              "hole": "zero"}
    for i in range(size // M):
        got = kinds_in(mapping, i * M, M)
        assert got == {expect[region_kind(i)]}, \
            "MiB %d (%s) maps as %s" % (i, region_kind(i), got)


def data_bytes(size=SIZE):
    return sum(M for i in range(size // M) if region_kind(i) in ("text", "random"))


def allocated(path):
    return os.stat(path).st_blocks * 512


def header_compression_type(image):
    with open(image, "rb") as f:
        hdr = f.read(105)
    length = int.from_bytes(hdr[100:104], "big")
    return hdr[104] if length > 104 else 0


# --------------------------------------------------------------------------
# nbdcopy into the filter, like qemu-img convert -c

def copy_in(tmp_path, source, img, size):
    """nbdcopy the first size bytes of source into img through the filter;
    then the image must check clean and read exactly those bytes."""
    src = tmp_path / "src.raw"
    with open(source, "rb") as f:
        src.write_bytes(f.read(size))
    nbdcopy_in(src, img)
    assert_clean(img)
    assert_identical(img, src)
    return src


@pytest.mark.parametrize("cluster", CLUSTERS)
@pytest.mark.parametrize("compression", COMPRESSION)
def test_nbdcopy_like_qemu_img_convert_c(tmp_path, source, compression,
                                         cluster):
    opts = COMPRESSION[compression] + [CLUSTERS[cluster]]
    img = create(tmp_path / "out.qcow2", SIZE, *opts)
    nbdcopy_in(source, img)
    assert_clean(img)
    assert_identical(img, source)
    assert_regions(img)
    assert header_compression_type(img) == (1 if compression == "zstd" else 0)

    # The size reflects the compression, as much as qemu-img convert -c's.
    ref = str(tmp_path / "ref.qcow2")
    qemu_img("convert", "-c", "-O", "qcow2", "-o", ",".join(opts), source, ref)
    assert allocated(img) < 0.6 * data_bytes()
    assert os.path.getsize(img) < 1.1 * os.path.getsize(ref) + 256 * K, \
        (os.path.getsize(img), os.path.getsize(ref))


# --------------------------------------------------------------------------
# Writes in pieces: whole clusters merged from partial writes

def write_pieces(piece, size, in_flight=16):
    """Script for --run: write $SRC in `piece`-byte requests, many in
    flight (so pieces of one cluster may arrive out of order), then flush."""
    return python_script(
        "h.connect_unix(sys.argv[1])",
        "data = open(os.environ[\"SRC\"], \"rb\").read()",
        "for off in range(0, %d, %d):" % (size, piece),
        "    while h.aio_in_flight() >= %d: h.poll(-1)" % in_flight,
        "    h.aio_pwrite(nbd.Buffer.from_bytearray("
        "bytearray(data[off:off + %d])), off)" % piece,
        "while h.aio_in_flight() > 0: h.poll(-1)",
        "h.flush()",
        "h.shutdown()")


PIECE_SIZE = 16 * M


@pytest.mark.parametrize("cluster", CLUSTERS)
@pytest.mark.parametrize("piece", [4 * K, 64 * K], ids=["4k", "64k"])
@pytest.mark.parametrize("compression", COMPRESSION)
def test_writes_in_pieces(tmp_path, source, compression, piece, cluster):
    opts = COMPRESSION[compression] + [CLUSTERS[cluster]]
    img = create(tmp_path / "out.qcow2", PIECE_SIZE, *opts)
    src = tmp_path / "src.raw"
    with open(source, "rb") as f, open(src, "wb") as g:
        g.write(f.read(PIECE_SIZE))
    r = run_nbdkit(img, write_pieces(piece, PIECE_SIZE),
                   env={"SRC": str(src)})
    assert r.returncode == 0, r.stderr
    assert_clean(img)
    assert_identical(img, src)
    assert_regions(img, PIECE_SIZE)
    assert allocated(img) < 0.6 * data_bytes(PIECE_SIZE)


def test_pieces_of_one_cluster_from_many_connections(tmp_path, source):
    """Four connections write interleaved 4 KiB pieces of the same
    clusters at once, then overwrite some of them whole, while a fifth
    flushes: every piece lands, every cluster ends compressed."""
    size = 8 * M
    img = create(tmp_path / "out.qcow2", size)
    src = tmp_path / "src.raw"
    with open(source, "rb") as f:
        src.write_bytes(f.read(size))
    r = run_nbdkit(img, python_script(
        "import threading",
        "data = open(os.environ[\"SRC\"], \"rb\").read()",
        "errors = []",
        "def worker(k):",
        "    try:",
        "        c = nbd.NBD(); c.connect_unix(sys.argv[1])",
        "        for off in range(k * 4096, %d, 4 * 4096):" % size,
        "            while c.aio_in_flight() >= 8: c.poll(-1)",
        "            c.aio_pwrite(nbd.Buffer.from_bytearray("
        "bytearray(data[off:off + 4096])), off)",
        "        while c.aio_in_flight() > 0: c.poll(-1)",
        "        for off in range(k * 65536, %d, 16 * 65536):" % size,
        "            c.pwrite(data[off:off + 65536], off)",
        "        c.shutdown()",
        "    except Exception as e:",
        "        errors.append(e)",
        "def flusher():",
        "    c = nbd.NBD(); c.connect_unix(sys.argv[1])",
        "    for i in range(20): c.flush()",
        "    c.shutdown()",
        "ts = [threading.Thread(target=worker, args=(k,)) for k in range(4)]",
        "ts.append(threading.Thread(target=flusher))",
        "[t.start() for t in ts]",
        "[t.join() for t in ts]",
        "assert not errors, errors",
        "h.connect_unix(sys.argv[1])",
        "assert h.pread(%d, 0) == data" % size,
        "h.shutdown()"), env={"SRC": str(src)})
    assert r.returncode == 0, r.stderr
    assert_clean(img)
    assert_identical(img, src)
    assert_regions(img, size)


@pytest.mark.parametrize("flush", [True, False], ids=["flush", "close"])
def test_partly_written_clusters_compressed_by_flush_or_close(tmp_path, flush):
    """Pieces that never complete a cluster are compressed at the flush,
    or when the connection closes without one."""
    img = create(tmp_path / "out.qcow2", 8 * M)
    text = b"compressible text, " * 400
    script = python_script(
        "h.connect_unix(sys.argv[1])",
        "for c in range(32):",
        "    h.pwrite(%r, c * 65536 + 8192)" % text[:4096],
        "    assert h.pread(4096, c * 65536 + 8192) == %r" % text[:4096],
        "h.flush()" if flush else "pass",
        "h.shutdown()")
    r = run_nbdkit(img, script)
    assert r.returncode == 0, r.stderr
    assert_clean(img)
    expect = bytearray(8 * M)
    for c in range(32):
        expect[c * 65536 + 8192:c * 65536 + 12288] = text[:4096]
    raw = tmp_path / "expect.raw"
    raw.write_bytes(expect)
    assert_identical(img, raw)
    assert kinds_in(qemu_map(img), 0, 32 * 65536) == {"compressed"}


# --------------------------------------------------------------------------
# Overwriting compressed clusters

def test_overwrite_compressed_with_plain_plugin(tmp_path, source):
    """The plain plugin (no filter) over compressed clusters: partial and
    whole overwrites, zero and trim release the compressed bytes; shared
    host clusters are freed only when no compressed cluster uses them."""
    img = create(tmp_path / "out.qcow2")
    nbdcopy_in(source, img)
    expect = bytearray(open(source, "rb").read())
    ops = [("w", 100, 0x11, 5000),              # partial, inside one cluster
           ("w", 65536 * 3, 0x22, 65536),       # one whole cluster
           ("w", 65536 * 7 - 10, 0x33, 200000), # across clusters
           ("z", 2 * M, None, M),               # zero a compressed MiB
           ("t", 4 * M, None, M),               # trim another
           ("w", 9 * M + 4096, 0x44, 4096)]
    lines = ["h.connect_unix(sys.argv[1])"]
    for op, off, byte, arg in ops:
        if op == "w":
            lines.append("h.pwrite(bytes([%d]) * %d, %d)" % (byte, arg, off))
            expect[off:off + arg] = bytes([byte]) * arg
        elif op == "z":
            lines.append("h.zero(%d, %d)" % (arg, off))
            expect[off:off + arg] = bytes(arg)
        else:
            lines.append("h.trim(%d, %d)" % (arg, off))
            expect[off:off + arg] = bytes(arg)  # no backing file: zeros
    lines += ["h.flush()", "h.shutdown()"]
    r = run_nbdkit(img, python_script(*lines), filters=())
    assert r.returncode == 0, r.stderr
    assert_clean(img)
    raw = tmp_path / "expect.raw"
    raw.write_bytes(expect)
    assert_identical(img, raw)

    # Everything overwritten with plain clusters: every compressed
    # cluster released, and check agrees on every shared host cluster.
    rnd = tmp_path / "rnd.raw"
    rnd.write_bytes(random.Random(5).randbytes(SIZE))
    nbdcopy_in(rnd, img, filters=())
    assert_clean(img)
    assert_identical(img, rnd)
    assert kinds_in(qemu_map(img), 0, SIZE) == {"plain"}


def test_overwrite_compressed_with_compressed(tmp_path, source):
    """Copying twice through the filter: every compressed cluster of the
    first copy is released; check counts shared host clusters right."""
    img = create(tmp_path / "out.qcow2")
    nbdcopy_in(source, img)
    first = os.path.getsize(img)
    nbdcopy_in(source, img)
    assert_clean(img)
    assert_identical(img, source)
    assert_regions(img)
    # The released clusters were reused: the file did not double.
    assert os.path.getsize(img) < 1.5 * first


def test_qemu_io_partial_overwrite(tmp_path, source):
    """QEMU itself overwrites parts of our compressed clusters."""
    img = create(tmp_path / "out.qcow2", SIZE, "compression_type=zstd")
    nbdcopy_in(source, img)
    qemu_io(img, "write -P 0x5a 12k 8k", "write -P 0x6b 1M 64k",
            "write -z 5M 1M")
    assert_clean(img)
    expect = bytearray(open(source, "rb").read())
    expect[12 * K:20 * K] = b"\x5a" * (8 * K)
    expect[M:M + 64 * K] = b"\x6b" * (64 * K)
    expect[5 * M:6 * M] = bytes(M)
    raw = tmp_path / "expect.raw"
    raw.write_bytes(expect)
    assert_identical(img, raw)


# --------------------------------------------------------------------------
# Other layouts

def test_disk_size_not_cluster_aligned(tmp_path, source):
    """The last cluster is partial: compressed padded with zeros.  (qemu-img
    rounds the size up to 512 bytes; nbdcopy zeroes the rest.)"""
    size = 2 * M + 12345
    img = create(tmp_path / "out.qcow2", size)
    copy_in(tmp_path, source, img, size)
    assert qemu_map(img)[-1][2] == "compressed"


def test_extended_l2(tmp_path, source):
    """QEMU allows compressed clusters with extended L2 (bitmap 0)."""
    img = create(tmp_path / "out.qcow2", 16 * M, "extended_l2=on",
                 "cluster_size=131072")
    copy_in(tmp_path, source, img, 16 * M)
    assert_regions(img, 16 * M)


def test_refcount_bits_1(tmp_path, source):
    """Refcounts of one bit cannot share a host cluster between
    compressed clusters: each takes its own."""
    img = create(tmp_path / "out.qcow2", 8 * M, "refcount_bits=1")
    copy_in(tmp_path, source, img, 8 * M)
    assert_regions(img, 8 * M)


def test_backing_file(tmp_path, source):
    """An overlay: partial writes merge with the backing file's data."""
    base = create(tmp_path / "base.qcow2", 8 * M)
    qemu_io(base, "write -P 0x41 0 8M")
    img = str(tmp_path / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", img)
    r = run_nbdkit(img, python_script(
        "h.connect_unix(sys.argv[1])",
        "h.pwrite(b\"z\" * 3000, 70000)",
        "h.pwrite(b\"y\" * 65536, 65536 * 4)",
        "h.flush()",
        "h.shutdown()"))
    assert r.returncode == 0, r.stderr
    assert_clean(img)
    expect = bytearray(b"\x41" * (8 * M))
    expect[70000:73000] = b"z" * 3000
    expect[65536 * 4:65536 * 5] = b"y" * 65536
    raw = tmp_path / "expect.raw"
    raw.write_bytes(expect)
    assert_identical(img, raw)
    mapping = qemu_map(img)
    assert kinds_in(mapping, 65536, 65536) == {"compressed"}
    assert kinds_in(mapping, 65536 * 4, 65536) == {"compressed"}


def test_external_data_file_writes_uncompressed(tmp_path, source,
                                                monkeypatch):
    """QEMU allows no compressed clusters with a data file: plain writes."""
    monkeypatch.chdir(tmp_path)   # QEMU resolves data_file against the cwd
    img = create(tmp_path / "out.qcow2", 8 * M, "data_file=out.data")
    copy_in(tmp_path, source, img, 8 * M)
    assert "compressed" not in {k for _, _, k in qemu_map(img)}


def test_encrypted_image_writes_uncompressed(tmp_path, source):
    """Nor in encrypted images: plain (encrypted) writes."""
    from images import luks_create, secret_args
    img = str(luks_create(tmp_path / "out.qcow2", 4 * M, "pw"))
    src = tmp_path / "src.raw"
    with open(source, "rb") as f:
        src.write_bytes(f.read(4 * M))
    r = run_nbdkit(img, 'nbdcopy "$SRC" "$uri"', params=["passphrase=pw"],
                   env={"SRC": str(src)})
    assert r.returncode == 0, r.stderr
    image_opts = ["--image-opts",
                  "driver=qcow2,file.filename=%s,encrypt.key-secret=s0" % img]
    assert qemu_img("check", *secret_args("pw"), *image_opts).returncode == 0
    out = tmp_path / "out.raw"
    qemu_img("convert", *secret_args("pw"), *image_opts, "-O", "raw",
             str(out))
    assert out.read_bytes() == src.read_bytes()
    with open(img, "rb") as f:
        assert src.read_bytes()[:64] not in f.read()   # stored encrypted


def test_v2_image(tmp_path, source):
    """compat=0.10: no zero flag, no compression type field: deflate."""
    img = create(tmp_path / "out.qcow2", 8 * M, "compat=0.10")
    copy_in(tmp_path, source, img, 8 * M)
    assert_regions(img, 8 * M)


def test_snapshot_survives_compressed_writes(tmp_path, source):
    """Compressed writes over clusters and L2 tables shared with an
    internal snapshot: the snapshot reads as before, refcounts agree."""
    img = create(tmp_path / "out.qcow2", 8 * M)
    src = tmp_path / "src.raw"
    with open(source, "rb") as f:
        src.write_bytes(f.read(8 * M))
    nbdcopy_in(src, img)                  # compressed clusters...
    qemu_io(img, "write -P 0x99 4M 1M")   # ...and plain ones
    qemu_img("snapshot", "-c", "before", img)
    before = tmp_path / "before.raw"
    qemu_img("convert", "-O", "raw", img, str(before))
    rnd = tmp_path / "rnd.raw"
    rnd.write_bytes(random.Random(9).randbytes(4 * M) + src.read_bytes()[:4 * M])
    nbdcopy_in(rnd, img)
    assert_clean(img)
    assert_identical(img, rnd)
    snap = tmp_path / "snap.raw"
    qemu_img("convert", "-l", "snapshot.name=before", "-O", "raw", img,
             str(snap))
    assert snap.read_bytes() == before.read_bytes()


# --------------------------------------------------------------------------
# Chains, exports, errors

@pytest.mark.parametrize("chain", ["log-below", "blocksize-above",
                                   "blocksize-below"])
def test_chain_with_other_filters(tmp_path, source, chain):
    img = create(tmp_path / "out.qcow2", 16 * M)
    src = tmp_path / "src.raw"
    with open(source, "rb") as f:
        src.write_bytes(f.read(16 * M))
    filters, params = {
        "log-below": ([FILTER, "log"], ["logfile=%s" % (tmp_path / "log")]),
        "blocksize-above": (["blocksize", FILTER], ["maxdata=8192"]),
        "blocksize-below": ([FILTER, "blocksize"], ["maxdata=1M"]),
    }[chain]
    r = run_nbdkit(img, 'nbdcopy "$SRC" "$uri"', filters, params=params,
                   env={"SRC": str(src)})
    assert r.returncode == 0, r.stderr
    assert_clean(img)
    assert_identical(img, src)
    assert_regions(img, 16 * M)


def test_over_the_qcow2_filter(tmp_path, source):
    """nbdkit-qcow2-filter keeps the same contract (adapter/
    compressed-export.h): the filter compresses over it, on any plugin."""
    img = create(tmp_path / "out.qcow2", 16 * M)
    os.truncate(img, container_room(img))
    src = tmp_path / "src.raw"
    with open(source, "rb") as f:
        src.write_bytes(f.read(16 * M))
    r = run_nbdkit(img, 'nbdcopy "$SRC" "$uri"', [FILTER, QCOW2_FILTER],
                   plugin=["file", "file=" + img], env={"SRC": str(src)})
    assert r.returncode == 0, r.stderr
    assert_clean(img)
    assert_identical(img, src)
    assert_regions(img, 16 * M)


def test_reserved_export_name_and_snapshot(tmp_path):
    """A snapshot named qcow2:compressed is listed, and reachable, by id."""
    img = create(tmp_path / "s.qcow2", 4 * M)
    qemu_io(img, "write -P 7 0 1M")
    qemu_img("snapshot", "-c", "qcow2:compressed", img)
    qemu_io(img, "write -P 8 0 1M")
    r = run_nbdkit(img, python_script(
        "h.set_opt_mode(True)",
        "h.connect_unix(sys.argv[1])",
        "names = []",
        "h.opt_list(lambda n, d: names.append(n))",
        "h.opt_abort()",
        "assert names == [\"\", \"1\"], names",
        "h = nbd.NBD()",
        "h.set_export_name(\"1\")",
        "h.connect_unix(sys.argv[1])",
        "assert h.pread(512, 0) == bytes([7]) * 512",
        "h.shutdown()",
        "h = nbd.NBD()",
        "h.set_export_name(\"qcow2:compressed\")",
        "h.connect_unix(sys.argv[1])",
        "assert h.pread(512, 0) == bytes([8]) * 512",
        "assert not h.is_read_only()",
        "h.shutdown()"), filters=())
    assert r.returncode == 0, r.stderr


def test_filter_over_another_plugin_is_refused(tmp_path):
    r = run_nbdkit(None, 'nbdinfo "$uri"', plugin=["memory", "1M"])
    assert r.returncode != 0
    assert "works only over nbdkit-qcow2-plugin" in r.stderr


def test_readonly_server(tmp_path, source):
    """-r: reads work, nothing is written, flush is harmless."""
    img = create(tmp_path / "out.qcow2", 8 * M)
    before = open(img, "rb").read()
    script = python_script(
        "h.connect_unix(sys.argv[1])",
        "assert h.is_read_only()",
        "assert h.pread(4096, 0) == bytes(4096)",
        "h.flush()",
        "h.shutdown()")
    r = run_nbdkit(img, script, readonly=True)
    assert r.returncode == 0, r.stderr
    assert open(img, "rb").read() == before
