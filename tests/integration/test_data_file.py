"""External data files (incompatible bit 2): guest data lives in a separate
file at host offset == guest offset.

QEMU 7.2 resolves a relative data file name against the process's working
directory (both qemu-img create and every later open), unlike backing file
names, which are relative to the image.  The engine resolves it against the
image's directory, like backing files; so QEMU runs here with the image's
directory as its working directory (see the autouse fixture).
"""

import os

import pytest

from conftest import qemu_img, qemu_raw, start_fails
from images import (assert_files_equal, create, drop_header_extension,
                    header_extensions, odd_ranges, raw_from_layout,
                    read_header, serve_compare, write_patterns)

K = 1024
M = 1024 * 1024
EXT_DATA_FILE = 0x44415441

@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


LAYOUT = [(0x11, 0, 42),                 # host offset 0: COPIED disambiguates
          (0x22, 66, 42),
          (0x33, 64 * K - 5, 10),
          (0x44, 200 * K + 1, 300 * K),
          (None, 256 * K, 64 * K),        # zero inside data
          (0x55, 1 * M, 64 * K), (None, 1 * M, 64 * K, "-u"),
          (None, 2 * M, 128 * K),         # zero on unallocated
          (0x66, 3 * M - 100, 100)]


def add_header_extension(path, magic, data):
    """Append an extension (replacing any of the same magic)."""
    import struct
    drop_header_extension(path, magic)
    exts = [e for e in header_extensions(path)]
    h = read_header(path)
    area = b""
    for m, d in exts + [(magic, data)]:
        area += struct.pack(">II", m, len(d)) + d + b"\0" * (-len(d) % 8)
    area += b"\0" * 8
    with open(path, "r+b") as f:
        f.seek(h["header_length"])
        f.write(area)


@pytest.mark.parametrize("raw_flag", [False, True], ids=["plain", "data_file_raw"])
@pytest.mark.parametrize("cluster", [4 * K, 64 * K])
def test_external_data_file(tmp_path, raw_flag, cluster):
    img = tmp_path / "a.qcow2"
    opts = ["data_file=a.data", "cluster_size=%d" % cluster]
    if raw_flag:
        opts.append("data_file_raw=on")
    create(img, 3 * M, *opts)
    h = read_header(img)
    assert h["incompatible"] & 4
    assert bool(h["autoclear"] & 2) == raw_flag
    write_patterns(img, LAYOUT)
    raw = qemu_raw(img, tmp_path)
    serve_compare(img, raw, ranges=odd_ranges(3 * M, cluster))
    if raw_flag:
        # The data file is the disk, byte for byte.
        data = tmp_path / "a.data"
        if os.path.getsize(data) < 3 * M:
            os.truncate(data, 3 * M)
        assert_files_equal(data, raw)


def test_data_file_resolved_against_image_dir(tmp_path, monkeypatch):
    sub = tmp_path / "sub"
    sub.mkdir()
    monkeypatch.chdir(sub)
    img = create(sub / "a.qcow2", 1 * M, "data_file=a.data")
    write_patterns(img, [(0x77, 4096, 5000)])
    assert any(d == b"a.data" for m, d in header_extensions(img)
               if m == EXT_DATA_FILE)
    raw = qemu_raw(img, tmp_path)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    # A decoy of the same name in the working directory: QEMU would read
    # it; we must not.
    raw_from_layout(cwd / "a.data", 1 * M, [(0, 1 * M, 0xee)])
    monkeypatch.chdir(cwd)
    serve_compare(img, raw)


def test_data_file_override_after_rename(tmp_path):
    img = create(tmp_path / "a.qcow2", 2 * M, "data_file=a.data")
    write_patterns(img, LAYOUT[:6])
    raw = qemu_raw(img, tmp_path)
    os.rename(tmp_path / "a.data", tmp_path / "renamed.data")
    rc, err = start_fails(img)
    assert rc > 0 and "a.data" in err, err
    serve_compare(img, raw, "data-file=" + str(tmp_path / "renamed.data"))
    # QEMU agrees, given the same override.
    raw2 = tmp_path / "q2.raw"
    qemu_img("convert", "--image-opts",
             "driver=qcow2,file.filename=%s,data-file.filename=%s"
             % (img, tmp_path / "renamed.data"), "-O", "raw", raw2)
    assert_files_equal(raw, raw2)


def test_data_file_override_refused_without_external_data(tmp_path):
    img = create(tmp_path / "a.qcow2", 1 * M)
    other = raw_from_layout(tmp_path / "x.data", 1 * M, [(0, 10, 1)])
    rc, err = start_fails(img, "data-file=" + str(other))
    assert rc > 0 and "data" in err, err


def test_data_file_shorter_than_disk(tmp_path):
    """Reads past the end of a short external data file are zeros."""
    img = create(tmp_path / "a.qcow2", 2 * M, "data_file=a.data")
    write_patterns(img, [(0x11, 0, 2 * M)])
    os.truncate(tmp_path / "a.data", 1 * M + 1000)
    raw = qemu_raw(img, tmp_path)
    with open(raw, "rb") as f:
        data = f.read()
    tail_zero = data[1 * M + 1000:] == bytes(len(data) - 1 * M - 1000)
    assert data[1 * M + 999] == 0x11 and tail_zero
    serve_compare(img, raw, ranges=[(1 * M + 990, 20), (1 * M, 64 * K)])


def test_data_file_with_backing(tmp_path):
    base = raw_from_layout(tmp_path / "base.raw", 2 * M,
                           [(0, 2 * M, "random")])
    img = create(tmp_path / "a.qcow2", None, "data_file=a.data",
                 backing="base.raw", backing_fmt="raw")
    write_patterns(img, [(0x21, 100 * K, 10), (None, 1 * M, 64 * K),
                         (0x22, 1 * M + 64 * K - 1, 2)])
    raw = qemu_raw(img, tmp_path)
    serve_compare(img, raw, ranges=odd_ranges(2 * M, 64 * K))


@pytest.mark.parametrize("name", ["nbd:localhost:10809",
                                  'json:{"driver":"file","filename":"/etc/passwd"}'])
def test_data_file_protocol_name_refused(tmp_path, name):
    img = create(tmp_path / "a.qcow2", 1 * M, "data_file=a.data")
    add_header_extension(img, EXT_DATA_FILE, name.encode())
    assert "data file: " + name in qemu_img("info", img).stdout
    rc, err = start_fails(img)
    assert rc > 0, err
    assert "plain path" in err or "protocol" in err, err
