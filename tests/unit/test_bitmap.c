/* nbdkit-qcow2
 * Copyright (C) 2026 the nbdkit-qcow2 authors
 * SPDX-License-Identifier: BSD-3-Clause (see LICENSE)
 */

/* Unit test of persistent dirty bitmaps (core/operations/bitmap.c, bitmap_store.c)
 * on an image file the engine creates:
 *
 * - eight threads write, zero and trim at random at once; afterwards every
 *   enabled bitmap holds exactly the granules the requests touched (a
 *   model), at granularities 512 B, 64 KiB and 2 MiB, and a disabled one
 *   nothing;
 * - after close and reopen the bits are the same and no bitmap is in use;
 *   the image checks clean (qcow2_check) after every step;
 * - growing the disk grows the bitmaps, the new part clean;
 * - management: add, clear, disable/enable, remove (down to none);
 * - a writer that does not close leaves in_use: the next open sees the
 *   bitmap inconsistent and refuses its extents.
 *
 * QEMU's view of the same is in tests/integration/test_bitmaps.py.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "qcow2.h"
#include "testing.h"

#define SIZE (64ull << 20)
#define THREADS 8
#define OPS 300

static char path[256];

static const struct {
  const char *name;
  uint32_t granularity;
} bitmaps[] = {
  { "g512", 512 }, { "g64k", 65536 }, { "g2m", 2 << 20 }, { "off", 4096 },
};
#define NB (sizeof bitmaps / sizeof bitmaps[0])

struct op {
  uint64_t offset, len;
};

static struct op ops[THREADS][OPS];

static uint64_t
rnd (uint64_t *s)
{
  *s ^= *s << 13;
  *s ^= *s >> 7;
  *s ^= *s << 17;
  return *s;
}

static struct qcow2_image *
open_image (bool writable)
{
  struct qcow2_open_options opts;
  struct qcow2_image *img = NULL;

  qcow2_open_options_init (&opts);
  opts.filename = path;
  opts.writable = writable;
  CHECK (qcow2_open (&opts, &img) == 0, "open %s", path);
  return img;
}

static void
check_clean (void)
{
  struct qcow2_check_result res;
  struct qcow2_image *img = open_image (true);

  if (!img)
    return;
  CHECK (qcow2_check (img, false, &res) == 0, "check");
  CHECK (res.corruptions == 0 && res.leaks == 0,
         "%" PRIu64 " corruptions, %" PRIu64 " leaks", res.corruptions,
         res.leaks);
  qcow2_close (img);
}

static void *
worker (void *arg)
{
  struct qcow2_image *img = ((void **) arg)[0];
  unsigned t = (unsigned) (uintptr_t) ((void **) arg)[1];
  uint64_t s = 0x9e3779b97f4a7c15ull * (t + 1);
  static unsigned char buf[256 << 10];

  for (unsigned i = 0; i < OPS; i++) {
    uint64_t len = 1 + rnd (&s) % (rnd (&s) % 4 ? 8192 : sizeof buf);
    uint64_t off = rnd (&s) % (SIZE - len);
    int r;
    switch (rnd (&s) % 4) {
    case 0:
      r = qcow2_zero (img, len, off, rnd (&s) & 1, false, false);
      break;
    case 1:
      r = qcow2_trim (img, len, off, false);
      break;
    default:
      r = qcow2_write (img, buf, len, off, false);
    }
    CHECK (r == 0, "request %u of thread %u", i, t);
    ops[t][i].offset = off;
    ops[t][i].len = len;
  }
  return NULL;
}

/* Dirty granules of one bitmap, as the engine reports them. */
struct collect {
  unsigned char *dirty;
  uint32_t granularity;
  uint64_t next;
  bool ok;
};

