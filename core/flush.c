/* Metadata write-back in dependency order.
 *
 * What a sync makes durable, in this order (each step synced before the
 * next):
 *   1. guest data and refcount blocks: new clusters are written before
 *      their L2 entries are published, and their refcount increases sit in
 *      the refcount cache, so after this step every cluster that a dirty L2
 *      entry points to holds its data and is counted;
 *   2. L2 slices: the new entries;
 *   3. only now, drop the refcounts of clusters those entries stopped
 *      referencing (the pending list), and punch holes for clusters that
 *      became free.  Their refcount blocks reach the disk at the next sync;
 *      a crash before that leaks them, which check repairs, but never
 *      frees a cluster that a durable L2 entry still uses.
 * So a crash at any instant leaves no corruption (leaks allowed) and every
 * write acknowledged before a completed sync reads back.
 *
 * A failed write-back or sync leaves the disk in an unknown state (a
 * failed fdatasync may have dropped earlier dirty pages too), so it makes
 * the image BROKEN (writer.c), and a BROKEN image is never synced again:
 * writing L2 entries after refcount blocks that may not have reached the
 * disk would break the order above.
 *
 * Runs under the writer lock.
 */
#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include "cache.h"
#include "internal.h"
#include "io.h"
#include "util.h"

static int
sync_io (struct qcow2_image *img)
{
  int r = 0;

  if (img->data_io != img->io)
    r = qcow2_io_flush (img->data_io);
  if (r == 0)
    r = qcow2_io_flush (img->io);
  return r;
}

/* Drop one reference to each cluster of a pending range; release the
 * space of clusters nobody uses any more.
 */
static int
apply_free (struct qcow2_image *img, const struct qcow2_pending_free *f)
{
  uint64_t first = f->offset >> img->cluster_bits;
  uint64_t last = (f->offset + f->length - 1) >> img->cluster_bits;

  for (uint64_t c = first; c <= last; c++) {
    uint64_t refcount;
    int r = qcow2_refcount_update (img, c, -1);
    if (r == 0)
      r = qcow2_refcount_get (img, c, &refcount);
    if (r < 0)
      return r;
    if (refcount == 0) {
      uint64_t off = c << img->cluster_bits;
      qcow2_cache_discard (img->l2_cache, off, img->cluster_size);
      qcow2_overlap_remove (img, off);
      /* Best effort: the cluster is free either way. */
      qcow2_io_discard (img->io, off, img->cluster_size);
    }
  }
  return 0;
}

int
qcow2_sync_metadata (struct qcow2_image *img)
{
  struct qcow2_writer *w = img->w;
  size_t nr_pending;
  int r;

  qcow2_writer_assert_locked (img);
  if (qcow2_writer_state (img) == QCOW2_WRITER_BROKEN)
    return -EIO;   /* reported when it broke */
  r = qcow2_cache_writeback (w->refblock_cache);
  if (r == 0)
    r = sync_io (img);
  if (r == 0 && qcow2_cache_dirty_count (img->l2_cache) > 0) {
    r = qcow2_cache_writeback (img->l2_cache);
    if (r == 0)
      r = qcow2_io_flush (img->io);
  }
  if (r < 0)
    return qcow2_writer_break (img, r, "writing back metadata");

  /* apply_free may queue nothing new, but take the list first anyway. */
  nr_pending = w->nr_pending;
  w->nr_pending = 0;
  for (size_t i = 0; i < nr_pending; i++) {
    r = apply_free (img, &w->pending[i]);
    if (r < 0) {
      /* The rest leak: safe, and check repairs leaks. */
      return r;
    }
  }
  return 0;
}
