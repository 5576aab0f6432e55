/* Persistent dirty bitmaps in memory: loading, marking, management.
 *
 * The image's bitmaps (docs/interop/qcow2.rst "Bitmaps") are read when
 * the top image opens, with the checks of QEMU's bitmap_list_load and
 * load_bitmap (block/qcow2-bitmap.c).  A directory QEMU would refuse
 * leaves the image readable, never writable: writing would either lose
 * the bitmaps or trust pointers we cannot trust.
 *
 * Bitmaps flagged in_use when we open the image were left so by a writer
 * that died or still runs: they are inconsistent, and are kept exactly as
 * they are (QEMU refuses to use them too).  The others are loaded; from
 * the first write on, every write, zero and trim sets the bits of the
 * granules it touches in each enabled ("auto") bitmap.  Bits only ever go
 * from 0 to 1 while requests run, so marking needs no lock: a word is read
 * first (a dirty granule costs one load) and set with an atomic OR.
 *
 * In memory, bit i (granule i, guest bytes [i << g, (i + 1) << g)) is bit
 * i % 64 of word i / 64: little-endian words are the on-disk bitmap data.
 * What reaches the disk, and when, is bitmap_store.c's business.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "io.h"
#include "util.h"

/* Memory for the bits of all bitmaps of an image.  QEMU bounds each
 * bitmap (512 MiB) but not their number: a hostile directory of 65535
 * maximal bitmaps must not exhaust memory.
 */
#define QCOW2_BITMAPS_MAX_MEMORY (1u << 30)

/* Walk the set (or clear) bits: the first granule at or after `from`
 * whose bit is `dirty`, or nbits if none.
 */
static uint64_t
next_with (const struct qcow2_bitmap *bm, uint64_t from, bool dirty)
{
  while (from < bm->nbits) {
    uint64_t w = __atomic_load_n (&bm->words[from / 64], __ATOMIC_ACQUIRE);
    if (!dirty)
      w = ~w;
    w &= ~0ull << (from % 64);
    if (w)
      return min_u64 (bm->nbits, align_down (from, 64) +
                                 (uint64_t) __builtin_ctzll (w));
    from = align_down (from, 64) + 64;
  }
  return bm->nbits;
}

/* Set bits [a, b] (inclusive). */
static void
set_bits (uint64_t *words, uint64_t a, uint64_t b)
{
  uint64_t wa = a / 64, wb = b / 64;

  for (uint64_t i = wa; i <= wb; i++) {
    uint64_t mask = ~0ull;
    if (i == wa)
      mask &= ~0ull << (a % 64);
    if (i == wb)
      mask &= ~0ull >> (63 - b % 64);
    if ((__atomic_load_n (&words[i], __ATOMIC_RELAXED) & mask) != mask)
      __atomic_fetch_or (&words[i], mask, __ATOMIC_RELEASE);
  }
}

static uint64_t
bits_for (uint64_t disk_size, uint8_t granularity_bits)
{
  return div_round_up (disk_size, 1ull << granularity_bits);
}

/* Words of memory for nbits bits, never 0 (calloc of 0 may fail). */
static uint64_t *
new_words (uint64_t nbits)
{
  return calloc (div_round_up (nbits, 64) + 1, sizeof (uint64_t));
}

void
qcow2_bitmaps_mark_range (struct qcow2_image *img, uint64_t offset,
                          uint64_t len)
{
  struct qcow2_bitmaps *b = &img->bitmaps;

  if (len == 0 || offset >= img->h.size)
    return;
  len = min_u64 (len, img->h.size - offset);
  for (uint32_t i = 0; i < b->nb_enabled; i++) {
    struct qcow2_bitmap *bm = b->enabled[i];
    set_bits (bm->words, offset >> bm->granularity_bits,
              (offset + len - 1) >> bm->granularity_bits);
  }
}

