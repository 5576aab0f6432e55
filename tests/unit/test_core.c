/* nbdkit-qcow2
 * Copyright (C) 2026 the nbdkit-qcow2 authors
 * SPDX-License-Identifier: BSD-3-Clause (see LICENSE)
 */

/* Unit test of the read side of the core, on images built by hand in
 * memory (header, L1, L2 and data written into a byte array), so every
 * entry kind is exactly what the test says it is:
 *
 * - qcow2_read of data, zero (plain and preallocated), unallocated and
 *   compressed clusters, whole-disk and at random unaligned ranges;
 * - extended L2 subclusters, including invalid bitmaps (EIO);
 * - run merging: a read over host-contiguous clusters is ONE pread, counted
 *   through a wrapping io backend;
 * - the slice cache with a capacity of 2 (LRU hits and misses, pins over
 *   capacity, failed loads), and an image whose L2 tables outnumber the
 *   cache many times over;
 * - 8 threads reading at once through a tiny cache;
 * - qcow2_extents: flags, contiguity, one_extent.
 *
 * Exit status 0 = pass, 1 = failure (each failure is printed).
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "cache.h"
#include "io.h"
#include "qcow2.h"
#include "util.h"
#include "testing.h"

/* xorshift: deterministic random numbers, one state per thread. */
static uint64_t
rnd (uint64_t *s)
{
  *s ^= *s << 13;
  *s ^= *s >> 7;
  *s ^= *s << 17;
  return *s;
}

/* ------------------------------------------------------------------ */
/* A counting io backend: a memory buffer whose preads are counted.  The
 * ops table starts as a copy of the memory backend's (for the ops this
 * test does not care about), and overrides every op that looks at the
 * io object.
 */

struct counting_io {
  struct qcow2_io io;
  struct qcow2_io_ops ops;
  const unsigned char *data;
  size_t size;
  atomic_uint preads;
  atomic_ullong bytes;
};

static int
counting_pread (struct qcow2_io *io, void *buf, size_t len, uint64_t offset)
{
  struct counting_io *c = (struct counting_io *) io;

  atomic_fetch_add (&c->preads, 1);
  atomic_fetch_add (&c->bytes, len);
  if (offset > c->size || len > c->size - offset)
    return -EIO;
  memcpy (buf, c->data + offset, len);
  return 0;
}

static int
counting_pwrite (struct qcow2_io *io, const void *buf, size_t len,
                 uint64_t offset)
{
  (void) io; (void) buf; (void) len; (void) offset;
  return -EROFS;
}

static int
counting_flush (struct qcow2_io *io)
{
  (void) io;
  return 0;
}

static int
counting_get_size (struct qcow2_io *io, uint64_t *size)
{
  *size = ((struct counting_io *) io)->size;
  return 0;
}

static void
counting_close (struct qcow2_io *io)
{
  free (io);
}

static struct counting_io *
counting_io_new (const void *data, size_t size)
{
  struct counting_io *c = calloc (1, sizeof *c);
  struct qcow2_io *mem = qcow2_io_mem_new (data, size);

  if (!c || !mem)
    abort ();
  c->ops = *mem->ops;
  qcow2_io_close (mem);
  c->ops.pread = counting_pread;
  c->ops.pwrite = counting_pwrite;
  c->ops.flush = counting_flush;
  c->ops.get_size = counting_get_size;
  c->ops.close = counting_close;
  c->io.ops = &c->ops;
  c->data = data;
  c->size = size;
  return c;
}

/* ------------------------------------------------------------------ */
/* Building images in memory.
 *
 * Layout: cluster 0 header, cluster 1 refcount table (never read by a
 * reader), then the L1 table, then L2 tables and data clusters in the
 * order the test allocates them.
 */

#define COPIED (1ull << 63)
#define COMPRESSED (1ull << 62)

struct image {
  unsigned char *buf;
  size_t size, cap;
  unsigned cbits;
  uint64_t cs;
  uint64_t vsize;
  bool extl2;
  unsigned entry_bytes;
  uint64_t l2_entries;
  uint64_t l1_offset;
  uint32_t l1_size;
  unsigned char *expect;        /* what a reader must see, vsize bytes */
};

static uint64_t
img_alloc (struct image *img, uint64_t n)
{
  uint64_t off = img->size;

  if (img->size + n * img->cs > img->cap) {
    img->cap = (img->size + n * img->cs) * 2;
    img->buf = realloc (img->buf, img->cap);
    if (!img->buf)
      abort ();
  }
  memset (img->buf + off, 0, n * img->cs);
  img->size += n * img->cs;
  return off;
}

