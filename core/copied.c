/* The COPIED flag of the active tables.
 *
 * Rule (qcow2.rst; QEMU's check_oflag_copied and
 * qcow2_update_snapshot_refcount): an active L1 entry, or an active L2
 * entry of a data cluster (normal, or zero with a cluster allocated), has
 * COPIED set exactly when the cluster it points to has refcount 1.  The
 * rule holds in every L2 table, shared or not: a data cluster reached
 * through a table two L1 tables share has refcount 2 or more.  Compressed
 * entries never have it.  With an external data file, data clusters have
 * no refcount; QEMU counts them as 1, so their entries have it.
 *
 * Why it matters: the write path writes in place wherever COPIED is set.
 * A flag set where the refcount is not 1 lets a guest write land in a
 * cluster a snapshot still uses; a flag clear where it is 1 costs a
 * needless copy.  So a pass that corrects flags clears every flag it
 * cannot justify.
 *
 * check.c counts (and repairs) wrong flags; snapshot_ops.c re-establishes
 * the rule after it changed refcounts.  Both run with no request in
 * flight.  Corrected L1 entries are written in place and L2 slices marked
 * dirty; the caller syncs.
 */
#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include "cache.h"
#include "internal.h"
#include "io.h"
#include "l2.h"
#include "util.h"

static uint64_t
with_copied (uint64_t e, bool copied)
{
  return copied ? e | QCOW2_OFLAG_COPIED : e & ~QCOW2_OFLAG_COPIED;
}

/* Is the refcount of host cluster `cluster` 1?  A refcount that cannot be
 * read is an error when settling; a count leaves the entry unjudged (the
 * refcount pass reports the cause), *judged = false.
 */
static int
refcount_is_one (struct qcow2_image *img, enum qcow2_copied_mode mode,
                 uint64_t cluster, bool *one, bool *judged)
{
  uint64_t rc;
  int r = qcow2_refcount_get (img, cluster, &rc);

  *judged = r == 0;
  *one = r == 0 && rc == 1;
  return mode == QCOW2_COPIED_SETTLE ? r : 0;
}

/* The flag entry e of an active L2 table should have; *judged is false
 * for entries the rule says nothing about (unallocated, plain zero), or
 * whose refcount could not be read.
 */
static int
wanted_l2 (struct qcow2_image *img, enum qcow2_copied_mode mode, uint64_t e,
           bool *want, bool *judged)
{
  struct qcow2_entry st;

  qcow2_entry_classify (img, e, 0, &st);
  *want = false;
  *judged = true;
  if (st.compressed)
    return 0;
  if (!st.allocated) {
    *judged = false;
    return 0;
  }
  if (img->external_data) {
    *want = true;
    return 0;
  }
  return refcount_is_one (img, mode, st.host >> img->cluster_bits, want,
                          judged);
}

static int
pass_l2 (struct qcow2_image *img, enum qcow2_copied_mode mode, uint64_t l2,
         uint64_t *wrong)
{
  bool fix = mode != QCOW2_COPIED_COUNT;

  for (uint64_t o = 0; o < img->cluster_size; o += img->slice_size) {
    struct qcow2_slice *slice;
    bool dirty = false;
    int r = qcow2_l2_slice_get (img, l2, o, &slice);

    if (r < 0)
      return r;
    for (uint32_t j = 0; r == 0 && j < img->slice_entries; j++) {
      unsigned char *p = slice->data + j * img->l2_entry_bytes;
      uint64_t e = qcow2_l2_load (p);
      bool want, judged;

      r = wanted_l2 (img, mode, e, &want, &judged);
      /* Unjudged entries keep their flag, except that settling clears
       * it (QEMU does the same for unallocated entries).
       */
      if (r < 0 || (!judged && mode != QCOW2_COPIED_SETTLE) ||
          with_copied (e, want) == e)
        continue;
      if (judged)
        (*wrong)++;
      if (fix) {
        qcow2_l2_store (p, with_copied (e, want));
        dirty = true;
      }
    }
    if (dirty)
      qcow2_cache_mark_dirty (img->l2_cache, slice);
    qcow2_cache_put (img->l2_cache, slice);
    if (r == 0 && mode == QCOW2_COPIED_SETTLE &&
        qcow2_cache_dirty_count (img->l2_cache) >=
        QCOW2_PASS_WRITEBACK_EVERY)
      r = qcow2_cache_writeback (img->l2_cache);
    if (r < 0)
      return r;
  }
  return 0;
}

static int
fix_l1_entry (struct qcow2_image *img, uint32_t i, uint64_t fixed)
{
  unsigned char e[8];
  int r;

  put_be64 (e, fixed);
  r = qcow2_io_pwrite (img->io, e, 8, img->h.l1_table_offset + i * 8);
  if (r < 0) {
    qcow2_error ("%s: could not write the L1 table: %s", img->filename,
                 strerror (-r));
    return r;
  }
  __atomic_store_n (&img->l1[i], fixed, __ATOMIC_RELEASE);
  return 0;
}

int
qcow2_copied_pass (struct qcow2_image *img, enum qcow2_copied_mode mode,
                   uint64_t *wrong)
{
  *wrong = 0;
  for (uint32_t i = 0; i < img->l1_size; i++) {
    uint64_t l1e = img->l1[i], l2 = l1e & QCOW2_L1E_OFFSET_MASK;
    bool one, judged;
    int r;

    if (!l2)
      continue;
    if (!qcow2_l2_offset_ok (img, l2)) {
      if (mode != QCOW2_COPIED_SETTLE)
        continue;       /* the refcount pass reports it */
      return qcow2_l2_offset_check (img, l2, i);
    }
    r = refcount_is_one (img, mode, l2 >> img->cluster_bits, &one, &judged);
    if (r < 0)
      return r;
    if (!judged)
      continue;
    if (with_copied (l1e, one) != l1e) {
      (*wrong)++;
      if (mode != QCOW2_COPIED_COUNT &&
          (r = fix_l1_entry (img, i, with_copied (l1e, one))) < 0)
        return r;
    }
    if ((r = pass_l2 (img, mode, l2, wrong)) < 0)
      return r;
  }
  return 0;
}
