"""Image creation (create=true) and growth (resize=true).

Every created variant must pass qemu-img check, and qemu-img info must
show the requested options; QEMU must read back what a client wrote.
"""
import json
import os
import subprocess

import pytest

from conftest import PLUGIN, nbdkit_env, qemu_img, qemu_io

WRITE = ("/usr/bin/python3 -c 'import nbd,sys; h=nbd.NBD(); h.connect_uri(sys.argv[1]);"
         " h.pwrite(b\"A\"*70000, 1000); h.flush()' \"$uri\"")


def nbdkit(image, *params, run=WRITE):
    cmd = ["nbdkit", "-U", "-", PLUGIN, "file=%s" % image, *params, "--run", run]
    return subprocess.run(cmd, text=True, capture_output=True,
                          env=nbdkit_env(), timeout=300)


def info(image, *extra):
    r = qemu_img("info", "--output=json", *extra, image)
    return json.loads(r.stdout)


def check_clean(*args, cwd=None):
    r = qemu_img("check", *args, check=False, cwd=cwd)
    assert r.returncode == 0, r.stdout + r.stderr


CASES = [
    (["size=20G"], {"virtual-size": 20 << 30, "cluster-size": 65536,
                    "compat": "1.1", "refcount-bits": 16}),
    (["size=1G", "cluster-size=512", "refcount-bits=1"],
     {"cluster-size": 512, "refcount-bits": 1}),
    (["size=64M", "cluster-size=2M", "refcount-bits=64"],
     {"cluster-size": 2 << 20, "refcount-bits": 64}),
    (["size=100M", "compat=0.10"], {"compat": "0.10"}),
    (["size=100M", "extended-l2=true", "cluster-size=128K",
      "compression-type=zstd", "lazy-refcounts=true"],
     {"extended-l2": True, "compression-type": "zstd",
      "lazy-refcounts": True}),
    (["size=100M", "preallocation=metadata"], {}),
    (["size=12345678"], {"virtual-size": 12345856}),  # rounded as qemu-img
]


@pytest.mark.parametrize("params,expect", CASES,
                         ids=["_".join(p) for p, _ in CASES])
def test_create_variants(tmp_path, params, expect):
    img = tmp_path / "new.qcow2"
    r = nbdkit(img, "create=true", *params)
    assert r.returncode == 0, r.stderr
    check_clean(img)
    got = info(img)
    spec = got["format-specific"]["data"]
    for k, v in expect.items():
        if k in ("virtual-size", "cluster-size"):
            assert got[k] == v, (k, got[k])
        else:
            assert spec[k] == v, (k, spec)
    r = qemu_io(img, "read -P 0x41 1000 70000", "read -P 0 71000 4096")
    assert "read 70000/70000" in r.stdout


def test_preallocation_metadata_maps_every_cluster(tmp_path):
    img = tmp_path / "p.qcow2"
    assert nbdkit(img, "create=true", "size=8M", "preallocation=metadata",
                  run="true").returncode == 0
    check_clean(img)
    m = json.loads(qemu_img("map", "--output=json", img).stdout)
    assert all(e["data"] for e in m), m
    assert sum(e["length"] for e in m) == 8 << 20


def test_create_with_backing_takes_its_size(tmp_path):
    base = tmp_path / "base.raw"
    qemu_img("create", "-f", "raw", base, "50M")
    qemu_io(base, "write -P 9 0 1M", fmt="raw")
    img = tmp_path / "ov.qcow2"
    r = nbdkit(img, "create=true", "backing-file=base.raw",
               "backing-format=raw")
    assert r.returncode == 0, r.stderr
    check_clean(img)
    got = info(img)
    assert got["virtual-size"] == 50 << 20
    assert got["backing-filename"] == "base.raw"
    assert got["backing-filename-format"] == "raw"
    r = qemu_io(img, "read -P 0x41 1000 70000", "read -P 9 80000 900000")
    assert "read 900000/900000" in r.stdout


def test_create_qcow2_backing_chain(tmp_path):
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", base, "16M")
    qemu_io(base, "write -P 5 0 4M")
    img = tmp_path / "ov.qcow2"
    r = nbdkit(img, "create=true", "backing-file=base.qcow2",
               "backing-format=qcow2", "size=32M")
    assert r.returncode == 0, r.stderr
    check_clean(img)
    r = qemu_io(img, "read -P 5 0 1000", "read -P 0x41 1000 70000",
                "read -P 5 71000 1000000", "read -P 0 20M 1M")
    assert r.stdout.count("read ") == 4


@pytest.mark.parametrize("raw", [False, True])
def test_create_with_data_file(tmp_path, raw):
    img = tmp_path / "d.qcow2"
    params = ["create=true", "size=16M", "data-file=d.data"]
    if raw:
        params.append("data-file-raw=true")
    r = nbdkit(img, *params)
    assert r.returncode == 0, r.stderr
    # QEMU 7.2 resolves a relative data file name against its working
    # directory (we use the image's directory, as for backing files).
    check_clean(img, cwd=tmp_path)
    spec = json.loads(qemu_img("info", "--output=json", img, cwd=tmp_path)
                      .stdout)["format-specific"]["data"]
    assert spec["data-file"] == "d.data"
    assert spec["data-file-raw"] is raw
    r = subprocess.run(["qemu-io", "-c", "read -P 0x41 1000 70000", str(img)],
                       cwd=tmp_path, capture_output=True, text=True)
    assert "read 70000/70000" in r.stdout, r.stdout + r.stderr
    if raw:
        with open(tmp_path / "d.data", "rb") as f:
            data = f.read()
        assert data[1000:71000] == b"A" * 70000 and len(data) == 16 << 20


