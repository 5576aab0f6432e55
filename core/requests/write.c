/* The write path.
 *
 * A request first tries to write in place: clusters (or subclusters) that
 * are allocated and exclusively owned (COPIED) take no metadata lock, only
 * their range locks shared, and the data goes straight from the caller's
 * buffer to the file.  Whatever remains takes its clusters' range locks
 * exclusive and goes through allocation:
 *
 *   - the new cluster's contents are built from what the guest sees now
 *     (backing file, compressed or shared cluster, zeros) merged with the
 *     new data, and written once, outside the metadata lock;
 *   - whole clusters written by one request are allocated together and
 *     written with one pwrite from the caller's buffer;
 *   - then, under the metadata lock, the L2 entry is published and the old
 *     cluster (shared with a snapshot, compressed, or preallocated zero not
 *     owned) is queued for release: see flush.c for the ordering that makes
 *     this crash-safe.
 * With extended L2, only the touched subclusters are written into an
 * unallocated cluster; a shared or compressed cluster is copied whole.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "cache.h"
#include "crypt.h"
#include "internal.h"
#include "io.h"
#include "rangelock.h"
#include "util.h"

/* Write guest bytes to a host offset, encrypting when needed.  Partial
 * sectors of an encrypted image are read, decrypted, merged and
 * re-encrypted.
 */
static int
write_host (struct qcow2_image *img, const unsigned char *buf, uint64_t len,
            uint64_t host, uint64_t guest)
{
  int r;

  /* Guest data must never land on metadata (hostile L2 entries). */
  if (!img->external_data &&
      (r = qcow2_overlap_check (img, host, len, QCOW2_META_NONE)) < 0)
    return r;
  /* Nor past the end of the file: clusters we allocate are inside it
   * (the allocator grows file_size first), so an entry pointing beyond is
   * corrupt, as the read path says.  Writing there would let a hostile
   * image make us extend the file to any offset below 2^56.  A cluster
   * may end past the end of the file, though: with extended L2, QEMU and
   * we write only the touched subclusters of a new cluster, so the last
   * cluster of a file reopened later is often partly beyond it.  Every
   * cluster written must start inside the file.
   */
  if (!img->external_data &&
      align_down (host + len - 1, img->cluster_size) >=
      qcow2_file_size (img)) {
    qcow2_error ("data cluster at host offset %#" PRIx64
                 " lies past the end of the file", host);
    return -EIO;
  }

  if (!img->crypt) {
    r = qcow2_io_pwrite (img->data_io, buf, len, host);
    if (r == 0) {
      /* The file may have grown (see above): let the read path, which
       * refuses data past the known end, see the bytes just written.
       */
      qcow2_size_grow (img->external_data ? &img->data_file_size
                                          : &img->file_size, host + len);
    }
  }
  else {
    const bool by_host = qcow2_crypt_iv_uses_host_offset (img->crypt);
    const uint64_t S = QCOW2_CRYPT_SECTOR;
    uint64_t start = align_down (host, S);
    uint64_t end = align_down (host + len + S - 1, S);
    uint64_t gstart = guest - (host - start);
    unsigned char *bounce = qcow2_scratch (SCRATCH_WRITE, end - start);

    if (!bounce)
      return -ENOMEM;
    if (start != host || end != host + len) {
      /* Keep the bytes of the edge sectors that are not ours. */
      r = qcow2_read_l1 (img, img->l1, img->l1_size, bounce, S, gstart);
      if (r == 0 && end - start > S)
        r = qcow2_read_l1 (img, img->l1, img->l1_size,
                           bounce + (end - start - S), S, gstart + (end - start - S));
      if (r < 0)
        return r;
    }
    memcpy (bounce + (host - start), buf, len);
    r = qcow2_crypt_encrypt (img->crypt, (by_host ? start : gstart) / S,
                             bounce, end - start);
    if (r == 0)
      r = qcow2_io_pwrite (img->data_io, bounce, end - start, start);
  }
  if (r < 0)
    qcow2_error ("write of %" PRIu64 " bytes at host offset %#" PRIx64
                 " failed: %s", len, host, strerror (-r));
  return r;
}

/* The writer state (writer.c), not img->w: that is set while writing is
 * still being enabled, before the refcounts are loaded.
 */
int
qcow2_check_can_write (struct qcow2_image *img)
{
  return qcow2_writer_require (img, NULL);
}

/* Write in place the prefix of [offset, offset + len) that is exclusively
 * owned data.  Sets *done to the bytes written.
 */
static int
write_in_place (struct qcow2_image *img, const unsigned char *buf,
                uint64_t len, uint64_t offset, uint64_t *done)
{
  *done = 0;
  while (*done < len) {
    struct qcow2_run run;
    int r = qcow2_map (img, img->l1, img->l1_size, offset + *done,
                       len - *done, &run);
    if (r < 0)
      return r;
    if (run.kind != RUN_DATA || !run.copied)
      return 0;
    r = write_host (img, buf + *done, run.length, run.host_offset,
                    offset + *done);
    if (r < 0)
      return r;
    *done += run.length;
  }
  return 0;
}

