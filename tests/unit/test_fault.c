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
 * qcow2_check runs on every point.  qemu-img check (about 30 ms a run)
 * runs on every N-th point of each series, its first and last, and on
 * every point that fails otherwise, to classify the failure; N is the
 * first argument, 1 (every point) by default; meson passes 8.
 *
 * The tallies are printed at the end, after the failing points grouped
 * by fault, operation and qemu-img's verdict; each failing point is also
 * printed as it fails.  FAULT_TRACE=1 (workload.h) traces the operations.
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
 * to 4 and 8 MiB grows L1 twice, and writing 2 MiB of data grows the
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
  { WOP_RESIZE, 0, 8 * M, 0 },          /* L1: 2 -> 4 clusters */
  { WOP_WRITE, 8 * M - 64 * K, 64 * K, 0 },
  { WOP_WRITE, 6 * M, 4 * K, 0 },
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

/* What qemu-img check says about one image, worst first.  Its messages
 * tell corruptions apart:
 * - a COPIED flag clear on a cluster whose refcount is 1 costs one extra
 *   copy and nothing else (snapshots.c documents the window, which
 *   QEMU has too);
 * - COPIED set on a cluster whose refcount is above 1 while qemu-img
 *   finds one reference only (it reports the cluster leaked): the flag
 *   is true, the refcount is a leak;
 * - a refcount below the references, or COPIED set on a cluster that
 *   more than one table reaches, puts data at risk.
 */
enum verdict {
  V_CLEAN, V_LEAKS, V_COPIED_CLEAR, V_COPIED_LEAKED, V_OTHER,
  V_COPIED_SHARED, V_REFCOUNT_LOW, V_UNCHECKABLE, NR_VERDICTS
};
static const char *const verdict_names[NR_VERDICTS] = {
  "clean", "leaks only", "COPIED clear on refcount 1",
  "COPIED set on a leaked cluster (one reference)", "other corruption",
  "COPIED set on a shared cluster", "refcount below references",
  "qemu-img cannot check it",
};

/* Clusters qemu-img reported leaked with exactly one reference. */
#define MAX_TRACKED_CLUSTERS (1u << 20)
static unsigned char leaked_once[MAX_TRACKED_CLUSTERS / 8];

static void
note_leak (const char *line)
{
  uint64_t cluster, refcount, reference;

  if (sscanf (line, "Leaked cluster %" SCNu64 " refcount=%" SCNu64
              " reference=%" SCNu64, &cluster, &refcount, &reference) == 3 &&
      reference == 1 && cluster < MAX_TRACKED_CLUSTERS)
    leaked_once[cluster / 8] |= (unsigned char) (1u << (cluster % 8));
}

struct qemu_answer {
  int status;                   /* exit status: 0, 3 leaks, 2, 1 */
  uint64_t corruptions, leaks;  /* from the JSON */
  enum verdict verdict;
  char first_error[256];
};

