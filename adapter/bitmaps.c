/* Persistent dirty bitmaps in the plugin and the filter.
 *
 * Keys manage bitmaps at startup, like `qemu-img bitmap`, mapped onto the
 * engine's qcow2_bitmap_add/remove/clear/set_enabled; they run in the
 * order given, after the snapshot keys, and any failure stops the server
 * before it serves anything.  A backup tool rotates bitmaps this way:
 * `bitmap-disable=mon bitmap-add=tue`.
 *
 * nbdkit (to its newest release) cannot carry NBD metadata contexts other
 * than base:allocation, so QEMU's `qemu:dirty-bitmap:NAME` context cannot
 * be offered.  Instead every bitmap is a further export, `bitmap:NAME`,
 * read-only: its block status says "data" for dirty granules and "hole"
 * for clean ones (without the zero flag: clean areas hold data), and its
 * reads return the active image's bytes.  `nbdinfo --map` of it is the
 * dirty map, and copying its data extents is an incremental backup.
 */
#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bitmaps.h"
#include "oplist.h"
#include "qcow2.h"

enum op_kind { OP_ADD, OP_REMOVE, OP_CLEAR, OP_DISABLE, OP_ENABLE };

static const struct {
  const char *key;
  const char *done;
} kinds[] = {
  [OP_ADD] = { "bitmap-add", "added" },
  [OP_REMOVE] = { "bitmap-remove", "removed" },
  [OP_CLEAR] = { "bitmap-clear", "cleared" },
  [OP_DISABLE] = { "bitmap-disable", "disabled" },
  [OP_ENABLE] = { "bitmap-enable", "enabled" },
};

/* ops.ops[i].arg: OP_ADD's granularity; 0: the engine's default. */
static struct oplist ops;
static uint32_t granularity;   /* the last bitmap-granularity= */

int
bitmaps_config (const char *key, const char *value)
{
  int kind = -1;

  if (strcmp (key, "bitmap-granularity") == 0) {
    int64_t g = nbdkit_parse_size (value);
    if (g == -1)
      return -1;
    if (g < 512 || g > (INT64_C (1) << 31) || (g & (g - 1))) {
      nbdkit_error ("bitmap-granularity must be a power of 2 from 512 "
                    "to 2G, not %s", value);
      return -1;
    }
    granularity = (uint32_t) g;
    return 0;
  }
  for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++)
    if (strcmp (key, kinds[i].key) == 0)
      kind = (int) i;
  if (kind < 0)
    return 1;
  return oplist_append (&ops, key, "bitmap", kind, value, granularity);
}

int
bitmaps_run (struct qcow2_image *image)
{
  const char *broken = qcow2_bitmaps_error (image);

  if (broken)
    fprintf (stderr, "nbdkit-qcow2: warning: %s: serving the image "
             "read-only, as writing would lose its bitmaps\n", broken);
  if (ops.n == 0)
    return 0;
  if (qcow2_enable_write (image) < 0)
    return -1;
  for (size_t i = 0; i < ops.n; i++) {
    const char *name = ops.ops[i].name;
    int r;

    switch (ops.ops[i].kind) {
    case OP_ADD:
      r = qcow2_bitmap_add (image, name, (uint32_t) ops.ops[i].arg);
      break;
    case OP_REMOVE:
      r = qcow2_bitmap_remove (image, name);
      break;
    case OP_CLEAR:
      r = qcow2_bitmap_clear (image, name);
      break;
    default:
      r = qcow2_bitmap_set_enabled (image, name, ops.ops[i].kind == OP_ENABLE);
      break;
    }
    if (r < 0)
      return -1;    /* the engine said why */
    nbdkit_debug ("bitmap %s: %s", name, kinds[ops.ops[i].kind].done);
  }
  return 0;
}

void
bitmaps_unload (void)
{
  oplist_free (&ops);
  granularity = 0;
}

bool
bitmaps_is_export (const char *export)
{
  return export &&
         strncmp (export, BITMAP_EXPORT_PREFIX,
                  strlen (BITMAP_EXPORT_PREFIX)) == 0;
}

int
bitmaps_open_export (struct qcow2_image *image, const char *export,
                     uint32_t *index)
{
  const char *name = export + strlen (BITMAP_EXPORT_PREFIX);
  struct qcow2_bitmap_info info;
  int64_t i = qcow2_bitmap_find (image, name);

  if (i < 0) {
    nbdkit_error ("%s: no bitmap named '%s'", export, name);
    return -1;
  }
  qcow2_bitmap_get_info (image, (uint32_t) i, &info);
  if (info.inconsistent) {
    nbdkit_error ("%s: the bitmap is inconsistent (in use, or left by a "
                  "crash): it cannot be used for a backup", export);
    return -1;
  }
  *index = (uint32_t) i;
  return 0;
}

int
bitmaps_list_exports (struct qcow2_image *image,
                      struct nbdkit_exports *exports)
{
  for (uint32_t i = 0; i < qcow2_bitmap_count (image); i++) {
    struct qcow2_bitmap_info info;
    char *name, desc[256];
    int r;

    qcow2_bitmap_get_info (image, i, &info);
    if (info.inconsistent)
      snprintf (desc, sizeof desc, "dirty bitmap, granularity %" PRIu32
                ", inconsistent (in use): not usable", info.granularity);
    else
      snprintf (desc, sizeof desc, "dirty bitmap, granularity %" PRIu32
                ", %s, %" PRIu64 " bytes dirty, read-only",
                info.granularity, info.enabled ? "enabled" : "disabled",
                info.dirty_bytes);
    if (asprintf (&name, "%s%s", BITMAP_EXPORT_PREFIX, info.name) < 0) {
      nbdkit_error ("asprintf: %m");
      return -1;
    }
    r = nbdkit_add_export (exports, name, desc);
    free (name);
    if (r == -1)
      return -1;
  }
  return 0;
}

static int
add_extent (void *opaque, uint64_t offset, uint64_t length, uint32_t flags)
{
  return nbdkit_add_extent (opaque, offset, length,
                            flags & QCOW2_EXTENT_HOLE ? NBDKIT_EXTENT_HOLE
                                                      : 0);
}

int
bitmaps_extents (struct qcow2_image *image, uint32_t index, uint32_t count,
                 uint64_t offset, bool one, struct nbdkit_extents *extents)
{
  return qcow2_bitmap_extents (image, index, offset, count, one, add_extent,
                               extents);
}
