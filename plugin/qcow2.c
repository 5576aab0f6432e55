/* nbdkit-qcow2-plugin: a thin adapter from nbdkit's callbacks to the qcow2
 * engine in core/.
 *
 * One image per server process, opened in .get_ready (so a bad image or a
 * wrong passphrase is reported at startup) and shared by every connection:
 * all state lives in the engine, so a completed request is visible on every
 * connection, a flush on any connection covers every write, and multi-conn
 * is safe.  Requests run fully in parallel; the engine does its own
 * locking.
 *
 * Internal snapshots are further exports, read-only, named after them,
 * and so is each persistent bitmap's dirty map (bitmaps.c).
 *
 * The image opens read-only and becomes writable at the first write
 * request: nbdkit does not tell plugins about -r before connections
 * arrive, and a client that only reads (nbdinfo, qemu-img convert) must
 * not change the image (enabling writes clears autoclear bits, marks the
 * persistent bitmaps in use, repairs a dirty image, takes the write
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

#include "config.h"
#include "create.h"
#include "bitmaps.h"
#include "qcow2.h"
#include "snapshots.h"

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

/* Configuration, filled by .config. */
static char *filename;
static char *data_file;
static char *passphrase;
static bool follow_backing = true;
static unsigned max_chain_depth = QCOW2_DEFAULT_MAX_CHAIN_DEPTH;
static int64_t cache_size;
static bool locking = true;
static enum { CHECK_NONE, CHECK_REPORT, CHECK_REPAIR } check_mode;

static struct qcow2_image *image;
static pthread_mutex_t enable_write_lock = PTHREAD_MUTEX_INITIALIZER;

static void
report_error (void *opaque, const char *message)
{
  (void) opaque;
  nbdkit_error ("%s", message);
}

static void
qcow2_plugin_load (void)
{
  qcow2_set_error_handler (report_error, NULL);
}

static void
qcow2_plugin_unload (void)
{
  qcow2_close (image);
  image = NULL;
  snapshots_unload ();
  bitmaps_unload ();
  free (filename);
  free (data_file);
  if (passphrase) {
    memset (passphrase, 0, strlen (passphrase));
    free (passphrase);
  }
}