static void
img_init (struct image *img, unsigned cbits, uint64_t vsize, bool extl2)
{
  memset (img, 0, sizeof *img);
  img->cbits = cbits;
  img->cs = 1ull << cbits;
  img->vsize = vsize;
  img->extl2 = extl2;
  img->entry_bytes = extl2 ? 16 : 8;
  img->l2_entries = img->cs / img->entry_bytes;
  img->l1_size = (uint32_t) div_round_up (vsize, img->cs * img->l2_entries);
  img_alloc (img, 2);
  img->l1_offset = img_alloc (img,
                              div_round_up (img->l1_size * 8ull, img->cs));
  img->expect = calloc (1, vsize);
  if (!img->expect)
    abort ();
}

static void
img_free (struct image *img)
{
  free (img->buf);
  free (img->expect);
}

/* Write the header; call before opening (the L1 and L2 are live). */
static void
img_finish (struct image *img)
{
  unsigned char *h = img->buf;

  memset (h, 0, 112);
  put_be32 (h, 0x514649fb);
  put_be32 (h + 4, 3);
  put_be32 (h + 20, img->cbits);
  put_be64 (h + 24, img->vsize);
  put_be32 (h + 36, img->l1_size);
  put_be64 (h + 40, img->l1_offset);
  put_be64 (h + 48, img->cs);           /* refcount table: cluster 1 */
  put_be32 (h + 56, 1);
  put_be64 (h + 72, img->extl2 ? 1ull << 4 : 0);
  put_be32 (h + 96, 4);
  put_be32 (h + 100, 112);
}

static uint64_t
l1_get (struct image *img, uint64_t i)
{
  return get_be64 (img->buf + img->l1_offset + 8 * i);
}

/* File offset of the L2 entry of guest offset g, allocating the table. */
static uint64_t
l2_entry_at (struct image *img, uint64_t g)
{
  uint64_t i = g / (img->cs * img->l2_entries);
  uint64_t l2 = l1_get (img, i) & 0x00fffffffffffe00ull;

  if (l2 == 0) {
    l2 = img_alloc (img, 1);
    put_be64 (img->buf + img->l1_offset + 8 * i, COPIED | l2);
  }
  return l2 + ((g >> img->cbits) % img->l2_entries) * img->entry_bytes;
}

static void
set_l2 (struct image *img, uint64_t g, uint64_t entry, uint64_t bitmap)
{
  uint64_t at = l2_entry_at (img, g);

  put_be64 (img->buf + at, entry);
  if (img->extl2)
    put_be64 (img->buf + at + 8, bitmap);
}

/* Bytes unique to their guest offset and image. */
static unsigned char
pattern (uint64_t g, unsigned salt)
{
  uint64_t x = (g + 1) * 0x9e3779b97f4a7c15ull + salt;
  return (unsigned char) (x >> 56 ^ x >> 24 ^ g);
}

/* Fill host cluster `host` with the guest cluster g's pattern; record the
 * bytes of subclusters in `expect_mask` (bit per subcluster; all with
 * standard L2) as expected guest data.
 */
static void
fill_data (struct image *img, uint64_t g, uint64_t host, uint32_t expect_mask)
{
  uint64_t sc = img->extl2 ? img->cs / 32 : img->cs;

  for (uint64_t i = 0; i < img->cs; i++) {
    unsigned char b = pattern (g + i, 1);
    img->buf[host + i] = b;
    if (g + i < img->vsize &&
        (!img->extl2 || (expect_mask >> (i / sc) & 1)))
      img->expect[g + i] = b;
  }
}

static uint64_t
add_data (struct image *img, uint64_t g)
{
  uint64_t host;

  l2_entry_at (img, g);                 /* the L2 table first */
  host = img_alloc (img, 1);

  fill_data (img, g, host, 0xffffffff);
  set_l2 (img, g, COPIED | host, img->extl2 ? 0xffffffff : 0);
  return host;
}

