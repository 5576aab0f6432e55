/* Parse and validate the qcow2 header (cluster 0): the fixed fields, the
 * header extensions and the backing file name.
 *
 * Every number here comes from an untrusted file.  Once qcow2_header_read
 * succeeds, the rest of the engine may rely on:
 * - version is 2 or 3; cluster_bits in [9, 21] (>= 14 with extended L2);
 * - no unknown incompatible feature bit is set;
 * - the L1 table is cluster aligned, covers the virtual size, is at most
 *   32 MiB and lies inside the file;
 * - the refcount table is cluster aligned, non-empty, at most 8 MiB and
 *   inside the file; the snapshot table offset is aligned and its count
 *   at most 65536;
 * - every string extension is a NUL-terminated copy;
 * - the crypto extension, when present, is cluster aligned and inside the
 *   file, and crypt_method matches it.
 * Messages follow QEMU's wording where QEMU has one, so users can search.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "io.h"
#include "util.h"

static char *
copy_string (const unsigned char *p, size_t len)
{
  char *s = malloc (len + 1);

  if (s) {
    memcpy (s, p, len);
    s[len] = '\0';
  }
  return s;
}

/* Names of the incompatible feature bits in mask, for an error message:
 * from the image's own feature-name table where it has one, as QEMU does.
 */
static void
describe_features (const struct qcow2_header *h, uint64_t mask, char *buf,
                   size_t buflen)
{
  size_t used = 0;

  buf[0] = '\0';
  for (unsigned bit = 0; bit < 64 && used < buflen; bit++) {
    const char *name = NULL;

    if (!(mask & (1ull << bit)))
      continue;
    for (size_t i = 0; i < h->nb_feature_names; i++)
      if (h->feature_names[i].type == 0 && h->feature_names[i].bit == bit)
        name = h->feature_names[i].name;
    int n;
    if (name)
      n = snprintf (buf + used, buflen - used, "%s%s", used ? ", " : "",
                    name);
    else
      n = snprintf (buf + used, buflen - used,
                    "%sUnknown incompatible feature: %" PRIx64,
                    used ? ", " : "", (uint64_t) 1 << bit);
    if (n < 0)
      break;
    used += (size_t) n;
  }
}

