/* Guest-to-host mapping: turn a guest offset into a run of bytes that share
 * one kind (unallocated, zero, data at a host offset, compressed), by way
 * of the L1 table, a cached L2 slice and the L2 entry (plus its subcluster
 * bitmap with extended L2).
 *
 * A run never crosses an L2 slice, so one lookup pins one slice.  Data runs
 * grow across clusters while their host clusters are contiguous, which is
 * what lets the read path issue one I/O for a contiguous host range.
 * Compressed runs stay inside one cluster.
 *
 * Corrupt entries fail with -EIO and one message naming the entry, in
 * QEMU's words (qcow2_get_host_offset).
 */
#include <errno.h>
#include <inttypes.h>

#include "cache.h"
#include "internal.h"
#include "l2.h"
#include "util.h"

struct entry_view {
  uint64_t l2_offset;
  uint64_t l2_index;
};

/* Classify subcluster sc (0 with standard L2) of a cluster described by
 * entry (and bitmap with extended L2).  guest_cluster is the cluster's
 * guest offset.  On success sets *kind and *host (the host offset of the
 * cluster's first byte, for DATA and ZERO_ALLOC; the descriptor for
 * COMPRESSED).
 */
static int
classify (const struct qcow2_image *img, const struct entry_view *where,
          uint64_t entry, uint64_t bitmap, unsigned sc,
          uint64_t guest_cluster, enum qcow2_run_kind *kind, uint64_t *host)
{
  uint64_t offset = entry & QCOW2_L2E_OFFSET_MASK;
  bool allocated;

  if (entry & QCOW2_OFLAG_COMPRESSED) {
    if (img->external_data) {
      qcow2_error ("Compressed cluster entry found in image with external "
                   "data file (L2 offset: %#" PRIx64 ", L2 index: %#" PRIx64
                   ")", where->l2_offset, where->l2_index);
      return -EIO;
    }
    *kind = RUN_COMPRESSED;
    *host = entry & ~(QCOW2_OFLAG_COPIED | QCOW2_OFLAG_COMPRESSED);
    return 0;
  }

  /* Offset 0 is a real cluster only in an external data file, where
   * COPIED disambiguates it.
   */
  allocated = offset != 0 ||
              (img->external_data && (entry & QCOW2_OFLAG_COPIED));

  if (!img->extended_l2) {
    if (entry & QCOW2_OFLAG_ZERO) {
      if (img->h.version < 3) {
        qcow2_error ("Zero cluster entry found in pre-v3 image (L2 offset: %#"
                     PRIx64 ", L2 index: %#" PRIx64 ")", where->l2_offset,
                     where->l2_index);
        return -EIO;
      }
      *kind = offset ? RUN_ZERO_ALLOC : RUN_ZERO_PLAIN;
    }
    else
      *kind = allocated ? RUN_DATA : RUN_UNALLOCATED;
  }
  else {
    uint32_t alloc = (uint32_t) bitmap, zero = (uint32_t) (bitmap >> 32);

    if ((alloc & zero) || (!allocated && alloc)) {
      qcow2_error ("Invalid cluster entry found (L2 offset: %#" PRIx64
                   ", L2 index: %#" PRIx64 ")", where->l2_offset,
                   where->l2_index);
      return -EIO;
    }
    if (alloc & (1u << sc))
      *kind = RUN_DATA;
    else if (zero & (1u << sc))
      *kind = allocated ? RUN_ZERO_ALLOC : RUN_ZERO_PLAIN;
    else
      *kind = RUN_UNALLOCATED;
  }

  if (allocated && *kind != RUN_UNALLOCATED && *kind != RUN_ZERO_PLAIN) {
    if (!is_aligned (offset, img->cluster_size)) {
      qcow2_error ("Cluster allocation offset %#" PRIx64
                   " unaligned (L2 offset: %#" PRIx64 ", L2 index: %#"
                   PRIx64 ")", offset, where->l2_offset, where->l2_index);
      return -EIO;
    }
    if (img->external_data && offset != guest_cluster) {
      qcow2_error ("External data file host cluster offset %#" PRIx64
                   " does not match guest cluster offset: %#" PRIx64
                   " (L2 index: %#" PRIx64 ")", offset, guest_cluster,
                   where->l2_index);
      return -EIO;
    }
  }
  *host = offset;
  return 0;
}

int
qcow2_map (struct qcow2_image *img, const uint64_t *l1, uint32_t l1_size,
           uint64_t offset, uint64_t max_len, struct qcow2_run *run)
{
  const uint32_t cbits = img->cluster_bits;
  const uint64_t l2_start = (offset >> img->l2_bits) << img->l2_bits;
  uint64_t end, pos;
  struct qcow2_slice *slice;
  struct qcow2_l2_pos at;
  struct entry_view where;
  int r;

  r = qcow2_l2_slice_of_guest (img, l1, l1_size, offset, &slice, &at);
  if (r < 0)
    return r;
  if (!slice) {
    /* Clip to this L2 table's coverage. */
    end = offset + min_u64 (max_len, l2_start + (1ull << img->l2_bits) - offset);
    run->kind = RUN_UNALLOCATED;
    run->length = end - offset;
    run->host_offset = 0;
    run->copied = false;
    return 0;
  }
  /* Clip to this slice's coverage. */
  end = offset + min_u64 (max_len,
                          l2_start + ((at.first + img->slice_entries) << cbits)
                          - offset);

  where.l2_offset = at.l2;
  pos = offset;
  while (pos < end) {
    uint64_t guest_cluster = pos & ~(img->cluster_size - 1);
    uint64_t idx = ((pos >> cbits) & (img->l2_entries - 1)) - at.first;
    const unsigned char *p = slice->data + idx * img->l2_entry_bytes;
    uint64_t entry, bitmap = 0;
    if (img->extended_l2)
      qcow2_l2_load_pair (img, p, &entry, &bitmap);
    else
      entry = qcow2_l2_load (p);
    uint64_t unit = img->extended_l2 ? img->subcluster_size
                                     : img->cluster_size;
    unsigned sc = (unsigned) ((pos - guest_cluster) >> img->subcluster_bits);
    enum qcow2_run_kind kind;
    uint64_t host, unit_start, unit_end;

    where.l2_index = at.first + idx;
    r = classify (img, &where, entry, bitmap, sc, guest_cluster, &kind,
                  &host);
    if (r < 0)
      goto out;
    if (kind == RUN_COMPRESSED)
      unit = img->cluster_size;
    unit_start = pos & ~(unit - 1);
    unit_end = min_u64 (unit_start + unit, end);

    bool copied = img->external_data || (entry & QCOW2_OFLAG_COPIED);
    if (pos == offset) {
      run->kind = kind;
      run->host_offset = kind == RUN_COMPRESSED ? host
                         : host + (pos - guest_cluster);
      run->copied = copied;
    }
    else if (kind != run->kind || kind == RUN_COMPRESSED ||
             (kind == RUN_DATA &&
              (copied != run->copied ||
               host + (pos - guest_cluster) !=
               run->host_offset + (pos - offset))))
      break;
    pos = unit_end;
    if (kind == RUN_COMPRESSED)
      break;
  }
  run->length = pos - offset;
  r = 0;

 out:
  qcow2_cache_put (img->l2_cache, slice);
  return r;
}