void
qcow2_bitmaps_mark_all (struct qcow2_image *img)
{
  qcow2_bitmaps_mark_range (img, 0, img->h.size);
}

/* The hot path walks only the enabled bitmaps: rebuild their list after
 * any management operation (no request runs meanwhile).
 */
static int
refresh_enabled (struct qcow2_bitmaps *b)
{
  struct qcow2_bitmap **e = NULL;
  uint32_t n = 0;

  if (b->n) {
    e = malloc (b->n * sizeof *e);
    if (!e)
      return -ENOMEM;
  }
  for (uint32_t i = 0; i < b->n; i++)
    if (!b->v[i].inconsistent && (b->v[i].flags & QCOW2_BME_AUTO))
      e[n++] = &b->v[i];
  free (b->enabled);
  b->enabled = e;
  b->nb_enabled = n;
  return 0;
}

void
qcow2_bitmap_free_one (struct qcow2_bitmap *bm)
{
  free (bm->name);
  free (bm->table);
  free (bm->words);
  memset (bm, 0, sizeof *bm);
}

void
qcow2_bitmaps_free (struct qcow2_image *img)
{
  struct qcow2_bitmaps *b = &img->bitmaps;

  for (uint32_t i = 0; i < b->n; i++)
    qcow2_bitmap_free_one (&b->v[i]);
  for (size_t i = 0; i < b->nr_dropped; i++)
    qcow2_bitmap_free_one (&b->dropped[i]);
  free (b->v);
  free (b->dropped);
  free (b->enabled);
  free (b->error);
  memset (b, 0, sizeof *b);
}

/* A directory or table we will not use: remember why, in one line. */
static int
broken (struct qcow2_image *img, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));

static int
broken (struct qcow2_image *img, const char *fmt, ...)
{
  char buf[512];
  va_list ap;

  va_start (ap, fmt);
  vsnprintf (buf, sizeof buf, fmt, ap);
  va_end (ap);
  free (img->bitmaps.error);
  img->bitmaps.error = strdup (buf);
  return -EINVAL;
}

/* A bitmap table entry: QEMU's check_table_entry, plus "inside the file". */
static bool
table_entry_ok (const struct qcow2_image *img, uint64_t entry)
{
  uint64_t offset = entry & QCOW2_BME_TABLE_OFFSET_MASK;

  if (entry & QCOW2_BME_TABLE_RESERVED_MASK)
    return false;
  if (offset == 0)
    return true;
  return !(entry & QCOW2_BME_TABLE_ALL_ONES) &&
         is_aligned (offset, img->cluster_size) && offset < img->file_size;
}

/* Read a bitmap's table (host order) into bm->table, checking entries. */
int
qcow2_bitmap_read_table (struct qcow2_image *img, struct qcow2_bitmap *bm)
{
  uint64_t bytes = (uint64_t) bm->table_size * 8;
  uint64_t *t;
  int r;

  if (range_exceeds (bm->table_offset, bytes, img->file_size))
    return broken (img, "bitmap '%s': table at %#" PRIx64 " (%" PRIu32
                   " entries) lies past the end of the file", bm->name,
                   bm->table_offset, bm->table_size);
  t = malloc (bytes);
  if (!t)
    return -ENOMEM;
  r = qcow2_io_pread (img->io, t, bytes, bm->table_offset);
  if (r < 0) {
    free (t);
    return broken (img, "bitmap '%s': could not read its table: %s",
                   bm->name, strerror (-r));
  }
  for (uint32_t i = 0; i < bm->table_size; i++) {
    t[i] = get_be64 (&t[i]);
    if (!table_entry_ok (img, t[i])) {
      uint64_t e = t[i];
      free (t);
      return broken (img, "bitmap '%s': invalid table entry %" PRIu32
                     ": %#" PRIx64, bm->name, i, e);
    }
  }
  bm->table = t;
  return 0;
}

