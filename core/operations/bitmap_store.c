/* Persistent dirty bitmaps on disk: claiming them before the first write,
 * storing them at close and after management operations.
 *
 * Nothing already on disk is ever overwritten: a store writes every
 * bitmap's data clusters and table, then the directory, into newly
 * allocated clusters; makes them and their refcounts durable; then points
 * the header's bitmaps extension at the new directory in one write of the
 * header (as QEMU's update_ext_header_and_dir), syncs, and only then
 * drops the old directory, tables and data clusters (durable.c rules 1, 6
 * and 2).  The header copy (img->h) and each bitmap's table follow the
 * disk: they change only once the header write is durable.  A crash leaves
 * either the old directory or the new one, and leaks at worst.
 *
 * Claiming (before the first write, QEMU's qcow2_load_dirty_bitmaps on a
 * read-write open) stores the directory with in_use set on every bitmap
 * that was consistent, the same way.  From then on a crash leaves them
 * in_use: QEMU treats them as inconsistent, never trusts them for a
 * backup, and nothing else is damaged.  A clean close stores the bits
 * with in_use cleared.
 *
 * Data clusters that are all zeros are not written: their table entry is
 * 0, as QEMU's store_bitmap_data does.
 *
 * Runs with no request in flight (opening, closing, startup keys).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "io.h"
#include "util.h"

static int
cmp_u64 (const void *a, const void *b)
{
  uint64_t x = *(const uint64_t *) a, y = *(const uint64_t *) b;
  return x < y ? -1 : x > y;
}

struct cluster_list {
  uint64_t *v;
  size_t n, cap;
};

static int
list_add (struct cluster_list *l, uint64_t offset, uint64_t len,
          uint64_t cluster_size)
{
  for (uint64_t o = offset; o < offset + len; o += cluster_size) {
    if (l->n == l->cap) {
      size_t cap = l->cap ? l->cap * 2 : 64;
      uint64_t *v = realloc (l->v, cap * sizeof *v);
      if (!v)
        return -ENOMEM;
      l->v = v;
      l->cap = cap;
    }
    l->v[l->n++] = o;
  }
  return 0;
}

/* Every cluster a bitmap owns on disk: its table and its data. */
static int
bitmap_clusters (struct qcow2_image *img, const struct qcow2_bitmap *bm,
                 struct cluster_list *l)
{
  int r = list_add (l, bm->table_offset,
                    (uint64_t) bm->table_size * 8, img->cluster_size);

  for (uint32_t i = 0; r == 0 && bm->table && i < bm->table_size; i++) {
    uint64_t data = bm->table[i] & QCOW2_BME_TABLE_OFFSET_MASK;
    if (data)
      r = list_add (l, data, 1, img->cluster_size);
  }
  return r;
}

/* Before trusting the directory with frees: every cluster it names holds
 * nothing else (no other metadata, no other bitmap cluster) and has
 * refcount 1.  Then they join the overlap set, so that no guest write
 * lands on them either.  A bitmap cluster that is also guest data with a
 * wrong refcount of 1 is not caught here (that needs the walk of every
 * L2 table that check.c makes): like QEMU, we trust refcounts there.
 * Under the writer lock.
 */
