/* nbdkit-qcow2
 * Copyright (C) 2026 the nbdkit-qcow2 authors
 * SPDX-License-Identifier: BSD-3-Clause (see LICENSE)
 */

/* Guest data encryption on OpenSSL libcrypto: legacy qcow AES and LUKS1.
 *
 * Both formats come down to the same machine: a block cipher (AES in CBC
 * or XTS mode) applied to each 512-byte sector with an IV derived from the
 * sector number (plain, plain64 or essiv).  LUKS adds the key-slot layer
 * on top: PBKDF2 of the passphrase decrypts an anti-forensically split
 * copy of the master key, which is verified against a PBKDF2 digest in the
 * header.
 *
 * Thread safety: everything in struct qcow2_crypt is written once at open
 * and read-only afterwards, except the pools of idle cipher contexts,
 * which only ever change under the mutex.  A context is owned by exactly
 * one call while it is out of the pool, so the per-sector IV changes never
 * race.
 */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include "crypt.h"
#include "io.h"
#include "util.h"

#define AES_BLOCK 16
#define MAX_KEY 64 /* aes-256-xts: two AES-256 keys */

enum ivgen { IV_PLAIN, IV_PLAIN64, IV_ESSIV };

/* A resolved cipher specification.  For XTS, key_len is the double
 * length, as LUKS's key_bytes is.
 */
struct spec {
  const EVP_CIPHER *cipher;
  size_t key_len;
  bool xts;
  enum ivgen ivgen;
  /* IV_ESSIV only: the IV is essiv_cipher (AES-ECB keyed with
   * essiv_md(key)) applied to the plain64 IV.  The digest length equals
   * the essiv cipher's key length by construction (see resolve_luks_spec).
   */
  const EVP_MD *essiv_md;
  const EVP_CIPHER *essiv_cipher;
};

/* The contexts one call needs, keyed once for one direction.  Only the
 * IV is changed per sector, which keeps the key schedule.
 */
struct ctxs {
  struct ctxs *next;
  EVP_CIPHER_CTX *data;
  EVP_CIPHER_CTX *essiv; /* NULL unless IV_ESSIV */
};

struct qcow2_crypt {
  struct spec spec;
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
static int
openssl_fail (const char *what)
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

/* ---------------------------------------------------------------- */
/* Per-sector cipher machinery shared by both formats.               */

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
  return openssl_fail ("crypt: cannot set up cipher context");
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
    return openssl_fail ("crypt: essiv IV generation failed");
  return 0;
}

/* Run the cipher over len bytes, a whole number of sectors, one 512-byte
 * unit per IV.
 */
