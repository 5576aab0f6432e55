/* Durable metadata updates: the one place where metadata bytes are
 * written to the image file and made durable, and where the ordering
 * rules that keep a crashed image consistent are stated.
 *
 * The ordering rules.  A step is "durable" once a sync of the file has
 * completed after it.  Every metadata write names the rule it follows
 * (enum qcow2_rule); the sequence at each site is the rule's "before",
 * made durable, then its "after".
 *
 *   1. Allocate: refcount before user.  A cluster's refcount increase is
 *      durable before anything that points at it (an L2 or L1 entry, a
 *      refcount table entry, a snapshot table, the header) is written.
 *      A crash between leaves a leaked cluster, never a used cluster
 *      counted as free.  (qcow2_meta_refcounts_durable; flush.c step 1
 *      before step 2.)
 *   2. Free: user before refcount.  A refcount drops only after the
 *      entry, table or header that stopped pointing at the cluster is
 *      durable: qcow2_free_later queues the drop and flush.c step 3
 *      applies it after the L2 write-back, or the site drops it after the
 *      synced header switch.  A crash between leaks, never frees a
 *      cluster still in use.
 *   3. Data before its L2 entry.  Guest data (and a copied-on-write
 *      cluster) is written and synced before the L2 entry that maps it is
 *      written back (flush.c step 1 before step 2).
 *   4. L2 table before its L1 entry.  A new or copied L2 table is
 *      written and synced before the L1 entry points at it (l2_write.c).
 *   5. Refcount block before its table entry.  A new refcount block is
 *      written and synced before the refcount table entry that points at
 *      it (refcount.c).
 *   6. Header last.  A new structure the header points at (refcount
 *      table, L1 table, snapshot table, bitmap directory, LUKS area) is
 *      written into fresh clusters and synced; the header switches to it
 *      in one write, synced; only then is the old structure freed
 *      (rule 2).  A crash leaves the old or the new one, at worst leaked.
 *   7. In place.  A field or entry rewritten where it is, in one write
 *      that leaves a valid image whether or not it lands: a feature bit
 *      (dirty, corrupt, autoclear), the disk size when the L1 table
 *      already covers it, a COPIED flag, an active L1 table whose every
 *      target is already durably counted (rule 1).
 *   8. New file.  Creating an image: the file is written and synced
 *      before it is opened as an image; nothing refers to it before.
 *
 * A pointer's own write.  Rules 4 and 5 make a new structure durable
 * before the pointer to it is written; the write of that pointer (an L1
 * entry, a refcount table entry) is itself left to the next sync.  Until
 * then it may land or not, and either way the image is valid: without it
 * the new structure is a leaked cluster.  Everything that needs the
 * pointer durable syncs first: a user of a cluster that a new refcount
 * block counts is written only after rule 1's sync; entries of a new L2
 * table reach the disk only in flush.c's step 2, after step 1's sync; an
 * old table is freed (rule 2) only after step 2's sync; a flush is
 * acknowledged only after its last sync.  This saves two of the three
 * syncs a new L2 table used to cost (QEMU pays them only at a flush, by
 * cache dependencies; these rules keep every allocation crash-safe at
 * any moment without them).
 *
 * And memory follows disk: an in-memory mirror of on-disk metadata (the
 * refcount table, the L1 table, the snapshot table, the header copy, the
 * bitmap directory) changes only after the write it mirrors has
 * succeeded here, or is rolled back when the write fails.
 *
 * Every failure passes through metadata_write_failed: after a failed
 * write or sync the disk may hold the old bytes, the new ones, or a mix,
 * and earlier unsynced writes may be lost, so the image becomes BROKEN
 * (writer.c) and writes nothing more.
 *
 * Callers hold the writer lock, or own the image alone (opening,
 * creating, closing).
 */
#include <assert.h>
#include <errno.h>

#include "cache.h"
#include "internal.h"
#include "io.h"

/* The single failure path of every metadata write and sync (img is NULL
 * while a new file is created).  The outcome on disk is unknown.  The
 * caller reports the error with its own context.
 */
static int
metadata_write_failed (struct qcow2_image *img, enum qcow2_rule rule, int r)
{
  static const char *const what[] = {
    [QCOW2_RULE_ALLOC_REFCOUNT_FIRST] = "making refcounts durable (rule 1)",
    [QCOW2_RULE_FREE_USER_FIRST] = "writing metadata before a free (rule 2)",
    [QCOW2_RULE_DATA_BEFORE_L2] = "writing data before its L2 entry (rule 3)",
    [QCOW2_RULE_L2_BEFORE_L1] = "writing an L2 table or its L1 entry "
                                "(rule 4)",
    [QCOW2_RULE_REFBLOCK_BEFORE_TABLE] = "writing a refcount block or its "
                                         "table entry (rule 5)",
    [QCOW2_RULE_HEADER_LAST] = "writing a new table or the header (rule 6)",
    [QCOW2_RULE_IN_PLACE] = "rewriting metadata in place (rule 7)",
    [QCOW2_RULE_NEW_FILE] = "writing the new image (rule 8)",
  };

  assert (r < 0);
  /* What the disk holds is unknown: no more metadata may follow. */
  if (img)
    qcow2_writer_break (img, r, what[rule]);
  return r;
}

static void
check_rule (enum qcow2_rule rule)
{
  (void) rule;
  assert (rule >= QCOW2_RULE_ALLOC_REFCOUNT_FIRST &&
          rule <= QCOW2_RULE_NEW_FILE);
}

static int
write_io (struct qcow2_image *img, struct qcow2_io *io, enum qcow2_rule rule,
          const void *buf, size_t len, uint64_t offset, bool sync)
{
  int r;

  check_rule (rule);
  r = qcow2_io_pwrite (io, buf, len, offset);
  if (r == 0 && sync)
    r = qcow2_io_flush (io);
  return r < 0 ? metadata_write_failed (img, rule, r) : 0;
}

int
qcow2_meta_write (struct qcow2_image *img, enum qcow2_rule rule,
                  const void *buf, size_t len, uint64_t offset)
{
  return write_io (img, img->io, rule, buf, len, offset, false);
}

int
qcow2_meta_write_durable (struct qcow2_image *img, enum qcow2_rule rule,
                          const void *buf, size_t len, uint64_t offset)
{
  return write_io (img, img->io, rule, buf, len, offset, true);
}

int
qcow2_meta_sync (struct qcow2_image *img, enum qcow2_rule rule)
{
  int r;

  check_rule (rule);
  r = qcow2_io_flush (img->io);
  return r < 0 ? metadata_write_failed (img, rule, r) : 0;
}

int
qcow2_meta_refcounts_durable (struct qcow2_image *img, enum qcow2_rule rule)
{
  int r;

  check_rule (rule);
  r = qcow2_cache_writeback (img->w->refblock_cache);
  if (r == 0)
    r = qcow2_io_flush (img->io);
  return r < 0 ? metadata_write_failed (img, rule, r) : 0;
}

int
qcow2_new_file_write_durable (struct qcow2_io *io, const void *buf,
                              size_t len, uint64_t offset)
{
  return write_io (NULL, io, QCOW2_RULE_NEW_FILE, buf, len, offset, true);
}
