/* The engine's internal structures and the interfaces between its files.
 *
 * Layering.  core/ has a folder a layer, listed here bottom-up; a file
 * calls into its own layer and those listed before it, never after, but
 * for the exceptions named at the end.
 *
 *   core/          shared leaves
 *     util.h         byte order, alignment, is_zero, small helpers
 *     error.c        the message channels: errors, and debug (debug.c:
 *                    the -D qcow2.* flags)
 *     writer.c       the writer state (read-only, enabling, writable,
 *                    broken) with its transitions, and the writer lock's
 *                    checks
 *   backends/      byte backends behind io.h: a host file (io_file.c),
 *                  memory (io_mem.c); QEMU's image locks (image_lock.c)
 *   format/        the on-disk format: offsets and flags (format.h); the
 *                  header and its extensions (header.c); the snapshot table
 *                  (snapshot_table.c)
 *   crypto/        encryption of data sectors, behind crypt.h
 *   metadata/      caches and tables, for readers and the writer
 *     cache.c        bounded slice cache (L2 tables, refcount blocks)
 *     durable.c      the durability primitive, and the numbered ordering
 *                    rules that every metadata write names
 *     overlap.c      which clusters hold metadata; writes over them refused
 *     refcount.c     refcounts and cluster allocation
 *     l2.c           the L2 offset check, guest offset -> L2 slice, the
 *                    L1/L2 walk, what an entry means
 *     map.c          guest offset -> run of one cluster kind (readers)
 *     l2_write.c     L2 tables and entries for writers: allocate, copy,
 *                    publish
 *     copied.c       the COPIED flags
 *     flush.c        metadata write-back in dependency order; client flush
 *   requests/      the read and write paths
 *     rangelock.c    locks on the guest clusters a request touches
 *     codec.c        compression and decompression of clusters
 *     backing.c      what lies below an image: a qcow2 image, a raw file,
 *                    nothing
 *     read.c, extents.c, snapshot_view.c (reading a snapshot)
 *     write.c, discard.c (zero, trim), compressed_write.c
 *   operations/    whole-image operations: check.c, snapshots.c,
 *                  resize.c, create.c; persistent dirty bitmaps in memory
 *                  (bitmap.c) and on disk (bitmap_store.c)
 *   image.c        open and close: the public API's entry
 *
 * The exceptions, each one narrow interface: refcount.c announces a freed
 * cluster to compressed_write.c (qcow2_on_cluster_freed), whose packer
 * keeps its state to itself; the write paths mark persistent bitmaps
 * (qcow2_bitmaps_mark, lock-free); backing.c opens the image below, and
 * create.c the image it made, through image.c.
 */
#ifndef QCOW2_INTERNAL_H
#define QCOW2_INTERNAL_H

#include <assert.h>
#include <endian.h>
#include <pthread.h>
#include <sched.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "qcow2.h"
#include "format.h"

struct qcow2_slice;

struct qcow2_io;
struct qcow2_cache;
struct qcow2_crypt;

/* A header extension we do not interpret, kept so that a rewritten header
 * can preserve it.
 */
struct qcow2_unknown_ext {
  uint32_t magic;
  uint32_t length;
  unsigned char *data;
};

struct qcow2_feature_name {
  uint8_t type;      /* 0 incompatible, 1 compatible, 2 autoclear */
  uint8_t bit;
  char name[47];     /* NUL-terminated copy of the 46-byte field */
};

/* The header as parsed and validated, in host byte order. */
struct qcow2_header {
  uint32_t version;
  uint64_t backing_file_offset;
  uint32_t backing_file_size;
  uint32_t cluster_bits;
  uint64_t size;
  uint32_t crypt_method;
  uint32_t l1_size;
  uint64_t l1_table_offset;
  uint64_t refcount_table_offset;
  uint32_t refcount_table_clusters;
  uint32_t nb_snapshots;
  uint64_t snapshots_offset;
  uint64_t incompatible_features;
  uint64_t compatible_features;
  uint64_t autoclear_features;
  uint32_t refcount_order;
  uint32_t header_length;
  uint8_t compression_type;

  /* Extensions.  Strings are NUL-terminated copies, NULL when absent. */
  char *backing_file;
  char *backing_format;
  char *data_file;
  bool has_crypto_ext;
  uint64_t crypto_offset, crypto_length;
  bool has_bitmaps_ext;
  uint32_t nb_bitmaps;
  uint64_t bitmap_directory_size, bitmap_directory_offset;
  struct qcow2_feature_name *feature_names;
  size_t nb_feature_names;
  struct qcow2_unknown_ext *unknown_exts;
  size_t nb_unknown_exts;
};

