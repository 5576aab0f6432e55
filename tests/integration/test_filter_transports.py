"""nbdkit-qcow2-filter over real transports: ssh, HTTP (curl) and S3.

Each test starts the real server from Debian's packages (servers.py), puts
a qcow2 image made by qemu-img in it, serves it with
`nbdkit --filter=qcow2 PLUGIN ...`, and compares with QEMU's answers:
reads byte for byte with `qemu-img convert -O raw`, block status with
`qemu-img map`, and after writes through the export, the container checked
with `qemu-img check` and compared with a local copy that qemu-io wrote
the same way.

The layer below is a fixed-size container: each image file is made larger
than the image (`truncate`) so that new clusters have room, and it must not
grow.  ssh and curl are SERIALIZE_REQUESTS plugins (the filter serialises
its shared context), S3 is a parallel Python plugin.
"""

import concurrent.futures
import hashlib
import json
import os
import shutil
import uuid

import nbd
import pytest

import servers
from conftest import (FILTER, assert_same_as_raw, nbdkit_env, qemu_img,
                      qemu_raw, run)
from images import (check_extents, connect_meta, create, write,
                    write_patterns)

FILTER_ARG = "--filter=" + FILTER

K = 1024
M = 1024 * K
SIZE = 64 * M                 # virtual size of the test images

# Data already in the image before it is served: allocated, zero and
# compressed clusters, unaligned edges.
LAYOUT = [(0x41, 0, 256 * K),
          (0x42, 1 * M + 3, 70 * K),
          (None, 3 * M, 1 * M),
          (0x43, 5 * M, 512 * K, "-c"),
          (0x44, SIZE - 64 * K, 64 * K)]

# What a client writes through the export (qemu-io commands): overwrites
# of allocated clusters, new allocations, unaligned edges, zero and
# discard of data, a write next to the end.
CLIENT_WRITES = ["write -P 0x51 4096 8192",
                 "write -P 0x52 1000000 300000",
                 "write -P 0x53 9M 2M",
                 "write -z 64K 128K",
                 "discard 5M 256K",
                 "write -P 0x54 %d 4099" % (SIZE - 5000)]


def make_image(path, container_size=None):
    """A qcow2 image with LAYOUT, in a file of container_size bytes."""
    create(path, SIZE)
    write_patterns(path, LAYOUT)
    if container_size is not None:
        assert os.path.getsize(path) <= container_size
        os.truncate(path, container_size)
    return path


def nbdcopy(src, dst, *opts):
    """nbdcopy, failing the test with its message."""
    p = run("nbdcopy", *opts, src, dst, check=False)
    assert p.returncode == 0, p.stderr


def random_file(path, size):
    with open(path, "wb") as f:
        f.write(os.urandom(size))
    return path


CONNECTIONS = 4
PIECE = 64 * K


def on_connections(uri, work):
    """work(h, i) on CONNECTIONS connections at once, one thread each
    (libnbd lets other threads run while it waits): the requests reach
    the filter's shared context of the layer below concurrently."""
    def one(i):
        h = nbd.NBD()
        h.connect_uri(uri)
        assert h.can_multi_conn()
        work(h, i)
        h.shutdown()

    with concurrent.futures.ThreadPoolExecutor(CONNECTIONS) as pool:
        for f in [pool.submit(one, i) for i in range(CONNECTIONS)]:
            f.result()


def interleaved(i, size):
    """The PIECE-sized pieces of [0, size) that connection i handles."""
    return range(i * PIECE, size, CONNECTIONS * PIECE)


def write_through(uri, data):
    """A client's writes through the export: CLIENT_WRITES with qemu-io,
    then the file data at offset 0 from all connections at once, each
    writing every CONNECTIONS-th piece (allocations in the same tables),
    then a flush."""
    write(uri, *CLIENT_WRITES, fmt="raw")
    with open(data, "rb") as f:
        buf = f.read()

    def work(h, i):
        for off in interleaved(i, len(buf)):
            h.pwrite(buf[off:off + PIECE], off)
        h.flush()

    on_connections(uri, work)


