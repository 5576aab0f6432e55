/* The engine's byte backend over the layer below nbdkit-qcow2-filter
 * (io_next.c).
 */
#ifndef QCOW2_FILTER_IO_NEXT_H
#define QCOW2_FILTER_IO_NEXT_H

#include <pthread.h>

struct qcow2_io;

/* A fixed-size container over the shared context `next`, which must stay
 * open while the io lives (closing the io leaves it open).  With
 * serialise, every call into the context holds that mutex.  -errno.
 */
int qcow2_io_next_new (nbdkit_next *next, pthread_mutex_t *serialise,
                       struct qcow2_io **io_out);

#endif /* QCOW2_FILTER_IO_NEXT_H */
