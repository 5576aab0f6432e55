"""Crash safety: SIGKILL the server in the middle of a mixed workload.

Each round serves the image read-write, drives random allocating writes,
overwrites, zeroes, trims, flushes and FUA writes from several
connections at once, and kills the server (SIGKILL) at a random moment.
Then:

- `qemu-img check` must find no corruption (exit 0, or 3: leaked clusters
  only, which a crash may leave);
- every 4 KiB block must read (through QEMU) a value it may hold: the
  value it had at the last completed flush (or FUA write), or any value
  written to it after that; never bytes that were never written there;
- the next round reopens the crashed image read-write and goes on.

The client model: concurrent requests never overlap, so the requests on
one block are ordered; each block records the values its requests may
have left (a write: its data; a zero: zeros; a trim: the previous value
or zeros).  A flush covers every request that completed before it was
sent, on any connection (the plugin advertises multi-conn).

A second set of rounds models a power failure rather than a process
crash: a preloaded shim journals the server's writes and syncs on the
image, and after the kill the image is rebuilt from its state at the
start of the round, every write before the last completed sync, and a
random subset of the writes after it (what a disk cache may have kept).
That tests the sync ordering (flush.c, l2_write.c, refcount.c), which a
SIGKILL alone cannot: the page cache survives it.

Rounds are run on: 64 KiB clusters, 4 KiB clusters, an overlay over a
qcow2 backing file, extended L2, and extended L2 over a backing file.
QCOW2_STRESS scales the number of rounds; QCOW2_SEED fixes the seed.
"""
import mmap
import shlex
import os
import random
import shutil
import signal
import struct
import threading
import time

import nbd
import pytest

import conftest

from conftest import assert_image_reads_like_qemu, qemu_img, qemu_raw, run, serve

K = 1024
M = 1024 * K
BLOCK = 4 * K
SCALE = float(os.environ.get("QCOW2_STRESS", "1"))
SEED = int(os.environ.get("QCOW2_SEED", str(random.randrange(1 << 30))))
BASE_TAG = 1 << 48      # value ids of the backing file's blocks
ZEROS = bytes(BLOCK)


