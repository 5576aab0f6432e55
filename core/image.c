/* Opening and closing images: the public entry points of the engine.
 *
 * Opening reads and validates the header, the active L1 table and the
 * snapshot table, unlocks encryption, opens the external data file and the
 * backing chain, and sizes the L2 cache.  After qcow2_image_open returns,
 * struct qcow2_image is immutable except for what writing changes (see
 * internal.h) and the writer state, whose READ_ONLY -> ENABLING ->
 * WRITABLE transitions are made here (qcow2_enable_write) and listed in
 * writer.c.
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
#include "image_lock.h"
#include "rangelock.h"
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

bool
qcow2_may_write (const struct qcow2_image *img)
{
  return !(img->h.incompatible_features & QCOW2_INCOMPAT_CORRUPT) &&
         !img->bitmaps.error &&
         qcow2_writer_state (img) != QCOW2_WRITER_BROKEN &&
         qcow2_io_is_writable (img->io) &&
         (img->data_io == img->io || qcow2_io_is_writable (img->data_io));
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
  img->l2_bits = h->cluster_bits +
                 (uint32_t) __builtin_ctzll (img->l2_entries);
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
  return r;   /* core/crypto said why, in one line */
}

/* The data file named by the image is a file the image makes us open, like
 * a backing file: with follow_backing off it is refused (only the user's
 * data-file= override is opened), or an untrusted image could name any
 * file the server can read (/etc/shadow...) and have it served as guest
 * data.
 */
