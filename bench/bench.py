#!/usr/bin/python3
"""Side-by-side benchmarks: nbdkit-qcow2-plugin vs qemu-nbd vs raw.

Builds a set of test images in a temporary directory, serves each one in
turn with

  plugin    nbdkit + this project's qcow2 plugin, on the qcow2 image
  qemu-nbd  qemu-nbd -e 8 --cache=writeback --discard=unmap -f qcow2,
            on the same qcow2 image
  file-raw  nbdkit's file plugin on the raw equivalent (same bytes)

and this project's qcow2 filter, the engine over another nbdkit plugin:

  filter-file   nbdkit --filter=qcow2 file: the extra layer's cost,
                against the plugin on the same image
  filter-nbd    nbdkit --filter=qcow2 nbd, to a second nbdkit serving
                the qcow2 file raw (a remote container) ...
  qemu-nbd-nbd  ... against qemu-nbd reading the same qcow2 through its
                own NBD client from the same kind of second server

over a private Unix socket, drives each server with fio's nbd engine and
prints one table row per workload with IOPS and MiB/s per server and the
ratios plugin/qemu-nbd, plugin/file-raw, filter-file/plugin and
filter-nbd/qemu-nbd-nbd.  The compression rows time
nbdcopy into nbdkit-qcow2-compress-filter against qemu-img convert -c on
the same source instead (see COMPRESS_ROWS).  See bench/README.md.

Run it through bench/run.sh, or directly with Debian's /usr/bin/python3.
Only the standard library is used.
"""

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PLUGIN = os.path.join(ROOT, "build", "plugin",
                              "nbdkit-qcow2-plugin.so")
MiB = 1 << 20
GiB = 1 << 30


# --------------------------------------------------------------------------
# Images.  Each image kind is a qcow2 file (served by the plugin and by
# qemu-nbd) plus a raw file with the same guest-visible bytes (served by
# nbdkit-file-plugin).  Built once per run, lazily, only if a selected row
# needs it.

@dataclasses.dataclass(frozen=True)
class Image:
    name: str
    qcow2: str          # file name in the work directory ("": none)
    raw: str            # raw file with the same content
    what: str           # one line for the report
    backing: str = ""   # the qcow2's backing file, in the work directory


IMAGES = {
    "full": Image(
        "full", "full.qcow2", "random.raw",
        "fully allocated qcow2 (64k clusters) of random data"),
    "compressed": Image(
        "compressed", "compressed.qcow2", "text.raw",
        "qcow2 made by 'qemu-img convert -c' (deflate) from compressible "
        "text-like data"),
    "overlay": Image(
        "overlay", "overlay.qcow2", "random.raw",
        "empty qcow2 overlay over full.qcow2: every read goes through the "
        "backing file", backing="full.qcow2"),
    # For the bitmaps row: the cost of keeping persistent bitmaps.
    "full-bitmaps": Image(
        "full-bitmaps", "full-bitmaps.qcow2", "random.raw",
        "full.qcow2 with two enabled persistent dirty bitmaps (64 KiB and "
        "4 KiB granularity)"),
    # For write rows: an empty qcow2, so every write allocates.
    "empty": Image(
        "empty", "empty.qcow2", "empty.raw",
        "empty qcow2 (64k clusters); raw equivalent is a sparse file"),
    # For large writes over small clusters: one 4 MiB request spans 1024
    # clusters, so what the range lock takes for it shows.
    "empty-4k": Image(
        "empty-4k", "empty-4k.qcow2", "empty.raw",
        "empty qcow2 with 4k clusters; raw equivalent is a sparse file"),
    "extl2-overlay": Image(
        "extl2-overlay", "extl2-overlay.qcow2", "random.raw",
        "empty qcow2 overlay with extended L2 entries (64k clusters, 2k "
        "subclusters) over full.qcow2", backing="full.qcow2"),
    # For the memory row: far more L2 tables than any cache holds.
    "sparse-1T": Image(
        "sparse-1T", "sparse-1T.qcow2", "sparse-1T.raw",
        "1 TiB qcow2 (64k clusters) with one allocated cluster in every "
        "512 MiB: 2048 L2 tables, 128 MiB of them"),
    # For the compression rows: only a raw source.
    "mixed": Image(
        "mixed", "", "mixed.raw",
        "raw source for the compression rows: text-like data with every "
        "eighth MiB zeros and every eighth MiB random, like a used disk"),
}


# --------------------------------------------------------------------------
# Rows.  A row is one workload, a small declarative entry: the image it
# runs on and the fio parameters.  Every server runs every row.
#
# write=True rows are served read-write, and each server gets a fresh copy
# of the image (and of the raw file) so that no server sees another's
# writes.  After each, `qemu-img check` runs on the qcow2 copy: a result
# from an image that is not clean is reported as CORRUPT.

@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    image: str              # key of IMAGES
    rw: str                 # fio --rw
    bs: str                 # fio --bs
    iodepth: int = 1        # fio --iodepth (per job)
    numjobs: int = 1        # fio --numjobs: each job is one NBD connection
    write: bool = False     # serve read-write on fresh copies
    fio_extra: tuple = ()   # further fio options, "--opt=value"


