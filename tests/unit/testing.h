/* nbdkit-qcow2
 * Copyright (C) 2026 the nbdkit-qcow2 authors
 * SPDX-License-Identifier: BSD-3-Clause (see LICENSE)
 */

/* What every unit test program shares: CHECK counts a failure and prints
 * it with the core's last error message, which capture_error (installed
 * with qcow2_set_error_handler) keeps.  Included once per program; the
 * program exits with failures != 0.
 */
#ifndef QCOW2_TESTING_H
#define QCOW2_TESTING_H

#include <stdio.h>

static int failures;
static char last_error[1024];

#define CHECK(cond, ...)                                                \
  do {                                                                  \
    if (!(cond)) {                                                      \
      failures++;                                                       \
      fprintf (stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);  \
      fprintf (stderr, __VA_ARGS__);                                    \
      fprintf (stderr, " (last error: %s)\n", last_error);              \
    }                                                                   \
  } while (0)

static void __attribute__ ((unused))
capture_error (void *opaque, const char *message)
{
  (void) opaque;
  snprintf (last_error, sizeof last_error, "%s", message);
}

#endif /* QCOW2_TESTING_H */
