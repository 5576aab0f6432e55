/* What the plugin and the filter share: keys, exports and requests (see
 * serve.h).
 *
 * One image per server process, shared by every connection: all state
 * lives in the engine, so a completed request is visible on every
 * connection, a flush on any connection covers every write, and
 * multi-conn is safe.  Requests run fully in parallel; the engine does
 * its own locking.
 *
 * Exports: "" is the active image; every internal snapshot is a further,
 * read-only export named after it; COMPRESSED_EXPORT is the active image
 * for nbdkit-qcow2-compress-filter; "bitmap:NAME" is the active image,
 * read-only, with persistent bitmap NAME's dirty map as its block status
 * (bitmaps.c).
 *
 * The image opens read-only and becomes writable at the first write
 * request: nbdkit does not tell plugins or filters about -r before
 * connections arrive, and a client that only reads (nbdinfo, qemu-img
 * convert) must not change the image (enabling writes clears autoclear
 * bits, releases stale bitmaps, repairs a dirty image, takes the write
 * locks).
 */
#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "compressed-export.h"
#include "qcow2.h"
#include "serve.h"

/* Configuration, filled by serve_config. */
static char *passphrase;
static bool follow_backing = true;
static unsigned max_chain_depth = QCOW2_DEFAULT_MAX_CHAIN_DEPTH;
static int64_t cache_size;
static enum { CHECK_NONE, CHECK_REPORT, CHECK_REPAIR } check_mode;

static struct qcow2_image *image;
static pthread_mutex_t enable_write_lock = PTHREAD_MUTEX_INITIALIZER;

int
serve_config (const char *key, const char *value)
{
  if (strcmp (key, "passphrase") == 0) {
    free (passphrase);
    return nbdkit_read_password (value, &passphrase);
  }
  if (strcmp (key, "follow-backing") == 0) {
    int b = nbdkit_parse_bool (value);
    if (b == -1)
      return -1;
    follow_backing = b;
    return 0;
  }
  if (strcmp (key, "max-chain-depth") == 0) {
    if (nbdkit_parse_unsigned ("max-chain-depth", value, &max_chain_depth)
        == -1)
      return -1;
    if (max_chain_depth < 1) {
      nbdkit_error ("max-chain-depth must be at least 1");
      return -1;
    }
    return 0;
  }
  if (strcmp (key, "check") == 0) {
    if (strcmp (value, "report") == 0)
      check_mode = CHECK_REPORT;
    else if (strcmp (value, "repair") == 0)
      check_mode = CHECK_REPAIR;
    else if (strcmp (value, "none") == 0)
      check_mode = CHECK_NONE;
    else {
      nbdkit_error ("check must be none, report or repair, not '%s'",
                    value);
      return -1;
    }
    return 0;
  }
  if (strcmp (key, "cache-size") == 0) {
    cache_size = nbdkit_parse_size (value);
    return cache_size == -1 ? -1 : 0;
  }
  int r = snapshots_config (key, value);
  if (r == 1)
    r = bitmaps_config (key, value);
  if (r == 1)
    r = create_config (key, value);
  return r;
}

void
serve_open_options (struct qcow2_open_options *opts)
{
  opts->passphrase = passphrase;
  opts->follow_backing = follow_backing;
  opts->max_chain_depth = max_chain_depth;
  opts->cache_size = (uint64_t) cache_size;
  opts->writable = check_mode == CHECK_REPAIR;
}

const char *
serve_passphrase (void)
{
  return passphrase;
}

bool
serve_repair_requested (void)
{
  return check_mode == CHECK_REPAIR;
}

struct qcow2_image *
serve_image (void)
{
  return image;
}

/* check=: report on stderr as qemu-img check would summarise; with
 * repair, refuse to serve an image whose corruptions remain.
 */
