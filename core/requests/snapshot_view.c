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

int
qcow2_view_open (struct qcow2_image *img, const char *name_or_id,
                 struct qcow2_view **view_out)
{
  int64_t i = qcow2_snapshot_lookup (img, name_or_id);
  const struct qcow2_snapshot *sn;
  struct qcow2_view *v;
  int r;

  *view_out = NULL;
  if (i < 0)
    return (int) i;
  sn = &img->snapshots[i];
  v = calloc (1, sizeof *v);
  if (!v)
    return -ENOMEM;
  v->img = img;
  v->l1_size = sn->l1_size;
  v->size = sn->disk_size;
  r = qcow2_snapshot_load_l1 (img, sn, &v->l1);
  if (r < 0) {
    free (v);
    return r;
  }
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