struct tally {
  uint64_t points, fired;
  uint64_t refused, carried_on;         /* one-shot faults only */
  uint64_t clean, leaky, corrupt, unopenable;  /* qcow2_check */
  uint64_t qemu_checked, qemu[NR_VERDICTS];
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

/* One line of qemu-img check's output (leaks are printed before the
 * COPIED checks, so note_leak has seen them).
 */
static enum verdict
classify_line (const char *line)
{
  uint64_t refcount, reference;
  const char *p, *e;

  if (strncmp (line, "ERROR", 5) != 0)
    return V_CLEAN;
  if (strstr (line, "OFLAG_COPIED") && (p = strstr (line, "refcount="))) {
    uint64_t entry, cluster;
    if (strtoull (p + 9, NULL, 10) == 1)
      return V_COPIED_CLEAR;
    e = strstr (line, "_entry=");
    if (!e)
      return V_COPIED_SHARED;
    entry = strtoull (e + 7, NULL, 16);
    cluster = (entry & UINT64_C (0x00fffffffffffe00)) / workload.cluster_size;
    return cluster < MAX_TRACKED_CLUSTERS &&
           leaked_once[cluster / 8] & (1u << (cluster % 8))
           ? V_COPIED_LEAKED : V_COPIED_SHARED;
  }
  if (sscanf (line, "ERROR cluster %*u refcount=%" SCNu64 " reference=%"
              SCNu64, &refcount, &reference) == 2 && refcount < reference)
    return V_REFCOUNT_LOW;
  return V_OTHER;
}

/* qemu-img check --output=json of the image in fd. */
static void
qemu_check (int fd, struct qemu_answer *a)
{
  char cmd[128], line[512], json[4096] = "";
  bool in_json = false;
  FILE *p;
  int st;

  memset (a, 0, sizeof *a);
  memset (leaked_once, 0, sizeof leaked_once);
  snprintf (cmd, sizeof cmd,
            "qemu-img check --output=json /proc/%d/fd/%d 2>&1",
            (int) getpid (), fd);
  p = popen (cmd, "r");
  if (!p) {
    a->status = -1;
    a->verdict = V_UNCHECKABLE;
    return;
  }
  while (fgets (line, sizeof line, p)) {
    enum verdict v;
    note_leak (line);
    v = classify_line (line);
    if (v > a->verdict)
      a->verdict = v;
    if (v != V_CLEAN && !a->first_error[0])
      snprintf (a->first_error, sizeof a->first_error, "%.*s",
                (int) strcspn (line, "\n"), line);
    in_json |= line[0] == '{';
    if (in_json && strlen (json) + strlen (line) < sizeof json)
      strcat (json, line);
  }
  st = pclose (p);
  a->status = WIFEXITED (st) ? WEXITSTATUS (st) : -1;
  a->corruptions = json_number (json, "corruptions");
  a->leaks = json_number (json, "leaks");
  if (a->status == 3 && a->verdict == V_CLEAN)
    a->verdict = V_LEAKS;
  if (a->status != 0 && a->status != 2 && a->status != 3)
    a->verdict = V_UNCHECKABLE;
  else if (a->status == 2 && a->verdict < V_COPIED_CLEAR)
    a->verdict = V_OTHER;
}

/* Consecutive failing points with the same fault, operation and
 * verdict, printed as one line at the end.
 */
struct group {
  enum fault_target target;
  enum fault_mode mode;
  long op;
  enum verdict verdict;
  bool lost;
  uint64_t first_k, last_k, count;
  char example[320];
};
static struct group groups[256];
static size_t nr_groups;

static void
add_to_group (enum fault_target target, enum fault_mode mode, long op,
              enum verdict verdict, bool lost, uint64_t k,
              const char *example)
{
  struct group *g = nr_groups ? &groups[nr_groups - 1] : NULL;

  if (g && g->target == target && g->mode == mode && g->op == op &&
      g->verdict == verdict && g->lost == lost) {
    g->last_k = k;
    g->count++;
    return;
  }
  if (nr_groups == sizeof groups / sizeof groups[0])
    return;                     /* each failure was printed anyway */
  g = &groups[nr_groups++];
  *g = (struct group) { target, mode, op, verdict, lost, k, k, 1, "" };
  snprintf (g->example, sizeof g->example, "%s", example);
}

static const char *
op_name (long op)
{
  return op < 0 ? "open" : (size_t) op >= workload.nr_ops ? "close"
         : wop_name (workload.ops[op].kind);
}

static void
one_point (enum fault_target target, enum fault_mode mode, uint64_t k,
           bool spread, struct tally *t)
{
  struct fault_plan plan = { .target = target, .mode = mode, .k = k };
  struct fault_outcome o;
  struct qemu_answer qa = { .verdict = V_CLEAN };
  char problem[320] = "";
  bool engine_corrupt;
  int fd, r;

  r = fault_run (&workload, &plan, &o, &fd);
  CHECK (r == 0, "%s %s k=%" PRIu64 ": the test could not run: %s",
         fault_target_name (target), fault_mode_name (mode), k,
         strerror (-r));
  if (r < 0)
    return;
  t->points++;
  t->fired += o.fired;
  if (mode == FAULT_ONE_SHOT) {
    t->refused += o.refused_after;
    t->carried_on += !o.refused_after;
  }
  t->unverified += o.unverified;

  engine_corrupt = o.reopen == 0 &&
    (o.check < 0 || o.result.corruptions || o.result.check_errors);
  if (o.reopen < 0) {
    t->unopenable++;
    snprintf (problem, sizeof problem, "the image does not reopen: %s",
              strerror (-o.reopen));
  }
  else if (engine_corrupt) {
    t->corrupt++;
    snprintf (problem, sizeof problem, "qcow2_check: %d, %" PRIu64
              " corruptions, %" PRIu64 " leaks, %" PRIu64 " check errors",
              o.check, o.result.corruptions, o.result.leaks,
              o.result.check_errors);
  }
  else if (o.result.leaks)
    t->leaky++;
  else
    t->clean++;
  if (o.lost) {
    t->lost_points++;
    t->lost_sectors += o.lost;
    snprintf (problem + strlen (problem), sizeof problem - strlen (problem),
              "%s%" PRIu64 " model violations, first: %s",
              *problem ? "; " : "", o.lost, o.first_lost);
  }

  /* qemu-img on the spread subset and on every point already failing,
   * to say what kind of failure it is.
   */
  if (have_qemu && (spread || *problem)) {
    qemu_check (fd, &qa);
    t->qemu_checked++;
    t->qemu[qa.verdict]++;
    if (qa.verdict > V_LEAKS && o.reopen == 0)
      snprintf (problem + strlen (problem),
                sizeof problem - strlen (problem),
                "%sqemu-img check: exit %d, %" PRIu64 " corruptions, %"
                PRIu64 " leaks (%s; first: %s)", *problem ? "; " : "",
                qa.status, qa.corruptions, qa.leaks,
                verdict_names[qa.verdict], qa.first_error);
  }
  close (fd);

  CHECK (o.fired, "%s %s k=%" PRIu64 ": the fault was never injected",
         fault_target_name (target), fault_mode_name (mode), k);
  if (*problem) {
    t->failed_points++;
    CHECK (!*problem, "%s %s k=%" PRIu64 " (in op %ld, %s): %s",
           fault_target_name (target), fault_mode_name (mode), k,
           o.fired_in, op_name (o.fired_in), problem);
    add_to_group (target, mode, o.fired_in,
                  o.reopen < 0 ? V_UNCHECKABLE : qa.verdict, o.lost > 0, k,
                  problem);
  }
}

static void
series (enum fault_target target, enum fault_mode mode, uint64_t n,
        unsigned every, struct tally *t)
{
  for (uint64_t k = 1; k <= n; k++)
    one_point (target, mode, k, k == 1 || k == n || k % every == 0, t);
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
  struct fault_plan plan = { .target = FAULT_WRITE, .mode = FAULT_ONE_SHOT };
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
  /* (The trimmed sectors stay undefined.) */
  CHECK (o.lost == 0, "fault-free run: %" PRIu64 " violations (%s)",
         o.lost, o.first_lost);
  /* Header: l1_size at 36, refcount_table_clusters at 56. */
  CHECK (header_be32 (fd, 36) == 256, "L1 did not grow to 256 entries: %"
         PRIu32, header_be32 (fd, 36));
  CHECK (header_be32 (fd, 56) > 1, "the refcount table did not grow: %"
         PRIu32 " cluster(s)", header_be32 (fd, 56));
  if (have_qemu) {
    struct qemu_answer qa;
    qemu_check (fd, &qa);
    CHECK (qa.status == 0, "fault-free run: qemu-img check exit %d: %s",
           qa.status, qa.first_error);
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
  if (nr_groups)
    printf ("failing points, grouped (fault, k range, operation the fault "
            "hit, qemu-img's verdict):\n");
  for (size_t i = 0; i < nr_groups; i++) {
    const struct group *g = &groups[i];
    printf ("  %s %s k=%" PRIu64 "..%" PRIu64 " (%" PRIu64 " points) in op "
            "%ld (%s): %s%s\n    e.g. %s\n",
            fault_target_name (g->target), fault_mode_name (g->mode),
            g->first_k, g->last_k, g->count, g->op, op_name (g->op),
            verdict_names[g->verdict], g->lost ? ", flushed data lost" : "",
            g->example);
  }
  printf ("fault points tried: %" PRIu64 " (faults injected: %" PRIu64 ")\n"
          "  one-shot faults: engine refused later writes (broken) %" PRIu64
          ", carried on %" PRIu64 "\n"
          "  reopened image, qcow2_check: clean %" PRIu64 ", leaks only %"
          PRIu64 ", corrupt %" PRIu64 ", does not open %" PRIu64 "\n"
          "  qemu-img check: %" PRIu64 " points checked (every %u-th, and "
          "every point failing otherwise):\n",
          t.points, t.fired, t.refused, t.carried_on, t.clean, t.leaky,
          t.corrupt, t.unopenable, t.qemu_checked, every);
  for (int v = 0; v < NR_VERDICTS; v++)
    printf ("    %s: %" PRIu64 "\n", verdict_names[v], t.qemu[v]);
  printf ("  points losing flushed data: %" PRIu64 " (%" PRIu64
          " violations); sectors with no defined content (trimmed, or past "
          "what the model follows): %" PRIu64 "\n"
          "  failing points: %" PRIu64 "\n"
          "time: %.1f s\n",
          t.lost_points, t.lost_sectors, t.unverified, t.failed_points,
          (double) (t1.tv_sec - t0.tv_sec) +
          (double) (t1.tv_nsec - t0.tv_nsec) / 1e9);
  return failures != 0;
}
