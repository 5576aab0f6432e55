/* Metadata overlap checks: never write over metadata by mistake.
 *
 * With correct refcounts the allocator never hands out a metadata
 * cluster, and no L2 entry points into metadata.  A corrupt or hostile
 * image breaks both assumptions (QEMU iotest 060: an L2 entry pointing at
 * a refcount block, an L1 entry pointing at the L1 itself).  So before
 * every write to the image file we check the target against the clusters
 * that hold metadata, as QEMU's default "cached" overlap check does: the
 * header, the active L1 table, the refcount table and blocks, the active
 * L2 tables, the snapshot table and the snapshots' L1 tables, the LUKS
 * header, and the persistent bitmaps' directory, tables and data (entered
 * by bitmap_store.c; QEMU checks only the directory).  On a hit the image is marked corrupt (incompatible bit 1), the
 * write fails with EIO, and the image is BROKEN (writer.c): every later
 * write fails too.
 *
 * The set maps a cluster index to the kinds of metadata it holds (a bit
 * mask: one cluster holding two kinds is itself corruption).  It changes
 * under the writer lock and is read by in-place writers under `lock`
 * taken shared.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "io.h"
#include "util.h"

struct qcow2_overlap {
  pthread_rwlock_t lock;
  uint64_t *keys;      /* cluster index + 1; 0 = empty slot */
  uint16_t *kinds;
  size_t capacity, count;   /* capacity is a power of two */
};

static const char *const kind_names[] = {
  [0] = "header", [1] = "active L1 table", [2] = "refcount table",
  [3] = "refcount block", [4] = "active L2 table", [5] = "snapshot table",
  [6] = "snapshot L1 table", [7] = "LUKS header",
  [8] = "persistent bitmap",
};

static size_t
slot_of (const struct qcow2_overlap *o, uint64_t key)
{
  uint64_t h = key * 0x9e3779b97f4a7c15ull;
  return (size_t) (h ^ (h >> 31)) & (o->capacity - 1);
}

static int
grow (struct qcow2_overlap *o)
{
  size_t cap = o->capacity ? o->capacity * 2 : 1024;
  uint64_t *keys = calloc (cap, sizeof *keys);
  uint16_t *kinds = calloc (cap, sizeof *kinds);
  struct qcow2_overlap old = *o;

  if (!keys || !kinds) {
    free (keys);
    free (kinds);
    return -ENOMEM;
  }
  o->keys = keys;
  o->kinds = kinds;
  o->capacity = cap;
  o->count = 0;
  for (size_t i = 0; i < old.capacity; i++)
    if (old.keys[i]) {
      size_t s = slot_of (o, old.keys[i]);
      while (o->keys[s])
        s = (s + 1) & (o->capacity - 1);
      o->keys[s] = old.keys[i];
      o->kinds[s] = old.kinds[i];
      o->count++;
    }
  free (old.keys);
  free (old.kinds);
  return 0;
}

static uint16_t
lookup (const struct qcow2_overlap *o, uint64_t cluster)
{
  if (o->capacity == 0)
    return 0;
  for (size_t s = slot_of (o, cluster + 1); o->keys[s];
       s = (s + 1) & (o->capacity - 1))
    if (o->keys[s] == cluster + 1)
      return o->kinds[s];
  return 0;
}

/* Under the writer lock. */
int
qcow2_overlap_add (struct qcow2_image *img, uint64_t offset, uint64_t len,
                   enum qcow2_metadata_kind kind)
{
  struct qcow2_overlap *o = img->w->overlap;
  int r = 0;

  qcow2_writer_assert_locked (img);
  if (len == 0)
    return 0;
  pthread_rwlock_wrlock (&o->lock);
  for (uint64_t c = offset >> img->cluster_bits;
       r == 0 && c <= (offset + len - 1) >> img->cluster_bits; c++) {
    size_t s;
    if ((o->count + 1) * 2 > o->capacity && (r = grow (o)) < 0)
      break;
    for (s = slot_of (o, c + 1); o->keys[s] && o->keys[s] != c + 1;
         s = (s + 1) & (o->capacity - 1))
      ;
    if (!o->keys[s]) {
      o->keys[s] = c + 1;
      o->count++;
    }
    o->kinds[s] |= (uint16_t) (1u << kind);
  }
  pthread_rwlock_unlock (&o->lock);
  return r;
}

/* Under the writer lock: the cluster at offset holds no metadata any more.
 * Removal from open addressing: re-insert the rest of the cluster run.
 */
void
qcow2_overlap_remove (struct qcow2_image *img, uint64_t offset)
{
  struct qcow2_overlap *o = img->w->overlap;
  uint64_t key = (offset >> img->cluster_bits) + 1;
  size_t s;

  qcow2_writer_assert_locked (img);
  pthread_rwlock_wrlock (&o->lock);
  if (o->capacity == 0)
    goto out;
  for (s = slot_of (o, key); o->keys[s] && o->keys[s] != key;
       s = (s + 1) & (o->capacity - 1))
    ;
  if (!o->keys[s])
    goto out;
  o->keys[s] = 0;
  o->kinds[s] = 0;
  o->count--;
  for (size_t t = (s + 1) & (o->capacity - 1); o->keys[t];
       t = (t + 1) & (o->capacity - 1)) {
    uint64_t k = o->keys[t];
    uint16_t kinds = o->kinds[t];
    size_t u;
    o->keys[t] = 0;
    o->kinds[t] = 0;
    for (u = slot_of (o, k); o->keys[u]; u = (u + 1) & (o->capacity - 1))
      ;
    o->keys[u] = k;
    o->kinds[u] = kinds;
  }
 out:
  pthread_rwlock_unlock (&o->lock);
}

