/* nbdkit-qcow2
 * Copyright (C) 2026 the nbdkit-qcow2 authors
 * SPDX-License-Identifier: BSD-3-Clause (see LICENSE)
 */

/* Image locking that interoperates with QEMU (block/file-posix.c).
 *
 * QEMU advertises what each opener of an image does through one-byte
 * read locks on the image file:
 *   byte 100 + i  "I hold permission i"
 *   byte 200 + i  "I do not let others hold permission i"
 * with i = 0 consistent read, 1 write, 2 write unchanged, 3 resize.  A new
 * opener takes its own locks first and then probes (with a write-lock
 * test) byte 200 + i for every permission it wants and byte 100 + i for
 * every permission it refuses to share; any other holder is a conflict.
 * Only read locks are ever taken, so openers never block each other at
 * the fcntl level: conflicts exist only because everybody probes.
 *
 * We take exactly the bytes QEMU 7.2 takes for a qcow2 image:
 *   read-write:  100 101 103 201 203   (probe 200 201 203, 101 103)
 *   read-only:   100         201 203   (probe 200,         101 103)
 * so, as between two QEMU processes:
 *   - while we serve an image read-write, no other opener without
 *     -U/force-share (qemu-io, qemu-img, qemu-nbd, a second nbdkit) can
 *     open it at all, not even read-only;
 *   - while we serve it read-only, others may read it but not write it;
 *   - we refuse an image that another process holds for writing, and a
 *     read-write open of an image that another process has open at all
 *     (every qcow2 opener refuses to share write).
 *
 * Locks are open file description (OFD) locks where the kernel has them,
 * so they belong to the fd's description: closing the fd (and every dup
 * of it) releases them, and a second open() of the same file, even in the
 * same process, is a separate opener.  Without OFD locks we fall back to
 * POSIX locks, as QEMU does; those are per process, so then a process
 * never conflicts with itself and closing any fd of the file in the
 * process drops the locks.
 */
#ifndef QCOW2_LOCK_H
#define QCOW2_LOCK_H

#include <stdbool.h>

/* Take QEMU's locks on fd for an opener that reads (and writes and
 * resizes, if writable), then probe for conflicting holders.  fd must be
 * open for reading.
 *
 * Returns 0 when fd holds exactly the bytes for this mode (bytes of the
 * other mode left over from an earlier call on fd are dropped, so an
 * in-place downgrade to read-only works).  On conflict returns -EAGAIN
 * after reporting one line through qcow2_error, worded like QEMU's
 * ("Failed to get \"write\" lock" or "Failed to get shared \"write\"
 * lock") and naming filename.  On any failure fd is left holding none of
 * our locks: callers upgrading in place lose their read-only locks and
 * must lock again.
 */
int qcow2_lock_image (int fd, bool writable, const char *filename);

/* Drop all our locks on fd (before a reopen); closing fd drops them too. */
void qcow2_lock_release (int fd);

#endif /* QCOW2_LOCK_H */
