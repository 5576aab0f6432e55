"""Block status (NBD base:allocation) against qemu-img map, and whole-disk
copies with nbdcopy (which trusts block status to skip zeros)."""

import os

import nbd
import pytest

from conftest import extents, qemu_raw
from images import (assert_files_equal, serve, check_extents,
                    connect_meta, convert, create, nbdkit_run, qemu_map,
                    raw_from_layout, write_patterns)

K = 1024
M = 1024 * 1024
T = 1024 * 1024 * M


def img_plain(tmp_path):
    img = create(tmp_path / "plain.qcow2", 8 * M + 512, "cluster_size=4096")
    write_patterns(img, [(0x11, 66, 42), (0x22, 1 * M - 5, 10),
                         (0x33, 3 * M, 256 * K), (0x44, 8 * M, 512)])
    return img, {"zero_required": True}


def img_zero_clusters(tmp_path):
    img = create(tmp_path / "zero.qcow2", 4 * M)
    write_patterns(img, [(0x11, 0, 1 * M),
                         (None, 64 * K, 128 * K),            # ZERO_ALLOC
                         (None, 512 * K, 64 * K, "-u"),      # ZERO_PLAIN
                         (None, 2 * M, 1 * M),               # zero, unallocated
                         (0x22, 2 * M + 64 * K + 1, 1)])
    return img, {"zero_required": True}


def img_compressed(tmp_path):
    src = raw_from_layout(tmp_path / "src.raw", 4 * M,
                          [(0, 1 * M, "text"), (2 * M, 64 * K, 0x5a),
                           (3 * M + 100, 200 * K, "text")])
    img = convert(src, tmp_path / "comp.qcow2", compress=True)
    return img, {"zero_required": True}


def img_chain(tmp_path):
    base = raw_from_layout(tmp_path / "base.raw", 3 * M,
                           [(0, 1 * M, "random"), (2 * M, 512 * K, 0x31)])
    mid = create(tmp_path / "mid.qcow2", None, "cluster_size=4096",
                 backing="base.raw", backing_fmt="raw")
    write_patterns(mid, [(0x41, 1 * M + 100, 300 * K),
                         (None, 2 * M, 64 * K)])
    top = create(tmp_path / "top.qcow2", 4 * M, backing="mid.qcow2",
                 backing_fmt="qcow2")
    write_patterns(top, [(0x51, 512 * K, 64 * K), (None, 0, 64 * K),
                         (0x52, 3 * M + 512 * K, 4096)])
    return top, {}


def img_chain_qcow2_base(tmp_path):
    base = create(tmp_path / "base.qcow2", 2 * M)
    write_patterns(base, [(0x61, 0, 256 * K), (None, 1 * M, 64 * K)])
    top = create(tmp_path / "top.qcow2", 3 * M, backing="base.qcow2",
                 backing_fmt="qcow2")
    write_patterns(top, [(0x62, 128 * K, 4096), (None, 192 * K, 64 * K)])
    # Everything qemu calls zero is zero for us too: the chain is qcow2 all
    # the way down.
    return top, {"zero_required": True}


def img_extended_l2(tmp_path):
    c = 64 * K
    s = c // 32
    img = create(tmp_path / "ext.qcow2", 2 * M, "extended_l2=on")
    write_patterns(img, [(0x71, s, s), (None, 3 * s, 2 * s),
                         (0x72, c + 31 * s, 2 * s), (0x73, 4 * c, c),
                         (None, 4 * c + 8 * s, s), (0x74, 6 * c, c, "-c")])
    return img, {"zero_required": True}


def img_extended_l2_backing(tmp_path):
    c = 64 * K
    s = c // 32
    raw_from_layout(tmp_path / "base.raw", 2 * M, [(0, 2 * M, 0x99)])
    img = create(tmp_path / "extb.qcow2", None, "extended_l2=on",
                 backing="base.raw", backing_fmt="raw")
    write_patterns(img, [(0x71, s, s), (None, 3 * s, 2 * s),
                         (0x72, c + 31 * s, 2 * s)])
    return img, {}


def img_prealloc_metadata(tmp_path):
    img = create(tmp_path / "pm.qcow2", 2 * M, "preallocation=metadata",
                 "cluster_size=4096")
    write_patterns(img, [(0x81, 4096, 8192), (None, 64 * K, 64 * K)])
    return img, {}


def img_v2(tmp_path):
    img = create(tmp_path / "v2.qcow2", 2 * M, "compat=0.10")
    write_patterns(img, [(0x91, 100, 100), (None, 1 * M, 64 * K)])
    return img, {"zero_required": True}


IMAGES = [img_plain, img_zero_clusters, img_compressed, img_chain,
          img_chain_qcow2_base, img_extended_l2, img_extended_l2_backing,
          img_prealloc_metadata, img_v2]


