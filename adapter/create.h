/* Creating and growing images from plugin keys (create.c). */
#ifndef QCOW2_ADAPTER_CREATE_H
#define QCOW2_ADAPTER_CREATE_H

#include <stdbool.h>

struct qcow2_image;
struct qcow2_io;

/* The key of the virtual size (default "size"): the filter says
 * "qcow2-size", as size= belongs to plugins below it (memory, data).
 */
void create_set_size_key (const char *key);

/* 0: taken; -1: bad value (reported); 1: not a creation key. */
int create_config (const char *key, const char *value);
/* In .config_complete: check the keys fit together. */
int create_config_complete (const char *filename);
/* Is this run creating the image (so file= may not exist yet)? */
bool create_requested (void);
/* Before opening: create the image if asked, in a file (the plugin) or
 * in a container, which it takes (the filter; io is closed).
 */
int create_image (const char *filename, const char *passphrase,
                  const char *data_file);
int create_image_io (struct qcow2_io *io, const char *name,
                     const char *passphrase, const char *backing_dir);
/* After opening: apply size= to an existing image (resize=true). */
int create_resize (struct qcow2_image *image);

#define CREATE_CONFIG_HELP CREATE_CONFIG_HELP_SIZED ("size", "file")
#define CREATE_CONFIG_HELP_SIZED(size, what) \
  "create=true            Create the image (refuses an existing " what ").\n" \
  "overwrite=true         With create=true, replace an existing " what ".\n" \
  size "=<SIZE>            Virtual size for create=true, or the new size\n" \
  "                       of an existing image with resize=true.\n" \
  "resize=true            Grow an existing image to " size "= (never shrinks).\n" \
  "cluster-size=<SIZE>    (create) 512 to 2M, default 64K.\n" \
  "compat=0.10|1.1        (create) qcow2 version 2 or 3 (default 1.1).\n" \
  "refcount-bits=<N>      (create) 1 to 64, default 16.\n" \
  "lazy-refcounts=true    (create) set the lazy refcounts feature.\n" \
  "extended-l2=true       (create) subclusters (clusters >= 16K).\n" \
  "compression-type=zlib|zstd  (create) default zlib.\n" \
  "backing-file=<NAME>    (create) backing file, as QEMU resolves it.\n" \
  "backing-format=qcow2|raw  (create) its format.\n" \
  "data-file=<NAME>       (create) external data file to create.\n" \
  "data-file-raw=true     (create) keep the data file a raw image.\n" \
  "preallocation=off|metadata  (create) preallocate metadata.\n" \
  "encrypt-format=luks    (create) encrypt with passphrase=; also\n" \
  "                       encrypt-cipher-alg=, encrypt-cipher-mode=,\n" \
  "                       encrypt-ivgen-alg=, encrypt-ivgen-hash-alg=,\n" \
  "                       encrypt-hash-alg=, encrypt-iter-time=<MS>."

#endif /* QCOW2_ADAPTER_CREATE_H */
