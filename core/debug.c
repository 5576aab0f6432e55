/* nbdkit-qcow2
 * Copyright (C) 2026 the nbdkit-qcow2 authors
 * SPDX-License-Identifier: BSD-3-Clause (see LICENSE)
 */

/* The debug flags of debug.h.  Their messages go through the debug
 * channel in error.c.
 */
#include "debug.h"

/* Set by nbdkit -D qcow2.FLAG=N when it loads the .so, before any
 * connection; zero (off) otherwise.
 */
int qcow2_debug_alloc;
int qcow2_debug_metadata;
int qcow2_debug_cache;
