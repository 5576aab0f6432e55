/* nbdkit-qcow2: the public API of the qcow2 engine.
 *
 * The engine has no nbdkit dependency.  Every function returns 0 (or a
 * non-negative count) on success and a negative errno on failure; the
 * human-readable reason goes to the error handler (qcow2_set_error_handler)
 * as one line naming the field and value at fault.
 *
 * Thread safety: one struct qcow2_image may be used by any number of
 * threads at once.  All guest-visible state is shared, so a request
 * completed on one thread is visible to every other thread.
 */
#ifndef QCOW2_H
#define QCOW2_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct qcow2_image;
struct qcow2_io;

struct qcow2_open_options {
  /* Path of the image.  Relative backing and data file names are resolved
   * against its directory.
   */
  const char *filename;

  /* Open for writing. */
  bool writable;

  /* Take QEMU-compatible image locks (see image_lock.h). */
  bool lock;

  /* Do not open the backing file at all: unallocated clusters read as
   * zeros.  For tools that only rewrite metadata (image creation).
   */
  bool ignore_backing;

  /* Passphrase for encrypted images (legacy AES or LUKS); NULL if none. */
  const char *passphrase;

  /* Follow backing files.  When false an image with a backing file is
   * refused, and so is one naming an external data file unless data_file
   * overrides the name, so an untrusted image cannot make us open other
   * files.
   */
  bool follow_backing;

  /* Longest backing chain accepted, counting the top image. */
  unsigned max_chain_depth;

  /* Bytes of L2 table cache per image; 0 picks a default that covers the
   * whole disk, capped at 32 MiB.
   */
  uint64_t cache_size;

  /* External data file path overriding the header's name; NULL: use the
   * header extension.
   */
  const char *data_file;

  /* Confine the files an image names (backing files, the data file) to
   * this directory: names are resolved inside it, relative to it for an
   * image that is no local file (opened with qcow2_open_io), and a name
   * whose real path lies outside is refused.  NULL: no confinement.
   */
  const char *backing_dir;
};

#define QCOW2_DEFAULT_MAX_CHAIN_DEPTH 64

void qcow2_open_options_init (struct qcow2_open_options *opts);

/* Open an image file (and its backing chain and data file). */
int qcow2_open (const struct qcow2_open_options *opts,
                struct qcow2_image **image_out);

/* Open an image over an already-open byte backend (tests, fuzzing).  The
 * image takes ownership of io, also on failure.  opts->filename is used
 * only to resolve relative backing and data file names and in messages.
 */
int qcow2_open_io (struct qcow2_io *io, const struct qcow2_open_options *opts,
                   struct qcow2_image **image_out);

void qcow2_close (struct qcow2_image *image);

/* Make an image opened read-only writable: take the write locks, clear
 * the autoclear bits we do not maintain, load the refcount table.  Refuses
 * corrupt images and broken ones (see qcow2_flush).  Callers serialise
 * calls; reads may run meanwhile.
 */
int qcow2_enable_write (struct qcow2_image *image);

/* Virtual disk size in bytes. */
uint64_t qcow2_get_size (const struct qcow2_image *image);
uint32_t qcow2_get_cluster_size (const struct qcow2_image *image);
bool qcow2_is_encrypted (const struct qcow2_image *image);

/* Read len bytes of the virtual disk at offset into buf.  The range must
 * lie inside the disk.
 */
int qcow2_read (struct qcow2_image *image, void *buf, uint64_t len,
                uint64_t offset);

/* Write len bytes at offset.  With fua, the data and the metadata that
 * reaches it are durable when this returns.
 */
int qcow2_write (struct qcow2_image *image, const void *buf, uint64_t len,
                 uint64_t offset, bool fua);

/* Make [offset, offset + len) read as zeros.  may_trim lets the engine
 * release host clusters; with fast_only, fail with -ENOTSUP (changing
 * nothing) where zeroing would mean writing data.
 */
int qcow2_zero (struct qcow2_image *image, uint64_t len, uint64_t offset,
                bool may_trim, bool fast_only, bool fua);

/* Release the whole clusters (and subclusters) of [offset, offset + len);
 * what the range reads afterwards is unspecified but never stale data
 * from below.  Partial clusters are left alone, as trim is advisory.
 */
int qcow2_trim (struct qcow2_image *image, uint64_t len, uint64_t offset,
                bool fua);

/* Consistency check of refcounts and COPIED flags, classified as
 * `qemu-img check` does.  With repair (image writable), fix them.
 */
struct qcow2_check_result {
  uint64_t corruptions, leaks;             /* found */
  uint64_t corruptions_fixed, leaks_fixed; /* repaired */
  uint64_t check_errors;                   /* metadata that could not be read */
};
int qcow2_check (struct qcow2_image *image, bool repair,
                 struct qcow2_check_result *result);