/* A compressed guest cluster g, stored at an unaligned byte offset. */
static void
add_compressed (struct image *img, uint64_t g)
{
  unsigned char *plain = malloc (img->cs);
  uLongf zlen = compressBound (img->cs) + 64;
  unsigned char *z = malloc (zlen);
  z_stream s;
  uint64_t host, nsec;
  unsigned shift = 62 - (img->cbits - 8);

  for (uint64_t i = 0; i < img->cs; i++)
    plain[i] = (unsigned char) ((g + i) / 100 % 7);   /* compressible */
  memset (&s, 0, sizeof s);
  if (deflateInit2 (&s, 9, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY) != Z_OK)
    abort ();
  s.next_in = plain;
  s.avail_in = (uInt) img->cs;
  s.next_out = z;
  s.avail_out = (uInt) zlen;
  if (deflate (&s, Z_FINISH) != Z_STREAM_END)
    abort ();
  zlen = s.total_out;
  deflateEnd (&s);

  l2_entry_at (img, g);
  host = img_alloc (img, div_round_up (zlen + 100, img->cs)) + 100;
  memcpy (img->buf + host, z, zlen);
  nsec = div_round_up ((host & 511) + zlen, 512);
  set_l2 (img, g, COMPRESSED | ((nsec - 1) << shift) | host, 0);
  memcpy (img->expect + g, plain, min_u64 (img->cs, img->vsize - g));
  free (plain);
  free (z);
}

static struct qcow2_image *
img_open (struct image *img, struct counting_io **cio, uint64_t cache_size)
{
  struct qcow2_open_options opts;
  struct qcow2_image *q = NULL;
  struct counting_io *c;
  int r;

  img_finish (img);
  c = counting_io_new (img->buf, img->size);
  qcow2_open_options_init (&opts);
  opts.filename = "test.qcow2";
  opts.follow_backing = false;
  opts.cache_size = cache_size;
  r = qcow2_open_io (&c->io, &opts, &q);
  CHECK (r == 0, "qcow2_open_io: %s", strerror (-r));
  if (cio)
    *cio = r == 0 ? c : NULL;
  return r == 0 ? q : NULL;
}

/* Read [off, off + len) and compare with the expectation. */
static void
check_read (struct qcow2_image *q, struct image *img, uint64_t off,
            uint64_t len, const char *what)
{
  unsigned char *b = malloc (len ? len : 1);
  int r;

  memset (b, 0xee, len);
  r = qcow2_read (q, b, len, off);
  CHECK (r == 0, "%s: read %" PRIu64 "+%" PRIu64 ": %s", what, off, len,
         strerror (-r));
  if (r == 0 && memcmp (b, img->expect + off, len) != 0) {
    uint64_t i = 0;
    while (b[i] == img->expect[off + i])
      i++;
    CHECK (0, "%s: read %" PRIu64 "+%" PRIu64 " differs at %" PRIu64
           " (got %#x, want %#x)", what, off, len, off + i, b[i],
           img->expect[off + i]);
  }
  free (b);
}

/* n random reads inside [0, limit) of at most max_len bytes. */
static void
check_random_reads (struct qcow2_image *q, struct image *img, uint64_t limit,
                    unsigned n, uint64_t max_len, uint64_t seed,
                    const char *what)
{
  for (unsigned i = 0; i < n; i++) {
    uint64_t off = rnd (&seed) % limit;
    uint64_t len = 1 + rnd (&seed) % max_len;
    if (len > limit - off)
      len = limit - off;
    check_read (q, img, off, len, what);
  }
}

/* Number of preads a read takes (the read must succeed). */
static unsigned
preads_for (struct qcow2_image *q, struct counting_io *c, uint64_t off,
            uint64_t len)
{
  unsigned char *b = malloc (len);
  unsigned before = atomic_load (&c->preads);
  int r = qcow2_read (q, b, len, off);

  CHECK (r == 0, "read %" PRIu64 "+%" PRIu64 ": %s", off, len,
         strerror (-r));
  free (b);
  return atomic_load (&c->preads) - before;
}

/* ------------------------------------------------------------------ */
/* Extents */

struct ext_list {
  uint64_t off[4096], len[4096];
  uint32_t flags[4096];
  unsigned n;
  unsigned stop_after;          /* 0: never */
};

static int
collect (void *opaque, uint64_t offset, uint64_t length, uint32_t flags)
{
  struct ext_list *l = opaque;

  if (l->n < 4096) {
    l->off[l->n] = offset;
    l->len[l->n] = length;
    l->flags[l->n] = flags;
    l->n++;
  }
  return l->stop_after && l->n >= l->stop_after ? -1 : 0;
}

