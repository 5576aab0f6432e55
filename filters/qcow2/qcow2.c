/* nbdkit-qcow2-filter: the qcow2 engine over any nbdkit plugin.
 *
 *   nbdkit --filter=qcow2 curl https://example.com/disk.qcow2
 *   nbdkit --filter=qcow2 nbd socket=/run/other.sock
 *
 * The layer below holds the image the way a logical volume holds one for
 * QEMU: a container of fixed size (io_next.c).  This file is a thin
 * adapter, in nbdkit's order of callbacks:
 *
 *   .config         our keys (adapter/serve.c, and backing-dir=); the
 *                   rest go down to the plugin;
 *   .config_complete  remembers the layer below (nxdata);
 *   .get_ready      learns the final thread model (unless PARALLEL, calls
 *                   into the shared context are serialised, io_next.c);
 *                   opens the layer below and the image in it, creates it
 *                   first if asked, runs the startup keys (check=, the
 *                   snapshot keys, resize), then closes both again.  This
 *                   is before nbdkit forks (into the background, or for
 *                   --run), so that a bad image or a wrong passphrase
 *                   stops nbdkit with an error and its exit status, as
 *                   with the plugin;
 *   .after_fork     opens ONE context of the layer below for serving,
 *                   shared by every connection
 *                   (nbdkit_next_context_open(..., shared=1)), and the
 *                   engine on it, as the plugin opens its image once: so
 *                   every connection sees every completed write,
 *                   multi-conn is safe and a flush covers all.  Only here,
 *                   after the fork, because plugins start threads when
 *                   they open a connection (the nbd plugin's reader), and
 *                   threads do not survive a fork;
 *   .open           a connection: the client's export name selects the
 *                   active image or a snapshot exactly as with the plugin;
 *                   the layer below is not opened per connection;
 *   data callbacks  adapter/serve.c, errnos passed back unchanged;
 *   .cleanup        closes the engine (writing back its metadata), then
 *                   the shared context.
 *
 * The per-connection `next` of the data callbacks is NULL (no context is
 * opened below a connection), so every callback that nbdkit would
 * otherwise pass down is defined here.
 *
 * Files an image names (backing files, an external data file) cannot be
 * looked up next to it: they are found only in the local directory named
 * by backing-dir=, and refused without it.  QEMU's image locks do not
 * apply to a container in another layer.
 */
#include <nbdkit-filter.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "io_next.h"
#include "qcow2.h"
#include "serve.h"

/* The name of the image in messages: it has no file name here. */
#define IMAGE_NAME "qcow2 image in the layer below"

static char *backing_dir;
static nbdkit_backend *backend;  /* the layer below, from .config_complete */
static int thread_model = NBDKIT_THREAD_MODEL_PARALLEL;
static pthread_mutex_t serialise_lock = PTHREAD_MUTEX_INITIALIZER;
static nbdkit_next *below;       /* the shared context */

static void
report_error (void *opaque, const char *message)
{
  (void) opaque;
  nbdkit_error ("%s", message);
}

/* -D qcow2.FLAG=1 messages (core/debug.h); shown with -v. */
static void
report_debug (void *opaque, const char *message)
{
  (void) opaque;
  nbdkit_debug ("%s", message);
}

static void
qcow2_filter_load (void)
{
  qcow2_set_error_handler (report_error, NULL);
  qcow2_set_debug_handler (report_debug, NULL);
  /* size= belongs to plugins below (memory, data...). */
  create_set_size_key ("qcow2-size");
}

static void
qcow2_filter_unload (void)
{
  serve_unload ();       /* nothing left open if .cleanup ran */
  free (backing_dir);
}

static int
qcow2_filter_config (nbdkit_next_config *next, nbdkit_backend *nxdata,
                     const char *key, const char *value)
{
  if (strcmp (key, "backing-dir") == 0) {
    free (backing_dir);
    backing_dir = nbdkit_realpath (value);
    return backing_dir ? 0 : -1;
  }
  if (strcmp (key, "data-file") == 0 || strcmp (key, "locking") == 0 ||
      strcmp (key, "data-file-raw") == 0 ||
      strcmp (key, "preallocation") == 0) {
    nbdkit_error ("%s= is a key of nbdkit-qcow2-plugin: an image inside "
                  "another layer has no %s", key,
                  strcmp (key, "locking") == 0 ? "QEMU image locks"
                  : strcmp (key, "preallocation") == 0
                  ? "preallocation (its free space need not read as zeros)"
                  : "external data file of its own");
    return -1;
  }
  int r = serve_config (key, value);
  if (r == 1)
    return next (nxdata, key, value);
  return r;
}

