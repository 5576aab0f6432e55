/* nbdkit-qcow2
 * Copyright (C) 2026 the nbdkit-qcow2 authors
 * SPDX-License-Identifier: BSD-3-Clause (see LICENSE)
 */

/* Unit test of core/crypto/ (the cipher engine, legacy AES and LUKS unlock).
 *
 *   test_crypt [FIXTURE_DIR]
 *
 * Without arguments only the self-contained legacy AES tests run (their
 * known answers come from `openssl enc`) and the exit status is 77, the
 * automake/meson "skipped" code, so a missing fixture directory is never
 * mistaken for a pass.  FIXTURE_DIR is the output of
 * tests/fixtures/make-crypt-fixtures.sh: qcow2 images made by qemu-img
 * whose LUKS headers and data this test decrypts.  Exit status 0 = pass,
 * 1 = failure (each failure is printed).
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "crypt.h"
#include "io.h"
#include "qcow2.h"
#include "util.h"
#include "testing.h"
#include "image_info.h"

static void
hex_to_bytes (const char *hex, unsigned char *out, size_t n)
{
  for (size_t i = 0; i < n; i++) {
    unsigned v;
    sscanf (hex + 2 * i, "%2x", &v);
    out[i] = (unsigned char) v;
  }
}

/* ---------------------------------------------------------------- */
/* Legacy AES known answers, computed with:
 *
 *   python3 -c 'import sys; sys.stdout.buffer.write(
 *     bytes((i*7+3)&0xff for i in range(1024)))' > pt.bin
 *   head -c 512 pt.bin | openssl enc -aes-128-cbc -nopad \
 *     -K 50415353000000000000000000000000 \
 *     -iv 05000000000000000000000000000000 | xxd -p
 *   head -c 512 pt.bin | openssl enc -aes-128-cbc -nopad \
 *     -K 30313233343536373839616263646566 \
 *     -iv 08070605040302010000000000000000 | xxd -p
 *   tail -c 512 pt.bin | openssl enc -aes-128-cbc -nopad \
 *     -K 30313233343536373839616263646566 \
 *     -iv 09070605040302010000000000000000 | xxd -p
 *
 * (key "PASS" zero padded; key = the first 16 bytes of
 * "0123456789abcdefXYZ"; IVs plain64 of sectors 5, 0x0102030405060708 and
 * the one after.)  Only the first 32 and last 16 bytes of each sector are
 * kept: with CBC the last block depends on every earlier one.
 */
struct kat_sector {
  const char *head32, *tail16;
};

static const struct kat_sector kat_pass_5 = {
  "6fe582d2817c13ea200b93a9ad1ff7e79f2446a70709de12ef3f087eceb54c4b",
  "15713398889ad3ba7fcf0c7ae08c8070",
};
static const struct kat_sector kat_long[2] = {
  { "b667a0bad635b9416bb3a16a17737857e9ff83132e39c8585295e192961dbb11",
    "9a4f518359d1d8a064626978bc33c070" },
  { "d8bbc86ffb46ebe82eb30797adda9567465edb1bbcba517ba1f1e0485c2a248f",
    "d28c329a0c7618fa35376620c4f0dae0" },
};

static void
fill_pt (unsigned char *buf, size_t n)
{
  for (size_t i = 0; i < n; i++)
    buf[i] = (unsigned char) ((i * 7 + 3) & 0xff);
}

static bool
kat_matches (const unsigned char *sector, const struct kat_sector *k)
{
  unsigned char head[32], tail[16];

  hex_to_bytes (k->head32, head, sizeof head);
  hex_to_bytes (k->tail16, tail, sizeof tail);
  return memcmp (sector, head, sizeof head) == 0 &&
         memcmp (sector + 512 - sizeof tail, tail, sizeof tail) == 0;
}

