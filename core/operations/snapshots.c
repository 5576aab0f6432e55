/* Internal snapshots: create, delete, apply (revert).
 *
 * Refcount rules (QEMU's, which `qemu-img check` counts by): a data or L2
 * cluster's refcount is the number of L1 tables (the active one and each
 * snapshot's) through which it is reached, once per reaching entry; a
 * compressed cluster counts one reference on every host cluster its bytes
 * touch.  COPIED is set in the active L1 and L2 tables exactly where that
 * count is 1.  So taking a snapshot adds one reference to everything the
 * active L1 reaches and clears COPIED, and writers then copy before they
 * change anything shared.
 *
 * Ordering.  Each operation makes every refcount increase durable before
 * the table entry (snapshot table or active L1) that needs it, and writes
 * the entry that stops using clusters durable before their refcounts
 * drop, so a crash leaks at worst.  COPIED flags are cleared before the
 * snapshot that shares their clusters is recorded, and set only after the
 * refcount decrease that makes them true is durable: a crash can leave a
 * flag clear where it could be set (qemu-img check counts the mismatch;
 * writers merely copy once more), never set on a shared cluster.  A crash
 * between the two writes of one such pair leaves a mismatch (QEMU has the
 * same windows), so each operation marks the image dirty on disk while it
 * runs (run_locked): the next read-write open repairs it.
 *
 * These run before the image serves requests (plugin startup), with the
 * image writable, so the in-memory tables change without a reader
 * protocol.  Each takes the writer lock for the caches' sake.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cache.h"
#include "internal.h"
#include "io.h"
#include "l2.h"
#include "util.h"

/* Pending releases: sync when this many. */
#define SYNC_EVERY 4096

/* --- Walking the references of an L1 table ------------------------- */

/* Called with the first cluster index and the count of host clusters one
 * reference touches.  A non-zero return stops the walk: negative for an
 * error, QCOW2_WALK_STOP to stop early (an undo that is complete).
 */
typedef int (*ref_fn) (struct qcow2_image *img, uint64_t first,
                       uint64_t count, void *opaque);

/* A walk (l2.h) calling a ref_fn on every reference. */
struct ref_walk {
  ref_fn fn;
  void *opaque;
};

static int
table_ref (struct qcow2_image *img, uint32_t l1_index, uint64_t l2,
           void *wv)
{
  const struct ref_walk *w = wv;

  (void) l1_index;
  return w->fn (img, l2 >> img->cluster_bits, 1, w->opaque);
}

static int
entry_ref (struct qcow2_image *img, struct qcow2_walk_entry *e, void *wv)
{
  const struct ref_walk *w = wv;
  uint64_t offset, len, first, count;
  int r = qcow2_entry_refs (img, e->entry, &offset, &len);

  if (r < 0 || len == 0)
    return r;
  first = offset >> img->cluster_bits;
  count = ((offset + len - 1) >> img->cluster_bits) - first + 1;
  /* As check.c counts: a reference past the end of the file is
   * corruption, and must not make refcount.c grow its tables out there.
   */
  if (first + count >
      div_round_up (qcow2_file_size (img), img->cluster_size)) {
    qcow2_error ("%s: L2 entry %#" PRIx64 " points past the end of the "
                 "file", img->filename, e->entry);
    return -EIO;
  }
  return w->fn (img, first, count, w->opaque);
}

/* Every reference an L1 table makes: each L2 table, then its entries.
 * fn runs with a slice pinned, so it must not sync (a sync may drop
 * slices from the cache).  Stops at the first non-zero return of fn and
 * returns it.
 */
static int
walk_refs (struct qcow2_image *img, const uint64_t *l1, uint32_t l1_size,
           ref_fn fn, void *opaque)
{
  struct ref_walk w = { fn, opaque };
  const struct qcow2_walk walk = {
    .table = table_ref, .entry = entry_ref, .opaque = &w,
  };

  return qcow2_walk_l1 (img, l1, l1_size, &walk);
}

/* Adding (or taking back) one reference per reference, counting them so
 * that a failed pass can be undone exactly.
 */
struct adjust {
  int delta;
  uint64_t done, limit;   /* limit: stop after this many (undo) */
};