def block_bytes(value, blk):
    """The contents of block blk holding value (0: zeros)."""
    if value == 0:
        return ZEROS
    return struct.pack("<QQ", value, blk) * (BLOCK // 16)


def decode(data, blk):
    """The value a block holds, or None if it is not one we could write."""
    if data == ZEROS:
        return 0
    value, b = struct.unpack_from("<QQ", data)
    if b != blk or data != block_bytes(value, blk):
        return None
    return value


class Model:
    """What each block may hold, and what it must hold after a crash."""

    def __init__(self, initial):
        self.base = [frozenset([v]) for v in initial]   # before the round
        self.ops = [[] for _ in initial]   # per block: [done_stamp, fua, values]
        self.lock = threading.Lock()
        self.stamp = 0
        self.flushed = -1       # issue stamp of the latest completed flush
        self.busy = []          # (first, last) block ranges in flight
        self.next_value = 1
        self.counts = {}

    def tick(self):
        self.stamp += 1
        return self.stamp

    def reserve(self, first, n, kind, value_fn, fua):
        """Start a request on blocks [first, first + n) unless it overlaps
        one in flight.  Returns the per-block records, or None."""
        last = first + n - 1
        with self.lock:
            for a, b in self.busy:
                if a <= last and first <= b:
                    return None
            self.busy.append((first, last))
            self.counts[kind] = self.counts.get(kind, 0) + 1
            recs = []
            for blk in range(first, first + n):
                prev = self.ops[blk][-1][2] if self.ops[blk] else self.base[blk]
                if kind == "write":
                    values = frozenset([value_fn()])
                elif kind == "zero":
                    values = frozenset([0])
                else:               # trim: advisory
                    values = prev | {0}
                rec = [None, fua, values]
                self.ops[blk].append(rec)
                recs.append(rec)
            return recs

    def new_value(self):
        v = self.next_value
        self.next_value += 1
        return v

    def complete(self, first, n, recs):
        with self.lock:
            s = self.tick()
            for rec in recs:
                rec[0] = s
            self.busy.remove((first, first + n - 1))

    def flush_issue(self):
        with self.lock:
            return self.tick()

    def flush_done(self, issued):
        with self.lock:
            self.flushed = max(self.flushed, issued)
            self.counts["flush"] = self.counts.get("flush", 0) + 1

    def allowed(self, blk):
        ops = self.ops[blk]
        k = -1
        for i, (done, fua, _) in enumerate(ops):
            if done is not None and (done < self.flushed or fua):
                k = i
        allowed = set(ops[k][2] if k >= 0 else self.base[blk])
        durable = frozenset(allowed)
        for _, _, values in ops[k + 1:]:
            allowed |= values
        return durable, allowed


class Image:
    def __init__(self, tmp_path, kind):
        self.kind = kind
        self.dir = tmp_path
        self.size = 32 * M if kind == "c4k" else 64 * M
        self.nblocks = self.size // BLOCK
        self.path = tmp_path / ("crash-%s.qcow2" % kind)
        opts = {"plain": "cluster_size=64k",
                "c4k": "cluster_size=4k",
                "overlay": "cluster_size=64k",
                "extl2": "cluster_size=64k,extended_l2=on",
                "extl2-overlay": "cluster_size=64k,extended_l2=on"}[kind]
        if kind.endswith("overlay"):
            raw = tmp_path / "base.raw"
            with open(raw, "wb") as f:
                # Half the blocks carry data, the rest are zeros.
                for blk in range(self.nblocks):
                    f.write(block_bytes(BASE_TAG | blk if blk % 4 < 2 else 0, blk))
            base = tmp_path / "base.qcow2"
            qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, base)
            os.unlink(raw)
            qemu_img("create", "-f", "qcow2", "-o", opts, "-b", base.name,
                     "-F", "qcow2", self.path, str(self.size))
            self.initial = [BASE_TAG | b if b % 4 < 2 else 0
                            for b in range(self.nblocks)]
        else:
            qemu_img("create", "-f", "qcow2", "-o", opts, self.path,
                     str(self.size))
            self.initial = [0] * self.nblocks


class Worker(threading.Thread):
    def __init__(self, h, model, rnd, nblocks, stop, killing, flush_p):
        super().__init__()
        self.h, self.m, self.rnd, self.nblocks = h, model, rnd, nblocks
        self.stop, self.killing, self.flush_p = stop, killing, flush_p
        self.error = None

    def extent(self, big):
        rnd = self.rnd
        if big:
            n = rnd.choice([16, 32, 64, 128, 256])      # 64 KiB .. 1 MiB
            first = rnd.randrange(0, self.nblocks - n + 1)
            if rnd.random() < 0.7:
                first -= first % 16                    # cluster aligned
        else:
            n = rnd.choice([1, 1, 1, 2, 3, 4, 8, 16, 17])
            first = rnd.randrange(0, self.nblocks - n + 1)
        return first, n

    def run(self):
        rnd, m, h = self.rnd, self.m, self.h
        try:
            while not self.stop.is_set():
                r = rnd.random()
                if r < self.flush_p:
                    issued = m.flush_issue()
                    h.flush()
                    m.flush_done(issued)
                    continue
                if r < 0.72:
                    kind, big = "write", rnd.random() < 0.2
                elif r < 0.86:
                    kind, big = "zero", rnd.random() < 0.5
                else:
                    kind, big = "trim", rnd.random() < 0.5
                fua = kind == "write" and rnd.random() < self.flush_p
                first, n = self.extent(big)
                vals = []

                def value():
                    v = m.new_value()
                    vals.append(v)
                    return v

                recs = m.reserve(first, n, kind, value, fua)
                if recs is None:
                    continue
                off, length = first * BLOCK, n * BLOCK
                if kind == "write":
                    data = b"".join(block_bytes(v, first + i)
                                    for i, v in enumerate(vals))
                    h.pwrite(data, off, nbd.CMD_FLAG_FUA if fua else 0)
                elif kind == "zero":
                    h.zero(length, off, nbd.CMD_FLAG_NO_HOLE
                           if rnd.random() < 0.3 else 0)
                else:
                    h.trim(length, off)
                m.complete(first, n, recs)
        except nbd.Error as e:
            # Set just before the SIGKILL: a failure after it may be the
            # kill (checking `stop`, set after the kill, raced with it).
            if not self.killing.is_set():
                self.error = e


