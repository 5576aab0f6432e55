/* Zero and trim.
 *
 * Whole clusters (and whole subclusters with extended L2) change only
 * their L2 entries: v3 images use the zero flag, keeping an owned host
 * cluster when the client forbids trimming, releasing it otherwise; v2
 * images, which have no zero flag, deallocate when nothing shows through
 * from below and write zeros when a backing file would.  Partial clusters
 * are written with zeros (zero) or left alone (trim is advisory).
 *
 * Trim never lets old backing data reappear: over a backing file a
 * released cluster becomes a zero cluster.
 *
 * Ranges that already read as zeros are skipped without touching
 * metadata, so zeroing a large empty area allocates no L2 table.
 *
 * With a raw external data file (data_file_raw) the data file must stay a
 * valid raw image by itself, so whatever the L2 entries say, the data
 * file's bytes are zeroed too.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "io.h"
#include "rangelock.h"
#include "util.h"

enum op { OP_ZERO, OP_TRIM };

struct request {
  enum op op;
  bool may_trim;       /* zero: the host cluster may be released */
  bool fast_only;      /* zero: refuse what would need writing data */
};

/* Something other than zeros could show through at guest offset `off`
 * where this image has nothing allocated.
 */
static bool
below_shows (const struct qcow2_image *img, uint64_t off)
{
  return img->backing_kind != BACKING_NONE && off < img->backing_size;
}

/* Does [offset, offset + len) already read as zeros without writing?
 * Conservative: false when unsure.
 */
static int
reads_as_zero (struct qcow2_image *img, uint64_t offset, uint64_t len,
               bool *zero)
{
  *zero = false;
  while (len > 0) {
    struct qcow2_run run;
    int r = qcow2_map (img, img->l1, img->l1_size, offset, len, &run);
    if (r < 0)
      return r;
    if (run.kind == RUN_ZERO_PLAIN || run.kind == RUN_ZERO_ALLOC)
      ;
    else if (run.kind == RUN_UNALLOCATED &&
             !below_shows (img, offset + run.length - 1))
      ;
    else
      return 0;
    offset += run.length;
    len -= run.length;
  }
  *zero = true;
  return 0;
}

/* Write zeros over [offset, offset + len) (inside one cluster, or whole
 * clusters): the slow path.
 */
static int
write_zeros (struct qcow2_image *img, const struct request *rq,
             uint64_t offset, uint64_t len)
{
  bool zero;
  int r = reads_as_zero (img, offset, len, &zero);

  if (r < 0 || zero)
    return r;
  if (rq->fast_only)
    return -ENOTSUP;
  unsigned char *buf = calloc (1, len);
  if (!buf)
    return -ENOMEM;
  r = qcow2_write_locked (img, buf, len, offset);
  free (buf);
  return r;
}

/* Keep a raw data file in step: [offset, offset + len) reads as zeros. */
static int
zero_raw_data (struct qcow2_image *img, uint64_t offset, uint64_t len)
{
  struct qcow2_io *io = img->data_io;
  int r = -ENOTSUP;

  if (!img->external_data ||
      !(img->h.autoclear_features & QCOW2_AUTOCLEAR_DATA_RAW))
    return 0;
  if (io->ops->punch_hole)
    r = io->ops->punch_hole (io, offset, len);
  if (r == -ENOTSUP) {
    unsigned char *zeros = calloc (1, len);
    if (!zeros)
      return -ENOMEM;
    r = qcow2_io_pwrite (io, zeros, len, offset);
    free (zeros);
  }
  if (r < 0)
    qcow2_error ("%s: could not zero the raw data file: %s", img->filename,
                 strerror (-r));
  return r;
}

/* A whole cluster at `guest`. */
static int
whole_cluster (struct qcow2_image *img, const struct request *rq,
               uint64_t guest)
{
  struct qcow2_entry st;
  bool below = below_shows (img, guest);
  uint64_t entry;
  bool keep;
  int r;

  r = qcow2_entry_lookup (img, guest, &st);
  if (r < 0)
    return r;

  if (img->h.version < 3) {
    /* No zero flag: deallocate when that reads as zeros. */
    if (below)
      return rq->op == OP_TRIM ? 0 : write_zeros (img, rq, guest,
                                                  img->cluster_size);
    if (st.entry == 0)
      return 0;
    return qcow2_entry_publish (img, guest, 0, 0, true);
  }

  keep = rq->op == OP_ZERO && !rq->may_trim && st.owned;
  if (img->extended_l2) {
    uint64_t bitmap = below || rq->op == OP_ZERO
                      ? QCOW2_ALL_SUBCLUSTERS << 32 : 0;
    if (!keep && st.entry == 0 && st.bitmap == bitmap)
      return 0;
    return qcow2_entry_publish (img, guest,
                                keep ? st.host | QCOW2_OFLAG_COPIED : 0,
                                bitmap, !keep);
  }
  if (keep)
    entry = st.host | QCOW2_OFLAG_COPIED | QCOW2_OFLAG_ZERO;
  else if (rq->op == OP_TRIM && !below)
    entry = 0;
  else
    entry = QCOW2_OFLAG_ZERO;
  if (entry == st.entry)
    return 0;
  return qcow2_entry_publish (img, guest, entry, 0, !keep);
}