static int
adjust_ref (struct qcow2_image *img, uint64_t first, uint64_t count,
            void *opaque)
{
  struct adjust *a = opaque;
  int r;

  for (uint64_t c = first; c < first + count; c++) {
    if (a->done == a->limit)
      return QCOW2_WALK_STOP;
    r = qcow2_refcount_update (img, c, a->delta);
    if (r < 0)
      return r;
    a->done++;
  }
  /* Early write-back of refcount blocks is always safe here: increases
   * ahead of their users leak at worst, and decreases only ever undo
   * increases of this operation.
   */
  if (qcow2_cache_dirty_count (img->w->refblock_cache) >=
      QCOW2_PASS_WRITEBACK_EVERY &&
      (r = qcow2_cache_writeback (img->w->refblock_cache)) < 0)
    return qcow2_writer_break (img, r, "writing back refcount blocks");
  return 0;
}

/* One more reference to everything l1 reaches, or none (undone) on
 * failure.  Refcount overflow (narrow refcounts) is the usual failure.
 */
static int
reference_all (struct qcow2_image *img, const uint64_t *l1, uint32_t l1_size)
{
  struct adjust up = { 1, 0, UINT64_MAX };
  int r = walk_refs (img, l1, l1_size, adjust_ref, &up);

  if (r < 0) {
    struct adjust down = { -1, 0, up.done };
    int saved = r;
    r = walk_refs (img, l1, l1_size, adjust_ref, &down);
    if (r < 0)
      qcow2_error ("%s: could not undo refcount increases; the image "
                   "leaks clusters until repaired", img->filename);
    return saved;
  }
  return 0;
}

/* Take back one reference from everything l1 reached, once nothing on
 * disk uses l1 any more: through the pending list, so that clusters
 * reaching refcount 0 leave the caches and the overlap set and have their
 * space released (flush.c).
 */
static int
release_ref (struct qcow2_image *img, uint64_t first, uint64_t count,
             void *opaque)
{
  (void) opaque;
  return qcow2_free_later (img, first << img->cluster_bits,
                           count << img->cluster_bits);
}

/* Table by table, syncing between tables (no slice pinned) to bound the
 * pending list.
 */
static int
release_all (struct qcow2_image *img, const uint64_t *l1, uint32_t l1_size)
{
  for (uint32_t i = 0; i < l1_size; i++) {
    int r = walk_refs (img, &l1[i], 1, release_ref, NULL);
    if (r == 0 && img->w->nr_pending >= SYNC_EVERY)
      r = qcow2_sync_metadata (img);
    if (r < 0)
      return r;
  }
  return 0;
}

/* --- COPIED flags of the active tables ------------------------------ */

/* Replace the active L1 table's img->l1_size entries by l1, on disk in
 * place (rule 7: every cluster l1 reaches is already durably counted, as
 * rule 1 asks), then in memory.
 */
static int
write_active_l1 (struct qcow2_image *img, const uint64_t *l1)
{
  uint64_t bytes = (uint64_t) img->l1_size * 8;
  unsigned char *buf;
  int r;

  if (bytes == 0)
    return 0;
  buf = malloc (bytes);
  if (!buf)
    return -ENOMEM;
  for (uint32_t i = 0; i < img->l1_size; i++)
    put_be64 (buf + i * 8, l1[i]);
  r = qcow2_overlap_check (img, img->h.l1_table_offset, bytes,
                           QCOW2_META_L1);
  if (r == 0)
    r = qcow2_meta_write_durable (img, QCOW2_RULE_IN_PLACE, buf, bytes,
                                  img->h.l1_table_offset);
  if (r < 0)
    qcow2_error ("%s: could not write the L1 table: %s", img->filename,
                 strerror (-r));
  else   /* memory follows disk */
    for (uint32_t i = 0; i < img->l1_size; i++)
      __atomic_store_n (&img->l1[i], l1[i], __ATOMIC_RELEASE);
  free (buf);
  return r;
}

/* Make COPIED say "refcount is 1" on every active entry (copied.c). */
static int
recompute_copied (struct qcow2_image *img)
{
  uint64_t changed;
  return qcow2_copied_pass (img, QCOW2_COPIED_SETTLE, &changed);
}

/* Sync, and once more so that the refcount decreases the first sync
 * applied (flush.c step 3) are durable too.
 */
static int
sync_twice (struct qcow2_image *img)
{
  int r = qcow2_sync_metadata (img);
  return r == 0 ? qcow2_sync_metadata (img) : r;
}

/* After a release: once the lower refcounts are durable, clusters only
 * the active image still uses regain COPIED.
 */
