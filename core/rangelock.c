/* Striped per-cluster reader/writer locks: see rangelock.h. */
#include <pthread.h>
#include <stdlib.h>

#include "rangelock.h"

#define STRIPES 1024

struct qcow2_rangelock {
  pthread_rwlock_t stripe[STRIPES];
};

struct qcow2_rangelock *
qcow2_rangelock_new (void)
{
  struct qcow2_rangelock *rl = malloc (sizeof *rl);

  pthread_rwlockattr_t attr;

  if (!rl)
    return NULL;
  /* Prefer writers, so a stream of in-place writers cannot starve an
   * allocating request.  Safe because no thread ever takes a stripe it
   * already holds.
   */
  pthread_rwlockattr_init (&attr);
  pthread_rwlockattr_setkind_np (&attr,
                                 PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
  for (int i = 0; i < STRIPES; i++)
    pthread_rwlock_init (&rl->stripe[i], &attr);
  pthread_rwlockattr_destroy (&attr);
  return rl;
}

void
qcow2_rangelock_free (struct qcow2_rangelock *rl)
{
  if (!rl)
    return;
  for (int i = 0; i < STRIPES; i++)
    pthread_rwlock_destroy (&rl->stripe[i]);
  free (rl);
}

/* The stripes of [first, first + count) form at most two ascending
 * intervals of the stripe array.  Calls fn on each stripe in ascending
 * order.
 */
static void
for_each_stripe (struct qcow2_rangelock *rl, uint64_t first, uint64_t count,
                 void (*fn) (pthread_rwlock_t *, bool), bool arg)
{
  if (count >= STRIPES) {
    for (int i = 0; i < STRIPES; i++)
      fn (&rl->stripe[i], arg);
    return;
  }
  unsigned start = first % STRIPES;
  unsigned end = (unsigned) ((first + count) % STRIPES);
  if (start < end || count == 0) {
    for (unsigned i = start; i < end; i++)
      fn (&rl->stripe[i], arg);
  }
  else {
    for (unsigned i = 0; i < end; i++)
      fn (&rl->stripe[i], arg);
    for (unsigned i = start; i < STRIPES; i++)
      fn (&rl->stripe[i], arg);
  }
}

static void
lock_one (pthread_rwlock_t *l, bool exclusive)
{
  if (exclusive)
    pthread_rwlock_wrlock (l);
  else
    pthread_rwlock_rdlock (l);
}

static void
unlock_one (pthread_rwlock_t *l, bool unused)
{
  (void) unused;
  pthread_rwlock_unlock (l);
}

void
qcow2_rangelock_lock (struct qcow2_rangelock *rl, uint64_t first,
                      uint64_t count, bool exclusive)
{
  for_each_stripe (rl, first, count, lock_one, exclusive);
}

void
qcow2_rangelock_unlock (struct qcow2_rangelock *rl, uint64_t first,
                        uint64_t count)
{
  for_each_stripe (rl, first, count, unlock_one, false);
}
