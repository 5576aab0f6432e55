/* Ordered startup operations (oplist.h). */
#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include <stdlib.h>
#include <string.h>

#include "oplist.h"

int
oplist_append (struct oplist *l, const char *key, const char *what,
               int kind, const char *name, uint64_t arg)
{
  struct op *p;

  if (*name == '\0') {
    nbdkit_error ("%s: the %s name must not be empty", key, what);
    return -1;
  }
  p = realloc (l->ops, (l->n + 1) * sizeof *p);
  if (!p) {
    nbdkit_error ("realloc: %m");
    return -1;
  }
  l->ops = p;
  p[l->n].kind = kind;
  p[l->n].arg = arg;
  p[l->n].name = strdup (name);
  if (!p[l->n].name) {
    nbdkit_error ("strdup: %m");
    return -1;
  }
  l->n++;
  return 0;
}

void
oplist_free (struct oplist *l)
{
  for (size_t i = 0; i < l->n; i++)
    free (l->ops[i].name);
  free (l->ops);
  l->ops = NULL;
  l->n = 0;
}
