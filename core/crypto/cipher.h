/* nbdkit-qcow2
 * Copyright (C) 2026 the nbdkit-qcow2 authors
 * SPDX-License-Identifier: BSD-3-Clause (see LICENSE)
 */

/* Private to core/crypto/: the cipher engine (cipher.c) as the key
 * sources (qcow_aes.c, luks.c, luks_create.c) use it.  Everything else in
 * the engine goes through crypt.h.
 */
#ifndef QCOW2_CRYPTO_CIPHER_H
#define QCOW2_CRYPTO_CIPHER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <openssl/evp.h>

struct qcow2_crypt;

#define MAX_KEY 64 /* aes-256-xts: two AES-256 keys */

enum ivgen { IV_PLAIN, IV_PLAIN64, IV_ESSIV };

/* A resolved cipher specification.  For XTS, key_len is the double
 * length, as LUKS's key_bytes is.
 */
struct crypt_spec {
  const EVP_CIPHER *cipher;
  size_t key_len;
  bool xts;
  enum ivgen ivgen;
  /* IV_ESSIV only: the IV is essiv_cipher (AES-ECB keyed with
   * essiv_md(key)) applied to the plain64 IV.  The digest length equals
   * the essiv cipher's key length by construction (see
   * qcow2_luks_resolve_spec).
   */
  const EVP_MD *essiv_md;
  const EVP_CIPHER *essiv_cipher;
};

/* Report the oldest queued OpenSSL error (prefixed by what) through
 * qcow2_error and drop the rest, so a stale error never shows up in a
 * later, unrelated message on this thread.  Returns -EIO.
 */
int qcow2_crypt_openssl_fail (const char *what);

/* Build a crypt object for spec and key (spec->key_len bytes; the caller
 * keeps and cleanses its copy).  Both directions get a context up front,
 * so an OpenSSL refusal of the key shows up here and not at the first
 * read.  iv_host_offset is what qcow2_crypt_iv_uses_host_offset reports.
 */
int qcow2_cipher_new (const struct crypt_spec *spec, const unsigned char *key,
                      bool iv_host_offset, struct qcow2_crypt **out);

/* Encrypt (enc = 1) or decrypt (enc = 0) len bytes in place, a whole
 * number of 512-byte sectors, the first with IV sector number `sector`.
 */
int qcow2_cipher_run (struct qcow2_crypt *c, int enc, uint64_t sector,
                      unsigned char *buf, size_t len);

#endif /* QCOW2_CRYPTO_CIPHER_H */