static int
settle_copied (struct qcow2_image *img)
{
  int r = sync_twice (img);

  if (r == 0)
    r = recompute_copied (img);
  if (r == 0)
    r = qcow2_sync_metadata (img);
  return r;
}

/* --- The snapshot table --------------------------------------------- */

/* Write snaps as the new snapshot table (QEMU's qcow2_write_snapshots;
 * durable.c rules 1, 6 and 2): into fresh clusters, synced; then the
 * header's count and offset in one write, synced; only then is the old
 * table released.  On success the image owns snaps; memory changes only
 * then.
 */
static int
replace_table (struct qcow2_image *img, struct qcow2_snapshot *snaps,
               uint32_t n)
{
  unsigned char *buf = NULL, hdr[12];
  uint64_t len, offset = 0;
  uint64_t old_offset = img->h.snapshots_offset;
  uint64_t old_bytes = img->snapshot_table_bytes;
  int r;

  r = qcow2_snapshots_serialize (snaps, n, &buf, &len);
  if (r < 0)
    return r;
  if (len > 0) {
    r = qcow2_alloc_clusters (img, div_round_up (len, img->cluster_size),
                              &offset);
    if (r == 0)
      r = qcow2_meta_refcounts_durable (img,
                                        QCOW2_RULE_ALLOC_REFCOUNT_FIRST);
    if (r == 0)
      r = qcow2_meta_write_durable (img, QCOW2_RULE_HEADER_LAST, buf, len,
                                    offset);
    if (r < 0)
      goto out;
  }
  /* nb_snapshots and snapshots_offset: adjacent, one write. */
  put_be32 (hdr, n);
  put_be64 (hdr + (QCOW2_HDR_SNAPSHOTS_OFFSET - QCOW2_HDR_NB_SNAPSHOTS),
            offset);
  r = qcow2_meta_write_durable (img, QCOW2_RULE_HEADER_LAST, hdr, sizeof hdr,
                                QCOW2_HDR_NB_SNAPSHOTS);
  if (r < 0)
    goto out;   /* the failed write made the image BROKEN (durable.c) */

  qcow2_snapshots_free (img->snapshots, img->nb_snapshots);
  img->snapshots = snaps;
  img->nb_snapshots = n;
  img->h.nb_snapshots = n;
  img->h.snapshots_offset = offset;
  img->snapshot_table_bytes = len;
  /* The header points at the new table: from here on the operation has
   * happened, and a failure costs only protection or space.
   */
  if (len > 0 &&
      qcow2_overlap_add (img, offset, len, QCOW2_META_SNAPSHOTS) < 0)
    qcow2_error ("%s: out of memory: the new snapshot table is not "
                 "protected by overlap checks", img->filename);
  if (old_bytes > 0)
    qcow2_free_later (img, old_offset, old_bytes);  /* or it leaks */
  free (buf);
  return 0;

 out:
  qcow2_error ("%s: could not write the snapshot table: %s",
               img->filename, strerror (-r));
  free (buf);
  return r;
}

/* A copy of the table with room for one more entry (zeroed). */
static struct qcow2_snapshot *
copy_table (const struct qcow2_image *img, uint32_t extra)
{
  uint32_t n = img->nb_snapshots;
  struct qcow2_snapshot *s = calloc (n + extra ? n + extra : 1, sizeof *s);

  if (!s)
    return NULL;
  for (uint32_t i = 0; i < n; i++) {
    s[i] = img->snapshots[i];
    s[i].id = strdup (img->snapshots[i].id);
    s[i].name = strdup (img->snapshots[i].name);
    s[i].extra_unknown = NULL;
    if (img->snapshots[i].extra_unknown_len) {
      s[i].extra_unknown = malloc (img->snapshots[i].extra_unknown_len);
      if (s[i].extra_unknown)
        memcpy (s[i].extra_unknown, img->snapshots[i].extra_unknown,
                img->snapshots[i].extra_unknown_len);
    }
    if (!s[i].id || !s[i].name ||
        (s[i].extra_unknown_len && !s[i].extra_unknown)) {
      qcow2_snapshots_free (s, i + 1);
      return NULL;
    }
  }
  return s;
}

/* QEMU's find_new_snapshot_id: one more than the largest numeric id. */
static char *
new_id (const struct qcow2_image *img)
{
  unsigned long long max = 0;
  char buf[32];

  for (uint32_t i = 0; i < img->nb_snapshots; i++) {
    unsigned long long v = strtoull (img->snapshots[i].id, NULL, 10);
    if (v > max)
      max = v;
  }
  snprintf (buf, sizeof buf, "%llu", max + 1);
  return strdup (buf);
}

