/* An ordered list of startup operations named by keys (snapshot-create=,
 * bitmap-add=...): appended in .config in command-line order, carried
 * out in that order after the image is open (snapshots.c, bitmaps.c).
 */
#ifndef QCOW2_ADAPTER_OPLIST_H
#define QCOW2_ADAPTER_OPLIST_H

#include <stddef.h>
#include <stdint.h>

struct op {
  int kind;             /* the owner's enum */
  char *name;           /* the key's value, never empty */
  uint64_t arg;         /* the owner's (a bitmap's granularity) */
};

struct oplist {
  struct op *ops;
  size_t n;
};

/* Append {kind, a copy of name, arg}; an empty name is refused with a
 * message naming key and what (e.g. "snapshot").  0, or -1 reported.
 */
int oplist_append (struct oplist *l, const char *key, const char *what,
                   int kind, const char *name, uint64_t arg);
void oplist_free (struct oplist *l);

#endif /* QCOW2_ADAPTER_OPLIST_H */
