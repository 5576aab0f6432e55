/* Compressed clusters on write (QEMU's qcow2_co_pwritev_compressed_part).
 *
 * One whole guest cluster at a time:
 *   1. compress it, outside every lock, into a per-thread buffer; data that
 *      does not shrink below one cluster goes down the normal write path;
 *   2. under the writer lock, take bytes for it from the packer: compressed
 *      clusters sit back to back at byte granularity, as QEMU's
 *      qcow2_alloc_bytes places them, and each takes one reference on
 *      every host cluster its bytes touch (the count check.c and
 *      release_entry in l2_write.c expect);
 *   3. write the compressed bytes, outside every lock: nobody else
 *      references them yet;
 *   4. publish the L2 entry (compressed bit, COPIED clear, no subcluster
 *      bitmap) with the guest cluster's range lock held exclusive, and
 *      queue the release of what the entry referenced before.
 * So the data (3) and the refcount increases (2, in the refcount cache)
 * are in place before the entry (4), and flush.c makes them durable in
 * that order: a crash at any point leaks at most the new bytes.
 *
 * The descriptor stores the byte offset and the number of 512-byte
 * sectors after the first one that the data touches, counted from
 * offset & ~511.  The last of those sectors may run past the end of the
 * file, or into the next compressed cluster: readers stop once one cluster
 * has been produced (QEMU does the same).
 *
 * Images with an external data file or encryption take no compressed
 * clusters (QEMU refuses them there): such writes go down the normal path,
 * uncompressed.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "io.h"
#include "rangelock.h"
#include "util.h"

/* Pending releases that make a compressed write sync the metadata. */
#define SYNC_PENDING 64

/* Under the writer lock: take host cluster c, with refcount 1, if it is
 * a free cluster inside the file.  The allocator hands out the lowest free
 * cluster, which once clusters have been released is rarely the one after
 * the cluster being packed: asking for that one keeps the packing dense
 * where clusters were released.  Past the end of the file the allocator
 * is asked instead, so that released clusters are reused before the file
 * grows.  Only clusters whose refcount block exists qualify: a new block
 * would be placed at the first cluster of its range (refcount.c), possibly
 * c itself.  1: taken; 0: not free; negative errno on failure.
 */
static int
claim_cluster (struct qcow2_image *img, uint64_t c)
{
  struct qcow2_writer *w = img->w;
  uint64_t index = c / w->refblock_entries, refcount;
  int r;

  qcow2_writer_assert_locked (img);
  if (index >= w->reftable_entries || w->reftable[index] == 0 ||
      c >= qcow2_file_size (img) >> img->cluster_bits)
    return 0;
  r = qcow2_refcount_get (img, c, &refcount);
  if (r < 0 || refcount != 0)
    return r;
  /* Refcount 0 with metadata there is corruption, as in the allocator. */
  r = qcow2_overlap_check (img, c << img->cluster_bits, img->cluster_size,
                           QCOW2_META_NONE);
  if (r == 0)
    r = qcow2_refcount_update (img, c, 1);
  return r < 0 ? r : 1;
}

/* The packer's state is w->compressed_free, the next free byte in the host
 * cluster being packed, which only the compressed clusters in it count.
 * When that count drops to 0 (refcount.c calls this, under the writer
 * lock) the cluster may be handed out whole: forget it, or packed bytes
 * would land in someone else's cluster.
 */
void
qcow2_on_cluster_freed (struct qcow2_image *img, uint64_t cluster)
{
  struct qcow2_writer *w = img->w;

  qcow2_writer_assert_locked (img);
  if (w->compressed_free != 0 &&
      w->compressed_free >> img->cluster_bits == cluster)
    w->compressed_free = 0;
}

/* Under the writer lock: `size` bytes (less than a cluster) for compressed
 * data, after those handed out last when they fit in that host cluster or
 * in it and the next one (when that one is free), in a fresh cluster
 * otherwise.  Every host cluster the bytes touch gains one reference: a
 * fresh cluster gets refcount 1 from the allocator, a partly used one an
 * increment.
 */
static int
alloc_bytes (struct qcow2_image *img, uint64_t size, uint64_t *offset_out)
{
  struct qcow2_writer *w = img->w;
  const uint64_t cs = img->cluster_size;
  uint64_t offset = w->compressed_free, cluster = offset >> img->cluster_bits;
  uint64_t fresh, refcount;
  int r;

  qcow2_writer_assert_locked (img);
  if (offset != 0) {
    /* A cluster whose refcount is saturated cannot take another user.
     * (One that dropped to 0 was forgotten by refcount.c.)
     */
    r = qcow2_refcount_get (img, cluster, &refcount);
    if (r < 0)
      return r;
    if (refcount == 0 || refcount >= w->refcount_max)
      offset = 0;
  }
  if (offset != 0 && cs - (offset & (cs - 1)) >= size)
    r = qcow2_refcount_update (img, cluster, 1);
  else if (offset != 0 && (r = claim_cluster (img, cluster + 1)) != 0) {
    if (r < 0)
      return r;
    /* The bytes straddle the two clusters. */
    r = qcow2_refcount_update (img, cluster, 1);
  }
  else {
    r = qcow2_alloc_clusters (img, 1, &fresh);
    if (r < 0)
      return r;
    if (offset != 0 && fresh == (cluster + 1) << img->cluster_bits)
      /* Contiguous: the bytes straddle the two clusters. */
      r = qcow2_refcount_update (img, cluster, 1);
    else
      offset = fresh;   /* the rest of the old cluster stays unused */
  }
  if (r < 0)
    return r;   /* a fresh cluster leaks: check repairs leaks */
  *offset_out = offset;
  w->compressed_free = (offset + size) & (cs - 1) ? offset + size : 0;
  return 0;
}