/* header.c: read and validate cluster 0.  file_size bounds every table. */
int qcow2_header_read (struct qcow2_io *io, uint64_t file_size,
                       const char *filename, struct qcow2_header *h);
void qcow2_header_free (struct qcow2_header *h);

/* snapshot_table.c */
struct qcow2_snapshot {
  uint64_t l1_table_offset;
  uint32_t l1_size;
  char *id;
  char *name;
  uint32_t date_sec, date_nsec;
  uint64_t vm_clock_nsec;
  uint64_t vm_state_size;
  bool has_disk_size;
  uint64_t disk_size;
  uint64_t icount;
  /* Extra data past the fields we know (24 bytes), kept so that a
   * rewritten table preserves it, as QEMU does.
   */
  unsigned char *extra_unknown;
  uint32_t extra_unknown_len;
};

int qcow2_snapshots_read (struct qcow2_io *io, uint64_t file_size,
                          const struct qcow2_header *h,
                          struct qcow2_snapshot **snaps_out,
                          uint64_t *table_bytes_out);
void qcow2_snapshots_free (struct qcow2_snapshot *snaps, uint32_t n);
/* The on-disk form of a snapshot table (QEMU's layout: every entry with
 * 24 bytes of known extra data, then any unknown extra data it had).
 * *buf_out is malloc'd; *len_out may be 0.
 */
int qcow2_snapshots_serialize (const struct qcow2_snapshot *snaps,
                               uint32_t n, unsigned char **buf_out,
                               uint64_t *len_out);
/* Index of the snapshot named name_or_id, else of the one with that id;
 * -1 if none.
 */
int64_t qcow2_snapshot_find (const struct qcow2_image *img,
                             const char *name_or_id);
/* The same for a snapshot that must exist: -ENOENT, reported, if none. */
int64_t qcow2_snapshot_lookup (const struct qcow2_image *img,
                               const char *name_or_id);
/* Check a snapshot's L1 table as QEMU does when a snapshot is used
 * (aligned, at most 32 MiB, inside the file; disk size sane) and load
 * it in host byte order.  *l1_out is malloc'd.
 */
int qcow2_snapshot_load_l1 (struct qcow2_image *img,
                            const struct qcow2_snapshot *sn,
                            uint64_t **l1_out);

/* What lies below an image where its clusters are unallocated. */
enum qcow2_backing_kind { BACKING_NONE, BACKING_QCOW2, BACKING_RAW };

/* A cluster range whose refcounts drop once the L2 (or L1) change that
 * unreferenced it is on disk: see flush.c.
 */
/* Kinds of metadata cluster, for overlap checks (overlap.c). */
enum qcow2_metadata_kind {
  QCOW2_META_HEADER, QCOW2_META_L1, QCOW2_META_REFTABLE,
  QCOW2_META_REFBLOCK, QCOW2_META_L2, QCOW2_META_SNAPSHOTS,
  QCOW2_META_SNAPSHOT_L1, QCOW2_META_CRYPTO, QCOW2_META_BITMAP,
  QCOW2_META_NONE = 15,   /* guest data: every kind is an overlap */
};
struct qcow2_overlap;

struct qcow2_pending_free {
  uint64_t offset, length;
};

/* Client flushes in progress: see flush.c (qcow2_sync_flush). */
struct qcow2_flusher {
  pthread_mutex_t lock;         /* guards the rest; never held across I/O */
  pthread_cond_t done;          /* a run ended */
  uint64_t requested;           /* flushes that have arrived */
  uint64_t completed;           /* every flush up to this one is served */
  int result;                   /* of the last run */
  bool running;
};

/* Whether an image may be written (writer.c has the transitions). */
enum qcow2_writer_state {
  QCOW2_WRITER_READ_ONLY,   /* opened read-only: writes fail with EROFS */
  QCOW2_WRITER_ENABLING,    /* qcow2_enable_write is building the writer:
                             * requests do not write yet */
  QCOW2_WRITER_WRITABLE,    /* requests write */
  QCOW2_WRITER_BROKEN,      /* a metadata write or sync failed with an
                             * unknown outcome, or corruption was found
                             * (the image is then also marked corrupt on
                             * disk): writes fail with EIO, reads work,
                             * until the image is reopened */
};

/* State of an image opened for writing.  Everything here is protected by
 * `lock`, the metadata lock ("the writer lock"), which is never held
 * across guest data I/O.  Take it only with qcow2_writer_lock and
 * qcow2_writer_unlock, so that functions that need it can say so with
 * qcow2_writer_assert_locked.
 */
