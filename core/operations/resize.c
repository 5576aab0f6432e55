/* Growing the virtual disk.
 *
 * A larger disk needs a larger L1 table.  QEMU's order
 * (qcow2_grow_l1_table; durable.c rules 1, 6 and 2): write the new table
 * (a copy of the old entries, then zeros) into fresh clusters and sync;
 * switch the header's size, l1_size and l1_table_offset in one write and
 * sync; only then release the old table.  A crash at any point leaves either the old or the new
 * geometry, at worst with a leaked table.
 *
 * Resizing happens before the image serves requests (plugin startup,
 * image creation), so swapping the in-memory L1 needs no reader protocol.
 * Shrinking is refused: it would discard guest data.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "cache.h"
#include "internal.h"
#include "io.h"
#include "util.h"

int
qcow2_grow_l1 (struct qcow2_image *img, uint64_t new_size, uint32_t new_l1_size)
{
  uint64_t bytes = (uint64_t) new_l1_size * 8;
  uint64_t old_offset = img->h.l1_table_offset;
  uint64_t old_bytes = (uint64_t) img->l1_size * 8;
  uint64_t new_offset, clusters;
  /* size, crypt_method, l1_size, l1_table_offset: adjacent fields. */
  unsigned char *table, hdr[QCOW2_HDR_REFCOUNT_TABLE_OFFSET - QCOW2_HDR_SIZE];
  uint64_t *l1;
  int r;

  qcow2_writer_assert_locked (img);
  clusters = div_round_up (bytes, img->cluster_size);
  table = calloc (clusters, img->cluster_size);
  l1 = malloc (bytes ? bytes : 1);
  if (!table || !l1) {
    r = -ENOMEM;
    goto out;
  }
  for (uint32_t i = 0; i < img->l1_size; i++)
    put_be64 (table + i * 8, img->l1[i]);

  r = qcow2_alloc_clusters (img, clusters, &new_offset);
  if (r < 0)
    goto out;
  /* Rule 1: the new clusters' refcounts durable; rule 6: the table
   * durable, then the header switches to it in one write.
   */
  r = qcow2_meta_refcounts_durable (img, QCOW2_RULE_ALLOC_REFCOUNT_FIRST);
  if (r == 0)
    r = qcow2_meta_write_durable (img, QCOW2_RULE_HEADER_LAST, table,
                                  clusters << img->cluster_bits, new_offset);
  if (r < 0)
    goto out;   /* the image is BROKEN (durable.c) */

  put_be64 (hdr, new_size);
  put_be32 (hdr + (QCOW2_HDR_CRYPT_METHOD - QCOW2_HDR_SIZE),
            img->h.crypt_method);
  put_be32 (hdr + (QCOW2_HDR_L1_SIZE - QCOW2_HDR_SIZE), new_l1_size);
  put_be64 (hdr + (QCOW2_HDR_L1_TABLE_OFFSET - QCOW2_HDR_SIZE), new_offset);
  r = qcow2_meta_write_durable (img, QCOW2_RULE_HEADER_LAST, hdr, sizeof hdr,
                                QCOW2_HDR_SIZE);
  if (r < 0)
    goto out;   /* the image is BROKEN (durable.c) */

  memcpy (l1, img->l1, old_bytes);
  memset ((char *) l1 + old_bytes, 0, bytes - old_bytes);
  free (img->l1);
  img->l1 = l1;
  l1 = NULL;
  img->l1_size = new_l1_size;
  img->h.l1_size = new_l1_size;
  img->h.l1_table_offset = new_offset;
  img->h.size = new_size;

  /* Rule 2: the header no longer points at the old table, durably. */
  r = qcow2_overlap_add (img, new_offset, bytes, QCOW2_META_L1);
  if (r == 0 && old_bytes > 0) {
    for (uint64_t o = 0; o < old_bytes; o += img->cluster_size)
      qcow2_overlap_remove (img, old_offset + o);
    r = qcow2_free_later (img, old_offset,
                          div_round_up (old_bytes, img->cluster_size)
                          << img->cluster_bits);
  }
  if (r == 0)
    r = qcow2_sync_metadata (img);
  goto out;

 out:
  free (table);
  free (l1);
  return r;
}

int
qcow2_write_disk_size (struct qcow2_image *img, uint64_t size)
{
  unsigned char hdr[8];
  int r;

  /* Rule 7: the L1 table already covers the new size. */
  qcow2_writer_assert_locked (img);
  put_be64 (hdr, size);
  r = qcow2_meta_write_durable (img, QCOW2_RULE_IN_PLACE, hdr, sizeof hdr,
                                QCOW2_HDR_SIZE);
  if (r == 0)
    img->h.size = size;
  return r;
}

int
qcow2_resize (struct qcow2_image *img, uint64_t new_size)
{
  uint64_t needed;
  int r;

  r = qcow2_writer_require (img, "resizing");
  if (r < 0)
    return r;
  if (new_size < img->h.size) {
    qcow2_error ("%s: shrinking the disk from %" PRIu64 " to %" PRIu64
                 " bytes is not supported (it would discard data)",
                 img->filename, img->h.size, new_size);
    return -ENOTSUP;
  }
  if (new_size % 512) {
    qcow2_error ("%s: The new size must be a multiple of 512",
                 img->filename);
    return -EINVAL;
  }
  if (new_size > INT64_MAX) {
    qcow2_error ("%s: size %" PRIu64 " too large", img->filename, new_size);
    return -EFBIG;
  }
  if (new_size == img->h.size)
    return 0;
  if (img->nb_snapshots > 0 && img->h.version < 3) {
    /* v2 snapshots have no disk size of their own. */
    qcow2_error ("%s: cannot resize a version 2 image with snapshots",
                 img->filename);
    return -ENOTSUP;
  }

  needed = div_round_up (new_size, 1ull << img->l2_bits);
  if (needed * 8 > QCOW2_MAX_L1_BYTES) {
    qcow2_error ("%s: size %" PRIu64 " needs an L1 table larger than %u "
                 "bytes", img->filename, new_size, QCOW2_MAX_L1_BYTES);
    return -EFBIG;
  }

  /* Bitmaps grow with the disk, as QEMU's do (the new part clean). */
  r = qcow2_bitmaps_resize_check (img, new_size);
  if (r < 0)
    return r;
  qcow2_writer_lock (img);
  if (needed > img->l1_size)
    r = qcow2_grow_l1 (img, new_size, (uint32_t) needed);
  else
    r = qcow2_write_disk_size (img, new_size);  /* the table covers it */
  qcow2_writer_unlock (img);
  if (r == 0)
    r = qcow2_bitmaps_resize (img, new_size);
  return r;
}
