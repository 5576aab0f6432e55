/* The internal snapshot table: read and validate it.
 *
 * Invariants after qcow2_snapshots_read succeeds: there are exactly
 * h->nb_snapshots entries; the table lies inside the file and is at most
 * 64 MiB; every id and name is a NUL-terminated copy; extra data is at most
 * 1 KiB per entry.  Snapshot L1 tables are checked when a snapshot is used,
 * as QEMU does, so a bad inactive L1 does not stop the active image from
 * being served.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "io.h"
#include "util.h"

#define SNAPSHOT_HEADER_BYTES QCOW2_SNE_FIXED_BYTES
/* Extra data fields: vm_state_size_large, disk_size, icount. */
#define SNAPSHOT_KNOWN_EXTRA QCOW2_SNE_EXTRA_KNOWN_BYTES

int
qcow2_snapshots_read (struct qcow2_io *io, uint64_t file_size,
                      const struct qcow2_header *h,
                      struct qcow2_snapshot **snaps_out,
                      uint64_t *table_bytes_out)
{
  struct qcow2_snapshot *snaps;
  uint64_t off = h->snapshots_offset;
  uint64_t table_bytes = 0;
  unsigned char *var = NULL;
  uint32_t i;
  int r = 0;

  *snaps_out = NULL;
  *table_bytes_out = 0;
  if (h->nb_snapshots == 0)
    return 0;
  snaps = calloc (h->nb_snapshots, sizeof *snaps);
  var = malloc (QCOW2_MAX_SNAPSHOT_EXTRA + 2 * 65535);
  if (!snaps || !var) {
    r = -ENOMEM;
    goto fail;
  }

  for (i = 0; i < h->nb_snapshots; i++) {
    struct qcow2_snapshot *sn = &snaps[i];
    unsigned char hdr[SNAPSHOT_HEADER_BYTES];
    uint32_t extra_size, id_len, name_len;
    uint64_t entry_bytes;

    if (range_exceeds (off, sizeof hdr, file_size)) {
      qcow2_error ("snapshot table entry %" PRIu32
                   " lies past the end of the file", i);
      r = -EINVAL;
      goto fail;
    }
    r = qcow2_io_pread (io, hdr, sizeof hdr, off);
    if (r < 0)
      goto io_fail;
    sn->l1_table_offset = get_be64 (hdr + QCOW2_SNE_L1_TABLE_OFFSET);
    sn->l1_size = get_be32 (hdr + QCOW2_SNE_L1_SIZE);
    id_len = get_be16 (hdr + QCOW2_SNE_ID_SIZE);
    name_len = get_be16 (hdr + QCOW2_SNE_NAME_SIZE);
    sn->date_sec = get_be32 (hdr + QCOW2_SNE_DATE_SEC);
    sn->date_nsec = get_be32 (hdr + QCOW2_SNE_DATE_NSEC);
    sn->vm_clock_nsec = get_be64 (hdr + QCOW2_SNE_VM_CLOCK_NSEC);
    sn->vm_state_size = get_be32 (hdr + QCOW2_SNE_VM_STATE_SIZE);
    extra_size = get_be32 (hdr + QCOW2_SNE_EXTRA_DATA_SIZE);

    if (extra_size > QCOW2_MAX_SNAPSHOT_EXTRA) {
      qcow2_error ("Too much extra metadata in snapshot table entry %" PRIu32
                   " (%" PRIu32 " bytes)", i, extra_size);
      r = -EFBIG;
      goto fail;
    }
    entry_bytes = (SNAPSHOT_HEADER_BYTES + (uint64_t) extra_size + id_len +
                   name_len + 7) & ~7ull;
    table_bytes += entry_bytes;
    if (table_bytes > QCOW2_MAX_SNAPSHOT_TABLE) {
      qcow2_error ("Snapshot table is too big");
      r = -EFBIG;
      goto fail;
    }
    size_t var_len = (size_t) extra_size + id_len + name_len;
    if (range_exceeds (off, SNAPSHOT_HEADER_BYTES + var_len, file_size)) {
      qcow2_error ("snapshot table entry %" PRIu32
                   " runs past the end of the file", i);
      r = -EINVAL;
      goto fail;
    }
    if (var_len > 0) {
      r = qcow2_io_pread (io, var, var_len, off + SNAPSHOT_HEADER_BYTES);
      if (r < 0)
        goto io_fail;
    }

    if (extra_size >= QCOW2_SNE_EXTRA_VM_STATE_SIZE_LARGE + 8)
      sn->vm_state_size = get_be64 (var + QCOW2_SNE_EXTRA_VM_STATE_SIZE_LARGE);
    if (extra_size >= QCOW2_SNE_EXTRA_DISK_SIZE + 8) {
      sn->has_disk_size = true;
      sn->disk_size = get_be64 (var + QCOW2_SNE_EXTRA_DISK_SIZE);
    }
    else
      sn->disk_size = h->size;
    sn->icount = extra_size >= QCOW2_SNE_EXTRA_ICOUNT + 8
                 ? get_be64 (var + QCOW2_SNE_EXTRA_ICOUNT) : UINT64_MAX;
    if (extra_size > SNAPSHOT_KNOWN_EXTRA) {
      sn->extra_unknown_len = extra_size - SNAPSHOT_KNOWN_EXTRA;
      sn->extra_unknown = malloc (sn->extra_unknown_len);
      if (!sn->extra_unknown) {
        r = -ENOMEM;
        goto fail;
      }
      memcpy (sn->extra_unknown, var + SNAPSHOT_KNOWN_EXTRA,
              sn->extra_unknown_len);
    }

    sn->id = malloc (id_len + 1);
    sn->name = malloc (name_len + 1);
    if (!sn->id || !sn->name) {
      r = -ENOMEM;
      goto fail;
    }
    memcpy (sn->id, var + extra_size, id_len);
    sn->id[id_len] = '\0';
    memcpy (sn->name, var + extra_size + id_len, name_len);
    sn->name[name_len] = '\0';

    off += entry_bytes;
  }

  free (var);
  *snaps_out = snaps;
  *table_bytes_out = table_bytes;
  return 0;

 io_fail:
  qcow2_error ("could not read the snapshot table: %s", strerror (-r));
 fail:
  free (var);
  qcow2_snapshots_free (snaps, h->nb_snapshots);
  return r;
}