struct qcow2_writer {
  pthread_mutex_t lock;
#ifndef NDEBUG
  pthread_t holder;               /* the thread holding `lock`, or 0 (for
                                   * qcow2_writer_assert_locked) */
#endif
  uint64_t *reftable;             /* host byte order */
  uint64_t reftable_entries;
  uint64_t reftable_offset;
  struct qcow2_cache *refblock_cache;
  uint32_t refcount_bits;
  uint64_t refcount_max;
  uint64_t refblock_entries;      /* refcounts per refcount block */
  uint64_t free_hint;             /* no free cluster below this index */
  struct qcow2_pending_free *pending;
  size_t nr_pending, cap_pending;
  struct qcow2_overlap *overlap;  /* metadata clusters: see overlap.c */
  uint64_t compressed_free;       /* next free byte for compressed data in
                                   * a partly used host cluster; 0: none
                                   * (compressed_write.c's alone) */
  bool enospc_quiet;              /* qcow2_alloc_clusters_try is running */
  struct qcow2_flusher flusher;   /* its own lock, never held with `lock` */
};

/* A persistent dirty bitmap (bitmap.c, bitmap_store.c). */
struct qcow2_bitmap {
  char *name;
  uint32_t flags;             /* directory flags: QCOW2_BME_IN_USE, _AUTO */
  uint8_t granularity_bits;
  bool inconsistent;          /* in_use when opened: kept as is, unused */
  bool verified;              /* its clusters are its own: may be freed */
  uint64_t table_offset;      /* on disk; 0: added, not stored yet */
  uint32_t table_size;
  uint64_t *table;            /* the entries, host order (or NULL) */
  uint64_t nbits;             /* granules of the disk */
  uint64_t *words;            /* bit i: words[i / 64] bit i % 64 (NULL
                               * when inconsistent) */
};

struct qcow2_bitmaps {
  struct qcow2_bitmap *v;
  uint32_t n;
  struct qcow2_bitmap **enabled;  /* the bitmaps writes mark */
  uint32_t nb_enabled;
  struct qcow2_bitmap *dropped;   /* removed: clusters freed at next store */
  size_t nr_dropped;
  char *error;                /* why the directory is unusable, or NULL */
  bool claimed;               /* in_use is set on disk: store at close */
  bool changed;               /* differs from what is on disk */
  bool dir_verified;          /* the directory's clusters are its own */
};

/* An open image.  Geometry and tables are set at open; the mutable parts
 * (the L1 entries, the caches, file_size, the writer) are changed only
 * under the writer's lock and read with atomic loads.
 */
struct qcow2_image {
  char *filename;
  char *realpath;               /* NULL when not opened from a file */
  struct qcow2_io *io;          /* the qcow2 file */
  struct qcow2_io *data_io;     /* guest data: io, or the external data file */
  uint64_t file_size;
  uint64_t data_file_size;
  struct qcow2_header h;

  /* Geometry derived from the header. */
  uint32_t cluster_bits;
  uint64_t cluster_size;
  bool extended_l2;
  uint32_t l2_entry_bytes;      /* 8, or 16 with extended L2 */
  uint64_t l2_entries;          /* entries per L2 table */
  uint32_t l2_bits;             /* log2 of the guest bytes one L2 table
                                 * covers: guest >> l2_bits is the L1 index */
  uint32_t subcluster_bits;
  uint64_t subcluster_size;
  uint32_t csize_shift;         /* compressed descriptor: sector count shift */
  uint64_t csize_mask;
  uint64_t coffset_mask;
  bool external_data;

  /* Active L1, host byte order. */
  uint64_t *l1;
  uint32_t l1_size;

  /* L2 slices */
  struct qcow2_cache *l2_cache;
  uint32_t slice_size;
  uint32_t slice_entries;
  unsigned l2_seq;              /* odd while an extended L2 entry and its
                                 * bitmap change: see qcow2_l2_load_pair */

  struct qcow2_crypt *crypt;    /* NULL unless encrypted */
  /* Per guest cluster, for writers and for readers of encrypted data:
   * see rangelock.h.  Made at open, before any request can run, so a
   * reader never misses the lock of a write that starts after it.
   */
  struct qcow2_rangelock *ranges;

  struct qcow2_snapshot *snapshots;
  uint32_t nb_snapshots;
  uint64_t snapshot_table_bytes;

  struct qcow2_bitmaps bitmaps; /* top image only; changed only while no
                                 * request runs, except the bits */