static int
qcow2_filter_config_complete (nbdkit_next_config_complete *next,
                              nbdkit_backend *nxdata)
{
  if (create_config_complete (NULL) == -1)
    return -1;
  backend = nxdata;
  return next (nxdata);
}

#define qcow2_filter_config_help \
  SERVE_CONFIG_HELP_OPEN \
  "backing-dir=<DIR>      Local directory where the image's backing files\n" \
  "                       are found (refused without it).\n" \
  SNAPSHOTS_CONFIG_HELP \
  BITMAPS_CONFIG_HELP \
  CREATE_CONFIG_HELP_SIZED ("qcow2-size", "container")

/* Open the layer below read-write where it allows (the image becomes
 * writable only at the first write), else read-only.
 */
static nbdkit_next *
open_below (nbdkit_backend *backend)
{
  nbdkit_next *n = nbdkit_next_context_open (backend, 0, "", 1);

  if (!n) {
    nbdkit_debug ("qcow2: the layer below cannot be opened read-write; "
                  "opening it read-only");
    n = nbdkit_next_context_open (backend, 1, "", 1);
  }
  if (!n)
    return NULL;
  if (n->prepare (n) == -1) {
    nbdkit_next_context_close (n);
    return NULL;
  }
  return n;
}

/* nbdkit 1.32 makes its quit pipe only after .get_ready, and until then
 * nbdkit_nanosleep polls fd 0 in its place: a filter or plugin below
 * that sleeps while we open it (delay; retry after a failure) trips an
 * assertion in nbdkit when stdin is readable (/dev/null under systemd).
 * While the layer below is opened and read, fd 0 is a pipe that never
 * becomes readable; stdin is put back afterwards.
 */
struct quiet_stdin {
  int saved, writer;
};

static void
quiet_stdin_begin (struct quiet_stdin *q)
{
  int p[2];

  q->saved = dup (0);
  q->writer = -1;
  if (pipe2 (p, O_CLOEXEC) == -1)
    return;
  if (dup2 (p[0], 0) == -1) {
    close (p[1]);
    p[1] = -1;
  }
  close (p[0]);
  q->writer = p[1];
}

static void
quiet_stdin_end (struct quiet_stdin *q)
{
  if (q->writer == -1)
    return;
  if (q->saved >= 0)
    dup2 (q->saved, 0);
  else
    close (0);
  close (q->writer);
  if (q->saved >= 0)
    close (q->saved);
}

static void
close_below (void)
{
  if (below) {
    below->finalize (below);
    nbdkit_next_context_close (below);
    below = NULL;
  }
}

/* The engine writes metadata in small pieces (an 8-byte L1 entry, a
 * 512-byte slice): a layer below that needs larger aligned requests
 * (S3's object size) must have nbdkit's blocksize filter in between,
 * which reads, modifies and writes whole blocks, with the locking that
 * needs.
 */
static int
check_block_size (void)
{
  uint32_t minimum, preferred, maximum;

  if (below->block_size (below, &minimum, &preferred, &maximum) == -1)
    return -1;
  if (minimum > 1) {
    nbdkit_error ("%s: the layer below needs requests in multiples of %"
                  PRIu32 " bytes: put --filter=blocksize after "
                  "--filter=qcow2", IMAGE_NAME, minimum);
    return -1;
  }
  return 0;
}

static int
new_io (struct qcow2_io **io)
{
  int r = qcow2_io_next_new (below,
                             thread_model == NBDKIT_THREAD_MODEL_PARALLEL
                             ? NULL : &serialise_lock, io);
  if (r < 0)
    nbdkit_error ("%s: cannot use the layer below: %s", IMAGE_NAME,
                  strerror (-r));
  return r;
}

/* Open the layer below and the image in it; with startup, first create
 * it if asked, and run the startup keys.  On failure the context stays
 * open: close_below.
 */