static void
test_aes_kat (void)
{
  struct qcow2_crypt *c;
  unsigned char buf[1024], pt[1024];
  int r;

  fill_pt (pt, sizeof pt);

  r = qcow2_crypt_open_aes ("PASS", &c);
  CHECK (r == 0, "open_aes PASS: %d", r);
  if (r == 0) {
    CHECK (!qcow2_crypt_iv_uses_host_offset (c), "legacy AES uses guest IV");
    memcpy (buf, pt, 512);
    r = qcow2_crypt_encrypt (c, 5, buf, 512);
    CHECK (r == 0, "encrypt: %d", r);
    CHECK (kat_matches (buf, &kat_pass_5), "AES KAT key PASS sector 5");
    r = qcow2_crypt_decrypt (c, 5, buf, 512);
    CHECK (r == 0 && memcmp (buf, pt, 512) == 0, "AES KAT decrypt back");
    qcow2_crypt_free (c);
  }

  /* Over-long passphrase: truncated to 16 bytes; the 64-bit sector
   * number is little-endian in the IV, and the second sector gets the
   * next IV.
   */
  r = qcow2_crypt_open_aes ("0123456789abcdefXYZ", &c);
  CHECK (r == 0, "open_aes long: %d", r);
  if (r == 0) {
    memcpy (buf, pt, sizeof buf);
    r = qcow2_crypt_encrypt (c, UINT64_C (0x0102030405060708), buf,
                             sizeof buf);
    CHECK (r == 0, "encrypt: %d", r);
    CHECK (kat_matches (buf, &kat_long[0]), "AES KAT long key sector 0");
    CHECK (kat_matches (buf + 512, &kat_long[1]), "AES KAT long key sector 1");
    r = qcow2_crypt_decrypt (c, UINT64_C (0x0102030405060708), buf,
                             sizeof buf);
    CHECK (r == 0 && memcmp (buf, pt, sizeof buf) == 0,
           "AES KAT long decrypt back");

    /* Lengths that are not whole sectors are refused. */
    r = qcow2_crypt_decrypt (c, 0, buf, 100);
    CHECK (r == -EINVAL, "decrypt 100 bytes: %d", r);
    r = qcow2_crypt_encrypt (c, 0, buf, 513);
    CHECK (r == -EINVAL, "encrypt 513 bytes: %d", r);
    r = qcow2_crypt_decrypt (c, 0, buf, 0);
    CHECK (r == 0, "decrypt 0 bytes: %d", r);
    qcow2_crypt_free (c);
  }

  r = qcow2_crypt_open_aes (NULL, &c);
  CHECK (r == -EINVAL, "open_aes NULL: %d", r);

  /* Identical plaintext sectors encrypt differently (the IV moves on). */
  r = qcow2_crypt_open_aes ("", &c);
  CHECK (r == 0, "open_aes empty: %d", r);
  if (r == 0) {
    memset (buf, 0x11, sizeof buf);
    qcow2_crypt_encrypt (c, 0, buf, sizeof buf);
    CHECK (memcmp (buf, buf + 512, 512) != 0, "sectors share ciphertext");
    qcow2_crypt_decrypt (c, 0, buf, sizeof buf);
    for (size_t i = 0; i < sizeof buf; i++)
      if (buf[i] != 0x11) {
        CHECK (buf[i] == 0x11, "empty-key round trip at %zu", i);
        break;
      }
    qcow2_crypt_free (c);
  }
  qcow2_crypt_free (NULL);
}

/* ---------------------------------------------------------------- */
/* Fixture images. */

#define GUEST_DATA 65536          /* the fixture data cluster */

/* The LUKS area and the host cluster of GUEST_DATA, which every fixture
 * has allocated.
 */
static int
fixture_info (struct qcow2_io *io, struct image_info *ii)
{
  int r = read_image_info (io, GUEST_DATA, ii);
  return r == 0 && ii->host_offset ? 0 : -1;
}

/* The fixture pattern: 32 KiB of 0x5a then 32 KiB of 0xc3 at GUEST_DATA,
 * in a 64 KiB cluster.
 */
static bool
has_pattern (const unsigned char *buf, size_t len)
{
  for (size_t i = 0; i < len; i++)
    if (buf[i] != (i < 32768 ? 0x5a : 0xc3))
      return false;
  return true;
}

static char *
fixture_path (const char *dir, const char *name)
{
  char *p;
  if (asprintf (&p, "%s/%s.qcow2", dir, name) < 0)
    abort ();
  return p;
}

/* Decrypt the data cluster with c and check the pattern, that encrypting
 * it again reproduces qemu's ciphertext, and that a wrong IV does not
 * decrypt.
 */
