/* Reaching L2 entries through an L1 table: see l2.h.
 *
 * The read path (map.c) and the writer's lookup (cluster.c) find the
 * slice of a guest offset here, so an L2 table offset from an untrusted
 * L1 entry is checked in one place before anything reads there.
 */
#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include "cache.h"
#include "internal.h"
#include "l2.h"
#include "util.h"

bool
qcow2_l2_offset_ok (const struct qcow2_image *img, uint64_t l2)
{
  return is_aligned (l2, img->cluster_size) &&
         !range_exceeds (l2, img->cluster_size, qcow2_file_size (img));
}

int
qcow2_l2_offset_check (struct qcow2_image *img, uint64_t l2,
                       uint64_t l1_index)
{
  if (!is_aligned (l2, img->cluster_size)) {
    qcow2_error ("%s: L2 table offset %#" PRIx64 " unaligned (L1 index: %#"
                 PRIx64 ")", img->filename, l2, l1_index);
    return -EIO;
  }
  if (range_exceeds (l2, img->cluster_size, qcow2_file_size (img))) {
    qcow2_error ("%s: L2 table offset %#" PRIx64 " (L1 index: %#" PRIx64
                 ") lies past the end of the file", img->filename, l2,
                 l1_index);
    return -EIO;
  }
  return 0;
}

int
qcow2_l2_slice_get (struct qcow2_image *img, uint64_t l2, uint64_t o,
                    struct qcow2_slice **slice)
{
  int r = qcow2_cache_get (img->l2_cache, l2 + o, slice);

  if (r < 0)
    qcow2_error ("%s: could not read L2 table at %#" PRIx64 ": %s",
                 img->filename, l2, strerror (-r));
  return r;
}

int
qcow2_l2_slice_of_guest (struct qcow2_image *img, const uint64_t *l1,
                         uint32_t l1_size, uint64_t guest,
                         struct qcow2_slice **slice,
                         struct qcow2_l2_pos *pos)
{
  const unsigned l2_shift = img->cluster_bits +
                            (unsigned) __builtin_ctzll (img->l2_entries);
  const uint64_t l1_index = guest >> l2_shift;
  const uint64_t l2_index = (guest >> img->cluster_bits) &
                            (img->l2_entries - 1);
  int r;

  pos->l2 = l1_index < l1_size
            ? qcow2_l1_entry (l1, l1_index) & QCOW2_L1E_OFFSET_MASK : 0;
  pos->first = l2_index - l2_index % img->slice_entries;
  pos->index = l2_index - pos->first;
  *slice = NULL;
  if (pos->l2 == 0)
    return 0;
  r = qcow2_l2_offset_check (img, pos->l2, l1_index);
  if (r == 0)
    r = qcow2_l2_slice_get (img, pos->l2, pos->first * img->l2_entry_bytes,
                            slice);
  return r;
}
