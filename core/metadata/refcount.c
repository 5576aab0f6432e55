/* Reference counts: read and update them at any width (1 to 64 bits),
 * allocate clusters, grow the refcount structures.
 *
 * Everything here runs under the writer lock (struct qcow2_writer).
 *
 * Invariants:
 * - a cluster is handed out only if its refcount is 0 and it is not queued
 *   in `pending` (queued clusters still have their old refcount, so the
 *   search skips them until flush.c applies the decrement);
 * - a new refcount block is placed at the first cluster of the range it
 *   covers, so it describes itself and never needs another block: a range
 *   without a block has no used cluster, so that cluster is free.  That
 *   leaves no free run longer than a range, so a larger allocation goes
 *   past the end of the file instead, behind the refcount blocks it needs,
 *   packed together and counting each other (alloc_past_end);
 * - in a fixed-size container (io.h) nothing is allocated at or past
 *   cluster_limit: the search fails with -ENOSPC before it changes
 *   anything there, and there is no "past the end" (alloc_past_end
 *   refuses, so callers allocate smaller runs); a refcount table that
 *   must grow is placed past the last refcount block, inside it;
 * - refcount table growth writes the new blocks and table beyond the end of
 *   the file, syncs them, then switches the header in one write and sync,
 *   and only then frees the old table (QEMU's order, qcow2_refcount_area;
 *   durable.c rules 5, 6 and 2);
 * - refcount increases reach the disk before any L2 entry that uses them,
 *   because flush.c writes this cache back and syncs before the L2 cache
 *   (durable.c rule 1);
 * - memory follows disk: w->reftable and the overlap set learn of a new
 *   refcount block only once the table entry pointing at it is written
 *   (after the block is durable), and of a new table only once the header
 *   pointing at it is durable;
 * - every refcount that drops to 0 is announced to the layer above
 *   (qcow2_on_cluster_freed): the packer of compressed data (compressed_write.c)
 *   then forgets the cluster it packs into, which its compressed clusters
 *   alone count, so a cluster handed out whole never receives packed
 *   bytes.
 */
#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "cache.h"
#include "debug.h"
#include "internal.h"
#include "io.h"
#include "util.h"

int
qcow2_refcount_init (struct qcow2_image *img)
{
  struct qcow2_writer *w = img->w;
  uint64_t bytes = (uint64_t) img->h.refcount_table_clusters *
                   img->cluster_size;
  int r;

  qcow2_writer_assert_locked (img);
  w->refcount_bits = 1u << img->h.refcount_order;
  w->refcount_max = w->refcount_bits == 64 ? UINT64_MAX
                    : (1ull << w->refcount_bits) - 1;
  w->refblock_entries = img->cluster_size * 8 / w->refcount_bits;
  w->reftable_entries = bytes / 8;
  w->reftable_offset = img->h.refcount_table_offset;
  w->reftable = malloc (bytes);
  if (!w->reftable)
    return -ENOMEM;
  r = qcow2_io_pread (img->io, w->reftable, bytes, w->reftable_offset);
  if (r < 0) {
    qcow2_error ("%s: could not read the refcount table: %s", img->filename,
                 strerror (-r));
    return r;
  }
  for (uint64_t i = 0; i < w->reftable_entries; i++) {
    uint64_t e = get_be64 (&w->reftable[i]);
    if (e & ~QCOW2_REFT_OFFSET_MASK ||
        !is_aligned (e, img->cluster_size) ||
        range_exceeds (e, img->cluster_size, img->file_size)) {
      qcow2_error ("%s: Refblock offset %#" PRIx64 " invalid (refcount "
                   "table index %" PRIu64 ")", img->filename, e, i);
      return -EINVAL;
    }
    w->reftable[i] = e;
  }
  w->refblock_cache = qcow2_cache_new (img->io, img->slice_size, 256);
  return w->refblock_cache ? 0 : -ENOMEM;
}