int
qcow2_signal_corruption (struct qcow2_image *img, const char *fmt, ...)
{
  char msg[512];
  unsigned char field[8];
  va_list ap;

  va_start (ap, fmt);
  vsnprintf (msg, sizeof msg, fmt, ap);
  va_end (ap);

  if (qcow2_writer_break_corrupt (img, msg)) {
    qcow2_error ("%s: Marking image as corrupt: %s; further writes will "
                 "fail", img->filename, msg);
    put_be64 (field, img->h.incompatible_features | QCOW2_INCOMPAT_CORRUPT);
    /* Best effort: writes already fail whether or not it lands. */
    (void) qcow2_meta_write_durable (img, QCOW2_RULE_IN_PLACE, field,
                                     sizeof field,
                                     QCOW2_HDR_INCOMPATIBLE_FEATURES);
  }
  else
    qcow2_error ("%s: %s", img->filename, msg);
  return -EIO;
}

unsigned
qcow2_overlap_kinds (struct qcow2_image *img, uint64_t offset, uint64_t len)
{
  struct qcow2_overlap *o = img->w->overlap;
  unsigned kinds = 0;

  if (len == 0)
    return 0;
  pthread_rwlock_rdlock (&o->lock);
  for (uint64_t c = offset >> img->cluster_bits;
       c <= (offset + len - 1) >> img->cluster_bits; c++)
    kinds |= lookup (o, c);
  pthread_rwlock_unlock (&o->lock);
  return kinds;
}

int
qcow2_overlap_check (struct qcow2_image *img, uint64_t offset, uint64_t len,
                     enum qcow2_metadata_kind own_kind)
{
  struct qcow2_overlap *o = img->w->overlap;
  uint16_t hit = 0;
  uint64_t c;
  unsigned mask = own_kind == QCOW2_META_NONE ? 0 : 1u << own_kind;

  if (len == 0)
    return 0;
  pthread_rwlock_rdlock (&o->lock);
  for (c = offset >> img->cluster_bits;
       c <= (offset + len - 1) >> img->cluster_bits; c++) {
    hit = lookup (o, c) & (uint16_t) ~mask;
    if (hit)
      break;
  }
  pthread_rwlock_unlock (&o->lock);
  if (!hit)
    return 0;
  return qcow2_signal_corruption (img, "Preventing a write at offset %#"
                                  PRIx64 " (%" PRIu64 " bytes) over the %s "
                                  "at %#" PRIx64, offset, len,
                                  kind_names[__builtin_ctz (hit)],
                                  c << img->cluster_bits);
}

/* Under the writer lock, when writing is enabled: every metadata cluster
 * the image has now.
 */
int
qcow2_overlap_init (struct qcow2_image *img)
{
  struct qcow2_writer *w = img->w;
  const uint64_t cs = img->cluster_size;
  int r;

  qcow2_writer_assert_locked (img);
  w->overlap = calloc (1, sizeof *w->overlap);
  if (!w->overlap)
    return -ENOMEM;
  pthread_rwlock_init (&w->overlap->lock, NULL);

  r = qcow2_overlap_add (img, 0, cs, QCOW2_META_HEADER);
  if (r == 0)
    r = qcow2_overlap_add (img, img->h.l1_table_offset,
                           (uint64_t) img->l1_size * 8, QCOW2_META_L1);
  if (r == 0)
    r = qcow2_overlap_add (img, w->reftable_offset, w->reftable_entries * 8,
                           QCOW2_META_REFTABLE);
  for (uint64_t i = 0; r == 0 && i < w->reftable_entries; i++)
    if (w->reftable[i])
      r = qcow2_overlap_add (img, w->reftable[i], cs, QCOW2_META_REFBLOCK);
  for (uint32_t i = 0; r == 0 && i < img->l1_size; i++) {
    uint64_t l2 = img->l1[i] & QCOW2_L1E_OFFSET_MASK;
    if (l2)
      r = qcow2_overlap_add (img, l2, cs, QCOW2_META_L2);
  }
  if (r == 0 && img->nb_snapshots)
    r = qcow2_overlap_add (img, img->h.snapshots_offset,
                           img->snapshot_table_bytes, QCOW2_META_SNAPSHOTS);
  /* Snapshot L1 tables are validated only when used, so here they may be
   * anything: one of l1_size 0xffffffff would be 32 GiB of clusters to
   * enter one by one (a hang, then out of memory), and an offset near
   * 2^64 wraps the cluster loop.  Only tables a snapshot could really use
   * (the checks of check.c) are metadata worth protecting.
   */
  for (uint32_t i = 0; r == 0 && i < img->nb_snapshots; i++) {
    const struct qcow2_snapshot *sn = &img->snapshots[i];
    uint64_t bytes = (uint64_t) sn->l1_size * 8;
    if (is_aligned (sn->l1_table_offset, cs) &&
        bytes <= QCOW2_MAX_L1_BYTES &&
        !range_exceeds (sn->l1_table_offset, bytes, qcow2_file_size (img)))
      r = qcow2_overlap_add (img, sn->l1_table_offset, bytes,
                             QCOW2_META_SNAPSHOT_L1);
  }
  if (r == 0 && img->h.has_crypto_ext)
    r = qcow2_overlap_add (img, img->h.crypto_offset, img->h.crypto_length,
                           QCOW2_META_CRYPTO);
  return r;
}

void
qcow2_overlap_free (struct qcow2_overlap *o)
{
  if (!o)
    return;
  pthread_rwlock_destroy (&o->lock);
  free (o->keys);
  free (o->kinds);
  free (o);
}
