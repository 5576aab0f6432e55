/* Persistent dirty bitmaps in the plugin and the filter (bitmaps.c): startup keys that
 * manage them, and one read-only export per bitmap.
 */
#ifndef QCOW2_ADAPTER_BITMAPS_H
#define QCOW2_ADAPTER_BITMAPS_H

#include <stdbool.h>
#include <stdint.h>

struct qcow2_image;
struct nbdkit_exports;
struct nbdkit_extents;

/* 0: taken; -1: bad value (reported); 1: not a bitmap key. */
int bitmaps_config (const char *key, const char *value);
/* In .get_ready, after opening: run the operations in the order given. */
int bitmaps_run (struct qcow2_image *image);
void bitmaps_unload (void);

/* The export prefix: "bitmap:NAME" serves bitmap NAME's dirty map. */
#define BITMAP_EXPORT_PREFIX "bitmap:"

/* Is `export` a bitmap export?  Then *index is its bitmap (0 returned),
 * or -1 with the reason reported.
 */
bool bitmaps_is_export (const char *export);
int bitmaps_open_export (struct qcow2_image *image, const char *export,
                         uint32_t *index);
int bitmaps_list_exports (struct qcow2_image *image,
                          struct nbdkit_exports *exports);
/* Block status of a bitmap export: dirty granules are data, clean ones
 * holes.  Negative errno on failure.
 */
int bitmaps_extents (struct qcow2_image *image, uint32_t index,
                     uint32_t count, uint64_t offset, bool one,
                     struct nbdkit_extents *extents);

#define BITMAPS_CONFIG_HELP \
  "bitmap-add=<NAME>      Add a persistent dirty bitmap before serving.\n" \
  "bitmap-granularity=<SIZE>  Granularity of the bitmaps added after it\n" \
  "                       (512 to 2G, a power of 2; default as QEMU).\n" \
  "bitmap-remove=<NAME>   Remove a bitmap before serving.\n" \
  "bitmap-clear=<NAME>    Clear a bitmap (mark everything clean).\n" \
  "bitmap-disable=<NAME>  Stop a bitmap from recording writes.\n" \
  "bitmap-enable=<NAME>   Make a bitmap record writes again.  These keys\n" \
  "                       may repeat and are carried out in the order\n" \
  "                       given, after the snapshot keys.\n"

#endif
