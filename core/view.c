/* Read-only views of internal snapshots: the same read path and block
 * status as the active image, through the snapshot's own L1 table.
 *
 * The snapshot's L1 is checked as QEMU checks it when a snapshot is used
 * (aligned, at most 32 MiB, inside the file) and loaded once per view.
 * Its L2 tables and data clusters are never changed in place by writers
 * (they are shared, so COPIED is clear and writers copy first), so a view
 * needs no lock.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "io.h"
#include "util.h"

struct qcow2_view {
  struct qcow2_image *img;
  uint64_t *l1;
  uint32_t l1_size;
  uint64_t size;
};

uint32_t
qcow2_snapshot_count (const struct qcow2_image *img)
{
  return img->nb_snapshots;
}

void
qcow2_snapshot_get_info (const struct qcow2_image *img, uint32_t i,
                         struct qcow2_snapshot_info *info)
{
  const struct qcow2_snapshot *sn = &img->snapshots[i];

  info->id = sn->id;
  info->name = sn->name;
  info->disk_size = sn->disk_size;
  info->vm_state_size = sn->vm_state_size;
  info->date_sec = sn->date_sec;
  info->date_nsec = sn->date_nsec;
  info->vm_clock_nsec = sn->vm_clock_nsec;
}

static const struct qcow2_snapshot *
find (const struct qcow2_image *img, const char *name_or_id)
{
  for (uint32_t i = 0; i < img->nb_snapshots; i++)
    if (strcmp (img->snapshots[i].name, name_or_id) == 0)
      return &img->snapshots[i];
  for (uint32_t i = 0; i < img->nb_snapshots; i++)
    if (strcmp (img->snapshots[i].id, name_or_id) == 0)
      return &img->snapshots[i];
  return NULL;
}

int
qcow2_view_open (struct qcow2_image *img, const char *name_or_id,
                 struct qcow2_view **view_out)
{
  const struct qcow2_snapshot *sn = find (img, name_or_id);
  struct qcow2_view *v;
  uint64_t bytes;
  int r;

  *view_out = NULL;
  if (!sn) {
    qcow2_error ("%s: no snapshot with name or id '%s'", img->filename,
                 name_or_id);
    return -ENOENT;
  }
  bytes = (uint64_t) sn->l1_size * 8;
  if (!is_aligned (sn->l1_table_offset, img->cluster_size) ||
      (sn->l1_size && sn->l1_table_offset == 0)) {
    qcow2_error ("%s: snapshot '%s': Snapshot L1 table offset invalid: %#"
                 PRIx64, img->filename, sn->name, sn->l1_table_offset);
    return -EINVAL;
  }
  if (bytes > QCOW2_MAX_L1_BYTES ||
      range_exceeds (sn->l1_table_offset, bytes, img->file_size)) {
    qcow2_error ("%s: snapshot '%s': Snapshot L1 table too large (%" PRIu32
                 " entries)", img->filename, sn->name, sn->l1_size);
    return -EFBIG;
  }
  if (sn->disk_size > INT64_MAX) {
    qcow2_error ("%s: snapshot '%s': disk size %" PRIu64 " too large",
                 img->filename, sn->name, sn->disk_size);
    return -EFBIG;
  }

  v = calloc (1, sizeof *v);
  if (!v)
    return -ENOMEM;
  v->img = img;
  v->l1_size = sn->l1_size;
  v->size = sn->disk_size;
  v->l1 = malloc (bytes ? bytes : 1);
  if (!v->l1) {
    free (v);
    return -ENOMEM;
  }
  r = bytes ? qcow2_io_pread (img->io, v->l1, bytes, sn->l1_table_offset) : 0;
  if (r < 0) {
    qcow2_error ("%s: snapshot '%s': could not read its L1 table: %s",
                 img->filename, sn->name, strerror (-r));
    qcow2_view_close (v);
    return r;
  }
  for (uint32_t i = 0; i < v->l1_size; i++)
    v->l1[i] = get_be64 (&v->l1[i]);
  *view_out = v;
  return 0;
}

void
qcow2_view_close (struct qcow2_view *v)
{
  if (v) {
    free (v->l1);
    free (v);
  }
}

uint64_t
qcow2_view_get_size (const struct qcow2_view *v)
{
  return v->size;
}

int
qcow2_view_read (struct qcow2_view *v, void *buf, uint64_t len,
                 uint64_t offset)
{
  if (range_exceeds (offset, len, v->size)) {
    qcow2_error ("read of %" PRIu64 " bytes at %" PRIu64
                 " is beyond the end of the snapshot", len, offset);
    return -EINVAL;
  }
  return qcow2_read_l1 (v->img, v->l1, v->l1_size, buf, len, offset);
}

int
qcow2_view_extents (struct qcow2_view *v, uint64_t offset, uint64_t len,
                    bool one, qcow2_extent_fn fn, void *opaque)
{
  if (range_exceeds (offset, len, v->size))
    return -EINVAL;
  return qcow2_extents_l1 (v->img, v->l1, v->l1_size, offset, len, one, fn,
                           opaque);
}
