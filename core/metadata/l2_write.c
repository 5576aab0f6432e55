/* L2 entries for writers: find, classify and publish the entry of a guest
 * cluster, allocating a new L2 table or copying one shared with a
 * snapshot.
 *
 * Runs under the writer lock.  A new L2 table is made durable before the
 * L1 entry points at it (l2_allocate; durable.c rules 1 and 4): the
 * table's contents and its cluster's refcount, one sync, then the L1
 * entry, durable at the next sync; a crash leaves at most a leaked
 * cluster.  The L1 entry in memory changes last, with an atomic store, so
 * lock-free readers see either the old table or the complete new one.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "cache.h"
#include "internal.h"
#include "io.h"
#include "l2.h"
#include "util.h"

/* Copy the L2 table at `offset` through the cache (whose slices may be
 * newer than the disk) into buf.
 */
static int
copy_entry (struct qcow2_image *img, struct qcow2_walk_entry *e, void *buf)
{
  memcpy ((unsigned char *) buf + e->index * img->l2_entry_bytes, e->p,
          img->l2_entry_bytes);
  return 0;
}

static int
read_table (struct qcow2_image *img, uint64_t offset, unsigned char *buf)
{
  const struct qcow2_walk copy = { .entry = copy_entry, .opaque = buf };

  return qcow2_walk_l2 (img, offset, &copy);
}

static int
l2_allocate (struct qcow2_image *img, uint64_t l1_index)
{
  uint64_t old = qcow2_l1_entry (img->l1, l1_index) & QCOW2_L1E_OFFSET_MASK;
  uint64_t new_offset;
  unsigned char *table, entry[8];
  int r;

  qcow2_writer_assert_locked (img);
  table = calloc (1, img->cluster_size);
  if (!table)
    return -ENOMEM;
  if (old) {
    /* Shared with a snapshot: the copy references the same clusters,
     * whose refcounts already count this L1 (QEMU's snapshot rules).
     */
    r = read_table (img, old, table);
    if (r < 0)
      goto out;
  }
  r = qcow2_alloc_clusters (img, 1, &new_offset);
  if (r < 0)
    goto out;
  assert (is_aligned (new_offset, img->cluster_size));
  qcow2_cache_discard (img->l2_cache, new_offset, img->cluster_size);

  /* Rule 4: the table, and rule 1: its refcount, made durable by one
   * sync; only then the L1 entry, whose own write waits for the next
   * sync (durable.c, "a pointer's own write").  Writing the table before
   * its refcount is durable is safe: nothing points at it yet.
   */
  r = qcow2_meta_write (img, QCOW2_RULE_L2_BEFORE_L1, table,
                        img->cluster_size, new_offset);
  if (r == 0)
    r = qcow2_meta_refcounts_durable (img, QCOW2_RULE_ALLOC_REFCOUNT_FIRST);
  if (r == 0) {
    put_be64 (entry, new_offset | QCOW2_OFLAG_COPIED);
    r = qcow2_meta_write (img, QCOW2_RULE_L2_BEFORE_L1, entry, 8,
                          img->h.l1_table_offset + l1_index * 8);
  }
  if (r < 0)
    goto out;   /* the image is BROKEN (durable.c) */
  __atomic_store_n (&img->l1[l1_index], new_offset | QCOW2_OFLAG_COPIED,
                    __ATOMIC_RELEASE);
  r = qcow2_overlap_add (img, new_offset, img->cluster_size, QCOW2_META_L2);
  if (r == 0 && old)
    r = qcow2_free_later (img, old, img->cluster_size);

 out:
  free (table);
  return r;
}

int
qcow2_l2_slice_for_write (struct qcow2_image *img, uint64_t guest,
                          struct qcow2_slice **slice, uint64_t *index)
{
  uint64_t l1_index = guest >> img->l2_bits;
  struct qcow2_l2_pos at;
  uint64_t l1e;
  int r;

  qcow2_writer_assert_locked (img);
  if (l1_index >= img->l1_size) {
    qcow2_error ("guest offset %#" PRIx64 " beyond the L1 table", guest);
    return -EIO;
  }
  l1e = qcow2_l1_entry (img->l1, l1_index);
  if (!(l1e & QCOW2_L1E_OFFSET_MASK) || !(l1e & QCOW2_OFLAG_COPIED)) {
    r = l2_allocate (img, l1_index);
    if (r < 0)
      return r;
  }
  r = qcow2_l2_slice_of_guest (img, img->l1, img->l1_size, guest, slice,
                               &at);
  *index = at.index;
  return r;
}

