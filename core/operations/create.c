/* Creating images, with the options of `qemu-img create -f qcow2` that make
 * sense for a server.
 *
 * A new image starts as a skeleton that is already a valid qcow2 file: the
 * header (cluster 0), a one-cluster refcount table (cluster 1) and the
 * first refcount block (cluster 2), counting those three clusters, with an
 * empty L1 table and size 0.  Everything else is done by the engine's own
 * write paths on the open skeleton, so creation shares their invariants:
 * the LUKS area is allocated like any cluster, and growing to the
 * requested size writes the L1 table as qcow2_resize always does.  A
 * failure part-way leaves a file that is at worst a valid image of the
 * wrong size, never a broken one; it is removed.
 *
 * An existing file is never replaced unless the caller says overwrite.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cache.h"
#include "config.h"
#include "crypt.h"
#include "internal.h"
#include "io.h"
#include "util.h"

#define V3_HEADER_LENGTH 112

void
qcow2_create_options_init (struct qcow2_create_options *o)
{
  memset (o, 0, sizeof *o);
  o->version = 3;
  o->cluster_size = 65536;
  o->refcount_bits = 16;
}

static int
validate (const struct qcow2_create_options *o)
{
  const char *why = NULL;

  if (o->cluster_size < 512 || o->cluster_size > (2u << 20) ||
      (o->cluster_size & (o->cluster_size - 1)))
    why = "cluster size must be a power of two from 512 to 2M";
  else if (o->refcount_bits < 1 || o->refcount_bits > 64 ||
           (o->refcount_bits & (o->refcount_bits - 1)))
    why = "refcount bits must be a power of two from 1 to 64";
  else if (o->version != 2 && o->version != 3)
    why = "compat must be 0.10 (v2) or 1.1 (v3)";
  else if (o->version == 2 &&
           (o->refcount_bits != 16 || o->lazy_refcounts || o->extended_l2 ||
            o->compression_type != QCOW2_COMPRESSION_DEFLATE ||
            o->data_file || o->encrypt))
    why = "compat=0.10 supports none of refcount bits other than 16, lazy "
          "refcounts, extended L2, zstd, data files, encryption";
  else if (o->extended_l2 && o->cluster_size < 16384)
    why = "Extended L2 entries are only supported with cluster sizes of at "
          "least 16384 bytes";
  else if (o->compression_type > QCOW2_COMPRESSION_ZSTD ||
           (o->compression_type == QCOW2_COMPRESSION_ZSTD && !HAVE_ZSTD))
    why = "unsupported compression type";
  else if (o->data_file_raw && !o->data_file)
    why = "data-file-raw requires a data file";
  else if (o->data_file_raw && o->backing_file)
    why = "data-file-raw cannot be used with a backing file";
  else if (o->preallocate_metadata && o->backing_file && !o->extended_l2)
    why = "Backing file and preallocation can only be used at the same "
          "time if extended_l2 is on";
  else if (o->encrypt && !o->passphrase)
    why = "encryption needs a passphrase";
  else if (o->backing_file && strlen (o->backing_file) > 1023)
    why = "backing file name too long";
  else if (o->size > INT64_MAX)
    why = "size too large";
  if (why) {
    qcow2_error ("%s: %s", o->filename, why);
    return -EINVAL;
  }
  return 0;
}

static unsigned
log2_of (uint64_t v)
{
  return (unsigned) __builtin_ctzll (v);
}

static size_t
put_extension (unsigned char *p, uint32_t magic, const void *data,
               uint32_t len)
{
  put_be32 (p + QCOW2_EXT_MAGIC, magic);
  put_be32 (p + QCOW2_EXT_LENGTH, len);
  memcpy (p + QCOW2_EXT_DATA, data, len);
  return QCOW2_EXT_DATA + ((len + 7u) & ~7u);
}

/* Cluster 0: the header, its extensions and the backing file name. */
static int
build_header (const struct qcow2_create_options *o, unsigned char *buf,
              uint64_t crypto_offset, uint64_t crypto_length)
{
  const uint64_t cs = o->cluster_size;
  uint64_t incompat = 0, compat = 0, autoclear = 0;
  size_t pos;

  memset (buf, 0, cs);
  put_be32 (buf + QCOW2_HDR_MAGIC, QCOW2_MAGIC);
  put_be32 (buf + QCOW2_HDR_VERSION, o->version);
  put_be32 (buf + QCOW2_HDR_CLUSTER_BITS, log2_of (cs));
  put_be32 (buf + QCOW2_HDR_CRYPT_METHOD,
            crypto_offset ? QCOW2_CRYPT_LUKS : QCOW2_CRYPT_NONE);
  /* refcount table: cluster 1 */
  put_be64 (buf + QCOW2_HDR_REFCOUNT_TABLE_OFFSET, cs);
  put_be32 (buf + QCOW2_HDR_REFCOUNT_TABLE_CLUSTERS, 1);
  if (o->version == 3) {
    if (o->data_file)
      incompat |= QCOW2_INCOMPAT_DATA_FILE;
    if (o->compression_type != QCOW2_COMPRESSION_DEFLATE)
      incompat |= QCOW2_INCOMPAT_COMPRESSION;
    if (o->extended_l2)
      incompat |= QCOW2_INCOMPAT_EXTL2;
    if (o->lazy_refcounts)
      compat |= QCOW2_COMPAT_LAZY_REFCOUNTS;
    if (o->data_file_raw)
      autoclear |= QCOW2_AUTOCLEAR_DATA_RAW;
    put_be64 (buf + QCOW2_HDR_INCOMPATIBLE_FEATURES, incompat);
    put_be64 (buf + QCOW2_HDR_COMPATIBLE_FEATURES, compat);
    put_be64 (buf + QCOW2_HDR_AUTOCLEAR_FEATURES, autoclear);
    put_be32 (buf + QCOW2_HDR_REFCOUNT_ORDER, log2_of (o->refcount_bits));
    put_be32 (buf + QCOW2_HDR_HEADER_LENGTH, V3_HEADER_LENGTH);
    buf[QCOW2_HDR_COMPRESSION_TYPE] = (unsigned char) o->compression_type;
    pos = V3_HEADER_LENGTH;
  }
  else
    pos = QCOW2_V2_HEADER_LENGTH;

  /* Extensions; the worst case (names of 1023 bytes) fits in 4 KiB, but
   * a 512-byte cluster can still overflow: check as we go.
   */
  size_t need = pos + 16 + 16 + 24 +
                (o->backing_format ? 8 + strlen (o->backing_format) + 8 : 0) +
                (o->data_file ? 8 + strlen (o->data_file) + 8 : 0) +
                (o->backing_file ? strlen (o->backing_file) : 0);
  if (need > cs) {
    qcow2_error ("%s: the header does not fit in one %" PRIu64
                 "-byte cluster (names too long)", o->filename, cs);
    return -EINVAL;
  }
  if (o->backing_format)
    pos += put_extension (buf + pos, QCOW2_EXT_BACKING_FORMAT,
                          o->backing_format,
                          (uint32_t) strlen (o->backing_format));
  if (o->data_file)
    pos += put_extension (buf + pos, QCOW2_EXT_DATA_FILE, o->data_file,
                          (uint32_t) strlen (o->data_file));
  if (crypto_offset) {
    unsigned char ext[QCOW2_EXT_CRYPTO_BYTES];
    put_be64 (ext + QCOW2_EXT_CRYPTO_OFFSET, crypto_offset);
    put_be64 (ext + QCOW2_EXT_CRYPTO_LENGTH, crypto_length);
    pos += put_extension (buf + pos, QCOW2_EXT_CRYPTO, ext, sizeof ext);
  }
  pos += 8;                                 /* end of extensions */
  if (o->backing_file) {
    size_t n = strlen (o->backing_file);
    put_be64 (buf + QCOW2_HDR_BACKING_FILE_OFFSET, pos);
    put_be32 (buf + QCOW2_HDR_BACKING_FILE_SIZE, (uint32_t) n);
    memcpy (buf + pos, o->backing_file, n);
  }
  return 0;
}

