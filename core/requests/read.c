/* The read path.
 *
 * Guest data goes straight from the host file into the caller's buffer: a
 * run of host-contiguous clusters is one pread, with no bounce buffer.
 * Bounce buffers remain only where the bytes on disk are not the bytes the
 * guest sees: compressed clusters (per-thread scratch) and the partial
 * sectors at the ends of an unaligned encrypted read (one sector on the
 * stack).  No lock is held during data I/O, except that reads of an
 * encrypted image hold their clusters' range locks shared (see
 * qcow2_read).
 */
#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include "crypt.h"
#include "internal.h"
#include "io.h"
#include "rangelock.h"
#include "util.h"

/* Read host bytes of guest data.  QEMU zero-fills reads past the end of an
 * external data file (it may be sparse and short); inside the image file a
 * cluster past the end is corruption.
 */
static int
read_host (struct qcow2_image *img, void *buf, uint64_t len, uint64_t host)
{
  int r;

  if (img->external_data) {
    uint64_t size = __atomic_load_n (&img->data_file_size, __ATOMIC_ACQUIRE);
    uint64_t n = host < size ? min_u64 (len, size - host) : 0;
    memset ((char *) buf + n, 0, len - n);
    if (n == 0)
      return 0;
    len = n;
  }
  else if (range_exceeds (host, len, qcow2_file_size (img))) {
    qcow2_error ("data cluster at host offset %#" PRIx64
                 " lies past the end of the file", host);
    return -EIO;
  }
  r = qcow2_io_pread (img->data_io, buf, len, host);
  if (r < 0)
    qcow2_error ("read of %" PRIu64 " bytes at host offset %#" PRIx64
                 " failed: %s", len, host, strerror (-r));
  return r;
}

/* Encrypted data: decrypt whole sectors in place in the caller's buffer;
 * partial sectors at either end go through a one-sector bounce buffer.
 * The IV sector number comes from the host offset (LUKS) or the guest
 * offset (legacy AES).
 */
static int
read_encrypted (struct qcow2_image *img, unsigned char *buf, uint64_t len,
                uint64_t host, uint64_t guest)
{
  const bool by_host = qcow2_crypt_iv_uses_host_offset (img->crypt);
  int r;

  while (len > 0) {
    uint64_t skip = host % QCOW2_CRYPT_SECTOR;
    uint64_t n;

    if (skip != 0 || len < QCOW2_CRYPT_SECTOR) {
      unsigned char sector[QCOW2_CRYPT_SECTOR];
      uint64_t base = host - skip;

      n = min_u64 (QCOW2_CRYPT_SECTOR - skip, len);
      r = read_host (img, sector, sizeof sector, base);
      if (r == 0)
        r = qcow2_crypt_decrypt (img->crypt,
                                 (by_host ? base : guest - skip) /
                                 QCOW2_CRYPT_SECTOR, sector, sizeof sector);
      if (r < 0)
        return r;
      memcpy (buf, sector + skip, n);
    }
    else {
      n = align_down (len, QCOW2_CRYPT_SECTOR);
      r = read_host (img, buf, n, host);
      if (r == 0)
        r = qcow2_crypt_decrypt (img->crypt,
                                 (by_host ? host : guest) /
                                 QCOW2_CRYPT_SECTOR, buf, n);
      if (r < 0)
        return r;
    }
    buf += n;
    len -= n;
    host += n;
    guest += n;
  }
  return 0;
}

/* Bytes [guest, guest + len) of one compressed cluster.  The descriptor
 * gives a byte offset and an upper bound of the compressed length, which
 * may run past the end of the file for the last cluster: clip it, and let
 * decompression fail if the data really is short.
 */
