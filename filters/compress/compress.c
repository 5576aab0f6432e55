/* nbdkit-qcow2-compress-filter: make nbdkit-qcow2-plugin store written
 * data as compressed clusters, as qemu-img convert -c does.
 *
 * nbdkit has no "write compressed" flag, so the filter opens the plugin's
 * reserved export COMPRESSED_EXPORT, where the plugin writes every whole
 * cluster of a request compressed and anything else normally (the
 * contract, name and check, is adapter/compressed-export.h).  The
 * filter's job is to make writes whole-cluster.  Its unit is the plugin's
 * preferred block size: the cluster size, or 4 KiB when clusters are
 * smaller (a unit is then several whole clusters).
 *
 * Whole units go straight down; units of zeros become zero requests, as
 * qemu-img convert skips zeros.  A piece of a unit goes down as it is
 * (written uncompressed), and the filter remembers which bytes of the
 * unit have been written, zeroed or trimmed since.  Once the whole unit is
 * covered, as when a client writes in 4 KiB pieces, the filter reads the
 * unit back and writes it again whole, now compressed.  Units still partly
 * covered are rewritten so at the next flush, when a connection closes,
 * or when more than MAX_TRACKED units are pending.  So the image holds
 * every byte at all times and the bookkeeping only decides when to
 * recompress: losing it (a crash) costs compression, never data.  (A
 * read-modify-write per piece would compress a cluster once per piece,
 * and each dead compressed version would pin a share of a host cluster.)
 *
 * Locking: a request holds the units it touches in the engine's range
 * lock (core/requests/rangelock.h, over unit numbers): shared when it covers them
 * all whole, exclusive when it covers an end unit partly, as it may
 * complete and rewrite it.  A rewrite holds its unit exclusive, so that
 * no write to the unit can land between its read and its write (and be
 * undone by it).  A request takes all its units in one call, so requests
 * cannot deadlock.  Everything else runs in parallel (no .thread_model
 * callback), and so does the compression in the plugin, on nbdkit's
 * worker threads.
 */
#include <nbdkit-filter.h>

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <search.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "compressed-export.h"
#include "rangelock.h"
#include "util.h"

#define MAX_TRACKED 4096        /* partly written units remembered */
#define MAX_INTERVALS 8         /* written pieces remembered per unit */

/* Per connection, from the plugin below. */
struct handle {
  uint64_t size;
  uint64_t unit;                /* bytes per unit, a power of two */
  bool writable;
  bool can_zero;
};

/* --- Partly written units ------------------------------------------- */

struct interval {
  uint32_t start, end;          /* bytes of the unit, end exclusive */
};

struct tracked {
  uint64_t unit;
  struct tracked *older, *newer;  /* age list */
  unsigned nr;
  struct interval iv[MAX_INTERVALS];  /* sorted, disjoint, not touching */
};

/* All protected by track_lock, which is never held across I/O.  Shared by
 * every connection: they all serve the same image, and a flush on any of
 * them must cover every write (the plugin advertises multi-conn).
 *
 * The units are found by number in a search tree (POSIX tsearch): the
 * engine's only hash table is its metadata cache's, built around slices
 * and pins, and nothing else in the project maps numbers to records.
 * The age list beside it gives the oldest unit, to drop when the table is
 * full and to sweep first.
 */
static pthread_mutex_t track_lock = PTHREAD_MUTEX_INITIALIZER;
static void *by_unit;           /* tsearch tree of struct tracked */
static struct tracked *oldest, *newest;
static size_t nr_tracked;

static int
unit_cmp (const void *a, const void *b)
{
  const uint64_t x = ((const struct tracked *) a)->unit;
  const uint64_t y = ((const struct tracked *) b)->unit;
  return x < y ? -1 : x > y;
}

static struct tracked *
find (uint64_t unit)
{
  const struct tracked key = { .unit = unit };
  struct tracked **t = tfind (&key, &by_unit, unit_cmp);

  return t ? *t : NULL;
}