/* Load a consistent bitmap's bits (QEMU's load_bitmap_data). */
static int
load_data (struct qcow2_image *img, struct qcow2_bitmap *bm)
{
  const uint64_t cs = img->cluster_size;
  const uint64_t words_per_cluster = cs / 8;
  uint64_t nwords = div_round_up (bm->nbits, 64);
  unsigned char *buf;
  int r;

  bm->words = new_words (bm->nbits);
  if (!bm->words)
    return -ENOMEM;
  r = qcow2_bitmap_read_table (img, bm);
  if (r < 0)
    return r;
  buf = malloc (cs);
  if (!buf)
    return -ENOMEM;
  for (uint32_t i = 0; r == 0 && i < bm->table_size; i++) {
    uint64_t first = i * words_per_cluster;
    uint64_t n = min_u64 (words_per_cluster, nwords - first);
    uint64_t data = bm->table[i] & QCOW2_BME_TABLE_OFFSET_MASK;

    if (data == 0) {
      if (bm->table[i] & QCOW2_BME_TABLE_ALL_ONES)
        memset (&bm->words[first], 0xff, n * 8);
      continue;
    }
    r = qcow2_io_pread (img->io, buf, min_u64 (cs, img->file_size - data),
                        data);
    if (r < 0) {
      r = broken (img, "bitmap '%s': could not read its data at %#" PRIx64
                  ": %s", bm->name, data, strerror (-r));
      break;
    }
    if (img->file_size - data < cs)
      memset (buf + (img->file_size - data), 0, cs - (img->file_size - data));
    for (uint64_t k = 0; k < n; k++)
      bm->words[first + k] = get_le64 (buf + k * 8);
  }
  free (buf);
  /* Bits past the end of the disk are not granules: keep them 0. */
  if (r == 0 && bm->nbits % 64)
    bm->words[nwords - 1] &= ~0ull >> (64 - bm->nbits % 64);
  return r;
}

/* One directory entry, QEMU's check_dir_entry; *entry_len is its size. */
static int
parse_entry (struct qcow2_image *img, const unsigned char *e, uint64_t avail,
             struct qcow2_bitmap *bm, uint64_t *entry_len)
{
  uint32_t extra, flags;
  uint16_t name_size;
  uint64_t phys;

  if (avail < QCOW2_BME_ENTRY_BYTES)
    return broken (img, "bitmap directory is truncated");
  bm->table_offset = get_be64 (e + QCOW2_BME_TABLE_OFFSET);
  bm->table_size = get_be32 (e + QCOW2_BME_TABLE_SIZE);
  flags = get_be32 (e + QCOW2_BME_FLAGS);
  bm->granularity_bits = e[QCOW2_BME_GRANULARITY];
  name_size = get_be16 (e + QCOW2_BME_NAME_SIZE);
  extra = get_be32 (e + QCOW2_BME_EXTRA_DATA_SIZE);
  *entry_len = (QCOW2_BME_ENTRY_BYTES + (uint64_t) extra + name_size + 7) &
               ~7ull;
  if (*entry_len > avail)
    return broken (img, "bitmap directory is truncated");
  if (extra != 0)
    return broken (img, "bitmap extra data is not supported");
  if (name_size == 0 || name_size > QCOW2_BME_MAX_NAME)
    return broken (img, "bitmap name size %" PRIu16 " is invalid",
                   name_size);
  if (memchr (e + QCOW2_BME_ENTRY_BYTES, 0, name_size))
    return broken (img, "a bitmap name contains a NUL byte");
  bm->name = strndup ((const char *) e + QCOW2_BME_ENTRY_BYTES, name_size);
  if (!bm->name)
    return -ENOMEM;
  bm->flags = flags;
  bm->inconsistent = flags & QCOW2_BME_IN_USE;
  phys = (uint64_t) bm->table_size * img->cluster_size;
  if (e[QCOW2_BME_TYPE] != 1 || bm->table_size == 0 || bm->table_offset == 0 ||
      !is_aligned (bm->table_offset, img->cluster_size) ||
      bm->table_size > QCOW2_BME_MAX_TABLE_SIZE ||
      bm->granularity_bits > QCOW2_BME_MAX_GRANULARITY_BITS ||
      bm->granularity_bits < QCOW2_BME_MIN_GRANULARITY_BITS ||
      (flags & ~(QCOW2_BME_IN_USE | QCOW2_BME_AUTO)) ||
      phys > QCOW2_BME_MAX_PHYS_SIZE ||
      (!bm->inconsistent &&
       img->h.size > ((phys * 8) << bm->granularity_bits)))
    return broken (img, "bitmap '%s' doesn't satisfy the constraints "
                   "(table at %#" PRIx64 ", %" PRIu32 " entries, flags %#"
                   PRIx32 ", type %u, granularity bits %u)", bm->name,
                   bm->table_offset, bm->table_size, flags, e[QCOW2_BME_TYPE],
                   bm->granularity_bits);
  bm->nbits = bits_for (img->h.size, bm->granularity_bits);
  if (!bm->inconsistent &&
      bm->table_size != div_round_up (div_round_up (bm->nbits, 8),
                                      img->cluster_size))
    return broken (img, "bitmap '%s': table has %" PRIu32 " entries, its "
                   "size needs %" PRIu64, bm->name, bm->table_size,
                   div_round_up (div_round_up (bm->nbits, 8),
                                 img->cluster_size));
  return 0;
}

