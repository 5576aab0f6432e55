/* Metadata write-back in dependency order, and client flushes.
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
 * write acknowledged before a completed sync reads back.  Steps 1 and 2
 * are durable.c's rules 1 and 3, step 3 its rule 2.
 *
 * qcow2_sync_metadata does all three under the writer lock: for the
 * engine's own syncs (the dirty-metadata bound, snapshots, resize, close),
 * which need the lists empty or the metadata settled when they return.
 *
 * qcow2_sync_flush, for a client's flush, holds the writer lock only where
 * the order needs it, so allocating writers do not stall behind the
 * flush's last fdatasync:
 *   a. under the lock: write the dirty refcount blocks; if L2 slices are
 *      dirty, sync (step 1: L2 writes must not reach the file before the
 *      data and refcounts they depend on, and writers must not publish
 *      entries meanwhile that this write-back would carry), then write the
 *      slices (step 2's write); take the pending list;
 *   b. without the lock: sync.  This makes step 2 durable, and with it
 *      everything written in (a), and all guest data written before the
 *      flush began (when (a) had nothing to sync, this is the only sync);
 *   c. under the lock: if (b) succeeded, apply the frees taken in (a)
 *      (step 3).
 * Why (b) may run unlocked: whatever writers do meanwhile only adds dirty
 * slices and refcount increases to the caches and frees to the (new)
 * pending list; none of it is written to the file before the next sync's
 * own step 1 (dirty slices are never evicted, cache.h), and frees queued
 * after (a) wait for that next sync, whose L2 write-back covers the
 * entries that queued them.  The frees taken in (a) are exactly those
 * whose L2 (or L1) changes were written before (a) ended (a free is
 * queued under the lock together with the change that causes it), so (b)
 * made them durable before (c) drops any refcount.  If (b) fails, those
 * frees are dropped: we cannot know what reached the disk, and a leak is
 * safe where a premature free is not.  Every write acknowledged before
 * the flush began was written before (a) (data) or published before (a)
 * (entries, refcounts), so it is durable when the flush returns 0.
 *
 * Concurrent client flushes share work: a flush that arrives while
 * another runs waits for it, then for one more run that starts after its
 * arrival, which serves every flush that arrived meanwhile; it returns that
 * run's result.  Engine syncs under the writer lock (qcow2_sync_metadata)
 * may run between (a) and (c); they apply only the frees queued after (a),
 * after their own step 2, so the argument above holds for them too.
 *
 * A failed write-back or sync leaves the disk in an unknown state (a
 * failed fdatasync may have dropped earlier dirty pages too), so it makes
 * the image BROKEN (writer.c), and a BROKEN image is never synced again:
 * writing L2 entries after refcount blocks that may not have reached the
 * disk would break the order above.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "cache.h"
#include "debug.h"
#include "internal.h"
#include "io.h"
#include "util.h"

static int
sync_io (struct qcow2_image *img)
{
  int r = 0;

  QCOW2_DEBUG (metadata, "%s: sync", img->filename);
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

/* Step 3 for the frees in f[0..n): under the writer lock. */
static int
apply_frees (struct qcow2_image *img, const struct qcow2_pending_free *f,
             size_t n)
{
  for (size_t i = 0; i < n; i++) {
    int r = apply_free (img, &f[i]);
    if (r < 0) {
      /* The rest leak: safe, and check repairs leaks. */
      return r;
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
  return apply_frees (img, w->pending, nr_pending);
}

/* One client flush: steps (a), (b), (c) of the head comment. */
static int
flush_once (struct qcow2_image *img)
{
  struct qcow2_writer *w = img->w;
  struct qcow2_pending_free *frees = NULL;
  size_t nr_frees = 0;
  bool data_synced = false;
  int r;

  /* (a) */
  qcow2_writer_lock (img);
  if (qcow2_writer_state (img) == QCOW2_WRITER_BROKEN) {
    qcow2_writer_unlock (img);
    return qcow2_writer_refuse_broken (img);
  }
  r = qcow2_cache_writeback (w->refblock_cache);
  if (r == 0 && qcow2_cache_dirty_count (img->l2_cache) > 0) {
    r = sync_io (img);
    data_synced = true;
    if (r == 0)
      r = qcow2_cache_writeback (img->l2_cache);
  }
  if (r == 0 && w->nr_pending > 0) {
    /* Hand the list over whole; writers start a new one. */
    frees = w->pending;
    nr_frees = w->nr_pending;
    w->pending = NULL;
    w->nr_pending = w->cap_pending = 0;
  }
  if (r < 0)
    r = qcow2_writer_break (img, r, "writing back metadata");
  qcow2_writer_unlock (img);
  if (r < 0)
    return r;

  /* (b) */
  r = data_synced ? qcow2_io_flush (img->io) : sync_io (img);
  if (r < 0) {
    free (frees);               /* leaked on disk: see the head comment */
    return qcow2_writer_break (img, r, "syncing the image");
  }

  /* (c) */
  if (nr_frees > 0) {
    qcow2_writer_lock (img);
    r = apply_frees (img, frees, nr_frees);
    qcow2_writer_unlock (img);
  }
  free (frees);
  return r;
}

void
qcow2_flusher_init (struct qcow2_flusher *f)
{
  memset (f, 0, sizeof *f);
  pthread_mutex_init (&f->lock, NULL);
  pthread_cond_init (&f->done, NULL);
}

void
qcow2_flusher_fini (struct qcow2_flusher *f)
{
  pthread_cond_destroy (&f->done);
  pthread_mutex_destroy (&f->lock);
}

int
qcow2_sync_flush (struct qcow2_image *img)
{
  struct qcow2_flusher *f = &img->w->flusher;
  uint64_t mine;
  int r;

  pthread_mutex_lock (&f->lock);
  mine = ++f->requested;
  while (f->running)
    pthread_cond_wait (&f->done, &f->lock);
  if (f->completed >= mine) {
    /* A run that started after this flush arrived has ended. */
    r = f->result;
    pthread_mutex_unlock (&f->lock);
    return r;
  }
  f->running = true;
  mine = f->requested;          /* this run serves every flush so far */
  pthread_mutex_unlock (&f->lock);

  r = flush_once (img);

  pthread_mutex_lock (&f->lock);
  f->running = false;
  f->completed = mine;
  f->result = r;
  pthread_cond_broadcast (&f->done);
  pthread_mutex_unlock (&f->lock);
  return r;
}
