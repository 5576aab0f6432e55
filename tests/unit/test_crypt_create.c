/* nbdkit-qcow2
 * Copyright (C) 2026 the nbdkit-qcow2 authors
 * SPDX-License-Identifier: BSD-3-Clause (see LICENSE)
 */

/* Unit test of LUKS header creation (qcow2_crypt_create_luks).
 *
 *   test_crypt_create [WORK_DIR]
 *
 * For several cipher settings: the created area must have QEMU's layout,
 * unlock with its passphrase and no other, and its crypt object must
 * agree with the one qcow2_crypt_open_luks gives.  The oracle is QEMU:
 * the area replaces the LUKS area of an image qemu-img made with the
 * same settings (so the lengths must agree), qemu-io must unlock it with
 * the new passphrase and write and read data, and that data must
 * decrypt with our key and vice versa.  Temporary images go to a new
 * directory under WORK_DIR (default $TMPDIR or /tmp), removed at the end
 * unless TEST_KEEP is set.
 *
 * Exit status 0 = pass, 1 = failure (each failure is printed), 77 =
 * qemu-img / qemu-io are missing, so only the in-memory part ran (and
 * passed).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "crypt.h"
#include "io.h"
#include "qcow2.h"
#include "util.h"
#include "testing.h"
#include "image_info.h"

static double
cpu_ms (void)
{
  struct timespec ts;
  clock_gettime (CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* ---------------------------------------------------------------- */
/* LUKS1 header fields (big-endian). */

#define H_CIPHER_NAME 8
#define H_CIPHER_MODE 40
#define H_HASH_SPEC 72
#define H_PAYLOAD 104
#define H_KEY_BYTES 108
#define H_MK_DIGEST 112
#define H_MK_SALT 132
#define H_MK_ITER 164
#define H_UUID 168
#define SLOT(i) (208 + 48 * (i))
#define S_ITER 4
#define S_SALT 8
#define S_KM 40
#define S_STRIPES 44
#define ACTIVE 0x00AC71F3
#define INACTIVE 0x0000DEAD

struct setting {
  const char *label;
  struct qcow2_luks_params p;   /* NULL strings = defaults */
  /* What the header must say. */
  const char *mode_spec, *hash;
  uint32_t key_bytes;
  size_t area_len;
  bool plain32;                 /* the "plain" IV generator */
};

/* QEMU's layout: 4096 + 8 * round_up (key_bytes * 4000, 4096). */
#define AREA(kb) (4096 + 8 * (((kb) * 4000 + 4095) / 4096 * 4096))

static const struct setting settings[] = {
  { "default (aes-256-xts-plain64, sha256)",
    { .iterations = 1000 }, "xts-plain64", "sha256", 64, AREA (64), false },
  { "aes-128-cbc-essiv:sha256, sha256",
    { "aes-128", "cbc", "essiv", "sha256", "sha256", 0, 1000 },
    "cbc-essiv:sha256", "sha256", 16, AREA (16), false },
  { "aes-256-cbc-plain64, sha512",
    { "aes-256", "cbc", "plain64", NULL, "sha512", 0, 1000 },
    "cbc-plain64", "sha512", 32, AREA (32), false },
  { "aes-128-xts-plain, sha1",
    { "aes-128", "xts", "plain", "sha256", "sha1", 0, 1000 },
    "xts-plain", "sha1", 32, AREA (32), true },
  { "aes-256-xts-essiv:sha256, sha384",
    { "aes-256", "xts", "essiv", NULL, "sha384", 0, 1200 },
    "xts-essiv:sha256", "sha384", 64, AREA (64), false },
};

static bool
field_is (const unsigned char *h, size_t off, const char *s)
{
  return strncmp ((const char *) h + off, s, 32) == 0;
}

static bool
uuid_ok (const unsigned char *h)
{
  const char *u = (const char *) h + H_UUID;

  if (strnlen (u, 40) != 36)
    return false;
  for (int i = 0; i < 36; i++) {
    if (i == 8 || i == 13 || i == 18 || i == 23) {
      if (u[i] != '-')
        return false;
    }
    else if (!strchr ("0123456789abcdef", u[i]))
      return false;
  }
  return u[14] == '4' && strchr ("89ab", u[19]) != NULL;
}

