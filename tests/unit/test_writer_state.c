/* nbdkit-qcow2
 * Copyright (C) 2026 the nbdkit-qcow2 authors
 * SPDX-License-Identifier: BSD-3-Clause (see LICENSE)
 */

/* Unit test of the writer state (core/writer.c): an image in a memory
 * container, behind an io whose k-th pwrite or flush fails.
 *
 * - read-only -> writable: writes fail with EROFS until writing is
 *   enabled, then work;
 * - a failed metadata sync makes the image broken: the flush that hit it
 *   fails, then every write, zero, trim and flush fails with EIO without
 *   touching the container (nothing more is written, not even at close),
 *   reads keep working, and writing cannot be enabled again;
 * - reopening works: what was flushed before the failure reads back,
 *   qemu-img-style check finds no corruption (leaks allowed), and the
 *   image is writable again;
 * - for every k, failing the k-th pwrite, or the k-th flush, of an
 *   allocating workload: the image is either still writable (a guest data
 *   write failed: the request failed, no metadata changed) or broken, and
 *   is sound after reopening (D's fault-injection tests sweep far more).
 *
 * Exit status 0 = pass, 1 = failure (each failure is printed).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fault_io.h"
#include "io.h"
#include "qcow2.h"
#include "testing.h"

#define CONTAINER (64u << 20)
#define DISK (32u << 20)

/* The failing io is tests/fault/fault_io.c's, one-shot, over a memory
 * container the test keeps (borrow_inner), so the same bytes can be
 * opened again.
 */

/* Count from now; fail the k-th call of target (k == 0: none). */
static void
arm (struct fault_plan *plan, enum fault_target target, uint64_t k)
{
  plan->target = target;
  plan->mode = FAULT_ONE_SHOT;
  plan->k = k;
  plan->writes = plan->flushes = 0;
  plan->fired = false;
}

/* ------------------------------------------------------------------ */

/* Open the image in container through a failing io that plan (which
 * must outlive the image) controls; nothing fails until it is armed.
 */
static struct qcow2_image *
open_image (struct qcow2_io *container, bool writable,
            struct fault_plan *plan)
{
  struct qcow2_open_options opts;
  struct qcow2_image *img = NULL;
  struct qcow2_io *io;
  int r;

  *plan = (struct fault_plan) { .borrow_inner = true };
  io = fault_io_new (container, plan);
  if (!io)
    abort ();
  qcow2_open_options_init (&opts);
  opts.filename = "container";
  opts.follow_backing = false;
  opts.writable = writable;
  r = qcow2_open_io (io, &opts, &img);
  CHECK (r == 0, "open: %s", strerror (-r));
  return img;
}

static struct qcow2_io *
new_container (uint32_t cluster_size)
{
  struct qcow2_create_options co;
  struct qcow2_io *container = qcow2_io_mem_container_new (CONTAINER);
  struct fault_plan plan = { .borrow_inner = true };   /* fails nothing */
  struct qcow2_io *io;
  int r;

  if (!container || !(io = fault_io_new (container, &plan)))
    abort ();
  qcow2_create_options_init (&co);
  co.filename = "container";
  co.size = DISK;
  co.cluster_size = cluster_size;
  r = qcow2_create_io (&co, io);
  CHECK (r == 0, "create: %s", strerror (-r));
  return container;
}

static void
fill (unsigned char *buf, size_t len, unsigned seed)
{
  for (size_t i = 0; i < len; i++)
    buf[i] = (unsigned char) (seed * 131 + i * 7 + (i >> 9));
}

static bool
reads_back (struct qcow2_image *img, uint64_t offset, size_t len,
            unsigned seed)
{
  unsigned char *want = malloc (len), *got = malloc (len);
  bool same;

  fill (want, len, seed);
  same = qcow2_read (img, got, len, offset) == 0 &&
         memcmp (want, got, len) == 0;
  free (want);
  free (got);
  return same;
}

