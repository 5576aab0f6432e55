/* nbdkit-qcow2
 * Copyright (C) 2026 the nbdkit-qcow2 authors
 * SPDX-License-Identifier: BSD-3-Clause (see LICENSE)
 */

/* Just enough qcow2 for the encryption tests to find an image's LUKS area
 * and the host cluster behind one guest offset, parsed apart from core/
 * so that a mistake there cannot hide itself.  Every read is bounds-checked
 * by the io backend; the images are the tests' own (made by qemu-img or
 * the fixture script), so nothing else is.  Include after util.h and io.h.
 */
#ifndef QCOW2_TEST_IMAGE_INFO_H
#define QCOW2_TEST_IMAGE_INFO_H

#include <stdint.h>
#include <string.h>

#define QCOW2_LUKS_EXT 0x0537be77
#define L2_OFFSET_MASK UINT64_C (0x00fffffffffffe00)

struct image_info {
  uint32_t crypt_method;
  uint32_t cluster_size;
  uint64_t luks_offset, luks_length;  /* 0, 0: no LUKS header extension */
  uint64_t host_offset;               /* of the guest offset asked for;
                                       * 0: unallocated */
};

/* 0, or -1 if the file is not a version 3 qcow2 or a read fails, or the
 * guest offset's cluster is compressed (the tests never make one).
 */
static int __attribute__ ((unused))
read_image_info (struct qcow2_io *io, uint64_t guest, struct image_info *ii)
{
  unsigned char hdr[4096], e[8];
  uint32_t hdr_len, cluster_bits, l2_bits;
  uint64_t l1, l2, off;

  memset (ii, 0, sizeof *ii);
  if (qcow2_io_pread (io, hdr, sizeof hdr, 0) < 0 ||
      memcmp (hdr, "QFI\xfb", 4) != 0 || get_be32 (hdr + 4) != 3)
    return -1;
  cluster_bits = get_be32 (hdr + 20);
  if (cluster_bits < 9 || cluster_bits > 21)
    return -1;
  l2_bits = cluster_bits - 3;
  ii->cluster_size = UINT32_C (1) << cluster_bits;
  ii->crypt_method = get_be32 (hdr + 32);
  hdr_len = get_be32 (hdr + 100);

  /* Header extensions: be32 magic, be32 length, data padded to 8. */
  for (off = hdr_len; off + 8 <= sizeof hdr;) {
    uint32_t magic = get_be32 (hdr + off), len = get_be32 (hdr + off + 4);
    if (magic == 0)
      break;
    if (magic == QCOW2_LUKS_EXT && len >= 16 && off + 8 + 16 <= sizeof hdr) {
      ii->luks_offset = get_be64 (hdr + off + 8);
      ii->luks_length = get_be64 (hdr + off + 16);
    }
    off += 8 + ((uint64_t) len + 7) / 8 * 8;
  }

  /* L1 entry -> L2 table -> L2 entry. */
  if (qcow2_io_pread (io, e, 8, get_be64 (hdr + 40) +
                      8 * (guest >> (cluster_bits + l2_bits))) < 0)
    return -1;
  l1 = get_be64 (e) & L2_OFFSET_MASK;
  if (l1 == 0)
    return 0;
  if (qcow2_io_pread (io, e, 8, l1 + 8 * ((guest >> cluster_bits) &
                                          ((UINT64_C (1) << l2_bits) - 1)))
      < 0)
    return -1;
  l2 = get_be64 (e);
  if (l2 & (UINT64_C (1) << 62))
    return -1;
  ii->host_offset = l2 & L2_OFFSET_MASK;
  return 0;
}

#endif /* QCOW2_TEST_IMAGE_INFO_H */