/* The size of what a new overlay sits on, when no size is given. */
static int
backing_size (const struct qcow2_create_options *o, uint64_t *size)
{
  struct qcow2_open_options bo;
  struct qcow2_image *b;
  char *path = o->backing_dir
               ? qcow2_resolve_path_within (NULL, o->backing_dir,
                                            o->backing_file, "backing file")
               : qcow2_resolve_path (o->filename, o->backing_file,
                                     "backing file");
  int r;

  if (!path)
    return -EINVAL;
  if (o->backing_format && strcmp (o->backing_format, "raw") == 0) {
    struct qcow2_io *io;
    r = qcow2_io_file_open (path, QCOW2_IO_READ_ONLY, &io);
    if (r == 0) {
      r = qcow2_io_get_size (io, size);
      qcow2_io_close (io);
    }
  }
  else {
    qcow2_open_options_init (&bo);
    bo.filename = path;
    bo.passphrase = o->passphrase;
    r = qcow2_open (&bo, &b);
    if (r == 0) {
      *size = qcow2_get_size (b);
      qcow2_close (b);
    }
  }
  if (r < 0)
    qcow2_error ("%s: cannot get the size of backing file %s", o->filename,
                 path);
  free (path);
  return r;
}

static int
write_skeleton (const struct qcow2_create_options *o, struct qcow2_io *io)
{
  const uint64_t cs = o->cluster_size;
  unsigned char *buf = calloc (3, cs);
  int r;

  if (!buf)
    return -ENOMEM;
  r = build_header (o, buf, 0, 0);
  if (r == 0) {
    /* Refcount table entry 0 -> block at cluster 2, which counts
     * clusters 0, 1 and 2.
     */
    put_be64 (buf + cs, 2 * cs);
    for (uint64_t c = 0; c < 3; c++) {
      uint64_t bit = c * o->refcount_bits;
      unsigned char *p = buf + 2 * cs + bit / 8;
      if (o->refcount_bits < 8)
        *p |= (unsigned char) (1u << (bit % 8));
      else
        p[o->refcount_bits / 8 - 1] = 1;     /* big-endian 1 */
    }
    r = qcow2_new_file_write_durable (io, buf, 3 * cs, 0);   /* rule 8 */
    if (r < 0)
      qcow2_error ("%s: cannot write the new image: %s", o->filename,
                   strerror (-r));
  }
  free (buf);
  return r;
}