/* Whole subclusters [offset, offset + len) inside one cluster. */
static int
subclusters (struct qcow2_image *img, const struct request *rq,
             uint64_t offset, uint64_t len)
{
  uint64_t guest = align_down (offset, img->cluster_size);
  unsigned first = (unsigned) ((offset - guest) >> img->subcluster_bits);
  unsigned count = (unsigned) (len >> img->subcluster_bits);
  uint64_t touched = ((1ull << count) - 1) << first;
  struct qcow2_entry st;
  int r;

  r = qcow2_entry_lookup (img, guest, &st);
  if (r < 0)
    return r;
  if (st.compressed) {
    /* A compressed cluster has no subcluster bitmap to change. */
    return rq->op == OP_TRIM ? 0 : write_zeros (img, rq, offset, len);
  }
  uint64_t bitmap = (st.bitmap & ~touched) | (touched << 32);
  if (bitmap == st.bitmap)
    return 0;
  /* The host cluster (if any) stays referenced by this entry. */
  return qcow2_entry_publish (img, guest, st.entry, bitmap, false);
}

static int
zero_or_trim (struct qcow2_image *img, const struct request *rq,
              uint64_t len, uint64_t offset, bool fua)
{
  const uint64_t cs = img->cluster_size;
  const uint64_t unit = img->extended_l2 ? img->subcluster_size : cs;
  uint64_t end = offset + len, first, count;
  int r = 0;

  if ((r = qcow2_check_can_write (img)) < 0)
    return r;
  if (range_exceeds (offset, len, img->h.size)) {
    qcow2_error ("%s of %" PRIu64 " bytes at %" PRIu64
                 " is beyond the end of the disk", rq->op == OP_ZERO
                 ? "zero" : "trim", len, offset);
    return -ENOSPC;
  }
  if (len == 0)
    return 0;
  /* Persistent bitmaps count zeroes and trims as writes, as QEMU does. */
  qcow2_bitmaps_mark (img, offset, len);

  qcow2_cluster_span (img, offset, len, &first, &count);
  qcow2_rangelock_lock (img->ranges, first, count, true);

  while (r == 0 && offset < end) {
    uint64_t guest = align_down (offset, cs);
    uint64_t n = min_u64 (end, guest + cs) - offset;

    if (offset == guest && n == cs) {
      /* Skip runs that already read as zeros, e.g. a missing L2 table. */
      struct qcow2_run run;
      r = qcow2_map (img, img->l1, img->l1_size, offset, end - offset, &run);
      if (r < 0)
        break;
      uint64_t whole = align_down (run.length, cs);
      if (whole > 0 &&
          (run.kind == RUN_ZERO_PLAIN ||
           (run.kind == RUN_UNALLOCATED &&
            (rq->op == OP_TRIM ||
             !below_shows (img, offset + whole - 1))))) {
        offset += whole;
        continue;
      }
      r = whole_cluster (img, rq, guest);
      if (r == 0)
        r = zero_raw_data (img, guest, cs);
    }
    else {
      /* Part of a cluster: whole subclusters change the bitmap, the
       * rest needs zeros written.
       */
      uint64_t a = (offset + unit - 1) & ~(unit - 1);
      uint64_t b = align_down (offset + n, unit);
      if (unit == cs || a >= b) {
        if (rq->op == OP_ZERO)
          r = write_zeros (img, rq, offset, n);
      }
      else {
        if (a > offset && rq->op == OP_ZERO)
          r = write_zeros (img, rq, offset, a - offset);
        if (r == 0)
          r = subclusters (img, rq, a, b - a);
        if (r == 0)
          r = zero_raw_data (img, a, b - a);
        if (r == 0 && b < offset + n && rq->op == OP_ZERO)
          r = write_zeros (img, rq, b, offset + n - b);
      }
    }
    offset += n;
  }

  qcow2_rangelock_unlock (img->ranges, first, count);
  if (r == 0 && fua)
    r = qcow2_flush (img);
  return r;
}

int
qcow2_zero (struct qcow2_image *img, uint64_t len, uint64_t offset,
            bool may_trim, bool fast_only, bool fua)
{
  struct request rq = { OP_ZERO, may_trim, fast_only };

  /* Refuse a fast zero that would need data written before changing
   * anything: partial clusters, or a v2 image over a backing file.
   */
  if (fast_only && qcow2_is_writable (img)) {
    uint64_t unit = img->extended_l2 ? img->subcluster_size
                                     : img->cluster_size;
    if (!is_aligned (offset, unit) || !is_aligned (offset + len, unit) ||
        (img->h.version < 3 && img->backing_kind != BACKING_NONE))
      return -ENOTSUP;
  }
  return zero_or_trim (img, &rq, len, offset, fua);
}

int
qcow2_trim (struct qcow2_image *img, uint64_t len, uint64_t offset, bool fua)
{
  struct request rq = { OP_TRIM, true, false };
  return zero_or_trim (img, &rq, len, offset, fua);
}
