/* nbdkit-qcow2
 * Copyright (C) 2026 the nbdkit-qcow2 authors
 * SPDX-License-Identifier: BSD-3-Clause (see LICENSE)
 */

/* Creating a LUKS1 volume for a new image (QEMU: the create half of
 * crypto/block-luks.c): a fresh master key, its digest, key slot 0 for the
 * passphrase, with PBKDF2 iteration counts measured on this machine
 * (QEMU: crypto/pbkdf.c's qcrypto_pbkdf2_count_iters).
 */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include "cipher.h"
#include "crypt.h"
#include "luks.h"
#include "util.h"


/* The layout QEMU's crypto/block-luks.c gives a new header: the phdr
 * padded to 4096 bytes, then the key material of slot i at
 * 4096 + i * span, where span is key_bytes * 4000 rounded up to whole
 * sectors and then to 4096 bytes; the payload (the end of the LUKS area
 * in qcow2) follows slot 7.  For aes-256-xts that is 4096 + 8 * 258048 =
 * 2068480 bytes.
 */
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
      return qcow2_crypt_openssl_fail ("LUKS: PBKDF2 failed");
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


/* A random (version 4) UUID in the canonical 36-character form. */
static int
luks_make_uuid (char out[LUKS_UUID_LEN])
{
  unsigned char b[16];
  size_t n = 0;

  if (RAND_bytes (b, sizeof b) != 1)
    return qcow2_crypt_openssl_fail ("LUKS: cannot get random bytes");
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
  struct crypt_spec spec;
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
  r = qcow2_luks_fetch_hash (ivgen_hash, "IV generator", &ivhash_md);
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
  r = qcow2_luks_resolve_spec ("aes", mode_spec, key_bytes, &spec, &essiv_md);
  if (r < 0)
    goto out;
  r = qcow2_luks_fetch_hash (hash_alg, "hash", &md);
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
    r = qcow2_crypt_openssl_fail ("LUKS: cannot get random bytes");
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
    r = qcow2_crypt_openssl_fail ("LUKS: PBKDF2 failed");
    goto out;
  }

  /* Key slot 0. */
  slot0 = area + LUKS_OFF_SLOTS;
  if (RAND_bytes (slot0 + SLOT_OFF_SALT, LUKS_SALT_LEN) != 1) {
    r = qcow2_crypt_openssl_fail ("LUKS: cannot get random bytes");
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
    r = qcow2_crypt_openssl_fail ("LUKS: PBKDF2 failed");
    goto out;
  }
  /* Split, then encrypt like payload with sectors counted from the start
   * of the material; split_len is whole sectors for every key size
   * accepted above.
   */
  r = qcow2_af_split (md, master, key_bytes, LUKS_CREATE_STRIPES,
                      area + LUKS_CREATE_ALIGN);
  if (r < 0)
    goto out;
  r = qcow2_cipher_new (&spec, slot_key, false, &sc);
  if (r < 0)
    goto out;
  r = qcow2_cipher_run (sc, 1, 0, area + LUKS_CREATE_ALIGN, split_len);
  if (r < 0)
    goto out;
  put_be32 (slot0 + SLOT_OFF_STATE, LUKS_SLOT_ACTIVE);

  r = qcow2_cipher_new (&spec, master, true, out);
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