/* Everything in the header that does not depend on randomness or on the
 * iteration counts.
 */
static void
check_header (const struct setting *s, const unsigned char *h, size_t len)
{
  const uint32_t span = (s->key_bytes * 4000 + 4095) / 4096 * 4096;

  CHECK (len == s->area_len, "%s: area length %zu, want %zu", s->label, len,
         s->area_len);
  CHECK (memcmp (h, "LUKS\xba\xbe\0\1", 8) == 0, "%s: magic/version",
         s->label);
  CHECK (field_is (h, H_CIPHER_NAME, "aes"), "%s: cipher_name %.32s",
         s->label, h + H_CIPHER_NAME);
  CHECK (field_is (h, H_CIPHER_MODE, s->mode_spec), "%s: cipher_mode %.32s",
         s->label, h + H_CIPHER_MODE);
  CHECK (field_is (h, H_HASH_SPEC, s->hash), "%s: hash_spec %.32s", s->label,
         h + H_HASH_SPEC);
  CHECK (get_be32 (h + H_PAYLOAD) * 512 == len, "%s: payload offset %u",
         s->label, get_be32 (h + H_PAYLOAD));
  CHECK (get_be32 (h + H_KEY_BYTES) == s->key_bytes, "%s: key_bytes %u",
         s->label, get_be32 (h + H_KEY_BYTES));
  CHECK (get_be32 (h + H_MK_ITER) >= 1000, "%s: mk iterations %u", s->label,
         get_be32 (h + H_MK_ITER));
  CHECK (uuid_ok (h), "%s: uuid \"%.40s\"", s->label, h + H_UUID);
  for (int i = 0; i < 8; i++) {
    const unsigned char *sl = h + SLOT (i);
    static const unsigned char zero[32];
    CHECK (get_be32 (sl) == (i == 0 ? ACTIVE : INACTIVE),
           "%s: slot %d state %#x", s->label, i, get_be32 (sl));
    CHECK (get_be32 (sl + S_KM) * UINT64_C (512) == 4096 + i * span,
           "%s: slot %d key material at sector %u", s->label, i,
           get_be32 (sl + S_KM));
    CHECK (get_be32 (sl + S_STRIPES) == 4000, "%s: slot %d stripes %u",
           s->label, i, get_be32 (sl + S_STRIPES));
    if (i == 0)
      CHECK (get_be32 (sl + S_ITER) >= 1000 &&
             memcmp (sl + S_SALT, zero, 32) != 0,
             "%s: slot 0 iterations %u / salt", s->label,
             get_be32 (sl + S_ITER));
    else
      CHECK (get_be32 (sl + S_ITER) == 0 &&
             memcmp (sl + S_SALT, zero, 32) == 0,
             "%s: inactive slot %d has iterations or salt", s->label, i);
  }
  /* Between the header and the key material, and after slot 0's
   * material, the area is zero.
   */
  for (size_t i = 592; i < 4096; i++)
    if (h[i]) {
      CHECK (h[i] == 0, "%s: header padding byte %zu", s->label, i);
      break;
    }
  for (size_t i = 4096 + (size_t) s->key_bytes * 4000; i < len; i++)
    if (h[i]) {
      CHECK (h[i] == 0, "%s: byte %zu after slot 0's material", s->label, i);
      break;
    }
}

static int
open_area (const unsigned char *area, size_t len, const char *pass,
           struct qcow2_crypt **c)
{
  struct qcow2_io *io = qcow2_io_mem_new (area, len);
  int r;

  if (!io)
    abort ();
  last_error[0] = '\0';
  *c = NULL;
  r = qcow2_crypt_open_luks (io, 0, len, pass, c);
  qcow2_io_close (io);
  return r;
}