/* Expected flags of each cluster (or subcluster), filled by the tests. */
static void
check_extents (struct qcow2_image *q, uint64_t off, uint64_t len,
               const uint32_t *want, uint64_t unit, const char *what)
{
  struct ext_list *l = calloc (1, sizeof *l);
  int r = qcow2_extents (q, off, len, false, collect, l);
  uint64_t pos = off;

  CHECK (r == 0, "%s: extents: %s", what, strerror (-r));
  for (unsigned i = 0; i < l->n; i++) {
    CHECK (l->off[i] == pos, "%s: extent %u at %" PRIu64 ", expected %"
           PRIu64, what, i, l->off[i], pos);
    CHECK (l->len[i] > 0, "%s: empty extent %u", what, i);
    for (uint64_t u = l->off[i] / unit;
         u < div_round_up (l->off[i] + l->len[i], unit); u++)
      CHECK (want[u] == l->flags[i], "%s: unit %" PRIu64 " reported with "
             "flags %u, expected %u", what, u, l->flags[i], want[u]);
    pos = l->off[i] + l->len[i];
  }
  CHECK (pos == off + len, "%s: extents end at %" PRIu64 ", expected %"
         PRIu64, what, pos, off + len);

  /* one_extent: exactly one, starting at off. */
  memset (l, 0, sizeof *l);
  r = qcow2_extents (q, off, len, true, collect, l);
  CHECK (r == 0 && l->n == 1 && l->off[0] == off,
         "%s: one_extent gave %u extents", what, l->n);

  /* A callback that stops early ends the call without error. */
  memset (l, 0, sizeof *l);
  l->stop_after = 1;
  r = qcow2_extents (q, off, len, false, collect, l);
  CHECK (r == 0 && l->n == 1, "%s: stopping early: r=%d n=%u", what, r,
         l->n);
  free (l);
}

/* ------------------------------------------------------------------ */
/* Standard L2: every cluster kind, merging, extents. */

#define H QCOW2_EXTENT_HOLE
#define Z QCOW2_EXTENT_ZERO

static void
test_standard (void)
{
  struct image img;
  struct counting_io *c;
  struct qcow2_image *q;
  const uint64_t cs = 4096;
  uint64_t h5, h6, h3;
  uint32_t want[1024];

  /* 4 MiB, 4 KiB clusters: two L2 tables of 2 MiB each. */
  img_init (&img, 12, 4 << 20, false);
  l2_entry_at (&img, 0);
  add_data (&img, 0 * cs);                   /* 0-1: host-contiguous */
  add_data (&img, 1 * cs);
  set_l2 (&img, 2 * cs, 1, 0);               /* zero, plain */
  h3 = img_alloc (&img, 1);                  /* zero, preallocated: */
  memset (img.buf + h3, 0xab, cs);           /* garbage must not show */
  set_l2 (&img, 3 * cs, COPIED | h3 | 1, 0);
  /* 4: unallocated */
  h6 = add_data (&img, 6 * cs);              /* 5 and 6: host order */
  h5 = add_data (&img, 5 * cs);              /* reversed */
  CHECK (h5 == h6 + cs, "layout");
  add_compressed (&img, 7 * cs);
  add_data (&img, 8 * cs);                   /* 8-10: contiguous */
  add_data (&img, 9 * cs);
  add_data (&img, 10 * cs);
  add_data (&img, 2 * 1024 * 1024);          /* second L2 table */
  add_data (&img, 4 * 1024 * 1024 - cs);     /* the last cluster */

  q = img_open (&img, &c, 0);
  if (!q) {
    img_free (&img);
    return;
  }
  CHECK (qcow2_get_size (q) == 4 << 20, "size");
  CHECK (qcow2_get_cluster_size (q) == cs, "cluster size");

  check_read (q, &img, 0, img.vsize, "standard: whole disk");
  check_random_reads (q, &img, img.vsize, 2000, 3 * cs, 1, "standard: random");
  check_random_reads (q, &img, img.vsize, 200, 3 << 20, 2, "standard: random large");
  check_read (q, &img, 3 * cs + 17, 2, "standard: inside zero-alloc");
  check_read (q, &img, img.vsize - 1, 1, "standard: last byte");
  check_read (q, &img, img.vsize, 0, "standard: empty read at the end");

  /* Merging: warm the L2 slices, then count. */
  check_read (q, &img, 0, img.vsize, "standard: warm-up");
  CHECK (preads_for (q, c, 0, 2 * cs) == 1,
         "two host-contiguous clusters must be one pread");
  CHECK (preads_for (q, c, 100, 2 * cs - 200) == 1,
         "unaligned read over two contiguous clusters: one pread");
  CHECK (preads_for (q, c, 8 * cs, 3 * cs) == 1,
         "three host-contiguous clusters must be one pread");
  CHECK (preads_for (q, c, 0, 5 * cs) == 1,
         "data + zero + zero-alloc + unallocated: one pread");
  CHECK (preads_for (q, c, 5 * cs, 2 * cs) == 2,
         "clusters not contiguous on the host: two preads");
  CHECK (preads_for (q, c, 2 * cs, 3 * cs) == 0,
         "zero and unallocated clusters need no pread");
  CHECK (preads_for (q, c, 7 * cs + 5, 10) == 1,
         "compressed cluster: one pread");

  /* Out of range. */
  {
    unsigned char b[2];
    CHECK (qcow2_read (q, b, 2, img.vsize - 1) == -EINVAL,
           "read past the end must fail");
    CHECK (qcow2_read (q, b, 1, UINT64_MAX) == -EINVAL,
           "read at 2^64-1 must fail");
    CHECK (qcow2_extents (q, img.vsize - 1, 2, false, collect, NULL)
           == -EINVAL, "extents past the end must fail");
  }

  /* Extents, per cluster. */
  for (unsigned i = 0; i < 1024; i++)
    want[i] = H | Z;                     /* unallocated, no backing */
  want[0] = want[1] = 0;
  want[2] = H | Z;
  want[3] = Z;                           /* preallocated zeros: not a hole */
  want[5] = want[6] = want[7] = 0;
  want[8] = want[9] = want[10] = 0;
  want[512] = 0;
  want[1023] = 0;
  check_extents (q, 0, img.vsize, want, cs, "standard extents");
  check_extents (q, 5 * cs + 1, 3 * cs, want, cs, "standard extents, "
                 "unaligned");
  {
    struct ext_list *l = calloc (1, sizeof *l);
    qcow2_extents (q, 0, img.vsize, false, collect, l);
    CHECK (l->n > 0 && l->off[0] == 0 && l->len[0] == 2 * cs &&
           l->flags[0] == 0, "contiguous data clusters: one extent");
    free (l);
  }

  qcow2_close (q);
  img_free (&img);
}

