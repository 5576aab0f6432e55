"""Shared fixtures for the integration tests.

QEMU is the oracle: images are made with qemu-img / qemu-io, served with
the plugin, and what an NBD client reads is compared with
`qemu-img convert -O raw` of the same image.

The engine runs in one of three layers (the `layer` fixture; see
serve()): the plugin over the image file, or nbdkit-qcow2-filter over
nbdkit's file plugin holding the image, or over the data plugin holding a
copy of it in memory.

Environment:
  QCOW2_PLUGIN   path of nbdkit-qcow2-plugin.so (default: build/plugin/...)
  QCOW2_FILTER, QCOW2_SNAPSHOT_FILTER, QCOW2_COMPRESS_FILTER
                 paths of nbdkit-qcow2-filter.so and of the snapshot and
                 compress filters (default: in the plugin's build tree)
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
# The filters come from the plugin's build tree (a sanitizer build's
# plugin brings its own filters) unless named.
BUILD = os.path.dirname(os.path.dirname(os.path.abspath(PLUGIN)))


def _built(env, subdir, name):
    return os.environ.get(env, os.path.join(BUILD, "filters", subdir, name))


FILTER = _built("QCOW2_FILTER", "qcow2", "nbdkit-qcow2-filter.so")
SNAPSHOT_FILTER = _built("QCOW2_SNAPSHOT_FILTER", "snapshot",
                         "nbdkit-qcow2-snapshot-filter.so")
COMPRESS_FILTER = _built("QCOW2_COMPRESS_FILTER", "compress",
                         "nbdkit-qcow2-compress-filter.so")

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


# --------------------------------------------------------------------------
# The layer that runs the engine

# "plugin": nbdkit-qcow2-plugin on the image file.
# "filter-file": nbdkit-qcow2-filter over nbdkit's file plugin on the image
#   file, a fixed-size container (grown first to leave room for writes).
# "filter-memory": the filter over nbdkit's data plugin holding a copy of
#   the image in memory (reads only: writes do not reach the file).
# "filter-nbd", "filter-qemu-nbd": the filter over nbdkit's nbd plugin,
#   connected to nbdkit's file plugin or to qemu-nbd serving the file raw.
WRITE_LAYERS = ("plugin", "filter-file")
NBD_LAYERS = ("filter-nbd", "filter-qemu-nbd")
READ_LAYERS = WRITE_LAYERS + ("filter-memory",)
_layer = ["plugin"]

# Keys only the plugin has (the filter refuses them).
PLUGIN_ONLY_KEYS = ("locking=", "data-file=")


def _use_layer(request):
    _layer[0] = request.param
    yield request.param
    _layer[0] = "plugin"


# Test modules opt in with pytestmark = pytest.mark.usefixtures(...): every
# test then runs once per layer.
write_layer = pytest.fixture(params=WRITE_LAYERS, name="write_layer")(_use_layer)
read_layer = pytest.fixture(params=READ_LAYERS, name="read_layer")(_use_layer)
nbd_layer = pytest.fixture(params=NBD_LAYERS, name="nbd_layer")(_use_layer)
# Any layers, chosen by the test:
#   @pytest.mark.parametrize("layer", ["filter-file", ...], indirect=True)
layer = pytest.fixture(name="layer")(_use_layer)


def only_plugin(what):
    """Skip in the filter's layers a test of what only the plugin does."""
    if _layer[0] != "plugin":
        pytest.skip("%s: the plugin's alone" % what)


def container_room(image):
    """Bytes a file holding image should have so that writes fit in it as
    a container: three times the virtual disk and 64 MiB, or its size if
    larger (so that serving it again does not grow it again)."""
    size = os.path.getsize(image)
    with open(image, "rb") as f:
        head = f.read(32)
    if len(head) < 32 or head[:4] != b"QFI\xfb":
        return size
    vsize = int.from_bytes(head[24:32], "big")
    room = (3 * vsize + (64 << 20) + (1 << 20) - 1) & ~((1 << 20) - 1)
    return max(size, room)


