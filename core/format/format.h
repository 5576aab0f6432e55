/* On-disk constants of the qcow2 format (docs/interop/qcow2.rst). */
#ifndef QCOW2_FORMAT_H
#define QCOW2_FORMAT_H

#define QCOW2_MAGIC 0x514649fbu

#define QCOW2_V2_HEADER_LENGTH 72
#define QCOW2_V3_MIN_HEADER_LENGTH 104

/* Header fields: byte offsets in cluster 0, all big-endian.  Fields from
 * QCOW2_HDR_INCOMPATIBLE_FEATURES on exist in version 3 only.
 */
#define QCOW2_HDR_MAGIC                    0    /* u32 */
#define QCOW2_HDR_VERSION                  4    /* u32 */
#define QCOW2_HDR_BACKING_FILE_OFFSET      8    /* u64 */
#define QCOW2_HDR_BACKING_FILE_SIZE        16   /* u32 */
#define QCOW2_HDR_CLUSTER_BITS             20   /* u32 */
#define QCOW2_HDR_SIZE                     24   /* u64 */
#define QCOW2_HDR_CRYPT_METHOD             32   /* u32 */
#define QCOW2_HDR_L1_SIZE                  36   /* u32 */
#define QCOW2_HDR_L1_TABLE_OFFSET          40   /* u64 */
#define QCOW2_HDR_REFCOUNT_TABLE_OFFSET    48   /* u64 */
#define QCOW2_HDR_REFCOUNT_TABLE_CLUSTERS  56   /* u32 */
#define QCOW2_HDR_NB_SNAPSHOTS             60   /* u32 */
#define QCOW2_HDR_SNAPSHOTS_OFFSET         64   /* u64 */
#define QCOW2_HDR_INCOMPATIBLE_FEATURES    72   /* u64 */
#define QCOW2_HDR_COMPATIBLE_FEATURES      80   /* u64 */
#define QCOW2_HDR_AUTOCLEAR_FEATURES       88   /* u64 */
#define QCOW2_HDR_REFCOUNT_ORDER           96   /* u32 */
#define QCOW2_HDR_HEADER_LENGTH            100  /* u32 */
#define QCOW2_HDR_COMPRESSION_TYPE         104  /* u8 */

#define QCOW2_MIN_CLUSTER_BITS 9
#define QCOW2_MAX_CLUSTER_BITS 21
#define QCOW2_MIN_EXTL2_CLUSTER_BITS 14

/* Incompatible feature bits */
#define QCOW2_INCOMPAT_DIRTY        (1ull << 0)
#define QCOW2_INCOMPAT_CORRUPT      (1ull << 1)
#define QCOW2_INCOMPAT_DATA_FILE    (1ull << 2)
#define QCOW2_INCOMPAT_COMPRESSION  (1ull << 3)
#define QCOW2_INCOMPAT_EXTL2        (1ull << 4)
#define QCOW2_INCOMPAT_KNOWN        0x1full

/* Compatible and autoclear feature bits */
#define QCOW2_COMPAT_LAZY_REFCOUNTS (1ull << 0)
#define QCOW2_AUTOCLEAR_BITMAPS     (1ull << 0)
#define QCOW2_AUTOCLEAR_DATA_RAW    (1ull << 1)

#define QCOW2_CRYPT_NONE 0
#define QCOW2_CRYPT_AES  1
#define QCOW2_CRYPT_LUKS 2

#define QCOW2_COMPRESSION_DEFLATE 0
#define QCOW2_COMPRESSION_ZSTD    1

/* Header extension magics */
#define QCOW2_EXT_END            0x00000000u
#define QCOW2_EXT_BACKING_FORMAT 0xe2792acau
#define QCOW2_EXT_FEATURE_TABLE  0x6803f857u
#define QCOW2_EXT_BITMAPS        0x23852875u
#define QCOW2_EXT_CRYPTO         0x0537be77u
#define QCOW2_EXT_DATA_FILE      0x44415441u

/* A header extension: magic (u32), length of the data (u32), the data
 * padded to 8 bytes.
 */
#define QCOW2_EXT_MAGIC   0
#define QCOW2_EXT_LENGTH  4
#define QCOW2_EXT_DATA    8

/* The bitmaps extension's data. */
#define QCOW2_EXT_BITMAPS_NB          0    /* u32 nb_bitmaps */
#define QCOW2_EXT_BITMAPS_RESERVED    4    /* u32, zero */
#define QCOW2_EXT_BITMAPS_DIR_SIZE    8    /* u64 */
#define QCOW2_EXT_BITMAPS_DIR_OFFSET  16   /* u64 */
#define QCOW2_EXT_BITMAPS_LENGTH      24

