/* A bounded cache of fixed-size metadata slices (L2 table slices now,
 * refcount blocks later), keyed by host file offset.
 *
 * Invariants:
 * - at most `capacity` slices are resident, except transiently when every
 *   resident slice is pinned;
 * - a pinned slice (between qcow2_cache_get and qcow2_cache_put) is neither
 *   evicted nor moved; its data may be read without a lock.  Entries are
 *   read with atomic 64-bit loads so that a future writer can publish
 *   entries with atomic stores while readers run;
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

#endif /* QCOW2_CACHE_H */