/* Allocate and write the LUKS area, then rewrite the header to point at
 * it.  The image is not served yet, so cluster 0 can be rewritten whole.
 */
static int
add_encryption (const struct qcow2_create_options *o, struct qcow2_image *img)
{
  unsigned char *area = NULL, *hdr = NULL;
  struct qcow2_crypt *crypt = NULL;
  size_t area_len = 0;
  uint64_t offset;
  int r;

  struct qcow2_luks_params p = {
    .cipher_alg = o->encrypt_cipher_alg ? o->encrypt_cipher_alg : "aes-256",
    .cipher_mode = o->encrypt_cipher_mode ? o->encrypt_cipher_mode : "xts",
    .ivgen_alg = o->encrypt_ivgen_alg ? o->encrypt_ivgen_alg : "plain64",
    .ivgen_hash = o->encrypt_ivgen_hash_alg ? o->encrypt_ivgen_hash_alg
                                            : "sha256",
    .hash_alg = o->encrypt_hash_alg ? o->encrypt_hash_alg : "sha256",
    .iter_time_ms = o->encrypt_iter_time_ms ? o->encrypt_iter_time_ms : 2000,
  };

  r = qcow2_crypt_create_luks (&p, o->passphrase, &area, &area_len, &crypt);
  if (r < 0)
    return r;
  qcow2_writer_lock (img);
  r = qcow2_alloc_clusters (img, div_round_up (area_len, img->cluster_size),
                            &offset);
  if (r == 0)
    r = qcow2_sync_metadata (img);
  qcow2_writer_unlock (img);
  /* Rule 1 (the sync above), then rule 6: the LUKS area durable, then the
   * header that points at it.
   */
  if (r == 0)
    r = qcow2_meta_write_durable (img, QCOW2_RULE_HEADER_LAST, area,
                                  area_len, offset);
  hdr = malloc (img->cluster_size);
  if (r == 0 && !hdr)
    r = -ENOMEM;
  if (r == 0)
    r = build_header (o, hdr, offset, area_len);
  if (r == 0) {
    /* Keep the L1 geometry written so far. */
    put_be64 (hdr + QCOW2_HDR_SIZE, img->h.size);
    put_be32 (hdr + QCOW2_HDR_L1_SIZE, img->h.l1_size);
    put_be64 (hdr + QCOW2_HDR_L1_TABLE_OFFSET, img->h.l1_table_offset);
    r = qcow2_meta_write_durable (img, QCOW2_RULE_HEADER_LAST, hdr,
                                  img->cluster_size, 0);
  }
  if (r == 0) {
    img->crypt = crypt;
    crypt = NULL;
    img->h.crypt_method = QCOW2_CRYPT_LUKS;
    img->h.has_crypto_ext = true;
    img->h.crypto_offset = offset;
    img->h.crypto_length = area_len;
    qcow2_writer_lock (img);
    r = qcow2_overlap_add (img, offset, area_len, QCOW2_META_CRYPTO);
    qcow2_writer_unlock (img);
  }
  qcow2_crypt_free (crypt);
  free (area);
  free (hdr);
  return r;
}