def server_pid(srv):
    """conftest.serve waits for the pid file to exist, not to be written."""
    path = os.path.join(os.path.dirname(srv.sock), "pid")
    deadline = time.monotonic() + 10
    while True:
        with open(path) as f:
            text = f.read()
        if text.endswith("\n") or time.monotonic() > deadline:
            return int(text)
        time.sleep(0.01)


def crash_round(img, model, rnd, nconn=3, flush_p=0.07):
    """Run the workload and SIGKILL the server at a random moment."""
    stop, killing = threading.Event(), threading.Event()
    with serve(img.path) as srv:
        pid = server_pid(srv)
        handles = [srv.connect() for _ in range(nconn)]
        workers = [Worker(h, model, random.Random(rnd.random()), img.nblocks,
                          stop, killing, flush_p) for h in handles]
        for w in workers:
            w.start()
        time.sleep(rnd.uniform(0.1, 1.2))
        killing.set()
        os.kill(pid, signal.SIGKILL)
        # Requests that fail from now on are in flight: they may or may
        # not have reached the disk.
        stop.set()
        for w in workers:
            w.join(60)
        stderr = srv.stderr
        for w in workers:
            assert w.error is None, "request failed before the kill: %s\n%s" % (
                w.error, stderr[-3000:])
        for h in handles:
            try:
                h.close()
            except Exception:   # noqa: BLE001
                pass


def verify(img, model, rnd_round, tmp_path):
    """Check the crashed image; return the value of every block."""
    p = run("qemu-img", "check", img.path, check=False)
    if p.returncode not in (0, 3):
        keep = tmp_path / ("corrupt-round%d.qcow2" % rnd_round)
        shutil.copy(img.path, keep)
        pytest.fail("seed %d round %d: qemu-img check exit %d (image kept "
                    "as %s):\n%s%s" % (SEED, rnd_round, p.returncode, keep,
                                       p.stdout[-3000:], p.stderr[-2000:]))
    raw = qemu_raw(img.path, tmp_path)
    values = []
    problems = []
    with open(raw, "rb") as f, \
            mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        assert len(mm) == img.size
        mv = memoryview(mm)
        for blk in range(img.nblocks):
            chunk = mv[blk * BLOCK:(blk + 1) * BLOCK]
            if not model.ops[blk]:
                # Untouched this round: the fast path.
                (old,) = model.base[blk]
                if chunk == block_bytes(old, blk):
                    values.append(old)
                    continue
            got = decode(bytes(chunk), blk)
            durable, allowed = model.allowed(blk)
            if got is None or got not in allowed:
                if len(problems) < 10:
                    problems.append(
                        "block %d (offset %#x) reads %s; flushed value %s, "
                        "allowed %s" % (blk, blk * BLOCK,
                                        "garbage" if got is None else got,
                                        sorted(durable), sorted(allowed)[:8]))
                else:
                    problems.append(None)
            values.append(got)
        del chunk
        mv.release()
    os.unlink(raw)
    if problems:
        keep = tmp_path / ("lost-round%d.qcow2" % rnd_round)
        shutil.copy(img.path, keep)
        pytest.fail("seed %d round %d: %d blocks read what they may not "
                    "(image kept as %s):\n%s" % (
                        SEED, rnd_round, len(problems), keep,
                        "\n".join(p for p in problems if p)))
    return values, p.returncode


