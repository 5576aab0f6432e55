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

#endif /* QCOW2_CRYPT_H */