/* The full disk encryption (crypto) extension's data. */
#define QCOW2_EXT_CRYPTO_OFFSET  0    /* u64 */
#define QCOW2_EXT_CRYPTO_LENGTH  8    /* u64 */
#define QCOW2_EXT_CRYPTO_BYTES   16

/* L1 and L2 entries */
#define QCOW2_OFLAG_COPIED     (1ull << 63)
#define QCOW2_OFLAG_COMPRESSED (1ull << 62)
#define QCOW2_OFLAG_ZERO       (1ull << 0)
#define QCOW2_L1E_OFFSET_MASK  0x00fffffffffffe00ull
#define QCOW2_L2E_OFFSET_MASK  0x00fffffffffffe00ull
#define QCOW2_REFT_OFFSET_MASK 0xfffffffffffffe00ull

/* A snapshot table entry: these fields, the extra data, the id, the
 * name, padded to 8 bytes.
 */
#define QCOW2_SNE_L1_TABLE_OFFSET   0    /* u64 */
#define QCOW2_SNE_L1_SIZE           8    /* u32 */
#define QCOW2_SNE_ID_SIZE           12   /* u16 */
#define QCOW2_SNE_NAME_SIZE         14   /* u16 */
#define QCOW2_SNE_DATE_SEC          16   /* u32 */
#define QCOW2_SNE_DATE_NSEC         20   /* u32 */
#define QCOW2_SNE_VM_CLOCK_NSEC     24   /* u64 */
#define QCOW2_SNE_VM_STATE_SIZE     32   /* u32 */
#define QCOW2_SNE_EXTRA_DATA_SIZE   36   /* u32 */
#define QCOW2_SNE_FIXED_BYTES       40
/* Its extra data, as far as it goes. */
#define QCOW2_SNE_EXTRA_VM_STATE_SIZE_LARGE  0    /* u64 */
#define QCOW2_SNE_EXTRA_DISK_SIZE            8    /* u64 */
#define QCOW2_SNE_EXTRA_ICOUNT               16   /* u64 */
#define QCOW2_SNE_EXTRA_KNOWN_BYTES          24

/* Extended L2 bitmap: bit x allocated, bit 32 + x reads as zero. */
#define QCOW2_SUBCLUSTERS 32
/* Every subcluster's bit in one half of the bitmap (<< 32: the zero half). */
#define QCOW2_ALL_SUBCLUSTERS 0xffffffffull

/* QEMU's limits, which we share. */
#define QCOW2_MAX_L1_BYTES        (32u << 20)
#define QCOW2_MAX_REFTABLE_BYTES  (8u << 20)
#define QCOW2_MAX_SNAPSHOTS       65536u
#define QCOW2_MAX_SNAPSHOT_TABLE  (64u << 20)
#define QCOW2_MAX_SNAPSHOT_EXTRA  1024u
#define QCOW2_MAX_BACKING_NAME    1023u
#define QCOW2_MAX_BITMAPS         65535u
#define QCOW2_MAX_BITMAP_DIR      (64u << 20)

/* Persistent bitmaps: directory entries and tables (QEMU's
 * block/qcow2-bitmap.c limits).
 */
#define QCOW2_BME_ENTRY_BYTES          24   /* then the name */
#define QCOW2_BME_TABLE_OFFSET         0    /* u64 */
#define QCOW2_BME_TABLE_SIZE           8    /* u32 */
#define QCOW2_BME_FLAGS                12   /* u32 */
#define QCOW2_BME_TYPE                 16   /* u8: 1, dirty tracking */
#define QCOW2_BME_GRANULARITY          17   /* u8: log2 */
#define QCOW2_BME_NAME_SIZE            18   /* u16 */
#define QCOW2_BME_EXTRA_DATA_SIZE      20   /* u32 */
#define QCOW2_BME_IN_USE               (1u << 0)
#define QCOW2_BME_AUTO                 (1u << 1)
#define QCOW2_BME_MAX_TABLE_SIZE       0x8000000u
#define QCOW2_BME_MAX_PHYS_SIZE        0x20000000u
#define QCOW2_BME_MIN_GRANULARITY_BITS 9
#define QCOW2_BME_MAX_GRANULARITY_BITS 31
#define QCOW2_BME_MAX_NAME             1023u
#define QCOW2_BME_TABLE_RESERVED_MASK  0xff000000000001feull
#define QCOW2_BME_TABLE_OFFSET_MASK    0x00fffffffffffe00ull
#define QCOW2_BME_TABLE_ALL_ONES       (1ull << 0)

#endif /* QCOW2_FORMAT_H */