ROWS = [
    Row("seqread-1M", "full", "read", "1M", iodepth=4),
    Row("randread-4k", "full", "randread", "4k", iodepth=16),
    Row("randread-4k-4jobs", "full", "randread", "4k", iodepth=16,
        numjobs=4),
    Row("seqread-1M-compressed", "compressed", "read", "1M", iodepth=4),
    Row("randread-4k-backing", "overlay", "randread", "4k", iodepth=16),
    Row("overwrite-4k", "full", "randwrite", "4k", iodepth=16, write=True),
    Row("overwrite-4k-bitmaps", "full-bitmaps", "randwrite", "4k",
        iodepth=16, write=True),
    Row("randwrite-4k-alloc", "empty", "randwrite", "4k", iodepth=16,
        write=True),
    Row("randwrite-4k-alloc-4jobs", "empty", "randwrite", "4k", iodepth=16,
        numjobs=4, write=True),
    # Flush-heavy guests (databases, journaling file systems): every job
    # flushes after each 16 of its writes (fio's nbd engine has no
    # fdatasync; --fsync sends NBD_CMD_FLUSH).
    Row("randwrite-4k-alloc-4jobs-flush16", "empty", "randwrite", "4k",
        iodepth=16, numjobs=4, write=True, fio_extra=("--fsync=16",)),
    Row("randwrite-4M-alloc-4jobs-4k-clusters", "empty-4k", "randwrite",
        "4M", iodepth=4, numjobs=4, write=True),
    Row("seqwrite-1M-alloc", "empty", "write", "1M", iodepth=4, write=True),
    Row("randwrite-4k-cow", "overlay", "randwrite", "4k", iodepth=16,
        write=True),
    Row("randwrite-4k-extl2-cow", "extl2-overlay", "randwrite", "4k",
        iodepth=16, write=True),
]


# Compression rows: writing a compressed image from a raw source.  These
# are not fio runs; each server column is one timed copy of the whole
# mixed source:
#
#   plugin    nbdcopy SRC -- [ nbdkit --filter=qcow2-compress PLUGIN NEW ]
#             into a new, empty qcow2
#   qemu-nbd  qemu-img convert -c -O qcow2 SRC NEW: QEMU's own way to write
#             a compressed image (qemu-nbd cannot compress writes)
#   file-raw  nbdcopy SRC -- [ nbdkit file NEW.raw ]: the same copy without
#             compression, what the copy costs when nothing is encoded
#
# with the same cluster size and compression type for both qcow2 images.
# Both are checked with qemu-img check and qemu-img compare against the
# source (CORRUPT otherwise); the file sizes go into a second table.

@dataclasses.dataclass(frozen=True)
class CompressRow:
    name: str
    ctype: str              # qemu-img's compression_type: zlib or zstd
    image: str = "mixed"
    write: bool = True
    cluster_size: int = 65536


COMPRESS_ROWS = [
    CompressRow("compress-deflate", "zlib"),
    CompressRow("compress-zstd", "zstd"),
]


# Memory row: how much memory each server keeps after random 4k reads
# across a 1 TiB image whose L2 tables (128 MiB) cannot all be cached.  The
# plugin runs twice, with its default cache-size and with cache-size=1M:
# its resident size must follow cache-size, whatever the image size.  The
# measure is the server's VmHWM (peak resident set) after the run.

@dataclasses.dataclass(frozen=True)
class MemoryRow:
    name: str
    image: str = "sparse-1T"
    write: bool = False
    plugin_params: tuple = ((), ("cache-size=1M",))


MEMORY_ROWS = [MemoryRow("memory-1T")]
MEMORY_FIO = Row("memory-1T", "sparse-1T", "randread", "4k", iodepth=16,
                 numjobs=4)
TiB = 1 << 40

ALL_ROWS = ROWS + COMPRESS_ROWS + MEMORY_ROWS

SERVERS = ["plugin", "qemu-nbd", "file-raw", "filter-file", "filter-nbd",
           "qemu-nbd-nbd"]
# The compression and memory rows compare only these.
PLUGIN_SERVERS = ["plugin", "qemu-nbd", "file-raw"]
# Servers that reach the qcow2 file through a second server: nbdkit's file
# plugin serving it raw on its own Unix socket, as a remote disk would.
REMOTE_SERVERS = ("filter-nbd", "qemu-nbd-nbd")
# Servers that hold the image in a container of fixed size (the filter's
# layer below, QEMU's NBD client): a write row's copy is grown first to
# leave room for new clusters (Images.grow_container).
CONTAINER_SERVERS = ("filter-file",) + REMOTE_SERVERS

# Ratios (a/b of MiB/s) in the results, and the tables that print them:
# (title, servers, ratios).
RATIOS = [("plugin", "qemu-nbd"), ("plugin", "file-raw"),
          ("filter-file", "plugin"), ("filter-nbd", "qemu-nbd-nbd")]
TABLES = [
    ("nbdkit-qcow2-plugin", ["plugin", "qemu-nbd", "file-raw"], RATIOS[:2]),
    ("nbdkit-qcow2-filter: over the file plugin, and over the nbd plugin "
     "to a raw container", ["plugin", "filter-file", "qemu-nbd-nbd",
                            "filter-nbd"], RATIOS[2:]),
]


def ratio_key(pair):
    return "%s/%s" % pair


# --------------------------------------------------------------------------
# Helpers.

def log(*a):
    print(*a, file=sys.stderr, flush=True)


