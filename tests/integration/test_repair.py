"""Consistency: dirty-image repair, check=, overlap protection, bitmaps.

QEMU is the oracle: qemu-img check must call the result clean, and data
must equal what QEMU itself reads (after its own repair where needed).
"""
import json
import os
import re
import struct
import subprocess

import nbd
import pytest

from conftest import PLUGIN, nbdkit_env, qemu_img, qemu_io, qemu_raw, serve


def make_dirty(path):
    """A lazy-refcount image left dirty by a crash, as iotest 039 makes it."""
    qemu_img("create", "-f", "qcow2", "-o", "lazy_refcounts=on", path, "64M")
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 1M",
                    "-c", "write -P 0x33 8M 512k", "-c", "sigraise 9",
                    str(path)], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    assert incompatible_features(path) & 1, "qemu-io did not leave it dirty"
    assert qemu_img("check", path, check=False).returncode == 2


def incompatible_features(path):
    with open(path, "rb") as f:
        f.seek(72)
        return struct.unpack(">Q", f.read(8))[0]


def check_clean(path):
    r = qemu_img("check", "--output=json", path, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    info = json.loads(r.stdout)
    assert info.get("leaks", 0) == 0 and info.get("corruptions", 0) == 0


def run_plugin(path, *params, script="pass"):
    cmd = ["nbdkit", "-U", "-", PLUGIN, "file=%s" % path, *params, "--run",
           "/usr/bin/python3 -c 'import nbd,os,sys; h=nbd.NBD(); "
           "h.connect_uri(sys.argv[1]); %s' \"$uri\"" % script]
    return subprocess.run(cmd, text=True, capture_output=True,
                          env=nbdkit_env(), timeout=120)


def test_dirty_image_is_repaired_on_first_write(tmp_path):
    img = tmp_path / "dirty.qcow2"
    make_dirty(img)
    # What QEMU reads after its own repair is the reference.
    ref = tmp_path / "ref.qcow2"
    qemu_img("convert", "-O", "qcow2", img, ref)
    expect = open(qemu_raw(ref, tmp_path), "rb").read()

    r = run_plugin(img, script="h.pwrite(b\"y\" * 4096, 20 << 20); h.flush()")
    assert r.returncode == 0, r.stderr
    assert incompatible_features(img) & 1 == 0, "dirty bit still set"
    check_clean(img)
    got = open(qemu_raw(img, tmp_path), "rb").read()
    expect = expect[:20 << 20] + b"y" * 4096 + expect[(20 << 20) + 4096:]
    assert got == expect


def test_dirty_image_serves_read_only_unchanged(tmp_path):
    img = tmp_path / "dirty.qcow2"
    make_dirty(img)
    before = open(img, "rb").read()
    with serve(img) as srv:
        h = srv.connect()
        h.pread(4096, 0)
        h.shutdown()
    # Only reading: nothing was repaired or written.
    assert before == open(img, "rb").read()


def test_check_report_and_repair(tmp_path):
    img = tmp_path / "dirty.qcow2"
    make_dirty(img)
    r = run_plugin(img, "check=report")
    assert r.returncode == 0, r.stderr
    assert "corruptions" in r.stderr and " 0 corruptions" not in r.stderr

    r = run_plugin(img, "check=repair")
    assert r.returncode == 0, r.stderr
    check_clean(img)


def test_check_rejects_bad_value(tmp_path):
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", img, "1M")
    r = run_plugin(img, "check=maybe")
    assert r.returncode != 0 and "check must be" in r.stderr


def l2_offset_of_first_cluster(path):
    data = open(path, "rb").read()
    l1 = struct.unpack(">Q", data[40:48])[0]
    rt = struct.unpack(">Q", data[48:56])[0]
    refblock = struct.unpack(">Q", data[rt:rt + 8])[0]
    l2 = struct.unpack(">Q", data[l1:l1 + 8])[0] & 0x00fffffffffffe00
    return l2, refblock


def test_write_over_metadata_is_refused_and_marks_corrupt(tmp_path):
    """iotest 060: an L2 entry pointing at a refcount block."""
    img = tmp_path / "o.qcow2"
    qemu_img("create", "-f", "qcow2", img, "64M")
    qemu_io(img, "write -P 1 0 64k", "write -P 2 1M 64k")
    l2, refblock = l2_offset_of_first_cluster(img)
    with open(img, "r+b") as f:
        f.seek(l2)
        f.write(struct.pack(">Q", refblock | 1 << 63))
    with serve(img) as srv:
        h = srv.connect()
        with pytest.raises(nbd.Error) as e:
            h.pwrite(b"x" * 512, 0)
        assert e.value.errno == "EIO"
        # Other data still reads; further writes fail.
        assert h.pread(16, 1 << 20) == b"\x02" * 16
        with pytest.raises(nbd.Error):
            h.pwrite(b"x" * 512, 2 << 20)
        h.shutdown()
        assert "Marking image as corrupt" in srv.stderr
    assert incompatible_features(img) & 2, "corrupt bit not set"
    # The refcount block survived.
    r = qemu_img("info", img)
    assert "corrupt: true" in r.stdout


def test_corrupt_image_is_served_read_only(tmp_path):
    img = tmp_path / "c.qcow2"
    qemu_img("create", "-f", "qcow2", img, "1M")
    with open(img, "r+b") as f:
        f.seek(72)
        f.write(struct.pack(">Q", 2))
    before = open(img, "rb").read()
    with serve(img) as srv:
        h = srv.connect()
        assert h.is_read_only()
        assert h.pread(512, 0) == bytes(512)
        with pytest.raises(nbd.Error):
            h.pwrite(b"x", 0)
        h.shutdown()
    assert before == open(img, "rb").read()


@pytest.mark.parametrize("nbitmaps", [1, 3])
def test_bitmaps_kept_on_write(tmp_path, nbitmaps):
    """Bitmaps are maintained, not released: after our write they are
    still there, consistent, and the image is clean (test_bitmaps.py
    checks what they record)."""
    img = tmp_path / "b.qcow2"
    qemu_img("create", "-f", "qcow2", img, "64M")
    for i in range(nbitmaps):
        qemu_img("bitmap", "--add", img, "bm%d" % i)
    qemu_io(img, "write -P 7 0 1M")
    r = run_plugin(img, script="h.pwrite(b\"z\" * 4096, 8 << 20); h.flush()")
    assert r.returncode == 0, r.stderr
    check_clean(img)
    info = json.loads(qemu_img("info", "--output=json", img).stdout)
    bitmaps = info["format-specific"]["data"]["bitmaps"]
    assert sorted(b["name"] for b in bitmaps) == \
        ["bm%d" % i for i in range(nbitmaps)]
    assert all(b["flags"] == ["auto"] for b in bitmaps), bitmaps
    with serve(img) as srv:
        h = srv.connect()
        assert h.pread(4096, 8 << 20) == b"z" * 4096
        assert h.pread(4096, 0) == b"\x07" * 4096
        h.shutdown()


def test_lazy_refcounts_image_stays_clean(tmp_path):
    img = tmp_path / "l.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "lazy_refcounts=on", img, "16M")
    r = run_plugin(img, script="h.pwrite(os.urandom(1 << 20), 3 << 20)")
    assert r.returncode == 0, r.stderr
    assert incompatible_features(img) & 1 == 0
    check_clean(img)


def set_copied_bit(path, offset, on):
    """Set or clear bit 63 (COPIED) of the big-endian entry at offset."""
    with open(path, "r+b") as f:
        f.seek(offset)
        e = struct.unpack(">Q", f.read(8))[0]
        e = e | (1 << 63) if on else e & ~(1 << 63)
        f.seek(offset)
        f.write(struct.pack(">Q", e))


def reported_corruptions(path):
    r = run_plugin(path, "check=report")
    assert r.returncode == 0, r.stderr
    m = re.search(r"check of .*: (\d+) corruptions", r.stderr)
    assert m, r.stderr
    return int(m.group(1))


def qemu_corruptions(path):
    r = qemu_img("check", "--output=json", path, check=False)
    return json.loads(r.stdout).get("corruptions", 0)


@pytest.mark.parametrize("where", ["shared-l2-entry", "shared-l1-entry",
                                   "owned-l2-entry", "data-file-entry"])
def test_copied_flags_judged_as_qemu_judges_them(tmp_path, where):
    """A wrong COPIED flag counts as one corruption, for QEMU and for us,
    inside a table a snapshot shares as well as in an owned one, and with
    an external data file (whose clusters count as refcount 1); repair
    makes QEMU call the image clean and keeps every byte."""
    img = tmp_path / "a.qcow2"
    opts = (["-o", "data_file=%s" % (tmp_path / "d.raw")]
            if where == "data-file-entry" else [])
    qemu_img("create", "-f", "qcow2", *opts, img, "4M")
    qemu_io(img, "write -P 0x61 0 64k", "write -P 0x62 1M 64k")
    if where.startswith("shared"):
        qemu_img("snapshot", "-c", "s1", img)
    l2, _ = l2_offset_of_first_cluster(img)
    l1 = struct.unpack(">Q", open(img, "rb").read()[40:48])[0]
    if where == "shared-l2-entry":
        set_copied_bit(img, l2, True)          # refcount 2: must be clear
    elif where == "shared-l1-entry":
        set_copied_bit(img, l1, True)          # table refcount 2
    else:
        set_copied_bit(img, l2 + 16 * 8, False)  # refcount 1: must be set
    before = open(qemu_raw(img, tmp_path), "rb").read()
    assert qemu_corruptions(img) == 1
    assert reported_corruptions(img) == 1

    r = run_plugin(img, "check=repair")
    assert r.returncode == 0, r.stderr
    check_clean(img)
    assert open(qemu_raw(img, tmp_path), "rb").read() == before
