"""Shared fixtures for the integration tests.

QEMU is the oracle: images are made with qemu-img / qemu-io, served with
the plugin, and what an NBD client reads is compared with
`qemu-img convert -O raw` of the same image.

Environment:
  QCOW2_PLUGIN   path of nbdkit-qcow2-plugin.so (default: build/plugin/...)
  QCOW2_NBDKIT_ENV  extra environment for nbdkit, "K=V K=V" (sanitizer runs
                 use it for LD_PRELOAD and ASAN_OPTIONS)
"""

import contextlib
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
import time
import urllib.parse

import nbd
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLUGIN = os.environ.get(
    "QCOW2_PLUGIN", os.path.join(ROOT, "build", "plugin", "nbdkit-qcow2-plugin.so"))

CHUNK = 32 << 20


def nbdkit_env():
    env = dict(os.environ)
    for kv in shlex.split(os.environ.get("QCOW2_NBDKIT_ENV", "")):
        k, _, v = kv.partition("=")
        env[k] = v
    return env


def run(*cmd, check=True, **kw):
    """Run a command, returning CompletedProcess with text output."""
    return subprocess.run([str(c) for c in cmd], check=check, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def qemu_img(*args, **kw):
    return run("qemu-img", *args, **kw)


def qemu_io(image, *cmds, fmt="qcow2", extra=()):
    """Run qemu-io commands on an image (each cmd a string)."""
    args = ["qemu-io", "-f", fmt, *extra]
    for c in cmds:
        args += ["-c", c]
    args.append(str(image))
    return run(*args)


def qemu_raw(image, tmp_path, *convert_args):
    """Bytes of the image as QEMU reads it (qemu-img convert -O raw)."""
    fd, out = tempfile.mkstemp(dir=tmp_path, suffix=".raw")
    os.close(fd)
    qemu_img("convert", *convert_args, "-O", "raw", str(image), out)
    return out


@contextlib.contextmanager
def serve(image, *params, plugin=None, readonly=False, filters=()):
    """Serve image with the plugin on a private Unix socket; yield the URI.

    params are extra key=value strings (or paths).  readonly=True serves
    with nbdkit -r; filters are --filter= arguments, outermost first.
    The server is killed on exit and its stderr is available as the
    .stderr attribute of the yielded object.
    """
    d = tempfile.mkdtemp(prefix="qcow2-serve-")
    sock = os.path.join(d, "sock")
    pidfile = os.path.join(d, "pid")
    errlog = open(os.path.join(d, "stderr"), "w+")
    cmd = ["nbdkit", *(["-r"] if readonly else []), "-f", "-U", sock,
           "-P", pidfile, "-D", "nbdkit.backend.datapath=0",
           *["--filter=" + f for f in filters], plugin or PLUGIN,
           "file=" + str(image), *[str(p) for p in params]]
    p = subprocess.Popen(cmd, stderr=errlog, env=nbdkit_env())
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(pidfile):
            if p.poll() is not None:
                errlog.seek(0)
                raise RuntimeError("nbdkit exited %d: %s" % (p.returncode, errlog.read()))
            if time.monotonic() > deadline:
                raise RuntimeError("nbdkit did not start")
            time.sleep(0.02)
        yield Server("nbd+unix:///?socket=" + sock, sock, errlog)
    finally:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        errlog.close()
        shutil.rmtree(d, ignore_errors=True)


class Server:
    def __init__(self, uri, sock, errlog):
        self.uri = uri
        self.sock = sock
        self._errlog = errlog

    @property
    def stderr(self):
        self._errlog.flush()
        self._errlog.seek(0)
        return self._errlog.read()

    def connect(self, export=""):
        """Connect to an export (the URI carries the export name)."""
        h = nbd.NBD()
        h.connect_uri("nbd+unix:///%s?socket=%s"
                      % (urllib.parse.quote(export), self.sock))
        return h


def start_fails(image, *params):
    """Start the server on an image expected to be refused at startup.

    Returns (returncode, stderr).  A crash (signal) is reported as a
    negative return code, which callers must treat as a failure.
    """
    cmd = ["nbdkit", "-U", "-", PLUGIN, "file=" + str(image), *params,
           "--run", "true"]
    p = subprocess.run(cmd, text=True, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, env=nbdkit_env(), timeout=60)
    return p.returncode, p.stderr


def read_all(h, size=None):
    """Iterate over (offset, bytes) chunks of the whole export."""
    size = h.get_size() if size is None else size
    off = 0
    while off < size:
        n = min(CHUNK, size - off)
        yield off, h.pread(n, off)
        off += n


def assert_same_as_raw(h, raw_path):
    """The export reads exactly the bytes of raw_path, chunk by chunk."""
    size = os.path.getsize(raw_path)
    assert h.get_size() == size
    with open(raw_path, "rb") as f:
        for off, data in read_all(h, size):
            expect = f.read(len(data))
            if data != expect:
                first = next(i for i in range(len(data)) if data[i] != expect[i])
                pytest.fail("data differs from qemu-img at offset %d" % (off + first))


def assert_image_reads_like_qemu(image, tmp_path, *params, convert_args=()):
    """Serve image and compare every byte with qemu-img convert -O raw."""
    raw = qemu_raw(image, tmp_path, *convert_args)
    try:
        with serve(image, *params) as srv:
            h = srv.connect()
            assert_same_as_raw(h, raw)
            h.shutdown()
    finally:
        os.unlink(raw)


def digest(data):
    return hashlib.sha256(data).hexdigest()


def extents(h, offset=0, length=None):
    """base:allocation extents as a list of (offset, length, flags)."""
    size = h.get_size()
    length = size - offset if length is None else length
    out = []

    def cb(meta, off, entries, err):
        pos = off
        for i in range(0, len(entries), 2):
            out.append((pos, entries[i], entries[i + 1]))
            pos += entries[i]
        return 0

    end = offset + length
    while offset < end:
        before = len(out)
        h.block_status(min(end - offset, 1 << 30), offset, cb)
        assert len(out) > before
        offset = out[-1][0] + out[-1][1]
    return out


@pytest.fixture
def tmp(tmp_path):
    return tmp_path