  /* Whether requests may write: see writer.c for the states and the
   * transitions between them.  Read with qcow2_writer_state (any thread),
   * changed only by writer.c.
   */
  enum qcow2_writer_state state;
  pthread_mutex_t state_lock;   /* serialises transitions; broken_reason */
  char broken_reason[256];      /* BROKEN: why, for later refusals */
  /* The writer's tables: set on entering ENABLING, kept while WRITABLE
   * and after breaking from it (until close), NULL otherwise, except
   * that a read-only qcow2_check borrows a temporary one.
   */
  struct qcow2_writer *w;
  bool lock_files;              /* take QEMU-compatible image locks: shared
                                 * ones while READ_ONLY, write locks from
                                 * ENABLING on */

  enum qcow2_backing_kind backing_kind;
  struct qcow2_image *backing;  /* BACKING_QCOW2 */
  struct qcow2_io *backing_raw; /* BACKING_RAW */
  uint64_t backing_size;        /* bytes readable from below; zeros past it */
};

/* writer.c: the writer state and the writer lock. */

static inline enum qcow2_writer_state
qcow2_writer_state (const struct qcow2_image *img)
{
  return __atomic_load_n (&img->state, __ATOMIC_ACQUIRE);
}

/* Move img to state `to`.  Only the transitions in writer.c's table are
 * allowed (an internal invariant: asserted).
 */
void qcow2_writer_transition (struct qcow2_image *img,
                              enum qcow2_writer_state to);

/* A metadata write or sync (`what`) failed with err, so what the disk
 * holds is unknown: move img to BROKEN (reported once, with err) unless
 * it is already.  Returns err, for `return qcow2_writer_break (...)`.
 */
int qcow2_writer_break (struct qcow2_image *img, int err, const char *what);

/* Corruption was found (overlap.c): move img to BROKEN with reason
 * `why`.  True if this call did it, false if img was already BROKEN.
 */
bool qcow2_writer_break_corrupt (struct qcow2_image *img, const char *why);

/* -EIO, with one message saying why img is BROKEN. */
int qcow2_writer_refuse_broken (struct qcow2_image *img);
/* 0 if a whole-image operation (what: "resizing", ...; NULL for a
 * request) may change the image now; else the error, reported
 * (read-only or still enabling: -EROFS; broken: -EIO).
 */
int qcow2_writer_require (struct qcow2_image *img, const char *what);

static inline void
qcow2_writer_lock (struct qcow2_image *img)
{
  struct qcow2_writer *w = img->w;

#ifndef NDEBUG
  assert (!pthread_equal (__atomic_load_n (&w->holder, __ATOMIC_RELAXED),
                          pthread_self ()));   /* not recursive */
#endif
  pthread_mutex_lock (&w->lock);
#ifndef NDEBUG
  __atomic_store_n (&w->holder, pthread_self (), __ATOMIC_RELAXED);
#endif
}

static inline void
qcow2_writer_unlock (struct qcow2_image *img)
{
  struct qcow2_writer *w = img->w;

#ifndef NDEBUG
  assert (pthread_equal (__atomic_load_n (&w->holder, __ATOMIC_RELAXED),
                         pthread_self ()));
  __atomic_store_n (&w->holder, (pthread_t) 0, __ATOMIC_RELAXED);
#endif
  pthread_mutex_unlock (&w->lock);
}

/* For functions that run under the writer lock: in builds with assertions
 * (debug, sanitizers), check that this thread holds it.  Only the holder
 * stores its own id, and it clears it before unlocking, so no other
 * thread can see its id there.
 */
static inline void
qcow2_writer_assert_locked (const struct qcow2_image *img)
{
#ifndef NDEBUG
  assert (img->w != NULL);
  assert (pthread_equal (__atomic_load_n (&img->w->holder, __ATOMIC_RELAXED),
                         pthread_self ()));
#else
  (void) img;
#endif
}

/* map.c: one run of guest bytes that share a kind. */
enum qcow2_run_kind {
  RUN_UNALLOCATED,   /* read from below (backing file, or zeros) */
  RUN_ZERO_PLAIN,    /* zeros, no host cluster */
  RUN_ZERO_ALLOC,    /* zeros, host cluster preallocated */
  RUN_DATA,          /* host_offset .. + length in data_io; `copied`
                      * when exclusively owned (writable in place) */
  RUN_COMPRESSED,    /* inside one compressed cluster, descriptor in host_offset */
};

struct qcow2_run {
  enum qcow2_run_kind kind;
  uint64_t length;       /* > 0, never crossing the requested end */
  uint64_t host_offset;  /* RUN_DATA: host offset of the first byte;
                          * RUN_COMPRESSED: the L2 descriptor */
  bool copied;           /* RUN_DATA: COPIED set on every cluster */
};

/* Describe guest bytes from offset (< disk size) up to at most max_len
 * bytes through the given L1 table.  Fails with -EIO (and a message) on
 * corrupt metadata.
 */