/* preallocation=metadata: every guest cluster gets a host cluster (sparse
 * in the file, reading as zeros) and an owned L2 entry.
 */
static int
preallocate (struct qcow2_image *img)
{
  uint64_t clusters = div_round_up (img->h.size, img->cluster_size);
  /* With extended L2 the subclusters stay unallocated (bitmap 0), so a
   * backing file still shows through, as QEMU preallocates them.
   */
  const uint64_t bitmap = 0;
  int r = 0;

  for (uint64_t c = 0; r == 0 && c < clusters;) {
    uint64_t n = min_u64 (clusters - c, img->l2_entries);
    uint64_t host;
    if (img->external_data)
      host = c << img->cluster_bits;
    else {
      qcow2_writer_lock (img);
      r = qcow2_alloc_clusters (img, n, &host);
      qcow2_writer_unlock (img);
    }
    for (uint64_t i = 0; r == 0 && i < n; i++)
      r = qcow2_entry_publish (img, (c + i) << img->cluster_bits,
                               (host + (i << img->cluster_bits)) |
                               QCOW2_OFLAG_COPIED, bitmap, false);
    c += n;
  }
  return r;
}

/* Make the file (or the data file) long enough that every allocated
 * cluster reads back (as zeros).
 */
static int
extend (struct qcow2_io *io, uint64_t size)
{
  int fd = io->ops->fd ? io->ops->fd (io) : -1;
  uint64_t cur;
  int r = qcow2_io_get_size (io, &cur);

  if (r < 0)
    return r;
  if (cur >= size)
    return 0;
  if (fd < 0 || ftruncate (fd, (off_t) size) == -1)
    return fd < 0 ? -ENOTSUP : -errno;
  return 0;
}

static int
create_data_file (const struct qcow2_create_options *o, char **path_out)
{
  char *path = qcow2_resolve_path (o->filename, o->data_file, "data file");
  int fd;

  if (!path)
    return -EINVAL;
  fd = open (path, O_WRONLY | O_CREAT | O_CLOEXEC |
             (o->overwrite ? O_TRUNC : O_EXCL), 0644);
  if (fd == -1) {
    int e = errno;
    qcow2_error ("%s: cannot create data file %s: %s%s", o->filename, path,
                 strerror (e), e == EEXIST ? " (it exists; refusing to "
                 "replace it without overwrite)" : "");
    free (path);
    return -e;
  }
  close (fd);
  *path_out = path;
  return 0;
}

/* The image is created on io and its size (o->size) is final: make
 * the skeleton, open it and grow it with the engine's own paths.
 */