/* Make every completed write durable.
 *
 * When a metadata write or sync fails (here or in any other call), what
 * the disk holds is unknown: the image is then broken, and every later
 * write, zero, trim, flush or change fails with -EIO and one message
 * saying why, while reads keep working, until it is closed and opened
 * again.  Corruption found while writing (a write that would land on
 * metadata) does the same, and marks the image corrupt on disk.
 */
int qcow2_flush (struct qcow2_image *image);

/* May requests write now (writing enabled, image not broken)? */
bool qcow2_is_writable (const struct qcow2_image *image);

/* Could qcow2_enable_write succeed?  False for a read-only file, for an
 * image marked corrupt and for a broken one; lock conflicts show only
 * when enabling.
 */
bool qcow2_may_write (const struct qcow2_image *image);

/* Block status.  Extent flags use NBD's base:allocation bits. */
#define QCOW2_EXTENT_HOLE 1u /* not allocated in this image or below */
#define QCOW2_EXTENT_ZERO 2u /* reads as zeros */

/* Called with ascending, contiguous extents covering a prefix of the
 * requested range (at least the first byte).  Return -1 to stop early.
 */
typedef int (*qcow2_extent_fn) (void *opaque, uint64_t offset,
                                uint64_t length, uint32_t flags);

/* Describe [offset, offset + len).  With one_extent, stop after the extent
 * containing offset.
 */
int qcow2_extents (struct qcow2_image *image, uint64_t offset, uint64_t len,
                   bool one_extent, qcow2_extent_fn fn, void *opaque);

/* Creating images (qemu-img create -f qcow2 -o ...). */
struct qcow2_create_options {
  const char *filename;
  uint64_t size;             /* 0 with a backing file: the backing's size */
  unsigned version;          /* 2 (compat=0.10) or 3 (compat=1.1) */
  uint32_t cluster_size;
  unsigned refcount_bits;
  bool lazy_refcounts;
  bool extended_l2;
  uint8_t compression_type;  /* 0 deflate, 1 zstd */
  const char *backing_file;  /* stored as given; resolved like QEMU */
  const char *backing_format;
  const char *data_file;
  bool data_file_raw;
  bool preallocate_metadata;
  bool overwrite;            /* replace existing files */
  bool encrypt;              /* LUKS, with passphrase */
  const char *passphrase;
  /* LUKS parameters; NULL / 0 for QEMU's defaults (aes-256, xts,
   * plain64, sha256, 2000 ms).
   */
  const char *encrypt_cipher_alg, *encrypt_cipher_mode;
  const char *encrypt_ivgen_alg, *encrypt_ivgen_hash_alg;
  const char *encrypt_hash_alg;
  unsigned encrypt_iter_time_ms;
  /* As qcow2_open_options.backing_dir: where the backing file is found
   * (for its size) when the image is created in a container.
   */
  const char *backing_dir;
};

void qcow2_create_options_init (struct qcow2_create_options *opts);
int qcow2_create (const struct qcow2_create_options *opts);
/* Create the image inside a fixed-size container (io.h), which takes
 * the whole of it; opts->filename only names it in messages.  A
 * container whose first cluster is not all zeros is refused unless
 * opts->overwrite (it may hold an image or a file system).  No data
 * file or preallocation here: stale bytes of a container do not read
 * as zeros.  Takes ownership of io, also on failure.
 */
int qcow2_create_io (const struct qcow2_create_options *opts,
                     struct qcow2_io *io);

/* Grow the virtual disk (image writable; no requests in flight). */
int qcow2_resize (struct qcow2_image *image, uint64_t new_size);

/* Internal snapshots. */
struct qcow2_snapshot_info {
  const char *id;
  const char *name;
  uint64_t disk_size;        /* virtual size when it was taken */
  uint64_t vm_state_size;
  uint32_t date_sec, date_nsec;
  uint64_t vm_clock_nsec;
};

uint32_t qcow2_snapshot_count (const struct qcow2_image *image);
/* Strings stay valid until the snapshot table changes (the three
 * operations below) or the image is closed.
 */
void qcow2_snapshot_get_info (const struct qcow2_image *image, uint32_t i,
                              struct qcow2_snapshot_info *info);

/* Snapshot operations, as `qemu-img snapshot -c/-d/-a` (image writable,
 * no requests in flight, no views open).  Names are looked up as views
 * are: by name, else by id.
 *
 * create: a snapshot of the active image named `name` (a new name, not
 *   an existing id), with the next numeric id; refused with refcount_bits
 *   1 and with an external data file, as QEMU refuses them.
 * delete: drop a snapshot, releasing the clusters only it used.
 * apply:  make the active image what the snapshot holds (its disk size
 *   too); the snapshot stays.
 */
int qcow2_snapshot_create (struct qcow2_image *image, const char *name);
int qcow2_snapshot_delete (struct qcow2_image *image, const char *name_or_id);
int qcow2_snapshot_apply (struct qcow2_image *image, const char *name_or_id);