static int
qcow2_plugin_config (const char *key, const char *value)
{
  if (strcmp (key, "file") == 0) {
    free (filename);
    /* Absolute, not real: with create=true it need not exist yet. */
    filename = nbdkit_absolute_path (value);
    return filename ? 0 : -1;
  }
  if (strcmp (key, "data-file") == 0) {
    /* Resolved in .config_complete: with create=true it is the name to
     * record in the new image, as given.
     */
    free (data_file);
    data_file = strdup (value);
    return data_file ? 0 : -1;
  }
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
  if (strcmp (key, "locking") == 0) {
    int b = nbdkit_parse_bool (value);
    if (b == -1)
      return -1;
    locking = b;
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
  if (r == 1)
    nbdkit_error ("unknown parameter '%s'", key);
  return r == 0 ? 0 : -1;
}

static int
qcow2_plugin_config_complete (void)
{
  if (!filename) {
    nbdkit_error ("you must supply the file=<FILENAME> parameter "
                  "after the plugin name on the command line");
    return -1;
  }
  if (create_config_complete (filename) == -1)
    return -1;
  if (data_file && !create_requested ()) {
    char *real = nbdkit_realpath (data_file);
    if (!real)
      return -1;
    free (data_file);
    data_file = real;
  }
  return 0;
}

#define qcow2_plugin_config_help \
  "[file=]<FILENAME>      (required) The qcow2 image to serve.\n" \
  "passphrase=<SECRET>    Passphrase of an encrypted image (legacy AES or\n" \
  "                       LUKS): literal, -, +FILE or -FD.\n" \
  "follow-backing=false   Refuse images with a backing file instead of\n" \
  "                       opening it (default: true).\n" \
  "max-chain-depth=<N>    Longest backing chain accepted (default 64).\n" \
  "data-file=<FILENAME>   External data file, overriding the image's.\n" \
  "cache-size=<SIZE>      L2 table cache per image (default: enough for\n" \
  "                       the whole disk, at most 32M).\n" \
  "locking=false          Do not take QEMU-compatible image locks.\n" \
  "check=report|repair    Check refcounts and COPIED flags before serving,\n" \
  "                       and with repair fix them (opens read-write).\n" \
  SNAPSHOTS_CONFIG_HELP \
  BITMAPS_CONFIG_HELP \
  CREATE_CONFIG_HELP

/* check=: report on stderr as qemu-img check would summarise; with
 * repair, refuse to serve an image whose corruptions remain.
 */
static int
run_check (void)
{
  struct qcow2_check_result res;

  if (qcow2_check (image, check_mode == CHECK_REPAIR, &res) < 0)
    return -1;
  fprintf (stderr,
           "nbdkit-qcow2: check of %s: %" PRIu64 " corruptions (%" PRIu64
           " repaired), %" PRIu64 " leaked clusters (%" PRIu64
           " repaired), %" PRIu64 " unreadable tables\n", filename,
           res.corruptions, res.corruptions_fixed, res.leaks,
           res.leaks_fixed, res.check_errors);
  if (check_mode == CHECK_REPAIR &&
      (res.corruptions > res.corruptions_fixed || res.check_errors)) {
    nbdkit_error ("%s: corruptions remain after repair; not serving "
                  "it (try qemu-img check -r all)", filename);
    return -1;
  }
  return 0;
}

static int
qcow2_plugin_get_ready (void)
{
  struct qcow2_open_options opts;

  qcow2_open_options_init (&opts);
  opts.filename = filename;
  opts.passphrase = passphrase;
  opts.follow_backing = follow_backing;
  opts.max_chain_depth = max_chain_depth;
  opts.cache_size = (uint64_t) cache_size;
  if (create_image (filename, passphrase, data_file) == -1)
    return -1;
  /* A created image records its data file itself. */
  opts.data_file = create_requested () ? NULL : data_file;
  opts.lock = locking;
  opts.writable = check_mode == CHECK_REPAIR;
  if (qcow2_open (&opts, &image) < 0 || create_resize (image) == -1)
    return -1;
  if (check_mode != CHECK_NONE && run_check () == -1)
    return -1;
  if (snapshots_run (image) == -1)
    return -1;
  return bitmaps_run (image);
}

static void
qcow2_plugin_dump_plugin (void)
{
  printf ("qcow2_version=%s\n", PACKAGE_VERSION);
  printf ("qcow2_deflate=yes\n");
  printf ("qcow2_zstd=%s\n", qcow2_have_zstd () ? "yes" : "no");
  printf ("qcow2_libdeflate=%s\n", qcow2_have_libdeflate () ? "yes" : "no");
  printf ("qcow2_crypto=%s\n", qcow2_have_crypto () ? "yes" : "no");
  printf ("qcow2_write=yes\n");
}

/* A connection: the active image (view == NULL), or a snapshot chosen by
 * export name, served read-only.
 */
struct handle {
  struct qcow2_view *view;
  bool compressed;      /* COMPRESSED_EXPORT: whole clusters compressed */
  bool bitmap;          /* a bitmap export: the active image, read-only,
                         * block status from bitmap bitmap_index */
  uint32_t bitmap_index;
};

/* The reserved export name that nbdkit-qcow2-compress-filter opens: the
 * active image, with whole clusters written compressed (nbdkit has no
 * "write compressed" flag, so the filter asks for it by name).  A
 * snapshot of that name is still reachable by its id.
 */
#define COMPRESSED_EXPORT "qcow2:compressed"

static void *
qcow2_plugin_open (int readonly)
{
  const char *export = nbdkit_export_name ();
  struct handle *h = calloc (1, sizeof *h);

  (void) readonly;
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

static void
qcow2_plugin_close (void *handle)
{
  struct handle *h = handle;

  qcow2_view_close (h->view);
  free (h);
}

/* Exports: "" is the active image; every internal snapshot is a further,
 * read-only export named after it.
 */
static int
qcow2_plugin_list_exports (int readonly, int is_tls,
                           struct nbdkit_exports *exports)
{
  (void) readonly; (void) is_tls;
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

static const char *
qcow2_plugin_export_description (void *handle)
{
  struct handle *h = handle;
  return h->view ? "internal snapshot (read-only)"
         : h->bitmap ? "dirty bitmap: dirty granules are data, clean ones "
                       "holes; reads the active image (read-only)"
         : h->compressed ? "active image, compressing whole-cluster writes"
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

static int64_t
qcow2_plugin_get_size (void *handle)
{
  struct handle *h = handle;
  return (int64_t) (h->view ? qcow2_view_get_size (h->view)
                            : qcow2_get_size (image));
}

static int
qcow2_plugin_block_size (void *handle, uint32_t *minimum, uint32_t *preferred,
                         uint32_t *maximum)
{
  (void) handle;
  *minimum = 1;
  *preferred = qcow2_get_cluster_size (image);
  if (*preferred < 4096)
    *preferred = 4096;
  *maximum = 0xffffffff;
  return 0;
}

static int
qcow2_plugin_can_write (void *handle)
{
  struct handle *h = handle;
  return !h->view && !h->bitmap && qcow2_may_write (image);
}

static int
qcow2_plugin_can_fua (void *handle)
{
  (void) handle;
  return NBDKIT_FUA_NATIVE;
}

static int
qcow2_plugin_can_trim (void *handle)
{
  return qcow2_plugin_can_write (handle);
}

/* Zeroing never falls back to nbdkit's emulation (broken for requests over
 * 64 MiB in 1.32.5): every zero request is handled natively, and only
 * FAST_ZERO requests fail with ENOTSUP.
 */
static int
qcow2_plugin_can_zero (void *handle)
{
  return qcow2_plugin_can_write (handle);
}

static int
qcow2_plugin_can_fast_zero (void *handle)
{
  (void) handle;
  return 1;
}

static int
qcow2_plugin_can_multi_conn (void *handle)
{
  (void) handle;
  return 1;
}

/* Engine errors are negative errnos; nbdkit wants -1 and the errno. */
static int
report (int r)
{
  if (r < 0) {
    nbdkit_set_error (-r);
    return -1;
  }
  return 0;
}

static int
qcow2_plugin_pread (void *handle, void *buf, uint32_t count, uint64_t offset,
                    uint32_t flags)
{
  struct handle *h = handle;

  (void) flags;
  return report (h->view ? qcow2_view_read (h->view, buf, count, offset)
                         : qcow2_read (image, buf, count, offset));
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

static int
qcow2_plugin_pwrite (void *handle, const void *buf, uint32_t count,
                     uint64_t offset, uint32_t flags)
{
  struct handle *h = handle;
  int r = ensure_writable ();

  if (r == 0 && h->compressed)
    r = write_compressed (buf, count, offset, flags & NBDKIT_FLAG_FUA);
  else if (r == 0)
    r = qcow2_write (image, buf, count, offset, flags & NBDKIT_FLAG_FUA);
  return report (r);
}

static int
qcow2_plugin_zero (void *handle, uint32_t count, uint64_t offset,
                   uint32_t flags)
{
  int r = ensure_writable ();

  (void) handle;
  if (r == 0)
    r = qcow2_zero (image, count, offset, flags & NBDKIT_FLAG_MAY_TRIM,
                    flags & NBDKIT_FLAG_FAST_ZERO, flags & NBDKIT_FLAG_FUA);
  return report (r);
}

static int
qcow2_plugin_trim (void *handle, uint32_t count, uint64_t offset,
                   uint32_t flags)
{
  int r = ensure_writable ();

  (void) handle;
  if (r == 0)
    r = qcow2_trim (image, count, offset, flags & NBDKIT_FLAG_FUA);
  return report (r);
}

static int
qcow2_plugin_flush (void *handle, uint32_t flags)
{
  (void) handle; (void) flags;
  return report (qcow2_flush (image));
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

static int
qcow2_plugin_extents (void *handle, uint32_t count, uint64_t offset,
                      uint32_t flags, struct nbdkit_extents *extents)
{
  struct handle *h = handle;
  bool one = flags & NBDKIT_FLAG_REQ_ONE;

  if (h->bitmap)
    return report (bitmaps_extents (image, h->bitmap_index, count, offset,
                                    one, extents));
  return report (h->view
                 ? qcow2_view_extents (h->view, offset, count, one,
                                       add_extent, extents)
                 : qcow2_extents (image, offset, count, one, add_extent,
                                  extents));
}

static struct nbdkit_plugin plugin = {
  .name = "qcow2",
  .longname = "nbdkit qcow2 plugin",
  .version = PACKAGE_VERSION,
  .description = "Serve qcow2 disk images",
  .load = qcow2_plugin_load,
  .unload = qcow2_plugin_unload,
  .config = qcow2_plugin_config,
  .config_complete = qcow2_plugin_config_complete,
  .config_help = qcow2_plugin_config_help,
  .magic_config_key = "file",
  .get_ready = qcow2_plugin_get_ready,
  .dump_plugin = qcow2_plugin_dump_plugin,
  .open = qcow2_plugin_open,
  .close = qcow2_plugin_close,
  .list_exports = qcow2_plugin_list_exports,
  .export_description = qcow2_plugin_export_description,
  .get_size = qcow2_plugin_get_size,
  .block_size = qcow2_plugin_block_size,
  .can_write = qcow2_plugin_can_write,
  .can_multi_conn = qcow2_plugin_can_multi_conn,
  .can_fua = qcow2_plugin_can_fua,
  .can_trim = qcow2_plugin_can_trim,
  .can_zero = qcow2_plugin_can_zero,
  .can_fast_zero = qcow2_plugin_can_fast_zero,
  .pread = qcow2_plugin_pread,
  .pwrite = qcow2_plugin_pwrite,
  .zero = qcow2_plugin_zero,
  .trim = qcow2_plugin_trim,
  .flush = qcow2_plugin_flush,
  .extents = qcow2_plugin_extents,
};

NBDKIT_REGISTER_PLUGIN (plugin)
