/* Compression and decompression of compressed clusters (deflate, zstd)
 * and per-thread scratch buffers.
 *
 * Each thread keeps its own inflate and deflate streams, zstd contexts and
 * scratch buffers, created on first use and released when the thread
 * exits, so neither path allocates per request and threads never contend:
 * compressed writes on different threads compress in parallel.
 *
 * Format rules (qcow2.rst, QEMU block/qcow2-threads.c): deflate data is raw
 * (no zlib header) with a 4 KiB window; the stored length is only an upper
 * bound, so decoding stops as soon as one whole cluster has been produced,
 * and running out of input before that is an error.
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <zlib.h>

#include "config.h"
#if HAVE_ZSTD
#include <zstd.h>
#include <zstd_errors.h>
#endif
#if HAVE_LIBDEFLATE
#include <libdeflate.h>
#endif

#include "internal.h"
#include "util.h"

struct thread_codec {
#if HAVE_LIBDEFLATE
  struct libdeflate_decompressor *libdeflate;
#endif
  bool inflate_ready;
  z_stream inflate;
  bool deflate_ready;
  z_stream deflate;
#if HAVE_ZSTD
  ZSTD_DCtx *zstd;
  ZSTD_CCtx *zstd_c;
#endif
  void *scratch[SCRATCH_COUNT];
  size_t scratch_len[SCRATCH_COUNT];
};

static pthread_key_t codec_key;
static pthread_once_t codec_once = PTHREAD_ONCE_INIT;

static void
thread_codec_free (void *p)
{
  struct thread_codec *t = p;

#if HAVE_LIBDEFLATE
  if (t->libdeflate)
    libdeflate_free_decompressor (t->libdeflate);
#endif
  if (t->inflate_ready)
    inflateEnd (&t->inflate);
  if (t->deflate_ready)
    deflateEnd (&t->deflate);
#if HAVE_ZSTD
  ZSTD_freeDCtx (t->zstd);
  ZSTD_freeCCtx (t->zstd_c);
#endif
  for (int i = 0; i < SCRATCH_COUNT; i++)
    free (t->scratch[i]);
  free (t);
}

static void
codec_key_init (void)
{
  pthread_key_create (&codec_key, thread_codec_free);
}

static struct thread_codec *
thread_codec (void)
{
  struct thread_codec *t;

  pthread_once (&codec_once, codec_key_init);
  t = pthread_getspecific (codec_key);
  if (!t) {
    t = calloc (1, sizeof *t);
    if (t && pthread_setspecific (codec_key, t) != 0) {
      free (t);
      t = NULL;
    }
  }
  return t;
}

void *
qcow2_scratch (unsigned which, size_t len)
{
  struct thread_codec *t = thread_codec ();

  if (!t)
    return NULL;
  if (t->scratch_len[which] < len) {
    void *p = realloc (t->scratch[which], len);
    if (!p)
      return NULL;
    t->scratch[which] = p;
    t->scratch_len[which] = len;
  }
  return t->scratch[which];
}

/* zlib's inflate with QEMU's exact rules; see inflate_cluster. */
static int
zlib_inflate_cluster (struct thread_codec *t, const void *in, size_t in_len,
                      void *out, size_t out_len)
{
  z_stream *z = &t->inflate;
  int zr;

  if (!t->inflate_ready) {
    memset (z, 0, sizeof *z);
    if (inflateInit2 (z, -12) != Z_OK)
      return -ENOMEM;
    t->inflate_ready = true;
  }
  else if (inflateReset2 (z, -12) != Z_OK)
    return -EIO;

  z->next_in = (Bytef *) in;
  z->avail_in = (uInt) in_len;
  z->next_out = out;
  z->avail_out = (uInt) out_len;
  zr = inflate (z, Z_FINISH);
  /* Z_BUF_ERROR with a full output buffer is what the spare tail bytes
   * of the last sector produce: success, as in QEMU.
   */
  if ((zr == Z_STREAM_END || zr == Z_BUF_ERROR) && z->avail_out == 0)
    return 0;
  return -EIO;
}

/* libdeflate decodes two to three times as fast as zlib, which is most of
 * the cost of reading compressed clusters.  It succeeds only when the
 * stream ends having produced exactly out_len bytes, the case of every
 * cluster QEMU writes; anything else (a stream that runs past the cluster
 * or past its input, corrupt data) is handed to zlib, so that what
 * QEMU's rules accept or refuse is decided exactly as QEMU decides it.
 * One difference remains: libdeflate also accepts distances beyond the
 * 4 KiB window QEMU's zlib is opened with, so a stream that uses them
 * (QEMU never writes one) reads as its data where QEMU fails.
 */
static int
inflate_cluster (struct thread_codec *t, const void *in, size_t in_len,
                 void *out, size_t out_len)
{
#if HAVE_LIBDEFLATE
  if (!t->libdeflate)
    t->libdeflate = libdeflate_alloc_decompressor ();
  if (t->libdeflate &&
      libdeflate_deflate_decompress (t->libdeflate, in, in_len, out, out_len,
                                     NULL) == LIBDEFLATE_SUCCESS)
    return 0;
#endif
  return zlib_inflate_cluster (t, in, in_len, out, out_len);
}

