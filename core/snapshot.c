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

#define SNAPSHOT_HEADER_BYTES 40

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
    sn->l1_table_offset = get_be64 (hdr);
    sn->l1_size = get_be32 (hdr + 8);
    id_len = get_be16 (hdr + 12);
    name_len = get_be16 (hdr + 14);
    sn->date_sec = get_be32 (hdr + 16);
    sn->date_nsec = get_be32 (hdr + 20);
    sn->vm_clock_nsec = get_be64 (hdr + 24);
    sn->vm_state_size = get_be32 (hdr + 32);
    extra_size = get_be32 (hdr + 36);

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

    if (extra_size >= 8)
      sn->vm_state_size = get_be64 (var);
    if (extra_size >= 16) {
      sn->has_disk_size = true;
      sn->disk_size = get_be64 (var + 8);
    }
    else
      sn->disk_size = h->size;
    sn->icount = extra_size >= 24 ? get_be64 (var + 16) : UINT64_MAX;

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
  }
  free (snaps);
}