void
qcow2_refcount_fini (struct qcow2_image *img)
{
  qcow2_cache_free (img->w->refblock_cache);
  free (img->w->reftable);
  free (img->w->pending);
}

/* Where the refcount of `cluster` lives: its refblock's slice and the bit
 * position inside the slice.  Returns 0 with *slice_offset = 0 when the
 * cluster has no refcount block (refcount 0).
 */
static int
locate (struct qcow2_image *img, uint64_t cluster, uint64_t *slice_offset,
        uint64_t *bit)
{
  struct qcow2_writer *w = img->w;
  uint64_t index = cluster / w->refblock_entries;
  uint64_t bit_in_block = (cluster % w->refblock_entries) * w->refcount_bits;
  uint64_t slice_bits = (uint64_t) img->slice_size * 8;

  *slice_offset = 0;
  if (index >= w->reftable_entries || w->reftable[index] == 0)
    return 0;
  *slice_offset = w->reftable[index] + bit_in_block / slice_bits * img->slice_size;
  *bit = bit_in_block % slice_bits;
  return 0;
}

static uint64_t
get_entry (const unsigned char *data, uint64_t bit, uint32_t width)
{
  const unsigned char *p = data + bit / 8;

  switch (width) {
  case 1: case 2: case 4:
    return (*p >> (bit % 8)) & ((1u << width) - 1);
  case 8:
    return *p;
  case 16:
    return get_be16 (p);
  case 32:
    return get_be32 (p);
  default:
    return get_be64 (p);
  }
}

static void
set_entry (unsigned char *data, uint64_t bit, uint32_t width, uint64_t v)
{
  unsigned char *p = data + bit / 8;

  switch (width) {
  case 1: case 2: case 4: {
    unsigned mask = ((1u << width) - 1) << (bit % 8);
    *p = (unsigned char) ((*p & ~mask) | ((v << (bit % 8)) & mask));
    break;
  }
  case 8:
    *p = (unsigned char) v;
    break;
  case 16:
    p[0] = (unsigned char) (v >> 8);
    p[1] = (unsigned char) v;
    break;
  case 32:
    put_be32 (p, (uint32_t) v);
    break;
  default:
    put_be64 (p, v);
  }
}

int
qcow2_refcount_get (struct qcow2_image *img, uint64_t cluster,
                    uint64_t *refcount)
{
  struct qcow2_slice *slice;
  uint64_t slice_offset, bit;
  int r;

  qcow2_writer_assert_locked (img);
  locate (img, cluster, &slice_offset, &bit);
  if (slice_offset == 0) {
    *refcount = 0;
    return 0;
  }
  r = qcow2_cache_get (img->w->refblock_cache, slice_offset, &slice);
  if (r < 0) {
    qcow2_error ("could not read refcount block at %#" PRIx64 ": %s",
                 slice_offset, strerror (-r));
    return r;
  }
  *refcount = get_entry (slice->data, bit, img->w->refcount_bits);
  qcow2_cache_put (img->w->refblock_cache, slice);
  return 0;
}

/* The first cluster that allocation may not hand out: the end of a
 * fixed-size container, else the largest offset an L2 entry can hold.
 */
static uint64_t
cluster_limit (const struct qcow2_image *img)
{
  if (qcow2_io_is_fixed_size (img->io))
    return qcow2_file_size (img) >> img->cluster_bits;
  return QCOW2_L2E_OFFSET_MASK >> img->cluster_bits;
}

static int
no_space (const struct qcow2_image *img)
{
  if (img->w->enospc_quiet)
    return -ENOSPC;   /* the caller tries smaller runs */
  if (qcow2_io_is_fixed_size (img->io))
    qcow2_error ("%s: no space left for new clusters: the container "
                 "(%" PRIu64 " bytes) is full", img->filename,
                 qcow2_file_size (img));
  else
    qcow2_error ("%s: no space left for new clusters", img->filename);
  return -ENOSPC;
}

