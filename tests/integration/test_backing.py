"""Backing chains: reads fall through unallocated clusters to the layers
below, and the chain is opened safely (names, formats, loops, depth)."""

import os
import time

import pytest

from conftest import qemu_img, qemu_raw, start_fails
from images import (assert_reads_like_qemu, create, drop_backing_format, header_extensions,
                    EXT_BACKING_FORMAT, odd_ranges, raw_from_layout,
                    serve_compare, write_patterns)

K = 1024
M = 1024 * 1024


def timed_refusal(img, *params):
    t = time.monotonic()
    rc, err = start_fails(img, *params)
    assert rc > 0, err
    return time.monotonic() - t


def rebase_unsafe(img, backing, fmt="qcow2"):
    args = ["rebase", "-u", "-b", str(backing)]
    if fmt:
        args += ["-F", fmt]
    qemu_img(*args, str(img))


@pytest.mark.parametrize("clusters", [(64 * K, 64 * K), (4 * K, 512),
                                      (512, 64 * K)],
                         ids=["same", "mid4k-top512", "mid512-top64k"])
def test_qcow2_over_qcow2_over_raw(tmp_path, clusters):
    mid_c, top_c = clusters
    size = 3 * M
    base = raw_from_layout(tmp_path / "base.raw", size,
                           [(0, size, "random")])
    mid = create(tmp_path / "mid.qcow2", None, "cluster_size=%d" % mid_c,
                 backing="base.raw", backing_fmt="raw")
    write_patterns(mid, [(0x11, 100 * K + 3, 50 * K),
                         (None, 300 * K, 128 * K),         # masks base
                         (0x12, 1 * M - 7, 14),
                         (0x13, 2 * M, 64 * K, "-c")])
    top = create(tmp_path / "top.qcow2", None, "cluster_size=%d" % top_c,
                 backing="mid.qcow2", backing_fmt="qcow2")
    write_patterns(top, [(0x21, 120 * K + 1, 10 * K),
                         (None, 1 * M - 3, 6),             # masks mid
                         (None, 1536 * K, 64 * K),         # masks base
                         (0x22, size - 5, 5),
                         (0x23, 2 * M + 5000, 100)])
    raw = qemu_raw(top, tmp_path)
    serve_compare(top, raw, ranges=odd_ranges(size, top_c) +
                  [(300 * K - 1, 128 * K + 2), (2 * M + 4000, 2000)])


def test_v2_overlay_over_qcow2(tmp_path):
    base = create(tmp_path / "base.qcow2", 2 * M, "compat=0.10")
    write_patterns(base, [(0x31, 0, 2 * M)])
    top = create(tmp_path / "top.qcow2", None, "compat=0.10",
                 backing="base.qcow2", backing_fmt="qcow2")
    # v2 has no zero clusters: QEMU writes real zeros over the backing data.
    write_patterns(top, [(None, 64 * K, 64 * K), (0x32, 500 * K + 1, 3)])
    assert_reads_like_qemu(top, tmp_path)


def test_relative_names_resolved_against_image_dir(tmp_path, monkeypatch):
    """Relative backing names are relative to the directory of the image
    that names them, never to the server's working directory."""
    d = tmp_path / "chain" / "top"
    low = tmp_path / "chain" / "low"
    d.mkdir(parents=True)
    low.mkdir()
    raw_from_layout(low / "base.raw", 1 * M, [(0, 1 * M, 0x41)])
    create(low / "mid.qcow2", None, backing="base.raw", backing_fmt="raw")
    write_patterns(low / "mid.qcow2", [(0x42, 64 * K, 64 * K)])
    top = create(d / "top.qcow2", None, backing="../low/mid.qcow2",
                 backing_fmt="qcow2")
    write_patterns(top, [(0x43, 200 * K, 10)])
    # Decoys with the same names in the working directory must not be used.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    raw_from_layout(elsewhere / "base.raw", 1 * M, [(0, 1 * M, 0xee)])
    monkeypatch.chdir(elsewhere)
    raw = qemu_raw(top.resolve(), tmp_path)
    with open(raw, "rb") as f:
        data = f.read()
    assert data[0:1] == b"\x41" and data[64 * K:64 * K + 1] == b"\x42"
    serve_compare(top.resolve(), raw)