static int
parse_extension (struct qcow2_header *h, uint64_t file_size,
                 uint32_t magic, const unsigned char *data, uint32_t len)
{
  switch (magic) {
  case QCOW2_EXT_BACKING_FORMAT:
    if (len >= 16) {
      qcow2_error ("backing format extension: length %" PRIu32
                   " too large", len);
      return -EINVAL;
    }
    free (h->backing_format);
    h->backing_format = copy_string (data, len);
    return h->backing_format ? 0 : -ENOMEM;

  case QCOW2_EXT_FEATURE_TABLE: {
    size_t n = len / 48;
    struct qcow2_feature_name *t = calloc (n ? n : 1, sizeof *t);
    if (!t)
      return -ENOMEM;
    for (size_t i = 0; i < n; i++) {
      t[i].type = data[i * 48];
      t[i].bit = data[i * 48 + 1];
      memcpy (t[i].name, data + i * 48 + 2, 46);
      t[i].name[46] = '\0';
    }
    free (h->feature_names);
    h->feature_names = t;
    h->nb_feature_names = n;
    return 0;
  }

  case QCOW2_EXT_CRYPTO:
    if (len != QCOW2_EXT_CRYPTO_BYTES) {
      qcow2_error ("CRYPTO header extension size %" PRIu32
                   ", but expected size 16", len);
      return -EINVAL;
    }
    h->has_crypto_ext = true;
    h->crypto_offset = get_be64 (data + QCOW2_EXT_CRYPTO_OFFSET);
    h->crypto_length = get_be64 (data + QCOW2_EXT_CRYPTO_LENGTH);
    if (!is_aligned (h->crypto_offset, 1ull << h->cluster_bits) ||
        h->crypto_offset == 0 ||
        range_exceeds (h->crypto_offset, h->crypto_length, file_size)) {
      qcow2_error ("CRYPTO header extension: invalid offset %#" PRIx64
                   " length %#" PRIx64 " (file size %#" PRIx64 ")",
                   h->crypto_offset, h->crypto_length, file_size);
      return -EINVAL;
    }
    return 0;

  case QCOW2_EXT_BITMAPS:
    if (len != QCOW2_EXT_BITMAPS_LENGTH) {
      qcow2_error ("bitmaps extension: invalid length %" PRIu32, len);
      return -EINVAL;
    }
    if (!(h->autoclear_features & QCOW2_AUTOCLEAR_BITMAPS))
      return 0; /* stale: ignored, as the spec says */
    h->nb_bitmaps = get_be32 (data + QCOW2_EXT_BITMAPS_NB);
    h->bitmap_directory_size = get_be64 (data + QCOW2_EXT_BITMAPS_DIR_SIZE);
    h->bitmap_directory_offset =
      get_be64 (data + QCOW2_EXT_BITMAPS_DIR_OFFSET);
    if (get_be32 (data + QCOW2_EXT_BITMAPS_RESERVED) != 0) {
      qcow2_error ("bitmaps extension: reserved field is not zero");
      return -EINVAL;
    }
    if (h->nb_bitmaps == 0 || h->nb_bitmaps > QCOW2_MAX_BITMAPS) {
      qcow2_error ("bitmaps extension: invalid number of bitmaps %" PRIu32,
                   h->nb_bitmaps);
      return -EINVAL;
    }
    if (h->bitmap_directory_size > QCOW2_MAX_BITMAP_DIR) {
      qcow2_error ("bitmaps extension: directory size %" PRIu64
                   " too large", h->bitmap_directory_size);
      return -EINVAL;
    }
    if (!is_aligned (h->bitmap_directory_offset, 1ull << h->cluster_bits)) {
      qcow2_error ("bitmaps extension: directory offset %#" PRIx64
                   " unaligned", h->bitmap_directory_offset);
      return -EINVAL;
    }
    h->has_bitmaps_ext = true;
    return 0;

  case QCOW2_EXT_DATA_FILE:
    free (h->data_file);
    h->data_file = copy_string (data, len);
    return h->data_file ? 0 : -ENOMEM;

  default: {
    struct qcow2_unknown_ext *v =
      realloc (h->unknown_exts, (h->nb_unknown_exts + 1) * sizeof *v);
    if (!v)
      return -ENOMEM;
    h->unknown_exts = v;
    v = &v[h->nb_unknown_exts];
    v->magic = magic;
    v->length = len;
    v->data = malloc (len ? len : 1);
    if (!v->data)
      return -ENOMEM;
    memcpy (v->data, data, len);
    h->nb_unknown_exts++;
    return 0;
  }
  }
}

/* Walk the extension area [start, end) of cluster 0 (buf holds avail
 * bytes of it).
 */
static int
parse_extensions (struct qcow2_header *h, uint64_t file_size,
                  const unsigned char *buf, size_t avail, uint64_t start,
                  uint64_t end)
{
  uint64_t off = start;

  while (off < end) {
    if (off + 8 > end) {
      qcow2_error ("Header extension too large");
      return -EINVAL;
    }
    if (off + 8 > avail) {
      qcow2_error ("header extensions run past the end of the file");
      return -EINVAL;
    }
    uint32_t magic = get_be32 (buf + off + QCOW2_EXT_MAGIC);
    uint32_t len = get_be32 (buf + off + QCOW2_EXT_LENGTH);
    off += QCOW2_EXT_DATA;
    if (len > end - off) {
      qcow2_error ("Header extension too large");
      return -EINVAL;
    }
    if (magic == QCOW2_EXT_END)
      return 0;
    if (off + len > avail) {
      qcow2_error ("header extension %#" PRIx32
                   " runs past the end of the file", magic);
      return -EINVAL;
    }
    int r = parse_extension (h, file_size, magic, buf + off, len);
    if (r < 0)
      return r;
    off += (len + 7ull) & ~7ull;
  }
  return 0;
}