/* A new host cluster for guest cluster `guest` (for n clusters). */
static int
new_clusters (struct qcow2_image *img, uint64_t guest, uint64_t n,
              uint64_t *host)
{
  int r = 0;

  if (img->external_data) {
    /* Data clusters of an external data file sit at their guest offset. */
    *host = guest;
    return 0;
  }
  qcow2_writer_lock (img);
  r = n > 1 ? qcow2_alloc_clusters_try (img, n, host)   /* see below */
            : qcow2_alloc_clusters (img, n, host);
  qcow2_writer_unlock (img);
  return r;
}

/* The entry that maps a guest cluster to `host`, owned. */
static uint64_t
owned_entry (uint64_t host)
{
  return host | QCOW2_OFLAG_COPIED;
}

/* Whole clusters [guest, guest + n * cluster) that all need new host
 * clusters: one allocation, one write straight from buf.  Where no run
 * of n free clusters exists (a fixed-size container has no end to grow
 * past), the halves are written separately, down to single clusters.
 */
static int
write_whole_clusters (struct qcow2_image *img, const unsigned char *buf,
                      uint64_t n, uint64_t guest)
{
  uint64_t host;
  int r = new_clusters (img, guest, n, &host);

  if (r == -ENOSPC && n > 1) {
    uint64_t half = n / 2;
    r = write_whole_clusters (img, buf, half, guest);
    if (r == 0)
      r = write_whole_clusters (img, buf + (half << img->cluster_bits),
                                n - half, guest + (half << img->cluster_bits));
    return r;
  }
  if (r == 0)
    r = write_host (img, buf, n << img->cluster_bits, host, guest);
  for (uint64_t i = 0; r == 0 && i < n; i++) {
    uint64_t cluster_host = host + (i << img->cluster_bits);
    r = qcow2_entry_publish (img, guest + (i << img->cluster_bits),
                 owned_entry (cluster_host),
                 img->extended_l2 ? QCOW2_ALL_SUBCLUSTERS : 0, true);
  }
  return r;
}

/* Part [offset, offset + len) of one guest cluster, standard L2. */
static int
write_cluster (struct qcow2_image *img, const unsigned char *buf,
               uint64_t len, uint64_t offset, const struct qcow2_entry *st)
{
  const uint64_t cs = img->cluster_size;
  uint64_t guest = align_down (offset, cs);
  unsigned char *content;
  uint64_t host;
  bool reuse;
  int r;

  if (st->owned && !(st->entry & QCOW2_OFLAG_ZERO))
    return write_host (img, buf, len, st->host + (offset - guest), offset);

  /* What the guest sees now, with the new bytes merged in. */
  content = malloc (cs);
  if (!content)
    return -ENOMEM;
  r = qcow2_read_l1 (img, img->l1, img->l1_size, content, cs, guest);
  if (r < 0)
    goto out;
  memcpy (content + (offset - guest), buf, len);

  /* A preallocated zero cluster that we own is filled in place. */
  reuse = st->owned;
  if (reuse)
    host = st->host;
  else if ((r = new_clusters (img, guest, 1, &host)) < 0)
    goto out;
  r = write_host (img, content, cs, host, guest);
  if (r == 0)
    r = qcow2_entry_publish (img, guest, owned_entry (host), 0, !reuse);
 out:
  free (content);
  return r;
}

/* Part [offset, offset + len) of one guest cluster, extended L2: write
 * whole subclusters, merging the partial ones with what the guest sees.
 */
static int
write_subclusters (struct qcow2_image *img, const unsigned char *buf,
                   uint64_t len, uint64_t offset,
                   const struct qcow2_entry *st)
{
  const uint64_t cs = img->cluster_size, sub = img->subcluster_size;
  uint64_t guest = align_down (offset, cs);
  unsigned first = (unsigned) ((offset - guest) / sub);
  unsigned last = (unsigned) ((offset + len - 1 - guest) / sub);
  uint64_t touched = ((2ull << last) - 1) & ~((1ull << first) - 1);
  uint64_t alloc = st->bitmap & QCOW2_ALL_SUBCLUSTERS;
  uint64_t zero = st->bitmap >> 32;
  uint64_t wstart, wend, host;
  unsigned char *content;
  bool replace = st->compressed || (st->allocated && !st->owned);
  int r;

  if (replace) {
    /* The whole cluster moves to a new host cluster. */
    wstart = 0;
    wend = cs;
    if (st->compressed) {
      alloc = QCOW2_ALL_SUBCLUSTERS;
      zero = 0;
    }
  }
  else {
    wstart = first * sub;
    wend = (last + 1) * sub;
  }
  alloc |= touched;
  zero &= ~touched;

  content = malloc (wend - wstart);
  if (!content)
    return -ENOMEM;
  r = qcow2_read_l1 (img, img->l1, img->l1_size, content, wend - wstart,
                     guest + wstart);
  if (r < 0)
    goto out;
  memcpy (content + (offset - guest - wstart), buf, len);

  if (st->owned)
    host = st->host;
  else if ((r = new_clusters (img, guest, 1, &host)) < 0)
    goto out;
  else if (wend - wstart < cs)
    /* The rest of the new cluster is written later, a subcluster at a
     * time: reserve it whole now (as QEMU does), or every later write
     * makes the host file system allocate blocks inside a hole, which
     * costs more than the write itself.
     */
    qcow2_io_preallocate (img->data_io, host, cs);
  r = write_host (img, content, wend - wstart, host + wstart, guest + wstart);
  if (r == 0)
    r = qcow2_entry_publish (img, guest, owned_entry (host), zero << 32 | alloc,
                 !st->owned);
 out:
  free (content);
  return r;
}

