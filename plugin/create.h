/* Creating and growing images from plugin keys (create.c). */
#ifndef QCOW2_PLUGIN_CREATE_H
#define QCOW2_PLUGIN_CREATE_H

#include <stdbool.h>

struct qcow2_image;

/* 0: taken; -1: bad value (reported); 1: not a creation key. */
int create_config (const char *key, const char *value);
/* In .config_complete: check the keys fit together. */
int create_config_complete (const char *filename);
/* Is this run creating the image (so file= may not exist yet)? */
bool create_requested (void);
/* In .get_ready, before opening: create the image if asked. */
int create_image (const char *filename, const char *passphrase,
                  const char *data_file);
/* After opening: apply size= to an existing image (resize=true). */
int create_resize (struct qcow2_image *image);

#define CREATE_CONFIG_HELP \
  "create=true            Create the image (refuses an existing file).\n" \
  "overwrite=true         With create=true, replace an existing file.\n" \
  "size=<SIZE>            Virtual size for create=true, or the new size\n" \
  "                       of an existing image with resize=true.\n" \
  "resize=true            Grow an existing image to size= (never shrinks).\n" \
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

#endif
