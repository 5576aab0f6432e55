/* Persistent dirty bitmaps, for a writer that does not maintain them.
 *
 * The spec lets such a writer clear the "bitmaps" autoclear bit, after
 * which QEMU ignores the bitmaps, but their clusters stay referenced by
 * nothing and `qemu-img check` reports them as leaks.  So before the first
 * write we release them properly: remove the bitmaps extension and clear
 * the bit in one header write, sync, and only then drop the refcounts of
 * the directory, the bitmap tables and their data clusters.  A crash in
 * between leaks those clusters, never more.  This leaves the image as
 * QEMU's own `qemu-img check -r leaks` would after an unaware writer.
 *
 * The directory is untrusted: entries are bounds-checked, and clusters
 * that do not look like ours are left alone (leaked) rather than freed.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "io.h"
#include "util.h"

#define DIR_ENTRY_BYTES 24

/* QEMU does not pad the file's last cluster, so a cluster only has to
 * start inside the file.
 */
static bool
our_cluster (const struct qcow2_image *img, uint64_t offset)
{
  return offset != 0 && is_aligned (offset, img->cluster_size) &&
         offset < img->file_size;
}

/* Queue the release of one bitmap's table and data clusters. */
static int
release_bitmap (struct qcow2_image *img, uint64_t table_offset,
                uint32_t table_size)
{
  uint64_t bytes = (uint64_t) table_size * 8;
  unsigned char *table;
  int r;

  if (table_size == 0 || !our_cluster (img, table_offset) ||
      range_exceeds (table_offset, bytes, img->file_size))
    return 0;
  table = malloc (bytes);
  if (!table)
    return -ENOMEM;
  r = qcow2_io_pread (img->io, table, bytes, table_offset);
  for (uint32_t i = 0; r == 0 && i < table_size; i++) {
    uint64_t data = get_be64 (table + i * 8) & QCOW2_L2E_OFFSET_MASK;
    if (our_cluster (img, data))
      r = qcow2_free_later (img, data, img->cluster_size);
  }
  if (r == 0)
    r = qcow2_free_later (img, table_offset,
                          div_round_up (bytes, img->cluster_size)
                          << img->cluster_bits);
  free (table);
  return r;
}

static int
release_directory (struct qcow2_image *img)
{
  uint64_t size = img->h.bitmap_directory_size;
  uint64_t offset = img->h.bitmap_directory_offset;
  unsigned char *dir;
  uint64_t pos = 0;
  int r;

  if (!our_cluster (img, offset) || range_exceeds (offset, size,
                                                   img->file_size))
    return 0;
  dir = malloc (size ? size : 1);
  if (!dir)
    return -ENOMEM;
  r = qcow2_io_pread (img->io, dir, size, offset);
  for (uint32_t n = 0; r == 0 && n < img->h.nb_bitmaps; n++) {
    if (pos + DIR_ENTRY_BYTES > size)
      break;
    uint64_t table_offset = get_be64 (dir + pos);
    uint32_t table_size = get_be32 (dir + pos + 8);
    uint16_t name_size = get_be16 (dir + pos + 18);
    uint32_t extra = get_be32 (dir + pos + 20);
    r = release_bitmap (img, table_offset, table_size);
    pos += (DIR_ENTRY_BYTES + (uint64_t) extra + name_size + 7) & ~7ull;
  }
  if (r == 0)
    r = qcow2_free_later (img, offset,
                          div_round_up (size, img->cluster_size)
                          << img->cluster_bits);
  free (dir);
  return r;
}

/* Rewrite the header without the bitmaps extension and with `autoclear`:
 * the later extensions move up, the freed bytes become zeros, and the
 * backing file name, which lies after the extension area, stays put.
 */
static int
drop_extension (struct qcow2_image *img, uint64_t autoclear)
{
  uint64_t end = img->h.backing_file_offset ? img->h.backing_file_offset
                                            : img->cluster_size;
  unsigned char *buf;
  uint64_t off;
  int r;

  end = min_u64 (end, img->file_size);
  buf = malloc (end);
  if (!buf)
    return -ENOMEM;
  r = qcow2_io_pread (img->io, buf, end, 0);
  for (off = img->h.header_length; r == 0 && off + 8 <= end;) {
    uint32_t magic = get_be32 (buf + off);
    uint64_t len = (get_be32 (buf + off + 4) + 7ull) & ~7ull;
    if (magic == QCOW2_EXT_END || off + 8 + len > end)
      break;
    if (magic == QCOW2_EXT_BITMAPS) {
      memmove (buf + off, buf + off + 8 + len, end - (off + 8 + len));
      memset (buf + end - (8 + len), 0, 8 + len);
      continue;
    }
    off += 8 + len;
  }
  put_be64 (buf + 88, autoclear);
  if (r == 0)
    r = qcow2_io_pwrite (img->io, buf, end, 0);
  if (r == 0)
    r = qcow2_io_flush (img->io);
  free (buf);
  return r;
}

int
qcow2_bitmaps_release (struct qcow2_image *img, uint64_t autoclear)
{
  int r;

  r = drop_extension (img, autoclear);
  if (r < 0) {
    qcow2_error ("%s: could not update the header: %s", img->filename,
                 strerror (-r));
    return r;
  }
  img->h.has_bitmaps_ext = false;
  img->h.autoclear_features = autoclear;
  pthread_mutex_lock (&img->w->lock);
  r = release_directory (img);
  if (r == 0)
    r = qcow2_sync_metadata (img);
  pthread_mutex_unlock (&img->w->lock);
  return r;
}