/* False when out of memory (t is then not tracked). */
static bool
insert (struct tracked *t)
{
  if (!tsearch (t, &by_unit, unit_cmp))
    return false;
  t->older = newest;
  t->newer = NULL;
  if (newest)
    newest->newer = t;
  else
    oldest = t;
  newest = t;
  nr_tracked++;
  return true;
}

static void
remove_entry (struct tracked *t)
{
  tdelete (t, &by_unit, unit_cmp);
  if (t->older)
    t->older->newer = t->newer;
  else
    oldest = t->newer;
  if (t->newer)
    t->newer->older = t->older;
  else
    newest = t->older;
  nr_tracked--;
  free (t);
}

/* Add [start, end) to what t covers.  Past MAX_INTERVALS pieces the new
 * one is not recorded: the unit then waits for a flush.  True when all of
 * [0, len) is covered.
 */
static bool
cover (struct tracked *t, uint32_t start, uint32_t end, uint32_t len)
{
  struct interval merged = { start, end }, out[MAX_INTERVALS + 1];
  unsigned n = 0;
  bool placed = false;

  for (unsigned i = 0; i < t->nr; i++) {
    struct interval v = t->iv[i];
    if (v.end < merged.start)
      out[n++] = v;
    else if (v.start > merged.end) {
      if (!placed) {
        out[n++] = merged;
        placed = true;
      }
      out[n++] = v;
    }
    else {
      /* Overlapping or touching: sorted input, so nothing placed yet. */
      merged.start = v.start < merged.start ? v.start : merged.start;
      merged.end = v.end > merged.end ? v.end : merged.end;
    }
  }
  if (!placed)
    out[n++] = merged;
  if (n > MAX_INTERVALS)
    return false;
  memcpy (t->iv, out, n * sizeof *out);
  t->nr = n;
  return n == 1 && t->iv[0].start == 0 && t->iv[0].end >= len;
}

/* [start, end) of a unit `len` bytes long now holds what the client
 * asked for.  True when that completes the unit, which the caller must
 * then rewrite (its entry is gone).  An untracked unit starts being
 * tracked only with `create`.  When the table is full, the oldest unit is
 * dropped from it and returned in *victim, for the caller to rewrite once
 * it holds no lock.
 */
static bool
mark (uint64_t unit, uint32_t start, uint32_t end, uint32_t len, bool create,
      uint64_t *victim, bool *have_victim)
{
  struct tracked *t;
  bool complete;

  pthread_mutex_lock (&track_lock);
  t = find (unit);
  if (!t && !create) {
    pthread_mutex_unlock (&track_lock);
    return false;
  }
  if (!t) {
    if (nr_tracked >= MAX_TRACKED) {
      *victim = oldest->unit;
      *have_victim = true;
      remove_entry (oldest);
    }
    t = calloc (1, sizeof *t);
    if (t)
      t->unit = unit;
    if (!t || !insert (t)) {
      /* The unit just stays uncompressed. */
      free (t);
      pthread_mutex_unlock (&track_lock);
      return false;
    }
  }
  complete = cover (t, start, end, len);
  if (complete)
    remove_entry (t);
  pthread_mutex_unlock (&track_lock);
  return complete;
}

/* Units [first, last] were written whole: nothing left to merge. */
static void
forget (uint64_t first, uint64_t last)
{
  pthread_mutex_lock (&track_lock);
  if (nr_tracked > 0 && last - first < nr_tracked) {
    for (uint64_t u = first; u <= last; u++) {
      struct tracked *t = find (u);
      if (t)
        remove_entry (t);
    }
  }
  else {
    for (struct tracked *t = oldest, *next; t; t = next) {
      next = t->newer;
      if (t->unit >= first && t->unit <= last)
        remove_entry (t);
    }
  }
  pthread_mutex_unlock (&track_lock);
}

/* --- Unit locks ------------------------------------------------------ */

/* The engine's range lock, over unit numbers instead of clusters: a
 * request takes its units in one call, which takes the stripes in
 * ascending order, so requests cannot deadlock.  Created in .get_ready.
 */
static struct qcow2_rangelock *units;