static int
open_image (bool startup, struct qcow2_image **image)
{
  struct qcow2_open_options opts;
  struct qcow2_io *io;
  int r;

  below = open_below (backend);
  if (!below) {
    nbdkit_error ("%s: cannot open the layer below", IMAGE_NAME);
    return -1;
  }
  if (check_block_size () == -1)
    return -1;
  if (startup && create_requested ()) {
    if (new_io (&io) < 0 ||
        create_image_io (io, IMAGE_NAME, serve_passphrase (),
                         backing_dir) == -1)
      return -1;
  }

  qcow2_open_options_init (&opts);
  serve_open_options (&opts);
  opts.filename = IMAGE_NAME;
  opts.backing_dir = backing_dir;
  if (!backing_dir)
    opts.follow_backing = false;
  if (!startup)
    opts.writable = false;     /* writable at the first write */
  if (new_io (&io) < 0)
    return -1;
  r = qcow2_open_io (io, &opts, image);
  if (r == -EPERM && !backing_dir)
    nbdkit_error ("%s: the files an image in another layer names are found "
                  "only in a local directory named with backing-dir=",
                  IMAGE_NAME);
  if (r < 0)
    return -1;
  if (startup && serve_startup (*image, IMAGE_NAME) == -1)
    return -1;
  return 0;
}

static int
qcow2_filter_get_ready (int model)
{
  struct qcow2_image *image = NULL;
  struct quiet_stdin q;
  int r;

  thread_model = model;
  quiet_stdin_begin (&q);
  r = open_image (true, &image);
  if (image)
    serve_detach ();          /* serve_startup attached it */
  close_below ();
  quiet_stdin_end (&q);
  return r;
}

static int
qcow2_filter_after_fork (nbdkit_backend *b)
{
  struct qcow2_image *image;

  (void) b;
  if (open_image (false, &image) == -1) {
    close_below ();
    return -1;
  }
  serve_attach (image);
  return 0;
}

static void
qcow2_filter_cleanup (nbdkit_backend *backend)
{
  (void) backend;
  serve_unload ();
  close_below ();
}

static void *
qcow2_filter_open (nbdkit_next_open *next, nbdkit_context *context,
                   int readonly, const char *exportname, int is_tls)
{
  (void) next; (void) context; (void) readonly; (void) is_tls;
  if (!below) {
    nbdkit_error ("%s: the layer below is not open", IMAGE_NAME);
    return NULL;
  }
  return serve_open (exportname);
}

static void
qcow2_filter_close (void *handle)
{
  serve_close (handle);
}

static int
qcow2_filter_list_exports (nbdkit_next_list_exports *next,
                           nbdkit_backend *nxdata, int readonly, int is_tls,
                           struct nbdkit_exports *exports)
{
  (void) next; (void) nxdata; (void) readonly; (void) is_tls;
  return serve_list_exports (exports);
}

static const char *
qcow2_filter_default_export (nbdkit_next_default_export *next,
                             nbdkit_backend *nxdata, int readonly,
                             int is_tls)
{
  (void) next; (void) nxdata; (void) readonly; (void) is_tls;
  return "";
}

static const char *
qcow2_filter_export_description (nbdkit_next *next, void *handle)
{
  (void) next;
  return serve_export_description (handle);
}

static int64_t
qcow2_filter_get_size (nbdkit_next *next, void *handle)
{
  (void) next;
  return serve_get_size (handle);
}

static int
qcow2_filter_block_size (nbdkit_next *next, void *handle, uint32_t *minimum,
                         uint32_t *preferred, uint32_t *maximum)
{
  (void) next; (void) handle;
  serve_block_size (minimum, preferred, maximum);
  return 0;
}

static int
qcow2_filter_can_write (nbdkit_next *next, void *handle)
{
  (void) next;
  return serve_can_write (handle);
}

static int
qcow2_filter_can_flush (nbdkit_next *next, void *handle)
{
  (void) next; (void) handle;
  return 1;
}

static int
qcow2_filter_is_rotational (nbdkit_next *next, void *handle)
{
  (void) next; (void) handle;
  return 0;
}

static int
qcow2_filter_can_trim (nbdkit_next *next, void *handle)
{
  (void) next;
  return serve_can_write (handle);
}

/* Native for every size: filters get no fallback (see the plugin). */
static int
qcow2_filter_can_zero (nbdkit_next *next, void *handle)
{
  (void) next;
  return serve_can_write (handle) ? NBDKIT_ZERO_NATIVE : NBDKIT_ZERO_NONE;
}

static int
qcow2_filter_can_fast_zero (nbdkit_next *next, void *handle)
{
  (void) next; (void) handle;
  return 1;
}

