/* nbdkit-qcow2
 * Copyright (C) 2026 the nbdkit-qcow2 authors
 * SPDX-License-Identifier: BSD-3-Clause (see LICENSE)
 */

/* The workload runner and its model (workload.h).
 *
 * Each 512-byte sector of the disk (and of each snapshot) has a cell: the
 * values it may read after a crash.  `allowed` holds what was durable at
 * the last successful flush, `log` what happened since (each entry a
 * value and whether the operation was acknowledged).  A successful flush
 * collapses the log: from the last acknowledged entry on, nothing else
 * is possible.  Written sectors carry the value of the operation that
 * wrote them (its index + 1) in every 8-byte word, with the sector's
 * number, so a sector from the wrong place or the wrong write shows.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "workload.h"

#define SECTOR 512u
#define MAXV 6                  /* values a cell keeps track of */
#define VANY 0x7fffffffu        /* unknown: anything may read back */
#define VBAD 0x7ffffffeu        /* a sector that is no value at all */
#define ACKED 0x80000000u

struct cell {
  uint32_t allowed[MAXV];
  uint32_t log[MAXV];           /* value | ACKED */
  uint8_t nallowed, nlog;
};

struct model {
  size_t nr_sectors;
  struct cell *sectors;
  struct cell size;             /* in sectors */
};

struct state {
  const struct workload *wl;
  struct qcow2_image *img;
  struct model active;
  struct model snap[WORKLOAD_SLOTS];
  struct cell exists[WORKLOAD_SLOTS];  /* 0 or 1 */
  unsigned char *buf;
  struct fault_outcome *out;
};

static void
cell_init (struct cell *c, uint32_t v)
{
  c->allowed[0] = v;
  c->nallowed = 1;
  c->nlog = 0;
}

static bool
cell_has (const struct cell *c, uint32_t v)
{
  for (unsigned i = 0; i < c->nallowed; i++)
    if (c->allowed[i] == v || c->allowed[i] == VANY)
      return true;
  for (unsigned i = 0; i < c->nlog; i++)
    if ((c->log[i] & ~ACKED) == v || (c->log[i] & ~ACKED) == VANY)
      return true;
  return false;
}

static void
allow (struct cell *c, uint32_t v)
{
  for (unsigned i = 0; i < c->nallowed; i++)
    if (c->allowed[i] == v)
      return;
  if (c->nallowed == MAXV)
    cell_init (c, VANY);        /* too many to follow: give up on it */
  else
    c->allowed[c->nallowed++] = v;
}

static void
cell_op (struct cell *c, uint32_t v, bool acked)
{
  if (c->nlog == MAXV) {
    for (unsigned i = 0; i < c->nlog; i++)
      allow (c, c->log[i] & ~ACKED);
    c->nlog = 0;
  }
  c->log[c->nlog++] = v | (acked ? ACKED : 0);
}

/* A successful flush. */
static void
cell_collapse (struct cell *c)
{
  int last = -1;

  for (int i = 0; i < c->nlog; i++)
    if (c->log[i] & ACKED)
      last = i;
  if (last >= 0)
    c->nallowed = 0;
  for (int i = last >= 0 ? last : 0; i < c->nlog; i++)
    allow (c, c->log[i] & ~ACKED);
  c->nlog = 0;
}

static bool
cell_unknown (const struct cell *c)
{
  return cell_has (c, VANY);
}

static int
model_init (struct model *m, size_t nr_sectors, uint64_t size)
{
  m->nr_sectors = nr_sectors;
  m->sectors = malloc (nr_sectors * sizeof *m->sectors);
  if (!m->sectors)
    return -ENOMEM;
  for (size_t s = 0; s < nr_sectors; s++)
    cell_init (&m->sectors[s], 0);
  cell_init (&m->size, (uint32_t) (size / SECTOR));
  return 0;
}

static void
model_collapse (struct model *m)
{
  for (size_t s = 0; s < m->nr_sectors; s++)
    cell_collapse (&m->sectors[s]);
  cell_collapse (&m->size);
}

static void
fill (unsigned char *buf, uint64_t offset, uint64_t len, uint32_t v)
{
  for (uint64_t i = 0; i < len / 8; i++) {
    uint64_t w = (uint64_t) v << 32 | (uint32_t) (offset / 8 + i);
    memcpy (buf + i * 8, &w, 8);
  }
}

