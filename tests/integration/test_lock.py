"""Image locking against QEMU 7.2 (core/backends/image_lock.c).

The plugin does not call the locking code yet, so these tests drive it
through the `test_lock hold FILE rw|ro` mode of the unit test binary: it
takes our locks on FILE, prints "locked" and keeps them until its stdin
closes; when the locks are refused it prints the engine's error line and
exits 1.

What QEMU 7.2 does, and these tests pin down for us too:
  - a read-write opener locks bytes 100 101 103 201 203, a read-only one
    100 201 203 (OFD read locks, visible in /proc/locks);
  - while anyone holds an image read-write, every other opener without
    -U/force-share fails, readers included: a writer with
    'Failed to get "write" lock', a reader (qemu-io -r, qemu-img info) with
    'Failed to get shared "write" lock';
  - while anyone holds it read-only, writers fail with
    'Failed to get "write" lock' and readers succeed;
  - -U (force-share) readers never look at the locks.

Environment:
  QCOW2_TEST_LOCK_BIN  the test_lock binary (default build/tests/test_lock)
"""

import contextlib
import os
import shutil
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOCK_BIN = os.environ.get("QCOW2_TEST_LOCK_BIN",
                          os.path.join(ROOT, "build", "tests", "test_lock"))

if not os.access(LOCK_BIN, os.X_OK):
    pytest.skip("lock helper %s not built" % LOCK_BIN, allow_module_level=True)
if not shutil.which("qemu-io") or not shutil.which("qemu-img"):
    pytest.skip("qemu-io / qemu-img not installed", allow_module_level=True)
if not os.path.exists("/proc/locks"):
    pytest.skip("no /proc/locks", allow_module_level=True)

RW_BYTES = {100, 101, 103, 201, 203}
RO_BYTES = {100, 201, 203}

WRITE_LOCK = 'Failed to get "write" lock'
SHARED_WRITE_LOCK = 'Failed to get shared "write" lock'


def run(*cmd, **kw):
    return subprocess.run([str(c) for c in cmd], text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL, timeout=60, **kw)


@pytest.fixture
def img(tmp_path):
    path = tmp_path / "a.qcow2"
    r = run("qemu-img", "create", "-f", "qcow2", path, "1M")
    assert r.returncode == 0, r.stderr
    return path


