"""Encrypted images: LUKS (several cipher specs) and legacy AES, the ways
of giving the passphrase, and wrong passphrases.

QEMU's plaintext comes from qemu-img convert with the secret; what we
serve must match it byte for byte.  Building a LUKS image costs qemu-img a
PBKDF2 benchmark (~2.5 s), so each cipher's image is built once per module.
"""

import fcntl
import os
import select
import subprocess
import time

import pytest

from conftest import PLUGIN, nbdkit_env, start_fails
from images import (assert_files_equal, create,
                    crypt_raw, crypt_write, luks_create, nbdcopy_export,
                    nbdkit_run,
                    odd_ranges, qemu_img, raw_from_layout, read_header,
                    secret_args, serve_compare)

K = 1024
M = 1024 * 1024
# A literal with spaces, '=', '+' and ',' in it: passphrase=PASS must take
# everything after the first '='.
PASS = "correct horse=battery+staple, 42"
SIZE = 2 * M + 512

CIPHERS = {
    "aes256-xts-plain64": [],     # QEMU's default
    "aes128-cbc-essiv": ["encrypt.cipher-alg=aes-128",
                         "encrypt.cipher-mode=cbc",
                         "encrypt.ivgen-alg=essiv",
                         "encrypt.ivgen-hash-alg=sha256"],
    "aes256-cbc-plain64": ["encrypt.cipher-alg=aes-256",
                           "encrypt.cipher-mode=cbc",
                           "encrypt.ivgen-alg=plain64"],
}

WRITES = ["write -P 0x11 0 64k",
          "write -P 0x22 66 42",
          "write -P 0x33 65531 10",          # across a cluster
          "write -P 0x44 300k 200k",
          "write -z 320k 64k",
          "write -P 0x55 1m 4k",
          "write -z -u 1m 64k",
          "write -P 0x66 2m 512",
          "write -P 0x77 1500k 1"]


@pytest.fixture(scope="module")
def luks_images(tmp_path_factory):
    d = tmp_path_factory.mktemp("luks")
    out = {}
    for name, opts in CIPHERS.items():
        img = d / (name + ".qcow2")
        luks_create(img, SIZE, PASS, *opts)
        crypt_write(img, PASS, *WRITES)
        raw = crypt_raw(img, PASS, d / (name + ".raw"))
        out[name] = (img, raw)
    return out


def cipher_info(img):
    return qemu_img("info", img).stdout


@pytest.mark.parametrize("name", list(CIPHERS))
def test_luks_reads_like_qemu(luks_images, name):
    img, raw = luks_images[name]
    info = cipher_info(img)
    assert "encrypted: yes" in info
    alg = name.split("-")
    assert "cipher alg: aes-%s" % alg[0][3:] in info
    assert "cipher mode: %s" % alg[1] in info
    assert "ivgen alg: %s" % alg[2] in info
    assert read_header(img)["crypt_method"] == 2
    with open(raw, "rb") as f:
        f.seek(66)
        assert f.read(42) == b"\x22" * 42
    serve_compare(img, raw, "passphrase=" + PASS,
                  ranges=odd_ranges(SIZE, 64 * K) +
                  [(1, 510), (511, 2), (300 * K + 1, 1023), (1500 * K, 1)])


@pytest.mark.parametrize("cluster", [512])
def test_luks_small_clusters(tmp_path, cluster):
    """The IV follows the host offset, which small clusters scatter."""
    img = tmp_path / "a.qcow2"
    luks_create(img, 1 * M, PASS, "cluster_size=%d" % cluster)
    crypt_write(img, PASS, "write -P 0x31 100k 10k", "write -P 0x32 0 700",
                "write -P 0x33 50k 1", "write -P 0x34 99k 2k")
    raw = crypt_raw(img, PASS, tmp_path / "a.raw")
    serve_compare(img, raw, "passphrase=" + PASS,
                  ranges=odd_ranges(1 * M, cluster))


def test_luks_over_plain_backing(tmp_path):
    base = raw_from_layout(tmp_path / "base.raw", 1 * M,
                           [(0, 1 * M, "random")])
    img = luks_create(tmp_path / "top.qcow2", None, PASS,
                      backing=["-b", "base.raw", "-F", "raw"])
    crypt_write(img, PASS, "write -P 0x41 64k 100", "write -z 256k 64k")
    raw = crypt_raw(img, PASS, tmp_path / "a.raw")
    serve_compare(img, raw, "passphrase=" + PASS,
                  ranges=[(64 * K - 1, 102), (256 * K - 3, 64 * K + 6)])


def test_legacy_aes(tmp_path):
    """qemu-img 7.2 still creates legacy AES images (crypt_method 1), and
    qemu-io/qemu-img still read and write them; only system emulators
    refuse them."""
    img = tmp_path / "aes.qcow2"
    p = qemu_img("create", "-q", "-f", "qcow2", *secret_args("legacy-pw"),
                 "-o", "encrypt.format=aes,encrypt.key-secret=s0", str(img),
                 "1M", check=False)
    assert p.returncode == 0, "qemu-img refused legacy AES: " + p.stderr
    assert read_header(img)["crypt_method"] == 1
    crypt_write(img, "legacy-pw", "write -P 0x51 1000 5000",
                "write -P 0x52 64k 64k", "write -P 0x53 700k 1")
    raw = crypt_raw(img, "legacy-pw", tmp_path / "aes.raw")
    serve_compare(img, raw, "passphrase=legacy-pw",
                  ranges=[(999, 2), (1001, 4998), (64 * K - 1, 3)])