static void
fill_random (unsigned char *buf, size_t n, unsigned seed)
{
  for (size_t i = 0; i < n; i++) {
    seed = seed * 1103515245 + 12345;
    buf[i] = (unsigned char) (seed >> 16);
  }
}

/* The created object and the reopened one encrypt and decrypt alike. */
static void
check_round_trip (const char *label, struct qcow2_crypt *made,
                  struct qcow2_crypt *opened, bool plain32)
{
  enum { N = 4096 };
  unsigned char pt[N], a[N], b[N];
  const uint64_t sector = UINT64_C (0x123456789);
  int r;

  CHECK (qcow2_crypt_iv_uses_host_offset (made) &&
         qcow2_crypt_iv_uses_host_offset (opened),
         "%s: LUKS IVs use host offsets", label);
  fill_random (pt, N, 42);
  memcpy (a, pt, N);
  r = qcow2_crypt_encrypt (made, sector, a, N);
  CHECK (r == 0 && memcmp (a, pt, N) != 0, "%s: encrypt (%d)", label, r);
  memcpy (b, a, N);
  r = qcow2_crypt_decrypt (opened, sector, b, N);
  CHECK (r == 0 && memcmp (b, pt, N) == 0,
         "%s: created encrypts, reopened decrypts (%d)", label, r);
  memcpy (b, pt, N);
  r = qcow2_crypt_encrypt (opened, sector, b, N);
  CHECK (r == 0 && memcmp (a, b, N) == 0,
         "%s: both encrypt alike (%d)", label, r);
  r = qcow2_crypt_decrypt (made, sector, b, N);
  CHECK (r == 0 && memcmp (b, pt, N) == 0,
         "%s: reopened encrypts, created decrypts (%d)", label, r);
  /* The IV does depend on the sector (only its low 32 bits for plain). */
  memcpy (b, a, 512);
  qcow2_crypt_decrypt (opened, sector + (UINT64_C (1) << 32), b, 512);
  CHECK ((memcmp (b, pt, 512) == 0) == plain32, "%s: IV width", label);
}

/* ---------------------------------------------------------------- */
/* QEMU. */

static char *workdir;
static bool have_qemu;

/* Run a shell command; its output (stdout and stderr) goes to out.
 * Returns the exit status, or -1.
 */
static int
run (char *out, size_t outsz, const char *fmt, ...)
{
  char cmd[4096];
  size_t n = 0;
  va_list ap;
  FILE *fp;
  int st;

  va_start (ap, fmt);
  vsnprintf (cmd, sizeof cmd - 8, fmt, ap);
  va_end (ap);
  strcat (cmd, " 2>&1");
  fp = popen (cmd, "r");
  if (!fp)
    return -1;
  out[0] = '\0';
  while (n + 1 < outsz) {
    size_t k = fread (out + n, 1, outsz - 1 - n, fp);
    if (k == 0)
      break;
    n += k;
  }
  out[n] = '\0';
  /* Drain whatever did not fit. */
  {
    char junk[4096];
    while (fread (junk, 1, sizeof junk, fp) > 0)
      ;
  }
  st = pclose (fp);
  if (getenv ("TEST_VERBOSE"))
    printf ("  $ %s\n%s", cmd, out);
  return WIFEXITED (st) ? WEXITSTATUS (st) : -1;
}

static int
pwrite_file (const char *path, const void *buf, size_t len, uint64_t off)
{
  int fd = open (path, O_WRONLY);
  ssize_t n;

  if (fd < 0)
    return -1;
  n = pwrite (fd, buf, len, (off_t) off);
  close (fd);
  return n == (ssize_t) len ? 0 : -1;
}

static int
pread_file (const char *path, void *buf, size_t len, uint64_t off)
{
  int fd = open (path, O_RDONLY);
  ssize_t n;

  if (fd < 0)
    return -1;
  n = pread (fd, buf, len, (off_t) off);
  close (fd);
  return n == (ssize_t) len ? 0 : -1;
}

