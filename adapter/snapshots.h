/* Snapshot operations from keys (snapshots.c). */
#ifndef QCOW2_ADAPTER_SNAPSHOTS_H
#define QCOW2_ADAPTER_SNAPSHOTS_H

struct qcow2_image;

/* 0: taken; -1: bad value (reported); 1: not a snapshot key. */
int snapshots_config (const char *key, const char *value);
/* In .get_ready, after opening: run the operations in the order given. */
int snapshots_run (struct qcow2_image *image);
void snapshots_unload (void);

#define SNAPSHOTS_CONFIG_HELP \
  "snapshot-create=<NAME> Take an internal snapshot before serving.\n" \
  "snapshot-delete=<NAME|ID>  Delete an internal snapshot before serving.\n" \
  "snapshot-apply=<NAME|ID>   Revert the image to a snapshot before\n" \
  "                       serving.  These keys may repeat and are carried\n" \
  "                       out in the order given.\n"

#endif