def test_relative_served_path(tmp_path, monkeypatch):
    """file= itself given relative to the cwd; backing relative to it."""
    sub = tmp_path / "sub"
    sub.mkdir()
    raw_from_layout(sub / "base.raw", 1 * M, [(4096, 8192, 0x51)])
    create(sub / "top.qcow2", None, backing="base.raw", backing_fmt="raw")
    monkeypatch.chdir(tmp_path)
    raw = qemu_raw(sub / "top.qcow2", tmp_path)
    serve_compare("sub/top.qcow2", raw)


@pytest.mark.parametrize("base_fmt", ["qcow2", "raw"])
def test_backing_format_probed_when_absent(tmp_path, base_fmt):
    """No backing format extension: the format is probed (qcow2 magic or
    raw), as QEMU does.  qemu-img 7.2 refuses to create such an image, even
    with -u, so the extension is removed from the header afterwards."""
    if base_fmt == "raw":
        base = raw_from_layout(tmp_path / "base.img", 2 * M,
                               [(0, 1 * M, "random")])
    else:
        base = create(tmp_path / "base.img", 2 * M)
        write_patterns(base, [(0x61, 0, 1 * M), (None, 64 * K, 64 * K)])
    top = create(tmp_path / "top.qcow2", None, backing="base.img",
                 backing_fmt=base_fmt)
    write_patterns(top, [(0x62, 500 * K, 100)])
    drop_backing_format(top)
    info = qemu_img("info", top).stdout
    assert "backing file format" not in info
    raw = qemu_raw(top, tmp_path)
    serve_compare(top, raw)


def test_backing_format_from_extension_wins(tmp_path):
    """A qcow2 file named as a raw backing file is read as raw bytes."""
    base = create(tmp_path / "base.qcow2", 1 * M)
    write_patterns(base, [(0x71, 0, 64 * K)])
    top = create(tmp_path / "top.qcow2", 2 * M, backing="base.qcow2",
                 backing_fmt="raw")
    assert any(m == EXT_BACKING_FORMAT and d == b"raw"
               for m, d in header_extensions(top))
    raw = qemu_raw(top, tmp_path)
    with open(raw, "rb") as f:
        assert f.read(4) == b"QFI\xfb"
    serve_compare(top, raw)


@pytest.mark.parametrize("base_fmt", ["raw", "qcow2"])
def test_backing_shorter_than_overlay(tmp_path, base_fmt):
    size = 1 * M + 3584          # a backing file that ends mid-cluster
    if base_fmt == "raw":
        base = raw_from_layout(tmp_path / "base", size, [(0, size, 0x81)])
    else:
        base = create(tmp_path / "base", size)
        write_patterns(base, [(0x81, 0, size)])
    top = create(tmp_path / "top.qcow2", 4 * M, backing="base",
                 backing_fmt=base_fmt)
    write_patterns(top, [(0x82, 3 * M, 100)])
    raw = qemu_raw(top, tmp_path)
    with open(raw, "rb") as f:
        data = f.read()
    tail_zero = data[size:3 * M] == bytes(3 * M - size)
    assert data[size - 1] == 0x81 and tail_zero
    serve_compare(top, raw, ranges=[(size - 10, 20), (size - 4096, 8192),
                                    (64 * K * 16 - 1, 2)])


def test_backing_longer_than_overlay(tmp_path):
    base = raw_from_layout(tmp_path / "base.raw", 4 * M,
                           [(0, 4 * M, "random")])
    top = create(tmp_path / "top.qcow2", 1 * M + 512, backing="base.raw",
                 backing_fmt="raw")
    assert_reads_like_qemu(top, tmp_path)


def test_follow_backing_false_refused(tmp_path):
    base = create(tmp_path / "base.qcow2", 1 * M)
    top = create(tmp_path / "top.qcow2", None, backing="base.qcow2",
                 backing_fmt="qcow2")
    rc, err = start_fails(top, "follow-backing=false")
    assert rc > 0, err
    assert "backing" in err and "base.qcow2" in err, err
    # Without a backing file the option changes nothing.
    assert_reads_like_qemu(base, tmp_path, "follow-backing=false")


