/* Memory backends for unit tests and the fuzzer: a read-only view of a
 * buffer, and a writable fixed-size container that owns its buffer.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "io.h"

struct mem_io {
  struct qcow2_io io;
  const unsigned char *data;
  size_t size;
  unsigned char *owned;     /* containers: the buffer, == data */
};

static int
mem_pread (struct qcow2_io *io, void *buf, size_t len, uint64_t offset)
{
  struct mem_io *m = (struct mem_io *) io;

  if (offset > m->size || len > m->size - offset)
    return -EIO;
  memcpy (buf, m->data + offset, len);
  return 0;
}

static int
mem_pwrite (struct qcow2_io *io, const void *buf, size_t len,
            uint64_t offset)
{
  (void) io; (void) buf; (void) len; (void) offset;
  return -EROFS;
}

static int
mem_flush (struct qcow2_io *io)
{
  (void) io;
  return 0;
}

static int
mem_get_size (struct qcow2_io *io, uint64_t *size)
{
  *size = ((struct mem_io *) io)->size;
  return 0;
}

static int
mem_punch_hole (struct qcow2_io *io, uint64_t offset, uint64_t len)
{
  (void) io; (void) offset; (void) len;
  return -ENOTSUP;
}

static int
mem_fd (struct qcow2_io *io)
{
  (void) io;
  return -1;
}

static void
mem_close (struct qcow2_io *io)
{
  free (((struct mem_io *) io)->owned);
  free (io);
}

static int
container_pwrite (struct qcow2_io *io, const void *buf, size_t len,
                  uint64_t offset)
{
  struct mem_io *m = (struct mem_io *) io;

  /* A container does not grow: writing past its end is an I/O error,
   * as on a block device.
   */
  if (offset > m->size || len > m->size - offset)
    return -EIO;
  memcpy (m->owned + offset, buf, len);
  return 0;
}

static bool
container_is_writable (struct qcow2_io *io)
{
  (void) io;
  return true;
}

static const struct qcow2_io_ops mem_ops = {
  .pread = mem_pread,
  .pwrite = mem_pwrite,
  .flush = mem_flush,
  .get_size = mem_get_size,
  .punch_hole = mem_punch_hole,
  .fd = mem_fd,
  .close = mem_close,
};

static const struct qcow2_io_ops container_ops = {
  .pread = mem_pread,
  .pwrite = container_pwrite,
  .flush = mem_flush,
  .get_size = mem_get_size,
  .is_writable = container_is_writable,
  .fd = mem_fd,
  .close = mem_close,
  .fixed_size = true,
};

struct qcow2_io *
qcow2_io_mem_container_new (size_t size)
{
  struct mem_io *m = calloc (1, sizeof *m);

  if (!m || !(m->owned = calloc (1, size ? size : 1))) {
    free (m);
    return NULL;
  }
  m->io.ops = &container_ops;
  m->data = m->owned;
  m->size = size;
  return &m->io;
}

unsigned char *
qcow2_io_mem_data (struct qcow2_io *io)
{
  return ((struct mem_io *) io)->owned;
}

struct qcow2_io *
qcow2_io_mem_new (const void *data, size_t size)
{
  struct mem_io *m = calloc (1, sizeof *m);

  if (!m)
    return NULL;
  m->io.ops = &mem_ops;
  m->data = data;
  m->size = size;
  return &m->io;
}
