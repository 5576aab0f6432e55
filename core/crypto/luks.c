/* nbdkit-qcow2
 * Copyright (C) 2026 the nbdkit-qcow2 authors
 * SPDX-License-Identifier: BSD-3-Clause (see LICENSE)
 */

/* Unlocking a LUKS1 volume (crypt_method 2; QEMU: the open half of
 * crypto/block-luks.c): validate every header field and key slot, then
 * try each enabled slot: PBKDF2 of the passphrase decrypts the slot's
 * anti-forensically split copy of the master key, which is checked
 * against the master key digest in the header.
 */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "cipher.h"
#include "crypt.h"
#include "io.h"
#include "luks.h"
#include "util.h"


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
luks_try_slot (struct qcow2_io *io, uint64_t offset,
               const struct crypt_spec *spec, const EVP_MD *md,
               const unsigned char *hdr,
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
    r = qcow2_crypt_openssl_fail ("LUKS: PBKDF2 failed");
    goto out;
  }
  /* The key material is encrypted like payload, with sectors counted
   * from the start of the material.
   */
  r = qcow2_cipher_new (spec, slot_key, false, &sc);
  if (r < 0)
    goto out;
  r = qcow2_cipher_run (sc, 0, 0, km, km_len);
  if (r < 0)
    goto out;
  r = qcow2_af_merge (md, km, spec->key_len, slot->stripes, master);
  if (r < 0)
    goto out;
  if (PKCS5_PBKDF2_HMAC ((const char *) master, (int) spec->key_len,
                         hdr + LUKS_OFF_MK_SALT, LUKS_SALT_LEN,
                         (int) get_be32 (hdr + LUKS_OFF_MK_ITER), md,
                         LUKS_DIGEST_LEN, check) != 1) {
    r = qcow2_crypt_openssl_fail ("LUKS: PBKDF2 failed");
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
luks_check_slots (const unsigned char *hdr, const struct crypt_spec *spec,
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
  struct crypt_spec spec;
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
  r = qcow2_luks_resolve_spec (cipher_name, cipher_mode, key_bytes, &spec,
                               &essiv_md);
  if (r < 0)
    goto out;
  r = qcow2_luks_fetch_hash (hash_spec, "hash_spec", &md);
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
      r = qcow2_cipher_new (&spec, master, true, out);
      OPENSSL_cleanse (master, sizeof master);
      goto out;
    }
  }
  qcow2_error ("LUKS: the passphrase does not unlock any key slot");
  r = -EPERM;

 out:
  /* spec.essiv_md borrowed essiv_md; qcow2_cipher_new dropped its copy. */
  EVP_MD_free (essiv_md);
  EVP_MD_free (md);
  return r;
}
