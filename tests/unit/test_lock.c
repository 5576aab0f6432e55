/* nbdkit-qcow2
 * Copyright (C) 2026 the nbdkit-qcow2 authors
 * SPDX-License-Identifier: BSD-3-Clause (see LICENSE)
 */

/* Unit test of core/backends/image_lock.c, and a lock holder for the integration test.
 *
 *   test_lock
 *       Runs the unit test on a temporary file.  Each "opener" is a
 *       separate open() of that file: OFD locks belong to the open file
 *       description, so one process can play every role.  The exact bytes
 *       are checked from yet another description with F_OFD_GETLK.  Exit
 *       status 0 = pass, 1 = failure (each printed), 77 = skipped (the
 *       kernel has no OFD locks, so one process cannot play two openers).
 *
 *   test_lock hold FILE rw|ro
 *       Opens FILE (read-write or read-only), takes the locks with
 *       qcow2_lock_image, prints "locked" and holds them until stdin
 *       reaches end of file.  On failure prints the engine's error line on
 *       stderr followed by "lock failed: -ERRNO (strerror)", and exits 1.
 *       tests/integration/test_lock.py runs it against qemu-io and
 *       qemu-img.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "image_lock.h"
#include "qcow2.h"
#include "testing.h"

static char path[] = "/tmp/test_lock.XXXXXX";

static int
open_rw (void)
{
  int fd = open (path, O_RDWR | O_CLOEXEC);
  if (fd == -1) {
    perror (path);
    exit (1);
  }
  return fd;
}

/* The protocol bytes as a mask: bit i = byte 100 + i, bit 8 + i = byte
 * 200 + i, for i in 0..4 (4 covers QEMU <= 6.1's graph-mod byte, which we
 * must never take).
 */
#define B(byte) ((byte) < 200 ? 1u << ((byte) - 100) : 1u << ((byte) - 192))
#define RW_BYTES (B (100) | B (101) | B (103) | B (201) | B (203))
#define RO_BYTES (B (100) | B (201) | B (203))

/* Which protocol bytes someone other than `observer`'s description holds,
 * as F_OFD_GETLK reports them.  With type F_WRLCK any lock shows up; with
 * F_RDLCK only write locks would, and QEMU's protocol must have none.
 */
static unsigned
held_bytes (int observer, short type)
{
  unsigned mask = 0;

  for (int base = 100; base <= 200; base += 100) {
    for (int i = 0; i <= 4; i++) {
      struct flock fl = {
        .l_type = type, .l_whence = SEEK_SET,
        .l_start = base + i, .l_len = 1,
      };
      if (fcntl (observer, F_OFD_GETLK, &fl) == -1) {
        perror ("F_OFD_GETLK");
        exit (1);
      }
      if (fl.l_type != F_UNLCK)
        mask |= B (base + i);
    }
  }
  return mask;
}

/* Nothing outside the protocol bytes: probe 0..99, 104..199, 204..299 as
 * whole ranges.
 */
static bool
held_outside (int observer)
{
  static const off_t ranges[][2] = { { 0, 100 }, { 104, 96 }, { 204, 96 } };

  for (size_t i = 0; i < sizeof ranges / sizeof ranges[0]; i++) {
    struct flock fl = {
      .l_type = F_WRLCK, .l_whence = SEEK_SET,
      .l_start = ranges[i][0], .l_len = ranges[i][1],
    };
    if (fcntl (observer, F_OFD_GETLK, &fl) == -1) {
      perror ("F_OFD_GETLK");
      exit (1);
    }
    if (fl.l_type != F_UNLCK)
      return true;
  }
  return false;
}

static void
expect_conflict (int fd, bool writable, const char *message)
{
  int r;

  last_error[0] = '\0';
  r = qcow2_lock_image (fd, writable, path);
  CHECK (r == -EAGAIN, "%s lock: got %d, expected -EAGAIN",
         writable ? "rw" : "ro", r);
  CHECK (strstr (last_error, message) != NULL,
         "message lacks '%s'", message);
  CHECK (strstr (last_error, path) != NULL, "message lacks the file name");
  CHECK (strstr (last_error, "another process") != NULL,
         "message lacks the hint");
}

