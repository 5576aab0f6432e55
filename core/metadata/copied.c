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
 * check.c counts (and repairs) wrong flags; snapshots.c re-establishes
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
fix_l1_entry (struct qcow2_image *img, uint32_t i, uint64_t fixed)
{
  unsigned char e[8];
  int r;

  /* Rule 7, durable at the pass's next sync; memory follows disk. */
  put_be64 (e, fixed);
  r = qcow2_meta_write (img, QCOW2_RULE_IN_PLACE, e, 8,
                        img->h.l1_table_offset + i * 8);
  if (r < 0) {
    qcow2_error ("%s: could not write the L1 table: %s", img->filename,
                 strerror (-r));
    return r;
  }
  __atomic_store_n (&img->l1[i], fixed, __ATOMIC_RELEASE);
  return 0;
}

/* The walk over the active tables (l2.h): each L2 table's own L1 entry,
 * then its entries.
 */
struct pass {
  enum qcow2_copied_mode mode;
  uint64_t *wrong;
};

static int
pass_bad_table (struct qcow2_image *img, uint32_t l1_index, uint64_t l2,
                void *pv)
{
  struct pass *p = pv;

  if (p->mode != QCOW2_COPIED_SETTLE)
    return 0;           /* the refcount pass reports it */
  return qcow2_l2_offset_check (img, l2, l1_index);
}

static int
pass_table (struct qcow2_image *img, uint32_t l1_index, uint64_t l2,
            void *pv)
{
  struct pass *p = pv;
  uint64_t l1e = img->l1[l1_index];
  bool one, judged;
  int r;

  r = refcount_is_one (img, p->mode, l2 >> img->cluster_bits, &one,
                       &judged);
  if (r < 0)
    return r;
  if (!judged)
    return QCOW2_WALK_SKIP;
  if (with_copied (l1e, one) != l1e) {
    (*p->wrong)++;
    if (p->mode != QCOW2_COPIED_COUNT)
      return fix_l1_entry (img, l1_index, with_copied (l1e, one));
  }
  return 0;
}

static int
pass_entry (struct qcow2_image *img, struct qcow2_walk_entry *e, void *pv)
{
  struct pass *p = pv;
  bool want, judged;
  int r = wanted_l2 (img, p->mode, e->entry, &want, &judged);

  /* Unjudged entries keep their flag, except that settling clears it
   * (QEMU does the same for unallocated entries).
   */
  if (r < 0 || (!judged && p->mode != QCOW2_COPIED_SETTLE) ||
      with_copied (e->entry, want) == e->entry)
    return r;
  if (judged)
    (*p->wrong)++;
  if (p->mode != QCOW2_COPIED_COUNT)
    qcow2_walk_entry_set (e, with_copied (e->entry, want));
  return 0;
}

/* Settling may change every table: keep the dirty slices bounded. */
static int
pass_slice_done (struct qcow2_image *img, void *pv)
{
  struct pass *p = pv;
  int r;

  if (p->mode == QCOW2_COPIED_SETTLE &&
      qcow2_cache_dirty_count (img->l2_cache) >= QCOW2_PASS_WRITEBACK_EVERY &&
      (r = qcow2_cache_writeback (img->l2_cache)) < 0)
    return qcow2_writer_break (img, r, "writing back L2 tables");
  return 0;
}

int
qcow2_copied_pass (struct qcow2_image *img, enum qcow2_copied_mode mode,
                   uint64_t *wrong)
{
  struct pass p = { mode, wrong };
  const struct qcow2_walk walk = {
    .bad_table = pass_bad_table, .table = pass_table, .entry = pass_entry,
    .slice_done = pass_slice_done, .opaque = &p,
  };

  qcow2_writer_assert_locked (img);
  *wrong = 0;
  return qcow2_walk_l1 (img, img->l1, img->l1_size, &walk);
}
