/* nbdkit-qcow2-plugin: a thin adapter from nbdkit's plugin callbacks to
 * the qcow2 engine in core/, over a host file.
 *
 * Everything the plugin shares with nbdkit-qcow2-filter (keys, exports,
 * requests) is in adapter/serve.c; this file adds what is the plugin's
 * own: the image file (file=, the magic key), its external data file
 * (data-file=), QEMU's image locks (locking=), and opening the image in
 * .get_ready so that a bad image or a wrong passphrase is reported at
 * startup.
 */
#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "qcow2.h"
#include "serve.h"

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

/* Configuration, filled by .config. */
static char *filename;
static char *data_file;
static bool locking = true;

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
qcow2_plugin_load (void)
{
  qcow2_set_error_handler (report_error, NULL);
  qcow2_set_debug_handler (report_debug, NULL);
}

static void
qcow2_plugin_unload (void)
{
  serve_unload ();
  free (filename);
  free (data_file);
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
  if (strcmp (key, "locking") == 0) {
    int b = nbdkit_parse_bool (value);
    if (b == -1)
      return -1;
    locking = b;
    return 0;
  }
  int r = serve_config (key, value);
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
  SERVE_CONFIG_HELP_OPEN \
  "data-file=<FILENAME>   External data file, overriding the image's.\n" \
  "locking=false          Do not take QEMU-compatible image locks.\n" \
  SNAPSHOTS_CONFIG_HELP \
  BITMAPS_CONFIG_HELP \
  CREATE_CONFIG_HELP

static int
qcow2_plugin_get_ready (void)
{
  struct qcow2_open_options opts;
  struct qcow2_image *image;

  qcow2_open_options_init (&opts);
  serve_open_options (&opts);
  opts.filename = filename;
  if (create_image (filename, serve_passphrase (), data_file) == -1)
    return -1;
  /* A created image records its data file itself. */
  opts.data_file = create_requested () ? NULL : data_file;
  opts.lock = locking;
  if (qcow2_open (&opts, &image) < 0)
    return -1;
  return serve_startup (image, filename);
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

static void *
qcow2_plugin_open (int readonly)
{
  (void) readonly;
  return serve_open (nbdkit_export_name ());
}

static void
qcow2_plugin_close (void *handle)
{
  serve_close (handle);
}

static int
qcow2_plugin_list_exports (int readonly, int is_tls,
                           struct nbdkit_exports *exports)
{
  (void) readonly; (void) is_tls;
  return serve_list_exports (exports);
}

static const char *
qcow2_plugin_export_description (void *handle)
{
  return serve_export_description (handle);
}

static int64_t
qcow2_plugin_get_size (void *handle)
{
  return serve_get_size (handle);
}

static int
qcow2_plugin_block_size (void *handle, uint32_t *minimum, uint32_t *preferred,
                         uint32_t *maximum)
{
  (void) handle;
  serve_block_size (minimum, preferred, maximum);
  return 0;
}

static int
qcow2_plugin_can_write (void *handle)
{
  return serve_can_write (handle);
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
  return serve_can_write (handle);
}

/* Zeroing never falls back to nbdkit's emulation (broken for requests over
 * 64 MiB in 1.32.5): every zero request is handled natively, and only
 * FAST_ZERO requests fail with ENOTSUP.
 */
static int
qcow2_plugin_can_zero (void *handle)
{
  return serve_can_write (handle);
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
  (void) flags;
  return report (serve_pread (handle, buf, count, offset));
}

static int
qcow2_plugin_pwrite (void *handle, const void *buf, uint32_t count,
                     uint64_t offset, uint32_t flags)
{
  return report (serve_pwrite (handle, buf, count, offset,
                               flags & NBDKIT_FLAG_FUA));
}

static int
qcow2_plugin_zero (void *handle, uint32_t count, uint64_t offset,
                   uint32_t flags)
{
  return report (serve_zero (handle, count, offset,
                             flags & NBDKIT_FLAG_MAY_TRIM,
                             flags & NBDKIT_FLAG_FAST_ZERO,
                             flags & NBDKIT_FLAG_FUA));
}

static int
qcow2_plugin_trim (void *handle, uint32_t count, uint64_t offset,
                   uint32_t flags)
{
  return report (serve_trim (handle, count, offset,
                             flags & NBDKIT_FLAG_FUA));
}

static int
qcow2_plugin_flush (void *handle, uint32_t flags)
{
  (void) flags;
  return report (serve_flush (handle));
}

static int
qcow2_plugin_extents (void *handle, uint32_t count, uint64_t offset,
                      uint32_t flags, struct nbdkit_extents *extents)
{
  return report (serve_extents (handle, count, offset,
                                flags & NBDKIT_FLAG_REQ_ONE, extents));
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
