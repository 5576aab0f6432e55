/* nbdkit-qcow2
 * Copyright (C) 2026 the nbdkit-qcow2 authors
 * SPDX-License-Identifier: BSD-3-Clause (see LICENSE)
 */

/* A failing byte backend for fault-injection tests: it wraps another
 * qcow2_io (core/backends/io.h) and fails the k-th pwrite or the k-th
 * flush with -EIO.  Counting starts at 1 when the wrapper is made; with k == 0
 * nothing fails and the wrapper only counts, which is how a test learns
 * how many points a workload has.
 *
 * Modes, from the kindest failure to the hardest on the engine:
 * - FAULT_STICKY: from the k-th call on, every pwrite, flush, punch_hole,
 *   preallocate and discard fails (a disk that died, or went read-only);
 *   reads keep working;
 * - FAULT_TORN: as sticky, but the k-th pwrite first writes the first
 *   whole 512-byte sectors of its first half (a power cut in the middle
 *   of a request; sectors themselves stay atomic, as on real disks);
 * - FAULT_ONE_SHOT: only the k-th call fails; everything after it
 *   succeeds again (a transient error of remote storage), so an engine
 *   that carries on after a failed metadata write is seen carrying on.
 */
#ifndef QCOW2_TEST_FAULT_IO_H
#define QCOW2_TEST_FAULT_IO_H

#include <stdbool.h>
#include <stdint.h>

#include "io.h"

enum fault_target { FAULT_WRITE, FAULT_FLUSH };
enum fault_mode { FAULT_ONE_SHOT, FAULT_STICKY, FAULT_TORN };

/* What to fail, and what happened: owned by the test, so that it
 * outlives the io (the image closes its io) and can be read afterwards.
 * Fields after k are updated atomically by the io.
 */
struct fault_plan {
  enum fault_target target;
  enum fault_mode mode;
  uint64_t k;                   /* 0: fail nothing, only count */
  uint64_t writes, flushes;     /* calls seen, failed or not */
  bool fired;                   /* the fault has been injected */
  bool borrow_inner;            /* closing the wrapper leaves inner open
                                 * (to reopen the same bytes) */
};

/* Takes ownership of inner (closing the wrapper closes it, unless
 * plan->borrow_inner); plan must outlive the wrapper.  NULL (inner
 * closed) if out of memory.
 */
struct qcow2_io *fault_io_new (struct qcow2_io *inner,
                               struct fault_plan *plan);

const char *fault_target_name (enum fault_target t);
const char *fault_mode_name (enum fault_mode m);

#endif /* QCOW2_TEST_FAULT_IO_H */
