/* The contract between nbdkit-qcow2-compress-filter and the layer that
 * runs the engine (nbdkit-qcow2-plugin, or nbdkit-qcow2-filter over any
 * plugin).  nbdkit has no "write compressed" flag, so the compress filter
 * opens this reserved export name below it: the active image, where every
 * whole cluster written is stored compressed.  The engine's layer
 * describes that export with COMPRESSED_DESCRIPTION, which is how the
 * filter knows the layer below understood the name (any other layer
 * would serve something else, or refuse it).  A snapshot that happens to
 * bear the name stays reachable by its id.
 */
#ifndef QCOW2_ADAPTER_COMPRESSED_EXPORT_H
#define QCOW2_ADAPTER_COMPRESSED_EXPORT_H

#define COMPRESSED_EXPORT "qcow2:compressed"
#define COMPRESSED_DESCRIPTION "active image, compressing whole-cluster writes"

#endif /* QCOW2_ADAPTER_COMPRESSED_EXPORT_H */
