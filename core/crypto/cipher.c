/* nbdkit-qcow2
 * Copyright (C) 2026 the nbdkit-qcow2 authors
 * SPDX-License-Identifier: BSD-3-Clause (see LICENSE)
 */

/* The cipher engine both encrypted formats share (QEMU: crypto/cipher.c
 * and crypto/ivgen*.c): a block cipher (AES in CBC or XTS mode) applied
 * to each 512-byte sector with an IV derived from the sector number
 * (plain, plain64 or essiv), on OpenSSL libcrypto.  The formats only
 * differ in how they get the key: qcow_aes.c from the passphrase, luks.c
 * and luks_create.c through LUKS key slots.
 *
 * Thread safety: everything in struct qcow2_crypt is written once at open
 * and read-only afterwards, except the pools of idle cipher contexts,
 * which only ever change under the mutex.  A context is owned by exactly
 * one call while it is out of the pool, so the per-sector IV changes never
 * race.
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>

#include "cipher.h"
#include "crypt.h"
#include "util.h"

#define AES_BLOCK 16

/* The contexts one call needs, keyed once for one direction.  Only the
 * IV is changed per sector, which keeps the key schedule.
 */
struct ctxs {
  struct ctxs *next;
  EVP_CIPHER_CTX *data;
  EVP_CIPHER_CTX *essiv; /* NULL unless IV_ESSIV */
};

struct qcow2_crypt {
  struct crypt_spec spec;
  bool iv_host_offset;
  unsigned char key[MAX_KEY];
  unsigned char essiv_key[EVP_MAX_MD_SIZE];

  pthread_mutex_t lock;
  /* Idle contexts: [0] decrypting, [1] encrypting.  OpenSSL's AES
   * decryption key schedule differs from the encryption one, so a context
   * never changes direction.
   */
  struct ctxs *idle[2];
};

/* Report the oldest queued OpenSSL error and drop the rest, so a stale
 * error never shows up in a later, unrelated message on this thread.
 */
int
qcow2_crypt_openssl_fail (const char *what)
{
  unsigned long e = ERR_get_error ();
  char buf[256];

  if (e)
    ERR_error_string_n (e, buf, sizeof buf);
  else
    strcpy (buf, "unknown error");
  ERR_clear_error ();
  qcow2_error ("%s: OpenSSL: %s", what, buf);
  return -EIO;
}

static void
ctxs_free (struct ctxs *x)
{
  if (!x)
    return;
  EVP_CIPHER_CTX_free (x->data);   /* cleanses the key schedule */
  EVP_CIPHER_CTX_free (x->essiv);
  free (x);
}

static int
ctxs_new (const struct qcow2_crypt *c, int enc, struct ctxs **out)
{
  struct ctxs *x = calloc (1, sizeof *x);

  if (!x) {
    qcow2_error ("crypt: out of memory");
    return -ENOMEM;
  }
  x->data = EVP_CIPHER_CTX_new ();
  if (!x->data ||
      EVP_CipherInit_ex (x->data, c->spec.cipher, NULL, c->key, NULL,
                         enc) != 1 ||
      EVP_CIPHER_CTX_set_padding (x->data, 0) != 1)
    goto fail;
  if (c->spec.ivgen == IV_ESSIV) {
    x->essiv = EVP_CIPHER_CTX_new ();
    if (!x->essiv ||
        EVP_EncryptInit_ex (x->essiv, c->spec.essiv_cipher, NULL,
                            c->essiv_key, NULL) != 1 ||
        EVP_CIPHER_CTX_set_padding (x->essiv, 0) != 1)
      goto fail;
  }
  *out = x;
  return 0;

 fail:
  ctxs_free (x);
  return qcow2_crypt_openssl_fail ("crypt: cannot set up cipher context");
}

static int
ctxs_get (struct qcow2_crypt *c, int enc, struct ctxs **out)
{
  struct ctxs *x;

  pthread_mutex_lock (&c->lock);
  x = c->idle[enc];
  if (x)
    c->idle[enc] = x->next;
  pthread_mutex_unlock (&c->lock);
  if (x) {
    *out = x;
    return 0;
  }
  return ctxs_new (c, enc, out);
}

static void
ctxs_put (struct qcow2_crypt *c, int enc, struct ctxs *x)
{
  pthread_mutex_lock (&c->lock);
  x->next = c->idle[enc];
  c->idle[enc] = x;
  pthread_mutex_unlock (&c->lock);
}

