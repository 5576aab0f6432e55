/* nbdkit-qcow2
 * Copyright (C) 2026 the nbdkit-qcow2 authors
 * SPDX-License-Identifier: BSD-3-Clause (see LICENSE)
 */

/* What the fuzz targets share: a silent error handler, and the filter
 * that skips inputs whose LUKS headers would make one run take minutes.
 */
#ifndef QCOW2_FUZZ_COMMON_H
#define QCOW2_FUZZ_COMMON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* PBKDF2 cost is under the image's control (QEMU and LUKS put no upper
 * bound on it); a real header may ask for millions of iterations, which
 * would make one input take minutes.  Such inputs teach the fuzzer
 * nothing about parsing, so they are skipped.
 */
#define MAX_FUZZ_ITERATIONS 1000

static void
discard_error (void *opaque, const char *message)
{
  (void) opaque;
  (void) message;
}

static uint32_t __attribute__ ((unused))
fuzz_be32 (const uint8_t *p)
{
  return (uint32_t) p[0] << 24 | (uint32_t) p[1] << 16 |
         (uint32_t) p[2] << 8 | p[3];
}

/* True if any LUKS header anywhere in the input asks for more PBKDF2
 * iterations than MAX_FUZZ_ITERATIONS.  Looking at every occurrence of
 * the magic, rather than parsing the qcow2 header to find the one the
 * engine will use, keeps this check trivially conservative.
 */
static bool __attribute__ ((unused))
luks_too_slow (const uint8_t *data, size_t size)
{
  static const uint8_t magic[6] = { 'L', 'U', 'K', 'S', 0xba, 0xbe };
  const size_t phdr = 208 + 8 * 48;

  for (const uint8_t *p = data;
       (p = memmem (p, size - (size_t) (p - data), magic, sizeof magic));
       p++) {
    if (size - (size_t) (p - data) < phdr)
      break;
    if (fuzz_be32 (p + 164) > MAX_FUZZ_ITERATIONS)  /* mk_digest_iter */
      return true;
    for (int i = 0; i < 8; i++)                     /* key slot iterations */
      if (fuzz_be32 (p + 208 + i * 48 + 4) > MAX_FUZZ_ITERATIONS)
        return true;
  }
  return false;
}

#endif /* QCOW2_FUZZ_COMMON_H */