#if HAVE_ZSTD
static int
zstd_cluster (struct thread_codec *t, const void *in, size_t in_len,
              void *out, size_t out_len)
{
  ZSTD_inBuffer ib = { in, in_len, 0 };
  ZSTD_outBuffer ob = { out, out_len, 0 };

  if (!t->zstd) {
    t->zstd = ZSTD_createDCtx ();
    if (!t->zstd)
      return -ENOMEM;
  }
  else
    ZSTD_DCtx_reset (t->zstd, ZSTD_reset_session_only);

  /* The stored length may include bytes of the next cluster; stop once
   * the output is full.
   */
  while (ob.pos < ob.size) {
    size_t last_in = ib.pos, last_out = ob.pos;
    size_t zr = ZSTD_decompressStream (t->zstd, &ob, &ib);
    if (ZSTD_isError (zr))
      return -EIO;
    if (zr == 0 && ob.pos < ob.size)
      return -EIO;            /* frame ended early */
    if (ib.pos == last_in && ob.pos == last_out)
      return -EIO;            /* no progress: input exhausted */
  }
  return 0;
}
#endif

int
qcow2_decompress (uint8_t compression_type, const void *in, size_t in_len,
                  void *out, size_t out_len)
{
  struct thread_codec *t = thread_codec ();

  if (!t)
    return -ENOMEM;
  switch (compression_type) {
  case QCOW2_COMPRESSION_DEFLATE:
    return inflate_cluster (t, in, in_len, out, out_len);
#if HAVE_ZSTD
  case QCOW2_COMPRESSION_ZSTD:
    return zstd_cluster (t, in, in_len, out, out_len);
#endif
  default:
    return -ENOTSUP;
  }
}

/* Compression, as QEMU's block/qcow2-threads.c writes compressed
 * clusters, so that what we write is what QEMU would: raw deflate (no
 * zlib header) with window bits -12, Z_DEFAULT_COMPRESSION and memLevel 9
 * (qcow2_compress); zstd at its default level, one ZSTD_compressStream2
 * call with ZSTD_e_end (qcow2_zstd_compress).  Both stop with -ENOSPC as
 * soon as the output would exceed out_cap, which is how a caller learns
 * that the cluster does not shrink.
 */
static int
deflate_cluster (struct thread_codec *t, const void *in, size_t in_len,
                 void *out, size_t out_cap, size_t *out_len)
{
  z_stream *z = &t->deflate;
  int zr;

  if (!t->deflate_ready) {
    memset (z, 0, sizeof *z);
    if (deflateInit2 (z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9,
                      Z_DEFAULT_STRATEGY) != Z_OK)
      return -ENOMEM;
    t->deflate_ready = true;
  }
  else if (deflateReset (z) != Z_OK)
    return -EIO;

  z->next_in = (Bytef *) in;
  z->avail_in = (uInt) in_len;
  z->next_out = out;
  z->avail_out = (uInt) out_cap;
  zr = deflate (z, Z_FINISH);
  if (zr == Z_STREAM_END) {
    *out_len = out_cap - z->avail_out;
    return 0;
  }
  /* Z_OK or Z_BUF_ERROR: the output is full before the end.  The stream
   * is left mid-way; deflateReset at the next call starts afresh.
   */
  return zr == Z_OK || zr == Z_BUF_ERROR ? -ENOSPC : -EIO;
}

#if HAVE_ZSTD
static int
zstd_compress_cluster (struct thread_codec *t, const void *in, size_t in_len,
                       void *out, size_t out_cap, size_t *out_len)
{
  ZSTD_inBuffer ib = { in, in_len, 0 };
  ZSTD_outBuffer ob = { out, out_cap, 0 };
  size_t zr;

  if (!t->zstd_c) {
    t->zstd_c = ZSTD_createCCtx ();
    if (!t->zstd_c)
      return -ENOMEM;
  }
  else
    ZSTD_CCtx_reset (t->zstd_c, ZSTD_reset_session_only);

  /* With ZSTD_e_end, one call either finishes the frame (returns 0) or
   * stops because the output is full (returns the bytes still to flush):
   * QEMU relies on this too, as the output cannot grow.
   */
  zr = ZSTD_compressStream2 (t->zstd_c, &ob, &ib, ZSTD_e_end);
  if (ZSTD_isError (zr))
    return ZSTD_getErrorCode (zr) == ZSTD_error_dstSize_tooSmall
           ? -ENOSPC : -EIO;
  if (zr != 0)
    return -ENOSPC;
  *out_len = ob.pos;
  return 0;
}
#endif

int
qcow2_compress (uint8_t compression_type, const void *in, size_t in_len,
                void *out, size_t out_cap, size_t *out_len)
{
  struct thread_codec *t = thread_codec ();

  if (!t)
    return -ENOMEM;
  switch (compression_type) {
  case QCOW2_COMPRESSION_DEFLATE:
    return deflate_cluster (t, in, in_len, out, out_cap, out_len);
#if HAVE_ZSTD
  case QCOW2_COMPRESSION_ZSTD:
    return zstd_compress_cluster (t, in, in_len, out, out_cap, out_len);
#endif
  default:
    return -ENOTSUP;
  }
}

bool
qcow2_have_zstd (void)
{
  return HAVE_ZSTD;
}

bool
qcow2_have_libdeflate (void)
{
  return HAVE_LIBDEFLATE;
}