static int
load_directory (struct qcow2_image *img)
{
  struct qcow2_bitmaps *b = &img->bitmaps;
  uint64_t size = img->h.bitmap_directory_size;
  uint64_t offset = img->h.bitmap_directory_offset;
  uint64_t pos = 0, memory = 0;
  unsigned char *dir;
  int r = 0;

  if (size == 0 || offset == 0 || range_exceeds (offset, size,
                                                 img->file_size))
    return broken (img, "bitmap directory at %#" PRIx64 " (%" PRIu64
                   " bytes) is not inside the file", offset, size);
  b->v = calloc (img->h.nb_bitmaps, sizeof *b->v);
  dir = malloc (size);
  if (!b->v || !dir) {
    free (dir);
    return -ENOMEM;
  }
  r = qcow2_io_pread (img->io, dir, size, offset);
  if (r < 0)
    r = broken (img, "could not read the bitmap directory: %s",
                strerror (-r));
  while (r == 0 && pos < size) {
    struct qcow2_bitmap *bm;
    uint64_t len = 0;

    if (b->n == img->h.nb_bitmaps) {
      r = broken (img, "More bitmaps found than specified in header "
                  "extension");
      break;
    }
    bm = &b->v[b->n++];
    r = parse_entry (img, dir + pos, size - pos, bm, &len);
    for (uint32_t i = 0; r == 0 && i + 1 < b->n; i++)
      if (strcmp (b->v[i].name, bm->name) == 0)
        r = broken (img, "two bitmaps are named '%s'", bm->name);
    if (r == 0 && !bm->inconsistent) {
      memory += div_round_up (bm->nbits, 8);
      if (memory > QCOW2_BITMAPS_MAX_MEMORY)
        r = broken (img, "the bitmaps need more than %u MiB of memory",
                    QCOW2_BITMAPS_MAX_MEMORY >> 20);
      else
        r = load_data (img, bm);
    }
    pos += len;
  }
  if (r == 0 && b->n != img->h.nb_bitmaps)
    r = broken (img, "Less bitmaps found than specified in header "
                "extension");
  free (dir);
  return r;
}

int
qcow2_bitmaps_load (struct qcow2_image *img)
{
  int r;

  if (!img->h.has_bitmaps_ext)
    return 0;
  r = load_directory (img);
  if (r == 0)
    r = refresh_enabled (&img->bitmaps);
  if (r == -EINVAL) {
    /* Reads do not need bitmaps: serve the image, refuse to write it. */
    for (uint32_t i = 0; i < img->bitmaps.n; i++)
      qcow2_bitmap_free_one (&img->bitmaps.v[i]);
    img->bitmaps.n = 0;
    return 0;
  }
  return r;
}