/* A request takes all its units exclusive when it covers one of its end
 * units partly (it may complete and rewrite it), shared otherwise.  So
 * whole-unit writes run side by side; a partial one waits for, and
 * blocks, requests on its whole range rather than on its end units only.
 * That costs parallelism only to misaligned requests overlapping each
 * other, which clients do not send in practice.
 */
static void
hold_units (uint64_t first, uint64_t last, bool exclusive)
{
  qcow2_rangelock_lock (units, first, last - first + 1, exclusive);
}

static void
release_units (uint64_t first, uint64_t last)
{
  qcow2_rangelock_unlock (units, first, last - first + 1);
}

/* --- Writing --------------------------------------------------------- */

static uint64_t
unit_start (const struct handle *h, uint64_t unit)
{
  return unit * h->unit;
}

/* Bytes of a unit: the last one of the disk may be short. */
static uint32_t
unit_len (const struct handle *h, uint64_t unit)
{
  uint64_t start = unit_start (h, unit);
  return (uint32_t) (h->size - start < h->unit ? h->size - start : h->unit);
}

static bool
covers_unit (const struct handle *h, uint64_t unit, uint64_t offset,
             uint64_t end)
{
  uint64_t start = unit_start (h, unit);
  return offset <= start && end >= start + unit_len (h, unit);
}

/* Whole units [offset, offset + count): units of zeros become zero
 * requests, runs of the others one write each.
 */
static int
write_units (nbdkit_next *next, const struct handle *h,
             const unsigned char *buf, uint64_t count, uint64_t offset,
             int *err)
{
  while (count > 0) {
    uint64_t n = 0;
    bool zero = false;

    /* The longest run of units of one kind. */
    while (n < count) {
      uint64_t len = count - n < h->unit ? count - n : h->unit;
      bool z = h->can_zero && is_zero (buf + n, len);
      if (n > 0 && z != zero)
        break;
      zero = z;
      n += len;
    }
    if ((zero ? next->zero (next, (uint32_t) n, offset,
                            NBDKIT_FLAG_MAY_TRIM, err)
              : next->pwrite (next, buf, (uint32_t) n, offset, 0, err))
        == -1)
      return -1;
    buf += n;
    offset += n;
    count -= n;
  }
  return 0;
}

/* Read a unit back and write it whole, so that the plugin compresses it.
 * The caller holds the unit exclusive.
 */
static int
rewrite (nbdkit_next *next, const struct handle *h, uint64_t unit, int *err)
{
  uint32_t len = unit_len (h, unit);
  unsigned char *buf = malloc (len);
  int r;

  if (!buf) {
    *err = errno;
    nbdkit_error ("malloc: %m");
    return -1;
  }
  r = next->pread (next, buf, len, unit_start (h, unit), 0, err);
  if (r == 0)
    r = write_units (next, h, buf, len, unit_start (h, unit), err);
  free (buf);
  return r;
}

static int
rewrite_unlocked (nbdkit_next *next, const struct handle *h, uint64_t unit,
                  int *err)
{
  int r;

  hold_units (unit, unit, true);
  r = rewrite (next, h, unit, err);
  release_units (unit, unit);
  return r;
}

/* Rewrite every unit pending when called (flush, close).  Units added
 * meanwhile belong to requests concurrent with this one.
 */
static int
sweep (nbdkit_next *next, const struct handle *h, int *err)
{
  size_t n;

  pthread_mutex_lock (&track_lock);
  n = nr_tracked;
  pthread_mutex_unlock (&track_lock);
  while (n-- > 0) {
    uint64_t unit;

    pthread_mutex_lock (&track_lock);
    if (!oldest) {
      pthread_mutex_unlock (&track_lock);
      break;
    }
    unit = oldest->unit;
    remove_entry (oldest);
    pthread_mutex_unlock (&track_lock);
    if (rewrite_unlocked (next, h, unit, err) == -1)
      return -1;
  }
  return 0;
}

enum op { OP_WRITE, OP_ZERO, OP_TRIM };

/* Every data-changing request: do it, then settle the bookkeeping of the
 * units it touched.  FUA becomes a flush at the end, after any rewrite.
 */