/* Create the refcount block for reftable slot `index` at the first
 * cluster of the range it covers, describing itself.
 */
static int
create_refblock (struct qcow2_image *img, uint64_t index)
{
  struct qcow2_writer *w = img->w;
  uint64_t first = index * w->refblock_entries;
  uint64_t offset = first << img->cluster_bits;
  unsigned char entry[8];
  struct qcow2_slice *slice;
  int r;

  qcow2_writer_assert_locked (img);
  if (first >= cluster_limit (img))
    return no_space (img);
  /* The new block starts as zeros in the cache; its own refcount is
   * entry 0 of its first slice.
   */
  for (uint64_t o = 0; o < img->cluster_size; o += img->slice_size) {
    r = qcow2_cache_get_new (w->refblock_cache, offset + o, &slice);
    if (r < 0)
      return r;
    if (o == 0)
      set_entry (slice->data, 0, w->refcount_bits, 1);
    qcow2_cache_put (w->refblock_cache, slice);
  }
  /* Rule 5: the block durable, then the table entry, durable at the next
   * sync (durable.c, "a pointer's own write").
   */
  r = qcow2_meta_refcounts_durable (img, QCOW2_RULE_REFBLOCK_BEFORE_TABLE);
  if (r == 0) {
    put_be64 (entry, offset);
    r = qcow2_meta_write (img, QCOW2_RULE_REFBLOCK_BEFORE_TABLE, entry, 8,
                          w->reftable_offset + index * 8);
  }
  if (r < 0) {
    /* The table does not point at the block: forget its slices. */
    qcow2_cache_discard (w->refblock_cache, offset, img->cluster_size);
    qcow2_error ("could not write a new refcount block: %s", strerror (-r));
    return r;
  }
  w->reftable[index] = offset;
  qcow2_size_grow (&img->file_size, offset + img->cluster_size);
  return qcow2_overlap_add (img, offset, img->cluster_size,
                            QCOW2_META_REFBLOCK);
}

/* Replace the refcount table by one with at least `need` entries, placed
 * with its own new refcount blocks in fresh refblock ranges past the end of
 * everything (QEMU's self-describing refcount area).
 */