ROUNDS = {"plain": 14, "c4k": 8, "overlay": 8, "extl2": 5, "extl2-overlay": 5}


@pytest.mark.parametrize("kind", list(ROUNDS))
def test_crash_rounds(tmp_path, kind):
    rounds = max(2, round(ROUNDS[kind] * SCALE))
    rnd = random.Random("%d-%s" % (SEED, kind))
    img = Image(tmp_path, kind)
    values = img.initial
    next_value = 1
    leaks = 0
    stats = {}
    for n in range(rounds):
        model = Model(values)
        model.next_value = next_value
        crash_round(img, model, rnd)
        values, rc = verify(img, model, n, tmp_path)
        next_value = model.next_value
        leaks += rc == 3
        for k, v in model.counts.items():
            stats[k] = stats.get(k, 0) + v
    print("%s: %d rounds, %d with leaks, requests %s" % (
        kind, rounds, leaks, stats))
    assert stats.get("write", 0) > rounds and stats.get("flush", 0) > 0
    # What the plugin reads of the final (crashed) image is what QEMU reads.
    assert_image_reads_like_qemu(img.path, tmp_path)


# --- power loss ---------------------------------------------------------

SHIM_C = r"""
/* Power-loss journal: LD_PRELOAD into the server.  Every pwrite and hole
 * punch on the file named by $QCOW2_JOURNAL_TARGET is done under one mutex
 * and appended to $QCOW2_JOURNAL (offset, length, data), and every
 * completed fdatasync/fsync appends a marker holding the journal position
 * at which it started: everything before that position is durable.
 * Plain preallocation (fallocate mode 0, new clusters with extended L2)
 * changes no contents: it is not journalled, so every replay models a
 * power failure that lost the file size it added.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

enum { REC_WRITE = 1, REC_PUNCH = 2, REC_SYNC = 3 };
struct rec { uint32_t type, pad; uint64_t offset, length; };

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int journal = -1;
static uint64_t position;          /* records written so far */
static char target[PATH_MAX];
static signed char fd_kind[4096];  /* 0 unknown, 1 target, -1 other */

static ssize_t (*real_pwrite) (int, const void *, size_t, off_t);
static int (*real_fdatasync) (int);
static int (*real_fsync) (int);
static int (*real_fallocate) (int, int, off_t, off_t);
static int (*real_close) (int);

__attribute__ ((constructor)) static void
init (void)
{
  const char *j = getenv ("QCOW2_JOURNAL"), *t = getenv ("QCOW2_JOURNAL_TARGET");
  real_pwrite = dlsym (RTLD_NEXT, "pwrite64");
  real_fdatasync = dlsym (RTLD_NEXT, "fdatasync");
  real_fsync = dlsym (RTLD_NEXT, "fsync");
  real_fallocate = dlsym (RTLD_NEXT, "fallocate64");
  real_close = dlsym (RTLD_NEXT, "close");
  if (j && t && realpath (t, target))
    journal = open (j, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0644);
}

static int
is_target (int fd)
{
  char link[64], path[PATH_MAX];
  ssize_t n;

  if (journal < 0 || fd < 0 || fd >= 4096)
    return 0;
  if (fd_kind[fd] == 0) {
    snprintf (link, sizeof link, "/proc/self/fd/%d", fd);
    n = readlink (link, path, sizeof path - 1);
    path[n > 0 ? n : 0] = 0;
    fd_kind[fd] = n > 0 && strcmp (path, target) == 0 ? 1 : -1;
  }
  return fd_kind[fd] == 1;
}

static void
append (uint32_t type, uint64_t offset, uint64_t length, const void *data)
{
  struct rec r = { type, 0, offset, length };
  if (write (journal, &r, sizeof r) != sizeof r ||
      (data && write (journal, data, length) != (ssize_t) length))
    abort ();
  position++;
}

#define PWRITE_BODY                                                     \
  if (!is_target (fd))                                                  \
    return real_pwrite (fd, buf, count, offset);                        \
  pthread_mutex_lock (&lock);                                           \
  ssize_t r = real_pwrite (fd, buf, count, offset);                     \
  if (r > 0)                                                            \
    append (REC_WRITE, offset, r, buf);                                 \
  pthread_mutex_unlock (&lock);                                         \
  return r;

ssize_t pwrite (int fd, const void *buf, size_t count, off_t offset) { PWRITE_BODY }
ssize_t pwrite64 (int fd, const void *buf, size_t count, off_t offset) { PWRITE_BODY }

static int
do_sync (int fd, int (*fn) (int))
{
  if (!is_target (fd))
    return fn (fd);
  pthread_mutex_lock (&lock);
  uint64_t start = position;
  pthread_mutex_unlock (&lock);
  int r = fn (fd);
  if (r == 0) {
    pthread_mutex_lock (&lock);
    append (REC_SYNC, start, 0, NULL);
    pthread_mutex_unlock (&lock);
  }
  return r;
}

int fdatasync (int fd) { return do_sync (fd, real_fdatasync); }
int fsync (int fd) { return do_sync (fd, real_fsync); }

#define FALLOCATE_BODY                                                  \
  if (!is_target (fd))                                                  \
    return real_fallocate (fd, mode, offset, len);                      \
  pthread_mutex_lock (&lock);                                           \
  int r = real_fallocate (fd, mode, offset, len);                       \
  if (r == 0 && (mode & FALLOC_FL_PUNCH_HOLE))                          \
    append (REC_PUNCH, offset, len, NULL);                              \
  else if (r == 0 && (mode & ~FALLOC_FL_KEEP_SIZE))                     \
    abort ();   /* modes that change contents: not modelled */          \
  pthread_mutex_unlock (&lock);                                         \
  return r;

int fallocate (int fd, int mode, off_t offset, off_t len) { FALLOCATE_BODY }
int fallocate64 (int fd, int mode, off_t offset, off_t len) { FALLOCATE_BODY }

int
close (int fd)
{
  if (fd >= 0 && fd < 4096)
    fd_kind[fd] = 0;
  return real_close (fd);
}
"""

