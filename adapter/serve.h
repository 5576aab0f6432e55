/* What nbdkit-qcow2-plugin and nbdkit-qcow2-filter share (serve.c): the
 * keys that describe how an image is opened and what is done to it before
 * it is served, the exports (the active image, its snapshots, the
 * compressing export), and every request, in the engine's terms.
 *
 * The two differ only in where the image's bytes are (a host file; the
 * layer below the filter) and in their nbdkit callback signatures: each
 * is a thin adapter over these functions.
 *
 * Request functions return 0 or a negative errno (nothing is reported to
 * the client yet: the caller hands the errno to nbdkit its own way).
 */
#ifndef QCOW2_ADAPTER_SERVE_H
#define QCOW2_ADAPTER_SERVE_H

#include <stdbool.h>
#include <stdint.h>

#include "bitmaps.h"
#include "create.h"
#include "snapshots.h"

struct qcow2_image;
struct qcow2_open_options;
struct nbdkit_exports;
struct nbdkit_extents;

/* Keys both adapters take: passphrase=, follow-backing=,
 * max-chain-depth=, cache-size=, check=, the snapshot, bitmap and
 * creation keys.  0: taken; -1: bad value (reported); 1: not ours.
 */
int serve_config (const char *key, const char *value);
#define SERVE_CONFIG_HELP_OPEN \
  "passphrase=<SECRET>    Passphrase of an encrypted image (legacy AES or\n" \
  "                       LUKS): literal, -, +FILE or -FD.\n" \
  "follow-backing=false   Refuse images with a backing file instead of\n" \
  "                       opening it (default: true).\n" \
  "max-chain-depth=<N>    Longest backing chain accepted (default 64).\n" \
  "cache-size=<SIZE>      L2 table cache per image (default: enough for\n" \
  "                       the whole disk, at most 32M).\n" \
  "check=report|repair    Check refcounts and COPIED flags before serving,\n" \
  "                       and with repair fix them (opens read-write).\n"

/* The keys' part of the open options. */
void serve_open_options (struct qcow2_open_options *opts);
const char *serve_passphrase (void);
/* check=repair opens the image writable at once. */
bool serve_repair_requested (void);

/* After the image is open: size= with resize=true, check=, the snapshot
 * and bitmap operations; the image is then the one served (serve_attach).  name is
 * used in messages.
 */
int serve_startup (struct qcow2_image *image, const char *name);
/* Serve this image from now on, or close it (writing back its
 * metadata).
 */
void serve_attach (struct qcow2_image *image);
void serve_detach (void);
/* serve_detach, and free the keys. */
void serve_unload (void);
struct qcow2_image *serve_image (void);

/* A connection, by the export name the client asked for. */
struct serve_handle;
struct serve_handle *serve_open (const char *export_name);
void serve_close (struct serve_handle *h);
int serve_list_exports (struct nbdkit_exports *exports);
const char *serve_export_description (struct serve_handle *h);

int64_t serve_get_size (struct serve_handle *h);
void serve_block_size (uint32_t *minimum, uint32_t *preferred,
                       uint32_t *maximum);
bool serve_can_write (struct serve_handle *h);

int serve_pread (struct serve_handle *h, void *buf, uint32_t count,
                 uint64_t offset);
int serve_pwrite (struct serve_handle *h, const void *buf, uint32_t count,
                  uint64_t offset, bool fua);
int serve_zero (struct serve_handle *h, uint32_t count, uint64_t offset,
                bool may_trim, bool fast, bool fua);
int serve_trim (struct serve_handle *h, uint32_t count, uint64_t offset,
                bool fua);
int serve_flush (struct serve_handle *h);
int serve_extents (struct serve_handle *h, uint32_t count, uint64_t offset,
                   bool req_one, struct nbdkit_extents *extents);

#endif /* QCOW2_ADAPTER_SERVE_H */
