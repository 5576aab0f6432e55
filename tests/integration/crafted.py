"""Build qcow2 images with qemu-img, then poke their metadata with python.

The helpers parse the header themselves (no qemu tooling) so they can find
and overwrite any field or table entry, including into values QEMU would
never write.  Offsets and layouts follow docs/interop/qcow2.rst; see
/work/shared/reference/qcow2-format.md sections 1-8.

    img = Qcow2(path)
    img.set("l1_size", 0xffffffff)
    img.set_l2_entry(guest_offset, 0x52a00 | COPIED)
    img.save()             # or img.save(other_path)
"""

import struct
import subprocess

MAGIC = 0x514649fb

# name: (offset, struct format), all big-endian
HEADER_FIELDS = {
    "magic": (0, ">I"),
    "version": (4, ">I"),
    "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"),
    "size": (24, ">Q"),
    "crypt_method": (32, ">I"),
    "l1_size": (36, ">I"),
    "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"),
    "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"),
    "snapshots_offset": (64, ">Q"),
    "incompatible_features": (72, ">Q"),
    "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"),
    "refcount_order": (96, ">I"),
    "header_length": (100, ">I"),
    "compression_type": (104, ">B"),
}

# Header extension magics
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xe2792aca
EXT_FEATURE_TABLE = 0x6803f857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537be77
EXT_DATA_FILE = 0x44415441

# Feature bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_RAW = 1 << 1

# L1/L2 entry bits
COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO = 1
OFFSET_MASK = 0x00fffffffffffe00

SNAPSHOT_HEADER = ">QIHHIIQII"   # 40 bytes, see Qcow2.snapshots()