static int
write_seed (struct qcow2_image *img, uint64_t offset, size_t len,
            unsigned seed)
{
  unsigned char *buf = malloc (len);
  int r;

  fill (buf, len, seed);
  r = qcow2_write (img, buf, len, offset, false);
  free (buf);
  return r;
}

/* Reopen: flushed data reads back, no corruption, writable again. */
static void
check_reopened (struct qcow2_io *container, uint64_t flushed_offset,
                size_t flushed_len, unsigned seed, const char *what)
{
  struct qcow2_check_result res;
  struct fault_plan plan;
  struct qcow2_image *img = open_image (container, false, &plan);
  int r;

  if (!img)
    return;
  CHECK (reads_back (img, flushed_offset, flushed_len, seed),
         "%s: flushed data reads back after reopening", what);
  r = qcow2_check (img, false, &res);
  CHECK (r == 0 && res.corruptions == 0 && res.check_errors == 0,
         "%s: check after reopening: r=%d, %" PRIu64 " corruptions, %"
         PRIu64 " errors", what, r, res.corruptions, res.check_errors);
  r = qcow2_enable_write (img);
  CHECK (r == 0, "%s: writable again after reopening", what);
  CHECK (write_seed (img, 8 << 20, 65536, 77) == 0 && qcow2_flush (img) == 0,
         "%s: write and flush after reopening", what);
  CHECK (reads_back (img, 8 << 20, 65536, 77), "%s: new write reads back",
         what);
  qcow2_close (img);
}

/* Read-only -> enabling -> writable. */
static void
test_enable (void)
{
  struct qcow2_io *container = new_container (65536);
  struct fault_plan plan;
  struct qcow2_image *img = open_image (container, false, &plan);

  if (img) {
    CHECK (!qcow2_is_writable (img) && qcow2_may_write (img),
           "opened read-only, may be made writable");
    CHECK (write_seed (img, 0, 4096, 1) == -EROFS,
           "a write before enabling fails with EROFS");
    CHECK (qcow2_flush (img) == 0, "nothing to flush while read-only");
    CHECK (qcow2_enable_write (img) == 0 && qcow2_is_writable (img),
           "enabled");
    CHECK (qcow2_enable_write (img) == 0, "enabling twice is harmless");
    CHECK (write_seed (img, 0, 4096, 1) == 0 && qcow2_flush (img) == 0,
           "write after enabling");
    qcow2_close (img);
  }
  check_reopened (container, 0, 4096, 1, "enable");
  qcow2_io_close (container);
}

/* A failed sync breaks the image. */
static void
test_broken_by_flush (void)
{
  const uint64_t A = 0, B = 4 << 20;
  struct qcow2_io *container = new_container (65536);
  struct fault_plan plan;
  struct qcow2_image *img = open_image (container, true, &plan);
  unsigned char buf[4096];
  uint64_t pwrites;
  int r;

  if (!img)
    goto out;
  CHECK (write_seed (img, A, 1 << 20, 2) == 0 && qcow2_flush (img) == 0,
         "write and flush before the failure");

  /* An allocating write, then a flush whose first fdatasync fails. */
  CHECK (write_seed (img, B, 1 << 20, 3) == 0, "allocating write");
  arm (&plan, FAULT_FLUSH, 1);
  r = qcow2_flush (img);
  CHECK (r == -EIO && plan.fired, "the flush fails: %d", r);
  CHECK (!qcow2_is_writable (img) && !qcow2_may_write (img),
         "broken: not writable");

  /* Nothing more reaches the container. */
  pwrites = plan.writes;
  CHECK (write_seed (img, A, 4096, 4) == -EIO, "in-place write fails");
  CHECK (write_seed (img, 12 << 20, 4096, 4) == -EIO,
         "allocating write fails");
  CHECK (strstr (last_error, "writing is disabled") &&
         strstr (last_error, "writing back metadata failed"),
         "the refusal says why");
  CHECK (qcow2_zero (img, 65536, A, true, false, false) == -EIO,
         "zero fails");
  CHECK (qcow2_trim (img, 65536, A, false) == -EIO, "trim fails");
  CHECK (qcow2_flush (img) == -EIO, "flush fails");
  CHECK (qcow2_enable_write (img) == -EIO, "writing cannot be re-enabled");
  CHECK (qcow2_resize (img, DISK * 2) == -EIO, "resize fails");
  CHECK (qcow2_snapshot_create (img, "s") == -EIO, "snapshot fails");

  /* Reads work: flushed data, and what the failed flush covered. */
  CHECK (reads_back (img, A, 1 << 20, 2), "flushed data reads");
  CHECK (reads_back (img, B, 1 << 20, 3), "unflushed data reads");
  CHECK (qcow2_read (img, buf, sizeof buf, 20 << 20) == 0,
         "unallocated reads");
  qcow2_close (img);
  CHECK (plan.writes == pwrites, "nothing written after breaking (%"
         PRIu64 " pwrites)", plan.writes - pwrites);
  check_reopened (container, A, 1 << 20, 2, "flush");
 out:
  qcow2_io_close (container);
}