static int
run_check (const char *name)
{
  struct qcow2_check_result res;

  if (qcow2_check (image, check_mode == CHECK_REPAIR, &res) < 0)
    return -1;
  fprintf (stderr,
           "nbdkit-qcow2: check of %s: %" PRIu64 " corruptions (%" PRIu64
           " repaired), %" PRIu64 " leaked clusters (%" PRIu64
           " repaired), %" PRIu64 " unreadable tables\n", name,
           res.corruptions, res.corruptions_fixed, res.leaks,
           res.leaks_fixed, res.check_errors);
  if (check_mode == CHECK_REPAIR &&
      (res.corruptions > res.corruptions_fixed || res.check_errors)) {
    nbdkit_error ("%s: corruptions remain after repair; not serving "
                  "it (try qemu-img check -r all)", name);
    return -1;
  }
  return 0;
}

int
serve_startup (struct qcow2_image *img, const char *name)
{
  image = img;
  if (create_resize (image) == -1)
    return -1;
  if (check_mode != CHECK_NONE && run_check (name) == -1)
    return -1;
  if (snapshots_run (image) == -1)
    return -1;
  return bitmaps_run (image);
}

void
serve_attach (struct qcow2_image *img)
{
  image = img;
}

void
serve_detach (void)
{
  qcow2_close (image);
  image = NULL;
}

void
serve_unload (void)
{
  serve_detach ();
  snapshots_unload ();
  bitmaps_unload ();
  if (passphrase) {
    memset (passphrase, 0, strlen (passphrase));
    free (passphrase);
    passphrase = NULL;
  }
}

/* A connection: the active image (view == NULL), or a snapshot chosen by
 * export name, served read-only.
 */
struct serve_handle {
  struct qcow2_view *view;
  bool compressed;      /* COMPRESSED_EXPORT: whole clusters compressed */
  bool bitmap;          /* a bitmap export: the active image, read-only,
                         * block status from bitmap bitmap_index */
  uint32_t bitmap_index;
};

struct serve_handle *
serve_open (const char *export)
{
  struct serve_handle *h = calloc (1, sizeof *h);

  if (!h) {
    nbdkit_error ("calloc: %m");
    return NULL;
  }
  if (export && strcmp (export, COMPRESSED_EXPORT) == 0)
    h->compressed = true;
  else if (bitmaps_is_export (export)) {
    if (bitmaps_open_export (image, export, &h->bitmap_index) == -1) {
      free (h);
      return NULL;
    }
    h->bitmap = true;
  }
  else if (export && *export &&
           qcow2_view_open (image, export, &h->view) < 0) {
    free (h);
    return NULL;
  }
  return h;
}

void
serve_close (struct serve_handle *h)
{
  qcow2_view_close (h->view);
  free (h);
}

int
serve_list_exports (struct nbdkit_exports *exports)
{
  if (nbdkit_add_export (exports, "", "active image") == -1)
    return -1;
  for (uint32_t i = 0; i < qcow2_snapshot_count (image); i++) {
    struct qcow2_snapshot_info sn;
    char desc[256], date[64];
    time_t t;
    struct tm tm;

    qcow2_snapshot_get_info (image, i, &sn);
    t = (time_t) sn.date_sec;
    strftime (date, sizeof date, "%Y-%m-%d %H:%M:%S",
              gmtime_r (&t, &tm));
    snprintf (desc, sizeof desc, "snapshot id %s, %s UTC, %" PRIu64
              " bytes, read-only", sn.id, date, sn.disk_size);
    /* The reserved name means the compressing export: list such a
     * snapshot by id.
     */
    if (nbdkit_add_export (exports,
                           *sn.name && strcmp (sn.name, COMPRESSED_EXPORT)
                           ? sn.name : sn.id, desc) == -1)
      return -1;
  }
  return bitmaps_list_exports (image, exports);
}

const char *
serve_export_description (struct serve_handle *h)
{
  return h->view ? "internal snapshot (read-only)"
         : h->bitmap ? "dirty bitmap: dirty granules are data, clean ones "
                       "holes; reads the active image (read-only)"
         : h->compressed ? COMPRESSED_DESCRIPTION
         : "active image";
}

/* Before the first change to the image. */
static int
ensure_writable (void)
{
  int r = 0;

  if (!qcow2_is_writable (image)) {
    pthread_mutex_lock (&enable_write_lock);
    r = qcow2_enable_write (image);
    pthread_mutex_unlock (&enable_write_lock);
  }
  return r;
}