static int
image_info (const char *path, struct image_info *ii)
{
  struct qcow2_io *io;
  int r = qcow2_io_file_open (path, QCOW2_IO_READ_ONLY, &io);

  if (r < 0)
    return r;
  /* The LUKS area, and the host cluster of guest offset 0 (0 when
   * unallocated).
   */
  r = read_image_info (io, 0, ii);
  qcow2_io_close (io);
  return r == 0 && ii->luks_length ? 0 : -1;
}

/* qemu-io on path with passphrase pass; cmds is a string of -c options. */
static int
qemu_io (char *out, size_t outsz, const char *path, const char *pass,
         const char *cmds)
{
  return run (out, outsz,
              "qemu-io --object secret,id=s0,data=%s --image-opts "
              "driver=qcow2,file.filename=%s,encrypt.key-secret=s0 %s",
              pass, path, cmds);
}

static bool
all_bytes (const unsigned char *buf, size_t n, unsigned char v)
{
  for (size_t i = 0; i < n; i++)
    if (buf[i] != v)
      return false;
  return true;
}

/* The QEMU oracle for one created area (passphrase NEWPASS). */
static void
check_with_qemu (const struct setting *s, const unsigned char *area,
                 size_t area_len, struct qcow2_crypt *made, int idx)
{
  const struct qcow2_luks_params *p = &s->p;
  char path[PATH_MAX], opts[512], out[8192];
  struct image_info ii;
  unsigned char qhdr[592], *cl = NULL;
  struct qcow2_crypt *c = NULL;
  int st = -1, r;

  snprintf (path, sizeof path, "%s/img%d.qcow2", workdir, idx);
  snprintf (opts, sizeof opts,
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,"
            "encrypt.cipher-alg=%s,encrypt.cipher-mode=%s,"
            "encrypt.ivgen-alg=%s,encrypt.hash-alg=%s%s%s",
            p->cipher_alg ? p->cipher_alg : "aes-256",
            p->cipher_mode ? p->cipher_mode : "xts",
            p->ivgen_alg ? p->ivgen_alg : "plain64",
            p->hash_alg ? p->hash_alg : "sha256",
            p->ivgen_alg && strcmp (p->ivgen_alg, "essiv") == 0
            ? ",encrypt.ivgen-hash-alg=" : "",
            p->ivgen_alg && strcmp (p->ivgen_alg, "essiv") == 0
            ? (p->ivgen_hash ? p->ivgen_hash : "sha256") : "");
  /* QEMU's own PBKDF2 benchmark fails spuriously ("Unable to get accurate
   * CPU usage": it reads only user time, which on this kind of VM is 0 ms
   * for its first round about half the time, more often for fast hashes).
   * Each try is a new process, so 40 tries (as tests/integration/images.py
   * and tests/fixtures/make-crypt-fixtures.sh do) make a spurious failure
   * about 1 in 10^12; 10 tries were seen to fail in CI. */
  for (int tries = 0; tries < 40; tries++) {
    st = run (out, sizeof out,
              "qemu-img create -q -f qcow2 --object secret,id=s0,data=PASS "
              "-o %s %s 1M", opts, path);
    if (st == 0 || !strstr (out, "Unable to get accurate CPU usage"))
      break;
    unlink (path);
    usleep (50 * 1000);
  }
  CHECK (st == 0, "%s: qemu-img create: %s", s->label, out);
  if (st != 0)
    return;

  r = image_info (path, &ii);
  CHECK (r == 0 && ii.crypt_method == 2, "%s: reading qemu's image",
         s->label);
  if (r != 0)
    return;
  /* The same layout as QEMU's: length, and every header byte that is not
   * random or timed.
   */
  CHECK (ii.luks_length == area_len,
         "%s: QEMU's LUKS area is %" PRIu64 " bytes, ours %zu", s->label,
         ii.luks_length, area_len);
  r = pread_file (path, qhdr, sizeof qhdr, ii.luks_offset);
  CHECK (r == 0, "%s: read QEMU's header", s->label);
  CHECK (memcmp (qhdr, area, H_MK_DIGEST) == 0,
         "%s: header bytes 0-111 differ from QEMU's", s->label);
  for (int i = 0; i < 8; i++) {
    const unsigned char *q = qhdr + SLOT (i), *o = area + SLOT (i);
    CHECK (memcmp (q, o, 4) == 0 && memcmp (q + S_KM, o + S_KM, 8) == 0,
           "%s: slot %d state/offset/stripes differ from QEMU's", s->label,
           i);
    if (i > 0)
      CHECK (memcmp (q, o, 48) == 0, "%s: inactive slot %d differs from "
             "QEMU's", s->label, i);
  }
  if (ii.luks_length != area_len)
    return;

  /* Our area in QEMU's image, for passphrase NEWPASS. */
  r = pwrite_file (path, area, area_len, ii.luks_offset);
  CHECK (r == 0, "%s: write area", s->label);

  st = qemu_io (out, sizeof out, path, "NEWPASS",
                "-c 'write -P 0x5a 0 64k' -c 'read -P 0x5a 0 64k'");
  CHECK (st == 0 && strstr (out, "wrote 65536/65536") &&
         strstr (out, "read 65536/65536") && !strstr (out, "fail"),
         "%s: qemu-io write/read with NEWPASS (exit %d): %s", s->label, st,
         out);
  st = qemu_io (out, sizeof out, path, "PASS", "-c 'read 0 512'");
  CHECK (st != 0 && strstr (out, "password"),
         "%s: qemu-io with the old passphrase (exit %d): %s", s->label, st,
         out);

  /* What QEMU wrote decrypts with our reopened key... */
  r = image_info (path, &ii);
  CHECK (r == 0 && ii.host_offset != 0 && ii.cluster_size == 65536,
         "%s: guest cluster 0 not allocated", s->label);
  if (r != 0 || ii.host_offset == 0 || ii.cluster_size != 65536)
    return;
  cl = malloc (65536);
  if (!cl)
    abort ();
  {
    struct qcow2_io *io;
    r = qcow2_io_file_open (path, QCOW2_IO_READ_ONLY, &io);
    CHECK (r == 0, "%s: open image", s->label);
    if (r == 0) {
      r = qcow2_crypt_open_luks (io, ii.luks_offset, ii.luks_length,
                                 "NEWPASS", &c);
      CHECK (r == 0, "%s: our unlock of the image: %d", s->label, r);
      qcow2_io_close (io);
    }
  }
  if (c) {
    r = pread_file (path, cl, 65536, ii.host_offset);
    CHECK (r == 0, "%s: read data cluster", s->label);
    r = qcow2_crypt_decrypt (c, ii.host_offset / 512, cl, 65536);
    CHECK (r == 0 && all_bytes (cl, 65536, 0x5a),
           "%s: QEMU's data does not decrypt with our key", s->label);
  }

  /* ... and what the created object encrypts, QEMU reads. */
  memset (cl, 0xa5, 65536);
  r = qcow2_crypt_encrypt (made, ii.host_offset / 512, cl, 65536);
  CHECK (r == 0, "%s: encrypt", s->label);
  r = pwrite_file (path, cl, 65536, ii.host_offset);
  CHECK (r == 0, "%s: write data cluster", s->label);
  st = qemu_io (out, sizeof out, path, "NEWPASS",
                "-c 'read -P 0xa5 0 64k'");
  CHECK (st == 0 && strstr (out, "read 65536/65536") && !strstr (out, "fail"),
         "%s: QEMU reading our ciphertext (exit %d): %s", s->label, st, out);

  st = run (out, sizeof out,
            "qemu-img check -q --object secret,id=s0,data=NEWPASS "
            "--image-opts driver=qcow2,file.filename=%s,"
            "encrypt.key-secret=s0", path);
  CHECK (st == 0, "%s: qemu-img check (exit %d): %s", s->label, st, out);

  qcow2_crypt_free (c);
  free (cl);
  if (!getenv ("TEST_KEEP"))
    unlink (path);
}

