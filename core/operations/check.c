/* Consistency check and repair of refcounts and COPIED flags, with the
 * classes `qemu-img check` uses.
 *
 * The check counts every reference an image makes (header, L1 and L2
 * tables, data and compressed clusters of the active layer and of every
 * snapshot, the snapshot table, the refcount table and blocks, the LUKS
 * header, bitmaps) into an in-memory refcount table, then compares it with
 * the stored refcounts:
 *   stored > counted  is a leak: space wasted, no harm to data;
 *   stored < counted  is a corruption: a cluster in use could be handed
 *                     out again and overwritten.
 * Then the COPIED flags of the active L1 and L2 tables must say exactly
 * "refcount is 1".  Repair sets stored refcounts to the counted ones and
 * fixes the flags.
 *
 * This is how a dirty image (lazy refcounts, or a crash while they were
 * deferred) is made consistent before writing, as QEMU does.  Runs before
 * the image serves requests (no concurrent writers).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "io.h"
#include "l2.h"
#include "util.h"

struct check {
  struct qcow2_image *img;
  struct qcow2_check_result *res;
  uint32_t *counts;       /* the in-memory refcount table */
  uint64_t nclusters;
};

/* Count one reference to every cluster overlapping [offset, offset+len). */
static void
count (struct check *x, uint64_t offset, uint64_t len, const char *what)
{
  if (len == 0)
    return;
  uint64_t first = offset >> x->img->cluster_bits;
  uint64_t last = (offset + len - 1) >> x->img->cluster_bits;

  if (offset + len < offset || last >= x->nclusters) {
    qcow2_error ("%s: %s at %#" PRIx64 " lies past the end of the file",
                 x->img->filename, what, offset);
    x->res->corruptions++;
    return;
  }
  for (uint64_t c = first; c <= last; c++)
    if (x->counts[c] < UINT32_MAX)
      x->counts[c]++;
}

/* The references of the L2 tables an L1 table (active or a snapshot's)
 * reaches: the tables themselves and what their entries reference.
 */
static int
count_bad_table (struct qcow2_image *img, uint32_t l1_index, uint64_t l2,
                 void *xv)
{
  struct check *x = xv;

  qcow2_l2_offset_check (img, l2, l1_index);      /* reports it */
  x->res->corruptions++;
  return 0;
}

static int
count_table (struct qcow2_image *img, uint32_t l1_index, uint64_t l2,
             void *x)
{
  (void) l1_index;
  count (x, l2, img->cluster_size, "L2 table");
  return 0;
}

static int
count_entry (struct qcow2_image *img, struct qcow2_walk_entry *e, void *xv)
{
  struct check *x = xv;
  uint64_t offset, len;

  if (qcow2_entry_refs (img, e->entry, &offset, &len) < 0)
    x->res->corruptions++;
  else if (e->entry & QCOW2_OFLAG_COMPRESSED)
    count (x, offset, len, "compressed data");
  else
    count (x, offset, len, "data cluster");
  return 0;
}

/* An L2 slice that cannot be read: its references go uncounted. */
static int
count_unreadable (struct qcow2_image *img, int err, void *xv)
{
  struct check *x = xv;

  (void) img;
  (void) err;
  x->res->check_errors++;
  return QCOW2_WALK_SKIP;
}

static int
count_l1 (struct check *x, const uint64_t *l1, uint32_t l1_size)
{
  const struct qcow2_walk walk = {
    .bad_table = count_bad_table, .table = count_table,
    .entry = count_entry, .slice_error = count_unreadable, .opaque = x,
  };

  return qcow2_walk_l1 (x->img, l1, l1_size, &walk);
}