static int
make_iv (const struct qcow2_crypt *c, struct ctxs *x, uint64_t sector,
         unsigned char iv[AES_BLOCK])
{
  uint64_t n = c->spec.ivgen == IV_PLAIN ? (uint32_t) sector : sector;
  int outl;

  memset (iv, 0, AES_BLOCK);
  for (int i = 0; i < 8; i++)
    iv[i] = (unsigned char) (n >> (8 * i));
  if (c->spec.ivgen == IV_ESSIV &&
      (EVP_EncryptUpdate (x->essiv, iv, &outl, iv, AES_BLOCK) != 1 ||
       outl != AES_BLOCK))
    return qcow2_crypt_openssl_fail ("crypt: essiv IV generation failed");
  return 0;
}

/* Run the cipher over len bytes, a whole number of sectors, one 512-byte
 * unit per IV.
 */
int
qcow2_cipher_run (struct qcow2_crypt *c, int enc, uint64_t sector,
                  unsigned char *buf, size_t len)
{
  struct ctxs *x;
  int r = ctxs_get (c, enc, &x);

  if (r < 0)
    return r;
  while (len > 0) {
    const size_t n = QCOW2_CRYPT_SECTOR;
    unsigned char iv[AES_BLOCK];
    int outl;

    r = make_iv (c, x, sector, iv);
    if (r < 0)
      break;
    /* -1 keeps the direction; a NULL key keeps the key schedule. */
    if (EVP_CipherInit_ex (x->data, NULL, NULL, NULL, iv, -1) != 1 ||
        EVP_CipherUpdate (x->data, buf, &outl, buf, (int) n) != 1 ||
        (size_t) outl != n) {
      r = qcow2_crypt_openssl_fail (enc ? "crypt: encryption failed"
                                    : "crypt: decryption failed");
      break;
    }
    buf += n;
    len -= n;
    sector++;
  }
  /* A context that failed part-way is in an unknown state: drop it. */
  if (r < 0)
    ctxs_free (x);
  else
    ctxs_put (c, enc, x);
  return r;
}

/* Build a crypt object for spec and key.  Both directions get a context
 * up front, so an OpenSSL refusal of the key shows up at open and not at
 * the first read.
 */
int
qcow2_cipher_new (const struct crypt_spec *spec, const unsigned char *key,
                  bool iv_host_offset, struct qcow2_crypt **out)
{
  struct qcow2_crypt *c = calloc (1, sizeof *c);
  struct ctxs *x;
  int r;

  if (!c) {
    qcow2_error ("crypt: out of memory");
    return -ENOMEM;
  }
  c->spec = *spec;
  c->iv_host_offset = iv_host_offset;
  memcpy (c->key, key, spec->key_len);
  r = pthread_mutex_init (&c->lock, NULL);
  if (r != 0) {
    OPENSSL_cleanse (c->key, sizeof c->key);
    free (c);
    qcow2_error ("crypt: cannot create mutex");
    return -r;
  }
  if (spec->ivgen == IV_ESSIV) {
    unsigned int dlen;
    if (EVP_Digest (key, spec->key_len, c->essiv_key, &dlen, spec->essiv_md,
                    NULL) != 1) {
      qcow2_crypt_free (c);
      return qcow2_crypt_openssl_fail ("crypt: essiv key hash failed");
    }
    /* Needed only for the hash above; the caller may free it. */
    c->spec.essiv_md = NULL;
  }
  for (int enc = 0; enc <= 1; enc++) {
    r = ctxs_new (c, enc, &x);
    if (r < 0) {
      qcow2_crypt_free (c);
      return r;
    }
    ctxs_put (c, enc, x);
  }
  *out = c;
  return 0;
}

static int
crypt_public (struct qcow2_crypt *c, int enc, uint64_t sector, void *buf,
              size_t len)
{
  if (len % QCOW2_CRYPT_SECTOR != 0) {
    qcow2_error ("crypt: length %zu is not a multiple of %d bytes", len,
                 QCOW2_CRYPT_SECTOR);
    return -EINVAL;
  }
  return qcow2_cipher_run (c, enc, sector, buf, len);
}

int
qcow2_crypt_decrypt (struct qcow2_crypt *c, uint64_t sector, void *buf,
                     size_t len)
{
  return crypt_public (c, 0, sector, buf, len);
}

int
qcow2_crypt_encrypt (struct qcow2_crypt *c, uint64_t sector, void *buf,
                     size_t len)
{
  return crypt_public (c, 1, sector, buf, len);
}

bool
qcow2_crypt_iv_uses_host_offset (const struct qcow2_crypt *c)
{
  return c->iv_host_offset;
}

void
qcow2_crypt_free (struct qcow2_crypt *c)
{
  if (!c)
    return;
  for (int enc = 0; enc <= 1; enc++) {
    while (c->idle[enc]) {
      struct ctxs *x = c->idle[enc];
      c->idle[enc] = x->next;
      ctxs_free (x);
    }
  }
  pthread_mutex_destroy (&c->lock);
  OPENSSL_cleanse (c->key, sizeof c->key);
  OPENSSL_cleanse (c->essiv_key, sizeof c->essiv_key);
  free (c);
}
