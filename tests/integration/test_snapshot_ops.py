"""Snapshot operations: snapshot-create=, snapshot-delete=, snapshot-apply=.

QEMU is the oracle at every step: `qemu-img check` must be clean (exit 0,
no leak, no COPIED mismatch), `qemu-img snapshot -l` / `qemu-img info`
must list what we wrote, `qemu-img convert -l snapshot.name=NAME` must
read each snapshot byte for byte as it was taken, and QEMU writing the
active image afterwards must leave our snapshots intact (it relies on our
refcounts and COPIED flags).  Where QEMU can do the same operation, the
same operation on a copy must leave the same number of allocated
clusters.
"""
import json
import os
import random
import shutil

import nbd
import pytest

from conftest import PLUGIN, nbdkit_env, qemu_img, qemu_io, run, serve
from images import create, write

K = 1024
M = 1024 * K


def plugin_ops(img, *keys, check=True):
    """Start the plugin with the keys, serve nothing, stop."""
    p = run("nbdkit", "-U", "-", PLUGIN, "file=%s" % img, *keys,
            "--run", "true", check=False, env=nbdkit_env())
    if check:
        assert p.returncode == 0, p.stderr
    return p


def check_clean(img):
    p = qemu_img("check", "--output=json", img, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    info = json.loads(p.stdout)
    assert info.get("leaks", 0) == 0 and info.get("corruptions", 0) == 0, info
    return info


def used_clusters(img):
    """Host clusters with a non-zero refcount, read from the refcount
    table and blocks (after check_clean, so they are exact)."""
    check_clean(img)
    with open(img, "rb") as f:
        h = f.read(104)
        cbits = int.from_bytes(h[20:24], "big")
        rt_off = int.from_bytes(h[48:56], "big")
        rt_clusters = int.from_bytes(h[56:60], "big")
        version = int.from_bytes(h[4:8], "big")
        order = int.from_bytes(h[96:100], "big") if version >= 3 else 4
        cs = 1 << cbits
        f.seek(rt_off)
        table = f.read(rt_clusters * cs)
        bits = 1 << order
        used = 0
        for i in range(0, len(table), 8):
            blk = int.from_bytes(table[i:i + 8], "big") & ~0x1ff
            if not blk:
                continue
            f.seek(blk)
            data = f.read(cs)
            if bits >= 8:
                w = bits // 8
                used += sum(1 for j in range(0, cs, w)
                            if any(data[j:j + w]))
            else:
                per = 8 // bits
                mask = (1 << bits) - 1
                used += sum(1 for b in data for k in range(per)
                            if (b >> (k * bits)) & mask)
    return used


def snapshots(img):
    info = json.loads(qemu_img("info", "--output=json", img).stdout)
    return [(s["id"], s["name"]) for s in info.get("snapshots", [])]


def virtual_size(img):
    return json.loads(qemu_img("info", "--output=json", img).stdout)["virtual-size"]


def raw_of(img, tmp_path, snapshot=None):
    out = tmp_path / ("raw-%d" % random.getrandbits(32))
    args = ["-l", "snapshot.name=" + snapshot] if snapshot else []
    qemu_img("convert", *args, "-O", "raw", img, out)
    data = out.read_bytes()
    out.unlink()
    return data


def fill(img, cs, seed):
    """A bit of everything: data, partial clusters, zero clusters (plain and
    allocated), compressed clusters, data at the end of the disk."""
    size = virtual_size(img)
    rnd = random.Random(seed)
    cmds = ["write -P 0x%02x %d %d" % (0x10 + seed % 16, 0, min(size, 3 * cs + 100)),
            "write -P 0x21 %d %d" % (size // 2 + 7, min(cs, 5000)),
            "write -z %d %d" % (size // 4 - size // 4 % cs, cs),
            "write -z -u %d %d" % (size // 4 - size // 4 % cs + cs, cs),
            "write -P 0x22 %d %d" % (size - 3 * cs - 33, 3 * cs + 33)]
    if virtual_size(img) >= 16 * cs:
        # Compressed writes need unallocated clusters: away from the rest.
        at = 5 * size // 8
        cmds.append("write -c -P 0x23 %d %d" % (at - at % cs, 2 * cs))
    for _ in range(6):
        off = rnd.randrange(0, size - 4096)
        cmds.append("write -P 0x%02x %d %d" % (rnd.randrange(1, 255), off,
                                               rnd.randrange(1, 4096)))
    write(img, *cmds)


# --------------------------------------------------------------------------
# create

MATRIX = [
    ("v3-64k", 8 * M, []),
    ("v2", 8 * M, ["compat=0.10"]),
    ("512", 2 * M, ["cluster_size=512"]),
    ("4k", 8 * M, ["cluster_size=4096"]),
    ("2M", 32 * M, ["cluster_size=2M"]),
    ("rb4", 8 * M, ["refcount_bits=4", "cluster_size=4096"]),
    ("rb64", 8 * M, ["refcount_bits=64"]),
    ("extl2", 8 * M, ["extended_l2=on"]),
    ("zstd", 8 * M, ["compression_type=zstd"]),
    ("lazy", 8 * M, ["lazy_refcounts=on"]),
]


@pytest.mark.parametrize("name,size,opts", MATRIX, ids=[m[0] for m in MATRIX])
def test_create_like_qemu(tmp_path, name, size, opts):
    img = create(tmp_path / "a.qcow2", size, *opts)
    cs = 2 * M if "cluster_size=2M" in opts else \
        512 if "cluster_size=512" in opts else \
        4096 if "cluster_size=4096" in opts else 64 * K
    fill(img, cs, 1)
    before = raw_of(img, tmp_path)

    plugin_ops(img, "snapshot-create=first")
    check_clean(img)
    assert snapshots(img) == [("1", "first")]
    assert raw_of(img, tmp_path, "first") == before
    assert raw_of(img, tmp_path) == before

    # QEMU writing the active image must copy every shared cluster.
    at = 5 * size // 8
    write(img, "write -P 0x77 0 %d" % min(size, 4 * cs),
          "write -P 0x78 %d %d" % (at - at % cs, cs))
    check_clean(img)
    assert raw_of(img, tmp_path, "first") == before

    # And so must we, over NBD, for a second snapshot.
    second = raw_of(img, tmp_path)
    plugin_ops(img, "snapshot-create=second")
    with serve(img) as srv:
        h = srv.connect()
        h.pwrite(b"\x99" * (3 * cs), size // 2 - size // 2 % cs)
        h.zero(2 * cs, 0)
        h.flush()
        h.shutdown()
    check_clean(img)
    assert snapshots(img) == [("1", "first"), ("2", "second")]
    assert raw_of(img, tmp_path, "first") == before
    assert raw_of(img, tmp_path, "second") == second


def test_create_matches_qemu_allocation(tmp_path):
    ours = create(tmp_path / "ours.qcow2", 16 * M, "cluster_size=4096")
    fill(ours, 4096, 3)
    theirs = tmp_path / "theirs.qcow2"
    shutil.copy(ours, theirs)
    plugin_ops(ours, "snapshot-create=s")
    qemu_img("snapshot", "-c", "s", theirs)
    # The same data and tables are shared; only our new L1 copy and the
    # snapshot table take clusters, as QEMU's do.
    assert used_clusters(ours) == used_clusters(theirs)


def test_ids_continue_qemu_numbering(tmp_path):
    img = create(tmp_path / "a.qcow2", 4 * M)
    write(img, "write -P 1 0 64k")
    for n in ("a", "b", "c"):
        qemu_img("snapshot", "-c", n, img)
    qemu_img("snapshot", "-d", "b", img)
    plugin_ops(img, "snapshot-create=d")
    assert snapshots(img) == [("1", "a"), ("3", "c"), ("4", "d")]
    check_clean(img)


def test_snapshot_is_served_in_the_same_run(tmp_path):
    img = create(tmp_path / "a.qcow2", 4 * M)
    write(img, "write -P 5 0 1M")
    before = raw_of(img, tmp_path)
    with serve(img, "snapshot-create=pre") as srv:
        active = srv.connect()
        active.pwrite(b"\x01" * M, 0)
        active.flush()
        snap = srv.connect("pre")
        assert snap.is_read_only()
        assert snap.pread(M, 0) == before[:M]
        snap.shutdown()
        active.shutdown()
    check_clean(img)
    assert raw_of(img, tmp_path, "pre") == before


@pytest.mark.parametrize("opts,keys,message", [
    (["refcount_bits=1"], ["snapshot-create=x"], "refcount_bits=1"),
    ([], ["snapshot-create=x", "snapshot-create=x"], "already exists"),
    ([], ["snapshot-create=1"], "already exists"),
    ([], ["snapshot-delete=nope"], "no snapshot with name or id 'nope'"),
    ([], ["snapshot-apply=nope"], "no snapshot with name or id 'nope'"),
    ([], ["snapshot-create="], "must not be empty"),
])
def test_refusals(tmp_path, opts, keys, message):
    img = create(tmp_path / "a.qcow2", 4 * M, *opts)
    write(img, "write -P 1 0 64k")
    if "snapshot-create=1" in keys:
        qemu_img("snapshot", "-c", "first", img)    # id 1
    p = plugin_ops(img, *keys, check=False)
    assert p.returncode != 0
    assert message in p.stderr, p.stderr
    assert "Segmentation" not in p.stderr
    check_clean(img)


def test_refcount_overflow_is_refused_and_undone(tmp_path):
    """With 2-bit refcounts a host cluster packed with compressed clusters
    (refcount 3) cannot take another reference: QEMU refuses the snapshot
    too.  Every increase made before the overflow is taken back."""
    img = create(tmp_path / "a.qcow2", 4 * M, "refcount_bits=2")
    write(img, "write -P 1 0 1M", "write -c -P 2 1M 192k")
    before = raw_of(img, tmp_path)
    theirs = tmp_path / "theirs.qcow2"
    shutil.copy(img, theirs)
    assert qemu_img("snapshot", "-c", "x", theirs, check=False).returncode != 0
    p = plugin_ops(img, "snapshot-create=x", check=False)
    assert p.returncode != 0 and "overflow" in p.stderr, p.stderr
    check_clean(img)
    assert snapshots(img) == []
    assert raw_of(img, tmp_path) == before
    # Still writable in place: COPIED flags were restored.
    write(img, "write -P 3 0 64k")
    check_clean(img)


def test_external_data_file_refused(tmp_path):
    img = create(tmp_path / "a.qcow2", 4 * M,
                 "data_file=%s" % (tmp_path / "a.data"))
    p = plugin_ops(img, "snapshot-create=x", check=False)
    assert p.returncode != 0
    assert "external data file" in p.stderr
    check_clean(img)


def test_unknown_extra_data_is_kept(tmp_path):
    """Extra data past the known 24 bytes of an entry survives a rewrite of
    the table (QEMU keeps it too)."""
    img = create(tmp_path / "a.qcow2", 4 * M)
    qemu_img("snapshot", "-c", "old", img)
    with open(img, "r+b") as f:
        hdr = f.read(72)
        off = int.from_bytes(hdr[64:72], "big")
        f.seek(off)
        e = bytearray(f.read(40 + 24 + 1 + 3 + 8))
        extra = int.from_bytes(e[36:40], "big")
        assert extra == 24
        id_len = int.from_bytes(e[12:14], "big")
        name_len = int.from_bytes(e[14:16], "big")
        tail = e[40 + 24:40 + 24 + id_len + name_len]
        e[36:40] = (32).to_bytes(4, "big")
        new = bytes(e[:40 + 24]) + b"UNKNOWN!" + bytes(tail)
        new += b"\0" * (-len(new) % 8)
        f.seek(off)
        f.write(new)
    assert snapshots(img) == [("1", "old")]
    plugin_ops(img, "snapshot-create=new")
    check_clean(img)
    with open(img, "rb") as f:
        hdr = f.read(72)
        f.seek(int.from_bytes(hdr[64:72], "big"))
        table = f.read(4096)
    assert int.from_bytes(table[36:40], "big") == 32
    assert table[64:72] == b"UNKNOWN!"
    assert snapshots(img) == [("1", "old"), ("2", "new")]


# --------------------------------------------------------------------------
# delete

def three_generations(path, *opts):
    img = create(path, 8 * M, *opts)
    write(img, "write -P 1 0 2M", "write -c -P 7 4M 256k")
    qemu_img("snapshot", "-c", "one", img)
    write(img, "write -P 2 512k 1M", "write -z 4M 64k")
    qemu_img("snapshot", "-c", "two", img)
    write(img, "write -P 3 1M 64k", "write -P 4 7M 4k", "write -P 5 4M 128k")
    qemu_img("snapshot", "-c", "three", img)
    write(img, "write -P 6 0 8k")
    return img


@pytest.mark.parametrize("victim", ["one", "two", "three", "2"])
@pytest.mark.parametrize("opts", [[], ["cluster_size=4096"],
                                  ["compat=0.10"], ["extended_l2=on"]],
                         ids=["64k", "4k", "v2", "extl2"])
def test_delete_like_qemu(tmp_path, victim, opts):
    ours = three_generations(tmp_path / "ours.qcow2", *opts)
    theirs = tmp_path / "theirs.qcow2"
    shutil.copy(ours, theirs)
    names = {"one": "one", "two": "two", "three": "three", "2": "two"}
    keep = [n for n in ("one", "two", "three") if n != names[victim]]
    contents = {n: raw_of(ours, tmp_path, n) for n in keep}
    active = raw_of(ours, tmp_path)

    plugin_ops(ours, "snapshot-delete=" + victim)
    qemu_img("snapshot", "-d", names[victim], theirs)
    check_clean(ours)
    assert snapshots(ours) == snapshots(theirs)
    for n in keep:
        assert raw_of(ours, tmp_path, n) == contents[n]
    assert raw_of(ours, tmp_path) == active
    assert used_clusters(ours) == used_clusters(theirs)

    # Clusters only the active image uses again are owned: QEMU and we
    # write them in place, and the snapshots stay as they were.
    write(ours, "write -P 8 0 2M")
    with serve(ours) as srv:
        h = srv.connect()
        h.pwrite(b"\x42" * (1 << 20), 3 * M)
        h.flush()
        h.shutdown()
    check_clean(ours)
    for n in keep:
        assert raw_of(ours, tmp_path, n) == contents[n]


def test_delete_all_releases_space(tmp_path):
    img = create(tmp_path / "a.qcow2", 16 * M, "cluster_size=4096")
    write(img, "write -P 1 0 8M")
    qemu_img("snapshot", "-c", "a", img)
    write(img, "write -P 2 0 8M")             # 8 MiB more, only the active's
    qemu_img("snapshot", "-c", "b", img)
    write(img, "write -P 3 0 8M")
    before = used_clusters(img)
    plugin_ops(img, "snapshot-delete=a", "snapshot-delete=b")
    assert snapshots(img) == []
    after = used_clusters(img)
    # Two generations of 8 MiB of 4 KiB clusters are gone.
    assert before - after >= 2 * 2048
    # Holes were punched: the file takes less space on disk.
    assert os.stat(img).st_blocks * 512 < 12 * M
    assert raw_of(img, tmp_path)[:8 * M] == b"\3" * (8 * M)


# --------------------------------------------------------------------------
# apply

@pytest.mark.parametrize("target", ["one", "two", "three", "1"])
@pytest.mark.parametrize("opts", [[], ["cluster_size=4096"], ["compat=0.10"],
                                  ["extended_l2=on"], ["refcount_bits=4"]],
                         ids=["64k", "4k", "v2", "extl2", "rb4"])
def test_apply_like_qemu(tmp_path, target, opts):
    ours = three_generations(tmp_path / "ours.qcow2", *opts)
    theirs = tmp_path / "theirs.qcow2"
    shutil.copy(ours, theirs)
    names = {"one": "one", "two": "two", "three": "three", "1": "one"}
    contents = {n: raw_of(ours, tmp_path, n) for n in ("one", "two", "three")}

    plugin_ops(ours, "snapshot-apply=" + target)
    qemu_img("snapshot", "-a", names[target], theirs)
    check_clean(ours)
    assert raw_of(ours, tmp_path) == contents[names[target]]
    assert raw_of(ours, tmp_path) == raw_of(theirs, tmp_path)
    assert snapshots(ours) == [("1", "one"), ("2", "two"), ("3", "three")]
    for n, data in contents.items():
        assert raw_of(ours, tmp_path, n) == data
    assert used_clusters(ours) == used_clusters(theirs)

    # Writing after the revert copies: the snapshot keeps its content.
    with serve(ours) as srv:
        h = srv.connect()
        h.pwrite(b"\x55" * (2 * M), 0)
        h.trim(M, 4 * M)
        h.flush()
        h.shutdown()
    write(ours, "write -P 9 6M 1M")
    check_clean(ours)
    for n, data in contents.items():
        assert raw_of(ours, tmp_path, n) == data


def test_apply_restores_the_disk_size(tmp_path):
    img = create(tmp_path / "a.qcow2", 8 * M, "cluster_size=4096")
    write(img, "write -P 1 0 1M", "write -P 2 7M 1M")
    qemu_img("snapshot", "-c", "small", img)
    small = raw_of(img, tmp_path)
    # Grow past what one L2 table covers at 4 KiB clusters (2 MiB * 512).
    qemu_img("resize", img, "1100M")
    write(img, "write -P 3 1090M 1M", "write -P 4 0 64k")
    plugin_ops(img, "snapshot-create=big")
    big = raw_of(img, tmp_path)

    plugin_ops(img, "snapshot-apply=small")
    check_clean(img)
    assert virtual_size(img) == 8 * M
    assert raw_of(img, tmp_path) == small

    plugin_ops(img, "snapshot-apply=big")
    check_clean(img)
    assert virtual_size(img) == 1100 * M
    assert raw_of(img, tmp_path) == big
    # QEMU reads a snapshot at the active image's size (zeros past its own).
    view = raw_of(img, tmp_path, "small")
    assert view[:8 * M] == small and view[8 * M:] == bytes(len(view) - 8 * M)


def test_qemu_applies_and_deletes_our_snapshots(tmp_path):
    img = create(tmp_path / "a.qcow2", 8 * M)
    fill(img, 64 * K, 5)
    before = raw_of(img, tmp_path)
    plugin_ops(img, "snapshot-create=ours")
    write(img, "write -P 0x66 0 4M")
    qemu_img("snapshot", "-a", "ours", img)
    check_clean(img)
    assert raw_of(img, tmp_path) == before
    qemu_img("snapshot", "-d", "ours", img)
    check_clean(img)
    assert raw_of(img, tmp_path) == before


def test_operations_run_in_the_order_given(tmp_path):
    img = create(tmp_path / "a.qcow2", 4 * M)
    write(img, "write -P 1 0 64k")
    plugin_ops(img, "snapshot-create=a", "snapshot-create=b",
               "snapshot-delete=a", "snapshot-apply=b", "snapshot-create=a")
    assert snapshots(img) == [("2", "b"), ("3", "a")]
    check_clean(img)


# --------------------------------------------------------------------------
# Random sequences

@pytest.mark.parametrize("opts,seed", [
    (["cluster_size=4096"], 1),
    ([], 2),
    (["extended_l2=on"], 3),
    (["cluster_size=512", "refcount_bits=8"], 4),
    (["compat=0.10", "cluster_size=4096"], 5),
], ids=["4k", "64k", "extl2", "512-rb8", "v2-4k"])
def test_random_sequence(tmp_path, opts, seed):
    """Random writes, zeroes and trims between random creates, deletes and
    applies, against a mirror of the active disk and of every snapshot."""
    rnd = random.Random(seed)
    size = 4 * M
    img = create(tmp_path / "a.qcow2", size, *opts)
    active = bytearray(size)
    snaps = {}
    counter = 0
    for rnd_i in range(8):
        with serve(img) as srv:
            h = srv.connect()
            for _ in range(rnd.randrange(5, 25)):
                off = rnd.randrange(0, size - 1)
                n = min(rnd.choice([1, 511, 4096, 65536, 300000]), size - off)
                op = rnd.random()
                if op < 0.7:
                    data = bytes([rnd.randrange(1, 256)]) * n
                    h.pwrite(data, off)
                    active[off:off + n] = data
                elif op < 0.85:
                    h.zero(n, off)
                    active[off:off + n] = bytes(n)
                else:
                    # Trim leaves zeros or the old bytes: adopt what reads.
                    h.trim(n, off)
                    active[off:off + n] = h.pread(n, off)
            h.flush()
            h.shutdown()
        choice = rnd.random()
        if choice < 0.5 or not snaps:
            counter += 1
            name = "s%d" % counter
            plugin_ops(img, "snapshot-create=" + name)
            snaps[name] = bytes(active)
        elif choice < 0.75:
            name = rnd.choice(sorted(snaps))
            plugin_ops(img, "snapshot-delete=" + name)
            del snaps[name]
        else:
            name = rnd.choice(sorted(snaps))
            plugin_ops(img, "snapshot-apply=" + name)
            active = bytearray(snaps[name])
        check_clean(img)
        assert raw_of(img, tmp_path) == bytes(active), "round %d" % rnd_i
    assert sorted(n for _, n in snapshots(img)) == sorted(snaps)
    for name, data in snaps.items():
        assert raw_of(img, tmp_path, name) == data, name