static int
crypt_run (struct qcow2_crypt *c, int enc, uint64_t sector,
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
      r = openssl_fail (enc ? "crypt: encryption failed"
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
static int
crypt_new (const struct spec *spec, const unsigned char *key,
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
      return openssl_fail ("crypt: essiv key hash failed");
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
  return crypt_run (c, enc, sector, buf, len);
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

/* ---------------------------------------------------------------- */
/* Legacy qcow AES.                                                  */

int
qcow2_crypt_open_aes (const char *passphrase, struct qcow2_crypt **out)
{
  const struct spec spec = {
    .cipher = EVP_aes_128_cbc (),
    .key_len = 16,
    .ivgen = IV_PLAIN64,
  };
  unsigned char key[16] = { 0 };
  size_t n;
  int r;

  if (!passphrase) {
    qcow2_error ("AES: the image is encrypted: a passphrase is needed");
    return -EINVAL;
  }
  /* Longer passphrases are silently truncated, as QEMU does. */
  n = strnlen (passphrase, sizeof key);
  memcpy (key, passphrase, n);
  r = crypt_new (&spec, key, false, out);
  OPENSSL_cleanse (key, sizeof key);
  return r;
}

/* ---------------------------------------------------------------- */
/* LUKS1.                                                            */

/* The LUKS1 phdr, all integers big-endian. */
#define LUKS_MAGIC "LUKS\xba\xbe"
#define LUKS_MAGIC_LEN 6
#define LUKS_OFF_VERSION 6
#define LUKS_OFF_CIPHER_NAME 8
#define LUKS_OFF_CIPHER_MODE 40
#define LUKS_OFF_HASH_SPEC 72
#define LUKS_NAME_LEN 32
#define LUKS_OFF_KEY_BYTES 108
#define LUKS_OFF_MK_DIGEST 112
#define LUKS_DIGEST_LEN 20
#define LUKS_OFF_MK_SALT 132
#define LUKS_SALT_LEN 32
#define LUKS_OFF_MK_ITER 164
#define LUKS_OFF_UUID 168
#define LUKS_UUID_LEN 40
#define LUKS_OFF_SLOTS 208
#define LUKS_SLOT_SIZE 48
#define LUKS_NSLOTS 8
#define LUKS_PHDR_SIZE (LUKS_OFF_SLOTS + LUKS_NSLOTS * LUKS_SLOT_SIZE) /* 592 */

/* Within a key slot. */
#define SLOT_OFF_STATE 0
#define SLOT_OFF_ITER 4
#define SLOT_OFF_SALT 8
#define SLOT_OFF_KM_OFFSET 40
#define SLOT_OFF_STRIPES 44

#define LUKS_SLOT_ACTIVE 0x00AC71F3
#define LUKS_SLOT_INACTIVE 0x0000DEAD

/* Every LUKS1 writer uses 4000 stripes (QEMU refuses anything else);
 * fewer are harmless, more would only let a header make us allocate and
 * hash without bound.
 */
#define LUKS_MAX_STRIPES 4000

/* Hashes accepted for PBKDF2, AF and essiv: those LUKS1 writers use and
 * QEMU understands.  A list rather than whatever OpenSSL knows keeps
 * XOFs and odd names out of the header's reach.
 */
static const char *const luks_hashes[] = {
  "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160",
};

static int
luks_fetch_hash (const char *name, const char *what, EVP_MD **md)
{
  for (size_t i = 0; i < sizeof luks_hashes / sizeof luks_hashes[0]; i++) {
    if (strcmp (name, luks_hashes[i]) == 0) {
      *md = EVP_MD_fetch (NULL, name, NULL);
      if (!*md) {
        ERR_clear_error ();
        break;
      }
      return 0;
    }
  }
  qcow2_error ("LUKS: %s hash \"%s\" is not supported", what, name);
  return -ENOTSUP;
}

/* A fixed-size string field must be nul-terminated inside the field. */
static int
luks_string (const unsigned char *hdr, size_t off, size_t len,
             const char *field, const char **out)
{
  if (!memchr (hdr + off, '\0', len)) {
    qcow2_error ("LUKS: header field %s is not nul-terminated", field);
    return -EINVAL;
  }
  *out = (const char *) hdr + off;
  return 0;
}

/* Resolve cipher_name + cipher_mode + key_bytes.  *essiv_md is fetched
 * here and owned by the caller.
 */
static int
resolve_luks_spec (const char *cipher_name, const char *cipher_mode,
                   uint32_t key_bytes, struct spec *spec, EVP_MD **essiv_md)
{
  const char *dash = strchr (cipher_mode, '-');
  const char *ivspec;
  size_t mode_len;
  uint32_t aes_bits;

  memset (spec, 0, sizeof *spec);
  *essiv_md = NULL;

  if (strcmp (cipher_name, "aes") != 0) {
    qcow2_error ("LUKS: cipher \"%s\" is not supported (only aes)",
                 cipher_name);
    return -ENOTSUP;
  }
  if (!dash) {
    qcow2_error ("LUKS: cipher mode \"%s\" is not supported", cipher_mode);
    return -ENOTSUP;
  }
  mode_len = (size_t) (dash - cipher_mode);
  ivspec = dash + 1;
  if (mode_len == 3 && memcmp (cipher_mode, "xts", 3) == 0)
    spec->xts = true;
  else if (!(mode_len == 3 && memcmp (cipher_mode, "cbc", 3) == 0)) {
    qcow2_error ("LUKS: cipher mode \"%s\" is not supported "
                 "(only xts and cbc)", cipher_mode);
    return -ENOTSUP;
  }

  /* XTS takes two AES keys of equal size. */
  if (key_bytes > MAX_KEY || (spec->xts && key_bytes % 2 != 0))
    aes_bits = 0;
  else
    aes_bits = (spec->xts ? key_bytes / 2 : key_bytes) * 8;
  switch (aes_bits) {
  case 128:
    spec->cipher = spec->xts ? EVP_aes_128_xts () : EVP_aes_128_cbc ();
    break;
  case 192:
    if (spec->xts) {
      qcow2_error ("LUKS: cipher aes-192-xts is not supported by OpenSSL");
      return -ENOTSUP;
    }
    spec->cipher = EVP_aes_192_cbc ();
    break;
  case 256:
    spec->cipher = spec->xts ? EVP_aes_256_xts () : EVP_aes_256_cbc ();
    break;
  default:
    qcow2_error ("LUKS: key_bytes %" PRIu32 " does not fit cipher aes-%s",
                 key_bytes, spec->xts ? "xts" : "cbc");
    return -EINVAL;
  }
  spec->key_len = key_bytes;
  if ((size_t) EVP_CIPHER_get_key_length (spec->cipher) != spec->key_len) {
    qcow2_error ("LUKS: OpenSSL disagrees about the key length of "
                 "aes-%" PRIu32 "-%s", aes_bits, spec->xts ? "xts" : "cbc");
    return -ENOTSUP;
  }

  if (strcmp (ivspec, "plain64") == 0)
    spec->ivgen = IV_PLAIN64;
  else if (strcmp (ivspec, "plain") == 0)
    spec->ivgen = IV_PLAIN;
  else if (strncmp (ivspec, "essiv:", 6) == 0) {
    int r = luks_fetch_hash (ivspec + 6, "essiv", essiv_md);
    if (r < 0)
      return r;
    spec->ivgen = IV_ESSIV;
    spec->essiv_md = *essiv_md;
    /* QEMU keys the essiv cipher with the whole digest, picking the AES
     * variant whose key size is the digest size.
     */
    switch (EVP_MD_get_size (*essiv_md)) {
    case 16: spec->essiv_cipher = EVP_aes_128_ecb (); break;
    case 24: spec->essiv_cipher = EVP_aes_192_ecb (); break;
    case 32: spec->essiv_cipher = EVP_aes_256_ecb (); break;
    default:
      qcow2_error ("LUKS: essiv hash \"%s\" gives a %d-byte key, which no "
                   "AES variant takes", ivspec + 6,
                   EVP_MD_get_size (*essiv_md));
      EVP_MD_free (*essiv_md);
      *essiv_md = NULL;
      return -ENOTSUP;
    }
  }
  else {
    qcow2_error ("LUKS: IV generator \"%s\" in cipher mode \"%s\" is not "
                 "supported", ivspec, cipher_mode);
    return -ENOTSUP;
  }
  return 0;
}

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
      return openssl_fail ("LUKS: AF hash failed");
    memcpy (buf + off, h, n);
  }
  OPENSSL_cleanse (h, sizeof h);
  return 0;
}

/* AF-merge `stripes` blocks of `block` bytes at src into out (block
 * bytes): out = D(...D(D(s0) ^ s1)...) ^ s[n-1].
 */
static int
af_merge (const EVP_MD *md, const unsigned char *src, size_t block,
          uint32_t stripes, unsigned char *out)
{
  EVP_MD_CTX *mctx = EVP_MD_CTX_new ();
  unsigned char d[MAX_KEY] = { 0 };
  int r = 0;

  if (!mctx)
    return openssl_fail ("LUKS: cannot create hash context");
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

/* A validated key slot. */
struct luks_slot {
  uint32_t iterations;
  const unsigned char *salt;
  uint64_t km_offset; /* bytes from the LUKS header start */
  /* Key material rounded up to whole sectors.  The material is stored,
   * encrypted and decrypted as whole sectors, the tail of the last one
   * being padding: that is what cryptsetup does, and for the 4000 stripes
   * every writer uses, key_bytes * 4000 is a whole number of sectors for
   * every AES key size except 192, whose CBC decryption does not depend on
   * how the last sector is cut.
   */
  uint64_t km_span;
  uint32_t stripes;
};

/* Try one slot.  Returns 1 and fills master when the passphrase opens
 * it, 0 when it does not, negative errno on error.
 */
static int
luks_try_slot (struct qcow2_io *io, uint64_t offset, const struct spec *spec,
               const EVP_MD *md, const unsigned char *hdr,
               const struct luks_slot *slot, int slotno,
               const char *passphrase, unsigned char *master)
{
  size_t km_len = (size_t) slot->km_span;
  unsigned char slot_key[MAX_KEY];
  unsigned char check[LUKS_DIGEST_LEN];
  unsigned char *km;
  struct qcow2_crypt *sc = NULL;
  int r;

  km = malloc (km_len);
  if (!km) {
    qcow2_error ("LUKS: out of memory");
    return -ENOMEM;
  }
  r = qcow2_io_pread (io, km, km_len, offset + slot->km_offset);
  if (r < 0) {
    qcow2_error ("LUKS: cannot read key material of key slot %d: %s",
                 slotno, strerror (-r));
    goto out;
  }
  if (PKCS5_PBKDF2_HMAC (passphrase, (int) strlen (passphrase), slot->salt,
                         LUKS_SALT_LEN, (int) slot->iterations, md,
                         (int) spec->key_len, slot_key) != 1) {
    r = openssl_fail ("LUKS: PBKDF2 failed");
    goto out;
  }
  /* The key material is encrypted like payload, with sectors counted
   * from the start of the material.
   */
  r = crypt_new (spec, slot_key, false, &sc);
  if (r < 0)
    goto out;
  r = crypt_run (sc, 0, 0, km, km_len);
  if (r < 0)
    goto out;
  r = af_merge (md, km, spec->key_len, slot->stripes, master);
  if (r < 0)
    goto out;
  if (PKCS5_PBKDF2_HMAC ((const char *) master, (int) spec->key_len,
                         hdr + LUKS_OFF_MK_SALT, LUKS_SALT_LEN,
                         (int) get_be32 (hdr + LUKS_OFF_MK_ITER), md,
                         LUKS_DIGEST_LEN, check) != 1) {
    r = openssl_fail ("LUKS: PBKDF2 failed");
    goto out;
  }
  r = CRYPTO_memcmp (check, hdr + LUKS_OFF_MK_DIGEST, LUKS_DIGEST_LEN) == 0;

 out:
  qcow2_crypt_free (sc);
  OPENSSL_cleanse (km, km_len);
  free (km);
  OPENSSL_cleanse (slot_key, sizeof slot_key);
  OPENSSL_cleanse (check, sizeof check);
  if (r != 1)
    OPENSSL_cleanse (master, MAX_KEY);
  return r;
}

/* Validate the key slots; fills slots[] and *nactive. */
static int
luks_check_slots (const unsigned char *hdr, const struct spec *spec,
                  uint64_t length, struct luks_slot slots[LUKS_NSLOTS],
                  bool active[LUKS_NSLOTS], int *nactive)
{
  *nactive = 0;
  for (int i = 0; i < LUKS_NSLOTS; i++) {
    const unsigned char *s = hdr + LUKS_OFF_SLOTS + i * LUKS_SLOT_SIZE;
    uint32_t state = get_be32 (s + SLOT_OFF_STATE);
    struct luks_slot *sl = &slots[i];
    uint64_t km_len;

    active[i] = false;
    if (state == LUKS_SLOT_INACTIVE)
      continue;
    if (state != LUKS_SLOT_ACTIVE) {
      qcow2_error ("LUKS: key slot %d has invalid state 0x%08" PRIx32,
                   i, state);
      return -EINVAL;
    }
    sl->iterations = get_be32 (s + SLOT_OFF_ITER);
    sl->salt = s + SLOT_OFF_SALT;
    sl->km_offset = (uint64_t) get_be32 (s + SLOT_OFF_KM_OFFSET) *
                    QCOW2_CRYPT_SECTOR;
    sl->stripes = get_be32 (s + SLOT_OFF_STRIPES);

    /* PKCS5_PBKDF2_HMAC takes an int. */
    if (sl->iterations == 0 || sl->iterations > INT_MAX) {
      qcow2_error ("LUKS: key slot %d has invalid iteration count %" PRIu32,
                   i, sl->iterations);
      return -EINVAL;
    }
    if (sl->stripes == 0 || sl->stripes > LUKS_MAX_STRIPES) {
      qcow2_error ("LUKS: key slot %d has invalid stripes %" PRIu32
                   " (must be 1 to %d)", i, sl->stripes, LUKS_MAX_STRIPES);
      return -EINVAL;
    }
    km_len = (uint64_t) spec->key_len * sl->stripes;
    sl->km_span = div_round_up (km_len, QCOW2_CRYPT_SECTOR) *
                  QCOW2_CRYPT_SECTOR;
    if (sl->km_offset < LUKS_PHDR_SIZE) {
      qcow2_error ("LUKS: key slot %d key material overlaps the LUKS header",
                   i);
      return -EINVAL;
    }
    if (range_exceeds (sl->km_offset, sl->km_span, length)) {
      qcow2_error ("LUKS: key slot %d key material [%" PRIu64 ", +%" PRIu64
                   ") lies outside the LUKS area of %" PRIu64 " bytes",
                   i, sl->km_offset, sl->km_span, length);
      return -EINVAL;
    }
    for (int j = 0; j < i; j++) {
      if (active[j] &&
          sl->km_offset < slots[j].km_offset + slots[j].km_span &&
          slots[j].km_offset < sl->km_offset + sl->km_span) {
        qcow2_error ("LUKS: key slot %d key material overlaps key slot %d",
                     i, j);
        return -EINVAL;
      }
    }
    active[i] = true;
    (*nactive)++;
  }
  return 0;
}

int
qcow2_crypt_open_luks (struct qcow2_io *io, uint64_t offset, uint64_t length,
                       const char *passphrase, struct qcow2_crypt **out)
{
  unsigned char hdr[LUKS_PHDR_SIZE];
  const char *cipher_name, *cipher_mode, *hash_spec, *uuid;
  struct luks_slot slots[LUKS_NSLOTS];
  bool active[LUKS_NSLOTS];
  unsigned char master[MAX_KEY];
  struct spec spec;
  EVP_MD *md = NULL, *essiv_md = NULL;
  uint64_t size;
  uint32_t version, key_bytes, mk_iter;
  int nactive, r;

  if (!passphrase) {
    qcow2_error ("LUKS: the image is encrypted: a passphrase is needed");
    return -EINVAL;
  }
  if (strlen (passphrase) > INT_MAX) {
    qcow2_error ("LUKS: passphrase is too long");
    return -EINVAL;
  }
  if (length < LUKS_PHDR_SIZE) {
    qcow2_error ("LUKS: area of %" PRIu64 " bytes is too small for a LUKS "
                 "header (%d bytes)", length, LUKS_PHDR_SIZE);
    return -EINVAL;
  }
  r = qcow2_io_get_size (io, &size);
  if (r < 0) {
    qcow2_error ("LUKS: cannot get file size: %s", strerror (-r));
    return r;
  }
  if (range_exceeds (offset, length, size)) {
    qcow2_error ("LUKS: area [%" PRIu64 ", +%" PRIu64 ") lies outside the "
                 "file of %" PRIu64 " bytes", offset, length, size);
    return -EINVAL;
  }
  r = qcow2_io_pread (io, hdr, sizeof hdr, offset);
  if (r < 0) {
    qcow2_error ("LUKS: cannot read header: %s", strerror (-r));
    return r;
  }

  if (memcmp (hdr, LUKS_MAGIC, LUKS_MAGIC_LEN) != 0) {
    qcow2_error ("LUKS: bad magic in header at offset %" PRIu64, offset);
    return -EINVAL;
  }
  version = get_be16 (hdr + LUKS_OFF_VERSION);
  if (version != 1) {
    qcow2_error ("LUKS: version %" PRIu32 " is not supported (only 1)",
                 version);
    return -ENOTSUP;
  }
  if ((r = luks_string (hdr, LUKS_OFF_CIPHER_NAME, LUKS_NAME_LEN,
                        "cipher_name", &cipher_name)) < 0 ||
      (r = luks_string (hdr, LUKS_OFF_CIPHER_MODE, LUKS_NAME_LEN,
                        "cipher_mode", &cipher_mode)) < 0 ||
      (r = luks_string (hdr, LUKS_OFF_HASH_SPEC, LUKS_NAME_LEN,
                        "hash_spec", &hash_spec)) < 0 ||
      (r = luks_string (hdr, LUKS_OFF_UUID, LUKS_UUID_LEN,
                        "uuid", &uuid)) < 0)
    return r;
  (void) uuid; /* validated, otherwise unused */

  key_bytes = get_be32 (hdr + LUKS_OFF_KEY_BYTES);
  r = resolve_luks_spec (cipher_name, cipher_mode, key_bytes, &spec,
                         &essiv_md);
  if (r < 0)
    goto out;
  r = luks_fetch_hash (hash_spec, "hash_spec", &md);
  if (r < 0)
    goto out;

  mk_iter = get_be32 (hdr + LUKS_OFF_MK_ITER);
  if (mk_iter == 0 || mk_iter > INT_MAX) {
    qcow2_error ("LUKS: invalid master key digest iteration count %" PRIu32,
                 mk_iter);
    r = -EINVAL;
    goto out;
  }

  r = luks_check_slots (hdr, &spec, length, slots, active, &nactive);
  if (r < 0)
    goto out;
  if (nactive == 0) {
    qcow2_error ("LUKS: no key slot is enabled, so no passphrase can unlock "
                 "the image");
    r = -EPERM;
    goto out;
  }

  for (int i = 0; i < LUKS_NSLOTS; i++) {
    if (!active[i])
      continue;
    r = luks_try_slot (io, offset, &spec, md, hdr, &slots[i], i, passphrase,
                       master);
    if (r < 0)
      goto out;
    if (r == 1) {
      r = crypt_new (&spec, master, true, out);
      OPENSSL_cleanse (master, sizeof master);
      goto out;
    }
  }
  qcow2_error ("LUKS: the passphrase does not unlock any key slot");
  r = -EPERM;

 out:
  /* spec.essiv_md borrowed essiv_md; crypt_new dropped its copy. */
  EVP_MD_free (essiv_md);
  EVP_MD_free (md);
  return r;
}

/* ---------------------------------------------------------------- */
/* LUKS1 creation.                                                   */

/* The layout QEMU's crypto/block-luks.c gives a new header: the phdr
 * padded to 4096 bytes, then the key material of slot i at
 * 4096 + i * span, where span is key_bytes * 4000 rounded up to whole
 * sectors and then to 4096 bytes; the payload (the end of the LUKS area
 * in qcow2) follows slot 7.  For aes-256-xts that is 4096 + 8 * 258048 =
 * 2068480 bytes.
 */
#define LUKS_OFF_PAYLOAD_OFFSET 104 /* be32, in 512-byte sectors */
#define LUKS_CREATE_ALIGN 4096
#define LUKS_CREATE_STRIPES 4000
#define LUKS_CREATE_MIN_ITERS 1000   /* QEMU's and cryptsetup's floor */
#define LUKS_CREATE_ITER_TIME_MS 2000

/* CPU time of the calling thread, as QEMU's PBKDF2 benchmark uses, so a
 * busy machine does not inflate the measurement; wall time if the
 * thread clock is missing.
 */
static uint64_t
bench_now_ns (void)
{
  struct timespec ts;

  if (clock_gettime (CLOCK_THREAD_CPUTIME_ID, &ts) != 0 &&
      clock_gettime (CLOCK_MONOTONIC, &ts) != 0)
    return 0;
  return (uint64_t) ts.tv_sec * UINT64_C (1000000000) + (uint64_t) ts.tv_nsec;
}

/* PBKDF2 iterations per second of md for this key, salt and output
 * length (the cost grows with the number of digest blocks of output).
 * Like qcrypto_pbkdf2_count_iters, the count is raised until one run
 * takes at least budget_ns, and that run is extrapolated.
 */
static int
pbkdf2_iters_per_sec (const EVP_MD *md, const void *key, size_t nkey,
                      const unsigned char *salt, size_t nsalt, size_t nout,
                      uint64_t budget_ns, uint64_t *per_sec)
{
  unsigned char buf[MAX_KEY];
  uint64_t iters = LUKS_CREATE_MIN_ITERS, delta = 0;

  for (int round = 0; round < 40; round++) {
    uint64_t t0 = bench_now_ns (), next;

    if (PKCS5_PBKDF2_HMAC (key, (int) nkey, salt, (int) nsalt, (int) iters,
                           md, (int) nout, buf) != 1) {
      OPENSSL_cleanse (buf, sizeof buf);
      return openssl_fail ("LUKS: PBKDF2 failed");
    }
    delta = bench_now_ns () - t0;
    if (delta >= budget_ns || iters >= INT_MAX)
      break;
    if (delta < budget_ns / 10)
      next = iters * 10;
    else                        /* aim a little past the budget */
      next = iters * budget_ns / delta + iters / 8;
    iters = min_u64 (next, INT_MAX);
  }
  OPENSSL_cleanse (buf, sizeof buf);
  if (delta == 0) {
    qcow2_error ("LUKS: cannot measure PBKDF2 speed: the CPU time clock "
                 "does not advance");
    return -EIO;
  }
  /* iters < 2^31 and 10^9 < 2^30: no overflow. */
  *per_sec = iters * UINT64_C (1000000000) / delta;
  if (*per_sec == 0)
    *per_sec = 1;
  return 0;
}

/* Iterations that take iter_time_ms at per_sec, divided by div, at least
 * the LUKS minimum; -ERANGE when PBKDF2 (which takes an int) cannot do
 * that many.
 */
static int
scale_iters (uint64_t per_sec, unsigned iter_time_ms, unsigned div,
             const char *what, uint32_t *out)
{
  uint64_t n;

  if (per_sec > UINT64_MAX / iter_time_ms) {
    n = UINT64_MAX;
  }
  else
    n = per_sec * iter_time_ms / 1000 / div;
  if (n > INT_MAX) {
    qcow2_error ("LUKS: %s: %" PRIu64 " PBKDF2 iterations are needed for an "
                 "iteration time of %u ms, more than the maximum %d",
                 what, n, iter_time_ms, INT_MAX);
    return -ERANGE;
  }
  *out = (uint32_t) (n < LUKS_CREATE_MIN_ITERS ? LUKS_CREATE_MIN_ITERS : n);
  return 0;
}

/* The inverse of af_merge: fill `stripes` blocks at dst so that they
 * merge to src.  All but the last block are random.
 */
static int
af_split (const EVP_MD *md, const unsigned char *src, size_t block,
          uint32_t stripes, unsigned char *dst)
{
  EVP_MD_CTX *mctx = EVP_MD_CTX_new ();
  unsigned char d[MAX_KEY] = { 0 };
  int r = 0;

  if (!mctx)
    return openssl_fail ("LUKS: cannot create hash context");
  if (RAND_bytes (dst, (int) (block * (stripes - 1))) != 1) {
    r = openssl_fail ("LUKS: cannot get random bytes");
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

/* A random (version 4) UUID in the canonical 36-character form. */
static int
luks_make_uuid (char out[LUKS_UUID_LEN])
{
  unsigned char b[16];
  size_t n = 0;

  if (RAND_bytes (b, sizeof b) != 1)
    return openssl_fail ("LUKS: cannot get random bytes");
  b[6] = (unsigned char) ((b[6] & 0x0f) | 0x40);
  b[8] = (unsigned char) ((b[8] & 0x3f) | 0x80);
  memset (out, 0, LUKS_UUID_LEN);
  for (int i = 0; i < 16; i++) {
    if (i == 4 || i == 6 || i == 8 || i == 10)
      out[n++] = '-';
    snprintf (out + n, 3, "%02x", b[i]);
    n += 2;
  }
  return 0;
}

static void
put_str (unsigned char *hdr, size_t off, const char *s)
{
  /* Callers pass strings known to fit with their nul (the area is
   * zeroed).
   */
  memcpy (hdr + off, s, strlen (s));
}

int
qcow2_crypt_create_luks (const struct qcow2_luks_params *p,
                         const char *passphrase, unsigned char **area_out,
                         size_t *area_len_out, struct qcow2_crypt **out)
{
  static const struct qcow2_luks_params defaults = { 0 };
  const char *cipher_alg, *cipher_mode, *ivgen_alg, *ivgen_hash, *hash_alg;
  unsigned iter_time_ms;
  char mode_spec[LUKS_NAME_LEN];
  uint32_t key_bytes, mk_iter, slot_iter;
  size_t split_len, km_span, area_len, pass_len;
  unsigned char master[MAX_KEY], slot_key[MAX_KEY];
  unsigned char *area = NULL, *slot0;
  struct spec spec;
  EVP_MD *md = NULL, *essiv_md = NULL, *ivhash_md = NULL;
  struct qcow2_crypt *sc = NULL;
  uint64_t per_sec, budget_ns;
  int r;

  *area_out = NULL;
  *area_len_out = 0;
  *out = NULL;
  if (!p)
    p = &defaults;
  cipher_alg = p->cipher_alg ? p->cipher_alg : "aes-256";
  cipher_mode = p->cipher_mode ? p->cipher_mode : "xts";
  ivgen_alg = p->ivgen_alg ? p->ivgen_alg : "plain64";
  ivgen_hash = p->ivgen_hash ? p->ivgen_hash : "sha256";
  hash_alg = p->hash_alg ? p->hash_alg : "sha256";
  iter_time_ms = p->iter_time_ms ? p->iter_time_ms : LUKS_CREATE_ITER_TIME_MS;

  if (!passphrase) {
    qcow2_error ("LUKS: creating an encrypted image needs a passphrase");
    return -EINVAL;
  }
  pass_len = strlen (passphrase);
  if (pass_len > INT_MAX) {
    qcow2_error ("LUKS: passphrase is too long");
    return -EINVAL;
  }
  if (p->iterations != 0 &&
      (p->iterations < LUKS_CREATE_MIN_ITERS || p->iterations > INT_MAX)) {
    qcow2_error ("LUKS: iteration count %" PRIu64 " is out of range "
                 "(%d to %d)", p->iterations, LUKS_CREATE_MIN_ITERS, INT_MAX);
    return -EINVAL;
  }

  /* aes-192 is left out: its 96000 bytes of key material are not whole
   * sectors, which QEMU cannot encrypt or decrypt (it aborts).
   */
  if (strcmp (cipher_alg, "aes-128") == 0)
    key_bytes = 16;
  else if (strcmp (cipher_alg, "aes-256") == 0)
    key_bytes = 32;
  else {
    qcow2_error ("LUKS: cipher \"%s\" is not supported for new images "
                 "(only aes-128 and aes-256)", cipher_alg);
    return -ENOTSUP;
  }
  if (strcmp (cipher_mode, "xts") == 0)
    key_bytes *= 2;
  else if (strcmp (cipher_mode, "cbc") != 0) {
    qcow2_error ("LUKS: cipher mode \"%s\" is not supported (only xts and "
                 "cbc)", cipher_mode);
    return -ENOTSUP;
  }
  /* The IV hash only matters to essiv (QEMU's default for it is sha256);
   * it is still checked, so that a misspelling is never silently
   * ignored.
   */
  r = luks_fetch_hash (ivgen_hash, "IV generator", &ivhash_md);
  if (r < 0)
    return r;
  EVP_MD_free (ivhash_md);
  if (strcmp (ivgen_alg, "plain64") == 0 || strcmp (ivgen_alg, "plain") == 0)
    snprintf (mode_spec, sizeof mode_spec, "%s-%s", cipher_mode, ivgen_alg);
  else if (strcmp (ivgen_alg, "essiv") == 0)
    snprintf (mode_spec, sizeof mode_spec, "%s-essiv:%s", cipher_mode,
              ivgen_hash);
  else {
    qcow2_error ("LUKS: IV generator \"%s\" is not supported (only plain64, "
                 "plain and essiv)", ivgen_alg);
    return -ENOTSUP;
  }
  /* The same resolution as opening: whatever is created can be opened. */
  r = resolve_luks_spec ("aes", mode_spec, key_bytes, &spec, &essiv_md);
  if (r < 0)
    goto out;
  r = luks_fetch_hash (hash_alg, "hash", &md);
  if (r < 0)
    goto out;

  split_len = (size_t) key_bytes * LUKS_CREATE_STRIPES;
  km_span = div_round_up (split_len, LUKS_CREATE_ALIGN) * LUKS_CREATE_ALIGN;
  area_len = LUKS_CREATE_ALIGN + LUKS_NSLOTS * km_span;
  area = calloc (1, area_len);
  if (!area) {
    qcow2_error ("LUKS: out of memory");
    r = -ENOMEM;
    goto out;
  }

  memcpy (area, LUKS_MAGIC, LUKS_MAGIC_LEN);
  area[LUKS_OFF_VERSION + 1] = 1;
  put_str (area, LUKS_OFF_CIPHER_NAME, "aes");
  put_str (area, LUKS_OFF_CIPHER_MODE, mode_spec);
  put_str (area, LUKS_OFF_HASH_SPEC, hash_alg);
  put_be32 (area + LUKS_OFF_PAYLOAD_OFFSET, (uint32_t) (area_len / QCOW2_CRYPT_SECTOR));
  put_be32 (area + LUKS_OFF_KEY_BYTES, key_bytes);
  r = luks_make_uuid ((char *) area + LUKS_OFF_UUID);
  if (r < 0)
    goto out;
  for (int i = 0; i < LUKS_NSLOTS; i++) {
    unsigned char *s = area + LUKS_OFF_SLOTS + i * LUKS_SLOT_SIZE;
    put_be32 (s + SLOT_OFF_STATE, LUKS_SLOT_INACTIVE);
    put_be32 (s + SLOT_OFF_KM_OFFSET,
              (uint32_t) ((LUKS_CREATE_ALIGN + i * km_span) /
                          QCOW2_CRYPT_SECTOR));
    put_be32 (s + SLOT_OFF_STRIPES, LUKS_CREATE_STRIPES);
  }

  if (RAND_priv_bytes (master, (int) key_bytes) != 1 ||
      RAND_bytes (area + LUKS_OFF_MK_SALT, LUKS_SALT_LEN) != 1) {
    r = openssl_fail ("LUKS: cannot get random bytes");
    goto out;
  }

  /* The benchmark runs for a fraction of the target time, within
   * [50, 250] ms: plenty for a stable rate with a nanosecond clock.
   */
  budget_ns = (uint64_t) iter_time_ms * 1000000 / 4;
  if (budget_ns < UINT64_C (50000000))
    budget_ns = UINT64_C (50000000);
  if (budget_ns > UINT64_C (250000000))
    budget_ns = UINT64_C (250000000);

  /* Master key digest: an eighth of the time, as QEMU and cryptsetup. */
  if (p->iterations) {
    mk_iter = (uint32_t) (p->iterations / 8);
    if (mk_iter < LUKS_CREATE_MIN_ITERS)
      mk_iter = LUKS_CREATE_MIN_ITERS;
  }
  else {
    r = pbkdf2_iters_per_sec (md, master, key_bytes, area + LUKS_OFF_MK_SALT,
                              LUKS_SALT_LEN, LUKS_DIGEST_LEN, budget_ns,
                              &per_sec);
    if (r < 0)
      goto out;
    r = scale_iters (per_sec, iter_time_ms, 8, "master key digest", &mk_iter);
    if (r < 0)
      goto out;
  }
  put_be32 (area + LUKS_OFF_MK_ITER, mk_iter);
  if (PKCS5_PBKDF2_HMAC ((const char *) master, (int) key_bytes,
                         area + LUKS_OFF_MK_SALT, LUKS_SALT_LEN,
                         (int) mk_iter, md, LUKS_DIGEST_LEN,
                         area + LUKS_OFF_MK_DIGEST) != 1) {
    r = openssl_fail ("LUKS: PBKDF2 failed");
    goto out;
  }

  /* Key slot 0. */
  slot0 = area + LUKS_OFF_SLOTS;
  if (RAND_bytes (slot0 + SLOT_OFF_SALT, LUKS_SALT_LEN) != 1) {
    r = openssl_fail ("LUKS: cannot get random bytes");
    goto out;
  }
  if (p->iterations)
    slot_iter = (uint32_t) p->iterations;
  else {
    r = pbkdf2_iters_per_sec (md, passphrase, pass_len, slot0 + SLOT_OFF_SALT,
                              LUKS_SALT_LEN, key_bytes, budget_ns, &per_sec);
    if (r < 0)
      goto out;
    r = scale_iters (per_sec, iter_time_ms, 1, "key slot", &slot_iter);
    if (r < 0)
      goto out;
  }
  put_be32 (slot0 + SLOT_OFF_ITER, slot_iter);
  if (PKCS5_PBKDF2_HMAC (passphrase, (int) pass_len, slot0 + SLOT_OFF_SALT,
                         LUKS_SALT_LEN, (int) slot_iter, md, (int) key_bytes,
                         slot_key) != 1) {
    r = openssl_fail ("LUKS: PBKDF2 failed");
    goto out;
  }
  /* Split, then encrypt like payload with sectors counted from the start
   * of the material; split_len is whole sectors for every key size
   * accepted above.
   */
  r = af_split (md, master, key_bytes, LUKS_CREATE_STRIPES,
                area + LUKS_CREATE_ALIGN);
  if (r < 0)
    goto out;
  r = crypt_new (&spec, slot_key, false, &sc);
  if (r < 0)
    goto out;
  r = crypt_run (sc, 1, 0, area + LUKS_CREATE_ALIGN, split_len);
  if (r < 0)
    goto out;
  put_be32 (slot0 + SLOT_OFF_STATE, LUKS_SLOT_ACTIVE);

  r = crypt_new (&spec, master, true, out);
  if (r < 0)
    goto out;
  *area_out = area;
  *area_len_out = area_len;
  area = NULL;

 out:
  qcow2_crypt_free (sc);
  if (area) {
    OPENSSL_cleanse (area, area_len);
    free (area);
  }
  OPENSSL_cleanse (master, sizeof master);
  OPENSSL_cleanse (slot_key, sizeof slot_key);
  EVP_MD_free (essiv_md);
  EVP_MD_free (md);
  return r;
}