static void
check_data (const char *name, struct qcow2_crypt *c, struct qcow2_io *io,
            const struct image_info *ii, bool plain32)
{
  size_t len = ii->cluster_size;
  unsigned char *ct = malloc (len), *buf = malloc (len);
  uint64_t sector = (qcow2_crypt_iv_uses_host_offset (c) ? ii->host_offset
                     : GUEST_DATA) / QCOW2_CRYPT_SECTOR;
  int r;

  if (!ct || !buf)
    abort ();
  CHECK (len == 65536, "%s: cluster size %zu", name, len);
  r = qcow2_io_pread (io, ct, len, ii->host_offset);
  CHECK (r == 0, "%s: read data cluster: %d", name, r);

  memcpy (buf, ct, len);
  r = qcow2_crypt_decrypt (c, sector, buf, len);
  CHECK (r == 0 && has_pattern (buf, len), "%s: decrypt data (r=%d)", name,
         r);
  r = qcow2_crypt_encrypt (c, sector, buf, len);
  CHECK (r == 0 && memcmp (buf, ct, len) == 0, "%s: re-encrypt data (r=%d)",
         name, r);

  memcpy (buf, ct, 512);
  qcow2_crypt_decrypt (c, sector + 1, buf, 512);
  CHECK (!has_pattern (buf, 512),
         "%s: a wrong IV sector decrypted correctly", name);

  /* The "plain" IV generator keeps only the low 32 bits of the sector;
   * every other one keeps all 64.
   */
  memcpy (buf, ct, 512);
  qcow2_crypt_decrypt (c, sector + (UINT64_C (1) << 32), buf, 512);
  CHECK (has_pattern (buf, 512) == plain32,
         "%s: sector + 2^32 %s", name,
         plain32 ? "should decrypt (plain IV)" : "should not decrypt");
  free (ct);
  free (buf);
}

/* Open a LUKS fixture with each passphrase in passes (all must work) and
 * with a wrong one (must give -EPERM).
 */
static void
test_luks_fixture (const char *dir, const char *name,
                   const char *const *passes)
{
  char *path = fixture_path (dir, name);
  struct qcow2_io *io;
  struct image_info ii;
  struct qcow2_crypt *c;
  int r;

  r = qcow2_io_file_open (path, QCOW2_IO_READ_ONLY, &io);
  CHECK (r == 0, "%s: open: %d", path, r);
  if (r < 0)
    goto out;
  r = fixture_info (io, &ii);
  CHECK (r == 0 && ii.crypt_method == 2 && ii.luks_length >= 592,
         "%s: not a LUKS qcow2 fixture", path);
  if (r < 0 || ii.crypt_method != 2)
    goto out_io;

  for (; *passes; passes++) {
    r = qcow2_crypt_open_luks (io, ii.luks_offset, ii.luks_length, *passes,
                               &c);
    CHECK (r == 0, "%s: unlock with \"%s\": %d", name, *passes, r);
    if (r == 0) {
      CHECK (qcow2_crypt_iv_uses_host_offset (c), "%s: LUKS uses host IV",
             name);
      check_data (name, c, io, &ii, strstr (name, "-plain-") != NULL);
      qcow2_crypt_free (c);
    }
  }

  last_error[0] = '\0';
  r = qcow2_crypt_open_luks (io, ii.luks_offset, ii.luks_length, "WRONG",
                             &c);
  CHECK (r == -EPERM, "%s: wrong passphrase gave %d", name, r);
  CHECK (strstr (last_error, "passphrase") != NULL,
         "%s: wrong passphrase message", name);
  printf ("ok %s\n", name);

 out_io:
  qcow2_io_close (io);
 out:
  free (path);
}

