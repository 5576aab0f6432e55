/* Small helpers shared by the engine: big-endian access, alignment,
 * overflow-checked arithmetic, error reporting.
 */
#ifndef QCOW2_UTIL_H
#define QCOW2_UTIL_H

#include <stdbool.h>
#include <stdint.h>
#include <string.h>

static inline uint16_t
get_be16 (const void *p)
{
  const uint8_t *b = p;
  return (uint16_t) (b[0] << 8 | b[1]);
}

static inline uint32_t
get_be32 (const void *p)
{
  const uint8_t *b = p;
  return (uint32_t) b[0] << 24 | (uint32_t) b[1] << 16 |
         (uint32_t) b[2] << 8 | b[3];
}

static inline uint64_t
get_be64 (const void *p)
{
  return (uint64_t) get_be32 (p) << 32 | get_be32 ((const uint8_t *) p + 4);
}

static inline void
put_be16 (void *p, uint16_t v)
{
  uint8_t *b = p;
  b[0] = (uint8_t) (v >> 8);
  b[1] = (uint8_t) v;
}

static inline void
put_be32 (void *p, uint32_t v)
{
  uint8_t *b = p;
  b[0] = (uint8_t) (v >> 24);
  b[1] = (uint8_t) (v >> 16);
  b[2] = (uint8_t) (v >> 8);
  b[3] = (uint8_t) v;
}

static inline void
put_be64 (void *p, uint64_t v)
{
  put_be32 (p, (uint32_t) (v >> 32));
  put_be32 ((uint8_t *) p + 4, (uint32_t) v);
}

static inline uint64_t
get_le64 (const void *p)
{
  const uint8_t *b = p;
  uint64_t v = 0;
  for (int i = 7; i >= 0; i--)
    v = v << 8 | b[i];
  return v;
}

/* a must be a power of two in all of these. */
static inline bool
is_aligned (uint64_t v, uint64_t a)
{
  return (v & (a - 1)) == 0;
}

static inline uint64_t
align_down (uint64_t v, uint64_t a)
{
  return v & ~(a - 1);
}

static inline uint64_t
min_u64 (uint64_t a, uint64_t b)
{
  return a < b ? a : b;
}

/* Ceiling division without overflow. */
static inline uint64_t
div_round_up (uint64_t n, uint64_t d)
{
  return n / d + (n % d != 0);
}

/* True when [off, off + len) does not fit below limit. */
static inline bool
range_exceeds (uint64_t off, uint64_t len, uint64_t limit)
{
  return off > limit || len > limit - off;
}

/* Report one line through the handler set with qcow2_set_error_handler. */
void qcow2_error (const char *fmt, ...)
  __attribute__ ((format (printf, 1, 2)));

/* Are all len bytes zero?  The first 16 directly, then the rest
 * against its shifted self (one memcmp, as nbdkit's is_zero).
 */
static inline bool
is_zero (const void *buf, size_t len)
{
  const unsigned char *p = buf;

  for (size_t i = 0; i < len && i < 16; i++)
    if (p[i])
      return false;
  return len <= 16 || memcmp (p, p + 16, len - 16) == 0;
}

#endif /* QCOW2_UTIL_H */
