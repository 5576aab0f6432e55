/* Reaching L2 entries through an L1 table (l2.c): the one lookup of the
 * entry of a guest offset.  It checks the L2 table's offset before reading
 * it, and reads through the L2 cache, whose slices may be newer than the
 * disk.
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

#endif /* QCOW2_L2_H */