int
qcow2_l2_entry_get (struct qcow2_image *img, uint64_t guest, uint64_t *entry,
                    uint64_t *bitmap)
{
  struct qcow2_slice *slice;
  struct qcow2_l2_pos at;
  int r;

  qcow2_writer_assert_locked (img);
  *entry = *bitmap = 0;
  r = qcow2_l2_slice_of_guest (img, img->l1, img->l1_size, guest, &slice,
                               &at);
  if (r < 0 || !slice)
    return r;
  *entry = qcow2_l2_load (slice->data + at.index * img->l2_entry_bytes);
  if (img->extended_l2)
    *bitmap = qcow2_l2_load (slice->data + at.index * img->l2_entry_bytes
                             + 8);
  qcow2_cache_put (img->l2_cache, slice);
  return 0;
}

/* Queue the release of what an entry referenced, now that it is being
 * replaced.  External data clusters are not refcounted.
 */
static int
release_entry (struct qcow2_image *img, const struct qcow2_entry *old)
{
  if (old->compressed) {
    uint64_t coffset, nsectors;
    qcow2_compressed_extent (img, old->entry, &coffset, &nsectors);
    return qcow2_free_later (img, align_down (coffset, 512), nsectors * 512);
  }
  if (old->allocated && !img->external_data)
    return qcow2_free_later (img, old->host, img->cluster_size);
  return 0;
}

/* Bound the dirty metadata: a cache full of dirty slices could not evict.
 * This sync (unlike a client's flush, see flush.c) holds the writer lock
 * across two or three fdatasyncs, so it should be rare: with a limit of
 * 32 slices, random 4 KiB writes over a 1 GiB extended L2 overlay synced
 * every 20 requests, at a third of qemu-nbd's speed.
 */
static int
maybe_sync (struct qcow2_image *img)
{
  qcow2_writer_assert_locked (img);
  if (qcow2_cache_dirty_count (img->l2_cache) >=
      qcow2_cache_dirty_limit (img->l2_cache) ||
      qcow2_cache_dirty_count (img->w->refblock_cache) >=
      qcow2_cache_dirty_limit (img->w->refblock_cache) ||
      img->w->nr_pending >= 4096)
    return qcow2_sync_metadata (img);
  return 0;
}

/* Under the writer lock: set the entry of guest cluster `guest` and
 * release what it replaced (unless the host cluster is reused).
 */
static int
publish_locked (struct qcow2_image *img, uint64_t guest, uint64_t entry,
                uint64_t bitmap, bool release_old)
{
  struct qcow2_slice *slice;
  struct qcow2_entry old;
  uint64_t index;
  unsigned char *p;
  int r;

  qcow2_writer_assert_locked (img);
  r = qcow2_l2_slice_for_write (img, guest, &slice, &index);
  if (r < 0)
    return r;
  assert (index < img->slice_entries);
  p = slice->data + index * img->l2_entry_bytes;
  qcow2_entry_classify (img, qcow2_l2_load (p),
                  img->extended_l2 ? qcow2_l2_load (p + 8) : 0, &old);
  if (img->extended_l2)
    qcow2_l2_store_pair (img, p, entry, bitmap);
  else
    qcow2_l2_store (p, entry);
  qcow2_cache_mark_dirty (img->l2_cache, slice);
  qcow2_cache_put (img->l2_cache, slice);
  if (release_old)
    r = release_entry (img, &old);
  return r;
}

int
qcow2_entry_publish (struct qcow2_image *img, uint64_t guest,
                     uint64_t entry, uint64_t bitmap, bool release_old)
{
  qcow2_writer_lock (img);
  int r = publish_locked (img, guest, entry, bitmap, release_old);
  if (r == 0)
    r = maybe_sync (img);
  qcow2_writer_unlock (img);
  return r;
}

int
qcow2_entry_lookup (struct qcow2_image *img, uint64_t guest,
                    struct qcow2_entry *st)
{
  uint64_t entry, bitmap;
  int r;

  qcow2_writer_lock (img);
  r = qcow2_l2_entry_get (img, guest, &entry, &bitmap);
  qcow2_writer_unlock (img);
  if (r == 0)
    qcow2_entry_classify (img, entry, bitmap, st);
  return r;
}

