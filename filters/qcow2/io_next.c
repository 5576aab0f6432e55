/* The engine's byte backend over the layer below the filter: one shared
 * nbdkit context (see qcow2.c), seen as a fixed-size container (core/backends/io.h).
 *
 * Invariants:
 * - the container's size and abilities are read once, when the backend is
 *   made: nbdkit caches them for a context anyway, and the engine's
 *   allocation limit must not move under it;
 * - requests go down in pieces of at most MAX_REQUEST bytes (a plugin
 *   such as nbd forwards them to a server that refuses larger ones);
 * - a read or write reaching past the end fails with EIO, as the engine's
 *   backends must (io.h): a container does not grow;
 * - when the layer below is not PARALLEL, calls are serialised here: nbdkit
 *   serialises requests per connection, but this context is shared by all
 *   of them;
 * - errors of the layer below come back as their errno, unchanged (EIO
 *   from a dropped connection, ENOSPC, a timeout...).
 */
#include <nbdkit-filter.h>

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>

#include "io.h"
#include "io_next.h"

#define MAX_REQUEST (32u << 20)

struct next_io {
  struct qcow2_io io;
  nbdkit_next *next;
  uint64_t size;
  bool can_write, can_flush, can_trim;
  pthread_mutex_t *serialise;     /* NULL: the layer below is parallel */
};

static void
enter (struct next_io *n)
{
  if (n->serialise)
    pthread_mutex_lock (n->serialise);
}

static void
leave (struct next_io *n)
{
  if (n->serialise)
    pthread_mutex_unlock (n->serialise);
}

static bool
inside (const struct next_io *n, size_t len, uint64_t offset)
{
  return offset <= n->size && len <= n->size - offset;
}

/* Read into buf, or write from it, [offset, offset + len) in requests of
 * at most MAX_REQUEST bytes.
 */
static int
transfer (struct next_io *n, bool write, void *buf, size_t len,
          uint64_t offset)
{
  char *p = buf;
  int err = 0;

  if (!inside (n, len, offset))
    return -EIO;
  enter (n);
  while (len > 0) {
    uint32_t count = len > MAX_REQUEST ? MAX_REQUEST : (uint32_t) len;
    int r = write ? n->next->pwrite (n->next, p, count, offset, 0, &err)
                  : n->next->pread (n->next, p, count, offset, 0, &err);
    if (r == -1)
      break;
    p += count;
    offset += count;
    len -= count;
  }
  leave (n);
  return len == 0 ? 0 : -(err ? err : EIO);
}

static int
next_pread (struct qcow2_io *io, void *buf, size_t len, uint64_t offset)
{
  return transfer ((struct next_io *) io, false, buf, len, offset);
}

static int
next_pwrite (struct qcow2_io *io, const void *buf, size_t len,
             uint64_t offset)
{
  struct next_io *n = (struct next_io *) io;

  if (!n->can_write)
    return -EROFS;
  /* transfer only reads from buf when writing. */
  return transfer (n, true, (void *) buf, len, offset);
}

/* A layer that cannot flush (memory, or a plugin without .flush) has no
 * more durable state to reach: nothing to do.
 */
static int
next_flush (struct qcow2_io *io)
{
  struct next_io *n = (struct next_io *) io;
  int err = 0, r = 0;

  if (!n->can_flush || !n->can_write)
    return 0;
  enter (n);
  if (n->next->flush (n->next, 0, &err) == -1)
    r = -(err ? err : EIO);
  leave (n);
  return r;
}

static int
next_get_size (struct qcow2_io *io, uint64_t *size)
{
  *size = ((struct next_io *) io)->size;
  return 0;
}

/* Freed clusters: give the space back where the layer below can (a thin
 * logical volume, a sparse file, an object store); a hint.
 */
static int
next_discard (struct qcow2_io *io, uint64_t offset, uint64_t len)
{
  struct next_io *n = (struct next_io *) io;
  int err = 0, r = 0;

  if (!n->can_trim || !n->can_write)
    return -ENOTSUP;
  if (!inside (n, len, offset) || len > UINT32_MAX)
    return -EINVAL;
  enter (n);
  if (n->next->trim (n->next, (uint32_t) len, offset, 0, &err) == -1)
    r = -(err ? err : EIO);
  leave (n);
  return r;
}

static bool
next_is_writable (struct qcow2_io *io)
{
  return ((struct next_io *) io)->can_write;
}

static int
next_fd (struct qcow2_io *io)
{
  (void) io;
  return -1;
}

/* The context belongs to the filter, which closes it after the image. */
static void
next_close (struct qcow2_io *io)
{
  free (io);
}

static const struct qcow2_io_ops next_ops = {
  .pread = next_pread,
  .pwrite = next_pwrite,
  .flush = next_flush,
  .get_size = next_get_size,
  .discard = next_discard,
  .is_writable = next_is_writable,
  .fd = next_fd,
  .close = next_close,
  .fixed_size = true,
};

int
qcow2_io_next_new (nbdkit_next *next, pthread_mutex_t *serialise,
                   struct qcow2_io **io_out)
{
  struct next_io *n;
  int64_t size = next->get_size (next);
  int w, f, t;

  if (size == -1)
    return -EIO;
  w = next->can_write (next);
  f = next->can_flush (next);
  t = next->can_trim (next);
  if (w == -1 || f == -1 || t == -1)
    return -EIO;
  n = calloc (1, sizeof *n);
  if (!n)
    return -ENOMEM;
  n->io.ops = &next_ops;
  n->next = next;
  n->size = (uint64_t) size;
  n->can_write = w;
  n->can_flush = f;
  n->can_trim = t;
  n->serialise = serialise;
  *io_out = &n->io;
  return 0;
}
