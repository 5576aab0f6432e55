/* Error reporting: the engine formats one line and hands it to the
 * embedder (nbdkit_error in the plugin, stderr elsewhere).
 */
#include <stdarg.h>
#include <stdio.h>

#include "qcow2.h"
#include "util.h"

static void
default_handler (void *opaque, const char *message)
{
  (void) opaque;
  fprintf (stderr, "qcow2: %s\n", message);
}

static qcow2_error_fn handler = default_handler;
static void *handler_opaque;

void
qcow2_set_error_handler (qcow2_error_fn fn, void *opaque)
{
  handler = fn ? fn : default_handler;
  handler_opaque = opaque;
}

void
qcow2_error (const char *fmt, ...)
{
  char buf[1024];
  va_list ap;

  va_start (ap, fmt);
  vsnprintf (buf, sizeof buf, fmt, ap);
  va_end (ap);
  handler (handler_opaque, buf);
}
