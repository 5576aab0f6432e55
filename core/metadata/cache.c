/* Bounded, sharded, LRU metadata slice cache.  See cache.h for the
 * invariants.
 */
#include <assert.h>
#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "cache.h"
#include "debug.h"
#include "io.h"

enum slice_state { SLICE_LOADING, SLICE_READY, SLICE_FAILED };

struct slice {
  struct qcow2_slice pub;   /* first: the public view */
  struct slice *hash_next;
  struct slice *lru_prev, *lru_next;
  unsigned pins;
  enum slice_state state;
  int error;
  bool hashed;              /* in the shard's hash table and LRU list */
  bool dirty;               /* newer than the disk: never evicted */
  bool discarded;           /* freed while loading: drop once loaded */
};

struct shard {
  pthread_mutex_t lock;
  pthread_cond_t loaded;    /* broadcast when a LOADING slice settles */
  struct slice **buckets;
  size_t nbuckets;
  struct slice lru;         /* sentinel: lru.lru_next is most recent */
  size_t count, capacity;
  size_t dirty;             /* dirty slices in this shard */
};

struct qcow2_cache {
  struct qcow2_io *io;
  size_t dirty_limit;           /* see qcow2_cache_dirty_limit */
  size_t dirty_total;           /* sum of the shards' dirty counts, kept
                                 * atomically so that reading it takes no
                                 * lock (qcow2_cache_dirty_count) */
  qcow2_cache_write_check write_check;
  void *write_check_opaque;
  size_t slice_size;
  unsigned slice_shift;
  size_t nshards;
  struct shard shards[];
};

static uint64_t
hash_offset (const struct qcow2_cache *c, uint64_t offset)
{
  uint64_t h = (offset >> c->slice_shift) * 0x9e3779b97f4a7c15ull;
  return h ^ (h >> 29);
}

static struct shard *
shard_of (struct qcow2_cache *c, uint64_t offset)
{
  return &c->shards[hash_offset (c, offset) % c->nshards];
}

static struct slice **
bucket_of (struct qcow2_cache *c, struct shard *s, uint64_t offset)
{
  return &s->buckets[(hash_offset (c, offset) / c->nshards) % s->nbuckets];
}

/* The shard of offset, locked. */
static struct shard *
lock_shard (struct qcow2_cache *c, uint64_t offset)
{
  struct shard *s = shard_of (c, offset);

  pthread_mutex_lock (&s->lock);
  return s;
}

static void
lru_unlink (struct slice *e)
{
  e->lru_prev->lru_next = e->lru_next;
  e->lru_next->lru_prev = e->lru_prev;
}

static void
lru_push_front (struct shard *s, struct slice *e)
{
  e->lru_next = s->lru.lru_next;
  e->lru_prev = &s->lru;
  s->lru.lru_next->lru_prev = e;
  s->lru.lru_next = e;
}

/* Count e clean again.  Called with the shard lock held. */
static void
clear_dirty (struct qcow2_cache *c, struct shard *s, struct slice *e)
{
  assert (e->dirty && s->dirty > 0);
  e->dirty = false;
  s->dirty--;
  __atomic_sub_fetch (&c->dirty_total, 1, __ATOMIC_RELAXED);
}

static void
unhash (struct qcow2_cache *c, struct shard *s, struct slice *e)
{
  struct slice **pp = bucket_of (c, s, e->pub.offset);

  while (*pp != e)
    pp = &(*pp)->hash_next;
  *pp = e->hash_next;
  lru_unlink (e);
  e->hashed = false;
  s->count--;
  if (e->dirty)
    clear_dirty (c, s, e);
}

/* Count e dirty, once.  Called with the shard lock held. */
static void
set_dirty (struct qcow2_cache *c, struct shard *s, struct slice *e)
{
  if (!e->dirty) {
    e->dirty = true;
    s->dirty++;
    __atomic_add_fetch (&c->dirty_total, 1, __ATOMIC_RELAXED);
  }
}

static void
slice_free (struct slice *e)
{
  free (e->pub.data);
  free (e);
}