int qcow2_map (struct qcow2_image *img, const uint64_t *l1, uint32_t l1_size,
               uint64_t offset, uint64_t max_len, struct qcow2_run *run);

/* codec.c: decompress one cluster.  in_len is an upper bound of the
 * compressed length; out_len bytes must be produced exactly.  Uses
 * per-thread contexts.
 */
int qcow2_decompress (uint8_t compression_type, const void *in, size_t in_len,
                      void *out, size_t out_len);

/* Per-thread scratch buffer of at least len bytes, reused across calls
 * (compressed input, decompressed clusters).  which selects one of a few
 * independent buffers.
 */
enum { SCRATCH_COMPRESSED, SCRATCH_CLUSTER, SCRATCH_WRITE, SCRATCH_COUNT };
void *qcow2_scratch (unsigned which, size_t len);

/* An image being opened and those above it, for loop and depth checks. */
struct qcow2_chain {
  const char *realpath;           /* NULL for images not backed by a file */
  const struct qcow2_chain *above;
  unsigned depth;                 /* 1 for the top image */
};

/* backing.c: open what lies below img; chain describes img itself. */
int qcow2_backing_open (struct qcow2_image *img,
                        const struct qcow2_open_options *opts,
                        const struct qcow2_chain *chain);
void qcow2_backing_close (struct qcow2_image *img);

/* Resolve name relative to the directory of `relative_to`.  Refuses names
 * that are not plain paths (json:, nbd:, http: ...), as an untrusted image
 * must not make us reach arbitrary resources.  Returns NULL with a message.
 */
char *qcow2_resolve_path (const char *relative_to, const char *name,
                          const char *what);
/* The same, confined to the directory dir (opts->backing_dir): the real
 * path of the result must lie inside it.  relative_to is the local file
 * naming it, or NULL for an image that is no local file (names are then
 * relative to dir).  Returns the real path, or NULL with a message.
 */
char *qcow2_resolve_path_within (const char *relative_to, const char *dir,
                                 const char *name, const char *what);

/* image.c: open an image and, through backing.c, its chain.  chain
 * describes this image (depth 1 for the top one).  Takes ownership of io.
 */
int qcow2_image_open (struct qcow2_io *io, const struct qcow2_open_options *opts,
                      const struct qcow2_chain *chain,
                      struct qcow2_image **image_out);

/* read.c: read through a given L1, the active one or a snapshot's
 * (snapshot_view.c).  Takes no range lock: snapshot clusters are never written in
 * place, and qcow2_read takes the active image's when it needs them.
 */
int qcow2_read_l1 (struct qcow2_image *img, const uint64_t *l1,
                   uint32_t l1_size, void *buf, uint64_t len,
                   uint64_t offset);

/* extents.c: block status through a given L1 (range already checked). */
int qcow2_extents_l1 (struct qcow2_image *img, const uint64_t *l1,
                      uint32_t l1_size, uint64_t offset, uint64_t len,
                      bool one, qcow2_extent_fn fn, void *opaque);

/* Read from below the image; zeros past the backing size. */
int qcow2_read_backing (struct qcow2_image *img, void *buf, uint64_t len,
                        uint64_t offset);

/* refcount.c: under the writer lock. */
int qcow2_refcount_init (struct qcow2_image *img);
void qcow2_refcount_fini (struct qcow2_image *img);
int qcow2_refcount_get (struct qcow2_image *img, uint64_t cluster,
                        uint64_t *refcount);
int qcow2_refcount_update (struct qcow2_image *img, uint64_t cluster,
                           int delta);
int qcow2_refcount_set (struct qcow2_image *img, uint64_t cluster,
                        uint64_t value);
/* Allocate n contiguous clusters with refcount 1.  -ENOSPC (reported)
 * when no such run fits: the file cannot grow that far, or a fixed-size
 * container has no free run that long.
 */
int qcow2_alloc_clusters (struct qcow2_image *img, uint64_t n,
                          uint64_t *offset_out);
/* The same, for callers that fall back to smaller runs: -ENOSPC is not
 * reported.
 */
int qcow2_alloc_clusters_try (struct qcow2_image *img, uint64_t n,
                              uint64_t *offset_out);
/* Drop one reference to every cluster overlapping [offset, offset + len)
 * after the next metadata sync (see flush.c).
 */
int qcow2_free_later (struct qcow2_image *img, uint64_t offset, uint64_t len);
/* The hook refcount.c calls, under the writer lock, each time the
 * refcount of host cluster `cluster` drops to 0: the allocator may now
 * hand it out whole.  It belongs to the layer above that keeps a cluster
 * without a reference of its own, compressed_write.c, whose packer forgets a
 * partly filled cluster then; refcount.c knows nothing of that state.
 */