/* ---------------------------------------------------------------- */

static void
test_setting (const struct setting *s, int idx)
{
  unsigned char *area = NULL;
  size_t len = 0;
  struct qcow2_crypt *made = NULL, *c = NULL;
  int r;

  r = qcow2_crypt_create_luks (&s->p, "NEWPASS", &area, &len, &made);
  CHECK (r == 0 && area && made, "%s: create: %d", s->label, r);
  if (r != 0)
    return;
  check_header (s, area, len);
  if (s->p.iterations)
    CHECK (get_be32 (area + SLOT (0) + S_ITER) == s->p.iterations &&
           get_be32 (area + H_MK_ITER) ==
           (s->p.iterations / 8 > 1000 ? s->p.iterations / 8 : 1000),
           "%s: fixed iterations: slot %u, digest %u", s->label,
           get_be32 (area + SLOT (0) + S_ITER), get_be32 (area + H_MK_ITER));

  r = open_area (area, len, "NEWPASS", &c);
  CHECK (r == 0, "%s: unlock: %d", s->label, r);
  if (r == 0)
    check_round_trip (s->label, made, c, s->plain32);
  qcow2_crypt_free (c);
  r = open_area (area, len, "WRONG", &c);
  CHECK (r == -EPERM && strstr (last_error, "passphrase"),
         "%s: wrong passphrase gave %d", s->label, r);
  r = open_area (area, len, "NEWPAS", &c);
  CHECK (r == -EPERM, "%s: passphrase prefix gave %d", s->label, r);
  r = open_area (area, len, "", &c);
  CHECK (r == -EPERM, "%s: empty passphrase gave %d", s->label, r);

  if (have_qemu)
    check_with_qemu (s, area, len, made, idx);
  qcow2_crypt_free (made);
  free (area);
  printf ("ok %s\n", s->label);
}