/* --- The operations ------------------------------------------------- */

/* Set or clear the dirty bit on disk (rule 7), then in the header copy
 * (memory follows disk).  Version 2 images have no such bit.
 */
static int
mark_dirty (struct qcow2_image *img, bool dirty)
{
  uint64_t features = dirty
    ? img->h.incompatible_features | QCOW2_INCOMPAT_DIRTY
    : img->h.incompatible_features & ~QCOW2_INCOMPAT_DIRTY;
  unsigned char field[8];
  int r;

  if (img->h.version < 3 || features == img->h.incompatible_features)
    return 0;
  put_be64 (field, features);
  r = qcow2_meta_write_durable (img, QCOW2_RULE_IN_PLACE, field,
                                sizeof field,
                                QCOW2_HDR_INCOMPATIBLE_FEATURES);
  if (r == 0)
    img->h.incompatible_features = features;
  return r;
}

/* Run an operation under the writer lock, on a writable sound image.
 *
 * The image is marked dirty on disk for the length of the operation: its
 * crash windows (head comment) leave COPIED flags that disagree with
 * refcounts, which qemu-img check counts as corruption.  A dirty image
 * has its refcounts and flags repaired at the next read-write open (by
 * this engine, image.c, and by QEMU), so an operation cut short by a
 * crash or a failing disk (the image then stays BROKEN and writes
 * nothing more, the mark included) costs a repair, never a corruption.
 * The mark goes only after everything the operation changed is durable.
 */
static int
run_locked (struct qcow2_image *img, const char *what,
            int (*op) (struct qcow2_image *, const char *), const char *arg)
{
  int r, r2;

  r = qcow2_writer_require (img, what);
  if (r < 0)
    return r;
  qcow2_writer_lock (img);
  r = mark_dirty (img, true);
  if (r < 0)
    qcow2_error ("%s: could not write the header's dirty bit before %s: %s",
                 img->filename, what, strerror (-r));
  else {
    r = op (img, arg);
    /* Also after a refused or undone operation: it may have changed
     * metadata before it stopped.
     */
    if (qcow2_writer_state (img) != QCOW2_WRITER_BROKEN) {
      r2 = qcow2_sync_metadata (img);
      if (r2 == 0)
        r2 = mark_dirty (img, false);
      if (r == 0)
        r = r2;
    }
  }
  qcow2_writer_unlock (img);
  return r;
}