def run(cmd, **kw):
    kw.setdefault("check", True)
    return subprocess.run(cmd, **kw)


def need(prog):
    if shutil.which(prog) is None:
        sys.exit(f"bench: {prog} not found in PATH")


def tool_version(cmd):
    try:
        out = subprocess.run(cmd, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True).stdout
        return out.splitlines()[0].strip() if out else "?"
    except OSError:
        return "?"


def plugin_features(plugin):
    """--dump-plugin as a dict."""
    out = run(["nbdkit", plugin, "--dump-plugin"], stdout=subprocess.PIPE,
              text=True).stdout
    d = {}
    for line in out.splitlines():
        k, sep, v = line.partition("=")
        if sep:
            d[k] = v
    return d


def make_random_raw(path, size):
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 16 * MiB)
            f.write(os.urandom(n))
            left -= n


def make_text_raw(path, size):
    """Compressible, text-like data: random words from a small vocabulary.

    deflate (with QEMU's 4 KiB window) gets it to about 60%; no cluster is
    all zeros, so every cluster is stored compressed.  16 MiB of it is
    generated and repeated (clusters are compressed one by one, so the
    repetition does not change the ratio).
    """
    rnd = random.Random(42)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rnd.choice(letters) for _ in range(rnd.randint(2, 10)))
             for _ in range(4000)]
    block = bytearray()
    unit = 16 * MiB
    while len(block) < unit:
        words = rnd.choices(vocab, k=4096)
        line = " ".join(words) + "\n"
        block += line.encode()
    block = bytes(block[:unit])
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, unit)
            f.write(block[:n])
            left -= n