/* Two creations share nothing random: master key, salts, uuid. */
static void
test_fresh_randomness (void)
{
  const struct qcow2_luks_params p = { .iterations = 1000 };
  unsigned char *a1, *a2, b1[512], b2[512];
  size_t l1, l2;
  struct qcow2_crypt *c1, *c2;
  int r1, r2;

  r1 = qcow2_crypt_create_luks (&p, "same", &a1, &l1, &c1);
  r2 = qcow2_crypt_create_luks (&p, "same", &a2, &l2, &c2);
  CHECK (r1 == 0 && r2 == 0, "create twice: %d %d", r1, r2);
  if (r1 || r2)
    return;
  CHECK (memcmp (a1 + H_MK_SALT, a2 + H_MK_SALT, 32) != 0, "same mk salt");
  CHECK (memcmp (a1 + H_MK_DIGEST, a2 + H_MK_DIGEST, 20) != 0,
         "same mk digest");
  CHECK (memcmp (a1 + H_UUID, a2 + H_UUID, 40) != 0, "same uuid");
  CHECK (memcmp (a1 + SLOT (0) + S_SALT, a2 + SLOT (0) + S_SALT, 32) != 0,
         "same slot salt");
  CHECK (memcmp (a1 + 4096, a2 + 4096, 4096) != 0, "same key material");
  memset (b1, 0, sizeof b1);
  memset (b2, 0, sizeof b2);
  qcow2_crypt_encrypt (c1, 0, b1, sizeof b1);
  qcow2_crypt_encrypt (c2, 0, b2, sizeof b2);
  CHECK (memcmp (b1, b2, sizeof b1) != 0, "same master key");
  qcow2_crypt_free (c1);
  qcow2_crypt_free (c2);
  free (a1);
  free (a2);
  printf ("ok fresh randomness\n");
}

/* Timed iteration counts: iter_time_ms = 50 must give an unlock that
 * takes roughly 50 ms of CPU (plus an eighth for the digest), and 2000
 * (the default, via NULL params) about 40 times the iterations.  The
 * bounds are loose on purpose: a loaded machine varies, and under
 * AddressSanitizer OpenSSL's PBKDF2 runs about 15 times slower and less
 * steadily (the unlock can take a quarter of the measured time), so the
 * time bounds are a tenth to twenty times the target.  The iteration
 * counts carry the real check: above the 1000 floor, and scaling with
 * the time asked for.
 */