static int
validate_tables (const struct qcow2_header *h, uint64_t file_size,
                 const char *filename)
{
  uint64_t cluster_size = 1ull << h->cluster_bits;
  unsigned entry_bytes = (h->incompatible_features & QCOW2_INCOMPAT_EXTL2)
                         ? 16 : 8;
  unsigned l2_bits = h->cluster_bits - (entry_bytes == 16 ? 4 : 3);
  uint64_t l1_needed = div_round_up (h->size,
                                     1ull << (h->cluster_bits + l2_bits));

  if ((uint64_t) h->l1_size * 8 > QCOW2_MAX_L1_BYTES) {
    qcow2_error ("%s: Active L1 table too large (l1_size %" PRIu32 ")", filename,
                 h->l1_size);
    return -EFBIG;
  }
  if (h->l1_size < l1_needed) {
    qcow2_error ("%s: L1 table is too small (l1_size %" PRIu32
                 ", virtual size %" PRIu64 " needs %" PRIu64 ")", filename,
                 h->l1_size, h->size, l1_needed);
    return -EINVAL;
  }
  if (h->l1_size > 0 &&
      (!is_aligned (h->l1_table_offset, cluster_size) ||
       h->l1_table_offset == 0)) {
    qcow2_error ("%s: Active L1 table offset invalid: %#" PRIx64, filename,
                 h->l1_table_offset);
    return -EINVAL;
  }
  if (h->l1_size > 0 &&
      range_exceeds (h->l1_table_offset, (uint64_t) h->l1_size * 8,
                     file_size)) {
    qcow2_error ("%s: L1 table at %#" PRIx64 " (%" PRIu32
                 " entries) extends past the end of the file (%" PRIu64
                 " bytes)", filename, h->l1_table_offset, h->l1_size, file_size);
    return -EINVAL;
  }

  if (h->refcount_table_clusters == 0) {
    qcow2_error ("%s: Image does not contain a reference count table", filename);
    return -EINVAL;
  }
  if ((uint64_t) h->refcount_table_clusters * cluster_size >
      QCOW2_MAX_REFTABLE_BYTES) {
    qcow2_error ("%s: Reference count table too large (%" PRIu32 " clusters)", filename,
                 h->refcount_table_clusters);
    return -EINVAL;
  }
  if (!is_aligned (h->refcount_table_offset, cluster_size) ||
      h->refcount_table_offset == 0) {
    qcow2_error ("%s: Reference count table offset invalid: %#" PRIx64, filename,
                 h->refcount_table_offset);
    return -EINVAL;
  }
  if (range_exceeds (h->refcount_table_offset,
                     (uint64_t) h->refcount_table_clusters * cluster_size,
                     file_size)) {
    qcow2_error ("%s: reference count table at %#" PRIx64
                 " extends past the end of the file (%" PRIu64 " bytes)", filename,
                 h->refcount_table_offset, file_size);
    return -EINVAL;
  }

  if (h->nb_snapshots > QCOW2_MAX_SNAPSHOTS) {
    qcow2_error ("%s: Snapshot table too large (%" PRIu32 " snapshots)", filename,
                 h->nb_snapshots);
    return -EFBIG;
  }
  if (h->nb_snapshots > 0 &&
      (!is_aligned (h->snapshots_offset, cluster_size) ||
       h->snapshots_offset == 0 || h->snapshots_offset >= file_size)) {
    qcow2_error ("%s: Snapshot table offset invalid: %#" PRIx64, filename,
                 h->snapshots_offset);
    return -EINVAL;
  }
  return 0;
}

