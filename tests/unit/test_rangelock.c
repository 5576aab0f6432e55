/* nbdkit-qcow2
 * Copyright (C) 2026 the nbdkit-qcow2 authors
 * SPDX-License-Identifier: BSD-3-Clause (see LICENSE)
 */

/* Unit test of core/requests/rangelock.c: which requests exclude each other, which
 * run together, and that an exclusive request is not starved by shared
 * ones.  Each contender is a thread that locks its range, reports it
 * (a semaphore post), and holds it until told to let go.  "Waits" is
 * checked as "has not got the lock 200 ms later"; "proceeds" as "got it
 * within 10 s", so a slow machine cannot make the test fail wrongly.
 */
#include <errno.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "rangelock.h"
#include "testing.h"

struct contender {
  struct qcow2_rangelock *rl;
  uint64_t first, count;
  bool exclusive;
  sem_t got;                    /* posted once the range is locked */
  sem_t release;                /* posted to make it unlock and end */
  int order;                    /* when it got the lock (see next_order) */
  pthread_t thread;
};

static atomic_int next_order;

static void *
contend (void *arg)
{
  struct contender *c = arg;

  qcow2_rangelock_lock (c->rl, c->first, c->count, c->exclusive);
  c->order = atomic_fetch_add (&next_order, 1);
  sem_post (&c->got);
  while (sem_wait (&c->release) == -1 && errno == EINTR)
    ;
  qcow2_rangelock_unlock (c->rl, c->first, c->count);
  return NULL;
}

static void
start (struct contender *c, struct qcow2_rangelock *rl, uint64_t first,
       uint64_t count, bool exclusive)
{
  c->rl = rl;
  c->first = first;
  c->count = count;
  c->exclusive = exclusive;
  c->order = -1;
  sem_init (&c->got, 0, 0);
  sem_init (&c->release, 0, 0);
  if (pthread_create (&c->thread, NULL, contend, c) != 0) {
    perror ("pthread_create");
    exit (1);
  }
}

/* Did c get its lock within ms milliseconds? */
static bool
got_within (struct contender *c, long ms)
{
  struct timespec t;
  int r;

  clock_gettime (CLOCK_REALTIME, &t);
  t.tv_sec += ms / 1000;
  t.tv_nsec += (ms % 1000) * 1000000L;
  if (t.tv_nsec >= 1000000000L) {
    t.tv_sec++;
    t.tv_nsec -= 1000000000L;
  }
  while ((r = sem_timedwait (&c->got, &t)) == -1 && errno == EINTR)
    ;
  return r == 0;
}

#define WAITS 200               /* ms: long enough to have got it */
#define PROCEEDS 10000          /* ms: surely enough to get it */

static void
finish (struct contender *c)
{
  sem_post (&c->release);
  pthread_join (c->thread, NULL);
  sem_destroy (&c->got);
  sem_destroy (&c->release);
}

/* Holding [hold_first, +hold_count) (hold_excl), may a contender lock
 * [first, +count) (excl)?  expect_wait: it must wait until the holder
 * lets go, and then get it.
 */
static void
pair (uint64_t hold_first, uint64_t hold_count, bool hold_excl,
      uint64_t first, uint64_t count, bool excl, bool expect_wait)
{
  struct qcow2_rangelock *rl = qcow2_rangelock_new ();
  struct contender c;
  char want[64], held[64];

  CHECK (rl != NULL, "qcow2_rangelock_new");
  snprintf (want, sizeof want, "[%llu,+%llu) %s", (unsigned long long) first,
            (unsigned long long) count, excl ? "exclusive" : "shared");
  snprintf (held, sizeof held, "[%llu,+%llu) %s",
            (unsigned long long) hold_first,
            (unsigned long long) hold_count,
            hold_excl ? "exclusive" : "shared");
  qcow2_rangelock_lock (rl, hold_first, hold_count, hold_excl);
  start (&c, rl, first, count, excl);
  if (expect_wait) {
    CHECK (!got_within (&c, WAITS), "%s got the lock while %s is held",
           want, held);
    qcow2_rangelock_unlock (rl, hold_first, hold_count);
    CHECK (got_within (&c, PROCEEDS), "no lock after the holder let go");
  }
  else {
    CHECK (got_within (&c, PROCEEDS), "%s waits for %s", want, held);
    qcow2_rangelock_unlock (rl, hold_first, hold_count);
  }
  finish (&c);
  qcow2_rangelock_free (rl);
}