static int
check_clusters (struct qcow2_image *img)
{
  struct qcow2_bitmaps *b = &img->bitmaps;
  struct cluster_list l = { 0 };
  int r;

  qcow2_writer_assert_locked (img);
  r = list_add (&l, img->h.bitmap_directory_offset,
                img->h.bitmap_directory_size, img->cluster_size);
  for (uint32_t i = 0; r == 0 && i < b->n; i++) {
    struct qcow2_bitmap *bm = &b->v[i];
    /* An inconsistent bitmap's table was never read: read it now, to
     * release its clusters if it is removed.  One that does not read
     * cleanly keeps its data clusters (they leak on removal).
     */
    if (bm->inconsistent && !bm->table) {
      char *saved = b->error;
      b->error = NULL;
      if (qcow2_bitmap_read_table (img, bm) == -ENOMEM)
        r = -ENOMEM;
      free (b->error);
      b->error = saved;
    }
    if (r == 0 && !range_exceeds (bm->table_offset,
                                  (uint64_t) bm->table_size * 8,
                                  img->file_size)) {
      r = bitmap_clusters (img, bm, &l);
      bm->verified = true;
    }
  }
  if (r == 0)
    qsort (l.v, l.n, sizeof *l.v, cmp_u64);
  for (size_t i = 0; r == 0 && i < l.n; i++) {
    uint64_t refcount = 1;
    unsigned kinds = qcow2_overlap_kinds (img, l.v[i], img->cluster_size);
    const char *why = NULL;

    if (i > 0 && l.v[i] == l.v[i - 1])
      why = "used twice";
    else if (kinds)
      why = "also other metadata";
    else if ((r = qcow2_refcount_get (img, l.v[i] >> img->cluster_bits,
                                      &refcount)) == 0 && refcount != 1)
      why = "not counted exactly once";
    if (why) {
      qcow2_error ("%s: bitmap cluster %#" PRIx64 " is %s: the bitmaps "
                   "are damaged; not writing the image (its bitmaps "
                   "would be lost)", img->filename, l.v[i], why);
      r = -EINVAL;
    }
  }
  for (size_t i = 0; r == 0 && i < l.n; i++)
    r = qcow2_overlap_add (img, l.v[i], img->cluster_size,
                           QCOW2_META_BITMAP);
  if (r == 0)
    b->dir_verified = true;
  free (l.v);
  return r;
}

/* Rewrite the header with the bitmaps extension describing (nb, size,
 * offset), or without it when nb is 0, and with `autoclear`, in one write
 * of the header cluster.  The other extensions keep their order; the
 * backing file name stays where it is unless the extensions grow over it,
 * then it moves right after them (as QEMU lays it out).
 */
static int
write_header (struct qcow2_image *img, uint32_t nb, uint64_t dir_size,
              uint64_t dir_offset, uint64_t autoclear)
{
  const uint64_t cs = img->cluster_size;
  uint64_t avail = min_u64 (cs, img->file_size);
  uint64_t backing = img->h.backing_file_offset;
  uint64_t backing_len = backing ? img->h.backing_file_size : 0;
  unsigned char *old, *buf, ext[QCOW2_EXT_DATA + QCOW2_EXT_BITMAPS_LENGTH];
  uint64_t off, pos, old_end, write_len, backing_at = backing;
  bool placed = false;
  int r;

  old = malloc (avail);
  buf = calloc (1, cs);
  if (!old || !buf) {
    r = -ENOMEM;
    goto out;
  }
  r = qcow2_io_pread (img->io, old, avail, 0);
  if (r < 0)
    goto out;
  put_be32 (ext + QCOW2_EXT_MAGIC, QCOW2_EXT_BITMAPS);
  put_be32 (ext + QCOW2_EXT_LENGTH, QCOW2_EXT_BITMAPS_LENGTH);
  put_be32 (ext + QCOW2_EXT_DATA + QCOW2_EXT_BITMAPS_NB, nb);
  put_be32 (ext + QCOW2_EXT_DATA + QCOW2_EXT_BITMAPS_RESERVED, 0);
  put_be64 (ext + QCOW2_EXT_DATA + QCOW2_EXT_BITMAPS_DIR_SIZE, dir_size);
  put_be64 (ext + QCOW2_EXT_DATA + QCOW2_EXT_BITMAPS_DIR_OFFSET, dir_offset);

  memcpy (buf, old, img->h.header_length);
  put_be64 (buf + QCOW2_HDR_AUTOCLEAR_FEATURES, autoclear);
  pos = img->h.header_length;
  for (off = img->h.header_length; off + 8 <= avail;) {
    uint32_t magic = get_be32 (old + off + QCOW2_EXT_MAGIC);
    uint64_t len = (get_be32 (old + off + QCOW2_EXT_LENGTH) + 7ull) & ~7ull;
    if (magic == QCOW2_EXT_END || off + 8 + len > avail)
      break;
    if (magic == QCOW2_EXT_BITMAPS) {
      if (nb && !placed) {
        if (pos + sizeof ext > cs) {
          pos = cs + 1;   /* reported below */
          break;
        }
        memcpy (buf + pos, ext, sizeof ext);
        pos += sizeof ext;
      }
      placed = true;
    }
    else {
      if (pos + 8 + len > cs) {
        pos = cs + 1;   /* reported below */
        break;
      }
      memcpy (buf + pos, old + off, 8 + len);
      pos += 8 + len;
    }
    off += 8 + len;
  }
  old_end = off + 8;
  if (nb && !placed && pos + sizeof ext <= cs)
    memcpy (buf + pos, ext, sizeof ext);
  if (nb && !placed)
    pos += sizeof ext;
  pos += 8;   /* the end marker: zeros */
  if (pos > cs || (backing && pos + backing_len > cs) ||
      (backing && backing + backing_len > avail)) {
    qcow2_error ("%s: the header extensions do not fit in the header "
                 "cluster", img->filename);
    r = -ENOSPC;
    goto out;
  }
  write_len = pos > old_end ? pos : old_end;
  if (backing) {
    uint64_t at = backing >= pos ? backing : pos;
    memcpy (buf + at, old + backing, backing_len);
    put_be64 (buf + QCOW2_HDR_BACKING_FILE_OFFSET, at);
    if (at + backing_len > write_len)
      write_len = at + backing_len;
    if (backing + backing_len > write_len)
      write_len = backing + backing_len;
    backing_at = at;
  }
  /* Rule 6: the directory and everything it reaches are durable
   * (store_locked synced them); the header switches in one write.
   */
  r = qcow2_overlap_check (img, 0, write_len, QCOW2_META_HEADER);
  if (r == 0)
    r = qcow2_meta_write_durable (img, QCOW2_RULE_HEADER_LAST, buf,
                                  write_len, 0);
  if (r == 0) {
    /* Memory follows disk. */
    img->h.backing_file_offset = backing_at;
    img->h.has_bitmaps_ext = nb > 0;
    img->h.nb_bitmaps = nb;
    img->h.bitmap_directory_size = dir_size;
    img->h.bitmap_directory_offset = dir_offset;
    img->h.autoclear_features = autoclear;
  }
 out:
  if (r < 0)
    qcow2_error ("%s: could not update the header: %s", img->filename,
                 strerror (-r));
  free (old);
  free (buf);
  return r;
}