/* Public API: listing and management. */

uint32_t
qcow2_bitmap_count (const struct qcow2_image *img)
{
  return img->bitmaps.n;
}

void
qcow2_bitmap_get_info (const struct qcow2_image *img, uint32_t i,
                       struct qcow2_bitmap_info *info)
{
  const struct qcow2_bitmap *bm = &img->bitmaps.v[i];

  info->name = bm->name;
  info->granularity = 1u << bm->granularity_bits;
  info->enabled = bm->flags & QCOW2_BME_AUTO;
  info->inconsistent = bm->inconsistent;
  info->dirty_bytes = 0;
  if (!bm->inconsistent)
    for (uint64_t g = next_with (bm, 0, true); g < bm->nbits;) {
      uint64_t end = next_with (bm, g, false);
      info->dirty_bytes += min_u64 ((end - g) << bm->granularity_bits,
                                    img->h.size - (g << bm->granularity_bits));
      g = next_with (bm, end, true);
    }
}

const char *
qcow2_bitmaps_error (const struct qcow2_image *img)
{
  return img->bitmaps.error;
}

int64_t
qcow2_bitmap_find (const struct qcow2_image *img, const char *name)
{
  for (uint32_t i = 0; i < img->bitmaps.n; i++)
    if (strcmp (img->bitmaps.v[i].name, name) == 0)
      return i;
  return -ENOENT;
}

static int64_t
lookup (struct qcow2_image *img, const char *name, bool need_consistent)
{
  int64_t i = qcow2_bitmap_find (img, name);

  if (i < 0) {
    qcow2_error ("%s: no bitmap named '%s'", img->filename, name);
    return i;
  }
  if (need_consistent && img->bitmaps.v[i].inconsistent) {
    qcow2_error ("%s: bitmap '%s' is inconsistent (in use or left by a "
                 "crash) and cannot be used", img->filename, name);
    return -EBUSY;
  }
  return i;
}

/* Management operations change the image: writing must be enabled, and
 * the change is stored (bitmap_store.c) before they return.
 */
static int
check_manage (struct qcow2_image *img)
{
  return qcow2_writer_require (img, "changing bitmaps");
}

static int
commit (struct qcow2_image *img)
{
  int r = refresh_enabled (&img->bitmaps);

  img->bitmaps.changed = true;
  if (r == 0)
    r = qcow2_bitmaps_store (img, false);
  return r;
}

/* QEMU's bdrv_get_default_bitmap_granularity for qcow2. */
static uint32_t
default_granularity (const struct qcow2_image *img)
{
  uint64_t g = img->cluster_size;

  if (g < 4096)
    g = 4096;
  if (g > 65536)
    g = 65536;
  return (uint32_t) g;
}

