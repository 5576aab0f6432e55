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

#define READ_WINDOW (8ull << 20)      /* virtual bytes read in full */
#define MAX_CHUNK (1u << 20)          /* largest single read */
#define MAX_SAMPLES 64                /* reads past the window, */
#define SAMPLE_LEN (64u << 10)        /* of at most this many bytes */
#define MAX_EXTENTS 100000            /* extents reported per call */
#define CACHE_SIZE (8u << 10)         /* tiny: evictions on every input */

/* PBKDF2 cost is under the image's control (QEMU and LUKS put no upper
 * bound on it); a real header may ask for millions of iterations, which
 * would make one input take minutes.  Such inputs teach the fuzzer
 * nothing about parsing, so they are skipped.
 */
#define MAX_FUZZ_ITERATIONS 1000

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

static void
discard_error (void *opaque, const char *message)
{
  (void) opaque;
  (void) message;
}

static uint32_t
be32 (const uint8_t *p)
{
  return (uint32_t) p[0] << 24 | (uint32_t) p[1] << 16 |
         (uint32_t) p[2] << 8 | p[3];
}

/* True if any LUKS header anywhere in the input asks for more PBKDF2
 * iterations than we are willing to spend.  Looking at every occurrence
 * of the magic, rather than parsing the qcow2 header to find the one the
 * engine will use, keeps this check trivially conservative.
 */
static bool
luks_too_slow (const uint8_t *data, size_t size)
{
  static const uint8_t magic[6] = { 'L', 'U', 'K', 'S', 0xba, 0xbe };
  const size_t phdr = 208 + 8 * 48;

  for (const uint8_t *p = data;
       (p = memmem (p, size - (size_t) (p - data), magic, sizeof magic));
       p++) {
    size_t avail = size - (size_t) (p - data);
    if (avail < phdr)
      break;
    if (be32 (p + 164) > MAX_FUZZ_ITERATIONS)       /* mk_digest_iter */
      return true;
    for (int i = 0; i < 8; i++)                    /* key slot iterations */
      if (be32 (p + 208 + i * 48 + 4) > MAX_FUZZ_ITERATIONS)
        return true;
  }
  return false;
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
  if (size >= 80 && be32 (data + 4) == 3 && (data[79] & 4))
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

  qcow2_close (img);
  return 0;
}