static void
test_legacy_fixture (const char *dir)
{
  char *path = fixture_path (dir, "aes");
  struct qcow2_io *io;
  struct image_info ii;
  struct qcow2_crypt *c;
  unsigned char *buf;
  int r;

  r = qcow2_io_file_open (path, QCOW2_IO_READ_ONLY, &io);
  CHECK (r == 0, "%s: open: %d", path, r);
  if (r < 0)
    goto out;
  r = fixture_info (io, &ii);
  CHECK (r == 0 && ii.crypt_method == 1, "%s: not an AES qcow2", path);
  if (r < 0 || ii.crypt_method != 1)
    goto out_io;

  /* The qemu passphrase, and its first 16 bytes: the same key. */
  r = qcow2_crypt_open_aes ("0123456789abcdefXYZ", &c);
  CHECK (r == 0, "aes: open: %d", r);
  if (r == 0) {
    check_data ("aes", c, io, &ii, false);
    qcow2_crypt_free (c);
  }
  r = qcow2_crypt_open_aes ("0123456789abcdef", &c);
  CHECK (r == 0, "aes: open 16: %d", r);
  if (r == 0) {
    check_data ("aes (16-byte passphrase)", c, io, &ii, false);
    qcow2_crypt_free (c);
  }

  /* Legacy AES has no key check: a wrong passphrase decrypts to junk. */
  r = qcow2_crypt_open_aes ("0123456789abcdeX", &c);
  CHECK (r == 0, "aes: open wrong: %d", r);
  if (r == 0) {
    buf = malloc (ii.cluster_size);
    if (!buf)
      abort ();
    qcow2_io_pread (io, buf, ii.cluster_size, ii.host_offset);
    qcow2_crypt_decrypt (c, GUEST_DATA / 512, buf, ii.cluster_size);
    CHECK (!has_pattern (buf, ii.cluster_size), "aes: wrong key decrypted");
    free (buf);
    qcow2_crypt_free (c);
  }
  printf ("ok aes (legacy)\n");

 out_io:
  qcow2_io_close (io);
 out:
  free (path);
}

/* ---------------------------------------------------------------- */
/* Header validation: mutate a copy of the luks-xts header (slot 0 = PASS,
 * slot 3 = OTHER) in memory and check the outcome.
 */

static unsigned char *luks_base;
static uint64_t luks_base_len;

#define SLOT(i) (208 + 48 * (i))

static int
open_mem (const unsigned char *h, uint64_t area_len, uint64_t io_len,
          const char *pass)
{
  struct qcow2_io *io = qcow2_io_mem_new (h, io_len);
  struct qcow2_crypt *c = NULL;
  int r;

  if (!io)
    abort ();
  last_error[0] = '\0';
  r = qcow2_crypt_open_luks (io, 0, area_len, pass, &c);
  qcow2_crypt_free (c);
  qcow2_io_close (io);
  return r;
}

/* Run code against a fresh copy h (length len) and expect `expect` when
 * opened with passphrase pass.
 */
#define MUTATE(expect, pass, desc, ...)                                 \
  do {                                                                  \
    unsigned char *h = malloc (luks_base_len);                          \
    uint64_t len = luks_base_len;                                       \
    int r_;                                                             \
    if (!h)                                                             \
      abort ();                                                         \
    memcpy (h, luks_base, luks_base_len);                               \
    __VA_ARGS__;                                                        \
    r_ = open_mem (h, len, luks_base_len, pass);                        \
    CHECK (r_ == (expect), "mutation \"%s\": got %d, want %d", desc,    \
           r_, expect);                                                 \
    if (getenv ("TEST_VERBOSE"))                                        \
      printf ("  %-36s -> %d  %s\n", desc, r_, last_error);             \
    free (h);                                                           \
  } while (0)

static void
set_str (unsigned char *h, size_t off, size_t field, const char *s)
{
  memset (h + off, 0, field);
  memcpy (h + off, s, strlen (s));
}