def run(*cmd):
    return subprocess.run([str(c) for c in cmd], check=True, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def make_image(path, size="4M", *io_cmds, cluster_size=4096, compat="1.1",
               opts=(), extra_create=()):
    """qemu-img create + qemu-io writes; returns path.

    opts are extra -o options ("extended_l2=on", ...).
    """
    o = ["cluster_size=%d" % cluster_size, "compat=%s" % compat, *opts]
    run("qemu-img", "create", "-f", "qcow2", "-o", ",".join(o),
        *extra_create, path, size)
    if io_cmds:
        args = ["qemu-io", "-f", "qcow2"]
        for c in io_cmds:
            args += ["-c", c]
        run(*args, path)
    return path


class Qcow2:
    """A qcow2 file loaded in memory, with setters for every structure."""

    def __init__(self, path):
        self.path = str(path)
        with open(self.path, "rb") as f:
            self.data = bytearray(f.read())

    # ---- raw bytes -------------------------------------------------------

    def save(self, path=None):
        path = str(path or self.path)
        with open(path, "wb") as f:
            f.write(self.data)
        return path

    def poke(self, offset, data):
        """Overwrite bytes, growing the file if needed."""
        end = offset + len(data)
        if end > len(self.data):
            self.data.extend(b"\0" * (end - len(self.data)))
        self.data[offset:end] = data

    def poke_be(self, offset, fmt, value):
        self.poke(offset, struct.pack(fmt, value))

    def peek_be(self, offset, fmt):
        return struct.unpack_from(fmt, self.data, offset)[0]

    def truncate(self, length):
        del self.data[length:]

    # ---- header ----------------------------------------------------------

    def get(self, field):
        off, fmt = HEADER_FIELDS[field]
        return self.peek_be(off, fmt)

    def set(self, field, value):
        off, fmt = HEADER_FIELDS[field]
        self.poke_be(off, fmt, value)

    @property
    def cluster_size(self):
        return 1 << self.get("cluster_bits")

    @property
    def extended_l2(self):
        return bool(self.get("version") >= 3 and
                    self.get("incompatible_features") & INCOMPAT_EXTL2)

    @property
    def header_length(self):
        return 72 if self.get("version") == 2 else self.get("header_length")

    def set_feature(self, group, bit, on=True):
        """group: 'incompatible', 'compatible' or 'autoclear'."""
        field = group + "_features"
        v = self.get(field)
        self.set(field, v | (1 << bit) if on else v & ~(1 << bit))

    # ---- header extensions ----------------------------------------------

    def _ext_area_end(self):
        bfo = self.get("backing_file_offset")
        return bfo if bfo else self.cluster_size

    def extensions(self):
        """List of (magic, data) up to the end marker."""
        out = []
        off, end = self.header_length, self._ext_area_end()
        while off + 8 <= end:
            magic, length = struct.unpack_from(">II", self.data, off)
            if magic == EXT_END:
                break
            out.append((magic, bytes(self.data[off + 8:off + 8 + length])))
            off += 8 + ((length + 7) & ~7)
        return out

    def set_extensions(self, exts):
        """Rewrite the extension area.  Each item is (magic, data) or
        (magic, data, declared_length) to lie about the length.
        """
        area = bytearray()
        for e in exts:
            magic, data = e[0], e[1]
            length = e[2] if len(e) > 2 else len(data)
            area += struct.pack(">II", magic, length) + data
            area += b"\0" * (-len(area) % 8)
        area += struct.pack(">II", EXT_END, 0)
        start, end = self.header_length, self._ext_area_end()
        if start + len(area) > end:
            raise ValueError("extensions do not fit before offset %d" % end)
        self.poke(start, bytes(area) + b"\0" * (end - start - len(area)))

    def add_ext(self, magic, data, length=None):
        exts = self.extensions()
        exts.append((magic, data) if length is None else (magic, data, length))
        self.set_extensions(exts)

    def del_ext(self, magic):
        self.set_extensions([e for e in self.extensions() if e[0] != magic])

    def ext(self, magic):
        for m, d in self.extensions():
            if m == magic:
                return d
        return None

    # ---- L1 / L2 ---------------------------------------------------------

    @property
    def l2_entry_bytes(self):
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self):
        return self.cluster_size // self.l2_entry_bytes

    def l1_entry_offset(self, index):
        return self.get("l1_table_offset") + 8 * index

    def l1_entry(self, index):
        return self.peek_be(self.l1_entry_offset(index), ">Q")

    def set_l1_entry(self, index, value):
        self.poke_be(self.l1_entry_offset(index), ">Q", value)

    def l1_index(self, guest):
        return guest // (self.cluster_size * self.l2_entries)

    def l2_entry_offset(self, guest):
        """File offset of the L2 entry mapping guest offset."""
        l2 = self.l1_entry(self.l1_index(guest)) & OFFSET_MASK
        if l2 == 0:
            raise ValueError("no L2 table for guest offset %#x" % guest)
        index = (guest // self.cluster_size) % self.l2_entries
        return l2 + index * self.l2_entry_bytes

    def l2_entry(self, guest):
        return self.peek_be(self.l2_entry_offset(guest), ">Q")

    def set_l2_entry(self, guest, value):
        self.poke_be(self.l2_entry_offset(guest), ">Q", value)

    def l2_bitmap(self, guest):
        assert self.extended_l2
        return self.peek_be(self.l2_entry_offset(guest) + 8, ">Q")

    def set_l2_bitmap(self, guest, value):
        assert self.extended_l2
        self.poke_be(self.l2_entry_offset(guest) + 8, ">Q", value)

    def host_offset(self, guest):
        """Host offset of an allocated, uncompressed guest cluster."""
        e = self.l2_entry(guest)
        assert not e & COMPRESSED
        return (e & OFFSET_MASK) + guest % self.cluster_size

    def compressed_descriptor(self, guest):
        """(host byte offset, nb_csectors) of a compressed cluster."""
        e = self.l2_entry(guest)
        assert e & COMPRESSED
        shift = 62 - (self.get("cluster_bits") - 8)
        mask = (1 << (self.get("cluster_bits") - 8)) - 1
        return e & ((1 << shift) - 1), ((e >> shift) & mask) + 1

    def make_compressed_entry(self, host, nb_csectors):
        shift = 62 - (self.get("cluster_bits") - 8)
        return COMPRESSED | ((nb_csectors - 1) << shift) | host

    # ---- refcounts -------------------------------------------------------

    def reftable_entry_offset(self, index):
        return self.get("refcount_table_offset") + 8 * index

    def set_reftable_entry(self, index, value):
        self.poke_be(self.reftable_entry_offset(index), ">Q", value)

    # ---- snapshots -------------------------------------------------------

    def snapshots(self):
        """List of dicts, each with the entry's file offset ('at')."""
        out = []
        off = self.get("snapshots_offset")
        for _ in range(self.get("nb_snapshots")):
            (l1_off, l1_size, id_len, name_len, dsec, dnsec, vmclock,
             vmstate, extra) = struct.unpack_from(SNAPSHOT_HEADER, self.data,
                                                  off)
            out.append(dict(at=off, l1_table_offset=l1_off, l1_size=l1_size,
                            id_len=id_len, name_len=name_len,
                            extra_data_size=extra))
            off += (40 + extra + id_len + name_len + 7) & ~7
        return out

    SNAPSHOT_FIELDS = {
        "l1_table_offset": (0, ">Q"), "l1_size": (8, ">I"),
        "id_len": (12, ">H"), "name_len": (14, ">H"),
        "extra_data_size": (36, ">I"),
    }

    def set_snapshot_field(self, index, field, value):
        off, fmt = self.SNAPSHOT_FIELDS[field]
        self.poke_be(self.snapshots()[index]["at"] + off, fmt, value)


    # ---- persistent bitmaps ----------------------------------------------

    def bitmap_directory(self):
        """(offset, size, nb) of the bitmap directory, from the extension."""
        nb, _, size, offset = struct.unpack(">IIQQ", self.ext(EXT_BITMAPS))
        return offset, size, nb

    BITMAP_FIELDS = {
        "table_offset": (0, ">Q"), "table_size": (8, ">I"),
        "flags": (12, ">I"), "type": (16, ">B"),
        "granularity_bits": (17, ">B"), "name_size": (18, ">H"),
        "extra_data_size": (20, ">I"),
    }

    def bitmap_entries(self):
        """[{field: value, "at": offset, "name": bytes}] of the directory."""
        offset, size, _ = self.bitmap_directory()
        out, pos = [], offset
        while pos < offset + size:
            e = {k: self.peek_be(pos + o, f)
                 for k, (o, f) in self.BITMAP_FIELDS.items()}
            e["at"] = pos
            start = pos + 24 + e["extra_data_size"]
            e["name"] = bytes(self.data[start:start + e["name_size"]])
            out.append(e)
            pos += (24 + e["extra_data_size"] + e["name_size"] + 7) & ~7
        return out

    def set_bitmap_field(self, index, field, value):
        off, fmt = self.BITMAP_FIELDS[field]
        self.poke_be(self.bitmap_entries()[index]["at"] + off, fmt, value)

    def bitmap_table_entry_offset(self, index, i):
        return self.bitmap_entries()[index]["table_offset"] + 8 * i


def feature_name_entry(kind, bit, name):
    """One 48-byte entry of the feature name table extension."""
    raw = name.encode()[:46]
    return struct.pack(">BB", kind, bit) + raw + b"\0" * (46 - len(raw))


def crypto_ext(offset, length):
    return struct.pack(">QQ", offset, length)


def bitmaps_ext(nb, reserved, dir_size, dir_offset):
    return struct.pack(">IIQQ", nb, reserved, dir_size, dir_offset)


# --------------------------------------------------------------------------
# LUKS images built by hand: QEMU's qemu-img spends a second or more timing
# PBKDF2 before it writes one, which adds up in a test suite.

def _af_diffuse(hashname, buf):
    import hashlib
    dlen = hashlib.new(hashname).digest_size
    out = bytearray()
    for i in range(0, len(buf), dlen):
        chunk = buf[i:i + dlen]
        out += hashlib.new(hashname, struct.pack(">I", i // dlen) +
                           chunk).digest()[:len(chunk)]
    return bytes(out)


def _xor(a, b):
    return bytes(x ^ y for x, y in zip(a, b))


def luks_sector_cipher(mode, key, sector, data, encrypt=True):
    """Encrypt or decrypt whole 512-byte sectors as LUKS/QEMU do, the
    first with IV `sector`.  mode: 'xts-plain64' or 'cbc-plain64'.
    """
    from cryptography.hazmat.primitives.ciphers import (Cipher, algorithms,
                                                        modes)
    out = bytearray()
    for i in range(0, len(data), 512):
        iv = struct.pack("<Q", sector + i // 512) + b"\0" * 8
        m = modes.XTS(iv) if mode.startswith("xts") else modes.CBC(iv)
        c = Cipher(algorithms.AES(key), m)
        x = c.encryptor() if encrypt else c.decryptor()
        out += x.update(data[i:i + 512]) + x.finalize()
    return bytes(out)


def make_luks_image(path, passphrase, size=1 << 20, cluster_bits=12,
                    mode="xts-plain64", key_bytes=64, hashname="sha256",
                    iterations=1000, stripes=4000, data=((0x10000, 0x5a),)):
    """A qcow2 v3 image encrypted with LUKS1, as QEMU lays it out: header,
    refcount table, L1, L2, the LUKS area (phdr, then the key material of
    slot 0, the only active one), then data clusters.  data is a list of
    (guest cluster offset, byte) filled clusters.  Returns (path, offset
    of the LUKS area).
    """
    import hashlib
    import random
    rnd = random.Random(1)
    cs = 1 << cluster_bits
    master = bytes(rnd.randrange(256) for _ in range(key_bytes))
    slot_salt = bytes(rnd.randrange(256) for _ in range(32))
    mk_salt = bytes(rnd.randrange(256) for _ in range(32))
    km_sector = 8
    km_span = (key_bytes * stripes + 511) // 512 * 512
    slot_step = (km_span // 512 + 7) // 8 * 8   # sectors, as QEMU aligns
    area_len = km_sector * 512 + km_span
    area_clusters = (area_len + cs - 1) // cs
    l2_entries = cs // 8
    l1_size = (size + cs * l2_entries - 1) // (cs * l2_entries)
    reftable, l1, l2, luks = cs, 2 * cs, 3 * cs, 4 * cs
    first_data = luks + area_clusters * cs
    f = bytearray(first_data + len(data) * cs)

    struct.pack_into(">IIQIIQIIQQIIQQQQII", f, 0, MAGIC, 3, 0, 0,
                     cluster_bits, size, 2, l1_size, l1, reftable, 1, 0, 0,
                     0, 0, 0, 4, 112)
    struct.pack_into(">IIQQ", f, 112, EXT_CRYPTO, 16, luks, area_len)
    struct.pack_into(">Q", f, l1, COPIED | l2)

    hdr = bytearray(592)
    hdr[0:6] = b"LUKS\xba\xbe"
    struct.pack_into(">H", hdr, 6, 1)
    hdr[8:11] = b"aes"
    hdr[40:40 + len(mode)] = mode.encode()
    hdr[72:72 + len(hashname)] = hashname.encode()
    # QEMU wants every slot's key material, active or not, before the
    # payload; only slot 0's is stored (the area ends after it).
    struct.pack_into(">I", hdr, 104, km_sector + 8 * slot_step)
    struct.pack_into(">I", hdr, 108, key_bytes)
    hdr[112:132] = hashlib.pbkdf2_hmac(hashname, master, mk_salt,
                                       iterations, 20)
    hdr[132:164] = mk_salt
    struct.pack_into(">I", hdr, 164, iterations)
    hdr[168:204] = b"00000000-0000-4000-8000-000000000000"
    for i in range(8):
        s = 208 + 48 * i
        if i == 0:
            struct.pack_into(">II", hdr, s, 0x00AC71F3, iterations)
            hdr[s + 8:s + 40] = slot_salt
        else:
            struct.pack_into(">II", hdr, s, 0x0000DEAD, 0)
        struct.pack_into(">II", hdr, s + 40,
                         km_sector + i * slot_step, stripes)
    f[luks:luks + 592] = hdr

    # Key material: AF split of the master key, encrypted with the slot key.
    dlen = key_bytes
    d = bytes(dlen)
    split = bytearray()
    for _ in range(stripes - 1):
        s = bytes(rnd.randrange(256) for _ in range(dlen))
        split += s
        d = _af_diffuse(hashname, _xor(d, s))
    split += _xor(d, master)
    split += bytes(km_span - len(split))
    slot_key = hashlib.pbkdf2_hmac(hashname, passphrase.encode(), slot_salt,
                                   iterations, key_bytes)
    km = luks_sector_cipher(mode, slot_key, 0, bytes(split))
    f[luks + km_sector * 512:luks + km_sector * 512 + km_span] = km

    for i, (guest, byte) in enumerate(data):
        host = first_data + i * cs
        f[host:host + cs] = luks_sector_cipher(mode, master, host // 512,
                                               bytes([byte]) * cs)
        struct.pack_into(">Q", f, l2 + 8 * (guest // cs), COPIED | host)
    with open(path, "wb") as out:
        out.write(f)
    return path, luks


def sparse_file(path, size, pokes=()):
    """A sparse file of size bytes with (offset, bytes) written into it."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in pokes:
            f.seek(off)
            f.write(data)
    return path


if __name__ == "__main__":
    import sys
    img = Qcow2(sys.argv[1])
    for name in HEADER_FIELDS:
        print("%-24s %#x" % (name, img.get(name)))
    for magic, data in img.extensions():
        print("ext %#010x len %d" % (magic, len(data)))
    print("l1[0] %#x" % img.l1_entry(0))
    print("snapshots", img.snapshots())
    sys.exit(0)
