/* nbdkit-qcow2
 * Copyright (C) 2026 the nbdkit-qcow2 authors
 * SPDX-License-Identifier: BSD-3-Clause (see LICENSE)
 */

/* The failing backend of fault_io.h.  Counters are atomic because the
 * io contract (io.h) allows calls from many threads at once.
 */
#include <errno.h>
#include <stdlib.h>

#include "fault_io.h"

#define SECTOR 512

struct fault_io {
  struct qcow2_io io;
  struct qcow2_io *inner;
  struct fault_plan *p;
};

static struct fault_io *
to_fault (struct qcow2_io *io)
{
  return (struct fault_io *) io;
}

/* Sticky and torn faults keep failing once fired. */
static bool
dead (struct fault_io *f)
{
  return f->p->mode != FAULT_ONE_SHOT &&
         __atomic_load_n (&f->p->fired, __ATOMIC_SEQ_CST);
}

/* Count one call of the target kind; true if this one is the k-th. */
static bool
hit (struct fault_io *f, uint64_t *counter, enum fault_target target)
{
  uint64_t n = __atomic_add_fetch (counter, 1, __ATOMIC_SEQ_CST);

  if (f->p->target != target || f->p->k == 0 || n != f->p->k)
    return false;
  __atomic_store_n (&f->p->fired, true, __ATOMIC_SEQ_CST);
  return true;
}

static int
fault_pread (struct qcow2_io *io, void *buf, size_t len, uint64_t offset)
{
  return qcow2_io_pread (to_fault (io)->inner, buf, len, offset);
}

static int
fault_pwrite (struct qcow2_io *io, const void *buf, size_t len,
              uint64_t offset)
{
  struct fault_io *f = to_fault (io);

  if (dead (f)) {
    __atomic_add_fetch (&f->p->writes, 1, __ATOMIC_SEQ_CST);
    return -EIO;
  }
  if (hit (f, &f->p->writes, FAULT_WRITE)) {
    if (f->p->mode == FAULT_TORN) {
      /* Whole sectors of the first half, counted from the offset. */
      uint64_t end = (offset + len / 2) & ~(uint64_t) (SECTOR - 1);
      if (end > offset)
        qcow2_io_pwrite (f->inner, buf, (size_t) (end - offset), offset);
    }
    return -EIO;
  }
  return qcow2_io_pwrite (f->inner, buf, len, offset);
}

static int
fault_flush (struct qcow2_io *io)
{
  struct fault_io *f = to_fault (io);

  if (dead (f)) {
    __atomic_add_fetch (&f->p->flushes, 1, __ATOMIC_SEQ_CST);
    return -EIO;
  }
  if (hit (f, &f->p->flushes, FAULT_FLUSH))
    return -EIO;
  return qcow2_io_flush (f->inner);
}

static int
fault_get_size (struct qcow2_io *io, uint64_t *size)
{
  return qcow2_io_get_size (to_fault (io)->inner, size);
}

static int
fault_punch_hole (struct qcow2_io *io, uint64_t offset, uint64_t len)
{
  struct fault_io *f = to_fault (io);

  if (dead (f))
    return -EIO;
  if (!f->inner->ops->punch_hole)
    return -ENOTSUP;
  return f->inner->ops->punch_hole (f->inner, offset, len);
}

static int
fault_preallocate (struct qcow2_io *io, uint64_t offset, uint64_t len)
{
  struct fault_io *f = to_fault (io);

  return dead (f) ? -EIO : qcow2_io_preallocate (f->inner, offset, len);
}

static int
fault_discard (struct qcow2_io *io, uint64_t offset, uint64_t len)
{
  struct fault_io *f = to_fault (io);

  return dead (f) ? -EIO : qcow2_io_discard (f->inner, offset, len);
}

static bool
fault_is_writable (struct qcow2_io *io)
{
  return qcow2_io_is_writable (to_fault (io)->inner);
}

static int
fault_fd (struct qcow2_io *io)
{
  struct qcow2_io *inner = to_fault (io)->inner;
  return inner->ops->fd ? inner->ops->fd (inner) : -1;
}

static void
fault_close (struct qcow2_io *io)
{
  struct fault_io *f = to_fault (io);

  if (!f->p->borrow_inner)
    qcow2_io_close (f->inner);
  free (f);
}

#define FAULT_OPS(fixed)                        \
  {                                             \
    .pread = fault_pread,                       \
    .pwrite = fault_pwrite,                     \
    .flush = fault_flush,                       \
    .get_size = fault_get_size,                 \
    .punch_hole = fault_punch_hole,             \
    .preallocate = fault_preallocate,           \
    .discard = fault_discard,                   \
    .is_writable = fault_is_writable,           \
    .fd = fault_fd,                             \
    .close = fault_close,                       \
    .fixed_size = fixed,                        \
  }

static const struct qcow2_io_ops growable_ops = FAULT_OPS (false);
static const struct qcow2_io_ops fixed_ops = FAULT_OPS (true);

struct qcow2_io *
fault_io_new (struct qcow2_io *inner, struct fault_plan *plan)
{
  struct fault_io *f = calloc (1, sizeof *f);

  if (!f) {
    qcow2_io_close (inner);
    return NULL;
  }
  f->io.ops = qcow2_io_is_fixed_size (inner) ? &fixed_ops : &growable_ops;
  f->inner = inner;
  f->p = plan;
  return &f->io;
}

const char *
fault_target_name (enum fault_target t)
{
  return t == FAULT_WRITE ? "write" : "flush";
}

const char *
fault_mode_name (enum fault_mode m)
{
  return m == FAULT_ONE_SHOT ? "one-shot" : m == FAULT_STICKY ? "sticky"
         : "torn";
}