/* New clusters for len bytes, entered as bitmap metadata. */
static int
alloc_bitmap (struct qcow2_image *img, uint64_t len, uint64_t *offset)
{
  uint64_t n = div_round_up (len, img->cluster_size);
  int r = qcow2_alloc_clusters (img, n, offset);

  if (r == 0)
    r = qcow2_overlap_add (img, *offset, n << img->cluster_bits,
                           QCOW2_META_BITMAP);
  return r;
}

/* Write bm's bits and table into new clusters; *table_out (host order)
 * and *table_offset describe them.
 */
static int
write_bitmap (struct qcow2_image *img, const struct qcow2_bitmap *bm,
              uint64_t **table_out, uint64_t *table_offset)
{
  const uint64_t cs = img->cluster_size, wpc = cs / 8;
  uint64_t nwords = div_round_up (bm->nbits, 64);
  uint32_t size = (uint32_t) div_round_up (div_round_up (bm->nbits, 8), cs);
  uint64_t *table = calloc (size, 8);
  unsigned char *buf = malloc (cs);
  int r = 0;

  if (!table || !buf) {
    r = -ENOMEM;
    goto out;
  }
  for (uint32_t i = 0; r == 0 && i < size; i++) {
    uint64_t first = i * wpc, n = min_u64 (wpc, nwords - first);
    bool zero = true;
    for (uint64_t k = 0; k < n && zero; k++)
      zero = bm->words[first + k] == 0;
    if (zero)
      continue;
    memset (buf, 0, cs);
    for (uint64_t k = 0; k < n; k++)
      for (unsigned j = 0; j < 8; j++)
        buf[k * 8 + j] = (unsigned char) (bm->words[first + k] >> (8 * j));
    r = alloc_bitmap (img, cs, &table[i]);
    /* Rule 6: durable before the header reaches it (store_locked). */
    if (r == 0)
      r = qcow2_meta_write (img, QCOW2_RULE_HEADER_LAST, buf, cs, table[i]);
  }
  if (r == 0)
    r = alloc_bitmap (img, (uint64_t) size * 8, table_offset);
  if (r == 0) {
    unsigned char *be = calloc (size, 8);
    if (!be)
      r = -ENOMEM;
    for (uint32_t i = 0; r == 0 && i < size; i++)
      put_be64 (be + i * 8, table[i]);
    if (r == 0)   /* rule 6, as the data */
      r = qcow2_meta_write (img, QCOW2_RULE_HEADER_LAST, be,
                            (uint64_t) size * 8, *table_offset);
    free (be);
  }
 out:
  free (buf);
  if (r < 0) {
    /* What was allocated leaks until the next check: never freed while
     * we are unsure it is unused.
     */
    free (table);
    return r;
  }
  *table_out = table;
  return 0;
}