void qcow2_on_cluster_freed (struct qcow2_image *img, uint64_t cluster);

/* l2_write.c: L2 entries for writers, under the writer lock. */

/* Pin the L2 slice holding the entry of guest offset `guest`, first
 * allocating the L2 table, or copying it if it is shared with a snapshot,
 * so the entry may be changed.  *index is the entry's index in the slice.
 */
int qcow2_l2_slice_for_write (struct qcow2_image *img, uint64_t guest,
                              struct qcow2_slice **slice, uint64_t *index);

/* Read the entry (and extended L2 bitmap) of guest offset `guest`; zero
 * when no L2 table covers it.
 */
int qcow2_l2_entry_get (struct qcow2_image *img, uint64_t guest,
                        uint64_t *entry, uint64_t *bitmap);

/* How an L2 entry stands for a writer. */
struct qcow2_entry {
  uint64_t entry, bitmap;
  uint64_t host;        /* host cluster offset, when allocated */
  bool allocated;       /* has a host cluster (data or preallocated zero) */
  bool compressed;
  bool owned;           /* allocated and COPIED: may be written in place */
};

void qcow2_entry_classify (const struct qcow2_image *img, uint64_t entry,
                           uint64_t bitmap, struct qcow2_entry *st);

/* These two take the writer lock themselves. */
int qcow2_entry_lookup (struct qcow2_image *img, uint64_t guest,
                        struct qcow2_entry *st);
/* Set the entry of guest cluster `guest`; with release_old, queue the
 * release of the clusters the old entry referenced.
 */
int qcow2_entry_publish (struct qcow2_image *img, uint64_t guest,
                         uint64_t entry, uint64_t bitmap, bool release_old);

/* write.c: 0 if requests may change the image (it is WRITABLE); else the
 * error, reported (read-only or being enabled: -EROFS; BROKEN: -EIO).
 */
int qcow2_check_can_write (struct qcow2_image *img);

/* write.c: write through allocation, with the clusters' range locks held
 * exclusive by the caller.
 */
int qcow2_write_locked (struct qcow2_image *img, const unsigned char *buf,
                        uint64_t len, uint64_t offset);

/* bitmap.c: read the bitmap directory and the consistent bitmaps of the
 * top image at open.  A directory QEMU would refuse is not an error here:
 * it is remembered (bitmaps.error), reads work, writing is refused.
 */
int qcow2_bitmaps_load (struct qcow2_image *img);
void qcow2_bitmaps_free (struct qcow2_image *img);
void qcow2_bitmap_free_one (struct qcow2_bitmap *bm);
/* Read bm's table into bm->table, checking its entries. */
int qcow2_bitmap_read_table (struct qcow2_image *img, struct qcow2_bitmap *bm);
/* Mark guest bytes dirty in every enabled bitmap: any thread, no lock. */
void qcow2_bitmaps_mark_range (struct qcow2_image *img, uint64_t offset,
                               uint64_t len);
void qcow2_bitmaps_mark_all (struct qcow2_image *img);
/* The disk size changed to new_size (no request in flight); _check says
 * beforehand whether every bitmap can follow.
 */
int qcow2_bitmaps_resize_check (struct qcow2_image *img, uint64_t new_size);
int qcow2_bitmaps_resize (struct qcow2_image *img, uint64_t new_size);

static inline void
qcow2_bitmaps_mark (struct qcow2_image *img, uint64_t offset, uint64_t len)
{
  if (img->bitmaps.nb_enabled)
    qcow2_bitmaps_mark_range (img, offset, len);
}

/* bitmap_store.c, with no request in flight.  claim: before the first
 * write, check that the bitmaps' clusters are theirs and set in_use on
 * disk, writing `autoclear` (plus the bitmaps bit) as the autoclear bits.
 * store: write the bitmaps; final (clean close) clears in_use.
 */
int qcow2_bitmaps_claim (struct qcow2_image *img, uint64_t autoclear);
int qcow2_bitmaps_store (struct qcow2_image *img, bool final);

/* overlap.c: add/remove under the writer lock; check from any thread.
 * qcow2_overlap_check returns -EIO (after marking the image corrupt) when
 * [offset, offset + len) holds metadata of a kind other than own_kind.
 */
int qcow2_overlap_init (struct qcow2_image *img);
void qcow2_overlap_free (struct qcow2_overlap *o);
int qcow2_overlap_add (struct qcow2_image *img, uint64_t offset, uint64_t len,
                       enum qcow2_metadata_kind kind);