static int
grow_reftable (struct qcow2_image *img, uint64_t need)
{
  struct qcow2_writer *w = img->w;
  const uint64_t E = w->refblock_entries;
  const uint64_t per_cluster = img->cluster_size / 8;
  uint64_t start, entries, table_clusters, blocks, old_offset, old_clusters;
  unsigned char *area = NULL, hdr[12];
  uint64_t *table = NULL;
  int r;

  qcow2_writer_assert_locked (img);
  /* First refblock range at or past the end of the file with no block;
   * in a container, the first past the last block (nothing is used
   * there: a range without a block has no used cluster).
   */
  if (qcow2_io_is_fixed_size (img->io)) {
    start = w->reftable_entries;
    while (start > 0 && w->reftable[start - 1] == 0)
      start--;
  }
  else
    start = div_round_up (qcow2_file_size (img) >> img->cluster_bits, E);
  while (start < w->reftable_entries && w->reftable[start] != 0)
    start++;

  entries = need > w->reftable_entries * 3 / 2 ? need
            : w->reftable_entries * 3 / 2;
  for (;;) {
    entries = div_round_up (entries, per_cluster) * per_cluster;
    table_clusters = entries / per_cluster;
    blocks = div_round_up (table_clusters + 1, E - 1);
    if (start + blocks <= entries)
      break;
    entries = start + blocks;
  }
  if (entries * 8 > QCOW2_MAX_REFTABLE_BYTES) {
    qcow2_error ("%s: the refcount table would exceed %u bytes: image too "
                 "large", img->filename, QCOW2_MAX_REFTABLE_BYTES);
    return -EFBIG;
  }

  /* Layout from cluster start * E: `blocks` refcount blocks, then the
   * table.  The blocks count every cluster of the area.
   */
  uint64_t area_clusters = blocks + table_clusters;
  uint64_t area_offset = (start * E) << img->cluster_bits;
  if (start * E + area_clusters > cluster_limit (img))
    return no_space (img);
  area = calloc (area_clusters, img->cluster_size);
  table = calloc (entries, 8);
  if (!area || !table) {
    r = -ENOMEM;
    goto out;
  }
  for (uint64_t k = 0; k < area_clusters; k++)
    set_entry (area + (k / E) * img->cluster_size,
               (k % E) * w->refcount_bits, w->refcount_bits, 1);
  for (uint64_t i = 0; i < w->reftable_entries; i++)
    put_be64 (&table[i], w->reftable[i]);
  for (uint64_t b = 0; b < blocks; b++)
    put_be64 (&table[start + b], area_offset + (b << img->cluster_bits));
  memcpy (area + (blocks << img->cluster_bits), table, entries * 8);

  /* Rules 5 and 6: the blocks and the table that points at them, in
   * fresh clusters, durable before the header points at the table.
   */
  qcow2_cache_discard (w->refblock_cache, area_offset,
                       area_clusters << img->cluster_bits);
  r = qcow2_meta_write_durable (img, QCOW2_RULE_HEADER_LAST, area,
                                area_clusters << img->cluster_bits,
                                area_offset);
  if (r < 0)
    goto out;   /* the image is BROKEN (durable.c) */

  /* Rule 6: the header's refcount_table_offset and _clusters, adjacent,
   * in one write.
   */
  old_offset = w->reftable_offset;
  old_clusters = div_round_up (w->reftable_entries * 8, img->cluster_size);
  put_be64 (hdr, area_offset + (blocks << img->cluster_bits));
  put_be32 (hdr + (QCOW2_HDR_REFCOUNT_TABLE_CLUSTERS -
            QCOW2_HDR_REFCOUNT_TABLE_OFFSET), (uint32_t) table_clusters);
  r = qcow2_meta_write_durable (img, QCOW2_RULE_HEADER_LAST, hdr, sizeof hdr,
                                QCOW2_HDR_REFCOUNT_TABLE_OFFSET);
  if (r < 0)
    goto out;   /* the image is BROKEN (durable.c) */

  for (uint64_t i = 0; i < entries; i++)
    table[i] = get_be64 (&table[i]);
  free (w->reftable);
  w->reftable = table;
  table = NULL;
  w->reftable_entries = entries;
  w->reftable_offset = area_offset + (blocks << img->cluster_bits);
  img->h.refcount_table_offset = w->reftable_offset;
  img->h.refcount_table_clusters = (uint32_t) table_clusters;
  qcow2_size_grow (&img->file_size,
                   area_offset + (area_clusters << img->cluster_bits));

  for (uint64_t b = 0; b < blocks && r == 0; b++)
    r = qcow2_overlap_add (img, area_offset + (b << img->cluster_bits),
                           img->cluster_size, QCOW2_META_REFBLOCK);
  if (r == 0)
    r = qcow2_overlap_add (img, w->reftable_offset, entries * 8,
                           QCOW2_META_REFTABLE);

  /* Rule 2: the header no longer points at the old table, durably: free
   * it now.
   */
  for (uint64_t k = 0; k < old_clusters && r == 0; k++) {
    /* No longer metadata: the allocator may hand it out again. */
    qcow2_overlap_remove (img, old_offset + (k << img->cluster_bits));
    r = qcow2_refcount_update (img, (old_offset >> img->cluster_bits) + k, -1);
  }
  goto out;

 out:
  free (area);
  free (table);
  return r;
}