def make_mixed_raw(path, size):
    """make_text_raw with every eighth MiB zeros and every eighth random."""
    make_text_raw(path, size)
    rnd = random.Random(7)
    with open(path, "r+b") as f:
        for i in range(size // MiB):
            if i % 8 in (3, 6):
                f.seek(i * MiB)
                f.write(bytes(MiB) if i % 8 == 3 else rnd.randbytes(MiB))


def qemu_img(*args):
    run(["qemu-img", *args], stdout=subprocess.DEVNULL)


class Images:
    """Builds the images on demand in workdir."""

    def __init__(self, workdir, size):
        self.dir = workdir
        self.size = size
        self.built = set()

    def path(self, name):
        return os.path.join(self.dir, name)

    def _build_file(self, name):
        if name in self.built:
            return
        p = self.path(name)
        t = time.time()
        if name == "random.raw":
            make_random_raw(p, self.size)
        elif name == "text.raw":
            make_text_raw(p, self.size)
        elif name == "mixed.raw":
            make_mixed_raw(p, self.size)
        elif name == "sparse-1T.qcow2":
            # One qemu-io run writing the first cluster of every 512 MiB.
            qemu_img("create", "-f", "qcow2", "-o", "cluster_size=65536", p,
                     str(TiB))
            cmds = []
            for i in range(TiB // (512 * MiB)):
                cmds += ["-c", f"write -q -P {i % 255 + 1} {i * 512 * MiB} 64k"]
            run(["qemu-io", "-f", "qcow2", *cmds, p],
                stdout=subprocess.DEVNULL)
        elif name == "sparse-1T.raw":
            with open(p, "wb") as f:
                f.truncate(TiB)
                for i in range(TiB // (512 * MiB)):
                    f.seek(i * 512 * MiB)
                    f.write(bytes([i % 255 + 1]) * (64 << 10))
        elif name == "empty.raw":
            with open(p, "wb") as f:
                f.truncate(self.size)
        elif name == "full.qcow2":
            self._build_file("random.raw")
            qemu_img("convert", "-f", "raw", "-O", "qcow2",
                     "-o", "cluster_size=65536",
                     self.path("random.raw"), p)
        elif name == "compressed.qcow2":
            self._build_file("text.raw")
            qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2",
                     "-o", "cluster_size=65536,compression_type=zlib",
                     self.path("text.raw"), p)
        elif name == "full-bitmaps.qcow2":
            self._build_file("full.qcow2")
            run(["cp", "--reflink=auto", "--sparse=always",
                 self.path("full.qcow2"), p])
            qemu_img("bitmap", "--add", "-g", "65536", p, "b64k")
            qemu_img("bitmap", "--add", "-g", "4096", p, "b4k")
        elif name == "overlay.qcow2":
            self._build_file("full.qcow2")
            qemu_img("create", "-f", "qcow2", "-o", "cluster_size=65536",
                     "-b", "full.qcow2", "-F", "qcow2", p)
        elif name == "extl2-overlay.qcow2":
            self._build_file("full.qcow2")
            qemu_img("create", "-f", "qcow2",
                     "-o", "cluster_size=65536,extended_l2=on",
                     "-b", "full.qcow2", "-F", "qcow2", p)
        elif name == "empty.qcow2":
            qemu_img("create", "-f", "qcow2", "-o", "cluster_size=65536",
                     p, str(self.size))
        elif name == "empty-4k.qcow2":
            qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096",
                     p, str(self.size))
        else:
            raise KeyError(name)
        self.built.add(name)
        log(f"bench: built {name} ({os.stat(p).st_blocks * 512 / MiB:.0f} "
            f"MiB on disk) in {time.time() - t:.1f} s")

    def build(self, image):
        if image.qcow2:
            self._build_file(image.qcow2)
        self._build_file(image.raw)

    def files(self, image):
        """Every file a server of this image reads (for the warm-up)."""
        names = [n for n in (image.qcow2, image.raw, image.backing) if n]
        return [self.path(n) for n in names]

    def fresh_copy(self, image, tag):
        """Private copies for a write row; returns (qcow2, raw) paths.

        An overlay copy keeps pointing at the shared, unmodified backing
        file (relative name), so it is copied into the same directory.
        """
        out = []
        for n in (image.qcow2, image.raw):
            dst = self.path(f"{tag}-{n}")
            run(["cp", "--reflink=auto", "--sparse=always", self.path(n),
                 dst])
            out.append(dst)
        # Write the copies back now: otherwise the kernel's flusher writes
        # cp's gigabyte back during some server's measurement and not
        # another's, taking a CPU from it.
        run(["sync", "--data", *out])
        return tuple(out)

    def grow_container(self, qcow2_path):
        """Room for new clusters in a write row's copy served as a
        container of fixed size: twice the virtual disk and 32 MiB more
        (a sparse extension)."""
        os.truncate(qcow2_path, os.path.getsize(qcow2_path)
                    + 2 * self.size + 32 * MiB)


def warm_page_cache(paths):
    for p in paths:
        with open(p, "rb") as f:
            while f.read(16 * MiB):
                pass


# --------------------------------------------------------------------------
# Servers.

def probe(sock):
    """True once the server answers on sock.

    With libnbd's Python module (Debian's python3-libnbd) this is a full
    handshake and a clean disconnect, so the servers log nothing; without
    it, a bare connect.
    """
    try:
        import nbd
    except ImportError:
        nbd = None
    if nbd is not None:
        try:
            h = nbd.NBD()
            h.connect_unix(sock)
            h.shutdown()
            return True
        except nbd.Error:
            return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(sock)
        return True
    except OSError:
        return False
    finally:
        s.close()


def wait_for_socket(sock, proc, what, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        if os.path.exists(sock) and probe(sock):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not start listening on {sock}")


def nbdkit_command(sock, writable):
    return ["nbdkit", "-f", "-U", sock, "-D", "nbdkit.backend.datapath=0",
            *([] if writable else ["-r"])]


def qemu_nbd_command(sock, writable, *image):
    # -t (--persistent): keep serving after the warm-up disconnects.
    return ["qemu-nbd", "-e", "8", "--cache=writeback", "--discard=unmap",
            *([] if writable else ["-r"]), "-t", "-k", sock, *image]


def below_command(below_sock, qcow2_path, writable):
    """The second server of REMOTE_SERVERS: the qcow2 file served raw."""
    return nbdkit_command(below_sock, writable) + ["file",
                                                   "file=" + qcow2_path]


def server_command(server, sock, qcow2_path, raw_path, plugin, writable,
                   plugin_params=(), qcow2_filter=None, below_sock=None,
                   backing=None):
    """The server's command line; below_sock is the socket of the second
    server (REMOTE_SERVERS), backing the path of the image's backing file
    (which the remote servers open locally)."""
    nbdkit = nbdkit_command(sock, writable)
    # Backing files are found where the image lives (the work directory).
    backing_dir = "backing-dir=" + os.path.dirname(qcow2_path)
    if server == "plugin":
        return nbdkit + [plugin, "file=" + qcow2_path, *plugin_params]
    if server == "qemu-nbd":
        return qemu_nbd_command(sock, writable, "-f", "qcow2", qcow2_path)
    if server == "file-raw":
        return nbdkit + ["file", "file=" + raw_path]
    if server == "filter-file":
        return nbdkit + ["--filter=" + qcow2_filter, "file",
                         "file=" + qcow2_path, backing_dir]
    if server == "filter-nbd":
        return nbdkit + ["--filter=" + qcow2_filter, "nbd",
                         "socket=" + below_sock, backing_dir]
    if server == "qemu-nbd-nbd":
        # QEMU's qcow2 driver over its NBD client; a relative backing
        # name cannot be resolved against an NBD URI, so it is named.
        opts = ("driver=qcow2,file.driver=nbd,file.server.type=unix,"
                "file.server.path=" + below_sock)
        if backing:
            opts += ",backing.driver=qcow2,backing.file.filename=" + backing
        return qemu_nbd_command(sock, writable, "--image-opts", opts)
    raise KeyError(server)


@contextlib.contextmanager
def serving(cmd, sock, logpath):
    with open(logpath, "ab") as errlog:
        errlog.write(("\n$ " + " ".join(cmd) + "\n").encode())
        errlog.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                stdout=errlog, stderr=errlog)
    try:
        wait_for_socket(sock, proc, cmd[0])
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)


# --------------------------------------------------------------------------
# fio.