REC = struct.Struct("<IIQQ")
REC_WRITE, REC_PUNCH, REC_SYNC = 1, 2, 3


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler for the power-loss shim")
    d = tmp_path_factory.mktemp("shim")
    (d / "shim.c").write_text(SHIM_C)
    run(cc, "-O2", "-shared", "-fPIC", "-o", d / "shim.so", d / "shim.c", "-ldl")
    return d / "shim.so"


def replay(start, journal, out, rnd):
    """Rebuild the image a power failure could leave: `start` plus every
    journaled change before the last completed sync, and a random subset
    of those after it.  Returns (records, durable, kept)."""
    with open(journal, "rb") as f:
        j = f.read()
    recs = []
    pos = 0
    durable = 0
    while pos + REC.size <= len(j):
        kind, _, offset, length = REC.unpack_from(j, pos)
        pos += REC.size
        if kind == REC_SYNC:
            durable = max(durable, offset)
            recs.append(None)
            continue
        if kind == REC_WRITE:
            if pos + length > len(j):
                break               # the kill interrupted the journal
            recs.append((offset, memoryview(j)[pos:pos + length]))
            pos += length
        else:
            recs.append((offset, length))
    shutil.copy(start, out)
    kept = 0
    fd = os.open(out, os.O_WRONLY)
    try:
        for i, rec in enumerate(recs):
            if rec is None or (i >= durable and rnd.random() < 0.5):
                continue
            kept += i >= durable
            offset, data = rec
            if isinstance(data, int):
                data = bytes(data)      # a punched hole reads as zeros
            os.pwrite(fd, data, offset)
    finally:
        os.close(fd)
    return len(recs), durable, kept


POWER_ROUNDS = {"plain": 5, "c4k": 4, "extl2-overlay": 4}