@pytest.mark.parametrize("length", [1, 2, 3])
def test_backing_loop_refused_fast(tmp_path, length):
    names = [tmp_path / ("l%d.qcow2" % i) for i in range(length)]
    for n in names:
        create(n, 1 * M)
    for i, n in enumerate(names):
        rebase_unsafe(n, names[(i + 1) % length].name)
    # What a refusal costs on this machine anyway (nbdkit start-up; slow
    # on a loaded VM): the loop may take at most a second more.
    base = timed_refusal(names[0], "follow-backing=false")
    t = time.monotonic()
    rc, err = start_fails(names[0])
    elapsed = time.monotonic() - t
    assert rc > 0, err
    assert "loop" in err, err
    assert elapsed < base + 1.0, (elapsed, base)
    # The same with a huge depth limit: the loop must be detected, not
    # followed until the limit.
    t = time.monotonic()
    rc, err = start_fails(names[0], "max-chain-depth=100000")
    assert rc > 0 and "loop" in err, err
    assert time.monotonic() - t < base + 1.0


def test_backing_loop_through_other_name(tmp_path):
    """The loop goes through a symlink: compared by real path."""
    a = create(tmp_path / "a.qcow2", 1 * M)
    b = create(tmp_path / "b.qcow2", 1 * M)
    os.symlink("a.qcow2", tmp_path / "alias.qcow2")
    rebase_unsafe(a, "b.qcow2")
    rebase_unsafe(b, "alias.qcow2")
    base = timed_refusal(a, "follow-backing=false")
    t = time.monotonic()
    rc, err = start_fails(a)
    assert rc > 0 and "loop" in err, err
    assert time.monotonic() - t < base + 1.0


def make_chain(tmp_path, depth):
    """depth images in total: raw-free qcow2 chain c0 <- c1 <- ... top."""
    prev = None
    for i in range(depth):
        img = tmp_path / ("c%d.qcow2" % i)
        if prev is None:
            create(img, 1 * M)
        else:
            create(img, None, backing=prev.name, backing_fmt="qcow2")
        write_patterns(img, [(0x10 + i, i * 64 * K + i, 1000)])
        prev = img
    return prev


def test_max_chain_depth(tmp_path):
    top = make_chain(tmp_path, 5)
    # Five images, top included.
    assert_reads_like_qemu(top, tmp_path, "max-chain-depth=5")
    rc, err = start_fails(top, "max-chain-depth=4")
    assert rc > 0, err
    assert "deep" in err or "depth" in err, err
    rc, err = start_fails(top, "max-chain-depth=1")
    assert rc > 0, err


def test_default_depth_allows_moderate_chain(tmp_path):
    top = make_chain(tmp_path, 12)
    assert_reads_like_qemu(top, tmp_path)


@pytest.mark.parametrize("name", [
    "nbd:localhost:10809",
    "nbd+unix:///?socket=/tmp/x.sock",
    'json:{"driver":"raw","file":{"driver":"file","filename":"/etc/passwd"}}',
    "http://example.com/disk.img",
    "file:base.raw",
])
def test_protocol_backing_names_refused(tmp_path, name):
    raw_from_layout(tmp_path / "base.raw", 1 * M, [(0, 4096, 0x11)])
    top = create(tmp_path / "top.qcow2", 1 * M)
    rebase_unsafe(top, name, "raw")
    assert "backing file: " + name in qemu_img("info", top).stdout
    rc, err = start_fails(top)
    assert rc > 0, err
    assert "plain path" in err or "protocol" in err, err


def test_missing_backing_file_refused(tmp_path):
    top = create(tmp_path / "top.qcow2", 1 * M)
    rebase_unsafe(top, "nonexistent.qcow2")
    rc, err = start_fails(top)
    assert rc > 0
    assert "nonexistent.qcow2" in err, err


def test_colon_after_slash_is_a_path(tmp_path):
    """QEMU's rule: a colon after a slash is not a protocol prefix."""
    sub = tmp_path / "dir"
    sub.mkdir()
    raw_from_layout(sub / "a:b.raw", 1 * M, [(0, 1 * M, 0x99)])
    top = create(tmp_path / "top.qcow2", 1 * M)
    rebase_unsafe(top, "./dir/a:b.raw", "raw")
    raw = qemu_raw(top, tmp_path)
    with open(raw, "rb") as f:
        assert f.read(1) == b"\x99"
    serve_compare(top, raw)
