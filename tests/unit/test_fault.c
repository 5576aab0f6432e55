/* nbdkit-qcow2
 * Copyright (C) 2026 the nbdkit-qcow2 authors
 * SPDX-License-Identifier: BSD-3-Clause (see LICENSE)
 */

/* Fault injection at the byte-backend level (tests/fault): one workload
 * that allocates L2 tables, grows L1 twice, grows the refcount table,
 * creates and deletes snapshots, writes with FUA, zeroes and trims, run
 * once for every write and every flush it makes, with that one failing
 * (fault_io.h: one-shot, sticky, and for writes torn).  After each run:
 * no crash (and under the sanitizer build no sanitizer report), the
 * reopened image reads back every write acknowledged before a successful
 * flush (workload.h), and both qcow2_check and `qemu-img check` find no
 * corruption; leaks are allowed.
 *
 * qemu-img checks every QEMU_EVERY-th point of each series (and the
 * first and last), 1 by default: all of them.  The first argument
 * overrides it; qcow2_check runs on every point regardless.
 *
 * The tallies are printed at the end.  Each point that fails is printed
 * with its fault (target, mode, k) and what went wrong.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "qcow2.h"
#include "io.h"
#include "fault_io.h"
#include "workload.h"
#include "testing.h"

#define K 1024
#define M (1024 * 1024)

/* 512-byte clusters with 64-bit refcounts: an L2 table maps 32 KiB of
 * disk, the first L1 cluster 2 MiB, a refcount block 32 KiB of file and
 * the first refcount table cluster 2 MiB of file; so growing the disk
 * to 4 and 16 MiB grows L1 twice, and writing 2 MiB of data grows the
 * refcount table.  main checks that it did.
 */
static const struct wop ops[] = {
  { WOP_WRITE, 0, 64 * K, 0 },
  { WOP_FLUSH, 0, 0, 0 },
  /* One new L2 table each. */
  { WOP_WRITE, 1 * 64 * K + 32 * K, 4 * K, 0 },
  { WOP_WRITE, 2 * 64 * K + 32 * K, 4 * K, 0 },
  { WOP_WRITE, 3 * 64 * K + 32 * K, 4 * K, 0 },
  { WOP_WRITE, 4 * 64 * K + 32 * K, 4 * K, 0 },
  { WOP_WRITE, 5 * 64 * K + 32 * K, 4 * K, 0 },
  { WOP_WRITE, 6 * 64 * K + 32 * K, 4 * K, 0 },
  { WOP_WRITE, 7 * 64 * K + 32 * K, 4 * K, 0 },
  { WOP_WRITE, 8 * 64 * K + 32 * K, 4 * K, 0 },
  { WOP_WRITE_FUA, 8 * K, 1 * K, 0 },
  { WOP_FLUSH, 0, 0, 0 },
  { WOP_SNAP_CREATE, 0, 0, 0 },
  /* Copy-on-write of clusters and L2 tables s0 shares. */
  { WOP_WRITE, 0, 16 * K, 0 },
  { WOP_ZERO, 64 * K + 32 * K, 4 * K, 0 },
  { WOP_FLUSH, 0, 0, 0 },
  { WOP_RESIZE, 0, 4 * M, 0 },          /* L1: 1 -> 2 clusters */
  /* 2 MiB of data: the refcount table grows. */
  { WOP_WRITE, 1 * M + 0 * 256 * K, 256 * K, 0 },
  { WOP_WRITE, 1 * M + 1 * 256 * K, 256 * K, 0 },
  { WOP_WRITE, 1 * M + 2 * 256 * K, 256 * K, 0 },
  { WOP_FLUSH, 0, 0, 0 },
  { WOP_WRITE, 1 * M + 3 * 256 * K, 256 * K, 0 },
  { WOP_WRITE, 1 * M + 4 * 256 * K, 256 * K, 0 },
  { WOP_FLUSH, 0, 0, 0 },
  { WOP_WRITE, 1 * M + 5 * 256 * K, 256 * K, 0 },
  { WOP_WRITE, 1 * M + 6 * 256 * K, 256 * K, 0 },
  { WOP_WRITE, 1 * M + 7 * 256 * K, 256 * K, 0 },
  { WOP_FLUSH, 0, 0, 0 },
  { WOP_SNAP_CREATE, 0, 0, 1 },
  { WOP_WRITE, 1 * M, 32 * K, 0 },
  { WOP_SNAP_DELETE, 0, 0, 0 },
  { WOP_FLUSH, 0, 0, 0 },
  { WOP_TRIM, 1 * M + 256 * K, 128 * K, 0 },
  { WOP_ZERO_TRIM, 1 * M + 512 * K, 64 * K, 0 },
  { WOP_FLUSH, 0, 0, 0 },
  { WOP_RESIZE, 0, 16 * M, 0 },         /* L1: 2 -> 8 clusters */
  { WOP_WRITE, 16 * M - 64 * K, 64 * K, 0 },
  { WOP_WRITE, 8 * M, 4 * K, 0 },
  { WOP_SNAP_DELETE, 0, 0, 1 },
  { WOP_WRITE, 2 * M + 4 * K, 4 * K, 0 },
  { WOP_FLUSH, 0, 0, 0 },
};

