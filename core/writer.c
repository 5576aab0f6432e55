/* The writer state of an image: whether requests may write it.
 *
 * One state per image (struct qcow2_image.state), changed only here:
 *
 *   from \ to   READ_ONLY  ENABLING  WRITABLE  BROKEN
 *   READ_ONLY       -         (1)       -        -
 *   ENABLING       (2)         -       (3)      (4)
 *   WRITABLE        -          -        -       (5)
 *   BROKEN          -          -        -       (6)
 *
 *   (1) qcow2_enable_write starts: take write locks, load refcounts,
 *       repair a dirty image, claim bitmaps.  Requests do not write yet.
 *   (2) enabling failed before writing anything of unknown outcome (a lock
 *       conflict, a bad refcount table, no memory): back to read-only; a
 *       later qcow2_enable_write may try again.
 *   (3) the writer is complete: requests write.
 *   (4) and (5) qcow2_writer_break: a metadata write or sync failed, so
 *       the disk may hold the old bytes, the new ones, or (after a failed
 *       fdatasync, whose dirty pages the kernel may have dropped) neither
 *       for earlier writes too; or qcow2_writer_break_corrupt: a write
 *       would have landed on metadata, and the image is being marked
 *       corrupt on disk (overlap.c).
 *   (6) a second failure keeps the first reason.
 * BROKEN is final for this open: nothing more is written (qcow2_sync_metadata
 * and cache write-back refuse, close writes nothing), writes, zeroes,
 * trims and flushes fail with EIO and one message saying why, reads keep
 * working.  Reopening the image starts again from READ_ONLY; a dirty or
 * leaking image is repaired then (qemu-img check, or the automatic repair
 * of a dirty image), one marked corrupt stays read-only until
 * `qemu-img check -r all`.
 *
 * Corruption is a kind of BROKEN rather than a state of its own: for the
 * requests of this open both mean "writes fail with EIO, reads work"; they
 * differ only on disk (the corrupt bit, written by overlap.c), which
 * decides what the next open may do.
 *
 * The state is read with one atomic load (qcow2_writer_state) on every
 * write; transitions are rare and serialised by state_lock, which also
 * guards broken_reason.  state_lock is a leaf lock: nothing is taken
 * while it is held, so breaking under the writer lock is safe.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"
#include "util.h"

static const char *const state_names[] = {
  [QCOW2_WRITER_READ_ONLY] = "read-only",
  [QCOW2_WRITER_ENABLING] = "enabling",
  [QCOW2_WRITER_WRITABLE] = "writable",
  [QCOW2_WRITER_BROKEN] = "broken",
};

/* The table above. */
static bool
allowed (enum qcow2_writer_state from, enum qcow2_writer_state to)
{
  switch (from) {
  case QCOW2_WRITER_READ_ONLY:
    return to == QCOW2_WRITER_ENABLING;
  case QCOW2_WRITER_ENABLING:
    return to != QCOW2_WRITER_ENABLING;
  case QCOW2_WRITER_WRITABLE:
  case QCOW2_WRITER_BROKEN:
    return to == QCOW2_WRITER_BROKEN;
  }
  return false;
}

/* Under state_lock.  True if the state changed. */
static bool
transition_locked (struct qcow2_image *img, enum qcow2_writer_state to)
{
  enum qcow2_writer_state from = img->state;

  if (!allowed (from, to)) {
    qcow2_error ("%s: internal error: writer state %s -> %s",
                 img->filename, state_names[from], state_names[to]);
    assert (!"writer state transition not in the table");
    return false;
  }
  if (from == to)
    return false;
  __atomic_store_n (&img->state, to, __ATOMIC_RELEASE);
  return true;
}

void
qcow2_writer_transition (struct qcow2_image *img, enum qcow2_writer_state to)
{
  pthread_mutex_lock (&img->state_lock);
  transition_locked (img, to);
  pthread_mutex_unlock (&img->state_lock);
}

/* Move to BROKEN, recording why if this is the first time. */
static bool
enter_broken (struct qcow2_image *img, const char *why)
{
  bool first;

  pthread_mutex_lock (&img->state_lock);
  first = transition_locked (img, QCOW2_WRITER_BROKEN);
  if (first)
    snprintf (img->broken_reason, sizeof img->broken_reason, "%s", why);
  pthread_mutex_unlock (&img->state_lock);
  return first;
}

int
qcow2_writer_break (struct qcow2_image *img, int err, const char *what)
{
  char why[200];

  assert (err < 0);
  snprintf (why, sizeof why, "%s failed: %s", what, strerror (-err));
  if (enter_broken (img, why))
    qcow2_error ("%s: %s; what the disk holds is unknown, so writes fail "
                 "from now on (reads still work) until the image is "
                 "reopened and, if qemu-img check finds problems, "
                 "repaired", img->filename, why);
  return err;
}

bool
qcow2_writer_break_corrupt (struct qcow2_image *img, const char *why)
{
  char reason[sizeof img->broken_reason];

  snprintf (reason, sizeof reason, "marked corrupt: %s", why);
  return enter_broken (img, reason);
}

int
qcow2_writer_refuse_broken (struct qcow2_image *img)
{
  char why[sizeof img->broken_reason];

  pthread_mutex_lock (&img->state_lock);
  memcpy (why, img->broken_reason, sizeof why);
  pthread_mutex_unlock (&img->state_lock);
  qcow2_error ("%s: writing is disabled after an earlier failure (%s); "
               "reopen the image to write again", img->filename, why);
  return -EIO;
}

/* Public (qcow2.h): may requests write now? */
bool
qcow2_is_writable (const struct qcow2_image *img)
{
  return qcow2_writer_state (img) == QCOW2_WRITER_WRITABLE;
}

int
qcow2_writer_require (struct qcow2_image *img, const char *what)
{
  switch (qcow2_writer_state (img)) {
  case QCOW2_WRITER_WRITABLE:
    return 0;
  case QCOW2_WRITER_BROKEN:
    return qcow2_writer_refuse_broken (img);
  case QCOW2_WRITER_READ_ONLY:
  case QCOW2_WRITER_ENABLING:
    break;
  }
  if (what)
    qcow2_error ("%s: %s needs the image open read-write", img->filename,
                 what);
  else
    qcow2_error ("%s: the image is open read-only", img->filename);
  return -EROFS;
}
