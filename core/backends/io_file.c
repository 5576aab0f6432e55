/* The host-file backend.  The file descriptor is shared by all threads:
 * pread/pwrite carry their own offsets, so no lock is needed.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io.h"

struct file_io {
  struct qcow2_io io;
  int fd;
};

static int
file_pread (struct qcow2_io *io, void *buf, size_t len, uint64_t offset)
{
  struct file_io *f = (struct file_io *) io;
  char *p = buf;

  while (len > 0) {
    ssize_t r = pread (f->fd, p, len, (off_t) offset);
    if (r < 0) {
      if (errno == EINTR)
        continue;
      return -errno;
    }
    if (r == 0)
      return -EIO; /* past end of file */
    p += r;
    len -= (size_t) r;
    offset += (uint64_t) r;
  }
  return 0;
}

static int
file_pwrite (struct qcow2_io *io, const void *buf, size_t len,
             uint64_t offset)
{
  struct file_io *f = (struct file_io *) io;
  const char *p = buf;

  while (len > 0) {
    ssize_t r = pwrite (f->fd, p, len, (off_t) offset);
    if (r < 0) {
      if (errno == EINTR)
        continue;
      return -errno;
    }
    p += r;
    len -= (size_t) r;
    offset += (uint64_t) r;
  }
  return 0;
}

static int
file_flush (struct qcow2_io *io)
{
  struct file_io *f = (struct file_io *) io;
  return fdatasync (f->fd) == -1 ? -errno : 0;
}

static int
file_get_size (struct qcow2_io *io, uint64_t *size)
{
  struct file_io *f = (struct file_io *) io;
  struct stat st;

  if (fstat (f->fd, &st) == -1)
    return -errno;
  *size = (uint64_t) st.st_size;
  return 0;
}

static int
file_punch_hole (struct qcow2_io *io, uint64_t offset, uint64_t len)
{
  struct file_io *f = (struct file_io *) io;

  if (fallocate (f->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                 (off_t) offset, (off_t) len) == -1)
    return errno == EOPNOTSUPP ? -ENOTSUP : -errno;
  return 0;
}

static int
file_preallocate (struct qcow2_io *io, uint64_t offset, uint64_t len)
{
  struct file_io *f = (struct file_io *) io;

  if (fallocate (f->fd, 0, (off_t) offset, (off_t) len) == -1)
    return errno == EOPNOTSUPP ? -ENOTSUP : -errno;
  return 0;
}

static int
file_fd (struct qcow2_io *io)
{
  return ((struct file_io *) io)->fd;
}

static void
file_close (struct qcow2_io *io)
{
  struct file_io *f = (struct file_io *) io;
  close (f->fd);
  free (f);
}

static const struct qcow2_io_ops file_ops = {
  .pread = file_pread,
  .pwrite = file_pwrite,
  .flush = file_flush,
  .get_size = file_get_size,
  .punch_hole = file_punch_hole,
  .preallocate = file_preallocate,
  .discard = file_punch_hole,
  .fd = file_fd,
  .close = file_close,
};

int
qcow2_io_file_open (const char *path, enum qcow2_io_mode mode,
                    struct qcow2_io **io_out)
{
  struct file_io *f;
  struct stat st;
  int fd;

  fd = open (path, (mode == QCOW2_IO_READ_ONLY ? O_RDONLY : O_RDWR) |
            O_CLOEXEC);
  if (fd == -1 && mode == QCOW2_IO_PREFER_WRITE &&
      (errno == EACCES || errno == EROFS || errno == EPERM))
    fd = open (path, O_RDONLY | O_CLOEXEC);
  if (fd == -1)
    return -errno;
  if (fstat (fd, &st) == -1 || !S_ISREG (st.st_mode)) {
    int err = errno && !S_ISREG (st.st_mode) ? EINVAL : errno;
    if (err == 0)
      err = EINVAL;
    close (fd);
    return -err;
  }
  f = calloc (1, sizeof *f);
  if (!f) {
    close (fd);
    return -ENOMEM;
  }
  f->io.ops = &file_ops;
  f->fd = fd;
  *io_out = &f->io;
  return 0;
}

bool
qcow2_io_is_writable (struct qcow2_io *io)
{
  if (io->ops->is_writable)
    return io->ops->is_writable (io);
  int fd = io->ops->fd ? io->ops->fd (io) : -1;
  int flags = fd >= 0 ? fcntl (fd, F_GETFL) : -1;

  return flags != -1 && (flags & O_ACCMODE) == O_RDWR;
}
