/* nbdkit-qcow2
 * Copyright (C) 2026 the nbdkit-qcow2 authors
 * SPDX-License-Identifier: BSD-3-Clause (see LICENSE)
 */

/* QEMU-compatible image locking: the byte protocol of block/file-posix.c
 * (raw_apply_lock_bytes, raw_check_lock_bytes) on one file descriptor.
 * See image_lock.h for what the bytes mean and which ones each mode takes.
 *
 * Invariants:
 * - we only ever take F_RDLCK locks and only probe with F_WRLCK tests,
 *   exactly as QEMU does, so our locks and QEMU's compose: two openers
 *   conflict only when one of them finds the other's byte in its probe;
 * - locks are taken before probing.  Two openers racing each other then
 *   both see the other's bytes (each takes before it looks), so at least
 *   one of them fails; probing first would let both succeed;
 * - when qcow2_lock_image fails, fd holds none of our bytes, so a refused
 *   opener never blocks anybody else;
 * - nothing here keeps state: the fd's description (or, with POSIX locks,
 *   the process) holds it all in the kernel, so these functions are safe
 *   from any thread.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>

#include "image_lock.h"
#include "util.h"

/* QEMU's permission bits (include/block/block-common.h, BLK_PERM_*).
 * QEMU <= 6.1 also had bit 4 (graph-mod); nothing checks it any more, so
 * we neither take nor probe bytes 104 and 204.
 */
#define PERM_CONSISTENT_READ (1u << 0)
#define PERM_WRITE (1u << 1)
#define PERM_WRITE_UNCHANGED (1u << 2)
#define PERM_RESIZE (1u << 3)
#define PERM_COUNT 4
#define PERM_ALL ((1u << PERM_COUNT) - 1)

/* RAW_LOCK_PERM_BASE, RAW_LOCK_SHARED_BASE in block/file-posix.c. */
#define LOCK_PERM_BASE 100
#define LOCK_SHARED_BASE 200

/* The permissions QEMU's qcow2 driver asks of its image file
 * (bdrv_default_perms_for_storage in block.c).  The metadata must stay
 * consistent under us, so even a read-only opener shares neither write
 * nor resize; a writer needs write and resize (to allocate clusters).
 * Write-unchanged is never held, only shared, like QEMU.
 */
#define SHARED_PERMS (PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED)
#define RO_PERMS PERM_CONSISTENT_READ
#define RW_PERMS (PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE)

/* bdrv_perm_names() spellings, which appear in QEMU's messages. */
static const char *const perm_names[PERM_COUNT] = {
  "consistent read", "write", "write unchanged", "resize",
};

/* OFD commands, or 0 where the C library does not know them. */
#ifdef F_OFD_SETLK
#define CMD_SETLK F_OFD_SETLK
#define CMD_GETLK F_OFD_GETLK
#else
#define CMD_SETLK 0
#define CMD_GETLK 0
#endif

/* The fd and which flavour of fcntl lock this call uses.  Each call
 * decides afresh, so there is no global state to synchronise; without OFD
 * locks that costs one failed fcntl per call.
 */
struct lock_ctx {
  int fd;
  bool ofd;
};

/* fcntl with the OFD command if we still believe in OFD locks, else the
 * POSIX one.  EINVAL from an OFD command means the kernel predates OFD
 * locks (Linux < 3.15): fall back, as QEMU's qemu_has_ofd_lock does.
 */
static int
lock_fcntl (struct lock_ctx *c, int ofd_cmd, int posix_cmd, struct flock *fl)
{
#ifdef F_OFD_SETLK
  if (c->ofd) {
    fl->l_pid = 0; /* required for OFD commands */
    if (fcntl (c->fd, ofd_cmd, fl) == 0)
      return 0;
    if (errno != EINVAL)
      return -errno;
    c->ofd = false;
  }
#else
  (void) ofd_cmd;
  c->ofd = false;
#endif
  if (fcntl (c->fd, posix_cmd, fl) == -1)
    return -errno;
  return 0;
}

/* Set (F_RDLCK) or drop (F_UNLCK) the lock on [start, start + len). */
static int
set_lock (struct lock_ctx *c, short type, off_t start, off_t len)
{
  struct flock fl = {
    .l_type = type,
    .l_whence = SEEK_SET,
    .l_start = start,
    .l_len = len,
  };
  return lock_fcntl (c, CMD_SETLK, F_SETLK, &fl);
}

/* 1 if another opener holds a lock on byte off that a write lock would
 * conflict with (qemu_lock_fd_test), 0 if not, -errno on failure.  With
 * OFD locks our own description never shows up; with POSIX locks no lock
 * of this process does.
 */
static int
probe (struct lock_ctx *c, off_t off, pid_t *holder)
{
  struct flock fl = {
    .l_type = F_WRLCK,
    .l_whence = SEEK_SET,
    .l_start = off,
    .l_len = 1,
  };
  int r = lock_fcntl (c, CMD_GETLK, F_GETLK, &fl);

  if (r < 0)
    return r;
  *holder = fl.l_pid; /* -1 for an OFD lock: the owner is a description */
  return fl.l_type != F_UNLCK;
}