static void
test_luks_mutations (const char *dir)
{
  char *path = fixture_path (dir, "luks-xts");
  struct qcow2_io *io;
  struct image_info ii;
  int r;

  r = qcow2_io_file_open (path, QCOW2_IO_READ_ONLY, &io);
  CHECK (r == 0, "%s: open: %d", path, r);
  if (r < 0) {
    free (path);
    return;
  }
  r = fixture_info (io, &ii);
  CHECK (r == 0 && ii.crypt_method == 2, "%s: bad fixture", path);
  luks_base_len = ii.luks_length;
  luks_base = malloc (luks_base_len);
  if (!luks_base)
    abort ();
  r = qcow2_io_pread (io, luks_base, luks_base_len, ii.luks_offset);
  CHECK (r == 0, "read LUKS area: %d", r);
  qcow2_io_close (io);
  free (path);
  if (r < 0)
    return;

  /* The fixture as qemu wrote it: slot 0 is PASS, slot 3 is OTHER. */
  CHECK (get_be32 (luks_base + SLOT (0)) == 0x00AC71F3 &&
         get_be32 (luks_base + SLOT (3)) == 0x00AC71F3,
         "fixture slots 0 and 3 active");

  MUTATE (0, "PASS", "unchanged, from memory");
  MUTATE (0, "OTHER", "unchanged, slot 3");
  MUTATE (-EINVAL, NULL, "no passphrase");
  MUTATE (-EPERM, "PAS", "passphrase prefix");
  MUTATE (-EINVAL, "PASS", "bad magic", h[0] = 'X');
  MUTATE (-ENOTSUP, "PASS", "version 2", h[7] = 2);
  MUTATE (-ENOTSUP, "PASS", "version 0", h[7] = 0);
  MUTATE (-ENOTSUP, "PASS", "cipher twofish", set_str (h, 8, 32, "twofish"));
  MUTATE (-ENOTSUP, "PASS", "cipher empty", set_str (h, 8, 32, ""));
  MUTATE (-EINVAL, "PASS", "cipher_name unterminated", memset (h + 8, 'a', 32));
  MUTATE (-ENOTSUP, "PASS", "mode ecb", set_str (h, 40, 32, "ecb"));
  MUTATE (-ENOTSUP, "PASS", "mode ctr-plain64",
          set_str (h, 40, 32, "ctr-plain64"));
  MUTATE (-ENOTSUP, "PASS", "mode xts-benbi", set_str (h, 40, 32, "xts-benbi"));
  MUTATE (-ENOTSUP, "PASS", "mode xts-", set_str (h, 40, 32, "xts-"));
  MUTATE (-ENOTSUP, "PASS", "mode -plain64", set_str (h, 40, 32, "-plain64"));
  MUTATE (-ENOTSUP, "PASS", "essiv:md5", set_str (h, 40, 32, "xts-essiv:md5"));
  MUTATE (-ENOTSUP, "PASS", "essiv:sha512 (64-byte key)",
          set_str (h, 40, 32, "xts-essiv:sha512"));
  MUTATE (-ENOTSUP, "PASS", "essiv:", set_str (h, 40, 32, "xts-essiv:"));
  MUTATE (-EINVAL, "PASS", "cipher_mode unterminated",
          memset (h + 40, 'x', 32));
  MUTATE (-ENOTSUP, "PASS", "hash whirlpool",
          set_str (h, 72, 32, "whirlpool"));
  MUTATE (-ENOTSUP, "PASS", "hash SHA256 (case)", set_str (h, 72, 32, "SHA256"));
  MUTATE (-ENOTSUP, "PASS", "hash shake256", set_str (h, 72, 32, "shake256"));
  MUTATE (-EINVAL, "PASS", "hash_spec unterminated", memset (h + 72, 's', 32));
  MUTATE (-EINVAL, "PASS", "uuid unterminated", memset (h + 168, '1', 40));
  MUTATE (-ENOTSUP, "PASS", "key_bytes 48 (aes-192-xts)",
          put_be32 (h + 108, 48));
  MUTATE (-EINVAL, "PASS", "key_bytes 0", put_be32 (h + 108, 0));
  MUTATE (-EINVAL, "PASS", "key_bytes 16 for xts", put_be32 (h + 108, 16));
  MUTATE (-EINVAL, "PASS", "key_bytes 63", put_be32 (h + 108, 63));
  MUTATE (-EINVAL, "PASS", "key_bytes 128", put_be32 (h + 108, 128));
  MUTATE (-EINVAL, "PASS", "key_bytes 2^32-1",
          put_be32 (h + 108, UINT32_MAX));
  MUTATE (-EINVAL, "PASS", "cbc key_bytes 64",
          set_str (h, 40, 32, "cbc-plain64"));
  /* A valid but different key size: the AF merge yields a wrong key. */
  MUTATE (-EPERM, "PASS", "key_bytes 32", put_be32 (h + 108, 32));
  MUTATE (-EINVAL, "PASS", "mk_digest_iter 0", put_be32 (h + 164, 0));
  MUTATE (-EINVAL, "PASS", "mk_digest_iter 2^31",
          put_be32 (h + 164, UINT32_C (0x80000000)));
  MUTATE (-EPERM, "PASS", "mk_digest flipped", h[112] ^= 1);
  MUTATE (-EPERM, "PASS", "mk_digest_salt flipped", h[132] ^= 1);
  MUTATE (-EINVAL, "PASS", "slot 0 state garbage",
          put_be32 (h + SLOT (0), 0x12345678));
  MUTATE (-EINVAL, "PASS", "slot 7 state 0", put_be32 (h + SLOT (7), 0));
  MUTATE (-EPERM, "PASS", "slot 0 disabled",
          put_be32 (h + SLOT (0), 0x0000DEAD));
  MUTATE (0, "OTHER", "slot 0 disabled, slot 3 ok",
          put_be32 (h + SLOT (0), 0x0000DEAD));
  MUTATE (-EPERM, "OTHER", "all slots disabled",
          for (int i = 0; i < 8; i++)
            put_be32 (h + SLOT (i), 0x0000DEAD));
  MUTATE (-EINVAL, "PASS", "slot 0 iterations 0",
          put_be32 (h + SLOT (0) + 4, 0));
  MUTATE (-EINVAL, "PASS", "slot 0 iterations 2^32-1",
          put_be32 (h + SLOT (0) + 4, UINT32_MAX));
  MUTATE (-EPERM, "PASS", "slot 0 iterations - 1",
          put_be32 (h + SLOT (0) + 4, get_be32 (h + SLOT (0) + 4) - 1));
  MUTATE (-EPERM, "PASS", "slot 0 salt flipped", h[SLOT (0) + 8] ^= 0x80);
  MUTATE (-EINVAL, "PASS", "slot 0 stripes 0",
          put_be32 (h + SLOT (0) + 44, 0));
  MUTATE (-EINVAL, "PASS", "slot 0 stripes 4001",
          put_be32 (h + SLOT (0) + 44, 4001));
  MUTATE (-EINVAL, "PASS", "slot 0 stripes 2^32-1",
          put_be32 (h + SLOT (0) + 44, UINT32_MAX));
  MUTATE (-EPERM, "PASS", "slot 0 stripes 3999",
          put_be32 (h + SLOT (0) + 44, 3999));
  MUTATE (-EPERM, "PASS", "slot 0 stripes 1",
          put_be32 (h + SLOT (0) + 44, 1));
  MUTATE (-EINVAL, "PASS", "slot 0 key material at 0",
          put_be32 (h + SLOT (0) + 40, 0));
  MUTATE (-EINVAL, "PASS", "slot 0 key material at 2^32-1 sectors",
          put_be32 (h + SLOT (0) + 40, UINT32_MAX));
  MUTATE (-EINVAL, "PASS", "slot 0 key material past area",
          put_be32 (h + SLOT (0) + 40, (uint32_t) (len / 512)));
  MUTATE (-EINVAL, "PASS", "slot 3 overlaps slot 0",
          memcpy (h + SLOT (3) + 40, h + SLOT (0) + 40, 4));
  /* Key material is key_bytes (64) * 4000 stripes = 500 sectors. */
  MUTATE (-EINVAL, "PASS", "slot 3 overlaps slot 0 tail",
          put_be32 (h + SLOT (3) + 40, get_be32 (h + SLOT (0) + 40) + 499));
  MUTATE (-EPERM, "OTHER", "slot 3 just after slot 0",
          put_be32 (h + SLOT (3) + 40, get_be32 (h + SLOT (0) + 40) + 500));
  MUTATE (-EPERM, "PASS", "slot 0 key material flipped",
          h[get_be32 (h + SLOT (0) + 40) * 512 + 1000] ^= 1);
  MUTATE (0, "OTHER", "slot 0 key material flipped, slot 3 ok",
          h[get_be32 (h + SLOT (0) + 40) * 512 + 1000] ^= 1);
  /* The area given to open_luks is shorter than the data. */
  MUTATE (-EINVAL, "PASS", "area 591 bytes", len = 591);
  MUTATE (-EINVAL, "PASS", "area 0 bytes", len = 0);
  MUTATE (-EINVAL, "PASS", "area ends inside slot 3",
          len = (uint64_t) get_be32 (h + SLOT (3) + 40) * 512 + 255999);
  MUTATE (0, "OTHER", "area ends at slot 3's end",
          len = (uint64_t) get_be32 (h + SLOT (3) + 40) * 512 + 256000);

  /* The area runs past the end of the backend. */
  {
    struct qcow2_io *mio = qcow2_io_mem_new (luks_base, luks_base_len);
    struct qcow2_crypt *c;
    if (!mio)
      abort ();
    r = qcow2_crypt_open_luks (mio, 0, luks_base_len + 1, "PASS", &c);
    CHECK (r == -EINVAL, "area past EOF: %d", r);
    r = qcow2_crypt_open_luks (mio, 1, luks_base_len, "PASS", &c);
    CHECK (r == -EINVAL, "area shifted past EOF: %d", r);
    r = qcow2_crypt_open_luks (mio, UINT64_MAX - 10, 1000, "PASS", &c);
    CHECK (r == -EINVAL, "area offset near 2^64: %d", r);
    qcow2_io_close (mio);
  }
  printf ("ok LUKS header validation\n");
}