static void
test_iter_time (void)
{
  const struct qcow2_luks_params p = { .iter_time_ms = 50 };
  unsigned char *area;
  size_t len;
  struct qcow2_crypt *made, *c;
  uint32_t it50, mk50, it2000 = 0;
  double t0, t_create, t_open;
  int r;

  t0 = cpu_ms ();
  r = qcow2_crypt_create_luks (&p, "NEWPASS", &area, &len, &made);
  t_create = cpu_ms () - t0;
  CHECK (r == 0, "create iter_time 50: %d", r);
  if (r != 0)
    return;
  it50 = get_be32 (area + SLOT (0) + S_ITER);
  mk50 = get_be32 (area + H_MK_ITER);
  CHECK (it50 > 1000, "iter_time 50: slot iterations %u", it50);
  /* The digest needs 1 SHA-256 block of output, the slot key (64 bytes)
   * 2, so the digest count is near 2/8 of the slot's.
   */
  CHECK (mk50 >= 1000 && mk50 >= it50 / 16 && mk50 <= it50 / 2,
         "iter_time 50: digest iterations %u vs slot %u", mk50, it50);
  t0 = cpu_ms ();
  r = open_area (area, len, "NEWPASS", &c);
  t_open = cpu_ms () - t0;
  CHECK (r == 0, "iter_time 50: unlock: %d", r);
  CHECK (t_open >= 5 && t_open <= 1000,
         "iter_time 50: unlock took %.1f ms of CPU", t_open);
  printf ("  iter_time 50 ms: slot %u, digest %u iterations; create %.0f ms, "
          "unlock %.0f ms (CPU)\n", it50, mk50, t_create, t_open);
  if (r == 0)
    check_round_trip ("iter_time 50", made, c, false);
  qcow2_crypt_free (c);
  if (have_qemu) {
    static const struct setting s = {
      "iter_time 50", { .iter_time_ms = 50 }, "xts-plain64", "sha256", 64,
      AREA (64), false
    };
    check_with_qemu (&s, area, len, made, 100);
  }
  qcow2_crypt_free (made);
  free (area);

  if (getenv ("TEST_QUICK")) {
    printf ("ok iter_time (default 2000 ms skipped: TEST_QUICK)\n");
    return;
  }
  t0 = cpu_ms ();
  r = qcow2_crypt_create_luks (NULL, "NEWPASS", &area, &len, &made);
  t_create = cpu_ms () - t0;
  CHECK (r == 0 && len == AREA (64), "create NULL params: %d", r);
  if (r != 0)
    return;
  it2000 = get_be32 (area + SLOT (0) + S_ITER);
  CHECK (it2000 >= 10 * (uint64_t) it50 && it2000 <= 160 * (uint64_t) it50,
         "iter_time 2000: slot iterations %u vs %u for 50 ms", it2000, it50);
  CHECK (field_is (area, H_CIPHER_MODE, "xts-plain64") &&
         get_be32 (area + H_KEY_BYTES) == 64 &&
         field_is (area, H_HASH_SPEC, "sha256"), "NULL params: defaults");
  t0 = cpu_ms ();
  r = open_area (area, len, "NEWPASS", &c);
  t_open = cpu_ms () - t0;
  CHECK (r == 0, "default: unlock: %d", r);
  CHECK (t_open >= 200 && t_open <= 20000,
         "default: unlock took %.1f ms of CPU", t_open);
  printf ("  iter_time 2000 ms: slot %u, digest %u iterations; create %.0f "
          "ms, unlock %.0f ms (CPU)\n", it2000, get_be32 (area + H_MK_ITER),
          t_create, t_open);
  qcow2_crypt_free (c);
  qcow2_crypt_free (made);
  free (area);
  printf ("ok iter_time\n");
}