@pytest.mark.parametrize("kind", list(POWER_ROUNDS))
def test_power_loss_rounds(tmp_path, kind, shim, monkeypatch):
    rounds = max(2, round(POWER_ROUNDS[kind] * SCALE))
    rnd = random.Random("%d-power-%s" % (SEED, kind))
    img = Image(tmp_path, kind)
    journal = tmp_path / "journal"
    start = tmp_path / "round-start.qcow2"
    lost = tmp_path / "lost.qcow2"

    # Keep what the environment preloads (sanitizer runtimes) first.
    env = shlex.split(os.environ.get("QCOW2_NBDKIT_ENV", ""))
    preload = [kv.partition("=")[2] for kv in env if kv.startswith("LD_PRELOAD=")]
    env = [kv for kv in env if not kv.startswith("LD_PRELOAD=")]
    env += ["LD_PRELOAD=" + " ".join(preload + [str(shim)]),
            "QCOW2_JOURNAL=%s" % journal,
            "QCOW2_JOURNAL_TARGET=%s" % img.path]
    monkeypatch.setenv("QCOW2_NBDKIT_ENV", shlex.join(env))

    values = img.initial
    next_value = 1
    stats = {"records": 0, "after-sync": 0, "kept": 0}
    for n in range(rounds):
        shutil.copy(img.path, start)
        model = Model(values)
        model.next_value = next_value
        # Fewer syncs: more writes in flight when the power goes.
        crash_round(img, model, rnd, flush_p=0.02)
        assert journal.exists(), "the journal shim was not loaded"
        total, durable, kept = replay(start, journal, lost, rnd)
        assert total > 0, "the journal is empty"
        stats["records"] += total
        stats["after-sync"] += total - durable
        stats["kept"] += kept
        os.replace(lost, img.path)
        values, _ = verify(img, model, n, tmp_path)
        next_value = model.next_value
    print("%s: %d power-loss rounds, journal %s" % (kind, rounds, stats))
    assert stats["after-sync"] > 0


# --- reopening ----------------------------------------------------------

@pytest.mark.parametrize("maker", ["qemu", "plugin"])
def test_reopen_cluster_past_end_of_file(tmp_path, maker):
    """With extended L2 only the written subclusters of a new cluster
    reach the file, so a crashed image (or one QEMU closed cleanly) often
    ends in the middle of its last cluster.  Writing the rest of that cluster
    after reopening must work, and read back (found by the crash rounds:
    the write failed with "lies past the end of the file")."""
    img = tmp_path / "eof.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=64k,extended_l2=on",
             img, "16M")
    if maker == "qemu":
        conftest.qemu_io(img, "write -P 0x11 0 2k", "write -P 0x11 64k 2k")
    else:
        with serve(img) as srv:
            h = srv.connect()
            h.pwrite(b"\x11" * 2 * K, 0)        # data, then the L2 table
            h.pwrite(b"\x11" * 2 * K, 64 * K)   # the last cluster of the file
            h.shutdown()
        # We reserve new clusters whole (fallocate), but a power failure
        # may lose the file size that added: cut it as such a crash would.
        assert os.path.getsize(img) % (64 * K) == 0
        os.truncate(img, os.path.getsize(img) - 62 * K)
    assert os.path.getsize(img) % (64 * K) != 0
    with serve(img) as srv:
        h = srv.connect()
        h.pwrite(b"\x22" * 2 * K, 96 * K)       # past the end of the file
        assert h.pread(2 * K, 96 * K) == b"\x22" * 2 * K
        h.pwrite(b"\x33" * 4 * K, 124 * K)      # up to the end of the cluster
        assert h.pread(4 * K, 124 * K) == b"\x33" * 4 * K
        h.shutdown()
    p = run("qemu-img", "check", img, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    conftest.qemu_io(img, "read -P 0x11 64k 2k", "read -P 0x22 96k 2k",
                     "read -P 0x33 124k 4k", "read -P 0 66k 30k")
