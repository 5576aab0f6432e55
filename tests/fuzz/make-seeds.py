#!/usr/bin/python3
"""Regenerate the fuzzer's seed corpus (tests/fuzz/seeds/).

    /usr/bin/python3 tests/fuzz/make-seeds.py [OUTDIR]

Small images, a few KiB each, covering what the engine parses: v2 and v3
headers, 512 B / 4 KiB / 16 KiB clusters, data, zero (plain and
preallocated), unallocated and compressed clusters (deflate and zstd),
extended L2 subclusters, a snapshot table, header extensions (feature
names, bitmaps, backing format, unknown), a backing file name, an external
data file, legacy AES and LUKS encryption.  Most are made by qemu-img and
qemu-io; the LUKS and extended-L2 seeds are built by hand so they stay
small (a QEMU LUKS header carries 256 KiB of key material, an extended L2
image 16 KiB clusters): LUKS with a single AF stripe and 1000 PBKDF2
iterations (crafted.make_luks_image), unlocked by the fuzzer's passphrase
"x".

Needs qemu-img/qemu-io and python3-cryptography.  Output is deterministic
except for the qemu-made bitmaps and snapshot timestamps.
"""

import os
import struct
import subprocess
import sys
import tempfile
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))
import crafted as C  # noqa: E402

PASSPHRASE = b"x"


def sh(*cmd):
    subprocess.run([str(c) for c in cmd], check=True,
                   stdout=subprocess.DEVNULL)


def qemu(out, name, size, cmds, cluster=512, opts=(), compat="1.1",
         after=None):
    path = os.path.join(out, name)
    if os.path.exists(path):
        os.unlink(path)
    C.make_image(path, size, *cmds, cluster_size=cluster, compat=compat,
                 opts=opts)
    if after:
        after(path)
    return path


# --------------------------------------------------------------------------
# Hand-built images