/* Write [offset, offset + len) through allocation, cluster by cluster.
 * The caller holds the clusters' range locks exclusive.
 */
int
qcow2_write_locked (struct qcow2_image *img, const unsigned char *buf,
                    uint64_t len, uint64_t offset)
{
  const uint64_t cs = img->cluster_size;

  while (len > 0) {
    uint64_t guest = align_down (offset, cs);
    uint64_t n = min_u64 (len, guest + cs - offset);
    struct qcow2_entry st;
    int r = qcow2_entry_lookup (img, guest, &st);
    if (r < 0)
      return r;

    if (n == cs && !st.owned) {
      /* Gather the following whole clusters that need new ones too. */
      uint64_t count = 1;
      while ((count + 1) * cs <= len) {
        struct qcow2_entry next;
        r = qcow2_entry_lookup (img, guest + count * cs, &next);
        if (r < 0)
          return r;
        if (next.owned)
          break;
        count++;
      }
      r = write_whole_clusters (img, buf, count, guest);
      n = count * cs;
    }
    else if (img->extended_l2)
      r = write_subclusters (img, buf, n, offset, &st);
    else
      r = write_cluster (img, buf, n, offset, &st);
    if (r < 0)
      return r;
    buf += n;
    offset += n;
    len -= n;
  }
  return 0;
}

int
qcow2_write (struct qcow2_image *img, const void *buf, uint64_t len,
             uint64_t offset, bool fua)
{
  uint64_t first, count, done;
  bool in_place_excl;
  int r;

  if ((r = qcow2_check_can_write (img)) < 0)
    return r;
  if (range_exceeds (offset, len, img->h.size)) {
    qcow2_error ("write of %" PRIu64 " bytes at %" PRIu64
                 " is beyond the end of the disk (%" PRIu64 " bytes)",
                 len, offset, img->h.size);
    return -ENOSPC;
  }
  if (len == 0)
    return 0;
  /* Persistent bitmaps: marked before the write, so a write that fails
   * half way is counted too.
   */
  qcow2_bitmaps_mark (img, offset, len);

  qcow2_cluster_span (img, offset, len, &first, &count);
  /* Encrypted data is written in whole sectors: a partial sector is read,
   * merged and rewritten (write_host), which must not race with another
   * write into the same sector, so such requests hold their clusters
   * exclusive even in place.
   */
  in_place_excl = img->crypt &&
                  (!is_aligned (offset, QCOW2_CRYPT_SECTOR) ||
                   !is_aligned (offset + len, QCOW2_CRYPT_SECTOR));
  qcow2_rangelock_lock (img->ranges, first, count, in_place_excl);
  r = write_in_place (img, buf, len, offset, &done);
  qcow2_rangelock_unlock (img->ranges, first, count);

  if (r == 0 && done < len) {
    uint64_t rest = offset + done;
    qcow2_cluster_span (img, rest, len - done, &first, &count);
    qcow2_rangelock_lock (img->ranges, first, count, true);
    r = qcow2_write_locked (img, (const unsigned char *) buf + done, len - done,
                          rest);
    qcow2_rangelock_unlock (img->ranges, first, count);
  }
  if (r == 0 && fua)
    r = qcow2_flush (img);
  return r;
}

int
qcow2_flush (struct qcow2_image *img)
{
  /* The writer state, not img->w: writing may be enabled by another
   * thread right now (the plugin does it at the first write), and img->w
   * is set before the writer is complete.  Until the state is WRITABLE
   * nothing was written, so there is nothing to flush; once BROKEN,
   * nothing written since the last successful flush can be made durable.
   */
  switch (qcow2_writer_state (img)) {
  case QCOW2_WRITER_READ_ONLY:
  case QCOW2_WRITER_ENABLING:
    return 0;
  case QCOW2_WRITER_BROKEN:
    return qcow2_writer_refuse_broken (img);
  case QCOW2_WRITER_WRITABLE:
    break;
  }
  return qcow2_sync_flush (img);
}