/* ---------------------------------------------------------------- */
/* Many threads sharing one crypt object. */

struct thread_arg {
  struct qcow2_crypt *c;
  const unsigned char *ct;
  size_t len;
  uint64_t sector;
  int bad;
};

static void *
thread_main (void *opaque)
{
  struct thread_arg *a = opaque;
  unsigned char *buf = malloc (a->len);

  if (!buf)
    abort ();
  for (int i = 0; i < 40; i++) {
    memcpy (buf, a->ct, a->len);
    if (qcow2_crypt_decrypt (a->c, a->sector, buf, a->len) < 0 ||
        !has_pattern (buf, a->len))
      a->bad++;
    if (qcow2_crypt_encrypt (a->c, a->sector, buf, a->len) < 0 ||
        memcmp (buf, a->ct, a->len) != 0)
      a->bad++;
  }
  free (buf);
  return NULL;
}

static void
test_threads (const char *dir, const char *name)
{
  char *path = fixture_path (dir, name);
  struct qcow2_io *io;
  struct image_info ii;
  struct qcow2_crypt *c;
  unsigned char *ct;
  pthread_t t[6];
  struct thread_arg a[6];
  int r;

  r = qcow2_io_file_open (path, QCOW2_IO_READ_ONLY, &io);
  free (path);
  CHECK (r == 0, "threads: open: %d", r);
  if (r < 0)
    return;
  if (fixture_info (io, &ii) < 0 ||
      qcow2_crypt_open_luks (io, ii.luks_offset, ii.luks_length, "PASS",
                             &c) < 0) {
    CHECK (0, "threads: cannot open %s", name);
    qcow2_io_close (io);
    return;
  }
  ct = malloc (ii.cluster_size);
  if (!ct)
    abort ();
  qcow2_io_pread (io, ct, ii.cluster_size, ii.host_offset);
  for (int i = 0; i < 6; i++) {
    a[i] = (struct thread_arg) { c, ct, ii.cluster_size,
                                 ii.host_offset / 512, 0 };
    if (pthread_create (&t[i], NULL, thread_main, &a[i]) != 0)
      abort ();
  }
  for (int i = 0; i < 6; i++) {
    pthread_join (t[i], NULL);
    CHECK (a[i].bad == 0, "threads (%s): thread %d saw %d bad results",
           name, i, a[i].bad);
  }
  printf ("ok threads (%s)\n", name);
  free (ct);
  qcow2_crypt_free (c);
  qcow2_io_close (io);
}

int
main (int argc, char **argv)
{
  static const char *const pass[] = { "PASS", NULL };
  static const char *const pass_other[] = { "PASS", "OTHER", NULL };

  qcow2_set_error_handler (capture_error, NULL);

  test_aes_kat ();
  printf ("ok legacy AES known answers\n");

  if (argc < 2) {
    printf ("SKIP LUKS and fixture tests: no fixture directory given\n");
    return failures ? 1 : 77;
  }
  test_luks_fixture (argv[1], "luks-xts", pass_other);
  test_luks_fixture (argv[1], "luks-xts128-sha384", pass);
  test_luks_fixture (argv[1], "luks-cbc-essiv", pass);
  test_luks_fixture (argv[1], "luks-cbc-plain64-sha512", pass);
  test_luks_fixture (argv[1], "luks-cbc-plain-sha1", pass);
  test_legacy_fixture (argv[1]);
  test_luks_mutations (argv[1]);
  test_threads (argv[1], "luks-xts");
  test_threads (argv[1], "luks-cbc-essiv");
  free (luks_base);

  if (failures) {
    printf ("FAILED: %d check(s)\n", failures);
    return 1;
  }
  printf ("PASS\n");
  return 0;
}