@pytest.mark.parametrize("make", IMAGES, ids=[f.__name__[4:] for f in IMAGES])
def test_extents_agree_with_qemu_map(tmp_path, make):
    img, kw = make(tmp_path)
    raw = qemu_raw(img, tmp_path)
    with serve(img) as srv:
        h = connect_meta(srv)
        size = h.get_size()
        ours = check_extents(h, img, raw, **kw)
        # Unaligned sub-ranges give the same answers.
        for off, ln in [(1, size - 2), (66, 42), (size // 3 + 7, 70001),
                        (size - 513, 513)]:
            if off + ln <= size:
                sub = check_extents(h, img, raw, offset=off, length=ln, **kw)
                for o, n, fl in sub:
                    for o2, n2, fl2 in ours:
                        if o2 < o + n and o2 + n2 > o:
                            # Same kind, or more conservative (data).
                            assert fl == fl2 or fl == 0, (o, n, fl, fl2)
        h.shutdown()


def test_req_one(tmp_path):
    img, _ = img_zero_clusters(tmp_path)
    with serve(img) as srv:
        h = connect_meta(srv)
        full = extents(h)
        for start in [0, 1, 64 * K, 64 * K + 3, 512 * K, 2 * M + 5]:
            got = []

            def cb(meta, off, entries, err):
                got.extend(entries)
                return 0
            h.block_status(1 * M, start, cb, nbd.CMD_FLAG_REQ_ONE)
            assert len(got) == 2, got
            ln, fl = got
            assert 0 < ln <= 1 * M
            # It agrees with the full map at start.
            for o, n, f in full:
                if o <= start < o + n:
                    assert fl == f or fl == 0
                    assert start + ln <= o + n or fl == 0
        h.shutdown()


def test_extents_far_end_of_4t(tmp_path):
    img = create(tmp_path / "big.qcow2", 4 * T)
    write_patterns(img, [(0x11, 4 * T - 1 * M - 37, 5000),
                         (None, 4 * T - 512 * K, 64 * K),
                         (0x22, 4 * T - 512, 512)])
    off = 4 * T - 64 * M
    with serve(img) as srv:
        h = connect_meta(srv)
        ours = check_extents(h, img, None, offset=off, length=64 * M,
                             zero_required=True)
        data = [(o, n) for o, n, fl in ours if fl == 0]
        assert sum(n for _, n in data) <= 4 * 64 * K + 512
        # The very end is data.
        assert ours[-1][2] == 0
        h.shutdown()


def parse_nbdinfo_map(text):
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].isdigit():
            out.append((int(parts[0]), int(parts[1]), int(parts[2])))
    return out


@pytest.mark.parametrize("make", [img_plain, img_chain, img_extended_l2],
                         ids=["plain", "chain", "extended_l2"])
def test_nbdinfo_map(tmp_path, make):
    img, _ = make(tmp_path)
    p = nbdkit_run(img, run_cmd='nbdinfo --map "$uri"')
    assert p.returncode == 0, p.stderr
    m = parse_nbdinfo_map(p.stdout)
    assert m, p.stdout
    size = os.path.getsize(qemu_raw(img, tmp_path))
    assert m[0][0] == 0 and m[-1][0] + m[-1][1] == size
    for e in qemu_map(img):
        if e["data"]:
            for o, n, t in m:
                if o < e["start"] + e["length"] and o + n > e["start"]:
                    assert t == 0, (e, (o, n, t))
    p = nbdkit_run(img, run_cmd='nbdinfo --map --totals "$uri"')
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("make", [img_plain, img_zero_clusters, img_compressed,
                                  img_chain, img_extended_l2_backing,
                                  img_prealloc_metadata],
                         ids=["plain", "zero", "compressed", "chain",
                              "extended_l2_backing", "prealloc_metadata"])
def test_nbdcopy_equals_qemu(tmp_path, make):
    img, _ = make(tmp_path)
    raw = qemu_raw(img, tmp_path)
    out = tmp_path / "copy.raw"
    p = nbdkit_run(img, run_cmd='nbdcopy "$uri" %s' % out)
    assert p.returncode == 0, p.stderr
    assert_files_equal(out, raw)
    # Into a pre-filled destination: holes must be written as zeros, so a
    # wrong "zero" extent would leave the 0xff filler visible.
    out2 = tmp_path / "copy2.raw"
    with open(out2, "wb") as f:
        f.write(b"\xff" * os.path.getsize(raw))
    p = nbdkit_run(img, run_cmd='nbdcopy "$uri" %s' % out2)
    assert p.returncode == 0, p.stderr
    assert_files_equal(out2, raw)