int
qcow2_refcount_update (struct qcow2_image *img, uint64_t cluster, int delta)
{
  struct qcow2_writer *w = img->w;
  uint64_t index = cluster / w->refblock_entries;
  struct qcow2_slice *slice;
  uint64_t slice_offset, bit, v;
  int r;

  qcow2_writer_assert_locked (img);
  /* Without a refcount block the refcount is 0, so a decrement is an
   * underflow: say so before creating anything.  Otherwise releasing a
   * cluster that a hostile L2 entry places far past the end of the file
   * (a COW of 0x0000000e00000000) grows the refcount table and writes a
   * refcount block out there, making the file tens of GiB long.
   */
  if (delta < 0 &&
      (index >= w->reftable_entries || w->reftable[index] == 0)) {
    qcow2_error ("refcount of cluster %#" PRIx64 " would drop below 0 "
                 "(refcount 0)", cluster << img->cluster_bits);
    return -EIO;
  }
  if (index >= w->reftable_entries) {
    r = grow_reftable (img, index + 1);
    if (r < 0)
      return r;
  }
  if (w->reftable[index] == 0) {
    r = create_refblock (img, index);
    if (r < 0)
      return r;
  }
  /* The cluster has a refcount block now. */
  assert (index < w->reftable_entries && w->reftable[index] != 0);
  locate (img, cluster, &slice_offset, &bit);
  assert (slice_offset != 0);
  r = qcow2_cache_get (w->refblock_cache, slice_offset, &slice);
  if (r < 0) {
    qcow2_error ("could not read refcount block at %#" PRIx64 ": %s",
                 slice_offset, strerror (-r));
    return r;
  }
  v = get_entry (slice->data, bit, w->refcount_bits);
  if ((delta < 0 && v == 0) || (delta > 0 && v == w->refcount_max)) {
    qcow2_cache_put (w->refblock_cache, slice);
    qcow2_error ("refcount of cluster %#" PRIx64 " would %s (refcount %"
                 PRIu64 ")", cluster << img->cluster_bits,
                 delta < 0 ? "drop below 0" : "overflow", v);
    return delta < 0 ? -EIO : -EINVAL;
  }
  set_entry (slice->data, bit, w->refcount_bits, v + (uint64_t) (int64_t) delta);
  qcow2_cache_mark_dirty (w->refblock_cache, slice);
  qcow2_cache_put (w->refblock_cache, slice);
  if (delta < 0 && v == 1 && cluster < w->free_hint)
    w->free_hint = cluster;
  if (delta < 0 && v == 1)
    qcow2_on_cluster_freed (img, cluster);
  return 0;
}

int
qcow2_refcount_set (struct qcow2_image *img, uint64_t cluster, uint64_t value)
{
  struct qcow2_writer *w = img->w;
  uint64_t index = cluster / w->refblock_entries;
  struct qcow2_slice *slice;
  uint64_t slice_offset, bit;
  int r;

  qcow2_writer_assert_locked (img);
  if (value > w->refcount_max)
    return -EINVAL;
  if (value == 0 &&
      (index >= w->reftable_entries || w->reftable[index] == 0))
    return 0;
  /* Make the entry exist, then overwrite it. */
  r = qcow2_refcount_update (img, cluster, 0);
  if (r < 0)
    return r;
  locate (img, cluster, &slice_offset, &bit);
  r = qcow2_cache_get (w->refblock_cache, slice_offset, &slice);
  if (r < 0)
    return r;
  set_entry (slice->data, bit, w->refcount_bits, value);
  qcow2_cache_mark_dirty (w->refblock_cache, slice);
  qcow2_cache_put (w->refblock_cache, slice);
  if (value == 0 && cluster < w->free_hint)
    w->free_hint = cluster;
  if (value == 0)
    qcow2_on_cluster_freed (img, cluster);
  return 0;
}

/* Refcount ranges without a block among clusters [first, first + n). */
static uint64_t
missing_blocks (const struct qcow2_writer *w, uint64_t first, uint64_t n)
{
  uint64_t count = 0;

  for (uint64_t index = first / w->refblock_entries;
       index <= (first + n - 1) / w->refblock_entries; index++)
    if (index >= w->reftable_entries || w->reftable[index] == 0)
      count++;
  return count;
}