void qcow2_overlap_remove (struct qcow2_image *img, uint64_t offset);
int qcow2_overlap_check (struct qcow2_image *img, uint64_t offset,
                         uint64_t len, enum qcow2_metadata_kind own_kind);
/* The kinds of metadata (a mask of 1 << kind) in [offset, offset + len),
 * without signalling anything.
 */
unsigned qcow2_overlap_kinds (struct qcow2_image *img, uint64_t offset,
                              uint64_t len);
int qcow2_signal_corruption (struct qcow2_image *img, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));

/* Dirty slices a whole-image metadata pass (snapshot operations, COPIED
 * settling) lets accumulate before writing them back: what it changes is
 * safe to write in any order, and the cache must not fill with it.
 */
#define QCOW2_PASS_WRITEBACK_EVERY 32

/* Make, or judge, the COPIED flags of the active L1 and L2 tables say
 * "refcount is 1" (copied.c).  *wrong counts the entries found wrong.
 */
enum qcow2_copied_mode {
  QCOW2_COPIED_COUNT,    /* count wrong flags, change nothing */
  QCOW2_COPIED_REPAIR,   /* count and correct them */
  QCOW2_COPIED_SETTLE,   /* correct them after refcounts changed, and
                            clear the flag on unallocated entries too; an
                            unreadable table or refcount is an error */
};
int qcow2_copied_pass (struct qcow2_image *img, enum qcow2_copied_mode mode,
                       uint64_t *wrong);

/* resize.c: under the writer lock, replace the active L1 table with one
 * of new_l1_size entries (>= the current size), setting the disk size to
 * new_size in the same header write.
 */
int qcow2_grow_l1 (struct qcow2_image *img, uint64_t new_size,
                   uint32_t new_l1_size);
/* resize.c: under the writer lock, set the header's disk size (synced). */
int qcow2_write_disk_size (struct qcow2_image *img, uint64_t size);

/* flush.c: a full metadata sync, under the writer lock. */
int qcow2_sync_metadata (struct qcow2_image *img);
/* flush.c: a client's flush; takes the writer lock itself, only where the
 * order needs it, and shares its work with concurrent flushes.
 */
int qcow2_sync_flush (struct qcow2_image *img);
void qcow2_flusher_init (struct qcow2_flusher *f);
void qcow2_flusher_fini (struct qcow2_flusher *f);

/* durable.c: every metadata write goes through these, naming the
 * ordering rule it follows; the rules are stated in durable.c.
 */
enum qcow2_rule {
  QCOW2_RULE_ALLOC_REFCOUNT_FIRST = 1,  /* 1. allocate: refcount, user */
  QCOW2_RULE_FREE_USER_FIRST = 2,       /* 2. free: user, refcount */
  QCOW2_RULE_DATA_BEFORE_L2 = 3,        /* 3. data, its L2 entry */
  QCOW2_RULE_L2_BEFORE_L1 = 4,          /* 4. L2 table, its L1 entry */
  QCOW2_RULE_REFBLOCK_BEFORE_TABLE = 5, /* 5. refblock, its table entry */
  QCOW2_RULE_HEADER_LAST = 6,           /* 6. new structure, header */
  QCOW2_RULE_IN_PLACE = 7,              /* 7. valid either way */
  QCOW2_RULE_NEW_FILE = 8,              /* 8. creating the file */
};
/* Write metadata bytes to img->io; durable at the next sync. */
int qcow2_meta_write (struct qcow2_image *img, enum qcow2_rule rule,
                      const void *buf, size_t len, uint64_t offset);
/* Write metadata bytes to img->io, then sync: durable on success. */
int qcow2_meta_write_durable (struct qcow2_image *img, enum qcow2_rule rule,
                              const void *buf, size_t len, uint64_t offset);
/* Sync img->io: everything written so far is durable on success. */
int qcow2_meta_sync (struct qcow2_image *img, enum qcow2_rule rule);
/* Write back the refcount cache, then sync (the "before" of rule 1). */
int qcow2_meta_refcounts_durable (struct qcow2_image *img,
                                  enum qcow2_rule rule);
/* Rule 8: write a new image file's first bytes, then sync. */
int qcow2_new_file_write_durable (struct qcow2_io *io, const void *buf,
                                  size_t len, uint64_t offset);

/* The guest clusters [*first, *first + *count) that the bytes [offset,
 * offset + len) touch, len > 0: what a request takes range locks on.
 */
static inline void
qcow2_cluster_span (const struct qcow2_image *img, uint64_t offset,
                    uint64_t len, uint64_t *first, uint64_t *count)
{
  *first = offset >> img->cluster_bits;
  *count = ((offset + len - 1) >> img->cluster_bits) - *first + 1;
}