static int
count_snapshots (struct check *x)
{
  struct qcow2_image *img = x->img;

  if (img->nb_snapshots)
    count (x, img->h.snapshots_offset, img->snapshot_table_bytes,
           "snapshot table");
  for (uint32_t i = 0; i < img->nb_snapshots; i++) {
    const struct qcow2_snapshot *sn = &img->snapshots[i];
    uint64_t bytes = (uint64_t) sn->l1_size * 8;
    uint64_t *l1;
    int r;

    if (!is_aligned (sn->l1_table_offset, img->cluster_size) ||
        bytes > QCOW2_MAX_L1_BYTES ||
        range_exceeds (sn->l1_table_offset, bytes, img->file_size)) {
      qcow2_error ("%s: snapshot %s: L1 table offset %#" PRIx64 " or size %"
                   PRIu32 " invalid", img->filename, sn->id,
                   sn->l1_table_offset, sn->l1_size);
      x->res->corruptions++;
      continue;
    }
    count (x, sn->l1_table_offset, bytes, "snapshot L1 table");
    l1 = malloc (bytes ? bytes : 1);
    if (!l1)
      return -ENOMEM;
    r = qcow2_io_pread (img->io, l1, bytes, sn->l1_table_offset);
    if (r == 0) {
      for (uint32_t j = 0; j < sn->l1_size; j++)
        l1[j] = get_be64 (&l1[j]);
      r = count_l1 (x, l1, sn->l1_size);
    }
    else
      x->res->check_errors++;
    free (l1);
    if (r < 0)
      return r;
  }
  return 0;
}

static int
count_bitmaps (struct check *x)
{
  struct qcow2_image *img = x->img;
  uint64_t size = img->h.bitmap_directory_size, pos = 0;
  unsigned char *dir;
  int r;

  if (!img->h.has_bitmaps_ext)
    return 0;
  count (x, img->h.bitmap_directory_offset, size, "bitmap directory");
  if (range_exceeds (img->h.bitmap_directory_offset, size, img->file_size))
    return 0;
  dir = malloc (size ? size : 1);
  if (!dir)
    return -ENOMEM;
  r = qcow2_io_pread (img->io, dir, size, img->h.bitmap_directory_offset);
  for (uint32_t n = 0; r == 0 && n < img->h.nb_bitmaps &&
       pos + 24 <= size; n++) {
    uint64_t table = get_be64 (dir + pos);
    uint64_t bytes = (uint64_t) get_be32 (dir + pos + 8) * 8;
    count (x, table, bytes, "bitmap table");
    if (!range_exceeds (table, bytes, img->file_size)) {
      unsigned char *t = malloc (bytes ? bytes : 1);
      if (!t) {
        r = -ENOMEM;
        break;
      }
      if (qcow2_io_pread (img->io, t, bytes, table) == 0)
        for (uint64_t i = 0; i < bytes; i += 8) {
          uint64_t data = get_be64 (t + i) & QCOW2_L2E_OFFSET_MASK;
          if (data)
            count (x, data, img->cluster_size, "bitmap data");
        }
      free (t);
    }
    pos += (24 + (uint64_t) get_be32 (dir + pos + 20) +
            get_be16 (dir + pos + 18) + 7) & ~7ull;
  }
  free (dir);
  return r;
}