static int
collect_extent (void *opaque, uint64_t offset, uint64_t length,
                uint32_t flags)
{
  struct collect *c = opaque;

  if (offset != c->next || length == 0)
    c->ok = false;
  c->next = offset + length;
  if (!(flags & QCOW2_EXTENT_HOLE))
    for (uint64_t g = offset / c->granularity;
         g <= (offset + length - 1) / c->granularity; g++)
      c->dirty[g] = 1;
  return 0;
}

static void
check_bitmap (struct qcow2_image *img, const char *name, uint32_t g,
              const unsigned char *want, uint64_t size, const char *what)
{
  int64_t i = qcow2_bitmap_find (img, name);
  uint64_t n = (size + g - 1) / g;
  struct collect c = { calloc (n, 1), g, 0, true };
  struct qcow2_bitmap_info info;

  CHECK (i >= 0, "%s: bitmap %s missing", what, name);
  if (i < 0 || !c.dirty)
    goto out;
  qcow2_bitmap_get_info (img, (uint32_t) i, &info);
  CHECK (!info.inconsistent && info.granularity == g, "%s: %s info", what,
         name);
  while (c.next < size && c.ok)
    CHECK (qcow2_bitmap_extents (img, (uint32_t) i, c.next, size - c.next,
                                 false, collect_extent, &c) == 0,
           "%s: %s extents", what, name);
  CHECK (c.ok && c.next == size, "%s: %s extents not contiguous", what,
         name);
  for (uint64_t k = 0; k < n; k++)
    if (c.dirty[k] != want[k]) {
      CHECK (false, "%s: %s granule %" PRIu64 " is %d, expected %d", what,
             name, k, c.dirty[k], want[k]);
      break;
    }
 out:
  free (c.dirty);
}

static unsigned char *
model (uint32_t g, bool enabled)
{
  unsigned char *m = calloc (SIZE / g + 1, 1);

  for (unsigned t = 0; enabled && m && t < THREADS; t++)
    for (unsigned i = 0; i < OPS; i++)
      for (uint64_t k = ops[t][i].offset / g;
           k <= (ops[t][i].offset + ops[t][i].len - 1) / g; k++)
        m[k] = 1;
  return m;
}

static void
check_all (struct qcow2_image *img, const char *what)
{
  for (size_t b = 0; b < NB; b++) {
    unsigned char *m = model (bitmaps[b].granularity,
                              strcmp (bitmaps[b].name, "off") != 0);
    check_bitmap (img, bitmaps[b].name, bitmaps[b].granularity, m, SIZE,
                  what);
    free (m);
  }
}

