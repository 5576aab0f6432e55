/* A bounded cache of fixed-size metadata slices (L2 table slices, and
 * refcount blocks for a writer), keyed by host file offset.
 *
 * Invariants:
 * - at most `capacity` slices are resident, except transiently when every
 *   resident slice is pinned;
 * - a pinned slice (between qcow2_cache_get and qcow2_cache_put) is neither
 *   evicted nor moved; its data may be read without a lock.  Entries are
 *   read with atomic 64-bit loads because writers publish entries with
 *   atomic stores while readers run;
 * - a slice whose load failed is never handed out: every waiter gets the
 *   error, and the next lookup retries the read.
 *
 * Concurrency: the cache is split into shards by offset, each with its own
 * mutex, so lookups of different slices rarely contend.  No lock is held
 * across I/O; concurrent misses on the same slice wait for one read.
 */
#ifndef QCOW2_CACHE_H
#define QCOW2_CACHE_H

#include <stddef.h>
#include <stdint.h>

struct qcow2_io;
struct qcow2_cache;

struct qcow2_slice {
  uint64_t offset;          /* host file offset of the slice */
  unsigned char *data;      /* slice_size bytes, on-disk byte order */
};

struct qcow2_cache *qcow2_cache_new (struct qcow2_io *io, size_t slice_size,
                                     size_t capacity);
void qcow2_cache_free (struct qcow2_cache *c);

/* Pin the slice at offset (slice-aligned), reading it on a miss. */
int qcow2_cache_get (struct qcow2_cache *c, uint64_t offset,
                     struct qcow2_slice **slice_out);
void qcow2_cache_put (struct qcow2_cache *c, struct qcow2_slice *slice);

/* Writing.  The engine serialises every modification and write-back of
 * a cache under its metadata lock; readers may run at the same time.
 *
 * A dirty slice is never evicted: it stays until qcow2_cache_writeback,
 * which is what lets the engine order metadata writes (refcounts before
 * the L2 entries that use them, data before both).  Callers bound the
 * number of dirty slices by writing back when qcow2_cache_dirty_count
 * grows large.
 */

/* Pin the slice at offset with zeroed contents and mark it dirty, without
 * reading the disk: for a newly allocated table.
 */
int qcow2_cache_get_new (struct qcow2_cache *c, uint64_t offset,
                         struct qcow2_slice **slice_out);
void qcow2_cache_mark_dirty (struct qcow2_cache *c, struct qcow2_slice *slice);
size_t qcow2_cache_dirty_count (struct qcow2_cache *c);
/* How many dirty slices callers may let accumulate before writing back:
 * half the capacity, but at least QCOW2_CACHE_DIRTY_MIN, so a small
 * cache (which the default is for small disks) does not make writers
 * sync every few requests.  The cache then holds at most its capacity
 * plus QCOW2_CACHE_DIRTY_MIN slices (plus those pinned): a bound of
 * cache-size plus a constant.
 */
#define QCOW2_CACHE_DIRTY_MIN 256
size_t qcow2_cache_dirty_limit (const struct qcow2_cache *c);

/* Called before each slice is written back; a negative return stops the
 * write-back with that error (overlap checks).
 */
typedef int (*qcow2_cache_write_check) (void *opaque, uint64_t offset,
                                        size_t len);
void qcow2_cache_set_write_check (struct qcow2_cache *c,
                                  qcow2_cache_write_check fn, void *opaque);

/* Write every dirty slice (no sync).  On error the slices stay dirty. */
int qcow2_cache_writeback (struct qcow2_cache *c);

/* Forget the slices in [offset, offset + len): the clusters were freed
 * and may be reused for something else.  Dirty contents are dropped.
 */
void qcow2_cache_discard (struct qcow2_cache *c, uint64_t offset,
                          uint64_t len);

#endif /* QCOW2_CACHE_H */