/* The value a sector read back holds: 0, a write's value, or VBAD. */
static uint32_t
value_of (const unsigned char *p, uint64_t offset)
{
  uint64_t w;
  uint32_t v;
  static const unsigned char zero[SECTOR];

  if (memcmp (p, zero, SECTOR) == 0)
    return 0;
  memcpy (&w, p, 8);
  v = (uint32_t) (w >> 32);
  if (v == 0 || v >= VBAD)
    return VBAD;
  for (unsigned i = 0; i < SECTOR / 8; i++) {
    uint64_t want = (uint64_t) v << 32 | (uint32_t) (offset / 8 + i);
    memcpy (&w, p + i * 8, 8);
    if (w != want)
      return VBAD;
  }
  return v;
}

static void
record_lost (struct fault_outcome *out, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));

static void
record_lost (struct fault_outcome *out, const char *fmt, ...)
{
  if (out->lost++ == 0) {
    va_list ap;
    va_start (ap, fmt);
    vsnprintf (out->first_lost, sizeof out->first_lost, fmt, ap);
    va_end (ap);
  }
}

static void
describe (char *s, size_t n, const struct cell *c)
{
  size_t used = 0;

  s[0] = 0;
  for (unsigned i = 0; i < c->nallowed && used < n; i++)
    used += (size_t) snprintf (s + used, n - used, "%s%" PRIu32,
                               used ? "," : "", c->allowed[i]);
  for (unsigned i = 0; i < c->nlog && used < n; i++)
    used += (size_t) snprintf (s + used, n - used, "%s%" PRIu32 "%s",
                               used ? "," : "", c->log[i] & ~ACKED,
                               c->log[i] & ACKED ? "" : "?");
}

/* Run operation i.  Ranges clip to the engine's disk size now. */
static void
run_op (struct state *st, size_t i)
{
  const struct wop *op = &st->wl->ops[i];
  struct qcow2_image *img = st->img;
  struct model *m = &st->active;
  uint64_t disk = qcow2_get_size (img);
  uint64_t off = op->offset, len = op->length;
  uint32_t v = (uint32_t) i + 1, value;
  bool range = op->kind <= WOP_TRIM;
  int r = 0;

  if (range) {
    if (off >= disk)
      return;
    if (len > disk - off)
      len = disk - off;
    if (off / SECTOR + len / SECTOR > m->nr_sectors || len == 0)
      return;
  }

  switch (op->kind) {
  case WOP_WRITE:
  case WOP_WRITE_FUA:
    fill (st->buf, off, len, v);
    r = qcow2_write (img, st->buf, len, off, op->kind == WOP_WRITE_FUA);
    value = v;
    break;
  case WOP_ZERO:
  case WOP_ZERO_TRIM:
    r = qcow2_zero (img, len, off, op->kind == WOP_ZERO_TRIM, false, false);
    value = 0;
    break;
  case WOP_TRIM:
    r = qcow2_trim (img, len, off, false);
    value = VANY;
    break;
  case WOP_FLUSH:
    r = qcow2_flush (img);
    if (r == 0) {
      model_collapse (m);
      for (unsigned s = 0; s < WORKLOAD_SLOTS; s++) {
        if (st->snap[s].sectors)
          model_collapse (&st->snap[s]);
        cell_collapse (&st->exists[s]);
      }
    }
    break;
  case WOP_RESIZE:
    if (op->length <= disk || op->length / SECTOR > m->nr_sectors)
      return;
    r = qcow2_resize (img, op->length);
    cell_op (&m->size, (uint32_t) (op->length / SECTOR), r == 0);
    break;
  case WOP_SNAP_CREATE: {
    struct model *sm = &st->snap[op->slot];
    char name[16];
    /* Only a name that surely does not exist yet: a create refused for
     * an existing name would tell nothing.
     */
    if (cell_has (&st->exists[op->slot], 1))
      return;
    free (sm->sectors);
    *sm = *m;
    sm->sectors = malloc (m->nr_sectors * sizeof *sm->sectors);
    if (!sm->sectors)
      abort ();
    memcpy (sm->sectors, m->sectors, m->nr_sectors * sizeof *sm->sectors);
    snprintf (name, sizeof name, "s%u", op->slot);
    r = qcow2_snapshot_create (img, name);
    cell_op (&st->exists[op->slot], 1, r == 0);
    break;
  }
  case WOP_SNAP_DELETE: {
    char name[16];
    if (!cell_has (&st->exists[op->slot], 1))
      return;
    snprintf (name, sizeof name, "s%u", op->slot);
    r = qcow2_snapshot_delete (img, name);
    cell_op (&st->exists[op->slot], 0, r == 0);
    break;
  }
  }

  if (range) {
    for (uint64_t s = off / SECTOR; s < (off + len) / SECTOR; s++) {
      cell_op (&m->sectors[s], value, r == 0);
      /* FUA makes this write durable by itself. */
      if (r == 0 && op->kind == WOP_WRITE_FUA)
        cell_collapse (&m->sectors[s]);
    }
  }
  if (r < 0)
    st->out->failed_ops++;
  if (getenv ("FAULT_TRACE"))
    fprintf (stderr, "op %zu: %s %" PRIu64 "+%" PRIu64 " slot %u: %d\n",
             i, wop_name (op->kind), off, len, op->slot, r);
}

