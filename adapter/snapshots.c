/* Keys that create, delete and apply internal snapshots before the
 * image is served, like `qemu-img snapshot -c/-d/-a`, mapped onto the
 * engine's qcow2_snapshot_create/delete/apply.
 *
 * nbdkit has no way to act on a running export, so snapshots are taken
 * at startup: `nbdkit qcow2 disk.qcow2 snapshot-create=before-upgrade`
 * records the image as it is, then serves it read-write.  Operations run
 * in the order given on the command line, after size= and check=, and any
 * failure stops the server before it serves anything.
 */
#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include <stdlib.h>
#include <string.h>

#include "oplist.h"
#include "qcow2.h"
#include "snapshots.h"

enum op_kind { OP_CREATE, OP_DELETE, OP_APPLY };

static struct oplist ops;

int
snapshots_config (const char *key, const char *value)
{
  enum op_kind kind;

  if (strcmp (key, "snapshot-create") == 0)
    kind = OP_CREATE;
  else if (strcmp (key, "snapshot-delete") == 0)
    kind = OP_DELETE;
  else if (strcmp (key, "snapshot-apply") == 0)
    kind = OP_APPLY;
  else
    return 1;
  return oplist_append (&ops, key, "snapshot", kind, value, 0);
}

int
snapshots_run (struct qcow2_image *image)
{
  if (ops.n == 0)
    return 0;
  if (qcow2_enable_write (image) < 0)
    return -1;
  for (size_t i = 0; i < ops.n; i++) {
    const char *name = ops.ops[i].name;
    int r;

    switch (ops.ops[i].kind) {
    case OP_CREATE:
      r = qcow2_snapshot_create (image, name);
      break;
    case OP_DELETE:
      r = qcow2_snapshot_delete (image, name);
      break;
    default:
      r = qcow2_snapshot_apply (image, name);
      break;
    }
    if (r < 0)
      return -1;    /* the engine said why */
    nbdkit_debug ("snapshot %s: %s done", name,
                  ops.ops[i].kind == OP_CREATE ? "create"
                  : ops.ops[i].kind == OP_DELETE ? "delete" : "apply");
  }
  return 0;
}

void
snapshots_unload (void)
{
  oplist_free (&ops);
}