def write_mirror(mirror, data):
    """The same writes as write_through, by qemu-io on a local image."""
    write(mirror, *CLIENT_WRITES,
          "write -s %s 0 %d" % (data, os.path.getsize(data)))


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def assert_check_clean(path):
    """qemu-img check: no corruption, no leak (exit 0)."""
    p = qemu_img("check", str(path), check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def assert_same_image(a, b):
    """qemu-img compare: the guest sees identical disks."""
    p = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", str(a), str(b),
                 check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def read_whole(srv, tmp_path, oracle_image):
    """Every byte of the export equals qemu-img convert of oracle_image."""
    raw = qemu_raw(oracle_image, tmp_path)
    h = srv.connect()
    assert_same_as_raw(h, raw)
    h.shutdown()
    os.unlink(raw)


# --------------------------------------------------------------------------
# ssh

@pytest.fixture(scope="module")
def sshd():
    with servers.sshd() as s:
        yield s


def test_ssh_read(sshd, tmp_path):
    img = make_image(tmp_path / "disk.qcow2", 32 * M)
    with servers.nbdkit(FILTER_ARG, *sshd.plugin_args(img),
                        readonly=True) as srv:
        read_whole(srv, tmp_path, img)
        h = connect_meta(srv)
        check_extents(h, img, zero_required=True)
        h.shutdown()


def test_ssh_write(sshd, tmp_path):
    """Writes over sftp, from one client and from several connections at
    once (the ssh plugin is not parallel: the filter serialises its
    shared context); the file keeps its size and checks clean."""
    container = 48 * M
    img = make_image(tmp_path / "disk.qcow2", container)
    mirror = shutil.copy(img, tmp_path / "mirror.qcow2")
    data = random_file(tmp_path / "data.raw", 6 * M)
    with servers.nbdkit(FILTER_ARG, *sshd.plugin_args(img)) as srv:
        write_through(srv.uri, data)
    write_mirror(mirror, data)
    assert os.path.getsize(img) == container
    assert_check_clean(img)
    assert_same_image(img, mirror)


def test_ssh_create(sshd, tmp_path):
    """create=true formats an empty (all-zero) remote file as a qcow2 of
    its own options; an existing image there is refused, untouched."""
    container = 16 * M
    img = tmp_path / "new.qcow2"
    with open(img, "wb") as f:
        f.truncate(container)
    mirror = create(tmp_path / "mirror.qcow2", SIZE, "cluster_size=16384",
                    "extended_l2=on")
    data = random_file(tmp_path / "data.raw", 1 * M)
    with servers.nbdkit(FILTER_ARG, *sshd.plugin_args(img), "create=true",
                        "qcow2-size=%d" % SIZE, "cluster-size=16K",
                        "extended-l2=true") as srv:
        write_through(srv.uri, data)
    write_mirror(mirror, data)
    assert os.path.getsize(img) == container
    assert_check_clean(img)
    assert_same_image(img, mirror)
    info = json.loads(qemu_img("info", "--output=json", img).stdout)
    assert info["cluster-size"] == 16384
    assert info["format-specific"]["data"]["extended-l2"] is True

    before = sha256(img)
    rc, err = servers.nbdkit_refuses(FILTER_ARG, *sshd.plugin_args(img),
                                     "create=true", "qcow2-size=1M")
    assert rc > 0 and "not empty" in err and "overwrite" in err, err
    assert sha256(img) == before


# --------------------------------------------------------------------------
# HTTP: the curl plugin against nginx (GET with ranges; PUT refused)

@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """nginx over a fresh document root: yields (docroot, base URL)."""
    docroot = tmp_path_factory.mktemp("docroot")
    with servers.nginx(docroot) as url:
        yield docroot, url


def curl_args(url, name):
    return ["curl", "url=%s/%s" % (url, name)]


def test_curl_read(web, tmp_path):
    """Byte-exact with qemu-img convert, block status like qemu-img map;
    with -r the export is read-only and a write sent anyway is refused."""
    docroot, url = web
    img = make_image(docroot / "read.qcow2", 16 * M)
    with servers.nbdkit(FILTER_ARG, *curl_args(url, "read.qcow2"),
                        readonly=True) as srv:
        raw = qemu_raw(img, tmp_path)
        with open(raw, "rb") as f:
            expect = f.read()

        def work(h, i):      # the curl plugin is not parallel either
            for off in interleaved(i, len(expect)):
                assert h.pread(PIECE, off) == expect[off:off + PIECE], off

        on_connections(srv.uri, work)
        h = connect_meta(srv)
        assert h.is_read_only()
        check_extents(h, img, zero_required=True)
        h.set_strict_mode(0)          # send it despite the read-only flag
        with pytest.raises(nbd.Error) as e:
            h.pwrite(b"x" * 512, 0)
        assert e.value.errno in ("EROFS", "EPERM"), e.value
        assert h.pread(4096, 0) == b"\x41" * 4096
        h.shutdown()


def test_curl_write_fails_cleanly(web, tmp_path):
    """Without -r the curl plugin offers writes (it can PUT), which nginx
    refuses (405): a client's write fails with EIO, the server goes on
    serving, and the image is untouched."""
    docroot, url = web
    img = make_image(docroot / "rw.qcow2", 16 * M)
    before = sha256(img)
    with servers.nbdkit(FILTER_ARG, *curl_args(url, "rw.qcow2")) as srv:
        h = srv.connect()
        for off in (0, 20 * M):           # allocated, then a new cluster
            with pytest.raises(nbd.Error) as e:
                h.pwrite(b"x" * 4096, off)
            assert e.value.errno == "EIO", e.value
        h.shutdown()
        assert "405" in srv.stderr
        read_whole(srv, tmp_path, img)
    assert sha256(img) == before


def test_curl_snapshot_create_refused(web):
    """A startup key that must write the image fails at startup, naming
    what it could not write, and the image is untouched."""
    docroot, url = web
    img = make_image(docroot / "snap.qcow2", 16 * M)
    before = sha256(img)
    rc, err = servers.nbdkit_refuses(FILTER_ARG, *curl_args(url, "snap.qcow2"),
                                     "snapshot-create=s1")
    assert rc > 0 and "could not write" in err, err
    assert sha256(img) == before


def test_curl_backing_dir(web, tmp_path):
    """An overlay served over HTTP whose backing file is found in the
    local directory named by backing-dir=, and refused without it."""
    docroot, url = web
    local = tmp_path / "backing"
    local.mkdir()
    base = create(local / "base.qcow2", SIZE)
    write_patterns(base, [(0x61, 0, 2 * M), (0x62, 7 * M, 3 * M)])
    # Made next to its backing file so that QEMU (the oracle) finds it
    # by the relative name it records, then published.
    overlay = create(local / "overlay.qcow2", None, backing="base.qcow2",
                     backing_fmt="qcow2")
    write_patterns(overlay, [(0x71, 1 * M, 64 * K), (None, 8 * M, 1 * M),
                             (0x72, 9 * M + 7, 1000)])
    published = shutil.copy(overlay, docroot / "overlay.qcow2")
    os.truncate(published, 4 * M)
    args = [FILTER_ARG, *curl_args(url, "overlay.qcow2")]

    with servers.nbdkit(*args, "backing-dir=%s" % local) as srv:
        read_whole(srv, tmp_path, overlay)
        h = connect_meta(srv)
        check_extents(h, overlay)
        h.shutdown()

    rc, err = servers.nbdkit_refuses(*args)
    assert rc > 0 and "backing-dir=" in err, err
    # A directory that does not hold the backing file: not found there.
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, err = servers.nbdkit_refuses(*args, "backing-dir=%s" % empty)
    assert rc > 0 and "base.qcow2" in err, err


# --------------------------------------------------------------------------
# S3: the S3 plugin against Ceph's radosgw

@pytest.fixture(scope="session")
def s3():
    """One Ceph cluster for the whole run (about 20 s to start); a bucket
    for the tests."""
    if "libasan" in nbdkit_env().get("LD_PRELOAD", ""):
        # glibc's locale lock is broken in nbdkit under the preloaded
        # runtime (see tests/fixtures/freelocale-shim.c): the python
        # plugin blocks for ever in setlocale, called by Py_PreInitialize.
        pytest.skip("nbdkit's python plugin (S3) hangs at load with "
                    "libasan preloaded: LD_PRELOAD=$(gcc "
                    "-print-file-name=libasan.so) nbdkit python --dump-plugin")
    with servers.ceph_s3() as s:
        s.client().create_bucket(Bucket="vms")
        yield s


def s3_args(s3, key, container, object_size):
    """The S3 plugin reports its object size as the minimum block size,
    which nbdkit 1.32 refuses above 64K: larger objects need
    blocksize-policy to announce a smaller one, with all three sizes
    (with one missing it asks the plugin, which fails); the plugin then
    reads, modifies and writes whole objects."""
    args = s3.plugin_args("vms", key, "size=%d" % container,
                          "object-size=%d" % object_size)
    if object_size <= 64 * K:
        return args
    return ["--filter=blocksize-policy", *args, "blocksize-minimum=512",
            "blocksize-preferred=%d" % object_size,
            "blocksize-maximum=%d" % (32 * M)]


@pytest.mark.parametrize("object_size", [64 * K, 1 * M], ids=["64K", "1M"])
def test_s3_read_write_restart(s3, tmp_path, object_size):
    """A qcow2 stored as S3 objects: uploaded through the S3 plugin, read
    and written through the filter, read again by a new server, copied
    out and checked by QEMU.  Objects never written read as zeros: the
    container is the image followed by free space."""
    container = 32 * M
    img = make_image(tmp_path / "disk.qcow2")
    mirror = shutil.copy(img, tmp_path / "mirror.qcow2")
    key = "disk-" + uuid.uuid4().hex
    args = s3_args(s3, key, container, object_size)
    with servers.nbdkit(*args) as srv:
        nbdcopy(img, srv.uri, "--flush")

    # The plugin wants whole objects: the blocksize filter between makes
    # the engine's small metadata writes whole-object ones (the qcow2
    # filter refuses the S3 plugin without it).
    data = random_file(tmp_path / "data.raw", 2 * M)
    with servers.nbdkit(FILTER_ARG, "--filter=blocksize", *args) as srv:
        read_whole(srv, tmp_path, img)
        write_through(srv.uri, data)
    write_mirror(mirror, data)

    with servers.nbdkit(FILTER_ARG, "--filter=blocksize", *args,
                        readonly=True) as srv:
        read_whole(srv, tmp_path, mirror)
        h = connect_meta(srv)
        check_extents(h, mirror, zero_required=True)
        h.shutdown()

    out = tmp_path / "out.qcow2"
    with servers.nbdkit(*args, readonly=True) as srv:
        nbdcopy(srv.uri, out)
    assert os.path.getsize(out) == container
    assert_check_clean(out)
    assert_same_image(out, mirror)