/* Persistent dirty bitmaps (docs/interop/qcow2.rst "Bitmaps"), kept up to
 * date as QEMU keeps them: opening read-write sets in_use on the
 * consistent bitmaps before the first write; every write, zero, trim and
 * compressed write marks the granules it touches in each enabled bitmap;
 * applying a snapshot marks the whole disk; growing the disk grows the
 * bitmaps (the new granules clean); qcow2_close stores them and clears
 * in_use.  Bitmaps in_use when the image was opened are inconsistent
 * (their writer died or still runs): kept unchanged, never used.  An
 * image whose bitmap directory QEMU would refuse is served read-only
 * (qcow2_may_write is false, and qcow2_bitmaps_error says why).
 */
struct qcow2_bitmap_info {
  const char *name;          /* valid until the bitmaps change or close */
  uint32_t granularity;      /* bytes per bit */
  bool enabled;              /* writes mark it ("auto") */
  bool inconsistent;         /* in_use when opened: unusable */
  uint64_t dirty_bytes;      /* guest bytes marked dirty */
};

uint32_t qcow2_bitmap_count (const struct qcow2_image *image);
void qcow2_bitmap_get_info (const struct qcow2_image *image, uint32_t i,
                            struct qcow2_bitmap_info *info);
/* Index of the bitmap named name, or -ENOENT (not reported). */
int64_t qcow2_bitmap_find (const struct qcow2_image *image, const char *name);
/* Why the image's bitmaps are unusable, or NULL. */
const char *qcow2_bitmaps_error (const struct qcow2_image *image);

/* Management, as `qemu-img bitmap` (image writable, no requests in
 * flight); each change is on disk when it returns, with in_use set while
 * the image stays open.  add: a new, empty, enabled bitmap; granularity 0
 * picks QEMU's default (the cluster size, within 4 KiB..64 KiB).  clear
 * and enable/disable refuse inconsistent bitmaps; remove takes any.
 */
int qcow2_bitmap_add (struct qcow2_image *image, const char *name,
                      uint32_t granularity);
int qcow2_bitmap_remove (struct qcow2_image *image, const char *name);
int qcow2_bitmap_clear (struct qcow2_image *image, const char *name);
int qcow2_bitmap_set_enabled (struct qcow2_image *image, const char *name,
                              bool enabled);

/* The dirty map of bitmap i over [offset, offset + len) of the disk:
 * dirty granules as data (flags 0), clean ones as QCOW2_EXTENT_HOLE.
 * Refused (-EIO) for an inconsistent bitmap.
 */
int qcow2_bitmap_extents (struct qcow2_image *image, uint32_t i,
                          uint64_t offset, uint64_t len, bool one_extent,
                          qcow2_extent_fn fn, void *opaque);

/* A read-only view of a snapshot, found by name or else by id.  Views
 * stay consistent while the active image is written: clusters a snapshot
 * shares are copied before the active layer changes them.
 */
struct qcow2_view;
int qcow2_view_open (struct qcow2_image *image, const char *name_or_id,
                     struct qcow2_view **view_out);
void qcow2_view_close (struct qcow2_view *view);
uint64_t qcow2_view_get_size (const struct qcow2_view *view);
int qcow2_view_read (struct qcow2_view *view, void *buf, uint64_t len,
                     uint64_t offset);
int qcow2_view_extents (struct qcow2_view *view, uint64_t offset,
                        uint64_t len, bool one_extent, qcow2_extent_fn fn,
                        void *opaque);

/* Errors: the handler receives one line without a trailing newline.  The
 * default writes to stderr.  Set it once before opening images.
 */
typedef void (*qcow2_error_fn) (void *opaque, const char *message);
void qcow2_set_error_handler (qcow2_error_fn fn, void *opaque);
/* Debug messages (the -D qcow2.FLAG flags of debug.h) go to a handler of
 * the same type; the default writes to stderr.
 */
void qcow2_set_debug_handler (qcow2_error_fn fn, void *opaque);

/* Compiled-in features, for --dump-plugin. */
bool qcow2_have_zstd (void);
bool qcow2_have_libdeflate (void);   /* faster deflate decoding */
bool qcow2_have_crypto (void);

/* Compression on write (like qemu-img convert -c).  Write one whole guest
 * cluster at guest_cluster_offset (cluster-aligned, inside the disk) as a
 * compressed cluster in the image's compression type.  buf holds the
 * cluster's bytes inside the disk: a whole cluster, or fewer for the last
 * cluster of a disk whose size is not a multiple of the cluster size (the
 * rest is compressed as zeros).  Data that does not shrink is written as
 * a normal cluster, and so is everything in an image with an external
 * data file or encryption, where QEMU allows no compressed clusters.  Not
 * durable until qcow2_flush.
 */
int qcow2_write_compressed (struct qcow2_image *image, const void *buf,
                            uint64_t guest_cluster_offset);

#endif /* QCOW2_H */