static int
build_image (const struct qcow2_create_options *o, struct qcow2_io *io)
{
  struct qcow2_open_options oo;
  struct qcow2_image *img;
  int r = write_skeleton (o, io);

  if (r < 0) {
    qcow2_io_close (io);
    return r;
  }
  qcow2_open_options_init (&oo);
  oo.filename = o->filename;
  oo.writable = true;
  oo.ignore_backing = true;      /* only metadata is written here */
  r = qcow2_open_io (io, &oo, &img);
  if (r < 0)
    return r;
  if (o->encrypt)
    r = add_encryption (o, img);
  if (r == 0)
    r = qcow2_resize (img, o->size);
  if (r == 0 && o->preallocate_metadata)
    r = preallocate (img);
  if (r == 0 && o->data_file && (o->data_file_raw || o->preallocate_metadata))
    r = extend (img->data_io, o->size);
  if (r == 0)
    r = qcow2_flush (img);
  if (r == 0 && !img->external_data && !qcow2_io_is_fixed_size (io))
    r = extend (img->io, qcow2_file_size (img));
  qcow2_close (img);
  return r;
}

/* Size and options settled as qemu-img create settles them. */
static int
settle_options (struct qcow2_create_options *o)
{
  int r;

  if (o->backing_file && o->size == 0) {
    r = backing_size (o, &o->size);
    if (r < 0)
      return r;
  }
  /* As qemu-img create: QEMU sees disks in whole 512-byte sectors. */
  o->size = (o->size + 511) & ~511ull;
  return validate (o);
}

int
qcow2_create_io (const struct qcow2_create_options *opts,
                 struct qcow2_io *io)
{
  struct qcow2_create_options o = *opts;
  unsigned char first[512];
  uint64_t size;
  int r;

  r = settle_options (&o);
  if (r == 0 && (o.data_file || o.preallocate_metadata)) {
    qcow2_error ("%s: an image in a container can have no external data "
                 "file and no preallocation", o.filename);
    r = -EINVAL;
  }
  if (r == 0 && (r = qcow2_io_get_size (io, &size)) < 0)
    qcow2_error ("%s: %s", o.filename, strerror (-r));
  if (r == 0 && size < 3ull * o.cluster_size) {
    qcow2_error ("%s: the container (%" PRIu64 " bytes) is too small for "
                 "an image", o.filename, size);
    r = -ENOSPC;
  }
  if (r == 0 && !o.overwrite) {
    r = qcow2_io_pread (io, first, sizeof first, 0);
    if (r < 0)
      qcow2_error ("%s: %s", o.filename, strerror (-r));
    else if (!is_zero (first, sizeof first)) {
      qcow2_error ("%s: the container is not empty (%s); refusing to "
                   "format it without overwrite", o.filename,
                   get_be32 (first) == QCOW2_MAGIC ? "it holds a qcow2 image"
                   : "its first sector holds data");
      r = -EEXIST;
    }
  }
  if (r < 0) {
    qcow2_io_close (io);
    return r;
  }
  return build_image (&o, io);
}

int
qcow2_create (const struct qcow2_create_options *opts)
{
  struct qcow2_create_options o = *opts;
  struct qcow2_io *io;
  char *data_path = NULL;
  int fd, r;

  r = settle_options (&o);
  if (r < 0)
    return r;

  fd = open (o.filename, O_RDWR | O_CREAT | O_CLOEXEC |
             (o.overwrite ? O_TRUNC : O_EXCL), 0644);
  if (fd == -1) {
    int e = errno;
    qcow2_error ("%s: cannot create the image: %s%s", o.filename,
                 strerror (e), e == EEXIST ? " (it exists; refusing to "
                 "replace it without overwrite)" : "");
    return -e;
  }
  close (fd);
  if (o.data_file)
    r = create_data_file (&o, &data_path);
  if (r == 0) {
    r = qcow2_io_file_open (o.filename, QCOW2_IO_READ_WRITE, &io);
    if (r < 0)
      qcow2_error ("%s: %s", o.filename, strerror (-r));
  }
  if (r == 0)
    r = build_image (&o, io);
  if (r < 0) {
    unlink (o.filename);
    if (data_path)
      unlink (data_path);
  }
  free (data_path);
  return r;
}
