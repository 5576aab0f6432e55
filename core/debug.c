/* nbdkit-qcow2
 * Copyright (C) 2026 the nbdkit-qcow2 authors
 * SPDX-License-Identifier: BSD-3-Clause (see LICENSE)
 */

/* Debug flags and the debug message channel (see debug.h); the error
 * channel's twin in error.c, with the same handler type.
 */
#include <stdarg.h>
#include <stdio.h>

#include "debug.h"
#include "qcow2.h"

/* Set by nbdkit -D qcow2.FLAG=N when it loads the .so, before any
 * connection. */
int qcow2_debug_alloc;
int qcow2_debug_metadata;
int qcow2_debug_cache;

static void
default_handler (void *opaque, const char *message)
{
  (void) opaque;
  fprintf (stderr, "qcow2: debug: %s\n", message);
}

static qcow2_error_fn handler = default_handler;
static void *handler_opaque;

void
qcow2_set_debug_handler (qcow2_error_fn fn, void *opaque)
{
  handler = fn ? fn : default_handler;
  handler_opaque = opaque;
}

void
qcow2_log_debug (const char *fmt, ...)
{
  char buf[1024];
  va_list ap;

  va_start (ap, fmt);
  vsnprintf (buf, sizeof buf, fmt, ap);
  va_end (ap);
  handler (handler_opaque, buf);
}
