/* nbdkit-qcow2
 * Copyright (C) 2026 the nbdkit-qcow2 authors
 * SPDX-License-Identifier: BSD-3-Clause (see LICENSE)
 */

/* Debug flags: what `nbdkit -D qcow2.FLAG=1` turns on.
 *
 * nbdkit sets a flag by looking up the int `qcow2_debug_FLAG` in the
 * plugin's or filter's .so (dlsym) before loading it, so each flag is an
 * exported variable here, and plugin.syms / filter.syms export
 * qcow2_debug_*.  The engine knows nothing of nbdkit: messages go to the
 * handler set with qcow2_set_debug_handler (nbdkit_debug in the plugin and
 * filter, which prints only with -v).
 *
 * Off, a QCOW2_DEBUG costs one load of an int and a branch; the arguments
 * are not evaluated.  Flags are set once before any thread starts and
 * only read afterwards.
 */
#ifndef QCOW2_DEBUG_H
#define QCOW2_DEBUG_H

#include <inttypes.h> /* PRIu64 and friends, for the callers' formats */

#define QCOW2_DEBUG_FLAG extern __attribute__ ((visibility ("default"))) int

QCOW2_DEBUG_FLAG qcow2_debug_alloc;    /* each cluster allocation */
QCOW2_DEBUG_FLAG qcow2_debug_metadata; /* each metadata write-back, sync */
QCOW2_DEBUG_FLAG qcow2_debug_cache;    /* each metadata cache eviction */

/* Send one formatted line to the debug handler (error.c). */
void qcow2_log_debug (const char *fmt, ...)
  __attribute__ ((format (printf, 1, 2)));

/* Log "FLAG: message" when qcow2_debug_FLAG is set. */
#define QCOW2_DEBUG(flag, fmt, ...)                                     \
  do {                                                                  \
    if (qcow2_debug_##flag)                                             \
      qcow2_log_debug (#flag ": " fmt, ##__VA_ARGS__);                  \
  } while (0)

#endif /* QCOW2_DEBUG_H */