static void
expect_fail (int want, const char *desc, const struct qcow2_luks_params *p,
             const char *pass)
{
  unsigned char *area = (unsigned char *) "x";
  size_t len = 1;
  struct qcow2_crypt *c = (struct qcow2_crypt *) "x";
  int r;

  last_error[0] = '\0';
  r = qcow2_crypt_create_luks (p, pass, &area, &len, &c);
  CHECK (r == want, "%s: got %d, want %d", desc, r, want);
  CHECK (area == NULL && len == 0 && c == NULL, "%s: outputs not cleared",
         desc);
  CHECK (last_error[0] != '\0', "%s: no message", desc);
  if (getenv ("TEST_VERBOSE"))
    printf ("  %-28s -> %d  %s\n", desc, r, last_error);
  if (r == 0) {
    qcow2_crypt_free (c);
    free (area);
  }
}

static void
test_errors (void)
{
#define P(...) (&(const struct qcow2_luks_params) { __VA_ARGS__ })
  expect_fail (-EINVAL, "NULL passphrase", P (.iterations = 1000), NULL);
  expect_fail (-ENOTSUP, "aes-192", P (.cipher_alg = "aes-192"), "p");
  expect_fail (-ENOTSUP, "aes-512", P (.cipher_alg = "aes-512"), "p");
  expect_fail (-ENOTSUP, "twofish", P (.cipher_alg = "twofish-256"), "p");
  expect_fail (-ENOTSUP, "mode ecb", P (.cipher_mode = "ecb"), "p");
  expect_fail (-ENOTSUP, "mode XTS", P (.cipher_mode = "XTS"), "p");
  expect_fail (-ENOTSUP, "ivgen benbi", P (.ivgen_alg = "benbi"), "p");
  expect_fail (-ENOTSUP, "essiv sha512",
               P (.ivgen_alg = "essiv", .ivgen_hash = "sha512"), "p");
  expect_fail (-ENOTSUP, "essiv sha1",
               P (.ivgen_alg = "essiv", .ivgen_hash = "sha1"), "p");
  expect_fail (-ENOTSUP, "ivgen hash md5 (plain64)",
               P (.ivgen_hash = "md5"), "p");
  expect_fail (-ENOTSUP, "hash md5", P (.hash_alg = "md5"), "p");
  expect_fail (-ENOTSUP, "hash shake256", P (.hash_alg = "shake256"), "p");
  expect_fail (-EINVAL, "iterations 999", P (.iterations = 999), "p");
  expect_fail (-EINVAL, "iterations 2^31",
               P (.iterations = UINT64_C (0x80000000)), "p");
  expect_fail (-ERANGE, "iter_time 2^32-1 ms",
               P (.iter_time_ms = UINT_MAX), "p");
#undef P
  printf ("ok parameter errors\n");
}

int
main (int argc, char **argv)
{
  const char *base = argc > 1 ? argv[1] :
                     getenv ("TMPDIR") ? getenv ("TMPDIR") : "/tmp";
  char out[1024];

  qcow2_set_error_handler (capture_error, NULL);

  have_qemu = run (out, sizeof out, "qemu-img --version") == 0 &&
              run (out, sizeof out, "qemu-io --version") == 0;
  if (have_qemu) {
    if (asprintf (&workdir, "%s/test_crypt_create.XXXXXX", base) < 0)
      abort ();
    if (!mkdtemp (workdir)) {
      perror (workdir);
      return 1;
    }
  }
  else
    printf ("SKIP QEMU checks: qemu-img or qemu-io not found\n");

  for (size_t i = 0; i < sizeof settings / sizeof settings[0]; i++)
    test_setting (&settings[i], (int) i);
  test_fresh_randomness ();
  test_errors ();
  test_iter_time ();

  if (workdir) {
    if (!getenv ("TEST_KEEP"))
      rmdir (workdir);
    else
      printf ("images kept in %s\n", workdir);
    free (workdir);
  }
  if (failures) {
    printf ("FAILED: %d check(s)\n", failures);
    return 1;
  }
  if (!have_qemu)
    return 77;
  printf ("PASS\n");
  return 0;
}