/* L2 entries stay in on-disk byte order in the cache.  Loads and stores
 * are atomic so readers need no lock while a writer publishes an entry.
 */
static inline uint64_t
qcow2_l2_load (const unsigned char *p)
{
  return be64toh (__atomic_load_n ((const uint64_t *) p,
                                   __ATOMIC_ACQUIRE));
}

static inline void
qcow2_l2_store (unsigned char *p, uint64_t v)
{
  __atomic_store_n ((uint64_t *) p, htobe64 (v), __ATOMIC_RELEASE);
}

/* An extended L2 entry is two words, which a lock-free reader could
 * otherwise see half updated: the old entry with the new bitmap (e.g. an
 * unallocated entry with allocated subclusters, which reads as
 * corruption).  Writers, serialised by the writer lock, make img->l2_seq
 * odd around the two stores; readers retry until the count was even and
 * unchanged across their two loads (a sequence lock).
 */
static inline void
qcow2_l2_store_pair (struct qcow2_image *img, unsigned char *p,
                     uint64_t entry, uint64_t bitmap)
{
  unsigned seq = __atomic_load_n (&img->l2_seq, __ATOMIC_RELAXED);

  qcow2_writer_assert_locked (img);
  assert (!(seq & 1));   /* no other writer is between its two stores */
  __atomic_store_n (&img->l2_seq, seq + 1, __ATOMIC_RELAXED);
  /* Release stores: a reader that sees either new word also sees the
   * odd count.
   */
  qcow2_l2_store (p + 8, bitmap);
  qcow2_l2_store (p, entry);
  __atomic_store_n (&img->l2_seq, seq + 2, __ATOMIC_RELEASE);
}

static inline void
qcow2_l2_load_pair (const struct qcow2_image *img, const unsigned char *p,
                    uint64_t *entry, uint64_t *bitmap)
{
  for (unsigned spins = 0;; spins++) {
    unsigned seq = __atomic_load_n (&img->l2_seq, __ATOMIC_ACQUIRE);
    if (!(seq & 1)) {
      *entry = qcow2_l2_load (p);
      *bitmap = qcow2_l2_load (p + 8);
      if (__atomic_load_n (&img->l2_seq, __ATOMIC_ACQUIRE) == seq)
        return;
    }
    if (spins >= 64)
      sched_yield ();   /* the writer was preempted between its stores */
  }
}

/* Where the bytes of a compressed cluster are, from its L2 entry: the
 * first byte at *coffset, in *nsectors 512-byte sectors counted from the
 * sector holding it (the unit QEMU and check.c count references by).
 * The flags (bits 62, 63) lie outside both fields.
 */
static inline void
qcow2_compressed_extent (const struct qcow2_image *img, uint64_t entry,
                         uint64_t *coffset, uint64_t *nsectors)
{
  *coffset = entry & img->coffset_mask;
  *nsectors = ((entry >> img->csize_shift) & img->csize_mask) + 1;
}

/* Atomic view of the mutable sizes and table entries. */
static inline uint64_t
qcow2_file_size (const struct qcow2_image *img)
{
  return __atomic_load_n (&img->file_size, __ATOMIC_ACQUIRE);
}

/* Raise a size that only grows (file_size, data_file_size) to end when
 * it is below: the allocator grows file_size under the writer lock,
 * write.c grows either after writing past the end, without it.
 */
static inline void
qcow2_size_grow (uint64_t *size, uint64_t end)
{
  uint64_t old = __atomic_load_n (size, __ATOMIC_ACQUIRE);

  while (end > old &&
         !__atomic_compare_exchange_n (size, &old, end, false,
                                       __ATOMIC_RELEASE, __ATOMIC_ACQUIRE))
    ;
}

static inline uint64_t
qcow2_l1_entry (const uint64_t *l1, uint64_t index)
{
  return __atomic_load_n (&l1[index], __ATOMIC_ACQUIRE);
}

/* Compression on write (codec.c, compressed_write.c). */

/* codec.c: compress in_len bytes into out, as QEMU writes compressed
 * clusters (raw deflate, window bits -12, default level; zstd at its
 * default level).  Sets *out_len.  -ENOSPC: the result would not fit in
 * out_cap bytes (store the data uncompressed); -ENOTSUP: compression type
 * unknown or not compiled in.  Uses per-thread contexts.
 */
int qcow2_compress (uint8_t compression_type, const void *in, size_t in_len,
                    void *out, size_t out_cap, size_t *out_len);

#endif /* QCOW2_INTERNAL_H */