def locked_bytes(path):
    """Protocol bytes (100-299) anybody holds on path, from /proc/locks."""
    st = os.stat(path)
    ident = "%02x:%02x:%d" % (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    out = set()
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            # "N: OFDLCK ADVISORY READ -1 fe:00:1234 100 101"; waiters
            # ("N: -> ...") are not holders.
            if len(fields) != 8 or fields[5] != ident:
                continue
            start = int(fields[6])
            end = 299 if fields[7] == "EOF" else int(fields[7])
            out |= {b for b in range(start, end + 1) if 100 <= b < 300}
    return out


def wait_for_bytes(path, expected, proc=None):
    """Wait until exactly `expected` is locked on path (the holder has
    finished opening); fail if proc exits first."""
    deadline = time.monotonic() + 30
    while locked_bytes(path) != expected:
        if proc is not None and proc.poll() is not None:
            pytest.fail("holder exited %d: %s" % (proc.returncode, proc.stderr.read()))
        if time.monotonic() > deadline:
            pytest.fail("locked bytes %s, expected %s" % (sorted(locked_bytes(path)),
                                                          sorted(expected)))
        time.sleep(0.02)


def stop(p):
    """End a holder by closing its stdin (EOF), as a user would."""
    try:
        p.stdin.close()
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


@contextlib.contextmanager
def hold(path, mode):
    """Our locks on path, held by the helper until the block ends."""
    p = subprocess.Popen([LOCK_BIN, "hold", str(path), mode], text=True,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        line = p.stdout.readline()
        if line != "locked\n":
            p.wait(10)
            pytest.fail("hold %s failed (%s): %s" % (mode, p.returncode, p.stderr.read()))
        yield p
    finally:
        stop(p)


def try_hold(path, mode):
    """Take our locks once and let go (stdin is /dev/null)."""
    return run(LOCK_BIN, "hold", path, mode)


@contextlib.contextmanager
def qemu_holds(path, readonly):
    """An interactive qemu-io keeping path open until the block ends."""
    cmd = ["qemu-io", "-f", "qcow2"] + (["-r"] if readonly else []) + [str(path)]
    p = subprocess.Popen(cmd, text=True, stdin=subprocess.PIPE,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_bytes(path, RO_BYTES if readonly else RW_BYTES, p)
        yield p
    finally:
        stop(p)


def refused(r, message):
    return r.returncode != 0 and message in r.stderr


def assert_we_are_refused(r, path, message):
    assert r.returncode == 1, r.stderr
    assert message in r.stderr
    assert str(path) in r.stderr
    assert "another process" in r.stderr
    assert "lock failed: -11 " in r.stderr  # -EAGAIN


@pytest.mark.parametrize("readonly", [False, True], ids=["rw", "ro"])
def test_same_bytes_as_qemu(img, readonly):
    expected = RO_BYTES if readonly else RW_BYTES
    with qemu_holds(img, readonly):
        assert locked_bytes(img) == expected
    assert locked_bytes(img) == set()
    with hold(img, "ro" if readonly else "rw"):
        assert locked_bytes(img) == expected
    assert locked_bytes(img) == set()


def test_our_rw_lock_keeps_qemu_out(img):
    with hold(img, "rw"):
        r = run("qemu-io", "-f", "qcow2", "-c", "read 0 512", img)
        assert refused(r, WRITE_LOCK), r.stderr
        assert "Is another process using the image" in r.stderr
        r = run("qemu-io", "-r", "-f", "qcow2", "-c", "read 0 512", img)
        assert refused(r, SHARED_WRITE_LOCK), r.stderr
        r = run("qemu-img", "info", img)
        assert refused(r, SHARED_WRITE_LOCK), r.stderr
        # force-share readers skip the locks entirely
        r = run("qemu-img", "info", "-U", img)
        assert r.returncode == 0, r.stderr
        r = run("qemu-io", "-r", "-U", "-f", "qcow2", "-c", "read 0 512", img)
        assert r.returncode == 0, r.stderr
    # Exiting released everything.
    r = run("qemu-io", "-f", "qcow2", "-c", "write 0 512", img)
    assert r.returncode == 0, r.stderr


def test_our_ro_lock_keeps_qemu_writers_out(img):
    with hold(img, "ro"):
        r = run("qemu-io", "-f", "qcow2", "-c", "write 0 512", img)
        assert refused(r, WRITE_LOCK), r.stderr
        r = run("qemu-io", "-r", "-f", "qcow2", "-c", "read 0 512", img)
        assert r.returncode == 0, r.stderr
        r = run("qemu-img", "info", img)
        assert r.returncode == 0, r.stderr


def test_qemu_writer_keeps_us_out(img):
    with qemu_holds(img, readonly=False):
        assert_we_are_refused(try_hold(img, "rw"), img, WRITE_LOCK)
        assert_we_are_refused(try_hold(img, "ro"), img, SHARED_WRITE_LOCK)
        # That is what QEMU itself does to a second, read-only opener.
        r = run("qemu-io", "-r", "-f", "qcow2", "-c", "read 0 512", img)
        assert refused(r, SHARED_WRITE_LOCK), r.stderr
        # Our refusals left nothing behind.
        assert locked_bytes(img) == RW_BYTES
    r = try_hold(img, "rw")
    assert r.returncode == 0, r.stderr


def test_qemu_reader_keeps_our_writer_out(img):
    with qemu_holds(img, readonly=True):
        assert_we_are_refused(try_hold(img, "rw"), img, WRITE_LOCK)
        r = try_hold(img, "ro")
        assert r.returncode == 0 and r.stdout == "locked\n", r.stderr
        assert locked_bytes(img) == RO_BYTES


def test_qemu_nbd_reader_keeps_our_writer_out(img, tmp_path):
    if not shutil.which("qemu-nbd"):
        pytest.skip("qemu-nbd not installed")
    sock = tmp_path / "sock"
    p = subprocess.Popen(["qemu-nbd", "-r", "-f", "qcow2", "-k", str(sock), str(img)],
                         text=True, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_bytes(img, RO_BYTES, p)
        assert_we_are_refused(try_hold(img, "rw"), img, WRITE_LOCK)
        r = try_hold(img, "ro")
        assert r.returncode == 0, r.stderr
    finally:
        p.terminate()
        p.wait(10)


def test_two_of_ours(img):
    # A second server on the same image: as between two QEMUs.
    with hold(img, "rw"):
        assert_we_are_refused(try_hold(img, "rw"), img, WRITE_LOCK)
        assert_we_are_refused(try_hold(img, "ro"), img, SHARED_WRITE_LOCK)
    with hold(img, "ro"), hold(img, "ro"):
        assert locked_bytes(img) == RO_BYTES
        assert_we_are_refused(try_hold(img, "rw"), img, WRITE_LOCK)