def engine_args(image, params, readonly, plugin=None, below=(),
                lower_sock=None, room=True):
    """nbdkit's arguments that run the engine on image in the current
    layer, with the test's params (plugin spelling).  below: nbdkit
    filters to put under nbdkit-qcow2-filter (filter layers only).
    lower_sock: the lower server of an nbd layer (see serve()).  room:
    grow the file to leave room for writes (container_room)."""
    params = [str(p) for p in params]
    layer = _layer[0]
    if layer == "plugin":
        assert not below, "filters below the engine need a filter layer"
        return [plugin or PLUGIN, "file=" + str(image), *params]
    for p in params:
        if p.startswith(PLUGIN_ONLY_KEYS):
            pytest.skip("%s is a key of the plugin only" % p.split("=")[0])
    # The filter names the virtual size qcow2-size= (size= is the plugin
    # below's), and finds the files an image names in backing-dir=.
    params = ["qcow2-" + p if p.startswith("size=") else p for p in params]
    params.append("backing-dir=" + os.path.dirname(os.path.abspath(image)))
    filters = ["--filter=" + FILTER, *["--filter=" + f for f in below]]
    if layer in NBD_LAYERS:
        if not lower_sock:
            pytest.skip("the %s layer needs serve()" % layer)
        return [*filters, "nbd", "socket=" + lower_sock, *params]
    if layer == "filter-file":
        if room and not readonly:
            make_room(image)
        return [*filters, "file", "file=" + str(image), *params]
    return [*filters, "data", "data=<" + str(image),
            "size=%d" % container_room(image), *params]


def make_room(image):
    """Grow a file holding an image so that writes fit in it."""
    if os.path.exists(image):
        room = container_room(image)
        if os.path.getsize(image) < room:
            os.truncate(image, room)


@contextlib.contextmanager
def lower_server(image, layer, readonly, room=True):
    """The server below an nbd layer: nbdkit's file plugin, or qemu-nbd,
    serving the file holding the image raw on a Unix socket.  Yields the
    socket and the process."""
    d = tempfile.mkdtemp(prefix="qcow2-lower-")
    sock = os.path.join(d, "sock")
    if room and not readonly:
        make_room(image)
    ro = ["-r"] if readonly else []
    if layer == "filter-nbd":
        cmd = ["nbdkit", *ro, "-f", "-U", sock, "file", str(image)]
    else:
        cmd = ["qemu-nbd", *ro, "-f", "raw", "--discard=unmap", "-t",
               "-k", sock, str(image)]
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("%s did not start: %s"
                                   % (cmd[0], p.stderr.read()))
            time.sleep(0.02)
        yield sock, p
    finally:
        stop(p)
        p.stderr.close()
        shutil.rmtree(d, ignore_errors=True)


def stop(p, timeout=10):
    """Stop a server process: SIGTERM, SIGKILL after timeout seconds.
    Returns its exit status."""
    p.terminate()
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    return p.returncode


@contextlib.contextmanager
def serve(image, *params, plugin=None, readonly=False, filters=(), below=(),
          room=True):
    """Serve image with the engine on a private Unix socket; yield the URI.

    params are extra key=value strings (or paths).  readonly=True serves
    with nbdkit -r.  filters: nbdkit filters above the engine, outermost
    first; below: nbdkit filters under nbdkit-qcow2-filter.  The
    server is killed on exit and its stderr is available as the .stderr
    attribute of the yielded object (.lower: the lower server's process
    in the nbd layers).  room=False leaves a container file as it is.
    """
    with contextlib.ExitStack() as stack:
        lower = None
        if _layer[0] in NBD_LAYERS:
            lower = stack.enter_context(
                lower_server(image, _layer[0], readonly, room))
        args = engine_args(image, params, readonly, plugin, below,
                           lower[0] if lower else None, room)
        srv = stack.enter_context(nbdkit_server(
            [*["--filter=" + f for f in filters], *args], readonly))
        srv.lower = lower[1] if lower else None
        yield srv


@contextlib.contextmanager
def nbdkit_server(args, readonly=False, tcp_port=None):
    """nbdkit with args in the foreground, on a private Unix socket, or
    with tcp_port on that port of 127.0.0.1 (the Server's .uri says
    which); the Server's .process is its process, stopped on exit."""
    d = tempfile.mkdtemp(prefix="qcow2-serve-")
    sock = os.path.join(d, "sock")
    pidfile = os.path.join(d, "pid")
    errlog = open(os.path.join(d, "stderr"), "w+")
    listen = (["-i", "127.0.0.1", "-p", str(tcp_port)] if tcp_port
              else ["-U", sock])
    cmd = ["nbdkit", *(["-r"] if readonly else []), "-f", *listen,
           "-P", pidfile, "-D", "nbdkit.backend.datapath=0",
           *[str(a) for a in args]]
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
        yield Server("nbd://127.0.0.1:%d" % tcp_port if tcp_port
                     else "nbd+unix:///?socket=" + sock, sock, errlog, p)
    finally:
        stop(p)
        errlog.close()
        shutil.rmtree(d, ignore_errors=True)


class Server:
    def __init__(self, uri, sock, errlog, process=None):
        self.uri = uri
        self.sock = sock
        self._errlog = errlog
        self.process = process
        self.lower = None

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
