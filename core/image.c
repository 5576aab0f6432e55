/* Opening and closing images: the public entry points of the engine.
 *
 * Opening reads and validates the header, the active L1 table and the
 * snapshot table, unlocks encryption, opens the external data file and the
 * backing chain, and sizes the L2 cache.  After qcow2_image_open returns,
 * struct qcow2_image is immutable; every request only reads it.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "cache.h"
#include "crypt.h"
#include "internal.h"
#include "io.h"
#include "util.h"

/* QEMU's cap for the default L2 cache on Linux (docs/qcow2-cache.txt). */
#define DEFAULT_MAX_CACHE (32ull << 20)
/* Enough pinned slices for every worker thread of a busy server. */
#define MIN_CACHE_SLICES 64
#define MAX_SLICE_SIZE 4096

void
qcow2_open_options_init (struct qcow2_open_options *opts)
{
  memset (opts, 0, sizeof *opts);
  opts->follow_backing = true;
  opts->max_chain_depth = QCOW2_DEFAULT_MAX_CHAIN_DEPTH;
}

bool
qcow2_have_crypto (void)
{
  return HAVE_CRYPTO;
}

uint64_t
qcow2_get_size (const struct qcow2_image *img)
{
  return img->h.size;
}

uint32_t
qcow2_get_cluster_size (const struct qcow2_image *img)
{
  return (uint32_t) img->cluster_size;
}

bool
qcow2_is_encrypted (const struct qcow2_image *img)
{
  return img->crypt != NULL;
}

static void
derive_geometry (struct qcow2_image *img)
{
  const struct qcow2_header *h = &img->h;

  img->cluster_bits = h->cluster_bits;
  img->cluster_size = 1ull << h->cluster_bits;
  img->extended_l2 = h->incompatible_features & QCOW2_INCOMPAT_EXTL2;
  img->l2_entry_bytes = img->extended_l2 ? 16 : 8;
  img->l2_entries = img->cluster_size / img->l2_entry_bytes;
  img->subcluster_bits = img->extended_l2 ? h->cluster_bits - 5
                                          : h->cluster_bits;
  img->subcluster_size = 1ull << img->subcluster_bits;
  img->csize_shift = 62 - (h->cluster_bits - 8);
  img->csize_mask = (1ull << (h->cluster_bits - 8)) - 1;
  img->coffset_mask = (1ull << img->csize_shift) - 1;
  img->external_data = h->incompatible_features & QCOW2_INCOMPAT_DATA_FILE;
  img->slice_size = (uint32_t) min_u64 (img->cluster_size, MAX_SLICE_SIZE);
  img->slice_entries = img->slice_size / img->l2_entry_bytes;
}

static int
load_l1 (struct qcow2_image *img)
{
  size_t bytes = (size_t) img->h.l1_size * 8;
  int r;

  img->l1_size = img->h.l1_size;
  img->l1 = malloc (bytes ? bytes : 1);
  if (!img->l1)
    return -ENOMEM;
  if (bytes == 0)
    return 0;
  r = qcow2_io_pread (img->io, img->l1, bytes, img->h.l1_table_offset);
  if (r < 0) {
    qcow2_error ("%s: Could not read L1 table: %s", img->filename,
                 strerror (-r));
    return r;
  }
  for (uint32_t i = 0; i < img->l1_size; i++)
    img->l1[i] = get_be64 (&img->l1[i]);
  return 0;
}

static int
create_cache (struct qcow2_image *img, uint64_t cache_size)
{
  uint64_t slices;

  if (cache_size == 0) {
    /* Cover the whole disk if that fits under the cap. */
    uint64_t table_bytes = div_round_up (img->h.size, img->cluster_size) *
                           img->l2_entry_bytes;
    cache_size = min_u64 (table_bytes, DEFAULT_MAX_CACHE);
  }
  slices = cache_size / img->slice_size;
  if (slices < MIN_CACHE_SLICES)
    slices = MIN_CACHE_SLICES;
  img->l2_cache = qcow2_cache_new (img->io, img->slice_size, (size_t) slices);
  return img->l2_cache ? 0 : -ENOMEM;
}

static int
open_crypt (struct qcow2_image *img, const char *passphrase)
{
  int r;

  if (img->h.crypt_method == QCOW2_CRYPT_NONE)
    return 0;
  if (!HAVE_CRYPTO) {
    qcow2_error ("%s: the image is encrypted, and this build has no "
                 "encryption support", img->filename);
    return -ENOTSUP;
  }
  if (!passphrase) {
    qcow2_error ("%s: the image is encrypted: give its passphrase "
                 "(passphrase=)", img->filename);
    return -EPERM;
  }
  if (img->h.crypt_method == QCOW2_CRYPT_AES)
    r = qcow2_crypt_open_aes (passphrase, &img->crypt);
  else
    r = qcow2_crypt_open_luks (img->io, img->h.crypto_offset,
                               img->h.crypto_length, passphrase, &img->crypt);
  if (r < 0)
    qcow2_error ("%s: could not unlock the encrypted image", img->filename);
  return r;
}