int
main (void)
{
  struct qcow2_create_options co;
  struct qcow2_image *img;
  pthread_t th[THREADS];
  void *args[THREADS][2];
  const char *dir = getenv ("TMPDIR") ? getenv ("TMPDIR") : "/tmp";

  qcow2_set_error_handler (capture_error, NULL);
  snprintf (path, sizeof path, "%s/test_bitmap.%d.qcow2", dir, (int) getpid ());
  qcow2_create_options_init (&co);
  co.filename = path;
  co.size = SIZE;
  co.overwrite = true;
  if (qcow2_create (&co) < 0) {
    fprintf (stderr, "create %s: %s\n", path, last_error);
    return 1;
  }

  /* Concurrent requests against four bitmaps. */
  img = open_image (true);
  if (!img)
    goto out;
  for (size_t b = 0; b < NB; b++)
    CHECK (qcow2_bitmap_add (img, bitmaps[b].name, bitmaps[b].granularity)
           == 0, "add %s", bitmaps[b].name);
  CHECK (qcow2_bitmap_add (img, "g512", 0) == -EEXIST, "duplicate name");
  CHECK (qcow2_bitmap_set_enabled (img, "off", false) == 0, "disable");
  for (unsigned t = 0; t < THREADS; t++) {
    args[t][0] = img;
    args[t][1] = (void *) (uintptr_t) t;
    pthread_create (&th[t], NULL, worker, args[t]);
  }
  for (unsigned t = 0; t < THREADS; t++)
    pthread_join (th[t], NULL);
  check_all (img, "while open");
  qcow2_close (img);
  check_clean ();

  /* The same bits after reopening, read-only and read-write. */
  img = open_image (false);
  if (img) {
    check_all (img, "reopened read-only");
    qcow2_close (img);
  }
  img = open_image (true);
  if (img) {
    check_all (img, "reopened read-write");
    /* Growing: the bitmaps follow, the new granules clean. */
    CHECK (qcow2_resize (img, SIZE + (3 << 20)) == 0, "resize");
    {
      unsigned char *m = model (2 << 20, true);
      unsigned char *grown = calloc (SIZE / (2 << 20) + 2, 1);
      if (m && grown) {
        memcpy (grown, m, SIZE / (2 << 20));
        check_bitmap (img, "g2m", 2 << 20, grown, SIZE + (3 << 20),
                      "grown");
      }
      free (m);
      free (grown);
    }
    CHECK (qcow2_write (img, "x", 1, SIZE + (2 << 20), false) == 0,
           "write past the old end");
    qcow2_close (img);
  }
  check_clean ();

  /* Management. */
  img = open_image (true);
  if (img) {
    int64_t i;
    struct qcow2_bitmap_info info;
    CHECK (qcow2_bitmap_clear (img, "g64k") == 0, "clear");
    CHECK (qcow2_bitmap_remove (img, "g512") == 0, "remove");
    CHECK (qcow2_bitmap_remove (img, "g512") == -ENOENT, "remove twice");
    CHECK (qcow2_bitmap_set_enabled (img, "off", true) == 0, "enable");
    CHECK (qcow2_bitmap_count (img) == 3, "count");
    qcow2_close (img);
    img = open_image (false);
    if (img) {
      i = qcow2_bitmap_find (img, "g64k");
      CHECK (i >= 0, "g64k kept");
      if (i >= 0) {
        qcow2_bitmap_get_info (img, (uint32_t) i, &info);
        CHECK (info.dirty_bytes == 0 && info.enabled, "g64k cleared");
      }
      i = qcow2_bitmap_find (img, "off");
      if (i >= 0) {
        qcow2_bitmap_get_info (img, (uint32_t) i, &info);
        CHECK (info.enabled, "off enabled");
      }
      CHECK (qcow2_bitmap_find (img, "g512") == -ENOENT, "g512 removed");
      CHECK (qcow2_bitmap_add (img, "x", 0) == -EROFS, "read-only add");
      qcow2_close (img);
    }
  }
  check_clean ();

  /* A writer that never closes: in_use stays, the bitmap is unusable. */
  img = open_image (true);
  if (img) {
    struct qcow2_image *other;
    CHECK (qcow2_write (img, "y", 1, 0, true) == 0, "write");
    other = open_image (false);
    if (other) {
      int64_t i = qcow2_bitmap_find (other, "g64k");
      struct qcow2_bitmap_info info;
      struct collect c = { NULL, 65536, 0, true };
      qcow2_bitmap_get_info (other, (uint32_t) i, &info);
      CHECK (info.inconsistent, "in use while another writer has it");
      CHECK (qcow2_bitmap_extents (other, (uint32_t) i, 0, 4096, false,
                                   collect_extent, &c) == -EIO,
             "inconsistent extents refused");
      qcow2_close (other);
    }
    /* Remove them all: the extension goes. */
    CHECK (qcow2_bitmap_remove (img, "g64k") == 0 &&
           qcow2_bitmap_remove (img, "g2m") == 0 &&
           qcow2_bitmap_remove (img, "off") == 0, "remove all");
    qcow2_close (img);
  }
  img = open_image (false);
  if (img) {
    CHECK (qcow2_bitmap_count (img) == 0, "no bitmaps left");
    qcow2_close (img);
  }
  check_clean ();

 out:
  unlink (path);
  if (failures) {
    fprintf (stderr, "%d failure(s)\n", failures);
    return 1;
  }
  printf ("test_bitmap: all passed\n");
  return 0;
}