struct qcow2_cache *
qcow2_cache_new (struct qcow2_io *io, size_t slice_size, size_t capacity)
{
  struct qcow2_cache *c;
  size_t nshards = 1;

  /* Enough shards to spread contention, few enough that each keeps a
   * useful LRU of its own.
   */
  while (nshards < 16 && capacity / (nshards * 2) >= 8)
    nshards *= 2;
  if (capacity < nshards)
    capacity = nshards;

  c = calloc (1, sizeof *c + nshards * sizeof (struct shard));
  if (!c)
    return NULL;
  c->io = io;
  c->slice_size = slice_size;
  while ((1ull << c->slice_shift) < slice_size)
    c->slice_shift++;
  c->nshards = nshards;
  c->dirty_limit = capacity / 2 > QCOW2_CACHE_DIRTY_MIN
                   ? capacity / 2 : QCOW2_CACHE_DIRTY_MIN;
  for (size_t i = 0; i < nshards; i++) {
    struct shard *s = &c->shards[i];
    s->capacity = capacity / nshards;
    s->nbuckets = s->capacity * 2;
    s->buckets = calloc (s->nbuckets, sizeof *s->buckets);
    if (!s->buckets) {
      c->nshards = i;
      qcow2_cache_free (c);
      return NULL;
    }
    pthread_mutex_init (&s->lock, NULL);
    pthread_cond_init (&s->loaded, NULL);
    s->lru.lru_next = s->lru.lru_prev = &s->lru;
  }
  return c;
}

void
qcow2_cache_free (struct qcow2_cache *c)
{
  if (!c)
    return;
  for (size_t i = 0; i < c->nshards; i++) {
    struct shard *s = &c->shards[i];
    while (s->lru.lru_next != &s->lru) {
      struct slice *e = s->lru.lru_next;
      unhash (c, s, e);
      slice_free (e);
    }
    free (s->buckets);
    pthread_mutex_destroy (&s->lock);
    pthread_cond_destroy (&s->loaded);
  }
  free (c);
}

/* Find an unpinned slice to recycle, or allocate a new one.  Called with
 * the shard lock held.
 */
static struct slice *
take_free_slice (struct qcow2_cache *c, struct shard *s)
{
  if (s->count >= s->capacity) {
    for (struct slice *e = s->lru.lru_prev; e != &s->lru; e = e->lru_prev) {
      if (e->pins == 0 && !e->dirty) {
        QCOW2_DEBUG (cache, "evict the slice at 0x%" PRIx64, e->pub.offset);
        unhash (c, s, e);
        return e;
      }
    }
  }
  struct slice *e = calloc (1, sizeof *e);
  if (!e)
    return NULL;
  e->pub.data = malloc (c->slice_size);
  if (!e->pub.data) {
    free (e);
    return NULL;
  }
  return e;
}

/* Drop one pin; frees a failed slice once nobody holds it.  Called with the
 * shard lock held.
 */
static void
unpin_locked (struct slice *e)
{
  assert (e->pins > 0);   /* every put matches a get */
  e->pins--;
  if (e->pins == 0 && !e->hashed)
    slice_free (e);
}

/* The one lookup-and-insert, with the shard lock held: pin the slice at
 * offset and make it the most recently used, waiting while another thread
 * loads it.  A slice found is READY, or FAILED or discarded while it
 * loaded (then no longer hashed).  One not found is inserted, in state
 * LOADING, for the caller to fill.  NULL: out of memory.
 */
static inline struct slice *
pin_slice (struct qcow2_cache *c, struct shard *s, uint64_t offset)
{
  struct slice **b = bucket_of (c, s, offset);
  struct slice *e;

  for (e = *b; e; e = e->hash_next)
    if (e->pub.offset == offset)
      break;
  if (e) {
    e->pins++;
    lru_unlink (e);
    lru_push_front (s, e);
    while (e->state == SLICE_LOADING)
      pthread_cond_wait (&s->loaded, &s->lock);
    return e;
  }

  e = take_free_slice (c, s);
  if (!e)
    return NULL;
  e->pub.offset = offset;
  e->pins = 1;
  e->state = SLICE_LOADING;
  e->discarded = false;
  e->hashed = true;
  e->hash_next = *b;
  *b = e;
  lru_push_front (s, e);
  s->count++;
  return e;
}

int
qcow2_cache_get (struct qcow2_cache *c, uint64_t offset,
                 struct qcow2_slice **slice_out)
{
  struct shard *s = lock_shard (c, offset);
  struct slice *e = pin_slice (c, s, offset);
  int r;

  if (!e) {
    pthread_mutex_unlock (&s->lock);
    return -ENOMEM;
  }
  if (e->state != SLICE_LOADING) {      /* found */
    if (e->state == SLICE_FAILED) {
      r = e->error;
      unpin_locked (e);
      pthread_mutex_unlock (&s->lock);
      return r;
    }
    pthread_mutex_unlock (&s->lock);
    *slice_out = &e->pub;
    return 0;
  }
  pthread_mutex_unlock (&s->lock);

  r = qcow2_io_pread (c->io, e->pub.data, c->slice_size, offset);