static int
create_locked (struct qcow2_image *img, const char *name)
{
  uint32_t n = img->nb_snapshots;
  uint64_t l1_bytes = (uint64_t) img->l1_size * 8, l1_offset = 0;
  struct qcow2_snapshot *snaps = NULL, *sn;
  unsigned char *copy = NULL;
  struct timespec now;
  int r;

  qcow2_writer_assert_locked (img);
  if (img->external_data) {
    qcow2_error ("%s: internal snapshots are not supported with an "
                 "external data file", img->filename);
    return -ENOTSUP;
  }
  if (img->w->refcount_max < 2) {
    qcow2_error ("%s: snapshots need refcounts of at least 2 bits (this "
                 "image has refcount_bits=1)", img->filename);
    return -ENOTSUP;
  }
  if (n >= QCOW2_MAX_SNAPSHOTS) {
    qcow2_error ("%s: too many snapshots (%" PRIu32 ")", img->filename, n);
    return -EFBIG;
  }
  if (*name == '\0' || strlen (name) > UINT16_MAX) {
    qcow2_error ("%s: a snapshot name must have 1 to 65535 bytes",
                 img->filename);
    return -EINVAL;
  }
  if (qcow2_snapshot_find (img, name) >= 0) {
    qcow2_error ("%s: a snapshot with name or id '%s' already exists",
                 img->filename, name);
    return -EEXIST;
  }

  /* Everything written so far reaches the disk first. */
  r = qcow2_sync_metadata (img);
  if (r < 0)
    return r;

  /* The snapshot's L1 table: a copy of the active one.  COPIED means
   * nothing in an inactive table; QEMU keeps it, we clear it, so that
   * applying the snapshot never brings back a stale flag.
   */
  if (l1_bytes > 0) {
    uint64_t clusters = div_round_up (l1_bytes, img->cluster_size);
    copy = calloc (clusters, img->cluster_size);
    if (!copy)
      return -ENOMEM;
    for (uint32_t i = 0; i < img->l1_size; i++)
      put_be64 (copy + i * 8, img->l1[i] & ~QCOW2_OFLAG_COPIED);
    r = qcow2_alloc_clusters (img, clusters, &l1_offset);
    /* Rule 6: durable with the sync before the snapshot table that
     * points at it is written (replace_table).
     */
    if (r == 0)
      r = qcow2_meta_write (img, QCOW2_RULE_HEADER_LAST, copy,
                            clusters << img->cluster_bits, l1_offset);
    free (copy);
    if (r < 0) {
      qcow2_error ("%s: could not write the snapshot's L1 table: %s",
                   img->filename, strerror (-r));
      return r;
    }
  }

  r = reference_all (img, img->l1, img->l1_size);
  if (r < 0)
    goto undo_l1;
  /* Clear COPIED on everything now shared, and make the flags and the
   * increases durable before the snapshot that needs them is recorded.
   */
  r = recompute_copied (img);
  if (r == 0)
    r = qcow2_sync_metadata (img);
  if (r < 0)
    goto undo_refs;

  snaps = copy_table (img, 1);
  if (!snaps) {
    r = -ENOMEM;
    goto undo_refs;
  }
  sn = &snaps[n];
  clock_gettime (CLOCK_REALTIME, &now);
  sn->l1_table_offset = l1_offset;
  sn->l1_size = img->l1_size;
  sn->id = new_id (img);
  sn->name = strdup (name);
  sn->date_sec = (uint32_t) now.tv_sec;
  sn->date_nsec = (uint32_t) now.tv_nsec;
  sn->has_disk_size = true;
  sn->disk_size = img->h.size;
  sn->icount = UINT64_MAX;      /* not recorded, as QEMU writes it */
  if (!sn->id || !sn->name) {
    qcow2_snapshots_free (snaps, n + 1);
    r = -ENOMEM;
    goto undo_refs;
  }
  r = replace_table (img, snaps, n + 1);
  if (r < 0) {
    qcow2_snapshots_free (snaps, n + 1);
    goto undo_refs;
  }
  r = qcow2_overlap_add (img, l1_offset, l1_bytes, QCOW2_META_SNAPSHOT_L1);
  if (r == 0)
    r = qcow2_sync_metadata (img);
  return r;

 undo_refs:
  /* Not recorded: take the references back and restore the flags. */
  if (release_all (img, img->l1, img->l1_size) == 0 &&
      sync_twice (img) == 0)
    recompute_copied (img);
 undo_l1:
  if (l1_bytes > 0)
    qcow2_free_later (img, l1_offset, l1_bytes);
  sync_twice (img);
  return r;
}

int
qcow2_snapshot_create (struct qcow2_image *img, const char *name)
{
  return run_locked (img, "creating a snapshot", create_locked, name);
}

/* The snapshot named name_or_id (*index) and its L1 table (*l1_out,
 * malloc'd); a failure is reported.
 */
static int
find_with_l1 (struct qcow2_image *img, const char *name_or_id,
              uint32_t *index, uint64_t **l1_out)
{
  int64_t i = qcow2_snapshot_lookup (img, name_or_id);

  qcow2_writer_assert_locked (img);
  if (i < 0)
    return (int) i;
  *index = (uint32_t) i;
  return qcow2_snapshot_load_l1 (img, &img->snapshots[i], l1_out);
}

static int
delete_locked (struct qcow2_image *img, const char *name_or_id)
{
  uint32_t n = img->nb_snapshots, index = 0;
  struct qcow2_snapshot *snaps, victim;
  uint64_t *l1 = NULL;
  int r;

  r = find_with_l1 (img, name_or_id, &index, &l1);
  if (r < 0)
    return r;
  victim = img->snapshots[index];
  snaps = copy_table (img, 0);
  if (!snaps) {
    free (l1);
    return -ENOMEM;
  }
  free (snaps[index].id);
  free (snaps[index].name);
  free (snaps[index].extra_unknown);
  memmove (&snaps[index], &snaps[index + 1],
           (n - 1 - index) * sizeof *snaps);

  /* First the table without it, durable; then its references go. */
  r = replace_table (img, snaps, n - 1);
  if (r < 0) {
    qcow2_snapshots_free (snaps, n - 1);
    free (l1);
    return r;
  }
  r = release_all (img, l1, victim.l1_size);
  if (r == 0 && victim.l1_size > 0)
    r = qcow2_free_later (img, victim.l1_table_offset,
                          (uint64_t) victim.l1_size * 8);
  free (l1);
  return r == 0 ? settle_copied (img) : r;
}