/* Compare what reads back (read_fn over size bytes) with model m. */
typedef int (*read_fn) (void *h, void *buf, uint64_t len, uint64_t off);

static int
read_image (void *h, void *buf, uint64_t len, uint64_t off)
{
  return qcow2_read (h, buf, len, off);
}

static int
read_view (void *h, void *buf, uint64_t len, uint64_t off)
{
  return qcow2_view_read (h, buf, len, off);
}

static void
compare (struct state *st, const char *what, read_fn fn, void *h,
         uint64_t size, const struct model *m)
{
  const uint64_t chunk = 64 * 1024;
  struct fault_outcome *out = st->out;
  char allowed[128];

  if (size % SECTOR || !cell_has (&m->size, (uint32_t) (size / SECTOR))) {
    describe (allowed, sizeof allowed, &m->size);
    record_lost (out, "%s: size %" PRIu64 " sectors, model allows {%s}",
                 what, size / SECTOR, allowed);
  }
  if (size / SECTOR > m->nr_sectors)
    size = m->nr_sectors * SECTOR;
  for (uint64_t off = 0; off < size; off += chunk) {
    uint64_t len = size - off < chunk ? size - off : chunk;
    if (fn (h, st->buf, len, off) < 0) {
      record_lost (out, "%s: reading %" PRIu64 "+%" PRIu64 " failed",
                   what, off, len);
      continue;
    }
    for (uint64_t p = 0; p < len; p += SECTOR) {
      const struct cell *c = &m->sectors[(off + p) / SECTOR];
      uint32_t v;
      if (cell_unknown (c)) {
        out->unverified++;
        continue;
      }
      v = value_of (st->buf + p, off + p);
      if (!cell_has (c, v)) {
        describe (allowed, sizeof allowed, c);
        record_lost (out, "%s: sector %" PRIu64 " reads %s%" PRIu32
                     ", model allows {%s}", what, (off + p) / SECTOR,
                     v == VBAD ? "garbage " : "", v == VBAD ? 0 : v,
                     allowed);
      }
    }
  }
}

static void
verify (struct state *st, const char *path)
{
  struct fault_outcome *out = st->out;
  struct qcow2_open_options opts;
  struct qcow2_image *img;
  struct qcow2_io *io;
  int r;

  /* Reopened read-write, as a server would: an image left dirty (an
   * operation cut short: snapshots.c run_locked) is repaired then.
   */
  r = qcow2_io_file_open (path, QCOW2_IO_READ_WRITE, &io);
  if (r == 0) {
    qcow2_open_options_init (&opts);
    opts.filename = path;
    opts.follow_backing = false;
    opts.writable = true;
    r = qcow2_open_io (io, &opts, &img);
  }
  out->reopen = r;
  if (r < 0)
    return;

  compare (st, "disk", read_image, img, qcow2_get_size (img), &st->active);
  for (unsigned s = 0; s < WORKLOAD_SLOTS; s++) {
    char name[16];
    struct qcow2_view *view;
    bool found = false;

    if (!st->snap[s].sectors)
      continue;
    snprintf (name, sizeof name, "s%u", s);
    for (uint32_t i = 0; i < qcow2_snapshot_count (img); i++) {
      struct qcow2_snapshot_info info;
      qcow2_snapshot_get_info (img, i, &info);
      found |= strcmp (info.name, name) == 0;
    }
    if (!cell_has (&st->exists[s], found ? 1 : 0)) {
      record_lost (out, "snapshot %s %s", name,
                   found ? "is back after a flushed delete"
                   : "is lost after a flushed create");
      continue;
    }
    if (!found)
      continue;
    if (qcow2_view_open (img, name, &view) < 0) {
      record_lost (out, "snapshot %s cannot be opened", name);
      continue;
    }
    compare (st, name, read_view, view, qcow2_view_get_size (view),
             &st->snap[s]);
    qcow2_view_close (view);
  }
  out->check = qcow2_check (img, false, &out->result);
  qcow2_close (img);
}