/* ------------------------------------------------------------------ */
/* Extended L2 subclusters. */

static void
test_extended_l2 (void)
{
  struct image img;
  struct counting_io *c;
  struct qcow2_image *q;
  const uint64_t cs = 16384, sc = 512;
  uint64_t h0, h2;
  uint32_t alloc0, zero0;
  uint32_t want[2048];
  unsigned char b[512];

  /* 1 MiB, 16 KiB clusters, 512-byte subclusters. */
  img_init (&img, 14, 1 << 20, true);
  l2_entry_at (&img, 0);
  h0 = img_alloc (&img, 1);
  alloc0 = 0x0000040f;                  /* sc 0-3 and 10 */
  zero0 = 0x00000030;                   /* sc 4-5 */
  fill_data (&img, 0, h0, alloc0);
  set_l2 (&img, 0, COPIED | h0, (uint64_t) zero0 << 32 | alloc0);
  set_l2 (&img, cs, 0, 0xffffffffull << 32);            /* all zero */
  h2 = add_data (&img, 2 * cs);                          /* all alloc */
  {
    uint64_t h3 = img_alloc (&img, 1);                   /* all but sc 16 */
    fill_data (&img, 3 * cs, h3, 0xfffeffff);
    set_l2 (&img, 3 * cs, COPIED | h3, 0xfffeffff);
  }
  add_compressed (&img, 4 * cs);
  /* 5: alloc and zero both set for sc 0: invalid */
  {
    uint64_t h5 = img_alloc (&img, 1);
    set_l2 (&img, 5 * cs, COPIED | h5, 1ull << 32 | 1);
  }
  /* 6: alloc bit without a host cluster: invalid */
  set_l2 (&img, 6 * cs, 0, 1u << 7);
  /* 7: preallocated host cluster, no bits: unallocated (reads below) */
  {
    uint64_t h7 = img_alloc (&img, 1);
    memset (img.buf + h7, 0xcd, cs);
    set_l2 (&img, 7 * cs, COPIED | h7, 0);
  }
  (void) h2;

  q = img_open (&img, &c, 0);
  if (!q) {
    img_free (&img);
    return;
  }
  check_read (q, &img, 0, 5 * cs, "extl2: clusters 0-4");
  check_read (q, &img, 7 * cs, img.vsize - 7 * cs, "extl2: cluster 7 on");
  check_random_reads (q, &img, 5 * cs, 1000, 3 * sc, 3, "extl2: random in 0-4");
  check_read (q, &img, 3 * sc + 100, 4 * sc, "extl2: across data/zero");

  CHECK (qcow2_read (q, b, sizeof b, 5 * cs) == -EIO,
         "alloc + zero on one subcluster must be EIO");
  CHECK (strstr (last_error, "Invalid cluster entry found") != NULL,
         "message: %s", last_error);
  CHECK (qcow2_read (q, b, sizeof b, 5 * cs + 8 * sc) == -EIO,
         "another subcluster of an invalid entry must be EIO too");
  CHECK (qcow2_read (q, b, sizeof b, 6 * cs + 7 * sc) == -EIO,
         "alloc bit without a host cluster must be EIO");
  check_read (q, &img, 4 * cs, cs, "extl2: still readable after EIO");

  /* Merging of subclusters. */
  check_read (q, &img, 0, 5 * cs, "extl2: warm-up");
  CHECK (preads_for (q, c, 0, 4 * sc) == 1,
         "four allocated subclusters: one pread");
  CHECK (preads_for (q, c, 0, 10 * sc) == 1,
         "subclusters 0-9 (data, zero, unallocated): one pread");
  CHECK (preads_for (q, c, 0, 11 * sc) == 2,
         "subclusters 0-10: sc 10 is a separate pread");
  CHECK (preads_for (q, c, 2 * cs, 2 * cs) == 2,
         "cluster 3 has a hole at sc 16: two preads for cluster 3, one "
         "merged with cluster 2");

  /* Extents per subcluster over clusters 0-4 and 7. */
  for (unsigned i = 0; i < 2048; i++)
    want[i] = H | Z;
  for (unsigned i = 0; i < 32; i++) {
    if (alloc0 >> i & 1)
      want[i] = 0;
    else if (zero0 >> i & 1)
      want[i] = Z;                      /* zero, host cluster allocated */
    want[32 + i] = H | Z;               /* zero, no host cluster */
    want[64 + i] = 0;
    want[96 + i] = i == 16 ? H | Z : 0;
    want[128 + i] = 0;                  /* compressed */
  }
  check_extents (q, 0, 5 * cs, want, sc, "extl2 extents");
  check_extents (q, 7 * cs, img.vsize - 7 * cs, want, sc,
                 "extl2 extents past the invalid entries");
  {
    struct ext_list *l = calloc (1, sizeof *l);
    CHECK (qcow2_extents (q, 5 * cs, cs, false, collect, l) == -EIO,
           "extents over an invalid entry must be EIO");
    free (l);
  }

  qcow2_close (q);
  img_free (&img);
}