static int
qcow2_filter_can_extents (nbdkit_next *next, void *handle)
{
  (void) next; (void) handle;
  return 1;
}

/* The engine makes FUA writes durable with flushes of the layer below. */
static int
qcow2_filter_can_fua (nbdkit_next *next, void *handle)
{
  (void) next; (void) handle;
  return NBDKIT_FUA_NATIVE;
}

static int
qcow2_filter_can_multi_conn (nbdkit_next *next, void *handle)
{
  (void) next; (void) handle;
  return 1;
}

static int
qcow2_filter_can_cache (nbdkit_next *next, void *handle)
{
  (void) next; (void) handle;
  return NBDKIT_CACHE_NONE;
}

/* Engine errors are negative errnos; nbdkit wants -1 and *err. */
static int
report (int r, int *err)
{
  if (r < 0) {
    *err = -r;
    return -1;
  }
  return 0;
}

static int
qcow2_filter_pread (nbdkit_next *next, void *handle, void *buf,
                    uint32_t count, uint64_t offset, uint32_t flags,
                    int *err)
{
  (void) next; (void) flags;
  return report (serve_pread (handle, buf, count, offset), err);
}

static int
qcow2_filter_pwrite (nbdkit_next *next, void *handle, const void *buf,
                     uint32_t count, uint64_t offset, uint32_t flags,
                     int *err)
{
  (void) next;
  return report (serve_pwrite (handle, buf, count, offset,
                               flags & NBDKIT_FLAG_FUA), err);
}

static int
qcow2_filter_zero (nbdkit_next *next, void *handle, uint32_t count,
                   uint64_t offset, uint32_t flags, int *err)
{
  (void) next;
  return report (serve_zero (handle, count, offset,
                             flags & NBDKIT_FLAG_MAY_TRIM,
                             flags & NBDKIT_FLAG_FAST_ZERO,
                             flags & NBDKIT_FLAG_FUA), err);
}

static int
qcow2_filter_trim (nbdkit_next *next, void *handle, uint32_t count,
                   uint64_t offset, uint32_t flags, int *err)
{
  (void) next;
  return report (serve_trim (handle, count, offset,
                             flags & NBDKIT_FLAG_FUA), err);
}

static int
qcow2_filter_flush (nbdkit_next *next, void *handle, uint32_t flags,
                    int *err)
{
  (void) next; (void) flags;
  return report (serve_flush (handle), err);
}

static int
qcow2_filter_extents (nbdkit_next *next, void *handle, uint32_t count,
                      uint64_t offset, uint32_t flags,
                      struct nbdkit_extents *extents, int *err)
{
  (void) next;
  return report (serve_extents (handle, count, offset,
                                flags & NBDKIT_FLAG_REQ_ONE, extents), err);
}

static struct nbdkit_filter filter = {
  .name = "qcow2",
  .longname = "nbdkit qcow2 filter",
  .load = qcow2_filter_load,
  .unload = qcow2_filter_unload,
  .config = qcow2_filter_config,
  .config_complete = qcow2_filter_config_complete,
  .config_help = qcow2_filter_config_help,
  .get_ready = qcow2_filter_get_ready,
  .after_fork = qcow2_filter_after_fork,
  .cleanup = qcow2_filter_cleanup,
  .open = qcow2_filter_open,
  .close = qcow2_filter_close,
  .list_exports = qcow2_filter_list_exports,
  .default_export = qcow2_filter_default_export,
  .export_description = qcow2_filter_export_description,
  .get_size = qcow2_filter_get_size,
  .block_size = qcow2_filter_block_size,
  .can_write = qcow2_filter_can_write,
  .can_flush = qcow2_filter_can_flush,
  .is_rotational = qcow2_filter_is_rotational,
  .can_trim = qcow2_filter_can_trim,
  .can_zero = qcow2_filter_can_zero,
  .can_fast_zero = qcow2_filter_can_fast_zero,
  .can_extents = qcow2_filter_can_extents,
  .can_fua = qcow2_filter_can_fua,
  .can_multi_conn = qcow2_filter_can_multi_conn,
  .can_cache = qcow2_filter_can_cache,
  .pread = qcow2_filter_pread,
  .pwrite = qcow2_filter_pwrite,
  .zero = qcow2_filter_zero,
  .trim = qcow2_filter_trim,
  .flush = qcow2_filter_flush,
  .extents = qcow2_filter_extents,
};

NBDKIT_REGISTER_FILTER (filter)
