/* Reaching L2 entries through an L1 table: see l2.h.
 *
 * Every reader of L2 entries comes through here: the read path (map.c)
 * and the writer's lookup (l2_write.c) one slice at a time, the
 * whole-table passes (check.c, copied.c, snapshots.c) by the walk.  So
 * an L2 table offset from an untrusted L1 entry is checked in one place
 * before anything reads there.
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
  const uint64_t l1_index = guest >> img->l2_bits;
  const uint64_t l2_index = (guest >> img->cluster_bits) &
                            (img->l2_entries - 1);

  pos->l2 = l1_index < l1_size
            ? qcow2_l1_entry (l1, l1_index) & QCOW2_L1E_OFFSET_MASK : 0;
  pos->first = l2_index - l2_index % img->slice_entries;
  pos->index = l2_index - pos->first;
  *slice = NULL;
  if (pos->l2 == 0)
    return 0;
  if (!qcow2_l2_offset_ok (img, pos->l2))
    return qcow2_l2_offset_check (img, pos->l2, l1_index);
  return qcow2_l2_slice_get (img, pos->l2, pos->first * img->l2_entry_bytes,
                             slice);
}

int
qcow2_walk_l2 (struct qcow2_image *img, uint64_t l2,
               const struct qcow2_walk *walk)
{
  for (uint64_t o = 0; o < img->cluster_size; o += img->slice_size) {
    struct qcow2_walk_entry e = { .changed = false };
    struct qcow2_slice *slice;
    int r = qcow2_l2_slice_get (img, l2, o, &slice);

    if (r < 0) {
      if (walk->slice_error)
        r = walk->slice_error (img, r, walk->opaque);
      if (r == 0)
        continue;
      return r == QCOW2_WALK_SKIP ? 0 : r;
    }
    for (uint32_t j = 0; r == 0 && j < img->slice_entries; j++) {
      e.index = o / img->l2_entry_bytes + j;
      e.p = slice->data + j * img->l2_entry_bytes;
      e.entry = qcow2_l2_load (e.p);
      r = walk->entry (img, &e, walk->opaque);
    }
    if (e.changed)
      qcow2_cache_mark_dirty (img->l2_cache, slice);
    qcow2_cache_put (img->l2_cache, slice);
    if (r == 0 && walk->slice_done)
      r = walk->slice_done (img, walk->opaque);
    if (r != 0)
      return r;
  }
  return 0;
}

int
qcow2_walk_l1 (struct qcow2_image *img, const uint64_t *l1,
               uint32_t l1_size, const struct qcow2_walk *walk)
{
  for (uint32_t i = 0; i < l1_size; i++) {
    uint64_t l2 = qcow2_l1_entry (l1, i) & QCOW2_L1E_OFFSET_MASK;
    int r = 0;

    if (!l2)
      continue;
    if (!qcow2_l2_offset_ok (img, l2))
      r = walk->bad_table ? walk->bad_table (img, i, l2, walk->opaque)
                          : qcow2_l2_offset_check (img, l2, i);
    else {
      if (walk->table)
        r = walk->table (img, i, l2, walk->opaque);
      if (r == 0)
        r = qcow2_walk_l2 (img, l2, walk);
    }
    if (r != 0 && r != QCOW2_WALK_SKIP)
      return r;
  }
  return 0;
}

void
qcow2_walk_entry_set (struct qcow2_walk_entry *e, uint64_t entry)
{
  qcow2_l2_store (e->p, entry);
  e->entry = entry;
  e->changed = true;
}

int
qcow2_entry_refs (struct qcow2_image *img, uint64_t entry, uint64_t *offset,
                  uint64_t *len)
{
  struct qcow2_entry st;

  qcow2_entry_classify (img, entry, 0, &st);
  *offset = *len = 0;
  if (st.compressed) {
    uint64_t coffset, nsectors;
    qcow2_compressed_extent (img, entry, &coffset, &nsectors);
    *offset = align_down (coffset, 512);
    *len = nsectors * 512;
  }
  else if (st.allocated && !img->external_data) {
    if (!is_aligned (st.host, img->cluster_size)) {
      qcow2_error ("%s: Cluster allocation offset %#" PRIx64 " unaligned",
                   img->filename, st.host);
      return -EIO;
    }
    *offset = st.host;
    *len = img->cluster_size;
  }
  return 0;
}

/* What an L2 entry means for a writer (internal.h). */
void
qcow2_entry_classify (const struct qcow2_image *img, uint64_t entry,
                      uint64_t bitmap, struct qcow2_entry *st)
{
  st->entry = entry;
  st->bitmap = bitmap;
  st->compressed = entry & QCOW2_OFLAG_COMPRESSED;
  st->host = st->compressed ? 0 : entry & QCOW2_L2E_OFFSET_MASK;
  st->allocated = !st->compressed &&
                  (st->host != 0 ||
                   (img->external_data && (entry & QCOW2_OFLAG_COPIED)));
  st->owned = st->allocated &&
              (img->external_data || (entry & QCOW2_OFLAG_COPIED));
}