int
qcow2_bitmap_add (struct qcow2_image *img, const char *name,
                  uint32_t granularity)
{
  struct qcow2_bitmaps *b = &img->bitmaps;
  struct qcow2_bitmap bm = { 0 }, *v;
  size_t name_len = strlen (name);
  uint64_t dir_bytes = 0, bytes;
  int r;

  if ((r = check_manage (img)) < 0)
    return r;
  if (img->h.version < 3) {
    qcow2_error ("%s: Cannot store dirty bitmaps in qcow2 v2 files",
                 img->filename);
    return -ENOTSUP;
  }
  if (img->h.size == 0) {
    qcow2_error ("%s: the disk is empty: a bitmap would have no bits",
                 img->filename);
    return -EINVAL;
  }
  if (granularity == 0)
    granularity = default_granularity (img);
  if (granularity & (granularity - 1) ||
      granularity < (1u << QCOW2_BME_MIN_GRANULARITY_BITS) ||
      granularity > (1u << QCOW2_BME_MAX_GRANULARITY_BITS)) {
    qcow2_error ("%s: bitmap granularity %" PRIu32 " must be a power of 2 "
                 "from 512 to 2G", img->filename, granularity);
    return -EINVAL;
  }
  if (name_len == 0 || name_len > QCOW2_BME_MAX_NAME) {
    qcow2_error ("%s: bitmap names have 1 to %u bytes", img->filename,
                 QCOW2_BME_MAX_NAME);
    return -EINVAL;
  }
  if (qcow2_bitmap_find (img, name) >= 0) {
    qcow2_error ("%s: Bitmap already exists: %s", img->filename, name);
    return -EEXIST;
  }
  bm.granularity_bits = (uint8_t) __builtin_ctz (granularity);
  bm.nbits = bits_for (img->h.size, bm.granularity_bits);
  bytes = div_round_up (bm.nbits, 8);
  if (bytes > QCOW2_BME_MAX_PHYS_SIZE ||
      bytes > (uint64_t) QCOW2_BME_MAX_TABLE_SIZE * img->cluster_size) {
    qcow2_error ("%s: bitmap '%s': Too much space will be occupied by the "
                 "bitmap. Use larger granularity", img->filename, name);
    return -EINVAL;
  }
  for (uint32_t i = 0; i < b->n; i++)
    dir_bytes += (QCOW2_BME_ENTRY_BYTES + strlen (b->v[i].name) + 7) & ~7ull;
  dir_bytes += (QCOW2_BME_ENTRY_BYTES + name_len + 7) & ~7ull;
  if (b->n + 1 > QCOW2_MAX_BITMAPS || dir_bytes > QCOW2_MAX_BITMAP_DIR) {
    qcow2_error ("%s: Too many persistent bitmaps", img->filename);
    return -ENOSPC;
  }
  bm.name = strdup (name);
  bm.words = new_words (bm.nbits);
  v = realloc (b->v, (b->n + 1) * sizeof *v);
  if (v)
    b->v = v;
  if (!bm.name || !bm.words || !v) {
    qcow2_bitmap_free_one (&bm);
    return -ENOMEM;
  }
  bm.flags = QCOW2_BME_AUTO;
  b->v[b->n++] = bm;
  return commit (img);
}

int
qcow2_bitmap_remove (struct qcow2_image *img, const char *name)
{
  struct qcow2_bitmaps *b = &img->bitmaps;
  struct qcow2_bitmap *d;
  int64_t i;
  int r;

  if ((r = check_manage (img)) < 0)
    return r;
  if ((i = lookup (img, name, false)) < 0)
    return (int) i;
  /* Its clusters are released once the directory without it is on disk. */
  d = realloc (b->dropped, (b->nr_dropped + 1) * sizeof *d);
  if (!d)
    return -ENOMEM;
  b->dropped = d;
  b->dropped[b->nr_dropped++] = b->v[i];
  memmove (&b->v[i], &b->v[i + 1], (b->n - i - 1) * sizeof *b->v);
  b->n--;
  return commit (img);
}

/* The consistent bitmap `name`, for a management operation. */
static int
manageable (struct qcow2_image *img, const char *name,
            struct qcow2_bitmap **bm)
{
  int64_t i;
  int r;

  if ((r = check_manage (img)) < 0)
    return r;
  if ((i = lookup (img, name, true)) < 0)
    return (int) i;
  *bm = &img->bitmaps.v[i];
  return 0;
}

int
qcow2_bitmap_clear (struct qcow2_image *img, const char *name)
{
  struct qcow2_bitmap *bm = NULL;
  int r = manageable (img, name, &bm);

  if (r < 0)
    return r;
  memset (bm->words, 0, div_round_up (bm->nbits, 64) * 8);
  return commit (img);
}

