"""Internal snapshots as exports, and the qcow2-snapshot filter.

Every snapshot read must equal qemu-img convert -l snapshot.name=NAME.
"""
import subprocess

import nbd
import pytest

from conftest import (PLUGIN, SNAPSHOT_FILTER as FILTER, assert_same_as_raw,
                      nbdkit_env, qemu_img, qemu_io, qemu_raw, serve)


@pytest.fixture
def image(tmp_path):
    """Three generations: snapshots 'first' (id 1), 'second' (id 2), active."""
    img = tmp_path / "s.qcow2"
    qemu_img("create", "-f", "qcow2", img, "8M")
    qemu_io(img, "write -P 1 0 1M", "write -P 9 6M 64k")
    qemu_img("snapshot", "-c", "first", img)
    qemu_io(img, "write -P 2 0 512k", "write -z 6M 64k")
    qemu_img("snapshot", "-c", "second", img)
    qemu_io(img, "write -P 3 256k 64k", "write -P 4 7M 4k")
    return img


def snapshot_raw(img, tmp_path, name):
    return qemu_raw(img, tmp_path, "-l", "snapshot.name=" + name)


def test_list_exports(image):
    with serve(image) as srv:
        h = nbd.NBD()
        h.set_opt_mode(True)
        h.connect_uri(srv.uri)
        names = []
        h.opt_list(lambda name, desc: names.append((name, desc)))
        h.opt_abort()
    assert [n for n, _ in names] == ["", "first", "second"]
    assert "snapshot id 1" in names[1][1] and "read-only" in names[1][1]


@pytest.mark.parametrize("export,name", [("first", "first"), ("second", "second"),
                                         ("1", "first"), ("2", "second")])
def test_snapshot_export_reads_like_qemu(image, tmp_path, export, name):
    raw = snapshot_raw(image, tmp_path, name)
    with serve(image) as srv:
        h = srv.connect(export)
        assert h.is_read_only()
        assert_same_as_raw(h, raw)
        with pytest.raises(nbd.Error):
            h.pwrite(b"x", 0)
        h.shutdown()


def test_snapshot_stays_intact_while_active_is_written(image, tmp_path):
    raw = snapshot_raw(image, tmp_path, "first")
    with serve(image) as srv:
        active = srv.connect()
        snap = srv.connect("first")
        active.pwrite(b"\xee" * (2 << 20), 0)
        active.zero(1 << 20, 6 << 20)
        active.flush()
        assert_same_as_raw(snap, raw)
        snap.shutdown()
        active.shutdown()
    assert qemu_img("check", image, check=False).returncode == 0
    with open(qemu_raw(image, tmp_path, "-l", "snapshot.name=first"), "rb") as f:
        assert f.read() == open(raw, "rb").read()


def test_unknown_snapshot_export_fails(image):
    with serve(image) as srv:
        with pytest.raises(nbd.Error):
            srv.connect("nope")
        assert "no snapshot with name or id 'nope'" in srv.stderr


def run_filter(image, *args, run="nbdcopy \"$uri\" \"$OUT\"", env=None):
    cmd = ["nbdkit", "-U", "-", "--filter=" + FILTER, PLUGIN,
           "file=%s" % image, *args, "--run", run]
    e = nbdkit_env()
    e.update(env or {})
    return subprocess.run(cmd, text=True, capture_output=True, env=e,
                          timeout=120)


@pytest.mark.parametrize("snapshot,name", [("second", "second"), ("1", "first")])
def test_filter_serves_the_snapshot(image, tmp_path, snapshot, name):
    out = tmp_path / "out.raw"
    r = run_filter(image, "snapshot=" + snapshot, env={"OUT": str(out)})
    assert r.returncode == 0, r.stderr
    assert open(out, "rb").read() == open(snapshot_raw(image, tmp_path, name), "rb").read()


def test_filter_ignores_the_export_name_asked_for(image, tmp_path):
    out = tmp_path / "out.raw"
    r = run_filter(image, "snapshot=first", env={"OUT": str(out)},
                   run='nbdcopy "nbd+unix:///anything?socket=$unixsocket" "$OUT"')
    assert r.returncode == 0, r.stderr
    assert open(out, "rb").read() == open(snapshot_raw(image, tmp_path, "first"), "rb").read()


def test_filter_missing_snapshot_is_a_clear_error(image):
    r = run_filter(image, "snapshot=nope", run='nbdinfo "$uri"')
    assert r.returncode != 0
    assert "no snapshot with name or id 'nope'" in r.stderr


def test_filter_requires_snapshot_key(image):
    r = run_filter(image, run="true")
    assert r.returncode != 0 and "snapshot=NAME parameter is required" in r.stderr


def test_filter_in_chain_with_cow_blocksize_and_log(image, tmp_path):
    out = tmp_path / "out.raw"
    cmd = ["nbdkit", "-U", "-", "--filter=log", "--filter=cow",
           "--filter=" + FILTER, "--filter=blocksize", PLUGIN,
           "file=%s" % image, "snapshot=first", "logfile=" + str(tmp_path / "log"),
           "maxlen=4096", "--run",
           "/usr/bin/python3 -c 'import nbd,sys; h=nbd.NBD(); h.connect_uri(sys.argv[1]);"
           " h.pwrite(b\"w\"*512, 0); assert h.pread(512, 0) == b\"w\"*512' \"$uri\""
           " && nbdcopy \"$uri\" " + str(out)]
    before = open(image, "rb").read()
    r = subprocess.run(cmd, text=True, capture_output=True, env=nbdkit_env(),
                       timeout=120)
    assert r.returncode == 0, r.stderr
    expect = bytearray(open(snapshot_raw(image, tmp_path, "first"), "rb").read())
    expect[0:512] = b"w" * 512           # the cow overlay took the write
    assert open(out, "rb").read() == bytes(expect)
    assert open(image, "rb").read() == before   # the image never changed
