/* The byte-level backend under the engine: a small vtable so the same
 * engine runs over a host file, over memory (unit tests, fuzzing) and
 * over another nbdkit layer (filters/qcow2/io_next.c).
 *
 * Invariants every implementation keeps:
 * - pread and pwrite transfer the whole range or fail; a read that reaches
 *   past the end of the backend fails with -EIO rather than inventing bytes
 *   (callers that want QEMU's zero-fill past EOF clip against get_size);
 * - all calls are safe from many threads at once;
 * - errors are negative errno values; nothing is reported to the user here.
 *
 * Two kinds of backend: a growable file, where new clusters go past the
 * end and the file grows, and a fixed-size container (a block device, an
 * export of another NBD server, an object), where the image lives inside
 * a size that never changes: clusters are allocated only below it, and
 * when none is free allocation fails with -ENOSPC (refcount.c).
 */
#ifndef QCOW2_IO_H
#define QCOW2_IO_H

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct qcow2_io;

struct qcow2_io_ops {
  int (*pread) (struct qcow2_io *io, void *buf, size_t len, uint64_t offset);
  int (*pwrite) (struct qcow2_io *io, const void *buf, size_t len,
                 uint64_t offset);
  int (*flush) (struct qcow2_io *io);
  int (*get_size) (struct qcow2_io *io, uint64_t *size);
  /* Deallocate [offset, offset + len) so it reads as zeros and takes no
   * space; -ENOTSUP where the backend cannot.
   */
  int (*punch_hole) (struct qcow2_io *io, uint64_t offset, uint64_t len);
  /* Reserve space for [offset, offset + len) without changing what it
   * reads (the file may grow to cover it); -ENOTSUP where the backend
   * cannot.  A hint: callers ignore failures.
   */
  int (*preallocate) (struct qcow2_io *io, uint64_t offset, uint64_t len);
  /* Release the space of [offset, offset + len), whose contents nobody
   * reads any more (a freed cluster); what it reads afterwards is
   * unspecified.  -ENOTSUP where the backend cannot.  A hint: callers
   * ignore failures.
   */
  int (*discard) (struct qcow2_io *io, uint64_t offset, uint64_t len);
  /* Can the backend be written?  NULL: ask the file descriptor. */
  bool (*is_writable) (struct qcow2_io *io);
  /* The file descriptor behind the backend, or -1 (for image locks). */
  int (*fd) (struct qcow2_io *io);
  void (*close) (struct qcow2_io *io);
  /* A fixed-size container rather than a growable file (see above). */
  bool fixed_size;
};

struct qcow2_io {
  const struct qcow2_io_ops *ops;
};

static inline int
qcow2_io_pread (struct qcow2_io *io, void *buf, size_t len, uint64_t offset)
{
  return io->ops->pread (io, buf, len, offset);
}

static inline int
qcow2_io_get_size (struct qcow2_io *io, uint64_t *size)
{
  return io->ops->get_size (io, size);
}

static inline int
qcow2_io_pwrite (struct qcow2_io *io, const void *buf, size_t len,
                 uint64_t offset)
{
  return io->ops->pwrite (io, buf, len, offset);
}

static inline int
qcow2_io_flush (struct qcow2_io *io)
{
  return io->ops->flush (io);
}

static inline int
qcow2_io_preallocate (struct qcow2_io *io, uint64_t offset, uint64_t len)
{
  return io->ops->preallocate ? io->ops->preallocate (io, offset, len)
                              : -ENOTSUP;
}

static inline int
qcow2_io_discard (struct qcow2_io *io, uint64_t offset, uint64_t len)
{
  return io->ops->discard ? io->ops->discard (io, offset, len) : -ENOTSUP;
}

static inline bool
qcow2_io_is_fixed_size (const struct qcow2_io *io)
{
  return io->ops->fixed_size;
}

static inline void
qcow2_io_close (struct qcow2_io *io)
{
  if (io)
    io->ops->close (io);
}

enum qcow2_io_mode {
  QCOW2_IO_READ_ONLY,
  QCOW2_IO_READ_WRITE,
  /* Read-write when permissions allow, so an image can be made writable
   * later without reopening it; read-only otherwise.
   */
  QCOW2_IO_PREFER_WRITE,
};

/* A host file.  Returns -errno. */
int qcow2_io_file_open (const char *path, enum qcow2_io_mode mode,
                        struct qcow2_io **io_out);

/* Can the backend be written? */
bool qcow2_io_is_writable (struct qcow2_io *io);

/* A read-only view of a memory buffer; the buffer is not copied and must
 * outlive the io.
 */
struct qcow2_io *qcow2_io_mem_new (const void *data, size_t size);

/* A writable fixed-size container in memory, size bytes of zeros (unit
 * tests of containers and of failing storage).  The io owns the buffer;
 * qcow2_io_mem_data gives it to the test.
 */
struct qcow2_io *qcow2_io_mem_container_new (size_t size);
unsigned char *qcow2_io_mem_data (struct qcow2_io *io);

#endif /* QCOW2_IO_H */