int
qcow2_bitmap_set_enabled (struct qcow2_image *img, const char *name,
                          bool enabled)
{
  struct qcow2_bitmap *bm = NULL;
  int r = manageable (img, name, &bm);

  if (r < 0)
    return r;
  bm->flags = (bm->flags & ~QCOW2_BME_AUTO) | (enabled ? QCOW2_BME_AUTO : 0);
  return commit (img);
}

/* A grown disk: the new granules are clean, as QEMU's bitmaps grow
 * (hbitmap_truncate).  Inconsistent bitmaps are not touched (QEMU does
 * not store them either).
 */
int
qcow2_bitmaps_resize_check (struct qcow2_image *img, uint64_t new_size)
{
  const struct qcow2_bitmaps *b = &img->bitmaps;

  for (uint32_t i = 0; i < b->n; i++) {
    const struct qcow2_bitmap *bm = &b->v[i];
    uint64_t bytes = div_round_up (bits_for (new_size, bm->granularity_bits),
                                   8);
    if (!bm->inconsistent &&
        (bytes > QCOW2_BME_MAX_PHYS_SIZE ||
         bytes > (uint64_t) QCOW2_BME_MAX_TABLE_SIZE * img->cluster_size)) {
      qcow2_error ("%s: bitmap '%s' would be too large for %" PRIu64
                   " bytes: remove it first", img->filename, bm->name,
                   new_size);
      return -EFBIG;
    }
  }
  return 0;
}

int
qcow2_bitmaps_resize (struct qcow2_image *img, uint64_t new_size)
{
  struct qcow2_bitmaps *b = &img->bitmaps;
  int r = qcow2_bitmaps_resize_check (img, new_size);

  for (uint32_t i = 0; r == 0 && i < b->n; i++) {
    struct qcow2_bitmap *bm = &b->v[i];
    uint64_t nbits = bits_for (new_size, bm->granularity_bits);
    uint64_t *words;

    if (bm->inconsistent || nbits == bm->nbits)
      continue;
    words = new_words (nbits);
    if (!words)
      return -ENOMEM;
    memcpy (words, bm->words,
            min_u64 (div_round_up (nbits, 64), div_round_up (bm->nbits, 64))
            * 8);
    if (nbits < bm->nbits) {
      uint64_t nwords = div_round_up (nbits, 64);
      memset (&words[nwords], 0, 8);
      if (nbits % 64)
        words[nwords - 1] &= ~0ull >> (64 - nbits % 64);
    }
    free (bm->words);
    bm->words = words;
    bm->nbits = nbits;
  }
  if (r == 0 && b->n)
    b->changed = true;
  return r;
}

int
qcow2_bitmap_extents (struct qcow2_image *img, uint32_t i, uint64_t offset,
                      uint64_t len, bool one, qcow2_extent_fn fn,
                      void *opaque)
{
  const struct qcow2_bitmap *bm;
  uint64_t end = offset + len;
  unsigned count = 0;

  if (i >= img->bitmaps.n || range_exceeds (offset, len, img->h.size)) {
    qcow2_error ("bitmap extents: bad request");
    return -EINVAL;
  }
  bm = &img->bitmaps.v[i];
  if (bm->inconsistent) {
    qcow2_error ("%s: bitmap '%s' is inconsistent", img->filename, bm->name);
    return -EIO;
  }
  while (offset < end) {
    uint64_t g = offset >> bm->granularity_bits;
    bool dirty = __atomic_load_n (&bm->words[g / 64], __ATOMIC_ACQUIRE) >>
                 (g % 64) & 1;
    uint64_t next = next_with (bm, g, !dirty) << bm->granularity_bits;
    uint64_t stop = min_u64 (next, end);

    if (fn (opaque, offset, stop - offset, dirty ? 0 : QCOW2_EXTENT_HOLE) < 0)
      return -EIO;
    offset = stop;
    /* Enough for one reply: clients ask again for the rest. */
    if (one || ++count >= 65536)
      break;
  }
  return 0;
}