static void
run (const char *cmd)
{
  int status = system (cmd);
  CHECK (status == 0, "'%s' exited with %d", cmd, status);
}

/* An upgrade to writing that fails after taking the write locks (here
 * refcount loading refuses a misaligned refcount block offset) goes back
 * to a reader's locks, so QEMU's readers may open the image again.
 */
static void
failed_upgrade_keeps_reader_locks (int obs)
{
  struct qcow2_open_options opts;
  struct qcow2_image *img;
  unsigned char be[8];
  uint64_t reftable = 0;
  char cmd[256];
  int fd, r;

  snprintf (cmd, sizeof cmd, "qemu-img create -q -f qcow2 %s 1M", path);
  run (cmd);
  fd = open_rw ();
  CHECK (pread (fd, be, 8, 48) == 8, "reading the header");
  for (int i = 0; i < 8; i++)
    reftable = reftable << 8 | be[i];
  memset (be, 0, 8);
  be[7] = 0x10;                 /* entry 0: 16, not cluster aligned */
  CHECK (pwrite (fd, be, 8, (off_t) reftable) == 8, "patching the table");
  close (fd);

  qcow2_open_options_init (&opts);
  opts.filename = path;
  opts.lock = true;
  r = qcow2_open (&opts, &img);
  CHECK (r == 0, "read-only open: %d", r);
  if (r < 0)
    return;
  CHECK (held_bytes (obs, F_WRLCK) == RO_BYTES, "reader's bytes: %#x",
         held_bytes (obs, F_WRLCK));
  last_error[0] = '\0';
  r = qcow2_enable_write (img);
  CHECK (r == -EINVAL, "enable_write: %d, expected -EINVAL", r);
  CHECK (strstr (last_error, "Refblock offset") != NULL,
         "enable_write's message: %s", last_error);
  CHECK (held_bytes (obs, F_WRLCK) == RO_BYTES,
         "bytes after the failed upgrade: %#x", held_bytes (obs, F_WRLCK));
  snprintf (cmd, sizeof cmd, "qemu-img info %s >/dev/null", path);
  run (cmd);
  qcow2_close (img);
}

