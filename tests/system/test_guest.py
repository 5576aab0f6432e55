"""A Linux guest on the plugin's export.

The guest (guest.py) boots under QEMU with the export as its virtio-blk
disk, formats ext4 and writes files in a first boot, reads them back,
deletes them and runs fstrim in a second.  After each boot the image
passes qemu-img check and the host reads the same files (same sha256)
from what qemu-img convert makes of the image.  Deleting and trimming
must give the space back: the image's allocation shrinks by at least the
8 MiB of random data the guest wrote (f1, which nothing can compress).

The same on a plain image, on an overlay over a backing file (the
backing file stays byte for byte the same), through the compress filter
(the image holds compressed clusters) and through nbdkit's cow filter
(the image is not modified at all; the second boot sees the first one's
writes in the filter's overlay).
"""

import hashlib
import random
import subprocess

from conftest import COMPRESS_FILTER, qemu_img, serve
import guest as g

SIZE = "128M"


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ext4_image(path, tmp_path, files):
    """A qcow2 image holding an ext4 file system (made on the host by
    mke2fs -d) with files {name: bytes}; returns {name: sha256}."""
    src = tmp_path / "ext4-src"
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    raw = tmp_path / "ext4.raw"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(src), str(raw), SIZE],
                   check=True)
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, path)
    raw.unlink()
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def base_files():
    rnd = random.Random(10)
    return {"b1": rnd.randbytes(1 << 20), "b2": b"backing file\n" * 5000}


def booter(guest, workdir):
    """Boot guest with qemu-system-x86_64 on an export: g.boot(guest, ...)."""
    return lambda sock, steps: g.boot(guest, sock, steps, workdir)


def test_plain_image(guest, tmp_path):
    image = str(tmp_path / "disk.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", image, SIZE)
    g.write_then_trim(image, tmp_path, booter(guest, tmp_path))


def test_overlay_over_backing_file(guest, tmp_path):
    base = str(tmp_path / "base.qcow2")
    files = ext4_image(base, tmp_path, base_files())
    base_sum = sha256_file(base)
    image = str(tmp_path / "overlay.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", image)
    g.write_then_trim(image, tmp_path, booter(guest, tmp_path), before=files)
    assert sha256_file(base) == base_sum, "the backing file changed"
    g.assert_clean(base)


def test_compress_filter(guest, tmp_path):
    image = str(tmp_path / "compressed.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", image, SIZE)
    report = g.write_then_trim(image, tmp_path, booter(guest, tmp_path),
                                filters=[COMPRESS_FILTER])
    assert report["compressed-clusters"] > 0, report


def test_cow_filter(guest, tmp_path):
    """nbdkit's cow filter over the plugin: the guest's writes and trims
    live in the filter's overlay for the life of the server; the image is
    untouched.  The host reads the guest's files through the export."""
    image = str(tmp_path / "disk.qcow2")
    files = ext4_image(image, tmp_path, base_files())
    image_sum = sha256_file(image)
    with serve(image, filters=["cow"]) as srv:
        out = g.boot(guest, srv.sock, ["sums", "write", "sums"], tmp_path)
        assert out.sums[0] == files
        written = out.sums[1]
        assert set(written) == set(files) | set(g.GUEST_FILES)
        assert g.host_files(srv.uri, tmp_path, fmt="raw") == written

        out = g.boot(guest, srv.sock, g.TRIM, tmp_path)
        assert out.sums == [written, files]
        assert g.host_files(srv.uri, tmp_path, fmt="raw") == files
    assert sha256_file(image) == image_sum, "the image under the cow filter changed"
    g.assert_clean(image)
    assert g.host_files(image, tmp_path) == files