def fio(uri, row, runtime, ramp, name):
    cmd = ["fio", "--name=" + name, "--ioengine=nbd", "--uri=" + uri,
           "--rw=" + row.rw, "--bs=" + row.bs,
           f"--iodepth={row.iodepth}", f"--numjobs={row.numjobs}",
           "--group_reporting", "--output-format=json"]
    if runtime:
        cmd += ["--time_based", f"--runtime={runtime}",
                f"--ramp_time={ramp}"]
    cmd += list(row.fio_extra)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
    if p.returncode != 0:
        raise RuntimeError(f"fio failed ({p.returncode}): {p.stderr.strip()}"
                           f"\ncommand: {' '.join(cmd)}")
    # fio may print notes before the JSON document.
    out = p.stdout
    data = json.loads(out[out.index("{"):])
    job = data["jobs"][0]
    iops = bw = 0.0
    for d in ("read", "write"):
        iops += job[d]["iops"]
        bw += job[d]["bw_bytes"]
    return {"iops": iops, "mib_s": bw / MiB}


def warm_up(uri):
    """One sequential pass over the whole disk (fills server caches)."""
    row = Row("warm-up", "", "read", "1M", iodepth=8)
    fio(uri, row, 0, 0, "warm-up")


def run_one(row, server, images, image, sock, uri, plugin, qcow2_filter,
            serverlog, runtime, ramp, note):
    """Start server for row (and the server below it), warm it up,
    measure, stop it."""
    if row.write:
        qcow2_path, raw_path = images.fresh_copy(image,
                                                 f"{row.name}-{server}")
        if server in CONTAINER_SERVERS:
            images.grow_container(qcow2_path)
    else:
        qcow2_path = images.path(image.qcow2)
        raw_path = images.path(image.raw)
    below_sock = sock + ".below"
    cmd = server_command(server, sock, qcow2_path, raw_path, plugin,
                         row.write, qcow2_filter=qcow2_filter,
                         below_sock=below_sock,
                         backing=image.backing and images.path(image.backing))
    log(f"bench: {row.name} on {server}{note} ...")
    try:
        with contextlib.ExitStack() as below:
            if server in REMOTE_SERVERS:
                below.enter_context(serving(
                    below_command(below_sock, qcow2_path, row.write),
                    below_sock, serverlog))
            # Stopped before the server below: it writes back through it.
            with serving(cmd, sock, serverlog):
                warm_up(uri)
                result = fio(uri, row, runtime, ramp, row.name)
        # The server has stopped (and synced): is the image still sound?
        if row.write and server != "file-raw":
            result["check"] = check_image(qcow2_path)
        return result
    finally:
        if row.write:
            for p in (qcow2_path, raw_path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)


def vm_hwm_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def run_memory(row, servers, images, sock, uri, plugin, serverlog, runtime,
               ramp):
    """Peak resident size of each server (see MEMORY_ROWS)."""
    image = IMAGES[row.image]
    out = {}
    for server in (s for s in servers if s in PLUGIN_SERVERS):
        variants = row.plugin_params if server == "plugin" else ((),)
        for params in variants:
            label = " ".join([server, *params])
            cmd = server_command(server, sock, images.path(image.qcow2),
                                 images.path(image.raw), plugin, False,
                                 params)
            log(f"bench: {row.name} on {label} ...")
            with serving(cmd, sock, serverlog) as proc:
                res = fio(uri, MEMORY_FIO, runtime, ramp, row.name)
                res["vmhwm_mib"] = vm_hwm_mib(proc.pid)
            out[label] = res
    return out