static void
test_pairs (void)
{
  /* Overlapping ranges exclude each other unless both are shared. */
  pair (0, 10, true, 5, 1, true, true);
  pair (0, 10, true, 9, 5, false, true);
  pair (0, 10, false, 9, 5, true, true);
  pair (100, 1, true, 0, 1000, true, true);
  pair (0, 10, false, 5, 10, false, false);
  /* Disjoint ranges, adjacent or not, never wait. */
  pair (0, 10, true, 10, 10, true, false);
  pair (10, 10, true, 0, 10, true, false);
  pair (0, 10, true, 1 << 20, 3, true, false);
  /* A request of 1,024 or more clusters locks only those: clusters that
   * a striped lock would map to the same stripes proceed.
   */
  pair (0, 1024, true, 1024, 1, true, false);
  pair (0, 1 << 20, true, (1 << 20) + 1024, 2048, true, false);
  pair (4096, 1024, true, 0, 1, false, false);
  /* The last cluster of the disk's range. */
  pair (UINT64_MAX - 10, 10, true, UINT64_MAX - 1, 1, true, true);
}

/* A stream of shared requests over a range held shared must not starve
 * an exclusive request: once it waits, later shared requests that
 * overlap it queue behind it, even though they are compatible with the
 * holder; one that does not overlap it still proceeds.
 */
static void
test_no_starvation (void)
{
  struct qcow2_rangelock *rl = qcow2_rangelock_new ();
  struct contender excl, shared, other;

  qcow2_rangelock_lock (rl, 0, 10, false);
  start (&excl, rl, 0, 10, true);
  CHECK (!got_within (&excl, WAITS), "exclusive got a shared-held range");
  start (&shared, rl, 5, 1, false);
  CHECK (!got_within (&shared, WAITS),
         "a shared request overtook a waiting exclusive one");
  start (&other, rl, 20, 1, false);
  CHECK (got_within (&other, PROCEEDS),
         "a disjoint request waits behind a queued exclusive one");
  qcow2_rangelock_unlock (rl, 0, 10);
  CHECK (got_within (&excl, PROCEEDS), "exclusive never got the range");
  CHECK (!got_within (&shared, WAITS),
         "a shared request runs with an exclusive one");
  finish (&excl);
  CHECK (got_within (&shared, PROCEEDS), "shared never got the range");
  CHECK (excl.order < shared.order, "exclusive went after shared");
  finish (&shared);
  finish (&other);
  qcow2_rangelock_free (rl);
}

/* Many threads lock random ranges; per-cluster counters check that no
 * cluster is ever held exclusive together with anything else.
 */
#define CLUSTERS 64
#define THREADS 8
#define ROUNDS 20000

static struct qcow2_rangelock *stress_rl;
static atomic_int holders[CLUSTERS];    /* shared: +1, exclusive: +1000 */
static atomic_int violations;

static void *
stress (void *arg)
{
  unsigned seed = (unsigned) (uintptr_t) arg;

  for (int i = 0; i < ROUNDS; i++) {
    uint64_t first = rand_r (&seed) % CLUSTERS;
    uint64_t count = 1 + rand_r (&seed) % (CLUSTERS - first);
    bool exclusive = rand_r (&seed) % 2;
    int add = exclusive ? 1000 : 1;

    qcow2_rangelock_lock (stress_rl, first, count, exclusive);
    for (uint64_t c = first; c < first + count; c++) {
      int now = atomic_fetch_add (&holders[c], add) + add;
      if (exclusive ? now != 1000 : now >= 1000)
        atomic_fetch_add (&violations, 1);
    }
    for (uint64_t c = first; c < first + count; c++)
      atomic_fetch_sub (&holders[c], add);
    qcow2_rangelock_unlock (stress_rl, first, count);
  }
  return NULL;
}

static void
test_stress (void)
{
  pthread_t t[THREADS];

  stress_rl = qcow2_rangelock_new ();
  for (uintptr_t i = 0; i < THREADS; i++)
    pthread_create (&t[i], NULL, stress, (void *) (i + 1));
  for (int i = 0; i < THREADS; i++)
    pthread_join (t[i], NULL);
  CHECK (violations == 0, "%d clusters were held in conflicting modes",
         (int) violations);
  qcow2_rangelock_free (stress_rl);
}

int
main (void)
{
  test_pairs ();
  test_no_starvation ();
  test_stress ();
  if (failures) {
    fprintf (stderr, "test_rangelock: %d failures\n", failures);
    return 1;
  }
  printf ("test_rangelock: ok\n");
  return 0;
}
