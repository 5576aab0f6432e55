/* nbdkit-qcow2
 * Copyright (C) 2026 the nbdkit-qcow2 authors
 * SPDX-License-Identifier: BSD-3-Clause (see LICENSE)
 */

/* A workload run over a failing backend (fault_io.h), and the model of
 * what must read back afterwards.
 *
 * fault_run creates a fresh image in a memory file (memfd), opens it
 * read-write through the file backend wrapped in a fault_io, runs the
 * operations through the public API (qcow2.h) ignoring their errors,
 * closes the image, reopens the bytes read-only through the plain file
 * backend and compares them with the model:
 *
 * - every 512-byte sector may read only a value the model allows: after
 *   a successful qcow2_flush (or a successful FUA write of the sector),
 *   exactly the last acknowledged write and whatever later writes failed;
 *   before it, also any earlier value since the last successful flush.
 *   Trimmed sectors may read anything until written again.
 * - the disk size, and each snapshot's existence and contents, follow
 *   the same rule (a snapshot holds what the disk held when it was taken;
 *   a snapshot created or deleted before a successful flush must be there,
 *   or gone);
 * - the engine's own check (qcow2_check) finds no corruption.
 *
 * FAULT_TRACE=1 in the environment prints each operation and its result.
 * Everything in the workload is deterministic, so the k-th write of a
 * run with a fault is the k-th write of the run without one.
 */
#ifndef QCOW2_TEST_WORKLOAD_H
#define QCOW2_TEST_WORKLOAD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "qcow2.h"
#include "fault_io.h"

enum wop_kind {
  WOP_WRITE, WOP_WRITE_FUA,
  WOP_ZERO,         /* qcow2_zero without may_trim */
  WOP_ZERO_TRIM,    /* qcow2_zero with may_trim */
  WOP_TRIM,
  WOP_FLUSH,
  WOP_RESIZE,       /* grow the disk to `length` bytes */
  WOP_SNAP_CREATE,  /* snapshot "s<slot>" */
  WOP_SNAP_DELETE,
};

#define WORKLOAD_SLOTS 2

/* Offsets and lengths are multiples of 512; ranges are clipped to the
 * disk size the engine has when the operation runs.
 */
struct wop {
  enum wop_kind kind;
  uint64_t offset, length;
  unsigned slot;
};

struct workload {
  uint32_t cluster_size;
  unsigned refcount_bits;
  uint64_t size;                /* initial disk size */
  const struct wop *ops;
  size_t nr_ops;
};

struct fault_outcome {
  bool fired;                   /* = plan->fired */
  /* Where the fault fired: the index of the operation, -1 while opening
   * the image, nr_ops while closing it.
   */
  long fired_in;
  /* An operation failed after the fault had been injected: with a
   * one-shot fault the backend worked again, so the engine refused.
   */
  bool refused_after;
  unsigned failed_ops;
  int reopen;                   /* 0, or why reopening failed (-errno) */
  int check;                    /* qcow2_check's return */
  struct qcow2_check_result result;
  /* Model violations: sectors of the disk or of a snapshot reading a
   * value the model does not allow, a wrong disk size, a snapshot lost
   * or back from the dead.  One line describes the first.
   */
  uint64_t lost;
  char first_lost[256];
  uint64_t unverified;          /* sectors the model lost track of */
};

/* The memory file holding the image stays open in *fd_out (for
 * qemu-img; the caller closes it), or is closed if fd_out is NULL.
 * Returns 0, or -errno if the test itself could not run (creating the
 * image or the memory file failed).
 */
int fault_run (const struct workload *wl, struct fault_plan *plan,
               struct fault_outcome *out, int *fd_out);

/* "write", "flush", "snapshot create"... */
const char *wop_name (enum wop_kind kind);

#endif /* QCOW2_TEST_WORKLOAD_H */
