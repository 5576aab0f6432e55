/* Encryption of guest data: legacy qcow AES (crypt_method 1) and LUKS
 * (crypt_method 2), on OpenSSL libcrypto.
 *
 * Data is encrypted in 512-byte sectors.  The caller picks the sector
 * number that feeds the IV: the guest offset / 512 for legacy AES, the
 * host (physical) offset / 512 for LUKS, as QEMU does
 * (qcow2_crypt_iv_uses_host_offset tells which).
 *
 * A struct qcow2_crypt is immutable once created and safe to use from many
 * threads at once.
 *
 * The pieces behind this interface, one concern per file, as QEMU splits
 * its crypto/: cipher.c (the per-sector cipher engine, IV generators),
 * qcow_aes.c (legacy AES keys), luks.c (LUKS unlock), luks_create.c (LUKS
 * create), luks_spec.c (LUKS header names), afsplit.c (the anti-forensic
 * splitter); cipher.h and luks.h are private to this folder.
 */
#ifndef QCOW2_CRYPT_H
#define QCOW2_CRYPT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct qcow2_io;
struct qcow2_crypt;

#define QCOW2_CRYPT_SECTOR 512

/* Legacy AES-128-CBC, plain64 IVs, key = passphrase bytes (at most 16,
 * zero padded) as QEMU's qcrypto_block_qcow does.
 */
int qcow2_crypt_open_aes (const char *passphrase, struct qcow2_crypt **out);

/* LUKS (version 1) whose header and key material occupy
 * [offset, offset + length) of io, as pointed to by the qcow2
 * full-disk-encryption header extension.  Key material offsets in the LUKS
 * header are relative to offset.  Tries every enabled key slot; a wrong
 * passphrase gives -EPERM with a clear message through qcow2_error.
 * Every field of the LUKS header is validated before use.
 */
int qcow2_crypt_open_luks (struct qcow2_io *io, uint64_t offset,
                           uint64_t length, const char *passphrase,
                           struct qcow2_crypt **out);

/* Decrypt / encrypt len bytes (a multiple of 512) in place; the first
 * sector has IV sector number `sector`, the next sector + 1, and so on.
 */
int qcow2_crypt_decrypt (struct qcow2_crypt *c, uint64_t sector, void *buf,
                         size_t len);
int qcow2_crypt_encrypt (struct qcow2_crypt *c, uint64_t sector, void *buf,
                         size_t len);

bool qcow2_crypt_iv_uses_host_offset (const struct qcow2_crypt *c);

void qcow2_crypt_free (struct qcow2_crypt *c);

/* Parameters of a new LUKS header.  A NULL string or a zero number means
 * QEMU's default; a NULL params pointer means all defaults.
 */
struct qcow2_luks_params {
  const char *cipher_alg;   /* "aes-128" or "aes-256" (default) */
  const char *cipher_mode;  /* "xts" (default) or "cbc" */
  const char *ivgen_alg;    /* "plain64" (default), "plain" or "essiv" */
  const char *ivgen_hash;   /* essiv only (checked, else unused): "sha256"
                             * (default), the one supported hash whose
                             * digest is an AES key size */
  const char *hash_alg;     /* PBKDF2 and AF hash: "sha256" (default),
                             * "sha1", "sha224", "sha384", "sha512",
                             * "ripemd160" */
  unsigned iter_time_ms;    /* PBKDF2 time to aim for (default 2000) */
  /* Nonzero: a fixed key slot iteration count (1000 to INT_MAX) instead
   * of the measurement; the master key digest then gets a count of
   * iterations / 8, at least 1000.
   */
  uint64_t iterations;
};

/* Build a LUKS1 header and key material for a new image, laid out as
 * QEMU's qemu-img does for qcow2: a fresh random master key, key slot 0
 * opened by passphrase, slots 1-7 inactive; the header padded to 4096
 * bytes, each slot's key material (key_bytes * 4000 stripes) aligned to
 * 4096 bytes, payload offset = the area length.  Unless
 * params->iterations is set, the PBKDF2 speed of this machine is
 * measured: slot 0 gets iter_time_ms worth of iterations and the master
 * key digest an eighth of that, each at least 1000.
 *
 * On success *area is a malloc'd buffer of *area_len bytes (a multiple of
 * 4096; 2068480 for aes-256-xts) to be written whole at the LUKS area's
 * offset, and *out the same crypt object qcow2_crypt_open_luks would give
 * for it.  On failure, negative errno with a message through
 * qcow2_error, and *area = NULL, *area_len = 0, *out = NULL.
 */
int qcow2_crypt_create_luks (const struct qcow2_luks_params *params,
                             const char *passphrase, unsigned char **area,
                             size_t *area_len, struct qcow2_crypt **out);

#endif /* QCOW2_CRYPT_H */
