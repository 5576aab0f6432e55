/* nbdkit-qcow2
 * Copyright (C) 2026 the nbdkit-qcow2 authors
 * SPDX-License-Identifier: BSD-3-Clause (see LICENSE)
 */

/* libFuzzer target over the write side of the core: the input is copied
 * into a memory file (memfd), opened read-write through the file backend,
 * checked (qemu-img check's classes, without and then with repair), and
 * put through a fixed script of writes, zeroes, trims and flushes that
 * touch the first clusters, cluster and L2 boundaries and the end of the
 * disk, with reads in between, then snapshot create, apply and delete.
 * Hostile refcount tables, L1/L2 tables and snapshot tables then meet the
 * allocator, copy-on-write, the refcount updates and the snapshot
 * operations' walks over every table.
 *
 * Nothing is compared: with hostile metadata two guest clusters may share
 * a host cluster, so a write may legitimately show up elsewhere.  What is
 * checked is that nothing crashes, hangs, leaks or trips a sanitizer.
 *
 * Built with fuzz_image (tests/fuzz/meson.build); run with
 *   FUZZ_TARGET=fuzz_write tests/fuzz/run.sh SECONDS
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "qcow2.h"
#include "fuzz_common.h"

#define CACHE_SIZE (8u << 10)
#define BUF_SIZE (256u << 10)
/* Writes make the file grow; hostile refcount tables can make the
 * allocator pick clusters far away.  A memfd is sparse, but the file
 * size bounds how far the engine may go; cap it so one input cannot
 * spend the machine's memory.
 */
#define MAX_FILE_SIZE (1ull << 40)

static unsigned char *buf;


enum op_kind { OP_WRITE, OP_ZERO, OP_ZERO_TRIM, OP_ZERO_FAST, OP_TRIM,
               OP_READ, OP_FLUSH };

/* Offsets are in units of the cluster size c, plus a byte adjustment;
 * `from_end` counts back from the end of the disk.
 */
struct op {
  enum op_kind kind;
  bool from_end;
  int64_t clusters, bytes;      /* offset */
  int64_t len_clusters, len_bytes;
  bool fua;
};

static const struct op script[] = {
  { OP_WRITE, false, 0, 0, 1, 0, false },          /* first cluster */
  { OP_WRITE, false, 0, 3, 0, 1, false },          /* one byte */
  { OP_WRITE, false, 1, -100, 2, 0, true },        /* across clusters */
  { OP_READ, false, 0, 0, 4, 0, false },
  { OP_ZERO, false, 1, 0, 1, 0, false },
  { OP_ZERO_TRIM, false, 2, 0, 2, 0, false },
  { OP_ZERO_FAST, false, 0, 0, 3, 0, false },
  { OP_TRIM, false, 0, 0, 2, 0, false },
  { OP_FLUSH, false, 0, 0, 0, 0, false },
  { OP_WRITE, false, 5, 512, 0, 1024, false },     /* subclusters */
  { OP_WRITE, false, 2, 0, 3, 0, false },          /* over zeroed ones */
  { OP_WRITE, true, -1, 0, 1, 0, false },          /* last cluster */
  { OP_WRITE, true, 0, -1, 0, 1, true },           /* last byte */
  { OP_WRITE, false, 511, 0, 2, 0, false },        /* L2 boundaries */
  { OP_WRITE, false, 2047, 0, 2, 0, false },
  { OP_ZERO_TRIM, true, -3, 0, 3, 0, false },
  { OP_READ, true, -4, 0, 4, 0, false },
  { OP_FLUSH, false, 0, 0, 0, 0, false },
};

static void
run_op (struct qcow2_image *img, const struct op *op, uint64_t disk,
        uint64_t c)
{
  int64_t off = op->clusters * (int64_t) c + op->bytes;
  int64_t len = op->len_clusters * (int64_t) c + op->len_bytes;

  if (op->kind == OP_FLUSH) {
    qcow2_flush (img);
    return;
  }
  if (op->from_end)
    off += (int64_t) disk;
  /* Skip what does not fit the disk or the buffer. */
  if (off < 0 || len <= 0 || (uint64_t) len > BUF_SIZE ||
      (uint64_t) off > disk || (uint64_t) len > disk - (uint64_t) off)
    return;

  switch (op->kind) {
  case OP_WRITE:
    memset (buf, 0x5a ^ (int) (off & 0xff), (size_t) len);
    qcow2_write (img, buf, (uint64_t) len, (uint64_t) off, op->fua);
    break;
  case OP_ZERO:
    qcow2_zero (img, (uint64_t) len, (uint64_t) off, false, false, op->fua);
    break;
  case OP_ZERO_TRIM:
    qcow2_zero (img, (uint64_t) len, (uint64_t) off, true, false, op->fua);
    break;
  case OP_ZERO_FAST:
    qcow2_zero (img, (uint64_t) len, (uint64_t) off, true, true, op->fua);
    break;
  case OP_TRIM:
    qcow2_trim (img, (uint64_t) len, (uint64_t) off, op->fua);
    break;
  case OP_READ:
    qcow2_read (img, buf, (uint64_t) len, (uint64_t) off);
    break;
  case OP_FLUSH:
    break;
  }
}