@pytest.fixture
def default_image(luks_images):
    return luks_images["aes256-xts-plain64"]


def test_passphrase_from_file(tmp_path, default_image):
    img, raw = default_image
    pw = tmp_path / "pw"
    pw.write_text(PASS + "\n")     # a trailing newline is not part of it
    out = tmp_path / "copy.raw"
    nbdcopy_export(img, out, "passphrase=+" + str(pw))
    assert_files_equal(out, raw)
    pw.write_text(PASS)            # nor need there be one
    out.unlink()
    nbdcopy_export(img, out, "passphrase=+" + str(pw))
    assert_files_equal(out, raw)


def test_passphrase_from_fd(tmp_path, default_image):
    img, raw = default_image
    pw = tmp_path / "pw"
    pw.write_text(PASS)
    fd = os.open(pw, os.O_RDONLY)
    # A high, free number, so that the number given is what is honoured.
    fd2 = fcntl.fcntl(fd, fcntl.F_DUPFD, 60)
    os.close(fd)
    try:
        out = tmp_path / "copy.raw"
        nbdcopy_export(img, out, "passphrase=-%d" % fd2, pass_fds=(fd2,))
        assert_files_equal(out, raw)
    finally:
        os.close(fd2)


def test_passphrase_fd_via_shell_redirect(tmp_path, default_image):
    img, raw = default_image
    pw = tmp_path / "pw"
    pw.write_text(PASS)
    out = tmp_path / "copy.raw"
    p = subprocess.run(
        ["bash", "-c", 'nbdkit -U - "$0" file="$1" passphrase=-3 '
         '--run "nbdcopy \\"\\$uri\\" $2" 3<"$3"',
         PLUGIN, str(img), str(out), str(pw)],
        text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60,
        env=nbdkit_env())
    assert p.returncode == 0, p.stderr
    assert_files_equal(out, raw)


def test_passphrase_prompt_on_tty(tmp_path, default_image):
    """passphrase=- prompts on the terminal: run nbdkit on a pty, wait for
    the prompt, type the passphrase."""
    img, raw = default_image
    out = tmp_path / "copy.raw"
    master, slave = os.openpty()
    cmd = ["nbdkit", "-U", "-", PLUGIN, "file=" + str(img), "passphrase=-",
           "--run", 'nbdcopy "$uri" %s' % out]
    p = subprocess.Popen(cmd, stdin=slave, stdout=slave,
                         stderr=subprocess.PIPE, text=True,
                         env=nbdkit_env())
    os.close(slave)
    try:
        seen = b""
        deadline = time.monotonic() + 30
        while b"password" not in seen.lower():
            assert time.monotonic() < deadline, "no prompt: %r" % seen
            r, _, _ = select.select([master], [], [], 1)
            if r:
                seen += os.read(master, 1024)
        os.write(master, (PASS + "\n").encode())
        err = p.communicate(timeout=60)[1]
        assert p.returncode == 0, err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(master)
    assert_files_equal(out, raw)


def test_passphrase_dash_needs_a_tty(tmp_path, default_image):
    """nbdkit 1.32 reads passphrase=- only from a terminal: with a pipe on
    stdin it refuses clearly (and -0 is refused too), rather than hanging
    or using a wrong passphrase."""
    img, raw = default_image
    for param in ["passphrase=-", "passphrase=-0"]:
        r, w = os.pipe()
        os.write(w, (PASS + "\n").encode())
        os.close(w)
        try:
            p = nbdkit_run(img, param, run_cmd="true", stdin=r)
        finally:
            os.close(r)
        assert p.returncode != 0, param
        assert "password" in p.stderr, p.stderr


@pytest.mark.parametrize("wrong", ["wrong", PASS + "x", PASS[:-1], ""])
def test_wrong_passphrase_refused(default_image, wrong):
    img, raw = default_image
    rc, err = start_fails(img, "passphrase=" + wrong)
    assert rc > 0, "started with a wrong passphrase (rc %d): %s" % (rc, err)
    assert "passphrase" in err.lower() or "unlock" in err.lower(), err


def test_missing_passphrase_refused(default_image):
    img, raw = default_image
    rc, err = start_fails(img)
    assert rc > 0, err
    assert "passphrase" in err, err


def test_wrong_passphrase_from_file_refused(tmp_path, default_image):
    img, raw = default_image
    pw = tmp_path / "pw"
    pw.write_text("nope\n")
    rc, err = start_fails(img, "passphrase=+" + str(pw))
    assert rc > 0, err


def test_passphrase_on_plain_image_is_harmless(tmp_path):
    img = create(tmp_path / "a.qcow2", 1 * M)
    from images import write_patterns
    write_patterns(img, [(0x71, 0, 100)])
    from images import assert_reads_like_qemu
    assert_reads_like_qemu(img, tmp_path, "passphrase=unused")
