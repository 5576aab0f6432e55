/* nbdkit-qcow2
 * Copyright (C) 2026 the nbdkit-qcow2 authors
 * SPDX-License-Identifier: BSD-3-Clause (see LICENSE)
 */

/* What the LUKS1 header's names mean (QEMU: the name parsing in
 * crypto/block-luks.c): the hashes accepted for PBKDF2, AF and essiv, and
 * the resolution of cipher_name + cipher_mode + key_bytes into a cipher
 * spec.  Opening (luks.c) and creating (luks_create.c) both go through
 * here, so whatever is created can be opened.
 */
#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/evp.h>

#include "cipher.h"
#include "luks.h"
#include "util.h"

/* Hashes accepted for PBKDF2, AF and essiv: those LUKS1 writers use and
 * QEMU understands.  A list rather than whatever OpenSSL knows keeps
 * XOFs and odd names out of the header's reach.
 */
static const char *const luks_hashes[] = {
  "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160",
};

int
qcow2_luks_fetch_hash (const char *name, const char *what, EVP_MD **md)
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

/* Resolve cipher_name + cipher_mode + key_bytes.  *essiv_md is fetched
 * here and owned by the caller.
 */
int
qcow2_luks_resolve_spec (const char *cipher_name, const char *cipher_mode,
                         uint32_t key_bytes, struct crypt_spec *spec,
                         EVP_MD **essiv_md)
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
    int r = qcow2_luks_fetch_hash (ivspec + 6, "essiv", essiv_md);
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
