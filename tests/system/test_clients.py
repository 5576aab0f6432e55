"""Other NBD clients on the plugin's export, QEMU judging the result.

- nbdfuse: the export as a file; mkfs, loop mount, copy files in, and the
  host reads them back from the image (debugfs on qemu-img convert).
- qemu-img convert from an nbd+unix:// URI, and into one with -n -W -m 8
  (eight parallel, out-of-order writers into the plugin).
- nbdcopy with 4 connections, from the export and into it.

Each copy is checked with qemu-img compare against the source and every
image the plugin wrote with qemu-img check.
"""

import hashlib
import os
import shutil
import subprocess
import time

import pytest

from conftest import qemu_img, serve
import guest as g
import images

SIZE = 64 << 20
# Data of every kind, some of it unaligned, and holes between.
LAYOUT = [(0, 4 << 20, "text"), (10 << 20, 3 << 20, "random"),
          (20 << 20, 1 << 20, 0x55), ((33 << 20) + 512, 70000, "random"),
          (SIZE - (1 << 20), 1 << 20, "text")]
FUSE_WAIT = 30


@pytest.fixture
def source(tmp_path):
    """(raw, qcow2): the same 64 MiB guest disk as a raw file and as a
    qcow2 image made by qemu-img."""
    raw = images.raw_from_layout(str(tmp_path / "src.raw"), SIZE, LAYOUT)
    qcow2 = images.convert(raw, str(tmp_path / "src.qcow2"))
    return raw, qcow2


def assert_same(a, b, fmt_a="qcow2", fmt_b="qcow2"):
    p = qemu_img("compare", "-f", fmt_a, "-F", fmt_b, a, b, check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def empty_image(tmp_path, name):
    image = str(tmp_path / name)
    qemu_img("create", "-q", "-f", "qcow2", image, str(SIZE))
    return image


# --------------------------------------------------------------------------
# qemu-img convert

def test_qemu_img_convert_from_uri(tmp_path, source):
    raw, image = source
    out = str(tmp_path / "out.qcow2")
    with serve(image, readonly=True) as srv:
        qemu_img("convert", "-f", "raw", srv.uri, "-O", "qcow2", out)
    assert_same(image, out)
    assert_same(raw, out, fmt_a="raw")


def test_qemu_img_convert_into_uri(tmp_path, source):
    _, src = source
    image = empty_image(tmp_path, "into.qcow2")
    with serve(image) as srv:
        qemu_img("convert", "-n", "-W", "-m", "8", "-f", "qcow2", src,
                 "-O", "raw", srv.uri)
    g.assert_clean(image)
    assert_same(src, image)


# --------------------------------------------------------------------------
# nbdcopy

def test_nbdcopy_from_uri(tmp_path, source):
    raw, image = source
    out = str(tmp_path / "out.raw")
    with serve(image, readonly=True) as srv:
        subprocess.run(["nbdcopy", "--connections=4", srv.uri, out], check=True)
    assert_same(image, out, fmt_b="raw")
    with open(raw, "rb") as a, open(out, "rb") as b:
        assert a.read() == b.read()


def test_nbdcopy_into_uri(tmp_path, source):
    raw, src = source
    image = empty_image(tmp_path, "into.qcow2")
    with serve(image) as srv:
        subprocess.run(["nbdcopy", "--connections=4", "--flush", raw, srv.uri],
                       check=True)
    g.assert_clean(image)
    assert_same(src, image)


# --------------------------------------------------------------------------
# nbdfuse

def fuse_unavailable():
    """Why nbdfuse cannot mount here, or None."""
    if shutil.which("nbdfuse") is None:
        return "nbdfuse not installed (package libnbd-bin)"
    if shutil.which("fusermount3") is None:
        return "fusermount3 not installed (package fuse3)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices (/dev/loop-control)"
    return None


def test_nbdfuse_loop_mount(tmp_path):
    """The export as a file (nbdfuse), an ext4 file system made on it by
    mke2fs and loop-mounted; files copied in read back the same, from the
    mount and from the image."""
    reason = fuse_unavailable()
    if reason:
        pytest.skip(reason)
    image = empty_image(tmp_path, "fuse.qcow2")
    files = {"a": os.urandom(3 << 20), "b": b"nbdfuse\n" * 100000}
    sums = {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}
    fusedir, mnt = tmp_path / "fuse", tmp_path / "mnt"
    fusedir.mkdir()
    mnt.mkdir()
    disk = str(fusedir / "disk.raw")
    pidfile = str(tmp_path / "nbdfuse.pid")

    with serve(image) as srv:
        fuse = subprocess.Popen(["nbdfuse", "-P", pidfile, disk, srv.uri])
        try:
            deadline = time.monotonic() + FUSE_WAIT
            while not os.path.exists(pidfile):
                assert fuse.poll() is None, "nbdfuse exited %d" % fuse.returncode
                assert time.monotonic() < deadline, "nbdfuse did not mount"
                time.sleep(0.05)
            assert os.path.getsize(disk) == SIZE
            subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", disk], check=True)
            p = subprocess.run(["mount", "-o", "loop", disk, str(mnt)],
                               stderr=subprocess.PIPE, text=True)
            if p.returncode != 0:
                pytest.skip("cannot loop-mount the nbdfuse file: %s" % p.stderr.strip())
            try:
                for name, data in files.items():
                    src = tmp_path / name
                    src.write_bytes(data)
                    subprocess.run(["cp", str(src), str(mnt / name)], check=True)
            finally:
                subprocess.run(["umount", str(mnt)], check=True)
            # Mounted again, the files read back through FUSE and NBD.
            subprocess.run(["mount", "-o", "loop,ro", disk, str(mnt)], check=True)
            try:
                for name, digest in sums.items():
                    assert hashlib.sha256((mnt / name).read_bytes()).hexdigest() == digest
            finally:
                subprocess.run(["umount", str(mnt)], check=True)
        finally:
            subprocess.run(["fusermount3", "-u", str(fusedir)], check=False)
            try:
                fuse.wait(FUSE_WAIT)
            except subprocess.TimeoutExpired:
                fuse.kill()
                fuse.wait()
        assert fuse.returncode == 0
    g.assert_clean(image)
    assert g.host_files(image, tmp_path) == sums