static int
open_data_file (struct qcow2_image *img, const char *override)
{
  const char *name = override ? override : img->h.data_file;
  char *path;
  int r;

  img->data_io = img->io;
  img->data_file_size = img->file_size;
  if (!img->external_data) {
    if (override) {
      qcow2_error ("%s: data-file can only be set for images with an "
                   "external data file", img->filename);
      return -EINVAL;
    }
    return 0;
  }
  if (!name) {
    qcow2_error ("%s: the image uses an external data file but names none "
                 "(give one with data-file=)", img->filename);
    return -EINVAL;
  }
  /* A user's override is trusted as given; the image's own name is not. */
  path = override ? strdup (override)
                  : qcow2_resolve_path (img->filename, name, "data file");
  if (!path)
    return override ? -ENOMEM : -EPERM;
  r = qcow2_io_file_open (path, false, &img->data_io);
  if (r < 0) {
    img->data_io = img->io;
    qcow2_error ("%s: could not open data file %s: %s", img->filename, path,
                 strerror (-r));
  }
  else if ((r = qcow2_io_get_size (img->data_io, &img->data_file_size)) < 0)
    qcow2_error ("%s: %s: %s", img->filename, path, strerror (-r));
  free (path);
  return r;
}

int
qcow2_image_open (struct qcow2_io *io, const struct qcow2_open_options *opts,
                  const struct qcow2_chain *chain,
                  struct qcow2_image **image_out)
{
  struct qcow2_image *img;
  const char *filename = opts->filename ? opts->filename : "(memory)";
  int r;

  *image_out = NULL;
  img = calloc (1, sizeof *img);
  if (!img) {
    qcow2_io_close (io);
    return -ENOMEM;
  }
  img->io = io;
  img->data_io = io;
  img->filename = strdup (filename);
  img->realpath = chain->realpath ? strdup (chain->realpath) : NULL;
  if (!img->filename || (chain->realpath && !img->realpath)) {
    r = -ENOMEM;
    goto fail;
  }

  r = qcow2_io_get_size (io, &img->file_size);
  if (r < 0) {
    qcow2_error ("%s: %s", filename, strerror (-r));
    goto fail;
  }
  r = qcow2_header_read (io, img->file_size, filename, &img->h);
  if (r < 0)
    goto fail;
  derive_geometry (img);

  if (img->h.compression_type == QCOW2_COMPRESSION_ZSTD && !HAVE_ZSTD) {
    qcow2_error ("%s: the image uses zstd compression, and this build has "
                 "no zstd support", filename);
    r = -ENOTSUP;
    goto fail;
  }
  if (opts->writable) {
    qcow2_error ("%s: writing qcow2 images is not supported yet; open it "
                 "read-only", filename);
    r = -EROFS;
    goto fail;
  }

  if ((r = load_l1 (img)) < 0 ||
      (r = qcow2_snapshots_read (io, img->file_size, &img->h,
                                 &img->snapshots)) < 0)
    goto fail;
  img->nb_snapshots = img->h.nb_snapshots;

  if ((r = create_cache (img, opts->cache_size)) < 0 ||
      (r = open_crypt (img, opts->passphrase)) < 0 ||
      (r = open_data_file (img, opts->data_file)) < 0 ||
      (r = qcow2_backing_open (img, opts, chain)) < 0)
    goto fail;

  *image_out = img;
  return 0;

 fail:
  qcow2_close (img);
  return r;
}

int
qcow2_open_io (struct qcow2_io *io, const struct qcow2_open_options *opts,
               struct qcow2_image **image_out)
{
  struct qcow2_chain top = { NULL, NULL, 1 };
  return qcow2_image_open (io, opts, &top, image_out);
}

int
qcow2_open (const struct qcow2_open_options *opts,
            struct qcow2_image **image_out)
{
  struct qcow2_chain top = { NULL, NULL, 1 };
  struct qcow2_io *io;
  char *real;
  int r;

  *image_out = NULL;
  r = qcow2_io_file_open (opts->filename, opts->writable, &io);
  if (r < 0) {
    qcow2_error ("%s: %s", opts->filename, strerror (-r));
    return r;
  }
  real = realpath (opts->filename, NULL);
  top.realpath = real;
  r = qcow2_image_open (io, opts, &top, image_out);
  free (real);
  return r;
}

void
qcow2_close (struct qcow2_image *img)
{
  if (!img)
    return;
  qcow2_backing_close (img);
  if (img->data_io != img->io)
    qcow2_io_close (img->data_io);
  qcow2_crypt_free (img->crypt);
  qcow2_cache_free (img->l2_cache);
  qcow2_snapshots_free (img->snapshots, img->nb_snapshots);
  free (img->l1);
  qcow2_header_free (&img->h);
  qcow2_io_close (img->io);
  free (img->filename);
  free (img->realpath);
  free (img);
}