static int
count_extent (void *opaque, uint64_t offset, uint64_t length, uint32_t flags)
{
  unsigned *n = opaque;

  (void) offset;
  (void) length;
  (void) flags;
  return ++*n >= 10000 ? -1 : 0;
}

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  struct qcow2_open_options opts;
  struct qcow2_check_result check;
  struct qcow2_image *img;
  char path[64];
  uint64_t disk, c;
  int fd;

  if (!buf) {
    qcow2_set_error_handler (discard_error, NULL);
    buf = malloc (BUF_SIZE);
    if (!buf)
      abort ();
  }
  if (luks_too_slow (data, size))
    return -1;
  /* An external data file would be opened by name: not here. */
  if (size >= 80 && fuzz_be32 (data + 4) == 3 && (data[79] & 4))
    return -1;

  fd = memfd_create ("fuzz-write", 0);
  if (fd < 0)
    abort ();
  if (write (fd, data, size) != (ssize_t) size)
    abort ();
  snprintf (path, sizeof path, "/proc/self/fd/%d", fd);

  qcow2_open_options_init (&opts);
  opts.filename = path;
  opts.writable = true;
  opts.follow_backing = false;
  opts.passphrase = "x";
  opts.cache_size = CACHE_SIZE;
  opts.lock = false;
  if (qcow2_open (&opts, &img) == 0) {
    disk = qcow2_get_size (img);
    c = qcow2_get_cluster_size (img);

    qcow2_check (img, false, &check);
    qcow2_check (img, true, &check);
    for (size_t i = 0; i < sizeof script / sizeof script[0]; i++) {
      off_t end = lseek (fd, 0, SEEK_END);
      if (end < 0 || (uint64_t) end > MAX_FILE_SIZE)
        break;
      run_op (img, &script[i], disk, c);
    }
    /* Snapshot operations over whatever snapshot table the input has:
     * take one, write, revert to the input's first, delete both.  (The
     * disk size may change with the revert: nothing is written after.)
     */
    if (lseek (fd, 0, SEEK_END) <= (off_t) MAX_FILE_SIZE) {
      char first[64] = "";
      if (qcow2_snapshot_count (img) > 0) {
        struct qcow2_snapshot_info sn;
        qcow2_snapshot_get_info (img, 0, &sn);
        snprintf (first, sizeof first, "%s", sn.id);
      }
      if (qcow2_snapshot_create (img, "fuzz") == 0)
        run_op (img, &script[0], disk, c);
      if (*first)
        qcow2_snapshot_apply (img, first);
      qcow2_snapshot_delete (img, "fuzz");
      if (*first)
        qcow2_snapshot_delete (img, first);
    }
    {
      unsigned n = 0;
      uint64_t len = disk < (64u << 20) ? disk : (64u << 20);
      if (len)
        qcow2_extents (img, 0, len, false, count_extent, &n);
    }
    /* Bitmap management over whatever directory the input has: add one,
     * write, clear and disable the input's first, remove the new one.
     * qcow2_close then stores them all.
     */
    if (lseek (fd, 0, SEEK_END) <= (off_t) MAX_FILE_SIZE) {
      char first[1024] = "";
      if (qcow2_bitmap_count (img) > 0) {
        struct qcow2_bitmap_info info;
        qcow2_bitmap_get_info (img, 0, &info);
        snprintf (first, sizeof first, "%s", info.name);
      }
      if (qcow2_bitmap_add (img, "fuzz", 4096) == 0)
        run_op (img, &script[0], qcow2_get_size (img), c);
      if (*first) {
        qcow2_bitmap_clear (img, first);
        qcow2_bitmap_set_enabled (img, first, false);
      }
      qcow2_bitmap_remove (img, "fuzz");
    }
    qcow2_check (img, false, &check);
    qcow2_close (img);
  }
  close (fd);
  return 0;
}
