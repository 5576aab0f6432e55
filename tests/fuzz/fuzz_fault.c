/* nbdkit-qcow2
 * Copyright (C) 2026 the nbdkit-qcow2 authors
 * SPDX-License-Identifier: BSD-3-Clause (see LICENSE)
 */

/* libFuzzer target for fault injection (tests/fault): the input chooses
 * the image (cluster size, refcount width, disk size), a workload of up
 * to 64 operations (writes, FUA writes, zeroes, trims, flushes, resizes,
 * snapshot creates and deletes) and the fault (the k-th write or flush,
 * one-shot, sticky or torn).  fault_run runs it over the failing backend
 * and reopens the image; any crash or sanitizer report, an image that
 * does not reopen, a corruption qcow2_check finds, or a write
 * acknowledged before a successful flush that does not read back
 * (workload.h) aborts.  tests/unit/test_fault.c runs one fixed workload
 * for every k and adds qemu-img check.
 *
 * Input: 6 bytes of parameters, then 4 bytes per operation:
 *   [0] bit 0: fault target (write, flush); bits 1-2: mode (% 3)
 *   [1..2] k - 1, little-endian, modulo the workload's writes or flushes
 *   [3] cluster size 512 << (b % 4);  [4] refcount bits 8 << (b % 4)
 *   [5] disk size (b % 16 + 1) * 64 KiB
 *   op: [0] kind (% 9), and bit 7 for long ranges; [1..2] offset in
 *   512-byte sectors (little-endian); [3] length in sectors - 1 (times
 *   16 for long ranges); resize: to ([1] + 1) * 64 KiB; snapshot slot:
 *   [1] % 2.  Disks stay within 16 MiB.
 *
 * Built with the other targets (tests/fuzz/meson.build); run with
 *   FUZZ_TARGET=fuzz_fault tests/fuzz/run.sh SECONDS
 */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "qcow2.h"
#include "fault_io.h"
#include "workload.h"
#include "fuzz_common.h"

#define MAX_OPS 64
#define MAX_DISK (16u << 20)

static void
check_outcome (const struct fault_plan *plan, const struct fault_outcome *o)
{
  if (o->reopen < 0 || o->check < 0 || o->result.corruptions ||
      o->result.check_errors || o->lost) {
    fprintf (stderr, "fuzz_fault: %s %s k=%" PRIu64 " (in op %ld): reopen "
             "%d, check %d, %" PRIu64 " corruptions, %" PRIu64 " check "
             "errors, %" PRIu64 " model violations (%s)\n",
             fault_target_name (plan->target), fault_mode_name (plan->mode),
             plan->k, o->fired_in, o->reopen, o->check,
             o->result.corruptions, o->result.check_errors, o->lost,
             o->first_lost);
    abort ();
  }
}

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  static bool initialised;
  struct wop ops[MAX_OPS];
  struct workload wl;
  struct fault_plan plan = { 0 };
  struct fault_outcome o;
  size_t n = 0;

  if (!initialised) {
    qcow2_set_error_handler (discard_error, NULL);
    initialised = true;
  }
  if (size < 6)
    return -1;
  plan.target = data[0] & 1 ? FAULT_FLUSH : FAULT_WRITE;
  plan.mode = (enum fault_mode) ((data[0] >> 1 & 3) % 3);
  plan.k = (uint64_t) (data[1] | data[2] << 8) + 1;
  wl.cluster_size = 512u << (data[3] % 4);
  wl.refcount_bits = 8u << (data[4] % 4);
  wl.size = (uint64_t) (data[5] % 16 + 1) << 16;

  for (const uint8_t *p = data + 6; p + 4 <= data + size && n < MAX_OPS;
       p += 4) {
    struct wop *op = &ops[n++];
    uint64_t sectors = (uint64_t) p[3] + 1;

    op->kind = (enum wop_kind) ((p[0] & 0x7f) % 9);
    op->offset = (uint64_t) (p[1] | p[2] << 8) * 512 % MAX_DISK;
    op->length = sectors * 512 * (p[0] & 0x80 ? 16 : 1);
    op->slot = p[1] % WORKLOAD_SLOTS;
    if (op->kind == WOP_RESIZE)
      op->length = ((uint64_t) p[1] + 1) << 16;
  }
  wl.ops = ops;
  wl.nr_ops = n;

  /* k is taken modulo the points the workload has, counted by a run
   * without a fault, so that every input injects one.
   */
  {
    struct fault_plan count = { .target = plan.target, .mode = plan.mode };
    uint64_t points;
    if (fault_run (&wl, &count, &o, NULL) < 0)
      abort ();
    check_outcome (&count, &o);
    points = plan.target == FAULT_WRITE ? count.writes : count.flushes;
    if (points == 0)
      return 0;
    plan.k = (plan.k - 1) % points + 1;
  }
  if (fault_run (&wl, &plan, &o, NULL) < 0)
    abort ();                   /* creating the image cannot fail here */
  check_outcome (&plan, &o);
  return 0;
}
