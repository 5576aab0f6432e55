/* Block status (NBD base:allocation) from the L1/L2 mapping.
 *
 * Invariant the clients rely on: data is never reported as a hole or as
 * zeros.  Unallocated ranges report whatever lies below (the backing
 * chain's own status, data for a raw backing file, a hole past the end of
 * the backing file or with none).  Preallocated zero clusters are zero but
 * not holes, as QEMU reports them.
 */
#include <errno.h>

#include "internal.h"
#include "util.h"

struct below_state {
  qcow2_extent_fn fn;
  void *opaque;
  uint64_t end;           /* end of what has been reported so far */
  bool stopped;
};

static int
below_fn (void *opaque, uint64_t offset, uint64_t length, uint32_t flags)
{
  struct below_state *s = opaque;

  if (s->fn (s->opaque, offset, length, flags) < 0) {
    s->stopped = true;
    return -1;
  }
  s->end = offset + length;
  return 0;
}

/* Report [offset, offset + len) of what lies below img.  Sets *covered to
 * the end actually reported (a prefix is allowed, as for the top level).
 */
static int
extents_below (struct qcow2_image *img, uint64_t offset, uint64_t len,
               bool one, qcow2_extent_fn fn, void *opaque, uint64_t *covered)
{
  uint64_t n = offset < img->backing_size
               ? min_u64 (len, img->backing_size - offset) : 0;

  *covered = offset;
  if (n > 0) {
    if (img->backing_kind == BACKING_QCOW2) {
      struct below_state s = { fn, opaque, offset, false };
      int r = qcow2_extents (img->backing, offset, n, one, below_fn, &s);
      *covered = s.end;
      if (r < 0 || s.stopped || s.end < offset + n)
        return r;
    }
    else {
      if (fn (opaque, offset, n, 0) < 0)
        return 0;
      *covered = offset + n;
    }
    if (one || n == len)
      return 0;
  }
  if (fn (opaque, offset + n, len - n, QCOW2_EXTENT_HOLE | QCOW2_EXTENT_ZERO)
      < 0)
    return 0;
  *covered = offset + len;
  return 0;
}

int
qcow2_extents_l1 (struct qcow2_image *img, const uint64_t *l1,
                  uint32_t l1_size, uint64_t offset, uint64_t len, bool one,
                  qcow2_extent_fn fn, void *opaque)
{
  while (len > 0) {
    struct qcow2_run run;
    uint32_t flags = 0;
    int r = qcow2_map (img, l1, l1_size, offset, len, &run);
    if (r < 0)
      return r;

    switch (run.kind) {
    case RUN_UNALLOCATED: {
      uint64_t covered;
      r = extents_below (img, offset, run.length, one, fn, opaque, &covered);
      if (r < 0 || covered < offset + run.length)
        return r;
      goto next;
    }
    case RUN_ZERO_PLAIN:
      flags = QCOW2_EXTENT_HOLE | QCOW2_EXTENT_ZERO;
      break;
    case RUN_ZERO_ALLOC:
      flags = QCOW2_EXTENT_ZERO;
      break;
    case RUN_DATA:
    case RUN_COMPRESSED:
      flags = 0;
      break;
    }
    if (fn (opaque, offset, run.length, flags) < 0)
      return 0;
  next:
    if (one)
      return 0;
    offset += run.length;
    len -= run.length;
  }
  return 0;
}

int
qcow2_extents (struct qcow2_image *img, uint64_t offset, uint64_t len,
               bool one, qcow2_extent_fn fn, void *opaque)
{
  if (range_exceeds (offset, len, img->h.size))
    return -EINVAL;
  return qcow2_extents_l1 (img, img->l1, img->l1_size, offset, len, one, fn,
                           opaque);
}