static int
unit_test (void)
{
  int tmp, a, b, c, d, obs, r;

  tmp = mkstemp (path);
  if (tmp == -1) {
    perror ("mkstemp");
    return 1;
  }
  close (tmp);
  qcow2_set_error_handler (capture_error, NULL);

  obs = open_rw ();
  {
    struct flock fl = { .l_type = F_WRLCK, .l_whence = SEEK_SET,
                        .l_start = 0, .l_len = 1 };
    if (fcntl (obs, F_OFD_GETLK, &fl) == -1 && errno == EINVAL) {
      fprintf (stderr, "SKIP: no OFD locks on this kernel\n");
      unlink (path);
      return 77;
    }
  }

  /* A read-write opener takes exactly QEMU 7.2's bytes, as read locks. */
  a = open_rw ();
  r = qcow2_lock_image (a, true, path);
  CHECK (r == 0, "rw lock on A: %d", r);
  CHECK (held_bytes (obs, F_WRLCK) == RW_BYTES, "rw bytes: %#x",
         held_bytes (obs, F_WRLCK));
  CHECK (held_bytes (obs, F_RDLCK) == 0, "a write lock was taken");
  CHECK (!held_outside (obs), "a byte outside the protocol was locked");

  /* Locks of one description never conflict with each other. */
  r = qcow2_lock_image (a, true, path);
  CHECK (r == 0, "rw lock on A again: %d", r);
  CHECK (held_bytes (obs, F_WRLCK) == RW_BYTES, "rw bytes after relock");

  /* A second opener, read-write or read-only, is refused, with the
   * messages QEMU gives in the same situations: the writer finds 201
   * ("nobody else may write"), the reader finds 101 ("someone writes").
   */
  b = open_rw ();
  expect_conflict (b, true, "Failed to get \"write\" lock");
  expect_conflict (b, false, "Failed to get shared \"write\" lock");

  /* Once A is closed, B's refused attempts have left nothing behind. */
  close (a);
  CHECK (held_bytes (obs, F_WRLCK) == 0, "bytes left after refusals: %#x",
         held_bytes (obs, F_WRLCK));

  /* Read-only openers coexist with each other but keep writers out. */
  r = qcow2_lock_image (b, false, path);
  CHECK (r == 0, "ro lock on B after close (A): %d", r);
  CHECK (held_bytes (obs, F_WRLCK) == RO_BYTES, "ro bytes: %#x",
         held_bytes (obs, F_WRLCK));
  c = open_rw ();
  r = qcow2_lock_image (c, false, path);
  CHECK (r == 0, "second ro lock: %d", r);
  d = open_rw ();
  expect_conflict (d, true, "Failed to get \"write\" lock");

  /* Release drops everything; then a writer gets in. */
  qcow2_lock_release (b);
  qcow2_lock_release (c);
  CHECK (held_bytes (obs, F_WRLCK) == 0, "bytes left after release: %#x",
         held_bytes (obs, F_WRLCK));
  r = qcow2_lock_image (d, true, path);
  CHECK (r == 0, "rw lock on D after release: %d", r);

  /* Relocking in the other mode leaves exactly that mode's bytes. */
  r = qcow2_lock_image (d, false, path);
  CHECK (r == 0, "downgrade of D: %d", r);
  CHECK (held_bytes (obs, F_WRLCK) == RO_BYTES, "bytes after downgrade: %#x",
         held_bytes (obs, F_WRLCK));
  r = qcow2_lock_image (d, true, path);
  CHECK (r == 0, "upgrade of D: %d", r);
  CHECK (held_bytes (obs, F_WRLCK) == RW_BYTES, "bytes after upgrade: %#x",
         held_bytes (obs, F_WRLCK));

  /* Closing the descriptor releases the locks. */
  close (d);
  CHECK (held_bytes (obs, F_WRLCK) == 0, "bytes left after close: %#x",
         held_bytes (obs, F_WRLCK));

  /* A failing fcntl is reported, not mistaken for a conflict. */
  last_error[0] = '\0';
  r = qcow2_lock_image (-1, true, path);
  CHECK (r == -EBADF, "bad fd: %d", r);
  CHECK (last_error[0] != '\0', "bad fd was not reported");

  close (b);
  close (c);
  failed_upgrade_keeps_reader_locks (obs);
  close (obs);
  unlink (path);
  if (failures) {
    fprintf (stderr, "%d failure(s)\n", failures);
    return 1;
  }
  printf ("test_lock: all passed\n");
  return 0;
}

static int
hold (const char *file, const char *mode)
{
  bool writable;
  char buf[256];
  ssize_t n;
  int fd, r;

  if (strcmp (mode, "rw") == 0)
    writable = true;
  else if (strcmp (mode, "ro") == 0)
    writable = false;
  else {
    fprintf (stderr, "test_lock hold: mode must be rw or ro\n");
    return 2;
  }
  fd = open (file, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
  if (fd == -1) {
    perror (file);
    return 1;
  }
  r = qcow2_lock_image (fd, writable, file);
  if (r < 0) {
    fprintf (stderr, "lock failed: %d (%s)\n", r, strerror (-r));
    return 1;
  }
  printf ("locked\n");
  fflush (stdout);
  while ((n = read (0, buf, sizeof buf)) > 0 || (n == -1 && errno == EINTR))
    ;
  close (fd);
  return 0;
}

int
main (int argc, char *argv[])
{
  if (argc == 4 && strcmp (argv[1], "hold") == 0)
    return hold (argv[2], argv[3]);
  if (argc != 1) {
    fprintf (stderr, "usage: test_lock\n"
             "       test_lock hold FILE rw|ro\n");
    return 2;
  }
  return unit_test ();
}