/* Release a bitmap's old table and data (once nothing points at them). */
static int
free_bitmap (struct qcow2_image *img, const struct qcow2_bitmap *bm)
{
  int r = 0;

  if (!bm->table_offset || !bm->verified)
    return 0;   /* not ours to free: it leaks */
  for (uint32_t i = 0; r == 0 && bm->table && i < bm->table_size; i++) {
    uint64_t data = bm->table[i] & QCOW2_BME_TABLE_OFFSET_MASK;
    if (data)
      r = qcow2_free_later (img, data, img->cluster_size);
  }
  if (r == 0)
    r = qcow2_free_later (img, bm->table_offset,
                          (uint64_t) bm->table_size * 8);
  return r;
}

static uint64_t
dir_entry_bytes (const struct qcow2_bitmap *bm)
{
  return (QCOW2_BME_ENTRY_BYTES + strlen (bm->name) + 7) & ~7ull;
}

/* The directory, bitmap i's table at offsets[i] (sizes[i] entries), with
 * in_use set on consistent bitmaps unless `final`; inconsistent ones are
 * kept as they are.
 */
static int
write_directory (struct qcow2_image *img, const uint64_t *offsets,
                 const uint32_t *sizes, bool final, uint64_t *dir_offset,
                 uint64_t *dir_size)
{
  struct qcow2_bitmaps *b = &img->bitmaps;
  uint64_t size = 0, pos = 0;
  unsigned char *dir;
  int r;

  for (uint32_t i = 0; i < b->n; i++)
    size += dir_entry_bytes (&b->v[i]);
  dir = calloc (1, size);
  if (!dir)
    return -ENOMEM;
  for (uint32_t i = 0; i < b->n; i++) {
    const struct qcow2_bitmap *bm = &b->v[i];
    uint32_t flags = bm->flags;
    if (!bm->inconsistent)
      flags = (flags & QCOW2_BME_AUTO) | (final ? 0 : QCOW2_BME_IN_USE);
    put_be64 (dir + pos + QCOW2_BME_TABLE_OFFSET, offsets[i]);
    put_be32 (dir + pos + QCOW2_BME_TABLE_SIZE, sizes[i]);
    put_be32 (dir + pos + QCOW2_BME_FLAGS, flags);
    dir[pos + QCOW2_BME_TYPE] = 1;
    dir[pos + QCOW2_BME_GRANULARITY] = bm->granularity_bits;
    put_be16 (dir + pos + QCOW2_BME_NAME_SIZE, (uint16_t) strlen (bm->name));
    memcpy (dir + pos + QCOW2_BME_ENTRY_BYTES, bm->name, strlen (bm->name));
    pos += dir_entry_bytes (bm);
  }
  r = alloc_bitmap (img, size, dir_offset);
  if (r == 0)   /* rule 6: durable before the header points at it */
    r = qcow2_meta_write (img, QCOW2_RULE_HEADER_LAST, dir, size,
                          *dir_offset);
  *dir_size = size;
  free (dir);
  return r;
}

/* Does this store write bm anew?  A final store writes every consistent
 * bitmap's bits; the others (claiming, management operations) leave the
 * bits QEMU will ignore anyway, as in_use is set, and write only the
 * bitmaps that have no table yet.
 */
static bool
rewrites (const struct qcow2_bitmap *bm, bool final)
{
  return !bm->inconsistent && (final || bm->table_offset == 0);
}

static uint32_t
table_size_for (const struct qcow2_image *img, const struct qcow2_bitmap *bm)
{
  return (uint32_t) div_round_up (div_round_up (bm->nbits, 8),
                                  img->cluster_size);
}

/* Store the bitmaps, with the header's autoclear bits set to `autoclear`
 * (the bitmaps bit as the bitmaps say).
 */