/* Compare and (with repair) fix refcounts. */
static int
compare_refcounts (struct check *x, bool repair)
{
  struct qcow2_image *img = x->img;
  struct qcow2_writer *w = img->w;
  uint64_t covered = w->reftable_entries * w->refblock_entries;
  uint64_t end = x->nclusters > covered ? x->nclusters : covered;

  for (uint64_t c = 0; c < end; c++) {
    uint64_t stored, counted = c < x->nclusters ? x->counts[c] : 0;
    /* Past the end of the file nothing is counted, so only clusters
     * with a refcount block can disagree: skip absent blocks whole.  A
     * refcount table covers far more than the file (QEMU's default one
     * cluster, 8192 entries with 64 KiB clusters, covers 2^28 clusters),
     * and one lookup per cluster would take seconds, or hours with a
     * large table.
     */
    if (c >= x->nclusters && c % w->refblock_entries == 0) {
      uint64_t index = c / w->refblock_entries;
      if (index >= w->reftable_entries || w->reftable[index] == 0) {
        c += w->refblock_entries - 1;
        continue;
      }
    }
    int r = qcow2_refcount_get (img, c, &stored);
    if (r < 0)
      return r;
    if (stored == counted)
      continue;
    bool leak = stored > counted;
    if (leak)
      x->res->leaks++;
    else
      x->res->corruptions++;
    if (!repair)
      continue;

    /* A range without a refcount block gets one at its first cluster,
     * which must then be free.
     */
    uint64_t index = c / w->refblock_entries;
    uint64_t first = index * w->refblock_entries;
    if ((index >= w->reftable_entries || w->reftable[index] == 0) &&
        first < x->nclusters && x->counts[first] != 0) {
      qcow2_error ("%s: cannot repair the refcount of cluster %#" PRIx64
                   " in place: the refcount structure needs rebuilding "
                   "(qemu-img check -r all)", img->filename,
                   c << img->cluster_bits);
      return -EIO;
    }
    r = qcow2_refcount_set (img, c, counted);
    if (r < 0)
      return r;
    if (leak)
      x->res->leaks_fixed++;
    else
      x->res->corruptions_fixed++;
  }
  return 0;
}

static int
run_check (struct qcow2_image *img, bool repair,
           struct qcow2_check_result *res)
{
  struct qcow2_writer *w = img->w;
  struct check x = { img, res, NULL, 0 };
  int r;

  qcow2_writer_assert_locked (img);
  x.nclusters = div_round_up (img->file_size, img->cluster_size);
  x.counts = calloc (x.nclusters ? x.nclusters : 1, sizeof *x.counts);
  if (!x.counts)
    return -ENOMEM;

  count (&x, 0, img->cluster_size, "header");
  count (&x, img->h.l1_table_offset, (uint64_t) img->l1_size * 8, "L1 table");
  r = count_l1 (&x, img->l1, img->l1_size);
  if (r == 0)
    r = count_snapshots (&x);
  if (r == 0)
    r = count_bitmaps (&x);
  if (r == 0) {
    count (&x, w->reftable_offset, w->reftable_entries * 8,
           "refcount table");
    for (uint64_t i = 0; i < w->reftable_entries; i++)
      if (w->reftable[i])
        count (&x, w->reftable[i], img->cluster_size, "refcount block");
    if (img->h.has_crypto_ext)
      count (&x, img->h.crypto_offset, img->h.crypto_length, "LUKS header");
    r = compare_refcounts (&x, repair);
  }
  if (r == 0) {
    uint64_t wrong;
    r = qcow2_copied_pass (img, repair ? QCOW2_COPIED_REPAIR
                                       : QCOW2_COPIED_COUNT, &wrong);
    res->corruptions += wrong;
    if (repair)
      res->corruptions_fixed += wrong;
  }
  if (r == 0 && repair)
    r = qcow2_sync_metadata (img);
  free (x.counts);
  return r;
}

int
qcow2_check (struct qcow2_image *img, bool repair,
             struct qcow2_check_result *res)
{
  struct qcow2_writer temp;
  bool borrowed = img->w == NULL;
  int r;

  memset (res, 0, sizeof *res);
  if (repair && !img->w) {
    qcow2_error ("%s: repairing needs the image open read-write",
                 img->filename);
    return -EROFS;
  }
  if (borrowed) {
    /* A read-only check reads refcounts through the writer's tables,
     * under its lock like every user of them.
     */
    memset (&temp, 0, sizeof temp);
    pthread_mutex_init (&temp.lock, NULL);
    img->w = &temp;
    qcow2_writer_lock (img);
    r = qcow2_refcount_init (img);
    if (r == 0)
      r = run_check (img, false, res);
    qcow2_refcount_fini (img);
    qcow2_writer_unlock (img);
    img->w = NULL;
    pthread_mutex_destroy (&temp.lock);
    return r;
  }
  qcow2_writer_lock (img);
  r = run_check (img, repair, res);
  qcow2_writer_unlock (img);
  return r;
}