static int
read_compressed (struct qcow2_image *img, unsigned char *buf, uint64_t len,
                 uint64_t desc, uint64_t guest)
{
  uint64_t coffset, nsectors, csize;
  uint64_t in_cluster = guest & (img->cluster_size - 1);
  unsigned char *in, *out;
  int r;

  qcow2_compressed_extent (img, desc, &coffset, &nsectors);
  csize = nsectors * 512 - (coffset & 511);
  if (coffset == 0 || coffset >= qcow2_file_size (img)) {
    qcow2_error ("compressed cluster at guest offset %#" PRIx64
                 " has invalid host offset %#" PRIx64, guest - in_cluster,
                 coffset);
    return -EIO;
  }
  csize = min_u64 (csize, qcow2_file_size (img) - coffset);

  in = qcow2_scratch (SCRATCH_COMPRESSED, csize);
  out = len == img->cluster_size ? buf
        : qcow2_scratch (SCRATCH_CLUSTER, img->cluster_size);
  if (!in || !out)
    return -ENOMEM;
  r = qcow2_io_pread (img->io, in, csize, coffset);
  if (r == -EIO) {
    /* The last sector of the file's last compressed cluster may stop
     * short of the end of the file, which file_size (counting whole host
     * clusters once allocated) does not show: QEMU, and compressed_write.c, write
     * only the compressed bytes.  Read what there is and zero the rest,
     * as QEMU's file driver does at the end of the file.
     */
    uint64_t real;
    if (qcow2_io_get_size (img->io, &real) == 0 &&
        real > coffset && real - coffset < csize) {
      memset (in + (real - coffset), 0, csize - (real - coffset));
      r = qcow2_io_pread (img->io, in, real - coffset, coffset);
    }
  }
  if (r < 0) {
    qcow2_error ("read of compressed cluster at %#" PRIx64 " failed: %s",
                 coffset, strerror (-r));
    return r;
  }
  r = qcow2_decompress (img->h.compression_type, in, csize, out,
                        img->cluster_size);
  if (r < 0) {
    qcow2_error ("could not decompress the cluster at guest offset %#"
                 PRIx64 " (host offset %#" PRIx64 ")", guest - in_cluster,
                 coffset);
    return -EIO;
  }
  if (out != buf)
    memcpy (buf, out + in_cluster, len);
  return 0;
}

int
qcow2_read_backing (struct qcow2_image *img, void *buf, uint64_t len,
                    uint64_t offset)
{
  uint64_t n = offset < img->backing_size
               ? min_u64 (len, img->backing_size - offset) : 0;
  int r = 0;

  if (n > 0) {
    switch (img->backing_kind) {
    case BACKING_QCOW2:
      r = qcow2_read (img->backing, buf, n, offset);
      break;
    case BACKING_RAW:
      r = qcow2_io_pread (img->backing_raw, buf, n, offset);
      if (r < 0)
        qcow2_error ("read from the raw backing file failed: %s",
                     strerror (-r));
      break;
    case BACKING_NONE:
      n = 0;
      break;
    }
  }
  memset ((char *) buf + n, 0, len - n);
  return r;
}

int
qcow2_read_l1 (struct qcow2_image *img, const uint64_t *l1, uint32_t l1_size,
               void *buf, uint64_t len, uint64_t offset)
{
  unsigned char *p = buf;

  while (len > 0) {
    struct qcow2_run run;
    int r = qcow2_map (img, l1, l1_size, offset, len, &run);
    if (r < 0)
      return r;

    switch (run.kind) {
    case RUN_UNALLOCATED:
      r = qcow2_read_backing (img, p, run.length, offset);
      break;
    case RUN_ZERO_PLAIN:
    case RUN_ZERO_ALLOC:
      memset (p, 0, run.length);
      break;
    case RUN_DATA:
      r = img->crypt ? read_encrypted (img, p, run.length, run.host_offset,
                                       offset)
                     : read_host (img, p, run.length, run.host_offset);
      break;
    case RUN_COMPRESSED:
      r = read_compressed (img, p, run.length, run.host_offset, offset);
      break;
    }
    if (r < 0)
      return r;
    p += run.length;
    offset += run.length;
    len -= run.length;
  }
  return 0;
}

int
qcow2_read (struct qcow2_image *img, void *buf, uint64_t len,
            uint64_t offset)
{
  if (range_exceeds (offset, len, img->h.size)) {
    qcow2_error ("read of %" PRIu64 " bytes at %" PRIu64
                 " is beyond the end of the disk (%" PRIu64 " bytes)",
                 len, offset, img->h.size);
    return -EINVAL;
  }
  /* A write into part of an encrypted sector rewrites the whole sector
   * (write.c), holding its clusters exclusive.  A read that overlapped it
   * could see the sector half old and half new on the file, which
   * decrypts to garbage even in the bytes nobody wrote; so such reads
   * wait for it, as QEMU serialises them.  They lock whether or not the
   * image is writable yet: writing is enabled by the first write, which
   * may come while this read is under way.  Plain images need no lock:
   * their bytes are what the file holds, old or new.
   */
  if (img->crypt && len > 0) {
    uint64_t first, count;
    int r;

    qcow2_cluster_span (img, offset, len, &first, &count);
    qcow2_rangelock_lock (img->ranges, first, count, false);
    r = qcow2_read_l1 (img, img->l1, img->l1_size, buf, len, offset);
    qcow2_rangelock_unlock (img->ranges, first, count);
    return r;
  }
  return qcow2_read_l1 (img, img->l1, img->l1_size, buf, len, offset);
}
