/* nbdkit-qcow2-plugin: a thin adapter from nbdkit's callbacks to the qcow2
 * engine in core/.
 *
 * One image per server process, opened in .get_ready (so a bad image or a
 * wrong passphrase is reported at startup) and shared by every connection:
 * all state lives in the engine, so a completed request is visible on every
 * connection and multi-conn is safe.  Requests run fully in parallel; the
 * engine does its own locking.
 */
#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "qcow2.h"

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

/* Configuration, filled by .config. */
static char *filename;
static char *data_file;
static char *passphrase;
static bool follow_backing = true;
static unsigned max_chain_depth = QCOW2_DEFAULT_MAX_CHAIN_DEPTH;
static int64_t cache_size;

static struct qcow2_image *image;

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
    filename = nbdkit_realpath (value);
    return filename ? 0 : -1;
  }
  if (strcmp (key, "data-file") == 0) {
    free (data_file);
    data_file = nbdkit_realpath (value);
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
  if (strcmp (key, "cache-size") == 0) {
    cache_size = nbdkit_parse_size (value);
    return cache_size == -1 ? -1 : 0;
  }
  nbdkit_error ("unknown parameter '%s'", key);
  return -1;
}

static int
qcow2_plugin_config_complete (void)
{
  if (!filename) {
    nbdkit_error ("you must supply the file=<FILENAME> parameter "
                  "after the plugin name on the command line");
    return -1;
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
  "                       the whole disk, at most 32M)."

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
  opts.data_file = data_file;
  if (qcow2_open (&opts, &image) < 0)
    return -1;
  fprintf (stderr, "nbdkit-qcow2: serving %s read-only: this version "
           "cannot write qcow2 images yet\n", filename);
  return 0;
}

static void
qcow2_plugin_dump_plugin (void)
{
  printf ("qcow2_version=%s\n", PACKAGE_VERSION);
  printf ("qcow2_deflate=yes\n");
  printf ("qcow2_zstd=%s\n", qcow2_have_zstd () ? "yes" : "no");
  printf ("qcow2_crypto=%s\n", qcow2_have_crypto () ? "yes" : "no");
  printf ("qcow2_write=no\n");
}

static void *
qcow2_plugin_open (int readonly)
{
  (void) readonly;
  return image;
}

static int64_t
qcow2_plugin_get_size (void *handle)
{
  return (int64_t) qcow2_get_size (handle);
}

static int
qcow2_plugin_block_size (void *handle, uint32_t *minimum, uint32_t *preferred,
                  uint32_t *maximum)
{
  *minimum = 1;
  *preferred = qcow2_get_cluster_size (handle);
  if (*preferred < 4096)
    *preferred = 4096;
  *maximum = 0xffffffff;
  return 0;
}

static int
qcow2_plugin_can_write (void *handle)
{
  (void) handle;
  return 0;
}

static int
qcow2_plugin_can_multi_conn (void *handle)
{
  (void) handle;
  return 1;
}

static int
qcow2_plugin_pread (void *handle, void *buf, uint32_t count, uint64_t offset,
             uint32_t flags)
{
  (void) flags;
  int r = qcow2_read (handle, buf, count, offset);
  if (r < 0) {
    nbdkit_set_error (-r);
    return -1;
  }
  return 0;
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
  int r = qcow2_extents (handle, offset, count,
                         flags & NBDKIT_FLAG_REQ_ONE, add_extent, extents);
  if (r < 0) {
    nbdkit_set_error (-r);
    return -1;
  }
  return 0;
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
  .get_size = qcow2_plugin_get_size,
  .block_size = qcow2_plugin_block_size,
  .can_write = qcow2_plugin_can_write,
  .can_multi_conn = qcow2_plugin_can_multi_conn,
  .pread = qcow2_plugin_pread,
  .extents = qcow2_plugin_extents,
};

NBDKIT_REGISTER_PLUGIN (plugin)