class Builder:
    """Lay out a qcow2 v3 image cluster by cluster."""

    def __init__(self, cluster_bits, size, extl2=False):
        self.cb = cluster_bits
        self.cs = 1 << cluster_bits
        self.size = size
        self.extl2 = extl2
        self.entry = 16 if extl2 else 8
        self.l2_entries = self.cs // self.entry
        self.file = bytearray(self.cs)           # cluster 0: header
        self.exts = []
        self.incompat = C.INCOMPAT_EXTL2 if extl2 else 0
        self.crypt_method = 0

    def alloc(self, data=b"", clusters=None):
        off = len(self.file)
        n = clusters or max(1, -(-len(data) // self.cs))
        self.file += data + b"\0" * (n * self.cs - len(data))
        return off

    def finish(self, l1, reftable, keep=None):
        """The file; with keep, only its first keep bytes."""
        h = struct.pack(">IIQIIQIIQQIIQQQQII", C.MAGIC, 3, 0, 0, self.cb,
                        self.size, self.crypt_method, len(l1),
                        self.l1_offset, reftable, 1, 0, 0,
                        self.incompat, 0, 0, 4, 112)
        h += b"\0" * 8                           # compression type: deflate
        for magic, data in self.exts:
            h += struct.pack(">II", magic, len(data)) + data
            h += b"\0" * (-len(h) % 8)
        h += b"\0" * 8
        self.file[0:len(h)] = h
        for i, e in enumerate(l1):
            struct.pack_into(">Q", self.file, self.l1_offset + 8 * i, e)
        return bytes(self.file[:keep])


def luks_seed(path):
    """512 B clusters, 64 KiB virtual, LUKS aes-128-cbc-plain64 / sha256,
    one key slot with a single AF stripe (QEMU insists on 4000, which
    would be 64 KiB of key material; the engine takes 1 to 4000).
    """
    C.make_luks_image(path, PASSPHRASE.decode(), size=64 << 10,
                      cluster_bits=9, mode="cbc-plain64", key_bytes=16,
                      stripes=1, data=((0, 0x5a), (512, 0xc3)))


def extl2_seed(path):
    """16 KiB clusters with extended L2, 64 KiB virtual.  Cluster 0:
    subclusters 0-1 data, 2 zero, rest unallocated; cluster 1: all zero
    (no host cluster); cluster 2: compressed; cluster 3: unallocated.
    The refcount table shares the L2 cluster (a reader never looks at
    it), the data cluster is cut after the two subclusters it uses, and
    the compressed bytes sit in cluster 0 after the header, to keep the
    file small.
    """
    b = Builder(14, 64 << 10, extl2=True)
    l2 = b.alloc()
    b.l1_offset = b.alloc()
    data = b.alloc(b"\x11" * 512 + b"\x22" * 512)

    z = zlib.compressobj(9, zlib.DEFLATED, -12)
    comp = z.compress(bytes(range(256)) * 64) + z.flush()
    coff = 4096
    b.file[coff:coff + len(comp)] = comp
    nsec = (coff % 512 + len(comp) + 511) // 512
    shift = 62 - (14 - 8)

    def put(i, desc, bitmap):
        struct.pack_into(">QQ", b.file, l2 + 16 * i, desc, bitmap)
    put(0, C.COPIED | data, 0x3 | (1 << (32 + 2)))
    put(1, 0, 0xffffffff << 32)
    put(2, C.COMPRESSED | ((nsec - 1) << shift) | coff, 0)
    with open(path, "wb") as f:
        f.write(b.finish([C.COPIED | l2], l2, keep=data + 1024))


# --------------------------------------------------------------------------

def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "seeds")
    os.makedirs(out, exist_ok=True)

    qemu(out, "v3-512.qcow2", "128k",
         ["write -P 0x11 0 1k", "write -c -P 0x22 4k 512",
          "write -z 8k 512", "write -P 0x33 12k 512", "write -z 12k 512",
          "write -P 0x44 40k 1k", "write -P 0x55 100k 512"])
    # Data past the fuzzer's read window (8 MiB), reached by sampling.
    qemu(out, "far-4k.qcow2", "64M",
         ["write -P 0x11 0 4k", "write -P 0x12 40M 8k",
          "write -c -P 0x13 60M 4k", "write -P 0x14 63M 4k",
          "write -z 63M 4k"], cluster=4096)
    qemu(out, "v2-512.qcow2", "64k",
         ["write -P 0x11 0 1k", "write -c -P 0x22 4k 512",
          "write -P 0x33 40k 512"], compat="0.10")
    qemu(out, "v3-4k.qcow2", "16k",
         ["write -P 0x11 0 4k", "write -c -P 0x22 4k 4k",
          "write -z 8k 4k"], cluster=4096)
    qemu(out, "zstd-512.qcow2", "16k",
         ["write -c -P 0x66 0 512", "write -c -P 0x67 512 512",
          "write -P 0x68 1k 512"], opts=["compression_type=zstd"])
    qemu(out, "snapshot-512.qcow2", "16k", ["write -P 0x11 0 1k"],
         after=lambda p: (sh("qemu-img", "snapshot", "-c", "snap1", p),
                          sh("qemu-io", "-f", "qcow2", "-c",
                             "write -P 0x12 512 512", p)))
    qemu(out, "bitmaps-512.qcow2", "16k", ["write -P 0x11 0 512"],
         after=lambda p: sh("qemu-img", "bitmap", "--add", p, "b0"))

    # Several bitmaps with data clusters (dirty bits QEMU stored), one
    # disabled, one left in use, at 512 B and 4 KiB granularity.
    def bitmaps(p):
        sh("qemu-img", "bitmap", "--add", "-g", "512", p, "fine")
        sh("qemu-img", "bitmap", "--add", "-g", "4096", p, "coarse")
        sh("qemu-img", "bitmap", "--add", p, "stale")
        sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x21 1k 3k",
           "-c", "write -z 12k 1k", p)
        sh("qemu-img", "bitmap", "--disable", p, "coarse")
        q = C.Qcow2(p)
        e = [x for x in q.bitmap_entries() if x["name"] == b"stale"][0]
        q.poke_be(e["at"] + 12, ">I", e["flags"] | 1)
        q.save()
    qemu(out, "bitmaps-data-512.qcow2", "16k", ["write -P 0x11 0 512"],
         after=bitmaps)

    # Header extensions: feature names, unknown extension, backing file
    # name and format (refused: the fuzzer does not follow backing files).
    def exts(p):
        q = C.Qcow2(p)
        q.set_extensions([
            (C.EXT_FEATURE_TABLE, C.feature_name_entry(0, 0, "dirty bit") +
             C.feature_name_entry(0, 5, "future feature")),
            (0x12345678, b"unknown extension"),
            (C.EXT_BACKING_FORMAT, b"qcow2"),
        ])
        q.poke(400, b"backing.qcow2")
        q.set("backing_file_offset", 400)
        q.set("backing_file_size", 13)
        q.save()
    qemu(out, "exts-512.qcow2", "16k", ["write -P 0x11 0 512"], after=exts)

    # External data file: the fuzzer substitutes a memory file for it.
    with tempfile.TemporaryDirectory() as d:
        p = qemu(d, "df.qcow2", "16k", ["write -P 0x11 0 1k"],
                 opts=["data_file=" + os.path.join(d, "df.raw")])
        q = C.Qcow2(p)
        q.del_ext(C.EXT_DATA_FILE)
        q.add_ext(C.EXT_DATA_FILE, b"data.raw")
        q.save(os.path.join(out, "datafile-512.qcow2"))

    # Legacy AES, key "x".
    p = os.path.join(out, "aes-512.qcow2")
    if os.path.exists(p):
        os.unlink(p)
    sh("qemu-img", "create", "-q", "-f", "qcow2", "--object",
       "secret,id=s0,data=x", "-o",
       "encrypt.format=aes,encrypt.key-secret=s0,cluster_size=512", p, "16k")
    sh("qemu-io", "--object", "secret,id=s0,data=x", "--image-opts",
       "driver=qcow2,file.filename=%s,encrypt.key-secret=s0" % p,
       "-c", "write -P 0x5a 0 1k", "-c", "write -P 0xa5 4k 512")

    luks_seed(os.path.join(out, "luks-512.qcow2"))
    extl2_seed(os.path.join(out, "extl2-16k.qcow2"))

    total = 0
    for f in sorted(os.listdir(out)):
        n = os.path.getsize(os.path.join(out, f))
        total += n
        print("%-24s %7d" % (f, n))
    print("%-24s %7d" % ("total", total))


if __name__ == "__main__":
    main()
