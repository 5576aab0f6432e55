/* nbdkit-qcow2
 * Copyright (C) 2026 the nbdkit-qcow2 authors
 * SPDX-License-Identifier: BSD-3-Clause (see LICENSE)
 */

/* libFuzzer target over the core: open the input as a qcow2 image in
 * memory, read the virtual disk and describe it with qcow2_extents.
 *
 * The image is opened with follow_backing = false and no data-file
 * override, so no input can make us open a file; with a passphrase, so LUKS
 * headers are parsed (legacy AES images open too).  Reads and extents are
 * bounded so that one input runs in milliseconds whatever sizes it claims:
 * the first READ_WINDOW bytes of the disk are read in mixed-size chunks,
 * and beyond that the start (up to SAMPLE_LEN bytes) of each allocated
 * extent, up to MAX_SAMPLES of them.
 *
 * Build: CC=clang meson setup build-fuzz -Dfuzzing=true \
 *          -Db_sanitize=address,undefined -Db_lundef=false
 * Run:   tests/fuzz/run.sh SECONDS
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "io.h"
#include "qcow2.h"
#include "fuzz_common.h"

#define READ_WINDOW (8ull << 20)      /* virtual bytes read in full */
#define MAX_CHUNK (1u << 20)          /* largest single read */
#define MAX_SAMPLES 64                /* reads past the window, */
#define SAMPLE_LEN (64u << 10)        /* of at most this many bytes */
#define MAX_EXTENTS 100000            /* extents reported per call */
#define CACHE_SIZE (8u << 10)         /* tiny: evictions on every input */

#define DATA_FILE_SIZE (1u << 20)

static unsigned char *buf;

/* Stand-in for external data files: an image with the data-file bit gets
 * this memory file as its data-file override (the image's own name is
 * never opened: follow_backing is off).
 */
static char data_file[64];

static void
make_data_file (void)
{
  int fd = memfd_create ("fuzz-data-file", 0);
  unsigned char *p;

  if (fd < 0 || ftruncate (fd, DATA_FILE_SIZE) < 0)
    abort ();
  p = mmap (NULL, DATA_FILE_SIZE, PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED)
    abort ();
  for (size_t i = 0; i < DATA_FILE_SIZE; i++)
    p[i] = (unsigned char) (i * 7 + (i >> 9));
  munmap (p, DATA_FILE_SIZE);
  snprintf (data_file, sizeof data_file, "/proc/self/fd/%d", fd);
}


static int
count_extent (void *opaque, uint64_t offset, uint64_t length, uint32_t flags)
{
  unsigned *n = opaque;

  (void) offset;
  (void) flags;
  if (length == 0)
    abort ();                   /* extents must make progress */
  return ++*n >= MAX_EXTENTS ? -1 : 0;
}

struct sampler {
  struct qcow2_image *img;
  uint64_t end;                 /* contiguity check */
  unsigned samples, calls;
  uint32_t cluster;
};

/* Past the read window: read the first cluster of each allocated extent. */
static int
sample_extent (void *opaque, uint64_t offset, uint64_t length, uint32_t flags)
{
  struct sampler *s = opaque;

  if (offset != s->end || length == 0)
    abort ();                   /* extents are ascending and contiguous */
  s->end = offset + length;
  if (++s->calls >= MAX_EXTENTS)
    return -1;
  if (!(flags & QCOW2_EXTENT_HOLE)) {
    uint64_t n = length < s->cluster ? length : s->cluster;
    if (n > SAMPLE_LEN)
      n = SAMPLE_LEN;
    qcow2_read (s->img, buf, n, offset);
    if (++s->samples >= MAX_SAMPLES)
      return -1;
  }
  return 0;
}

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  struct qcow2_open_options opts;
  struct qcow2_image *img;
  struct qcow2_io *io;
  uint64_t disk, window, off;
  unsigned step = 0;

  if (!buf) {
    qcow2_set_error_handler (discard_error, NULL);
    buf = malloc (MAX_CHUNK);
    if (!buf)
      abort ();
    make_data_file ();
  }
  if (luks_too_slow (data, size))
    return -1;                  /* do not add to the corpus */

  io = qcow2_io_mem_new (data, size);
  if (!io)
    return 0;
  qcow2_open_options_init (&opts);
  opts.filename = "fuzz.qcow2";
  opts.follow_backing = false;
  opts.passphrase = "x";
  opts.cache_size = CACHE_SIZE;
  /* v3 incompatible feature bit 2: external data file. */
  if (size >= 80 && fuzz_be32 (data + 4) == 3 && (data[79] & 4))
    opts.data_file = data_file;
  if (qcow2_open_io (io, &opts, &img) < 0)
    return 0;

  disk = qcow2_get_size (img);
  window = disk < READ_WINDOW ? disk : READ_WINDOW;

  /* The window, in chunks of varying size and alignment so reads start
   * and end inside clusters, subclusters and sectors.
   */
  static const uint32_t chunks[] = {
    MAX_CHUNK, 4096, 512, 1, 65536 + 333, 7, 131072, 1000,
  };
  for (off = 0; off < window; step++) {
    uint64_t n = chunks[step % (sizeof chunks / sizeof chunks[0])];
    if (n > window - off)
      n = window - off;
    qcow2_read (img, buf, n, off);
    off += n;
  }

  /* Extents over the window, with and without one_extent. */
  if (window > 0) {
    unsigned n = 0;
    qcow2_extents (img, 0, window, false, count_extent, &n);
    n = 0;
    qcow2_extents (img, window / 2, window - window / 2, true, count_extent,
                   &n);
  }

  /* Past the window: sample allocated extents. */
  if (disk > window) {
    struct sampler s = { img, window, 0, 0, qcow2_get_cluster_size (img) };
    qcow2_extents (img, window, disk - window, false, sample_extent, &s);
    /* Reads at the very end and out of range must behave too. */
    qcow2_read (img, buf, 1, disk - 1);
    if (qcow2_read (img, buf, 2, disk - 1) == 0)
      abort ();                 /* beyond the end of the disk */
  }

  /* Persistent bitmaps: their info and dirty maps over the window. */
  for (uint32_t i = 0; i < qcow2_bitmap_count (img); i++) {
    struct qcow2_bitmap_info info;
    unsigned n = 0;
    qcow2_bitmap_get_info (img, i, &info);
    if (window > 0)
      qcow2_bitmap_extents (img, i, 0, window, false, count_extent, &n);
  }

  qcow2_close (img);
  return 0;
}
