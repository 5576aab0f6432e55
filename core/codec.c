/* Decompression of compressed clusters (deflate, zstd) and per-thread
 * scratch buffers.
 *
 * Each thread keeps its own inflate stream, zstd context and scratch
 * buffers, created on first use and released when the thread exits, so
 * the read path allocates nothing per request and threads never contend.
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
#endif

#include "internal.h"
#include "util.h"

struct thread_codec {
  bool inflate_ready;
  z_stream inflate;
#if HAVE_ZSTD
  ZSTD_DCtx *zstd;
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

  if (t->inflate_ready)
    inflateEnd (&t->inflate);
#if HAVE_ZSTD
  ZSTD_freeDCtx (t->zstd);
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

static int
inflate_cluster (struct thread_codec *t, const void *in, size_t in_len,
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

bool
qcow2_have_zstd (void)
{
  return HAVE_ZSTD;
}