/* Every pwrite (or every flush) of an allocating workload fails in turn.
 * Small clusters, so the workload allocates an L2 table, and a run of
 * clusters as long as a refcount block covers (allocated past the end,
 * behind new refcount blocks).
 */
static void
test_sweep (bool flushes)
{
  const char *kind = flushes ? "flush" : "pwrite";
  unsigned broken = 0, data_only = 0, k;

  for (k = 1;; k++) {
    struct qcow2_io *container = new_container (4096);
    struct fault_plan plan;
    struct qcow2_image *img = open_image (container, true, &plan);
    char what[32];
    int r;

    snprintf (what, sizeof what, "%s %u", kind, k);
    if (!img) {
      qcow2_io_close (container);
      break;
    }
    CHECK (write_seed (img, 0, 65536, 5) == 0 && qcow2_flush (img) == 0,
           "%s: first write", what);
    arm (&plan, flushes ? FAULT_FLUSH : FAULT_WRITE, k);
    r = write_seed (img, 1 << 20, 65536, 6);
    if (r == 0)
      r = qcow2_flush (img);
    if (r == 0)
      r = write_seed (img, 24 << 20, 65536, 7);   /* a new L2 table */
    if (r == 0)
      r = write_seed (img, 12 << 20, 8 << 20, 9); /* refcount blocks */
    if (r == 0)
      r = qcow2_flush (img);
    if (!plan.fired) {
      /* k is past the workload's pwrites: done. */
      CHECK (r == 0, "%s: no failure injected, yet %d", what, r);
      qcow2_close (img);
      qcow2_io_close (container);
      break;
    }
    CHECK (r == -EIO, "%s: the failure is reported: %d", what, r);
    if (qcow2_is_writable (img)) {
      /* A guest data write failed: that request failed, nothing else. */
      data_only++;
      CHECK (write_seed (img, 2 << 20, 4096, 8) == 0 &&
             qcow2_flush (img) == 0, "%s: still writable", what);
    }
    else {
      broken++;
      CHECK (write_seed (img, 2 << 20, 4096, 8) == -EIO,
             "%s: broken: writes fail", what);
    }
    CHECK (reads_back (img, 0, 65536, 5), "%s: flushed data reads", what);
    qcow2_close (img);
    check_reopened (container, 0, 65536, 5, what);
    qcow2_io_close (container);
  }
  printf ("%s sweep: %u points, %u broke the image, %u failed only "
          "a data write\n", kind, k - 1, broken, data_only);
  /* A failed data pwrite fails only its request; every failed flush
   * leaves the disk unknown.
   */
  CHECK (broken > 0 && (flushes ? data_only == 0 : data_only > 0),
         "%s sweep: the failures that must break the image did", kind);
}

int
main (void)
{
  qcow2_set_error_handler (capture_error, NULL);
  test_enable ();
  test_broken_by_flush ();
  test_sweep (false);
  test_sweep (true);
  if (failures)
    fprintf (stderr, "%d failures\n", failures);
  return failures != 0;
}
