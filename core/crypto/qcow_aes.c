/* nbdkit-qcow2
 * Copyright (C) 2026 the nbdkit-qcow2 authors
 * SPDX-License-Identifier: BSD-3-Clause (see LICENSE)
 */

/* Legacy qcow AES (crypt_method 1; QEMU: crypto/block-qcow.c): AES-128-CBC
 * with plain64 IVs counted from the guest offset, keyed with the
 * passphrase bytes themselves.  Weak by design and kept for reading and
 * writing old images only.
 */
#include <errno.h>
#include <stdbool.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "cipher.h"
#include "crypt.h"
#include "util.h"

int
qcow2_crypt_open_aes (const char *passphrase, struct qcow2_crypt **out)
{
  const struct crypt_spec spec = {
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
  r = qcow2_cipher_new (&spec, key, false, out);
  OPENSSL_cleanse (key, sizeof key);
  return r;
}