/* Drop every byte of the protocol, whether we took it or not: F_UNLCK on
 * a byte we do not hold is a no-op, so two ranges cover every case.  Bytes
 * outside the protocol are left alone.
 */
static void
unlock_all (struct lock_ctx *c)
{
  int saved = errno;

  set_lock (c, F_UNLCK, LOCK_PERM_BASE, PERM_COUNT);
  set_lock (c, F_UNLCK, LOCK_SHARED_BASE, PERM_COUNT);
  errno = saved;
}

/* One line in QEMU's words (raw_check_lock_bytes plus the hint of
 * raw_handle_perm_lock), so users recognise it, naming the file.
 */
static void
report_conflict (const char *filename, bool shared, unsigned perm,
                 pid_t holder)
{
  const char *kind = shared ? "shared " : "";

  /* Only POSIX locks name their owner; an OFD lock reports -1. */
  if (holder > 0)
    qcow2_error ("Failed to get %s\"%s\" lock: another process (pid %ld) "
                 "has the image '%s' open", kind, perm_names[perm],
                 (long) holder, filename);
  else
    qcow2_error ("Failed to get %s\"%s\" lock: another process (e.g. qemu) "
                 "has the image '%s' open", kind, perm_names[perm], filename);
}

/* Take a read lock on byte base + i for every bit i of mask.  On failure
 * *byte is the byte that could not be locked.
 */
static int
take_bytes (struct lock_ctx *c, int base, unsigned mask, int *byte)
{
  for (int i = 0; i < PERM_COUNT; i++) {
    if (mask & (1u << i)) {
      int r = set_lock (c, F_RDLCK, base + i, 1);
      if (r < 0) {
        *byte = base + i;
        return r;
      }
    }
  }
  return 0;
}

/* Probe byte base + i for every bit i of mask.  Returns 1 on the first
 * byte another opener holds, with *perm and *holder describing it; 0 if
 * none is held; -errno if a probe failed, with *perm naming its bit.
 */
static int
probe_bytes (struct lock_ctx *c, int base, unsigned mask, int *perm,
             pid_t *holder)
{
  for (int i = 0; i < PERM_COUNT; i++) {
    if (mask & (1u << i)) {
      int r = probe (c, base + i, holder);
      if (r != 0) {
        *perm = i;
        return r;
      }
    }
  }
  return 0;
}

int
qcow2_lock_image (int fd, bool writable, const char *filename)
{
  struct lock_ctx c = { .fd = fd, .ofd = true };
  const unsigned perm = writable ? RW_PERMS : RO_PERMS;
  const unsigned unshared = PERM_ALL & ~SHARED_PERMS;
  pid_t holder = 0;
  int byte = 0, bit = 0;
  bool shared;
  int r;

  /* Take first (raw_apply_lock_bytes): "held" bytes, then "not shared". */
  r = take_bytes (&c, LOCK_PERM_BASE, perm, &byte);
  if (r == 0)
    r = take_bytes (&c, LOCK_SHARED_BASE, unshared, &byte);
  if (r < 0) {
    /* A read lock is refused only while somebody holds a write lock on
     * the byte.  QEMU never takes one, but another tool might: that is a
     * conflict too.  POSIX F_SETLK may say EACCES for it.
     */
    if (r == -EAGAIN || r == -EACCES) {
      qcow2_error ("Failed to lock byte %d: another process has the image "
                   "'%s' locked", byte, filename);
      r = -EAGAIN;
    }
    else
      qcow2_error ("Failed to lock byte %d of '%s': %s", byte, filename,
                   strerror (-r));
    unlock_all (&c);
    return r;
  }

  /* Then probe (raw_check_lock_bytes), in QEMU's order so that the same
   * conflict produces the same message: first whether anybody refuses to
   * share what we want, then whether anybody holds what we refuse.
   */
  shared = false;
  r = probe_bytes (&c, LOCK_SHARED_BASE, perm, &bit, &holder);
  if (r == 0) {
    shared = true;
    r = probe_bytes (&c, LOCK_PERM_BASE, unshared, &bit, &holder);
  }
  if (r != 0) {
    if (r > 0) {
      report_conflict (filename, shared, (unsigned) bit, holder);
      r = -EAGAIN;
    }
    else
      qcow2_error ("Failed to test lock byte %d of '%s': %s",
                   (shared ? LOCK_PERM_BASE : LOCK_SHARED_BASE) + bit,
                   filename, strerror (-r));
    unlock_all (&c);
    return r;
  }

  /* Drop the bytes this mode does not take, left from an earlier call in
   * the other mode (QEMU's commit step).  Unlocking cannot conflict, and
   * a failure would only leave us stricter than needed.
   */
  for (int i = 0; i < PERM_COUNT; i++) {
    if (!(perm & (1u << i)))
      set_lock (&c, F_UNLCK, LOCK_PERM_BASE + i, 1);
    if (!(unshared & (1u << i)))
      set_lock (&c, F_UNLCK, LOCK_SHARED_BASE + i, 1);
  }
  return 0;
}

void
qcow2_lock_release (int fd)
{
  struct lock_ctx c = { .fd = fd, .ofd = true };

  unlock_all (&c);
}
