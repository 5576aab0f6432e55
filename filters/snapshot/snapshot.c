/* nbdkit-qcow2-snapshot-filter: serve one internal snapshot of a qcow2
 * image to every client, whatever export name it asks for.
 *
 * It talks to the plugin only through nbdkit's public API: the snapshot's
 * name becomes the export name passed down to the next layer (as the ext2
 * filter consumes the client's name), and the qcow2 plugin serves its
 * snapshots as read-only exports of that name.  So it chains with any
 * other filter, in any order that passes export names through.
 *
 * A missing snapshot is reported when a client connects: nbdkit 1.32
 * gives a shared (connection-less) context no export name, so the plugin
 * cannot be asked at startup.
 */
#include <nbdkit-filter.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *snapshot;   /* owned by nbdkit */

static int
snapshot_config (nbdkit_next_config *next, nbdkit_backend *nxdata,
                 const char *key, const char *value)
{
  if (strcmp (key, "snapshot") == 0) {
    if (*value == '\0') {
      nbdkit_error ("snapshot= must name a snapshot (by name or id)");
      return -1;
    }
    snapshot = value;
    return 0;
  }
  return next (nxdata, key, value);
}

static int
snapshot_config_complete (nbdkit_next_config_complete *next,
                          nbdkit_backend *nxdata)
{
  if (!snapshot) {
    nbdkit_error ("the snapshot=NAME parameter is required");
    return -1;
  }
  return next (nxdata);
}

#define snapshot_config_help \
  "snapshot=<NAME|ID>     (required) The internal snapshot to serve."

/* One export: the snapshot, under the default name. */
static int
snapshot_list_exports (nbdkit_next_list_exports *next, nbdkit_backend *nxdata,
                       int readonly, int is_tls,
                       struct nbdkit_exports *exports)
{
  (void) next; (void) nxdata; (void) readonly; (void) is_tls;
  return nbdkit_add_export (exports, "", snapshot);
}

static const char *
snapshot_default_export (nbdkit_next_default_export *next,
                         nbdkit_backend *nxdata, int readonly, int is_tls)
{
  (void) next; (void) nxdata; (void) readonly; (void) is_tls;
  return "";
}

static void *
snapshot_open (nbdkit_next_open *next, nbdkit_context *nxdata, int readonly,
               const char *exportname, int is_tls)
{
  (void) readonly; (void) exportname; (void) is_tls;
  /* Snapshots are read-only; whatever the client asked for. */
  if (next (nxdata, 1, snapshot) == -1)
    return NULL;
  return NBDKIT_HANDLE_NOT_NEEDED;
}

static struct nbdkit_filter filter = {
  .name = "qcow2-snapshot",
  .longname = "nbdkit qcow2 snapshot selection filter",
  .config = snapshot_config,
  .config_complete = snapshot_config_complete,
  .config_help = snapshot_config_help,
  .list_exports = snapshot_list_exports,
  .default_export = snapshot_default_export,
  .open = snapshot_open,
};

NBDKIT_REGISTER_FILTER (filter)