/* n clusters past everything in use, preceded by the refcount blocks that
 * the new ranges need: [start, start + k) blocks, then the n clusters.
 * Returns the first of the n.
 */
static int
alloc_past_end (struct qcow2_image *img, uint64_t n, uint64_t *first_out)
{
  struct qcow2_writer *w = img->w;
  const uint64_t E = w->refblock_entries;
  const unsigned cb = img->cluster_bits;
  uint64_t start, k, last_index, end, *block_index = NULL;
  unsigned char *blocks = NULL, entry[8];
  int r = 0;

  qcow2_writer_assert_locked (img);
  /* A container has no end to go past. */
  if (qcow2_io_is_fixed_size (img->io))
    return no_space (img);
  for (;;) {
    start = div_round_up (img->file_size, img->cluster_size);
    k = 0;
    while (missing_blocks (w, start, k + n) != k)
      k = missing_blocks (w, start, k + n);
    last_index = (start + k + n - 1) / E;
    if (last_index < w->reftable_entries)
      break;
    r = grow_reftable (img, last_index + 1);   /* moves the end: again */
    if (r < 0)
      return r;
  }
  end = start + k + n;
  if (end > cluster_limit (img))
    return no_space (img);

  if (k > 0) {
    /* Block j, at cluster start + j, serves the j-th blockless range from
     * start / E on; built whole here, it counts the clusters of [start,
     * end) in its range (the blocks themselves and the n clusters).
     */
    uint64_t j = 0;
    blocks = calloc (k, img->cluster_size);
    block_index = malloc (k * sizeof *block_index);
    if (!blocks || !block_index) {
      r = -ENOMEM;
      goto out;
    }
    for (uint64_t index = start / E; index <= last_index; index++)
      if (w->reftable[index] == 0)
        block_index[j++] = index;
    assert (j == k);
    for (j = 0; j < k; j++) {
      uint64_t lo = block_index[j] * E, hi = lo + E;
      for (uint64_t c = lo > start ? lo : start; c < hi && c < end; c++)
        set_entry (blocks + (j << cb), (c % E) * w->refcount_bits,
                   w->refcount_bits, 1);
    }
  }

  /* Clusters in ranges that already have a block are counted there,
   * through the cache.
   */
  for (uint64_t c = start; r == 0 && c < end; c++)
    if (w->reftable[c / E] != 0)
      r = qcow2_refcount_update (img, c, 1);
  if (r < 0)
    goto out;

  if (k > 0) {
    /* Rule 5: the blocks, and rule 1: the counts just made in older
     * blocks (some count new blocks), durable; then the table entries
     * pointing at the new blocks, durable at the next sync (durable.c,
     * "a pointer's own write").
     */
    uint64_t j;
    qcow2_cache_discard (w->refblock_cache, start << cb, k << cb);
    r = qcow2_meta_write (img, QCOW2_RULE_REFBLOCK_BEFORE_TABLE, blocks,
                          k << cb, start << cb);
    if (r == 0)
      r = qcow2_meta_refcounts_durable (img,
                                        QCOW2_RULE_ALLOC_REFCOUNT_FIRST);
    for (j = 0; r == 0 && j < k; j++) {
      put_be64 (entry, (start + j) << cb);
      r = qcow2_meta_write (img, QCOW2_RULE_REFBLOCK_BEFORE_TABLE, entry, 8,
                            w->reftable_offset + block_index[j] * 8);
    }
    if (r < 0) {
      qcow2_error ("could not write new refcount blocks: %s", strerror (-r));
      goto out;
    }

    /* Memory follows disk: only now do the blocks exist. */
    for (j = 0; j < k; j++)
      w->reftable[block_index[j]] = (start + j) << cb;
  }
  qcow2_size_grow (&img->file_size, end << cb);
  for (uint64_t j = 0; r == 0 && j < k; j++)
    r = qcow2_overlap_add (img, (start + j) << cb, img->cluster_size,
                           QCOW2_META_REFBLOCK);
  if (r == 0)
    *first_out = start + k;
 out:
  free (blocks);
  free (block_index);
  return r;
}