void
qcow2_snapshots_free (struct qcow2_snapshot *snaps, uint32_t n)
{
  if (!snaps)
    return;
  for (uint32_t i = 0; i < n; i++) {
    free (snaps[i].id);
    free (snaps[i].name);
    free (snaps[i].extra_unknown);
  }
  free (snaps);
}

static uint64_t
entry_bytes (const struct qcow2_snapshot *sn)
{
  return (SNAPSHOT_HEADER_BYTES + SNAPSHOT_KNOWN_EXTRA +
          (uint64_t) sn->extra_unknown_len + strlen (sn->id) +
          strlen (sn->name) + 7) & ~7ull;
}

int
qcow2_snapshots_serialize (const struct qcow2_snapshot *snaps, uint32_t n,
                           unsigned char **buf_out, uint64_t *len_out)
{
  uint64_t len = 0, off = 0;
  unsigned char *buf;

  for (uint32_t i = 0; i < n; i++)
    len += entry_bytes (&snaps[i]);
  if (len > QCOW2_MAX_SNAPSHOT_TABLE) {
    qcow2_error ("Snapshot table is too big");
    return -EFBIG;
  }
  buf = calloc (1, len ? len : 1);
  if (!buf)
    return -ENOMEM;
  for (uint32_t i = 0; i < n; i++) {
    const struct qcow2_snapshot *sn = &snaps[i];
    unsigned char *p = buf + off;
    size_t id_len = strlen (sn->id), name_len = strlen (sn->name);

    put_be64 (p + QCOW2_SNE_L1_TABLE_OFFSET, sn->l1_table_offset);
    put_be32 (p + QCOW2_SNE_L1_SIZE, sn->l1_size);
    put_be16 (p + QCOW2_SNE_ID_SIZE, (uint16_t) id_len);
    put_be16 (p + QCOW2_SNE_NAME_SIZE, (uint16_t) name_len);
    put_be32 (p + QCOW2_SNE_DATE_SEC, sn->date_sec);
    put_be32 (p + QCOW2_SNE_DATE_NSEC, sn->date_nsec);
    put_be64 (p + QCOW2_SNE_VM_CLOCK_NSEC, sn->vm_clock_nsec);
    /* The 32-bit field holds the size when it fits, as QEMU writes it. */
    put_be32 (p + QCOW2_SNE_VM_STATE_SIZE, sn->vm_state_size > UINT32_MAX
                      ? 0 : (uint32_t) sn->vm_state_size);
    put_be32 (p + QCOW2_SNE_EXTRA_DATA_SIZE,
              SNAPSHOT_KNOWN_EXTRA + sn->extra_unknown_len);
    p += SNAPSHOT_HEADER_BYTES;
    put_be64 (p + QCOW2_SNE_EXTRA_VM_STATE_SIZE_LARGE, sn->vm_state_size);
    put_be64 (p + QCOW2_SNE_EXTRA_DISK_SIZE, sn->disk_size);
    put_be64 (p + QCOW2_SNE_EXTRA_ICOUNT, sn->icount);
    p += SNAPSHOT_KNOWN_EXTRA;
    if (sn->extra_unknown_len)
      memcpy (p, sn->extra_unknown, sn->extra_unknown_len);
    p += sn->extra_unknown_len;
    memcpy (p, sn->id, id_len);
    memcpy (p + id_len, sn->name, name_len);
    off += entry_bytes (sn);
  }
  *buf_out = buf;
  *len_out = len;
  return 0;
}