static const struct workload workload = {
  .cluster_size = 512,
  .refcount_bits = 64,
  .size = 1 * M,
  .ops = ops,
  .nr_ops = sizeof ops / sizeof ops[0],
};

static bool have_qemu;

struct tally {
  uint64_t points, fired;
  uint64_t refused, carried_on;         /* one-shot faults only */
  uint64_t clean, leaky, corrupt, unopenable;
  uint64_t qemu_checked, qemu_corrupt;
  uint64_t lost_points, lost_sectors, unverified;
  uint64_t failed_points;
};

static uint64_t
json_number (const char *json, const char *key)
{
  char pat[64];
  const char *p;

  snprintf (pat, sizeof pat, "\"%s\":", key);
  p = strstr (json, pat);
  return p ? strtoull (p + strlen (pat), NULL, 10) : 0;
}

/* qemu-img check --output=json of the image in fd: 0 clean, 3 leaks
 * only, 2 corruptions, 1 could not check (QEMU's exit codes); the
 * counts in *corruptions and *leaks.
 */
static int
qemu_check (int fd, uint64_t *corruptions, uint64_t *leaks, char *msg,
            size_t msglen)
{
  char cmd[128], out[4096];
  size_t n;
  FILE *p;
  int st;

  snprintf (cmd, sizeof cmd,
            "qemu-img check --output=json /proc/%d/fd/%d 2>&1",
            (int) getpid (), fd);
  p = popen (cmd, "r");
  if (!p)
    return -1;
  n = fread (out, 1, sizeof out - 1, p);
  out[n] = 0;
  st = pclose (p);
  *corruptions = json_number (out, "corruptions");
  *leaks = json_number (out, "leaks");
  snprintf (msg, msglen, "%s", out);
  return WIFEXITED (st) ? WEXITSTATUS (st) : -1;
}

static void
one_point (enum fault_target target, enum fault_mode mode, uint64_t k,
           bool qemu, struct tally *t)
{
  struct fault_plan plan = { target, mode, k, 0, 0, false };
  struct fault_outcome o;
  char label[64], msg[4096];
  bool bad = false;
  int fd, r;

  snprintf (label, sizeof label, "%s %s k=%" PRIu64,
            fault_target_name (target), fault_mode_name (mode), k);
  r = fault_run (&workload, &plan, &o, &fd);
  CHECK (r == 0, "%s: the test could not run: %s", label, strerror (-r));
  if (r < 0)
    return;
  t->points++;
  t->fired += o.fired;
  CHECK (o.fired, "%s: the fault was never injected", label);
  if (mode == FAULT_ONE_SHOT) {
    t->refused += o.refused_after;
    t->carried_on += !o.refused_after;
  }
  t->unverified += o.unverified;

  if (o.reopen < 0) {
    t->unopenable++;
    bad = true;
    CHECK (o.reopen == 0, "%s: the image does not reopen: %s", label,
           strerror (-o.reopen));
  }
  else {
    if (o.check < 0 || o.result.corruptions || o.result.check_errors) {
      t->corrupt++;
      bad = true;
    }
    else if (o.result.leaks)
      t->leaky++;
    else
      t->clean++;
    CHECK (o.check == 0 && o.result.corruptions == 0 &&
           o.result.check_errors == 0,
           "%s: qcow2_check: %d, %" PRIu64 " corruptions, %" PRIu64
           " leaks, %" PRIu64 " check errors", label, o.check,
           o.result.corruptions, o.result.leaks, o.result.check_errors);
  }
  if (o.lost) {
    t->lost_points++;
    t->lost_sectors += o.lost;
    bad = true;
  }
  CHECK (o.lost == 0, "%s: %" PRIu64 " model violations, first: %s",
         label, o.lost, o.first_lost);

  if (qemu) {
    uint64_t corruptions, leaks;
    int st = qemu_check (fd, &corruptions, &leaks, msg, sizeof msg);
    t->qemu_checked++;
    /* An image that does not open is counted above already. */
    if (o.reopen == 0 && (st != 0 && st != 3)) {
      t->qemu_corrupt++;
      bad = true;
    }
    CHECK (o.reopen < 0 || st == 0 || st == 3,
           "%s: qemu-img check exit %d, %" PRIu64 " corruptions, %" PRIu64
           " leaks: %s", label, st, corruptions, leaks, msg);
  }
  t->failed_points += bad;
  close (fd);
}