int
qcow2_write_compressed (struct qcow2_image *img, const void *buf,
                        uint64_t guest)
{
  struct qcow2_writer *w;
  const uint64_t cs = img->cluster_size;
  const unsigned char *src = buf;
  unsigned char *padded = NULL, *out;
  uint64_t len, host, extra, desc;
  size_t clen;
  int r;

  if ((r = qcow2_check_can_write (img)) < 0)
    return r;
  w = img->w;                   /* exists once writable */
  if (!is_aligned (guest, cs) || guest >= img->h.size) {
    qcow2_error ("compressed write at %#" PRIx64 " is not at the start of "
                 "a cluster of the disk", guest);
    return -EINVAL;
  }
  len = min_u64 (cs, img->h.size - guest);
  qcow2_bitmaps_mark (img, guest, len);
  if (img->external_data || img->crypt)
    return qcow2_write (img, buf, len, guest, false);

  if (len < cs) {
    padded = calloc (1, cs);
    if (!padded)
      return -ENOMEM;
    memcpy (padded, buf, len);
    src = padded;
  }
  /* SCRATCH_COMPRESSED is the read path's buffer for compressed input; it
   * is free here, as nothing below reads compressed clusters until `out`
   * has been written (the fallback writes from buf).
   */
  out = qcow2_scratch (SCRATCH_COMPRESSED, cs);
  if (!out) {
    r = -ENOMEM;
    goto out;
  }
  /* At most cs - 1 bytes, as QEMU: anything longer is stored as is. */
  r = qcow2_compress (img->h.compression_type, src, cs, out, cs - 1, &clen);
  if (r == -ENOSPC || r == -ENOTSUP) {
    r = qcow2_write (img, buf, len, guest, false);
    goto out;
  }
  if (r < 0) {
    qcow2_error ("could not compress the cluster at guest offset %#" PRIx64
                 ": %s", guest, strerror (-r));
    goto out;
  }

  qcow2_writer_lock (img);
  r = alloc_bytes (img, clen, &host);
  qcow2_writer_unlock (img);
  if (r < 0)
    goto out;
  /* The descriptor has room for offsets below 2^(70 - cluster_bits)
   * (512 TiB with 2 MiB clusters); a file that large gets no more
   * compressed clusters.
   */
  if (host + clen - 1 > img->coffset_mask) {
    qcow2_error ("%s: host offset %#" PRIx64 " does not fit in a "
                 "compressed cluster descriptor", img->filename, host);
    r = -EFBIG;
  }
  if (r == 0)
    r = qcow2_overlap_check (img, host, clen, QCOW2_META_NONE);
  if (r == 0) {
    r = qcow2_io_pwrite (img->io, out, clen, host);
    if (r < 0)
      qcow2_error ("write of %zu compressed bytes at host offset %#" PRIx64
                   " failed: %s", clen, host, strerror (-r));
  }
  if (r < 0) {
    /* Nothing references the bytes: give their references back. */
    qcow2_writer_lock (img);
    qcow2_free_later (img, host, clen);
    qcow2_writer_unlock (img);
    goto out;
  }

  extra = ((host + clen - 1) >> 9) - (host >> 9);
  desc = QCOW2_OFLAG_COMPRESSED | extra << img->csize_shift | host;
  /* Exclusive: an in-place writer of the old (owned) cluster holds its
   * range lock shared, and must be done before that cluster is queued for
   * release and, after the next sync, possibly handed out again.  A
   * failure here may leave the entry published or not, so the bytes are
   * not given back: at worst they leak.
   */
  qcow2_rangelock_lock (img->ranges, guest >> img->cluster_bits, 1, true);
  r = qcow2_entry_publish (img, guest, desc, 0, true);
  qcow2_rangelock_unlock (img->ranges, guest >> img->cluster_bits, 1);

  /* Recompressing a cluster that was written in pieces (the compress
   * filter) releases its uncompressed host cluster, but only at the next
   * sync (flush.c), and until then the allocator cannot reuse it: sync
   * every so often, so that the file does not grow by one cluster per
   * recompressed cluster until the client flushes.
   */
  if (r == 0) {
    qcow2_writer_lock (img);
    if (w->nr_pending >= SYNC_PENDING)
      r = qcow2_sync_metadata (img);
    qcow2_writer_unlock (img);
  }

 out:
  free (padded);
  return r;
}
