/* Backing files: open what lies below an image.
 *
 * Security rules, because the image may come from an untrusted guest:
 * - only plain paths are followed: names with a protocol prefix (json:,
 *   nbd:, http:, ...) are refused, so an image cannot point us at other
 *   resources;
 * - following can be turned off altogether (follow_backing = false);
 * - the chain is bounded in depth, and a file that appears twice in the
 *   chain (compared by real path) is refused at once, not after
 *   max_chain_depth opens;
 * - the format comes from the backing format extension; only when it is
 *   absent is the file probed (qcow2 magic or raw).
 */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "io.h"
#include "util.h"

/* QEMU's path_has_protocol: a colon before any slash. */
static bool
has_protocol (const char *name)
{
  size_t n = strcspn (name, ":/");
  return name[n] == ':';
}

char *
qcow2_resolve_path (const char *relative_to, const char *name,
                    const char *what)
{
  const char *slash;
  char *path;

  if (name[0] == '\0') {
    qcow2_error ("%s: empty %s name", relative_to, what);
    return NULL;
  }
  if (has_protocol (name)) {
    qcow2_error ("%s: %s name '%s' is not a plain path; refusing to open it",
                 relative_to, what, name);
    return NULL;
  }
  slash = strrchr (relative_to, '/');
  if (name[0] == '/' || !slash)
    path = strdup (name);
  else if (asprintf (&path, "%.*s/%s", (int) (slash - relative_to),
                     relative_to, name) == -1)
    path = NULL;
  if (!path)
    qcow2_error ("out of memory");
  return path;
}

char *
qcow2_resolve_path_within (const char *relative_to, const char *dir,
                           const char *name, const char *what)
{
  char *base = NULL, *path, *real = NULL, *rdir = NULL;
  size_t n;

  /* An image that is no local file has no directory: names are relative
   * to dir.
   */
  if (!relative_to && asprintf (&base, "%s/", dir) == -1) {
    qcow2_error ("out of memory");
    return NULL;
  }
  path = qcow2_resolve_path (relative_to ? relative_to : base, name, what);
  if (path) {
    real = realpath (path, NULL);
    rdir = realpath (dir, NULL);
    if (!real || !rdir)
      qcow2_error ("%s %s: %s", what, real ? dir : path, strerror (errno));
    else if (n = strlen (rdir),
             strncmp (real, rdir, n) != 0 ||
             (real[n] != '/' && strcmp (rdir, "/") != 0)) {
      qcow2_error ("%s '%s' lies outside %s; refusing to open it", what,
                   name, rdir);
      free (real);
      real = NULL;
    }
  }
  free (base);
  free (path);
  free (rdir);
  return real;
}

static bool
in_chain (const struct qcow2_chain *chain, const char *realpath)
{
  for (; chain; chain = chain->above)
    if (chain->realpath && strcmp (chain->realpath, realpath) == 0)
      return true;
  return false;
}

enum format { FORMAT_QCOW2, FORMAT_RAW };

static int
backing_format (struct qcow2_image *img, struct qcow2_io *io,
                enum format *fmt)
{
  const char *name = img->h.backing_format;
  unsigned char magic[4];

  if (name) {
    if (strcmp (name, "qcow2") == 0)
      *fmt = FORMAT_QCOW2;
    else if (strcmp (name, "raw") == 0)
      *fmt = FORMAT_RAW;
    else {
      qcow2_error ("%s: backing file format '%s' is not supported "
                   "(only qcow2 and raw)", img->filename, name);
      return -ENOTSUP;
    }
    return 0;
  }
  /* No format recorded: probe, as QEMU does. */
  if (qcow2_io_pread (io, magic, sizeof magic, 0) == 0 &&
      get_be32 (magic) == QCOW2_MAGIC)
    *fmt = FORMAT_QCOW2;
  else
    *fmt = FORMAT_RAW;
  return 0;
}

int
qcow2_backing_open (struct qcow2_image *img,
                    const struct qcow2_open_options *opts,
                    const struct qcow2_chain *chain)
{
  struct qcow2_open_options bopts;
  struct qcow2_io *io = NULL;
  char *path = NULL, *real = NULL;
  enum format fmt;
  int r;

  img->backing_kind = BACKING_NONE;
  img->backing_size = 0;
  if (!img->h.backing_file || opts->ignore_backing)
    return 0;

  if (!opts->follow_backing) {
    qcow2_error ("%s: the image has a backing file (%s) but following "
                 "backing files is disabled", img->filename,
                 img->h.backing_file);
    return -EPERM;
  }
  if (chain->depth >= opts->max_chain_depth) {
    qcow2_error ("%s: backing chain too deep (more than %u images)",
                 img->filename, opts->max_chain_depth);
    return -ELOOP;
  }
  path = opts->backing_dir
         ? qcow2_resolve_path_within (img->realpath ? img->filename : NULL,
                                      opts->backing_dir, img->h.backing_file,
                                      "backing file")
         : qcow2_resolve_path (img->filename, img->h.backing_file,
                               "backing file");
  if (!path)
    return -EPERM;
  real = realpath (path, NULL);
  if (!real) {
    r = -errno;
    qcow2_error ("%s: could not open backing file %s: %s", img->filename,
                 path, strerror (errno));
    goto out;
  }
  if (in_chain (chain, real)) {
    qcow2_error ("%s: backing chain loops: %s appears twice",
                 img->filename, real);
    r = -ELOOP;
    goto out;
  }

  r = qcow2_io_file_open (path, QCOW2_IO_READ_ONLY, &io);
  if (r < 0) {
    qcow2_error ("%s: could not open backing file %s: %s", img->filename,
                 path, strerror (-r));
    goto out;
  }
  r = backing_format (img, io, &fmt);
  if (r < 0)
    goto out;

  if (fmt == FORMAT_RAW) {
    r = qcow2_io_get_size (io, &img->backing_size);
    if (r < 0) {
      qcow2_error ("%s: %s", path, strerror (-r));
      goto out;
    }
    img->backing_raw = io;
    img->backing_kind = BACKING_RAW;
    io = NULL;
  }
  else {
    struct qcow2_chain link = { real, chain, chain->depth + 1 };
    bopts = *opts;
    bopts.filename = path;
    bopts.writable = false;
    bopts.data_file = NULL;   /* the override is for the top image only */
    r = qcow2_image_open (io, &bopts, &link, &img->backing);
    io = NULL;                /* owned by the image now, even on failure */
    if (r < 0)
      goto out;
    img->backing_size = qcow2_get_size (img->backing);
    img->backing_kind = BACKING_QCOW2;
  }
  r = 0;

 out:
  qcow2_io_close (io);
  free (path);
  free (real);
  return r;
}

void
qcow2_backing_close (struct qcow2_image *img)
{
  if (img->backing_kind == BACKING_QCOW2)
    qcow2_close (img->backing);
  else if (img->backing_kind == BACKING_RAW)
    qcow2_io_close (img->backing_raw);
  img->backing = NULL;
  img->backing_raw = NULL;
  img->backing_kind = BACKING_NONE;
}
