/* Reaching L2 entries through an L1 table (l2.c): the one lookup of the
 * entry of a guest offset, and the one walk over every entry of every L2
 * table an L1 table references.  Both check each L2 table's offset before
 * reading it, and both read through the L2 cache, whose slices may be
 * newer than the disk.
 */
#ifndef QCOW2_L2_H
#define QCOW2_L2_H

#include <stdbool.h>
#include <stdint.h>

struct qcow2_image;
struct qcow2_slice;

/* Is an L2 table at l2 whole clusters inside the file? */
bool qcow2_l2_offset_ok (const struct qcow2_image *img, uint64_t l2);
/* The same, reporting in QEMU's words (naming L1 entry l1_index) and
 * returning -EIO when not.
 */
int qcow2_l2_offset_check (struct qcow2_image *img, uint64_t l2,
                           uint64_t l1_index);

/* Slice at byte o of the L2 table at l2, pinned in the L2 cache (put it
 * back with qcow2_cache_put); a failure is reported.
 */
int qcow2_l2_slice_get (struct qcow2_image *img, uint64_t l2, uint64_t o,
                        struct qcow2_slice **slice);

/* Where the L2 entry of a guest offset lies. */
struct qcow2_l2_pos {
  uint64_t l2;          /* offset of the L2 table; 0: none */
  uint64_t first;       /* index in the table of the slice's first entry */
  uint64_t index;       /* index of the entry in the slice */
};

/* Pin the L2 slice holding the entry of guest offset `guest` through the
 * L1 table l1 (l1_size entries, read with atomic loads, so this may run
 * beside a writer), after checking the table's offset.  *slice is NULL
 * when no L2 table covers guest: its entry reads as 0.  This is the path
 * of every read (map.c), so it stays short.
 */
int qcow2_l2_slice_of_guest (struct qcow2_image *img, const uint64_t *l1,
                             uint32_t l1_size, uint64_t guest,
                             struct qcow2_slice **slice,
                             struct qcow2_l2_pos *pos);

/* --- The walk ------------------------------------------------------- */

/* Hooks return 0 to go on, a negative errno to stop the walk with that
 * error, QCOW2_WALK_STOP to stop it with that (positive) result, or, from
 * `table` and `slice_error`, QCOW2_WALK_SKIP to pass over the rest of that
 * L2 table.
 */
enum { QCOW2_WALK_STOP = 1, QCOW2_WALK_SKIP = 2 };

/* One L2 entry, as the walk shows it to the `entry` hook. */
struct qcow2_walk_entry {
  uint64_t index;       /* in its L2 table */
  unsigned char *p;     /* in its pinned slice, on-disk byte order (the
                         * extended L2 bitmap follows at p + 8) */
  uint64_t entry;       /* the entry, host byte order */
  bool changed;         /* set by qcow2_walk_entry_set */
};

struct qcow2_walk {
  /* An L2 table offset qcow2_l2_offset_ok refuses: return 0 to pass
   * over the table.  NULL: the walk reports it (qcow2_l2_offset_check)
   * and fails with -EIO.
   */
  int (*bad_table) (struct qcow2_image *img, uint32_t l1_index,
                    uint64_t l2, void *opaque);
  /* Each L2 table, before its entries; may be NULL. */
  int (*table) (struct qcow2_image *img, uint32_t l1_index, uint64_t l2,
                void *opaque);
  /* Each entry of the table, slice by slice, with the slice pinned: it
   * must not sync or write the L2 cache back (that may drop slices).
   */
  int (*entry) (struct qcow2_image *img, struct qcow2_walk_entry *e,
                void *opaque);
  /* A slice that could not be read (reported already).  NULL: the walk
   * fails with that error.
   */
  int (*slice_error) (struct qcow2_image *img, int err, void *opaque);
  /* After each slice is put back, when nothing is pinned; may be NULL. */
  int (*slice_done) (struct qcow2_image *img, void *opaque);
  void *opaque;
};

/* Visit the L2 tables of l1 in order (entries without a table are passed
 * over) and every entry of each.  Returns 0 when done, else the first
 * result that stopped it.  The caller keeps writers away (the writer lock,
 * or no request in flight).
 */
int qcow2_walk_l1 (struct qcow2_image *img, const uint64_t *l1,
                   uint32_t l1_size, const struct qcow2_walk *walk);
/* The same for the single L2 table at l2, whose offset is known good
 * (only `entry`, `slice_error` and `slice_done` are called).
 */
int qcow2_walk_l2 (struct qcow2_image *img, uint64_t l2,
                   const struct qcow2_walk *walk);

/* Change the first word of the entry being visited; the walk marks its
 * slice dirty.
 */
void qcow2_walk_entry_set (struct qcow2_walk_entry *e, uint64_t entry);

/* The host bytes an L2 entry references: a data cluster (normal, or
 * zero with a cluster preallocated), or the 512-byte sectors a compressed
 * cluster's bytes touch; each holds one reference on every host cluster
 * it touches (QEMU's rule, which `qemu-img check` counts by).  *len is 0
 * for none (unallocated, plain zero, or data in an external data file,
 * which has no refcounts).  A data cluster off a cluster boundary is
 * reported: -EIO.
 */
int qcow2_entry_refs (struct qcow2_image *img, uint64_t entry,
                      uint64_t *offset, uint64_t *len);

#endif /* QCOW2_L2_H */