/* ------------------------------------------------------------------ */
/* The cache on its own, capacity 2. */

static void
test_cache_direct (void)
{
  const size_t slice = 512, nslices = 64;
  unsigned char *data = malloc (slice * nslices);
  struct counting_io *c;
  struct qcow2_cache *cache;
  struct qcow2_slice *s[4];
  uint64_t seed = 42;
  unsigned before;
  int r;

  for (size_t i = 0; i < slice * nslices; i++)
    data[i] = (unsigned char) (i / slice);
  c = counting_io_new (data, slice * nslices);
  cache = qcow2_cache_new (&c->io, slice, 2);
  CHECK (cache != NULL, "qcow2_cache_new");
  if (!cache)
    goto out;

#define GET(i, k)                                                       \
  do {                                                                  \
    r = qcow2_cache_get (cache, (uint64_t) (k) * slice, &s[i]);         \
    CHECK (r == 0, "get slice %u: %s", (unsigned) (k), strerror (-r));  \
    if (r == 0)                                                         \
      CHECK (s[i]->offset == (uint64_t) (k) * slice &&                  \
             s[i]->data[0] == (k) && s[i]->data[slice - 1] == (k),      \
             "slice %u has the wrong data", (unsigned) (k));            \
  } while (0)

  /* LRU: A B A C (evicts B) A (hit) B (miss). */
  before = atomic_load (&c->preads);
  GET (0, 1); qcow2_cache_put (cache, s[0]);
  GET (0, 2); qcow2_cache_put (cache, s[0]);
  GET (0, 1); qcow2_cache_put (cache, s[0]);
  CHECK (atomic_load (&c->preads) - before == 2, "A B A: two misses");
  GET (0, 3); qcow2_cache_put (cache, s[0]);
  GET (0, 1); qcow2_cache_put (cache, s[0]);
  CHECK (atomic_load (&c->preads) - before == 3,
         "C evicts B, the least recently used, not A");
  GET (0, 2); qcow2_cache_put (cache, s[0]);
  CHECK (atomic_load (&c->preads) - before == 4, "B was evicted");

  /* More pinned slices than the capacity: all stay valid. */
  GET (0, 10); GET (1, 11); GET (2, 12); GET (3, 13);
  for (int i = 0; i < 4; i++)
    CHECK (s[i]->data[7] == 10 + i, "pinned slice %d changed", i);
  for (int i = 0; i < 4; i++)
    qcow2_cache_put (cache, s[i]);

  /* Random touches. */
  for (int i = 0; i < 5000; i++) {
    unsigned k = (unsigned) (rnd (&seed) % nslices);
    GET (0, k);
    if (r == 0)
      qcow2_cache_put (cache, s[0]);
  }

  /* A failed load is reported, not cached, and retried. */
  before = atomic_load (&c->preads);
  r = qcow2_cache_get (cache, nslices * slice, &s[0]);
  CHECK (r == -EIO, "slice past the end: %d", r);
  r = qcow2_cache_get (cache, nslices * slice, &s[0]);
  CHECK (r == -EIO, "slice past the end, again: %d", r);
  CHECK (atomic_load (&c->preads) - before == 2,
         "a failed load must be retried");
  GET (0, 5);
  if (r == 0)
    qcow2_cache_put (cache, s[0]);
#undef GET

  qcow2_cache_free (cache);
 out:
  qcow2_io_close (&c->io);
  free (data);
}

