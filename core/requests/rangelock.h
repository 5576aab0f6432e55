/* Per-guest-cluster locks for writers (and readers of encrypted data).
 *
 * A request that writes in place (no metadata change) takes its clusters
 * shared; one that allocates, frees or changes an L2 entry takes them
 * exclusive.  So an allocation never races with another allocation or an
 * in-place write of the same clusters, while disjoint requests proceed at
 * once.  Readers of plain images take no lock: they see an L2 entry either
 * before or after it is published, and published entries point at data
 * already written.  Readers of encrypted images take their clusters
 * shared, because a sub-sector write rewrites a whole sector (read.c).
 *
 * A request locks exactly its clusters, however many: a 4 MiB write on a
 * 4 KiB-cluster image waits only for requests that overlap it.  Among
 * conflicting requests the earlier goes first, so a stream of shared
 * requests cannot starve an exclusive one (rangelock.c).  A thread holds
 * at most one range at a time.
 */
#ifndef QCOW2_RANGELOCK_H
#define QCOW2_RANGELOCK_H

#include <stdbool.h>
#include <stdint.h>

struct qcow2_rangelock;

struct qcow2_rangelock *qcow2_rangelock_new (void);
void qcow2_rangelock_free (struct qcow2_rangelock *rl);

/* Lock or unlock clusters [first, first + count). */
void qcow2_rangelock_lock (struct qcow2_rangelock *rl, uint64_t first,
                           uint64_t count, bool exclusive);
void qcow2_rangelock_unlock (struct qcow2_rangelock *rl, uint64_t first,
                             uint64_t count);

#endif /* QCOW2_RANGELOCK_H */
