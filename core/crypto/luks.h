/* nbdkit-qcow2
 * Copyright (C) 2026 the nbdkit-qcow2 authors
 * SPDX-License-Identifier: BSD-3-Clause (see LICENSE)
 */

/* Private to core/crypto/: the LUKS1 on-disk header layout and the pieces
 * that opening (luks.c) and creating (luks_create.c) share: name
 * resolution (luks_spec.c) and the anti-forensic splitter (afsplit.c).
 */
#ifndef QCOW2_CRYPTO_LUKS_H
#define QCOW2_CRYPTO_LUKS_H

#include <stddef.h>
#include <stdint.h>

#include <openssl/evp.h>

#include "cipher.h"

/* The LUKS1 phdr, all integers big-endian. */
#define LUKS_MAGIC "LUKS\xba\xbe"
#define LUKS_MAGIC_LEN 6
#define LUKS_OFF_VERSION 6
#define LUKS_OFF_CIPHER_NAME 8
#define LUKS_OFF_CIPHER_MODE 40
#define LUKS_OFF_HASH_SPEC 72
#define LUKS_NAME_LEN 32
#define LUKS_OFF_PAYLOAD_OFFSET 104 /* be32, in 512-byte sectors */
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

/* Fetch hash `name` for use `what` (named in the error) if it is one of
 * the hashes LUKS1 writers use; -ENOTSUP with a message otherwise.  The
 * caller frees *md.
 */
int qcow2_luks_fetch_hash (const char *name, const char *what, EVP_MD **md);

/* Resolve cipher_name + cipher_mode + key_bytes into spec.  *essiv_md is
 * fetched here, borrowed by spec->essiv_md, and owned by the caller.
 */
int qcow2_luks_resolve_spec (const char *cipher_name, const char *cipher_mode,
                             uint32_t key_bytes, struct crypt_spec *spec,
                             EVP_MD **essiv_md);

/* AF-merge `stripes` blocks of `block` bytes (at most MAX_KEY) at src
 * into out, and its inverse: fill `stripes` blocks at dst so that they
 * merge to src.
 */
int qcow2_af_merge (const EVP_MD *md, const unsigned char *src, size_t block,
                    uint32_t stripes, unsigned char *out);
int qcow2_af_split (const EVP_MD *md, const unsigned char *src, size_t block,
                    uint32_t stripes, unsigned char *dst);

#endif /* QCOW2_CRYPTO_LUKS_H */