int
qcow2_header_read (struct qcow2_io *io, uint64_t file_size,
                   const char *filename, struct qcow2_header *h)
{
  unsigned char fixed[QCOW2_V3_MIN_HEADER_LENGTH];
  unsigned char *buf = NULL;
  uint64_t cluster_size;
  size_t avail;
  int r;

  memset (h, 0, sizeof *h);
  if (file_size < QCOW2_V2_HEADER_LENGTH) {
    qcow2_error ("%s: file too short (%" PRIu64 " bytes) for a qcow2 image",
                 filename, file_size);
    return -EINVAL;
  }
  memset (fixed, 0, sizeof fixed);
  r = qcow2_io_pread (io, fixed, min_u64 (sizeof fixed, file_size), 0);
  if (r < 0) {
    qcow2_error ("%s: could not read the header: %s", filename,
                 strerror (-r));
    return r;
  }

  if (get_be32 (fixed + QCOW2_HDR_MAGIC) != QCOW2_MAGIC) {
    qcow2_error ("%s: Image is not in qcow2 format", filename);
    return -EINVAL;
  }
  h->version = get_be32 (fixed + QCOW2_HDR_VERSION);
  if (h->version != 2 && h->version != 3) {
    qcow2_error ("%s: Unsupported qcow2 version %" PRIu32, filename,
                 h->version);
    return -ENOTSUP;
  }
  h->backing_file_offset = get_be64 (fixed + QCOW2_HDR_BACKING_FILE_OFFSET);
  h->backing_file_size = get_be32 (fixed + QCOW2_HDR_BACKING_FILE_SIZE);
  h->cluster_bits = get_be32 (fixed + QCOW2_HDR_CLUSTER_BITS);
  h->size = get_be64 (fixed + QCOW2_HDR_SIZE);
  h->crypt_method = get_be32 (fixed + QCOW2_HDR_CRYPT_METHOD);
  h->l1_size = get_be32 (fixed + QCOW2_HDR_L1_SIZE);
  h->l1_table_offset = get_be64 (fixed + QCOW2_HDR_L1_TABLE_OFFSET);
  h->refcount_table_offset =
    get_be64 (fixed + QCOW2_HDR_REFCOUNT_TABLE_OFFSET);
  h->refcount_table_clusters =
    get_be32 (fixed + QCOW2_HDR_REFCOUNT_TABLE_CLUSTERS);
  h->nb_snapshots = get_be32 (fixed + QCOW2_HDR_NB_SNAPSHOTS);
  h->snapshots_offset = get_be64 (fixed + QCOW2_HDR_SNAPSHOTS_OFFSET);

  if (h->cluster_bits < QCOW2_MIN_CLUSTER_BITS ||
      h->cluster_bits > QCOW2_MAX_CLUSTER_BITS) {
    qcow2_error ("%s: Unsupported cluster size: 2^%" PRIu32, filename,
                 h->cluster_bits);
    return -EINVAL;
  }
  cluster_size = 1ull << h->cluster_bits;

  if (h->version == 2) {
    h->refcount_order = 4;
    h->header_length = QCOW2_V2_HEADER_LENGTH;
  }
  else {
    if (file_size < QCOW2_V3_MIN_HEADER_LENGTH) {
      qcow2_error ("%s: file too short for a qcow2 v3 header", filename);
      return -EINVAL;
    }
    h->incompatible_features =
      get_be64 (fixed + QCOW2_HDR_INCOMPATIBLE_FEATURES);
    h->compatible_features = get_be64 (fixed + QCOW2_HDR_COMPATIBLE_FEATURES);
    h->autoclear_features = get_be64 (fixed + QCOW2_HDR_AUTOCLEAR_FEATURES);
    h->refcount_order = get_be32 (fixed + QCOW2_HDR_REFCOUNT_ORDER);
    h->header_length = get_be32 (fixed + QCOW2_HDR_HEADER_LENGTH);
    if (h->header_length < QCOW2_V3_MIN_HEADER_LENGTH) {
      qcow2_error ("%s: qcow2 header too short (header_length %" PRIu32 ")",
                   filename, h->header_length);
      return -EINVAL;
    }
    if (h->header_length > cluster_size) {
      qcow2_error ("%s: qcow2 header exceeds cluster size (header_length %"
                   PRIu32 ")", filename, h->header_length);
      return -EINVAL;
    }
  }

  if (h->size > INT64_MAX) {
    qcow2_error ("%s: virtual size %" PRIu64 " too large", filename,
                 h->size);
    return -EFBIG;
  }
  if (h->refcount_order > 6) {
    qcow2_error ("%s: Reference count entry width too large; may not "
                 "exceed 64 bits (refcount_order %" PRIu32 ")", filename,
                 h->refcount_order);
    return -EINVAL;
  }
  if (h->crypt_method > QCOW2_CRYPT_LUKS) {
    qcow2_error ("%s: Unsupported encryption method: %" PRIu32, filename,
                 h->crypt_method);
    return -EINVAL;
  }
  if (h->incompatible_features & QCOW2_INCOMPAT_EXTL2 &&
      h->cluster_bits < QCOW2_MIN_EXTL2_CLUSTER_BITS) {
    qcow2_error ("%s: extended L2 entries need clusters of at least 16 KiB "
                 "(cluster size %" PRIu64 ")", filename, cluster_size);
    return -EINVAL;
  }

  /* The whole of cluster 0 that the file holds: extensions and the
   * backing file name live there.
   */
  avail = (size_t) min_u64 (cluster_size, file_size);
  buf = malloc (avail);
  if (!buf)
    return -ENOMEM;
  r = qcow2_io_pread (io, buf, avail, 0);
  if (r < 0) {
    qcow2_error ("%s: could not read the header: %s", filename,
                 strerror (-r));
    goto fail;
  }

  if (h->version == 3 && h->header_length > 104) {
    if (avail <= 104) {
      qcow2_error ("%s: header runs past the end of the file", filename);
      r = -EINVAL;
      goto fail;
    }
    h->compression_type = buf[QCOW2_HDR_COMPRESSION_TYPE];
  }

  if (h->backing_file_offset != 0) {
    if (h->backing_file_offset > cluster_size) {
      qcow2_error ("%s: Invalid backing file offset %#" PRIx64, filename,
                   h->backing_file_offset);
      r = -EINVAL;
      goto fail;
    }
    if (h->backing_file_size >
        min_u64 (QCOW2_MAX_BACKING_NAME,
                 cluster_size - h->backing_file_offset)) {
      qcow2_error ("%s: Backing file name too long (%" PRIu32 " bytes)",
                   filename, h->backing_file_size);
      r = -EINVAL;
      goto fail;
    }
  }

  r = parse_extensions (h, file_size, buf, avail, h->header_length,
                        h->backing_file_offset ? h->backing_file_offset
                                               : cluster_size);
  if (r < 0)
    goto fail;

  if (h->incompatible_features & ~QCOW2_INCOMPAT_KNOWN) {
    char names[512];
    describe_features (h, h->incompatible_features & ~QCOW2_INCOMPAT_KNOWN,
                       names, sizeof names);
    qcow2_error ("%s: Unsupported qcow2 feature(s): %s", filename, names);
    r = -ENOTSUP;
    goto fail;
  }

  if (h->compression_type > QCOW2_COMPRESSION_ZSTD) {
    qcow2_error ("%s: unknown compression type: %u", filename,
                 h->compression_type);
    r = -ENOTSUP;
    goto fail;
  }
  if ((h->compression_type != QCOW2_COMPRESSION_DEFLATE) !=
      !!(h->incompatible_features & QCOW2_INCOMPAT_COMPRESSION)) {
    qcow2_error ("%s: Compression type incompatible feature bit must %sbe "
                 "set", filename,
                 h->compression_type != QCOW2_COMPRESSION_DEFLATE ? ""
                                                                  : "not ");
    r = -EINVAL;
    goto fail;
  }

  if (h->backing_file_offset != 0 && h->backing_file_size > 0) {
    if (h->backing_file_offset + h->backing_file_size > avail) {
      qcow2_error ("%s: backing file name runs past the end of the file",
                   filename);
      r = -EINVAL;
      goto fail;
    }
    if (memchr (buf + h->backing_file_offset, '\0',
                h->backing_file_size)) {
      qcow2_error ("%s: backing file name contains a NUL byte", filename);
      r = -EINVAL;
      goto fail;
    }
    h->backing_file = copy_string (buf + h->backing_file_offset,
                                   h->backing_file_size);
    if (!h->backing_file) {
      r = -ENOMEM;
      goto fail;
    }
  }

  if (h->crypt_method == QCOW2_CRYPT_LUKS && !h->has_crypto_ext) {
    qcow2_error ("%s: LUKS encryption without a CRYPTO header extension",
                 filename);
    r = -EINVAL;
    goto fail;
  }
  if (h->crypt_method != QCOW2_CRYPT_LUKS && h->has_crypto_ext) {
    qcow2_error ("%s: CRYPTO header extension only expected with LUKS "
                 "encryption method", filename);
    r = -EINVAL;
    goto fail;
  }
  if (h->autoclear_features & QCOW2_AUTOCLEAR_DATA_RAW &&
      !(h->incompatible_features & QCOW2_INCOMPAT_DATA_FILE)) {
    qcow2_error ("%s: data-file-raw requires a data file", filename);
    r = -EINVAL;
    goto fail;
  }

  r = validate_tables (h, file_size, filename);
  if (r < 0)
    goto fail;

  free (buf);
  return 0;

 fail:
  free (buf);
  qcow2_header_free (h);
  return r;
}

void
qcow2_header_free (struct qcow2_header *h)
{
  free (h->backing_file);
  free (h->backing_format);
  free (h->data_file);
  free (h->feature_names);
  for (size_t i = 0; i < h->nb_unknown_exts; i++)
    free (h->unknown_exts[i].data);
  free (h->unknown_exts);
  memset (h, 0, sizeof *h);
}
