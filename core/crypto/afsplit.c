/* nbdkit-qcow2
 * Copyright (C) 2026 the nbdkit-qcow2 authors
 * SPDX-License-Identifier: BSD-3-Clause (see LICENSE)
 */

/* The LUKS anti-forensic splitter (QEMU: crypto/afsplit.c): a key of
 * `block` bytes is stored as `stripes` blocks that must all be intact to
 * recover it, each step chained through a hash diffusion, so that wiping
 * any part of the material destroys the key.
 */
#include <stdint.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include "cipher.h"
#include "luks.h"
#include "util.h"

/* The LUKS hash diffusion: each digest-sized chunk i of buf (the last one
 * possibly short) is replaced by the first bytes of H(be32(i) || chunk).
 */
static int
af_diffuse (EVP_MD_CTX *mctx, const EVP_MD *md, unsigned char *buf,
            size_t len)
{
  size_t dlen = (size_t) EVP_MD_get_size (md);
  unsigned char h[EVP_MAX_MD_SIZE];
  unsigned char be[4];

  for (size_t off = 0, i = 0; off < len; off += dlen, i++) {
    size_t n = min_u64 (dlen, len - off);
    put_be32 (be, (uint32_t) i);
    if (EVP_DigestInit_ex (mctx, md, NULL) != 1 ||
        EVP_DigestUpdate (mctx, be, sizeof be) != 1 ||
        EVP_DigestUpdate (mctx, buf + off, n) != 1 ||
        EVP_DigestFinal_ex (mctx, h, NULL) != 1)
      return qcow2_crypt_openssl_fail ("LUKS: AF hash failed");
    memcpy (buf + off, h, n);
  }
  OPENSSL_cleanse (h, sizeof h);
  return 0;
}

/* d = D(...D(D(s0) ^ s1)...) over the first stripes - 1 blocks of
 * `block` bytes at src: what the last block is XORed with, to merge as
 * to split.
 */
static int
af_chain (const EVP_MD *md, const unsigned char *src, size_t block,
          uint32_t stripes, unsigned char d[MAX_KEY])
{
  EVP_MD_CTX *mctx = EVP_MD_CTX_new ();
  int r = 0;

  memset (d, 0, MAX_KEY);
  if (!mctx)
    return qcow2_crypt_openssl_fail ("LUKS: cannot create hash context");
  for (uint32_t s = 0; r == 0 && s + 1 < stripes; s++) {
    for (size_t i = 0; i < block; i++)
      d[i] ^= src[(size_t) s * block + i];
    r = af_diffuse (mctx, md, d, block);
  }
  EVP_MD_CTX_free (mctx);
  return r;
}

/* out = af_chain(src) ^ s[n-1]. */
int
qcow2_af_merge (const EVP_MD *md, const unsigned char *src, size_t block,
                uint32_t stripes, unsigned char *out)
{
  const unsigned char *last = src + (size_t) (stripes - 1) * block;
  unsigned char d[MAX_KEY];
  int r = af_chain (md, src, block, stripes, d);

  if (r == 0)
    for (size_t i = 0; i < block; i++)
      out[i] = d[i] ^ last[i];
  OPENSSL_cleanse (d, sizeof d);
  return r;
}

/* All but the last block are random; the last is then the one that
 * merges to src.
 */
int
qcow2_af_split (const EVP_MD *md, const unsigned char *src, size_t block,
                uint32_t stripes, unsigned char *dst)
{
  unsigned char *last = dst + (size_t) (stripes - 1) * block;
  unsigned char d[MAX_KEY];
  int r;

  if (RAND_bytes (dst, (int) (block * (stripes - 1))) != 1)
    return qcow2_crypt_openssl_fail ("LUKS: cannot get random bytes");
  r = af_chain (md, dst, block, stripes, d);
  if (r == 0)
    for (size_t i = 0; i < block; i++)
      last[i] = d[i] ^ src[i];
  OPENSSL_cleanse (d, sizeof d);
  return r;
}
