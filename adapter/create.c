/* Keys that create an image or grow one, mapped onto the engine's
 * qcow2_create (a file: the plugin), qcow2_create_io (a container: the
 * filter) and qcow2_resize.  Names and values follow
 * `qemu-img create -f qcow2 -o ...`, with nbdkit's spelling of keys.
 *
 * Safety rule: an existing file is never replaced unless overwrite=true,
 * and an existing image never changes size unless resize=true.
 */
#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "create.h"
#include "qcow2.h"

static bool create, overwrite, resize;
static int64_t size = -1;
static const char *size_key = "size";
static bool creation_key_given;   /* a key that only makes sense with create */
static struct qcow2_create_options copts;
static bool copts_ready;

static void
init_once (void)
{
  if (!copts_ready) {
    qcow2_create_options_init (&copts);
    copts_ready = true;
  }
}

static int
parse_bool_into (const char *value, bool *out)
{
  int b = nbdkit_parse_bool (value);
  if (b == -1)
    return -1;
  *out = b;
  return 0;
}

/* Keys that describe the image to create; 1 when key is not one. */
static int
image_option (const char *key, const char *value)
{
  if (strcmp (key, "cluster-size") == 0) {
    int64_t v = nbdkit_parse_size (value);
    if (v == -1)
      return -1;
    if (v > UINT32_MAX) {
      nbdkit_error ("cluster-size too large");
      return -1;
    }
    copts.cluster_size = (uint32_t) v;
    return 0;
  }
  if (strcmp (key, "compat") == 0) {
    if (strcmp (value, "0.10") == 0 || strcmp (value, "v2") == 0)
      copts.version = 2;
    else if (strcmp (value, "1.1") == 0 || strcmp (value, "v3") == 0)
      copts.version = 3;
    else {
      nbdkit_error ("compat must be 0.10 or 1.1, not '%s'", value);
      return -1;
    }
    return 0;
  }
  if (strcmp (key, "refcount-bits") == 0)
    return nbdkit_parse_unsigned ("refcount-bits", value,
                                  &copts.refcount_bits);
  if (strcmp (key, "lazy-refcounts") == 0)
    return parse_bool_into (value, &copts.lazy_refcounts);
  if (strcmp (key, "extended-l2") == 0)
    return parse_bool_into (value, &copts.extended_l2);
  if (strcmp (key, "compression-type") == 0) {
    if (strcmp (value, "zlib") == 0 || strcmp (value, "deflate") == 0)
      copts.compression_type = 0;
    else if (strcmp (value, "zstd") == 0)
      copts.compression_type = 1;
    else {
      nbdkit_error ("compression-type must be zlib or zstd, not '%s'", value);
      return -1;
    }
    return 0;
  }
  if (strcmp (key, "backing-file") == 0) {
    copts.backing_file = value;
    return 0;
  }
  if (strcmp (key, "backing-format") == 0) {
    if (strcmp (value, "qcow2") != 0 && strcmp (value, "raw") != 0) {
      nbdkit_error ("backing-format must be qcow2 or raw, not '%s'", value);
      return -1;
    }
    copts.backing_format = value;
    return 0;
  }
  if (strcmp (key, "data-file-raw") == 0)
    return parse_bool_into (value, &copts.data_file_raw);
  if (strcmp (key, "preallocation") == 0) {
    if (strcmp (value, "metadata") == 0)
      copts.preallocate_metadata = true;
    else if (strcmp (value, "off") == 0)
      copts.preallocate_metadata = false;
    else {
      nbdkit_error ("preallocation must be off or metadata, not '%s'",
                    value);
      return -1;
    }
    return 0;
  }
  if (strcmp (key, "encrypt-format") == 0) {
    if (strcmp (value, "luks") != 0) {
      nbdkit_error ("encrypt-format must be luks (legacy aes images can be "
                    "read and written, not created)");
      return -1;
    }
    copts.encrypt = true;
    return 0;
  }
  if (strcmp (key, "encrypt-cipher-alg") == 0)
    copts.encrypt_cipher_alg = value;
  else if (strcmp (key, "encrypt-cipher-mode") == 0)
    copts.encrypt_cipher_mode = value;
  else if (strcmp (key, "encrypt-ivgen-alg") == 0)
    copts.encrypt_ivgen_alg = value;
  else if (strcmp (key, "encrypt-ivgen-hash-alg") == 0)
    copts.encrypt_ivgen_hash_alg = value;
  else if (strcmp (key, "encrypt-hash-alg") == 0)
    copts.encrypt_hash_alg = value;
  else if (strcmp (key, "encrypt-iter-time") == 0)
    return nbdkit_parse_unsigned ("encrypt-iter-time", value,
                                  &copts.encrypt_iter_time_ms);
  else
    return 1;
  return 0;
}

void
create_set_size_key (const char *key)
{
  size_key = key;
}

int
create_config (const char *key, const char *value)
{
  int r;

  init_once ();
  if (strcmp (key, "create") == 0)
    return parse_bool_into (value, &create);
  if (strcmp (key, "overwrite") == 0)
    return parse_bool_into (value, &overwrite);
  if (strcmp (key, "resize") == 0)
    return parse_bool_into (value, &resize);
  if (strcmp (key, size_key) == 0) {
    size = nbdkit_parse_size (value);
    return size == -1 ? -1 : 0;
  }
  r = image_option (key, value);
  if (r != 1)
    creation_key_given = true;
  return r;
}

bool
create_requested (void)
{
  return create;
}

int
create_config_complete (const char *filename)
{
  (void) filename;
  if (!create && creation_key_given) {
    nbdkit_error ("image options such as cluster-size= only apply with "
                  "create=true");
    return -1;
  }
  if (!create && overwrite) {
    nbdkit_error ("overwrite=true only applies with create=true");
    return -1;
  }
  if (create && resize) {
    nbdkit_error ("resize=true applies to existing images, not with "
                  "create=true");
    return -1;
  }
  if (create && size == -1 && !copts.backing_file) {
    nbdkit_error ("create=true needs %s= (or a backing-file= to take the "
                  "size from)", size_key);
    return -1;
  }
  if (resize && size == -1) {
    nbdkit_error ("resize=true needs %s=", size_key);
    return -1;
  }
  return 0;
}

int
create_image (const char *filename, const char *passphrase,
              const char *data_file)
{
  if (!create)
    return 0;
  copts.filename = filename;
  copts.size = size == -1 ? 0 : (uint64_t) size;
  copts.overwrite = overwrite;
  copts.passphrase = passphrase;
  copts.data_file = data_file;
  return qcow2_create (&copts) < 0 ? -1 : 0;
}

int
create_image_io (struct qcow2_io *io, const char *name,
                 const char *passphrase, const char *backing_dir)
{
  if (!create)
    return 0;
  copts.filename = name;
  copts.size = size == -1 ? 0 : (uint64_t) size;
  copts.overwrite = overwrite;
  copts.passphrase = passphrase;
  copts.backing_dir = backing_dir;
  return qcow2_create_io (&copts, io) < 0 ? -1 : 0;
}

int
create_resize (struct qcow2_image *image)
{
  uint64_t cur = qcow2_get_size (image);

  if (create || size == -1 || (uint64_t) size == cur)
    return 0;
  if (!resize) {
    nbdkit_error ("%s=%" PRIi64 " differs from the image's size %" PRIu64
                  "; add resize=true to grow it", size_key, size, cur);
    return -1;
  }
  if (qcow2_enable_write (image) < 0 ||
      qcow2_resize (image, (uint64_t) size) < 0)
    return -1;
  return 0;
}