const char *
wop_name (enum wop_kind kind)
{
  static const char *const names[] = {
    [WOP_WRITE] = "write", [WOP_WRITE_FUA] = "FUA write",
    [WOP_ZERO] = "zero", [WOP_ZERO_TRIM] = "zero with trim",
    [WOP_TRIM] = "trim", [WOP_FLUSH] = "flush", [WOP_RESIZE] = "resize",
    [WOP_SNAP_CREATE] = "snapshot create",
    [WOP_SNAP_DELETE] = "snapshot delete",
  };
  return names[kind];
}

int
fault_run (const struct workload *wl, struct fault_plan *plan,
           struct fault_outcome *out, int *fd_out)
{
  struct qcow2_create_options co;
  struct qcow2_open_options oo;
  struct qcow2_io *io = NULL;
  struct state st = { .wl = wl, .out = out };
  uint64_t max_size = wl->size, max_len = 0;
  char path[64];
  int fd, r;

  memset (out, 0, sizeof *out);
  out->fired_in = -1;
  for (size_t i = 0; i < wl->nr_ops; i++) {
    const struct wop *op = &wl->ops[i];
    if (op->kind == WOP_RESIZE && op->length > max_size)
      max_size = op->length;
    if (op->kind <= WOP_TRIM && op->length > max_len)
      max_len = op->length;
  }
  if (max_len < 64 * 1024)
    max_len = 64 * 1024;

  fd = memfd_create ("fault-image", 0);
  if (fd < 0)
    return -errno;
  snprintf (path, sizeof path, "/proc/self/fd/%d", fd);
  qcow2_create_options_init (&co);
  co.filename = path;
  co.size = wl->size;
  co.cluster_size = wl->cluster_size;
  co.refcount_bits = wl->refcount_bits;
  co.overwrite = true;
  r = qcow2_create (&co);
  if (r == 0)
    r = qcow2_io_file_open (path, QCOW2_IO_READ_WRITE, &io);
  if (r == 0 && !(io = fault_io_new (io, plan)))
    r = -ENOMEM;
  if (r == 0) {
    qcow2_open_options_init (&oo);
    oo.filename = path;
    oo.writable = true;
    oo.follow_backing = false;
    r = qcow2_open_io (io, &oo, &st.img);
    /* With the fault in the opening itself, the run ends here. */
    if (r < 0 && plan->fired)
      r = 0;
  }
  if (r == 0 && (!(st.buf = malloc (max_len)) ||
                 model_init (&st.active, max_size / SECTOR, wl->size) < 0))
    r = -ENOMEM;
  if (r < 0) {
    qcow2_close (st.img);
    free (st.buf);
    free (st.active.sectors);
    close (fd);
    return r;
  }
  for (unsigned s = 0; s < WORKLOAD_SLOTS; s++)
    cell_init (&st.exists[s], 0);

  if (st.img) {
    for (size_t i = 0; i < wl->nr_ops; i++) {
      bool fired_before = plan->fired;
      unsigned failed = out->failed_ops;
      run_op (&st, i);
      if (fired_before && out->failed_ops > failed)
        out->refused_after = true;
      if (!fired_before && plan->fired)
        out->fired_in = (long) i;
    }
    if (!plan->fired)
      out->fired_in = (long) wl->nr_ops;
    qcow2_close (st.img);
  }
  out->fired = plan->fired;

  verify (&st, path);

  free (st.buf);
  free (st.active.sectors);
  for (unsigned s = 0; s < WORKLOAD_SLOTS; s++)
    free (st.snap[s].sectors);
  if (fd_out)
    *fd_out = fd;
  else
    close (fd);
  return 0;
}