int
qcow2_alloc_clusters (struct qcow2_image *img, uint64_t n,
                      uint64_t *offset_out)
{
  struct qcow2_writer *w = img->w;
  uint64_t i, run_start = 0, run_len;
  int r;

  qcow2_writer_assert_locked (img);
  if (n >= w->refblock_entries) {
    /* No run this long exists where blocks start every range. */
    r = alloc_past_end (img, n, &run_start);
    if (r < 0)
      return r;
    *offset_out = run_start << img->cluster_bits;
    QCOW2_DEBUG (alloc, "%s: %" PRIu64 " clusters at 0x%" PRIx64,
                 img->filename, n, *offset_out);
    return qcow2_overlap_check (img, *offset_out, n << img->cluster_bits,
                                QCOW2_META_NONE) < 0 ? -EIO : 0;
  }

 retry:
  i = run_start = w->free_hint;
  run_len = 0;
  while (run_len < n) {
    uint64_t index = i / w->refblock_entries;
    uint64_t rc;

    if (run_start + n > cluster_limit (img))
      return no_space (img);

    if (index >= w->reftable_entries || w->reftable[index] == 0) {
      /* Make the range's refcount block exist (it takes the range's
       * first cluster), then search again.
       */
      r = qcow2_refcount_update (img, index * w->refblock_entries, 0);
      if (r < 0)
        return r;
      goto retry;
    }
    r = qcow2_refcount_get (img, i, &rc);
    if (r < 0)
      return r;
    if (rc != 0) {
      if (i == w->free_hint)
        w->free_hint = i + 1;   /* nothing free below i + 1 */
      run_start = i + 1;
      run_len = 0;
    }
    else
      run_len++;
    i++;
  }
  /* Refcounts say these are free; make sure no metadata lives there. */
  r = qcow2_overlap_check (img, run_start << img->cluster_bits,
                           n << img->cluster_bits, QCOW2_META_NONE);
  if (r < 0)
    return r;
  for (uint64_t k = 0; k < n; k++) {
    r = qcow2_refcount_update (img, run_start + k, 1);
    if (r < 0)
      return r;
  }
  w->free_hint = run_start + n;
  *offset_out = run_start << img->cluster_bits;
  QCOW2_DEBUG (alloc, "%s: %" PRIu64 " clusters at 0x%" PRIx64,
               img->filename, n, *offset_out);
  /* Cluster 0 is the header: counted, and in the overlap set. */
  assert (*offset_out != 0);
  qcow2_size_grow (&img->file_size, (run_start + n) << img->cluster_bits);
  return 0;
}

int
qcow2_alloc_clusters_try (struct qcow2_image *img, uint64_t n,
                          uint64_t *offset_out)
{
  int r;

  qcow2_writer_assert_locked (img);
  img->w->enospc_quiet = true;
  r = qcow2_alloc_clusters (img, n, offset_out);
  img->w->enospc_quiet = false;
  return r;
}

int
qcow2_free_later (struct qcow2_image *img, uint64_t offset, uint64_t len)
{
  struct qcow2_writer *w = img->w;

  qcow2_writer_assert_locked (img);
  if (w->nr_pending == w->cap_pending) {
    size_t cap = w->cap_pending ? w->cap_pending * 2 : 64;
    struct qcow2_pending_free *p = realloc (w->pending, cap * sizeof *p);
    if (!p)
      return -ENOMEM;
    w->pending = p;
    w->cap_pending = cap;
  }
  w->pending[w->nr_pending].offset = offset;
  w->pending[w->nr_pending].length = len;
  w->nr_pending++;
  return 0;
}