  pthread_mutex_lock (&s->lock);
  if (r < 0) {
    e->state = SLICE_FAILED;
    e->error = r;
    if (e->hashed)
      unhash (c, s, e);
    unpin_locked (e);
  }
  else {
    e->state = SLICE_READY;
    if (e->discarded && e->hashed)
      unhash (c, s, e);
  }
  pthread_cond_broadcast (&s->loaded);
  pthread_mutex_unlock (&s->lock);
  if (r < 0)
    return r;
  *slice_out = &e->pub;
  return 0;
}

void
qcow2_cache_put (struct qcow2_cache *c, struct qcow2_slice *slice)
{
  struct shard *s = lock_shard (c, slice->offset);

  unpin_locked ((struct slice *) slice);
  pthread_mutex_unlock (&s->lock);
}

void
qcow2_cache_set_write_check (struct qcow2_cache *c,
                             qcow2_cache_write_check fn, void *opaque)
{
  c->write_check = fn;
  c->write_check_opaque = opaque;
}

int
qcow2_cache_get_new (struct qcow2_cache *c, uint64_t offset,
                     struct qcow2_slice **slice_out)
{
  struct shard *s = lock_shard (c, offset);
  struct slice *e;

  /* One that failed or was discarded while loading is replaced. */
  while ((e = pin_slice (c, s, offset)) && !e->hashed)
    unpin_locked (e);
  if (!e) {
    pthread_mutex_unlock (&s->lock);
    return -ENOMEM;
  }
  e->state = SLICE_READY;
  memset (e->pub.data, 0, c->slice_size);
  set_dirty (c, s, e);
  pthread_mutex_unlock (&s->lock);
  *slice_out = &e->pub;
  return 0;
}

void
qcow2_cache_mark_dirty (struct qcow2_cache *c, struct qcow2_slice *slice)
{
  struct slice *e = (struct slice *) slice;
  struct shard *s = lock_shard (c, slice->offset);

  if (e->hashed)
    set_dirty (c, s, e);
  pthread_mutex_unlock (&s->lock);
}

size_t
qcow2_cache_dirty_limit (const struct qcow2_cache *c)
{
  return c->dirty_limit;
}

size_t
qcow2_cache_dirty_count (struct qcow2_cache *c)
{
  return __atomic_load_n (&c->dirty_total, __ATOMIC_RELAXED);
}

/* Modifications are serialised by the caller (see cache.h), so a slice
 * cannot be dirtied again while it is being written here; pinning keeps
 * it in place without the shard lock held across the I/O.
 */
int
qcow2_cache_writeback (struct qcow2_cache *c)
{
  for (size_t i = 0; i < c->nshards; i++) {
    struct shard *s = &c->shards[i];
    struct slice **list;
    size_t n = 0;
    int r = 0;

    pthread_mutex_lock (&s->lock);
    if (s->dirty == 0) {
      pthread_mutex_unlock (&s->lock);
      continue;
    }
    list = malloc (s->dirty * sizeof *list);
    if (!list) {
      pthread_mutex_unlock (&s->lock);
      return -ENOMEM;
    }
    for (struct slice *e = s->lru.lru_next; e != &s->lru; e = e->lru_next)
      if (e->dirty) {
        e->pins++;
        list[n++] = e;
      }
    pthread_mutex_unlock (&s->lock);

    for (size_t j = 0; j < n; j++) {
      struct slice *e = list[j];
      if (r == 0 && c->write_check)
        r = c->write_check (c->write_check_opaque, e->pub.offset,
                            c->slice_size);
      if (r == 0)
        r = c->io->ops->pwrite (c->io, e->pub.data, c->slice_size,
                                e->pub.offset);
      pthread_mutex_lock (&s->lock);
      if (r == 0 && e->dirty) {
        QCOW2_DEBUG (metadata, "wrote back %zu bytes at 0x%" PRIx64,
                     c->slice_size, e->pub.offset);
        clear_dirty (c, s, e);
      }
      unpin_locked (e);
      pthread_mutex_unlock (&s->lock);
    }
    free (list);
    if (r < 0)
      return r;
  }
  return 0;
}

void
qcow2_cache_discard (struct qcow2_cache *c, uint64_t offset, uint64_t len)
{
  for (uint64_t o = offset; o < offset + len; o += c->slice_size) {
    struct shard *s = lock_shard (c, o);
    struct slice *e;

    for (e = *bucket_of (c, s, o); e; e = e->hash_next)
      if (e->pub.offset == o)
        break;
    if (e && e->state == SLICE_LOADING)
      e->discarded = true;
    else if (e) {
      unhash (c, s, e);
      if (e->pins == 0)
        slice_free (e);
    }
    pthread_mutex_unlock (&s->lock);
  }
}