static void
series (enum fault_target target, enum fault_mode mode, uint64_t n,
        unsigned every, struct tally *t)
{
  for (uint64_t k = 1; k <= n; k++)
    one_point (target, mode, k,
               have_qemu && (k == 1 || k == n || k % every == 0), t);
}

static uint32_t
header_be32 (int fd, off_t offset)
{
  unsigned char b[4] = { 0 };

  if (pread (fd, b, 4, offset) != 4)
    return 0;
  return (uint32_t) b[0] << 24 | (uint32_t) b[1] << 16 |
         (uint32_t) b[2] << 8 | b[3];
}

int
main (int argc, char **argv)
{
  unsigned every = argc > 1 ? (unsigned) atoi (argv[1]) : 1;
  struct fault_plan plan = { FAULT_WRITE, FAULT_ONE_SHOT, 0, 0, 0, false };
  struct fault_outcome o;
  struct tally t = { 0 };
  struct timespec t0, t1;
  uint64_t writes, flushes;
  int fd, r;

  if (every == 0)
    every = 1;
  qcow2_set_error_handler (capture_error, NULL);
  have_qemu = system ("qemu-img --version >/dev/null 2>&1") == 0;
  if (!have_qemu)
    printf ("SKIP qemu-img checks: qemu-img not found "
            "(qcow2_check still runs on every point)\n");
  clock_gettime (CLOCK_MONOTONIC, &t0);

  /* Without a fault: the workload does what the comment above says,
   * reads back exactly, checks clean; and it counts the points.
   */
  r = fault_run (&workload, &plan, &o, &fd);
  if (r < 0) {
    fprintf (stderr, "FAIL: the fault-free run could not run: %s (%s)\n",
             strerror (-r), last_error);
    return 1;
  }
  writes = plan.writes;
  flushes = plan.flushes;
  CHECK (o.failed_ops == 0, "fault-free run: %u operations failed",
         o.failed_ops);
  CHECK (o.reopen == 0 && o.check == 0 && o.result.corruptions == 0 &&
         o.result.leaks == 0, "fault-free run: reopen %d, check %d, %"
         PRIu64 " corruptions, %" PRIu64 " leaks", o.reopen, o.check,
         o.result.corruptions, o.result.leaks);
  CHECK (o.lost == 0 && o.unverified == 0,
         "fault-free run: %" PRIu64 " violations (%s), %" PRIu64
         " sectors unverified", o.lost, o.first_lost, o.unverified);
  /* Header: l1_size at 36, refcount_table_clusters at 56. */
  CHECK (header_be32 (fd, 36) == 512, "L1 did not grow to 512 entries: %"
         PRIu32, header_be32 (fd, 36));
  CHECK (header_be32 (fd, 56) > 1, "the refcount table did not grow: %"
         PRIu32 " cluster(s)", header_be32 (fd, 56));
  if (have_qemu) {
    uint64_t corruptions, leaks;
    char msg[4096];
    int st = qemu_check (fd, &corruptions, &leaks, msg, sizeof msg);
    CHECK (st == 0, "fault-free run: qemu-img check exit %d: %s", st, msg);
  }
  close (fd);
  printf ("workload: %zu operations, %" PRIu64 " writes, %" PRIu64
          " flushes; qemu-img checks every %u-th point\n",
          workload.nr_ops, writes, flushes, every);
  fflush (stdout);

  series (FAULT_WRITE, FAULT_ONE_SHOT, writes, every, &t);
  series (FAULT_WRITE, FAULT_STICKY, writes, every, &t);
  series (FAULT_WRITE, FAULT_TORN, writes, every, &t);
  series (FAULT_FLUSH, FAULT_ONE_SHOT, flushes, every, &t);
  series (FAULT_FLUSH, FAULT_STICKY, flushes, every, &t);

  clock_gettime (CLOCK_MONOTONIC, &t1);
  printf ("fault points tried: %" PRIu64 " (faults injected: %" PRIu64 ")\n"
          "  one-shot faults: engine refused later writes (broken) %" PRIu64
          ", carried on %" PRIu64 "\n"
          "  reopened image, qcow2_check: clean %" PRIu64 ", leaks only %"
          PRIu64 ", corrupt %" PRIu64 ", does not open %" PRIu64 "\n"
          "  qemu-img check: %" PRIu64 " points checked, %" PRIu64
          " with corruptions or errors\n"
          "  points losing flushed data: %" PRIu64 " (%" PRIu64
          " violations); sectors not verifiable: %" PRIu64 "\n"
          "  failing points: %" PRIu64 "\n"
          "time: %.1f s\n",
          t.points, t.fired, t.refused, t.carried_on, t.clean, t.leaky,
          t.corrupt, t.unopenable, t.qemu_checked, t.qemu_corrupt,
          t.lost_points, t.lost_sectors, t.unverified, t.failed_points,
          (double) (t1.tv_sec - t0.tv_sec) +
          (double) (t1.tv_nsec - t0.tv_nsec) / 1e9);
  return failures != 0;
}