def check_image(qcow2_path, source=None):
    """'clean' if qemu-img check (and compare with source) pass."""
    cmds = [["qemu-img", "check", "-q", qcow2_path]]
    if source:
        cmds.append(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2",
                     source, qcow2_path])
    for cmd in cmds:
        p = subprocess.run(cmd, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
        if p.returncode != 0:
            log(f"bench: {' '.join(cmd)}: exit {p.returncode}: "
                f"{p.stdout.strip()[:500]}")
            return "CORRUPT"
    # Persistent bitmaps must have been stored: none left in use.
    info = json.loads(subprocess.run(
        ["qemu-img", "info", "--output=json", qcow2_path],
        stdout=subprocess.PIPE, text=True, check=True).stdout)
    for b in info.get("format-specific", {}).get("data", {}).get(
            "bitmaps", []):
        if "in-use" in b["flags"]:
            log(f"bench: {qcow2_path}: bitmap {b['name']} left in use")
            return "CORRUPT"
    return "clean"


def run_compress(row, server, images, plugin, compress_filter, note):
    """One timed copy of the mixed source (see COMPRESS_ROWS)."""
    src = images.path(IMAGES[row.image].raw)
    ext = "raw" if server == "file-raw" else "qcow2"
    out = images.path(f"{row.name}-{server}.{ext}")
    opts = f"compression_type={row.ctype},cluster_size={row.cluster_size}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(out)
    if server == "qemu-nbd":
        cmd = ["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2",
               "-o", opts, src, out]
    else:
        if server == "plugin":
            qemu_img("create", "-f", "qcow2", "-o", opts, out,
                     str(images.size))
            target = ["nbdkit", "--filter=" + compress_filter, plugin, out]
        else:
            with open(out, "wb") as f:
                f.truncate(images.size)
            target = ["nbdkit", "file", out]
        cmd = ["nbdcopy", src, "--", "[", *target, "]"]
    log(f"bench: {row.name} on {server}{note} ...")
    try:
        t = time.monotonic()
        run(cmd, stdout=subprocess.DEVNULL)
        secs = time.monotonic() - t
        st = os.stat(out)
        result = {"iops": None, "mib_s": images.size / MiB / secs,
                  "seconds": secs, "file_mib": st.st_size / MiB,
                  "disk_mib": st.st_blocks * 512 / MiB}
        if server != "file-raw":
            result["check"] = check_image(out, src)
        return result
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(out)


def median_result(samples):
    """The sample with the median throughput, plus every sample's."""
    ordered = sorted(samples, key=lambda r: r["mib_s"])
    mid = dict(ordered[(len(ordered) - 1) // 2])
    if len(samples) > 1:
        mid["samples_mib_s"] = [r["mib_s"] for r in samples]
    if any(r.get("check") == "CORRUPT" for r in samples):
        mid["check"] = "CORRUPT"
    return mid


# --------------------------------------------------------------------------
# Report.

def fmt_iops(x, res=None):
    if res and res.get("check") == "CORRUPT":
        return "CORRUPT"
    if x is None:
        return "-"
    return f"{x:,.0f}"


def fmt_mib(x, res=None):
    if res and res.get("check") == "CORRUPT" and res.get("iops") is None:
        return "CORRUPT"
    if x is None:
        return "-"
    return f"{x:,.1f}" if x < 100 else f"{x:,.0f}"


def fmt_ratio(x):
    return "-" if x is None else f"{x:.2f}"


def ratio(results, a, b):
    ra, rb = results.get(a), results.get(b)
    if not ra or not rb or not rb["mib_s"]:
        return None
    if "CORRUPT" in (ra.get("check"), rb.get("check")):
        return None     # a fast wrong answer does not count
    return ra["mib_s"] / rb["mib_s"]


def table(rows_out, servers, pairs, own):
    """One line per row that has results of the servers in own: IOPS and
    MiB/s of every server, then the ratios of the pairs."""
    head1 = ["workload"]
    head2 = [""]
    for s in servers:
        head1 += [s, ""]
        head2 += ["IOPS", "MiB/s"]
    head1 += [a + "/" for a, _ in pairs]
    head2 += [b for _, b in pairs]
    body = []
    for r in rows_out:
        if not any(r.get("results", {}).get(s) for s in own):
            continue
        line = [r["workload"]]
        for s in servers:
            res = r["results"].get(s)
            line += [fmt_iops(res and res["iops"], res),
                     fmt_mib(res and res["mib_s"], res)]
        line += [fmt_ratio(r.get(ratio_key(p))) for p in pairs]
        body.append(line)
    widths = [max(len(x[i]) for x in [head1, head2] + body)
              for i in range(len(head1))]

    def render(cells):
        out = [cells[0].ljust(widths[0])]
        out += [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join(out).rstrip()

    lines = [render(head1), render(head2),
             "  ".join("-" * w for w in widths)]
    lines += [render(b) for b in body]
    return "\n".join(lines)


def tables(rows_out, servers):
    """The TABLES that have a server of their own in this run."""
    out, shown = [], set()
    for title, tservers, pairs in TABLES:
        own = [s for s in tservers if s not in shown]
        shown.update(tservers)
        if any(s in servers for s in own) and \
                any("results" in r for r in rows_out):
            out.append(title + "\n" + table(
                rows_out, [s for s in tservers if s in servers], pairs, own))
    return out


def memory_table(rows_out):
    lines = []
    for r in rows_out:
        if "memory" not in r:
            continue
        f = MEMORY_FIO
        lines.append(f"{r['workload']}: peak resident size (VmHWM) after "
                     f"fio {f.rw} {f.bs} QD{f.iodepth} x {f.numjobs} jobs "
                     f"across the disk; {IMAGES[r['image']].what}")
        lines.append(f"  {'server':28}  {'VmHWM MiB':>9}  {'IOPS':>9}")
        for label, res in r["memory"].items():
            lines.append(f"  {label:28}  {res['vmhwm_mib']:9.1f}  "
                         f"{res['iops']:9,.0f}")
    return "\n".join(lines)


def bitmaps_cost(rows_out):
    """Each server's overwrite-4k-bitmaps over its overwrite-4k."""
    by = {r["workload"]: r.get("results", {}) for r in rows_out}
    a, b = by.get("overwrite-4k-bitmaps"), by.get("overwrite-4k")
    if not a or not b:
        return ""
    cells = []
    for s in a:
        if s in b and b[s].get("mib_s") and a[s].get("mib_s") and \
                "CORRUPT" not in (a[s].get("check"), b[s].get("check")):
            cells.append(f"{s} {a[s]['mib_s'] / b[s]['mib_s']:.3f}")
    return ("keeping two enabled bitmaps (overwrite-4k-bitmaps / "
            "overwrite-4k, 1 = free): " + ", ".join(cells))


def size_table(rows_out):
    """File sizes of the compression rows (compression ratio vs QEMU)."""
    rows = [r for r in rows_out if "size plugin/qemu-img" in r]
    if not rows:
        return ""
    lines = [f"{'compressed image':24}  {'plugin MiB':>10}  "
             f"{'qemu-img MiB':>12}  {'plugin/qemu-img':>15}"]
    def mib(res):
        return "-" if not res else f"{res['file_mib']:,.1f}"

    for r in rows:
        p, q = r["results"].get("plugin"), r["results"].get("qemu-nbd")
        lines.append(f"{r['workload']:24}  {mib(p):>10}  {mib(q):>12}  "
                     f"{fmt_ratio(r['size plugin/qemu-img']):>15}")
    return "\n".join(lines)


# --------------------------------------------------------------------------

def parse_size(s):
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    s = s.strip().lower().rstrip("ib").rstrip("i")
    if s and s[-1] in units:
        return int(float(s[:-1]) * units[s[-1]])
    return int(s)


def main():
    ap = argparse.ArgumentParser(
        prog="bench/run.sh",
        description="Benchmark nbdkit-qcow2-plugin against qemu-nbd and "
                    "nbdkit-file-plugin with fio's nbd engine.")
    ap.add_argument("--quick", action="store_true",
                    help="3 s per row instead of 10 s")
    ap.add_argument("--runtime", type=float,
                    help="seconds of measurement per row and server "
                         "(default 10, --quick 3)")
    ap.add_argument("--ramp", type=float, default=1,
                    help="fio ramp time before each measurement (default 1)")
    ap.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="measure every row and server N times and report "
                         "the median (default 1)")
    ap.add_argument("--json", metavar="FILE",
                    help="also write the results as JSON to FILE "
                         "('-' for stdout)")
    ap.add_argument("--size", default="1G",
                    help="virtual disk size (default 1G)")
    ap.add_argument("--rows", help="comma-separated row names to run")
    ap.add_argument("--servers", default=",".join(SERVERS),
                    help="comma-separated servers (default: all: "
                         + ",".join(SERVERS) + ")")
    ap.add_argument("--workdir",
                    help="directory for images (default: a temporary "
                         "directory, removed at the end); existing images "
                         "there are reused")
    ap.add_argument("--keep", action="store_true",
                    help="keep the temporary directory")
    ap.add_argument("--list", action="store_true",
                    help="list the rows and exit")
    args = ap.parse_args()

    if args.list:
        for r in ROWS:
            print(f"{r.name:24} image={r.image} rw={r.rw} bs={r.bs} "
                  f"iodepth={r.iodepth} numjobs={r.numjobs}"
                  f"{' write' if r.write else ''}")
        for r in COMPRESS_ROWS:
            print(f"{r.name:24} image={r.image} compression_type={r.ctype} "
                  f"cluster_size={r.cluster_size} (nbdcopy / qemu-img "
                  f"convert -c)")
        return 0

    runtime = args.runtime or (3 if args.quick else 10)
    if args.repeat < 1:
        sys.exit("bench: --repeat must be at least 1")
    size = parse_size(args.size)
    plugin = os.path.abspath(os.environ.get("QCOW2_PLUGIN", DEFAULT_PLUGIN))
    compress_filter = os.path.abspath(os.environ.get(
        "QCOW2_COMPRESS_FILTER",
        os.path.join(os.path.dirname(os.path.dirname(plugin)), "filters",
                     "compress", "nbdkit-qcow2-compress-filter.so")))
    qcow2_filter = os.path.abspath(os.environ.get(
        "QCOW2_FILTER",
        os.path.join(os.path.dirname(os.path.dirname(plugin)), "filters",
                     "qcow2", "nbdkit-qcow2-filter.so")))
    servers = [s for s in args.servers.split(",") if s]
    for s in servers:
        if s not in SERVERS:
            sys.exit(f"bench: unknown server {s!r} (known: "
                     f"{', '.join(SERVERS)})")
    rows = ALL_ROWS
    if args.rows:
        want = args.rows.split(",")
        known = {r.name for r in ALL_ROWS}
        for w in want:
            if w not in known:
                sys.exit(f"bench: unknown row {w!r} (see --list)")
        rows = [r for r in ALL_ROWS if r.name in want]

    for prog in ("nbdkit", "qemu-img", "fio"):
        need(prog)
    if "qemu-nbd" in servers or "qemu-nbd-nbd" in servers:
        need("qemu-nbd")
    if any(s.startswith("filter-") for s in servers) and \
            not os.path.exists(qcow2_filter):
        sys.exit(f"bench: filter {qcow2_filter} not found: build it "
                 "(ninja -C build) or set QCOW2_FILTER")
    if "plugin" in servers and not os.path.exists(plugin):
        sys.exit(f"bench: plugin {plugin} not found: build it "
                 "(ninja -C build) or set QCOW2_PLUGIN")
    if any(isinstance(r, CompressRow) for r in rows):
        need("nbdcopy")
        if "plugin" in servers and not os.path.exists(compress_filter):
            sys.exit(f"bench: filter {compress_filter} not found: build it "
                     "(ninja -C build) or set QCOW2_COMPRESS_FILTER")

    features = plugin_features(plugin) if "plugin" in servers else {}
    if "plugin" in servers and features.get("qcow2_write") != "yes":
        skipped = [r.name for r in rows if r.write]
        if skipped:
            log("bench: the plugin cannot write yet; skipping "
                + ", ".join(skipped))
        rows = [r for r in rows if not r.write]

    if args.workdir:
        workdir = os.path.abspath(args.workdir)
        os.makedirs(workdir, exist_ok=True)
        cleanup = False
    else:
        workdir = tempfile.mkdtemp(prefix="qcow2-bench-",
                                   dir=os.environ.get("TMPDIR", "/var/tmp"))
        cleanup = not args.keep
    sockdir = tempfile.mkdtemp(prefix="qcow2-bench-sock-")
    sock = os.path.join(sockdir, "nbd.sock")
    uri = f"nbd+unix:///?socket={sock}"
    serverlog = os.path.join(workdir, "servers.log")
    log(f"bench: work directory {workdir}, {runtime:g} s per row and "
        f"server, server logs in {serverlog}")

    images = Images(workdir, size)
    # Reuse existing files in --workdir of the right size.
    if args.workdir:
        for img in IMAGES.values():
            for n in (img.qcow2, img.raw):
                p = images.path(n)
                if os.path.exists(p) and n.endswith(".raw") and \
                        os.path.getsize(p) == size:
                    images.built.add(n)
        for img in IMAGES.values():
            p = images.path(img.qcow2)
            if img.qcow2 and os.path.exists(p):
                info = json.loads(run(
                    ["qemu-img", "info", "--output=json", "-U", p],
                    stdout=subprocess.PIPE, text=True).stdout)
                if info.get("virtual-size") == size:
                    images.built.add(img.qcow2)

    rows_out = []
    try:
        for img_name in dict.fromkeys(r.image for r in rows):
            images.build(IMAGES[img_name])
        for row in rows:
            image = IMAGES[row.image]
            if isinstance(row, MemoryRow):
                rows_out.append({
                    "workload": row.name, "image": image.name,
                    "fio": dataclasses.asdict(MEMORY_FIO),
                    "memory": run_memory(row, servers, images, sock, uri,
                                         plugin, serverlog, runtime,
                                         args.ramp)})
                continue
            row_servers = servers if isinstance(row, Row) else \
                [s for s in servers if s in PLUGIN_SERVERS]
            samples = {s: [] for s in row_servers}
            warm_page_cache(images.files(image))
            # Repetitions go round the servers in turn, so slow drifts of
            # the machine hit every server alike.
            for rep in range(args.repeat):
                note = (f" (run {rep + 1}/{args.repeat})"
                        if args.repeat > 1 else "")
                for server in row_servers:
                    if isinstance(row, CompressRow):
                        res = run_compress(row, server, images, plugin,
                                           compress_filter, note)
                    else:
                        res = run_one(row, server, images, image, sock, uri,
                                      plugin, qcow2_filter, serverlog,
                                      runtime, args.ramp, note)
                    samples[server].append(res)
            results = {s: median_result(v) for s, v in samples.items()}
            entry = {
                "workload": row.name,
                "image": image.name,
                "write": row.write,
                "results": results,
            }
            entry.update((ratio_key(p), ratio(results, *p)) for p in RATIOS)
            if isinstance(row, CompressRow):
                entry["compression"] = {"compression_type": row.ctype,
                                      "cluster_size": row.cluster_size}
                p, q = results.get("plugin"), results.get("qemu-nbd")
                entry["size plugin/qemu-img"] = (
                    p["file_mib"] / q["file_mib"] if p and q else None)
            else:
                entry["fio"] = {"rw": row.rw, "bs": row.bs,
                              "iodepth": row.iodepth,
                              "numjobs": row.numjobs,
                              "extra": list(row.fio_extra)}
            rows_out.append(entry)
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
        if cleanup:
            shutil.rmtree(workdir, ignore_errors=True)
        elif rows_out:
            log(f"bench: images kept in {workdir}")

    out = sys.stderr if args.json == "-" else sys.stdout
    for t in tables(rows_out, servers):
        print(t, file=out)
        print(file=out)
    sizes = size_table(rows_out)
    for extra in (sizes, memory_table(rows_out), bitmaps_cost(rows_out)):
        if extra:
            print(extra, file=out)
            print(file=out)
    print("ratios are MiB/s (= IOPS) of one server divided by the other's; "
          "> 1 means the first is faster.", file=out)
    if sizes:
        print("compress-* rows: MiB/s of source copied; plugin = nbdcopy "
              "into nbdkit-qcow2-compress-filter, qemu-nbd = qemu-img "
              "convert -c, file-raw = nbdcopy to a raw file (no "
              "compression).", file=out)
    print(f"{runtime:g} s per row and server after a {args.ramp:g} s ramp"
          + (f", median of {args.repeat} runs" if args.repeat > 1 else "")
          + f", {os.cpu_count()} CPUs, virtual disk {size / GiB:g} GiB.",
          file=out)

    if args.json:
        doc = {
            "date": datetime.datetime.now(datetime.timezone.utc)
                    .isoformat(timespec="seconds"),
            "host": {"cpus": os.cpu_count(), "kernel": platform.release(),
                     "machine": platform.machine()},
            "versions": {
                "plugin": features.get("qcow2_version", "?"),
                "nbdkit": tool_version(["nbdkit", "--version"]),
                "qemu-nbd": tool_version(["qemu-nbd", "--version"]),
                "fio": tool_version(["fio", "--version"]),
            },
            "plugin": plugin,
            "qcow2_filter": qcow2_filter,
            "settings": {"runtime_s": runtime, "ramp_s": args.ramp,
                         "repeat": args.repeat,
                         "virtual_size": size, "servers": servers},
            "images": {k: v.what for k, v in IMAGES.items()
                       if any(r.image == k for r in rows)},
            "rows": rows_out,
        }
        text = json.dumps(doc, indent=2) + "\n"
        if args.json == "-":
            sys.stdout.write(text)
        else:
            with open(args.json, "w") as f:
                f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