int
qcow2_snapshot_delete (struct qcow2_image *img, const char *name_or_id)
{
  return run_locked (img, "deleting a snapshot", delete_locked, name_or_id);
}

static int
apply_locked (struct qcow2_image *img, const char *name_or_id)
{
  const struct qcow2_snapshot *sn;
  uint64_t *sn_l1 = NULL, *old_l1 = NULL, *new_l1 = NULL, needed, disk_size;
  uint32_t sn_l1_size, old_l1_size, index = 0;
  int r;

  r = find_with_l1 (img, name_or_id, &index, &sn_l1);
  if (r < 0)
    return r;
  sn = &img->snapshots[index];
  sn_l1_size = sn->l1_size;
  disk_size = sn->disk_size;
  if (disk_size % 512) {
    qcow2_error ("%s: snapshot '%s': disk size %" PRIu64 " is not a "
                 "multiple of 512", img->filename, sn->name, disk_size);
    r = -EINVAL;
    goto out;
  }
  /* Bitmaps follow the disk size: refuse now, not half way. */
  r = qcow2_bitmaps_resize_check (img, disk_size);
  if (r < 0)
    goto out;
  needed = div_round_up (disk_size, 1ull << img->l2_bits);
  if (needed < sn_l1_size)
    needed = sn_l1_size;
  if (needed < img->l1_size)
    needed = img->l1_size;
  if (needed * 8 > QCOW2_MAX_L1_BYTES) {
    qcow2_error ("%s: snapshot '%s' needs an L1 table larger than %u "
                 "bytes", img->filename, sn->name, QCOW2_MAX_L1_BYTES);
    r = -EFBIG;
    goto out;
  }

  r = qcow2_sync_metadata (img);
  if (r == 0 && needed > img->l1_size)
    r = qcow2_grow_l1 (img, img->h.size, (uint32_t) needed);
  if (r < 0)
    goto out;

  /* The snapshot's clusters gain the active image as a user, durably,
   * before the active L1 points at them.
   */
  r = reference_all (img, sn_l1, sn_l1_size);
  if (r == 0)
    r = qcow2_meta_refcounts_durable (img, QCOW2_RULE_ALLOC_REFCOUNT_FIRST);
  if (r < 0)
    goto out;

  old_l1_size = img->l1_size;
  old_l1 = malloc ((uint64_t) old_l1_size * 8 + 1);
  new_l1 = malloc ((uint64_t) old_l1_size * 8 + 1);
  if (!old_l1 || !new_l1) {
    r = -ENOMEM;
    goto out;
  }
  memcpy (old_l1, img->l1, (uint64_t) old_l1_size * 8);
  /* Everything the new active table reaches is shared: COPIED clear. */
  for (uint32_t i = 0; i < old_l1_size; i++)
    new_l1[i] = i < sn_l1_size ? sn_l1[i] & ~QCOW2_OFLAG_COPIED : 0;
  r = write_active_l1 (img, new_l1);
  if (r == 0 && disk_size != img->h.size)
    r = qcow2_write_disk_size (img, disk_size);
  if (r < 0) {
    /* Which L1 (or size) the disk now holds is unknown: the failed
     * write made the image BROKEN, which stops all writing rather than
     * guess.  Whichever table the disk holds, both trees are still
     * counted (the old one is released below, only after the switch),
     * so the next open finds leaks at worst.
     */
    goto out;
  }

  /* The whole disk changed for persistent bitmaps, as QEMU counts it. */
  r = qcow2_bitmaps_resize (img, disk_size);
  qcow2_bitmaps_mark_all (img);

  /* The old active tree lost its user. */
  if (r == 0)
    r = release_all (img, old_l1, old_l1_size);
  if (r == 0)
    r = settle_copied (img);

 out:
  free (sn_l1);
  free (old_l1);
  free (new_l1);
  return r;
}

int
qcow2_snapshot_apply (struct qcow2_image *img, const char *name_or_id)
{
  return run_locked (img, "applying a snapshot", apply_locked, name_or_id);
}