int64_t
qcow2_snapshot_find (const struct qcow2_image *img, const char *name_or_id)
{
  for (uint32_t i = 0; i < img->nb_snapshots; i++)
    if (strcmp (img->snapshots[i].name, name_or_id) == 0)
      return i;
  for (uint32_t i = 0; i < img->nb_snapshots; i++)
    if (strcmp (img->snapshots[i].id, name_or_id) == 0)
      return i;
  return -1;
}

int64_t
qcow2_snapshot_lookup (const struct qcow2_image *img, const char *name_or_id)
{
  int64_t i = qcow2_snapshot_find (img, name_or_id);

  if (i < 0) {
    qcow2_error ("%s: no snapshot with name or id '%s'", img->filename,
                 name_or_id);
    return -ENOENT;
  }
  return i;
}

int
qcow2_snapshot_load_l1 (struct qcow2_image *img,
                        const struct qcow2_snapshot *sn, uint64_t **l1_out)
{
  uint64_t bytes = (uint64_t) sn->l1_size * 8;
  uint64_t *l1;
  int r;

  *l1_out = NULL;
  if (!is_aligned (sn->l1_table_offset, img->cluster_size) ||
      (sn->l1_size && sn->l1_table_offset == 0)) {
    qcow2_error ("%s: snapshot '%s': Snapshot L1 table offset invalid: %#"
                 PRIx64, img->filename, sn->name, sn->l1_table_offset);
    return -EINVAL;
  }
  if (bytes > QCOW2_MAX_L1_BYTES ||
      range_exceeds (sn->l1_table_offset, bytes, qcow2_file_size (img))) {
    qcow2_error ("%s: snapshot '%s': Snapshot L1 table too large (%" PRIu32
                 " entries)", img->filename, sn->name, sn->l1_size);
    return -EFBIG;
  }
  if (sn->disk_size > INT64_MAX) {
    qcow2_error ("%s: snapshot '%s': disk size %" PRIu64 " too large",
                 img->filename, sn->name, sn->disk_size);
    return -EFBIG;
  }
  l1 = malloc (bytes ? bytes : 1);
  if (!l1)
    return -ENOMEM;
  r = bytes ? qcow2_io_pread (img->io, l1, bytes, sn->l1_table_offset) : 0;
  if (r < 0) {
    qcow2_error ("%s: snapshot '%s': could not read its L1 table: %s",
                 img->filename, sn->name, strerror (-r));
    free (l1);
    return r;
  }
  for (uint32_t i = 0; i < sn->l1_size; i++)
    l1[i] = get_be64 (&l1[i]);
  *l1_out = l1;
  return 0;
}