static int
request (nbdkit_next *next, const struct handle *h, enum op op,
         const unsigned char *buf, uint32_t count, uint64_t offset,
         uint32_t flags, int *err)
{
  const uint64_t end = offset + count;
  const uint64_t first = offset / h->unit, last = (end - 1) / h->unit;
  const bool head_partial = !covers_unit (h, first, offset, end);
  const bool tail_partial = !covers_unit (h, last, offset, end);
  const bool fua = flags & NBDKIT_FLAG_FUA;
  uint64_t victims[2];
  bool have_victim[2] = { false, false };
  int r = 0;

  if (count == 0)
    return 0;
  flags &= ~NBDKIT_FLAG_FUA;
  hold_units (first, last, head_partial || tail_partial);

  switch (op) {
  case OP_WRITE: {
    /* Head piece, whole units, tail piece, in that order. */
    uint64_t pos = offset;
    while (r == 0 && pos < end) {
      uint64_t unit = pos / h->unit;
      uint64_t n;
      if ((unit == first && head_partial) || (unit == last && tail_partial)) {
        uint64_t ue = unit_start (h, unit) + unit_len (h, unit);
        n = (ue < end ? ue : end) - pos;
        r = next->pwrite (next, buf, (uint32_t) n, pos, flags, err);
      }
      else {
        /* Up to the tail piece, or the end. */
        uint64_t stop = tail_partial ? unit_start (h, last) : end;
        n = stop - pos;
        r = write_units (next, h, buf, n, pos, err);
      }
      buf += n;
      pos += n;
    }
    break;
  }
  case OP_ZERO:
    r = next->zero (next, count, offset, flags, err);
    break;
  case OP_TRIM:
    r = next->trim (next, count, offset, flags, err);
    break;
  }

  if (r == 0) {
    uint64_t whole_first = first + head_partial;
    uint64_t whole_last = last - tail_partial;
    if (whole_first <= whole_last && whole_last != UINT64_MAX)
      forget (whole_first, whole_last);
    for (int i = 0; i < 2 && r == 0; i++) {
      uint64_t unit = i == 0 ? first : last;
      uint64_t us = unit_start (h, unit);
      uint32_t len = unit_len (h, unit);
      if (!(i == 0 ? head_partial : tail_partial) || (i == 1 && last == first))
        continue;
      /* The plugin leaves partial clusters alone on trim: nothing to
       * recompress unless the unit was being written anyway.
       */
      if (mark (unit, (uint32_t) (offset > us ? offset - us : 0),
                (uint32_t) (end < us + len ? end - us : len), len,
                op != OP_TRIM, &victims[i], &have_victim[i]))
        r = rewrite (next, h, unit, err);
    }
  }
  release_units (first, last);

  for (int i = 0; i < 2 && r == 0; i++)
    if (have_victim[i])
      r = rewrite_unlocked (next, h, victims[i], err);
  if (r == 0 && fua)
    r = next->flush (next, 0, err);
  return r;
}

/* --- Callbacks ------------------------------------------------------- */

static int
compress_get_ready (int thread_model)
{
  (void) thread_model;
  units = qcow2_rangelock_new ();
  if (!units) {
    nbdkit_error ("qcow2-compress: cannot create the unit locks: %m");
    return -1;
  }
  return 0;
}

static void
compress_unload (void)
{
  while (oldest)
    remove_entry (oldest);
  qcow2_rangelock_free (units);
}

/* One export: the active image, under the default name. */
static int
compress_list_exports (nbdkit_next_list_exports *next, nbdkit_backend *nxdata,
                       int readonly, int is_tls,
                       struct nbdkit_exports *exports)
{
  (void) next; (void) nxdata; (void) readonly; (void) is_tls;
  return nbdkit_add_export (exports, "", COMPRESSED_DESCRIPTION);
}

static const char *
compress_default_export (nbdkit_next_default_export *next,
                         nbdkit_backend *nxdata, int readonly, int is_tls)
{
  (void) next; (void) nxdata; (void) readonly; (void) is_tls;
  return "";
}