int64_t
serve_get_size (struct serve_handle *h)
{
  return (int64_t) (h->view ? qcow2_view_get_size (h->view)
                            : qcow2_get_size (image));
}

void
serve_block_size (uint32_t *minimum, uint32_t *preferred, uint32_t *maximum)
{
  *minimum = 1;
  *preferred = qcow2_get_cluster_size (image);
  if (*preferred < 4096)
    *preferred = 4096;
  *maximum = 0xffffffff;
}

bool
serve_can_write (struct serve_handle *h)
{
  return !h->view && !h->bitmap && qcow2_may_write (image);
}

int
serve_pread (struct serve_handle *h, void *buf, uint32_t count,
             uint64_t offset)
{
  return h->view ? qcow2_view_read (h->view, buf, count, offset)
                 : qcow2_read (image, buf, count, offset);
}

/* COMPRESSED_EXPORT: each whole cluster of the request (the last cluster
 * of the disk counts as whole up to the end of the disk) is written
 * compressed; the unaligned head and tail are written normally.
 */
static int
write_compressed (const unsigned char *buf, uint32_t count, uint64_t offset,
                  bool fua)
{
  const uint64_t cs = qcow2_get_cluster_size (image);
  const uint64_t size = qcow2_get_size (image);
  int r = 0;

  if (offset > size || count > size - offset)
    return qcow2_write (image, buf, count, offset, fua);  /* reports it */
  while (r == 0 && count > 0) {
    uint64_t start = offset & ~(cs - 1);
    uint64_t end = start + cs < size ? start + cs : size;
    uint32_t n;

    if (offset == start && offset + count >= end) {
      n = (uint32_t) (end - start);
      r = qcow2_write_compressed (image, buf, start);
    }
    else {
      n = (uint32_t) (end - offset < count ? end - offset : count);
      r = qcow2_write (image, buf, n, offset, false);
    }
    buf += n;
    offset += n;
    count -= n;
  }
  if (r == 0 && fua)
    r = qcow2_flush (image);
  return r;
}

int
serve_pwrite (struct serve_handle *h, const void *buf, uint32_t count,
              uint64_t offset, bool fua)
{
  int r = ensure_writable ();

  if (r == 0 && h->compressed)
    r = write_compressed (buf, count, offset, fua);
  else if (r == 0)
    r = qcow2_write (image, buf, count, offset, fua);
  return r;
}

int
serve_zero (struct serve_handle *h, uint32_t count, uint64_t offset,
            bool may_trim, bool fast, bool fua)
{
  int r = ensure_writable ();

  (void) h;
  if (r == 0)
    r = qcow2_zero (image, count, offset, may_trim, fast, fua);
  return r;
}

int
serve_trim (struct serve_handle *h, uint32_t count, uint64_t offset,
            bool fua)
{
  int r = ensure_writable ();

  (void) h;
  if (r == 0)
    r = qcow2_trim (image, count, offset, fua);
  return r;
}

int
serve_flush (struct serve_handle *h)
{
  (void) h;
  return qcow2_flush (image);
}

static int
add_extent (void *opaque, uint64_t offset, uint64_t length, uint32_t flags)
{
  uint32_t type = 0;

  if (flags & QCOW2_EXTENT_HOLE)
    type |= NBDKIT_EXTENT_HOLE;
  if (flags & QCOW2_EXTENT_ZERO)
    type |= NBDKIT_EXTENT_ZERO;
  return nbdkit_add_extent (opaque, offset, length, type);
}

int
serve_extents (struct serve_handle *h, uint32_t count, uint64_t offset,
               bool req_one, struct nbdkit_extents *extents)
{
  if (h->bitmap)
    return bitmaps_extents (image, h->bitmap_index, count, offset, req_one,
                            extents);
  return h->view
         ? qcow2_view_extents (h->view, offset, count, req_one, add_extent,
                               extents)
         : qcow2_extents (image, offset, count, req_one, add_extent,
                          extents);
}