@pytest.mark.parametrize("cipher", [[], ["encrypt-cipher-alg=aes-128",
                                         "encrypt-cipher-mode=cbc",
                                         "encrypt-ivgen-alg=essiv",
                                         "encrypt-ivgen-hash-alg=sha256"]])
def test_create_luks(tmp_path, cipher):
    img = tmp_path / "e.qcow2"
    r = nbdkit(img, "create=true", "size=10M", "encrypt-format=luks",
               "passphrase=SECRET", "encrypt-iter-time=10", *cipher)
    assert r.returncode == 0, r.stderr
    opts = ["--object", "secret,id=s0,data=SECRET", "--image-opts",
            "driver=qcow2,file.filename=%s,encrypt.key-secret=s0" % img]
    check_clean(*opts)
    r = subprocess.run(["qemu-io", *opts, "-c", "read -P 0x41 1000 70000"],
                       capture_output=True, text=True)
    assert "read 70000/70000" in r.stdout, r.stdout + r.stderr
    spec = info(img)["format-specific"]["data"]["encrypt"]
    assert spec["format"] == "luks"
    # And we read it back ourselves after a restart.
    r = nbdkit(img, "passphrase=SECRET", run=(
        "/usr/bin/python3 -c 'import nbd,sys; h=nbd.NBD(); h.connect_uri(sys.argv[1]);"
        " assert h.pread(70000, 1000) == b\"A\"*70000' \"$uri\""))
    assert r.returncode == 0, r.stderr


def test_existing_file_is_never_clobbered(tmp_path):
    img = tmp_path / "keep.qcow2"
    img.write_bytes(b"precious")
    r = nbdkit(img, "create=true", "size=1M", run="true")
    assert r.returncode != 0 and "refusing to replace" in r.stderr
    assert img.read_bytes() == b"precious"
    r = nbdkit(img, "create=true", "overwrite=true", "size=1M", run="true")
    assert r.returncode == 0, r.stderr
    check_clean(img)


@pytest.mark.parametrize("params,message", [
    (["create=true"], "needs size="),
    (["create=true", "size=1M", "cluster-size=1000"], "power of two"),
    (["create=true", "size=1M", "extended-l2=true", "cluster-size=4K"],
     "at least 16384"),
    (["create=true", "size=1M", "compat=0.10", "lazy-refcounts=true"],
     "compat=0.10"),
    (["create=true", "size=1M", "encrypt-format=luks"], "passphrase"),
    (["size=1M", "cluster-size=4K"], "only apply with create=true"),
])
def test_bad_creation_options(tmp_path, params, message):
    img = tmp_path / "x.qcow2"
    r = nbdkit(img, *params, run="true")
    assert r.returncode != 0 and message in r.stderr, r.stderr
    assert not img.exists()


@pytest.mark.parametrize("cluster", ["512", "64K"])
def test_resize_grows_and_keeps_data(tmp_path, cluster):
    img = tmp_path / "g.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=" + cluster, img, "64M")
    qemu_io(img, "write -P 7 0 1M")
    r = nbdkit(img, "size=10G", run="true")
    assert r.returncode != 0 and "resize=true" in r.stderr
    r = nbdkit(img, "size=10G", "resize=true", run=(
        "/usr/bin/python3 -c 'import nbd,sys; h=nbd.NBD(); h.connect_uri(sys.argv[1]);"
        " assert h.get_size() == 10 << 30; h.pwrite(b\"G\"*4096, (10 << 30) - 4096)'"
        " \"$uri\""))
    assert r.returncode == 0, r.stderr
    check_clean(img)
    assert info(img)["virtual-size"] == 10 << 30
    r = qemu_io(img, "read -P 7 0 1M", "read -P 0x47 %d 4096" % ((10 << 30) - 4096))
    assert r.stdout.count("read ") == 2


def test_resize_refuses_unaligned(tmp_path):
    img = tmp_path / "u.qcow2"
    qemu_img("create", "-f", "qcow2", img, "64M")
    r = nbdkit(img, "size=%d" % ((128 << 20) + 1), "resize=true", run="true")
    assert r.returncode != 0 and "multiple of 512" in r.stderr


def test_resize_refuses_shrinking(tmp_path):
    img = tmp_path / "s.qcow2"
    qemu_img("create", "-f", "qcow2", img, "64M")
    r = nbdkit(img, "size=32M", "resize=true", run="true")
    assert r.returncode != 0 and "shrinking" in r.stderr
    assert info(img)["virtual-size"] == 64 << 20


def test_resize_with_snapshots_keeps_them(tmp_path):
    img = tmp_path / "s.qcow2"
    qemu_img("create", "-f", "qcow2", img, "16M")
    qemu_io(img, "write -P 3 0 1M")
    qemu_img("snapshot", "-c", "snap", img)
    r = nbdkit(img, "size=1G", "resize=true", run="true")
    assert r.returncode == 0, r.stderr
    check_clean(img)
    out = tmp_path / "snap.raw"
    qemu_img("convert", "-l", "snapshot.name=snap", "-O", "raw", img, out)
    data = open(out, "rb").read()
    # QEMU reads an old snapshot at the current size; its own 16M agree.
    assert data[:1 << 20] == b"\x03" * (1 << 20)
    assert data[1 << 20:] == bytes(len(data) - (1 << 20))