/* 8 threads on a cache of capacity 2. */

struct cache_thread {
  struct qcow2_cache *cache;
  size_t slice, nslices;
  uint64_t seed;
  int errors;
};

static void *
cache_thread (void *p)
{
  struct cache_thread *t = p;

  for (int i = 0; i < 20000; i++) {
    unsigned k = (unsigned) (rnd (&t->seed) % t->nslices);
    struct qcow2_slice *s;
    if (qcow2_cache_get (t->cache, (uint64_t) k * t->slice, &s) != 0) {
      t->errors++;
      continue;
    }
    for (size_t j = 0; j < t->slice; j += 61)
      if (s->data[j] != k)
        t->errors++;
    qcow2_cache_put (t->cache, s);
  }
  return NULL;
}

static void
test_cache_threads (void)
{
  const size_t slice = 512, nslices = 16;
  unsigned char *data = malloc (slice * nslices);
  struct counting_io *c;
  struct cache_thread t[8];
  pthread_t tid[8];

  for (size_t i = 0; i < slice * nslices; i++)
    data[i] = (unsigned char) (i / slice);
  c = counting_io_new (data, slice * nslices);
  struct qcow2_cache *cache = qcow2_cache_new (&c->io, slice, 2);
  CHECK (cache != NULL, "qcow2_cache_new");
  if (cache) {
    for (int i = 0; i < 8; i++) {
      t[i] = (struct cache_thread) { cache, slice, nslices,
                                     0x1234567ull * (i + 1), 0 };
      pthread_create (&tid[i], NULL, cache_thread, &t[i]);
    }
    for (int i = 0; i < 8; i++) {
      pthread_join (tid[i], NULL);
      CHECK (t[i].errors == 0, "cache thread %d: %d errors", i, t[i].errors);
    }
    qcow2_cache_free (cache);
  }
  qcow2_io_close (&c->io);
  free (data);
}

/* ------------------------------------------------------------------ */
/* An image with far more L2 slices than the cache holds, read from one
 * thread and from 8.
 */

struct read_thread {
  struct qcow2_image *q;
  struct image *img;
  uint64_t seed;
  int errors;
};

static void *
read_thread (void *p)
{
  struct read_thread *t = p;
  unsigned char *b = malloc (64 << 10);

  for (int i = 0; i < 1500; i++) {
    uint64_t off = rnd (&t->seed) % t->img->vsize;
    uint64_t len = 1 + rnd (&t->seed) % (64 << 10);
    if (len > t->img->vsize - off)
      len = t->img->vsize - off;
    if (qcow2_read (t->q, b, len, off) != 0 ||
        memcmp (b, t->img->expect + off, len) != 0)
      t->errors++;
  }
  free (b);
  return NULL;
}