static int
store_locked (struct qcow2_image *img, bool final, uint64_t autoclear)
{
  struct qcow2_bitmaps *b = &img->bitmaps;
  uint64_t **tables = calloc (b->n + 1, sizeof *tables);
  uint64_t *offsets = calloc (b->n + 1, sizeof *offsets);
  uint32_t *sizes = calloc (b->n + 1, sizeof *sizes);
  uint64_t dir_offset = 0, dir_size = 0;
  uint64_t old_dir = img->h.has_bitmaps_ext ? img->h.bitmap_directory_offset
                                            : 0;
  uint64_t old_dir_size = img->h.bitmap_directory_size;
  int r = 0;

  qcow2_writer_assert_locked (img);
  if (!tables || !offsets || !sizes) {
    r = -ENOMEM;
    goto out;
  }
  for (uint32_t i = 0; r == 0 && i < b->n; i++) {
    const struct qcow2_bitmap *bm = &b->v[i];
    offsets[i] = bm->table_offset;
    sizes[i] = bm->table_size;
    if (rewrites (bm, final)) {
      r = write_bitmap (img, bm, &tables[i], &offsets[i]);
      sizes[i] = table_size_for (img, bm);
    }
  }
  if (r == 0 && b->n)
    r = write_directory (img, offsets, sizes, final, &dir_offset,
                         &dir_size);
  /* The new clusters and their refcounts, durable before the header
   * points at them.
   */
  if (r == 0)
    r = qcow2_sync_metadata (img);
  if (r == 0)
    r = write_header (img, b->n, dir_size, dir_offset,
                      (autoclear & ~QCOW2_AUTOCLEAR_BITMAPS) |
                      (b->n ? QCOW2_AUTOCLEAR_BITMAPS : 0));
  if (r < 0)
    goto out;

  /* The header points at the new directory: drop the old clusters. */
  if (old_dir && b->dir_verified)
    r = qcow2_free_later (img, old_dir, old_dir_size);
  b->dir_verified = true;
  for (uint32_t i = 0; r == 0 && i < b->n; i++) {
    struct qcow2_bitmap *bm = &b->v[i];
    if (!bm->inconsistent)
      bm->flags = (bm->flags & QCOW2_BME_AUTO) |
                  (final ? 0 : QCOW2_BME_IN_USE);
    if (!rewrites (bm, final))
      continue;
    r = free_bitmap (img, bm);
    free (bm->table);
    bm->table = tables[i];
    tables[i] = NULL;
    bm->table_offset = offsets[i];
    bm->table_size = sizes[i];
    bm->verified = true;
  }
  for (size_t i = 0; r == 0 && i < b->nr_dropped; i++) {
    r = free_bitmap (img, &b->dropped[i]);
    qcow2_bitmap_free_one (&b->dropped[i]);
  }
  if (r == 0)
    b->nr_dropped = 0;
  /* Twice: the second writes the refcounts the first dropped. */
  if (r == 0)
    r = qcow2_sync_metadata (img);
  if (r == 0)
    r = qcow2_sync_metadata (img);
  b->changed = false;

 out:
  for (uint32_t i = 0; tables && i < b->n; i++)
    free (tables[i]);
  free (tables);
  free (offsets);
  free (sizes);
  return r;
}

int
qcow2_bitmaps_store (struct qcow2_image *img, bool final)
{
  int r;

  if (!img->w || (!img->bitmaps.claimed && !img->bitmaps.changed))
    return 0;
  if (qcow2_writer_state (img) == QCOW2_WRITER_BROKEN)
    return -EIO;   /* in_use stays: QEMU will not trust the bitmaps */
  qcow2_writer_lock (img);
  r = store_locked (img, final, img->h.autoclear_features);
  qcow2_writer_unlock (img);
  if (r < 0)
    qcow2_error ("%s: could not store the persistent bitmaps: %s",
                 img->filename, strerror (-r));
  else
    img->bitmaps.claimed = !final;
  return r;
}

int
qcow2_bitmaps_claim (struct qcow2_image *img, uint64_t autoclear)
{
  struct qcow2_bitmaps *b = &img->bitmaps;
  int r;

  if (b->error) {
    qcow2_error ("%s: %s: the image's bitmaps are unusable; not writing "
                 "the image (its bitmaps would be lost)", img->filename,
                 b->error);
    return -EINVAL;
  }
  qcow2_writer_lock (img);
  r = check_clusters (img);
  /* img->h changes with the header write (memory follows disk). */
  if (r == 0)
    r = store_locked (img, false, autoclear);
  qcow2_writer_unlock (img);
  if (r == 0)
    b->claimed = true;
  return r;
}
