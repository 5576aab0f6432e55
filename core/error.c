/* Messages: the engine formats one line and hands it to the embedder.
 * Two channels of the same shape: errors (nbdkit_error in the plugin,
 * stderr elsewhere) and the -D qcow2.FLAG debug messages of debug.h
 * (nbdkit_debug in the plugin, stderr elsewhere).
 */
#include <stdarg.h>
#include <stdio.h>

#include "debug.h"
#include "qcow2.h"
#include "util.h"

struct channel {
  qcow2_error_fn fn;          /* NULL: stderr with the prefix */
  void *opaque;
  const char *prefix;
};

static struct channel errors = { .prefix = "qcow2: " };
static struct channel debug = { .prefix = "qcow2: debug: " };

static void
emit (const struct channel *ch, const char *fmt, va_list ap)
{
  char buf[1024];

  vsnprintf (buf, sizeof buf, fmt, ap);
  if (ch->fn)
    ch->fn (ch->opaque, buf);
  else
    fprintf (stderr, "%s%s\n", ch->prefix, buf);
}

void
qcow2_set_error_handler (qcow2_error_fn fn, void *opaque)
{
  errors.fn = fn;
  errors.opaque = opaque;
}

void
qcow2_set_debug_handler (qcow2_error_fn fn, void *opaque)
{
  debug.fn = fn;
  debug.opaque = opaque;
}

void
qcow2_error (const char *fmt, ...)
{
  va_list ap;

  va_start (ap, fmt);
  emit (&errors, fmt, ap);
  va_end (ap);
}

void
qcow2_log_debug (const char *fmt, ...)
{
  va_list ap;

  va_start (ap, fmt);
  emit (&debug, fmt, ap);
  va_end (ap);
}