static int
open_data_file (struct qcow2_image *img, const struct qcow2_open_options *opts,
                enum qcow2_io_mode mode)
{
  const char *override = opts->data_file;
  const bool follow_backing = opts->follow_backing;
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
  if (!override && !follow_backing) {
    qcow2_error ("%s: the image names an external data file (%s) but "
                 "following backing files is disabled (give data-file=)",
                 img->filename, name);
    return -EPERM;
  }
  /* A user's override is trusted as given; the image's own name is not. */
  path = override ? strdup (override)
         : opts->backing_dir
         ? qcow2_resolve_path_within (img->realpath ? img->filename : NULL,
                                      opts->backing_dir, name, "data file")
         : qcow2_resolve_path (img->filename, name, "data file");
  if (!path)
    return override ? -ENOMEM : -EPERM;
  r = qcow2_io_file_open (path, mode, &img->data_io);
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

/* QEMU-compatible locks on the image file and its data file, when the
 * user asked for them (lock_files).
 */
static int
take_locks (struct qcow2_image *img, bool writable)
{
  struct qcow2_io *ios[2] = { img->io, img->data_io };
  int r;

  if (!img->lock_files)
    return 0;
  for (int i = 0; i < (img->data_io != img->io ? 2 : 1); i++) {
    int fd = ios[i]->ops->fd ? ios[i]->ops->fd (ios[i]) : -1;
    if (fd >= 0 && (r = qcow2_lock_image (fd, writable, img->filename)) < 0)
      return r;
  }
  return 0;
}

/* Before a cache writes a slice back: never once the image is BROKEN
 * (writer.c), and never over metadata of another kind.
 */
static int
check_cache_write (struct qcow2_image *img, uint64_t offset, size_t len,
                   enum qcow2_metadata_kind kind)
{
  if (qcow2_writer_state (img) == QCOW2_WRITER_BROKEN)
    return -EIO;
  return qcow2_overlap_check (img, offset, len, kind);
}

static int
check_l2_write (void *img, uint64_t offset, size_t len)
{
  return check_cache_write (img, offset, len, QCOW2_META_L2);
}

static int
check_refblock_write (void *img, uint64_t offset, size_t len)
{
  return check_cache_write (img, offset, len, QCOW2_META_REFBLOCK);
}

static int
repair_dirty (struct qcow2_image *img)
{
  struct qcow2_check_result res;
  unsigned char field[8];
  int r = qcow2_check (img, true, &res);

  if (r == 0 && res.corruptions > res.corruptions_fixed)
    r = -EIO;
  if (r == 0) {
    /* Rule 7: the repaired refcounts are durable (check.c syncs). */
    put_be64 (field, img->h.incompatible_features & ~QCOW2_INCOMPAT_DIRTY);
    r = qcow2_meta_write_durable (img, QCOW2_RULE_IN_PLACE, field,
                                  sizeof field,
                                  QCOW2_HDR_INCOMPATIBLE_FEATURES);
  }
  if (r < 0) {
    qcow2_error ("%s: Could not repair dirty image", img->filename);
    return r;
  }
  img->h.incompatible_features &= ~QCOW2_INCOMPAT_DIRTY;
  return 0;
}

static void
free_writer (struct qcow2_image *img, struct qcow2_writer *w)
{
  struct qcow2_writer *saved = img->w;

  img->w = w;
  if (w->reftable || w->refblock_cache)
    qcow2_refcount_fini (img);
  qcow2_overlap_free (w->overlap);
  qcow2_cache_set_write_check (img->l2_cache, NULL, NULL);
  pthread_mutex_destroy (&w->lock);
  qcow2_flusher_fini (&w->flusher);
  free (w);
  img->w = saved == w ? NULL : saved;
}

/* READ_ONLY -> ENABLING -> WRITABLE (writer.c); on failure back to
 * READ_ONLY, or BROKEN if a metadata write failed on the way.
 */
int
qcow2_enable_write (struct qcow2_image *img)
{
  struct qcow2_writer *w;
  uint64_t autoclear;
  int r;

  switch (qcow2_writer_state (img)) {
  case QCOW2_WRITER_WRITABLE:
    return 0;
  case QCOW2_WRITER_BROKEN:
    return qcow2_writer_refuse_broken (img);
  case QCOW2_WRITER_ENABLING:
    assert (!"qcow2_enable_write: callers serialise calls");
    return -EBUSY;
  case QCOW2_WRITER_READ_ONLY:
    break;
  }
  assert (img->w == NULL);
  if (img->h.incompatible_features & QCOW2_INCOMPAT_CORRUPT) {
    qcow2_error ("%s: Image is corrupt; cannot be opened read/write",
                 img->filename);
    return -EACCES;
  }
  if (!qcow2_io_is_writable (img->io) ||
      (img->data_io != img->io && !qcow2_io_is_writable (img->data_io))) {
    qcow2_error ("%s: the image (or its data file) cannot be opened for "
                 "writing", img->filename);
    return -EROFS;
  }
  r = take_locks (img, true);
  if (r < 0)
    goto relock;

  w = calloc (1, sizeof *w);
  if (!w) {
    r = -ENOMEM;
    goto relock;
  }
  pthread_mutex_init (&w->lock, NULL);
  qcow2_flusher_init (&w->flusher);
  qcow2_writer_transition (img, QCOW2_WRITER_ENABLING);
  img->w = w;
  qcow2_writer_lock (img);
  r = qcow2_refcount_init (img);
  if (r == 0)
    r = qcow2_overlap_init (img);
  qcow2_writer_unlock (img);
  if (r < 0)
    goto fail;
  qcow2_cache_set_write_check (img->l2_cache, check_l2_write, img);
  qcow2_cache_set_write_check (w->refblock_cache, check_refblock_write, img);

  /* Refcounts of a dirty image may be stale (lazy refcounts, or a crash
   * while they were deferred): repair them, then clear the bit, as QEMU
   * does on a read-write open.
   */
  if (img->h.incompatible_features & QCOW2_INCOMPAT_DIRTY) {
    r = repair_dirty (img);
    if (r < 0)
      goto fail;
  }

  /* Autoclear bits we do not maintain must be cleared before the first
   * write (spec).  Bitmaps we maintain: claiming them sets in_use and
   * keeps the bitmaps bit (bitmap_store.c).
   */
  autoclear = img->h.autoclear_features & QCOW2_AUTOCLEAR_DATA_RAW;
  if (img->h.has_bitmaps_ext) {
    r = qcow2_bitmaps_claim (img, autoclear);
    if (r < 0)
      goto fail;
  }
  else if (img->h.version >= 3 && autoclear != img->h.autoclear_features) {
    unsigned char field[8];
    put_be64 (field, autoclear);
    r = qcow2_meta_write_durable (img, QCOW2_RULE_IN_PLACE, field,
                                  sizeof field, QCOW2_HDR_AUTOCLEAR_FEATURES);
    if (r < 0)
      goto fail;   /* the image is BROKEN (durable.c) */
    img->h.autoclear_features = autoclear;
  }
  /* Only now may requests write. */
  qcow2_writer_transition (img, QCOW2_WRITER_WRITABLE);
  return 0;

 fail:
  img->w = NULL;
  free_writer (img, w);
  /* Unless a metadata write failed on the way (BROKEN, which stays), a
   * later call may try again.
   */
  if (qcow2_writer_state (img) == QCOW2_WRITER_ENABLING)
    qcow2_writer_transition (img, QCOW2_WRITER_READ_ONLY);
 relock:
  /* Back to a reader's locks (QEMU's abort step), so other readers may
   * open the image again; a failed upgrade may have dropped them all.
   */
  (void) take_locks (img, false);
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
  pthread_mutex_init (&img->state_lock, NULL);
  img->state = QCOW2_WRITER_READ_ONLY;
  img->lock_files = opts->lock;
  img->io = io;
  img->data_io = io;
  img->filename = strdup (filename);
  img->realpath = chain->realpath ? strdup (chain->realpath) : NULL;
  img->ranges = qcow2_rangelock_new ();
  if (!img->filename || (chain->realpath && !img->realpath) || !img->ranges) {
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

  if ((r = load_l1 (img)) < 0 ||
      (r = qcow2_snapshots_read (io, img->file_size, &img->h,
                                 &img->snapshots,
                                 &img->snapshot_table_bytes)) < 0)
    goto fail;
  img->nb_snapshots = img->h.nb_snapshots;
  /* Bitmaps belong to the image written: the top one. */
  if (chain->depth == 1 && (r = qcow2_bitmaps_load (img)) < 0)
    goto fail;

  if ((r = create_cache (img, opts->cache_size)) < 0 ||
      (r = open_crypt (img, opts->passphrase)) < 0 ||
      (r = open_data_file (img, opts,
                           chain->depth == 1 ? QCOW2_IO_PREFER_WRITE
                                             : QCOW2_IO_READ_ONLY)) < 0 ||
      (r = take_locks (img, false)) < 0 ||
      (r = qcow2_backing_open (img, opts, chain)) < 0)
    goto fail;
  if (opts->writable && (r = qcow2_enable_write (img)) < 0)
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
  r = qcow2_io_file_open (opts->filename,
                          opts->writable ? QCOW2_IO_READ_WRITE
                                         : QCOW2_IO_PREFER_WRITE, &io);
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
  /* A BROKEN image gets no more writes: what is on disk stays as the
   * failure left it, for the next open (and qemu-img check) to judge.
   */
  if (img->w && qcow2_writer_state (img) != QCOW2_WRITER_BROKEN) {
    /* Bitmaps are stored with in_use cleared; a failure leaves in_use
     * set, which QEMU treats as inconsistent: safe.
     */
    qcow2_bitmaps_store (img, true);
    /* Two syncs: the second writes the refcount decrements that the
     * first applied.  Failures were reported; nothing more to do.
     */
    qcow2_writer_lock (img);
    if (qcow2_sync_metadata (img) == 0)
      qcow2_sync_metadata (img);
    qcow2_writer_unlock (img);
  }
  if (img->w)
    free_writer (img, img->w);
  qcow2_backing_close (img);
  if (img->data_io != img->io)
    qcow2_io_close (img->data_io);
  qcow2_crypt_free (img->crypt);
  qcow2_rangelock_free (img->ranges);
  qcow2_cache_free (img->l2_cache);
  qcow2_snapshots_free (img->snapshots, img->nb_snapshots);
  qcow2_bitmaps_free (img);
  free (img->l1);
  qcow2_header_free (&img->h);
  qcow2_io_close (img->io);
  free (img->filename);
  free (img->realpath);
  pthread_mutex_destroy (&img->state_lock);
  free (img);
}
