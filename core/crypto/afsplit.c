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

/* AF-merge `stripes` blocks of `block` bytes at src into out (block
 * bytes): out = D(...D(D(s0) ^ s1)...) ^ s[n-1].
 */
int
qcow2_af_merge (const EVP_MD *md, const unsigned char *src, size_t block,
          uint32_t stripes, unsigned char *out)
{
  EVP_MD_CTX *mctx = EVP_MD_CTX_new ();
  unsigned char d[MAX_KEY] = { 0 };
  int r = 0;

  if (!mctx)
    return qcow2_crypt_openssl_fail ("LUKS: cannot create hash context");
  for (uint32_t s = 0; s + 1 < stripes; s++) {
    for (size_t i = 0; i < block; i++)
      d[i] ^= src[(size_t) s * block + i];
    r = af_diffuse (mctx, md, d, block);
    if (r < 0)
      goto out;
  }
  for (size_t i = 0; i < block; i++)
    out[i] = d[i] ^ src[(size_t) (stripes - 1) * block + i];
 out:
  OPENSSL_cleanse (d, sizeof d);
  EVP_MD_CTX_free (mctx);
  return r;
}

/* The inverse of qcow2_af_merge: fill `stripes` blocks at dst so that they
 * merge to src.  All but the last block are random.
 */
int
qcow2_af_split (const EVP_MD *md, const unsigned char *src, size_t block,
          uint32_t stripes, unsigned char *dst)
{
  EVP_MD_CTX *mctx = EVP_MD_CTX_new ();
  unsigned char d[MAX_KEY] = { 0 };
  int r = 0;

  if (!mctx)
    return qcow2_crypt_openssl_fail ("LUKS: cannot create hash context");
  if (RAND_bytes (dst, (int) (block * (stripes - 1))) != 1) {
    r = qcow2_crypt_openssl_fail ("LUKS: cannot get random bytes");
    goto out;
  }
  for (uint32_t s = 0; s + 1 < stripes; s++) {
    for (size_t i = 0; i < block; i++)
      d[i] ^= dst[(size_t) s * block + i];
    r = af_diffuse (mctx, md, d, block);
    if (r < 0)
      goto out;
  }
  for (size_t i = 0; i < block; i++)
    dst[(size_t) (stripes - 1) * block + i] = d[i] ^ src[i];
 out:
  OPENSSL_cleanse (d, sizeof d);
  EVP_MD_CTX_free (mctx);
  return r;
}