static void
test_small_cache (void)
{
  struct image img;
  struct counting_io *c;
  struct qcow2_image *q;
  const uint64_t cs = 512;
  uint64_t seed = 7;
  struct read_thread t[8];
  pthread_t tid[8];

  /* 8 MiB in 512-byte clusters: 256 L2 tables of one slice each, against
   * a cache of at most 64 slices (the engine's minimum).
   */
  img_init (&img, 9, 8 << 20, false);
  for (uint64_t g = 0; g < img.vsize; g += cs) {
    uint64_t k = rnd (&seed) % 8;
    if (k < 4)
      add_data (&img, g);
    else if (k == 4)
      set_l2 (&img, g, 1, 0);
    else if (k == 5 && g % (64 * cs) == 7 * cs)
      add_compressed (&img, g);
  }

  q = img_open (&img, &c, 1);
  if (!q) {
    img_free (&img);
    return;
  }
  check_read (q, &img, 0, img.vsize, "small cache: whole disk");
  check_random_reads (q, &img, img.vsize, 3000, 40000, 5, "small cache: random");
  /* Reading the whole disk twice reads every L2 slice twice: they do not
   * all fit.
   */
  {
    unsigned before = atomic_load (&c->preads);
    unsigned char *b = malloc (img.vsize);
    qcow2_read (q, b, img.vsize, 0);
    CHECK (atomic_load (&c->preads) - before > 256,
           "expected L2 slices to be re-read");
    free (b);
  }

  for (int i = 0; i < 8; i++) {
    t[i] = (struct read_thread) { q, &img, 0xabcdefull * (i + 1), 0 };
    pthread_create (&tid[i], NULL, read_thread, &t[i]);
  }
  for (int i = 0; i < 8; i++) {
    pthread_join (tid[i], NULL);
    CHECK (t[i].errors == 0, "reader thread %d: %d bad reads", i,
           t[i].errors);
  }

  qcow2_close (q);
  img_free (&img);
}

/* ------------------------------------------------------------------ */
/* Corrupt entries and headers, from memory. */

static void
test_errors (void)
{
  struct image img;
  struct qcow2_image *q;
  unsigned char b[4096];
  struct qcow2_open_options opts;

  img_init (&img, 12, 4 << 20, false);
  add_data (&img, 0);
  add_data (&img, 4096);
  set_l2 (&img, 8192, COPIED | 0x52a00, 0);             /* unaligned */
  set_l2 (&img, 12288, COPIED | (64ull << 30), 0);      /* past EOF */
  put_be64 (img.buf + img.l1_offset + 8, COPIED | 0x42a00);  /* L1[1] */
  q = img_open (&img, NULL, 0);
  if (q) {
    check_read (q, &img, 0, 8192, "errors: good clusters");
    CHECK (qcow2_read (q, b, 4096, 8192) == -EIO, "unaligned L2 entry");
    CHECK (strstr (last_error, "Cluster allocation offset 0x52a00 "
                   "unaligned") != NULL, "message: %s", last_error);
    CHECK (qcow2_read (q, b, 4096, 12288) == -EIO, "L2 entry past EOF");
    CHECK (qcow2_read (q, b, 4096, 2 << 20) == -EIO, "unaligned L1 entry");
    CHECK (strstr (last_error, "L2 table offset 0x42a00 unaligned") != NULL,
           "message: %s", last_error);
    CHECK (qcow2_read (q, b, 8192, 4096) == -EIO,
           "a read that reaches a bad entry fails as a whole");
    check_read (q, &img, 0, 8192, "errors: good clusters after EIO");
    qcow2_close (q);
  }

  /* Refused at open: the io is freed (leak checkers see it). */
  img.buf[0] ^= 1;
  qcow2_open_options_init (&opts);
  opts.follow_backing = false;
  CHECK (qcow2_open_io (qcow2_io_mem_new (img.buf, img.size), &opts, &q)
         == -EINVAL && q == NULL, "bad magic must be refused");
  CHECK (strstr (last_error, "Image is not in qcow2 format") != NULL,
         "message: %s", last_error);
  img.buf[0] ^= 1;
  put_be32 (img.buf + 36, 0xffffffff);                  /* l1_size */
  CHECK (qcow2_open_io (qcow2_io_mem_new (img.buf, img.size), &opts, &q)
         < 0 && q == NULL, "l1_size 0xffffffff must be refused");
  CHECK (qcow2_open_io (qcow2_io_mem_new (img.buf, 50), &opts, &q) < 0,
         "a 50-byte file must be refused");
  img_free (&img);
}

int
main (void)
{
  qcow2_set_error_handler (capture_error, NULL);
  test_standard ();
  test_extended_l2 ();
  test_cache_direct ();
  test_cache_threads ();
  test_small_cache ();
  test_errors ();
  if (failures) {
    fprintf (stderr, "%d failure(s)\n", failures);
    return 1;
  }
  printf ("test_core: all passed\n");
  return 0;
}
