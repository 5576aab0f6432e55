/* An interval lock over guest clusters: see rangelock.h.
 *
 * One mutex guards a queue of requests in arrival order, each either
 * granted (its holder runs) or waiting.  A request is granted when it
 * conflicts with no request ahead of it in the queue, granted or waiting;
 * two requests conflict when their ranges overlap and either is
 * exclusive.  Hence:
 * - a request locks exactly [first, first + count), however large, and
 *   never waits for a disjoint one;
 * - shared requests over the same clusters run together;
 * - among conflicting requests the earlier goes first (FIFO), so a stream
 *   of shared requests cannot starve an exclusive one: a shared request
 *   that arrives after a waiting exclusive one that it overlaps queues
 *   behind it;
 * - no deadlock: a thread holds at most one range at a time (no caller
 *   nests), and a waiting request waits only for requests ahead of it.
 * Only the one mutex is ever held, and only briefly: waiting is on a
 * condition variable, so no holder keeps a pthread lock while it works.
 *
 * Requests that end are recycled through a free list, so after warm-up
 * locking allocates nothing.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#include "rangelock.h"

struct request {
  uint64_t first, end;          /* clusters [first, end) */
  bool exclusive;
  bool granted;
  struct request *prev, *next;  /* the queue, or the free list (next) */
};

struct qcow2_rangelock {
  pthread_mutex_t lock;
  pthread_cond_t changed;       /* a request left the queue */
  struct request *head, *tail;  /* arrival order */
  struct request *spare;        /* free list */
  unsigned waiting;             /* requests in pthread_cond_wait */
};

struct qcow2_rangelock *
qcow2_rangelock_new (void)
{
  struct qcow2_rangelock *rl = calloc (1, sizeof *rl);

  if (!rl)
    return NULL;
  pthread_mutex_init (&rl->lock, NULL);
  pthread_cond_init (&rl->changed, NULL);
  return rl;
}

void
qcow2_rangelock_free (struct qcow2_rangelock *rl)
{
  if (!rl)
    return;
  while (rl->spare) {
    struct request *r = rl->spare;
    rl->spare = r->next;
    free (r);
  }
  /* Every request has ended: nothing may be locked at close. */
  while (rl->head) {
    struct request *r = rl->head;
    rl->head = r->next;
    free (r);
  }
  pthread_cond_destroy (&rl->changed);
  pthread_mutex_destroy (&rl->lock);
  free (rl);
}

static bool
conflict (const struct request *a, const struct request *b)
{
  return a->first < b->end && b->first < a->end &&
         (a->exclusive || b->exclusive);
}

/* May r run: does it conflict with nothing ahead of it in the queue? */
static bool
may_run (const struct request *r)
{
  for (const struct request *p = r->prev; p; p = p->prev)
    if (conflict (p, r))
      return false;
  return true;
}

void
qcow2_rangelock_lock (struct qcow2_rangelock *rl, uint64_t first,
                      uint64_t count, bool exclusive)
{
  struct request *r;

  if (count == 0)
    return;
  pthread_mutex_lock (&rl->lock);
  r = rl->spare;
  if (r)
    rl->spare = r->next;
  else if ((r = malloc (sizeof *r)) == NULL) {
    /* The interface cannot fail, and a request of a few dozen bytes
     * cannot be refused in any sane state.
     */
    fprintf (stderr, "qcow2: out of memory locking a cluster range\n");
    abort ();
  }
  r->first = first;
  r->end = first + count;
  r->exclusive = exclusive;
  r->granted = false;
  r->next = NULL;
  r->prev = rl->tail;
  if (rl->tail)
    rl->tail->next = r;
  else
    rl->head = r;
  rl->tail = r;
  if (!may_run (r)) {
    rl->waiting++;
    do
      pthread_cond_wait (&rl->changed, &rl->lock);
    while (!may_run (r));
    rl->waiting--;
  }
  r->granted = true;
  pthread_mutex_unlock (&rl->lock);
}

void
qcow2_rangelock_unlock (struct qcow2_rangelock *rl, uint64_t first,
                        uint64_t count)
{
  struct request *r;

  if (count == 0)
    return;
  pthread_mutex_lock (&rl->lock);
  /* Any granted request with this range is ours to end: two granted
   * requests with the same range are both shared, so interchangeable.
   */
  for (r = rl->head; r; r = r->next)
    if (r->granted && r->first == first && r->end == first + count)
      break;
  if (r == NULL) {
    fprintf (stderr, "qcow2: unlocking clusters [%llu, +%llu) not locked\n",
             (unsigned long long) first, (unsigned long long) count);
    abort ();
  }
  if (r->prev)
    r->prev->next = r->next;
  else
    rl->head = r->next;
  if (r->next)
    r->next->prev = r->prev;
  else
    rl->tail = r->prev;
  r->next = rl->spare;
  rl->spare = r;
  if (rl->waiting > 0)
    pthread_cond_broadcast (&rl->changed);
  pthread_mutex_unlock (&rl->lock);
}