static void *
compress_open (nbdkit_next_open *next, nbdkit_context *nxdata, int readonly,
               const char *exportname, int is_tls)
{
  struct handle *h;

  (void) exportname; (void) is_tls;
  if (next (nxdata, readonly, COMPRESSED_EXPORT) == -1)
    return NULL;
  h = calloc (1, sizeof *h);
  if (!h)
    nbdkit_error ("calloc: %m");
  return h;
}

static void
compress_close (void *handle)
{
  free (handle);
}

static int
compress_prepare (nbdkit_next *next, void *handle, int readonly)
{
  struct handle *h = handle;
  const char *desc = next->export_description (next);
  uint32_t minimum, preferred, maximum;
  int64_t size;

  /* Another plugin would serve the name as an ordinary export (or refuse
   * it) and silently store everything uncompressed.
   */
  if (!desc || strcmp (desc, COMPRESSED_DESCRIPTION) != 0) {
    nbdkit_error ("qcow2-compress: the plugin did not open the compressing "
                  "export \"%s\"; this filter works only over "
                  "nbdkit-qcow2-plugin or nbdkit-qcow2-filter",
                  COMPRESSED_EXPORT);
    return -1;
  }
  size = next->get_size (next);
  if (size == -1)
    return -1;
  if (next->block_size (next, &minimum, &preferred, &maximum) == -1)
    return -1;
  /* The plugin's preferred size is its cluster size (at least 4 KiB); a
   * layer in between may report another, and then a power of two at least
   * as large still holds whole clusters.
   */
  if (preferred < 4096 || (preferred & (preferred - 1)) != 0) {
    nbdkit_error ("qcow2-compress: the layer below prefers blocks of %"
                  PRIu32 " bytes, not a power of two of 4096 or more",
                  preferred);
    return -1;
  }
  h->size = (uint64_t) size;
  h->unit = preferred;
  h->writable = !readonly && next->can_write (next) == 1;
  h->can_zero = next->can_zero (next) > NBDKIT_ZERO_NONE;
  nbdkit_debug ("qcow2-compress: %" PRIu64 "-byte units", h->unit);
  return 0;
}

/* A closing connection leaves no unit uncompressed: rewrite what is
 * pending, whichever connection wrote it (they all see one image).
 */
static int
compress_finalize (nbdkit_next *next, void *handle)
{
  struct handle *h = handle;
  int err = 0;

  if (h->writable && sweep (next, h, &err) == -1) {
    nbdkit_error ("qcow2-compress: could not compress the pending "
                  "clusters: %s", strerror (err));
    return -1;
  }
  return 0;
}

static int
compress_pwrite (nbdkit_next *next, void *handle, const void *buf,
                 uint32_t count, uint64_t offset, uint32_t flags, int *err)
{
  return request (next, handle, OP_WRITE, buf, count, offset, flags, err);
}

static int
compress_zero (nbdkit_next *next, void *handle, uint32_t count,
               uint64_t offset, uint32_t flags, int *err)
{
  return request (next, handle, OP_ZERO, NULL, count, offset, flags, err);
}

static int
compress_trim (nbdkit_next *next, void *handle, uint32_t count,
               uint64_t offset, uint32_t flags, int *err)
{
  return request (next, handle, OP_TRIM, NULL, count, offset, flags, err);
}

static int
compress_flush (nbdkit_next *next, void *handle, uint32_t flags, int *err)
{
  struct handle *h = handle;

  /* A read-only connection may flush too, but cannot write. */
  if (h->writable && sweep (next, h, err) == -1)
    return -1;
  return next->flush (next, flags, err);
}

static struct nbdkit_filter filter = {
  .name = "qcow2-compress",
  .longname = "nbdkit qcow2 compression filter",
  .unload = compress_unload,
  .get_ready = compress_get_ready,
  .list_exports = compress_list_exports,
  .default_export = compress_default_export,
  .open = compress_open,
  .close = compress_close,
  .prepare = compress_prepare,
  .finalize = compress_finalize,
  .pwrite = compress_pwrite,
  .zero = compress_zero,
  .trim = compress_trim,
  .flush = compress_flush,
};

NBDKIT_REGISTER_FILTER (filter)
