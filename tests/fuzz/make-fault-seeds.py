#!/usr/bin/python3
"""Write the seed corpus of fuzz_fault (tests/fuzz/seeds-fuzz_fault/).

    /usr/bin/python3 tests/fuzz/make-fault-seeds.py [OUTDIR]

Inputs in fuzz_fault.c's format: a few workloads that allocate L2 tables,
grow L1, take and delete snapshots, zero and trim, on 512-byte and 4 KiB
clusters, with a write or a flush fault in each mode.
"""

import os
import struct
import sys

WRITE, FUA, ZERO, ZERO_TRIM, TRIM, FLUSH, RESIZE, SNAP_CREATE, SNAP_DELETE = range(9)
LONG = 0x80


def op(kind, sector=0, sectors=1, slot=None, resize_64k=None):
    if resize_64k is not None:
        return struct.pack("<BBBB", kind, resize_64k - 1, 0, 0)
    if slot is not None:
        return struct.pack("<BBBB", kind, slot, 0, 0)
    return struct.pack("<BHB", kind, sector, sectors - 1)


def seed(target, mode, k, cluster_log, refcount_log, size_64k, ops):
    head = struct.pack("<BHBBB", target | mode << 1, k - 1, cluster_log,
                       refcount_log, size_64k - 1)
    return head + b"".join(ops)


WORKLOAD = [
    op(WRITE | LONG, 0, 8),          # 64 KiB
    op(FLUSH),
    op(WRITE, 192, 8), op(WRITE, 320, 8), op(WRITE, 448, 8),
    op(FUA, 16, 2),
    op(FLUSH),
    op(SNAP_CREATE, slot=0),
    op(WRITE, 0, 32),
    op(ZERO, 192, 8),
    op(FLUSH),
    op(RESIZE, resize_64k=64),       # 4 MiB
    op(WRITE | LONG, 2048, 64),
    op(WRITE | LONG, 4096, 64),
    op(FLUSH),
    op(SNAP_CREATE, slot=1),
    op(WRITE, 2048, 64),
    op(SNAP_DELETE, slot=0),
    op(TRIM, 2560, 128),
    op(ZERO_TRIM, 3072, 64),
    op(FLUSH),
    op(SNAP_DELETE, slot=1),
    op(FLUSH),
]

SEEDS = {
    "write-one-shot-512": seed(0, 0, 20, 0, 3, 16, WORKLOAD),
    "write-sticky-512": seed(0, 1, 60, 0, 3, 16, WORKLOAD),
    "write-torn-4k": seed(0, 2, 30, 3, 1, 16, WORKLOAD),
    "flush-one-shot-512": seed(1, 0, 10, 0, 1, 16, WORKLOAD),
    "flush-sticky-4k": seed(1, 1, 5, 3, 2, 16, WORKLOAD),
}


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "seeds-fuzz_fault")
    os.makedirs(out, exist_ok=True)
    for name, data in SEEDS.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()
