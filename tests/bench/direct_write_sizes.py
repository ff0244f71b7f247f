#!/usr/bin/env python3
"""How long one O_DIRECT|O_DSYNC pwrite takes by its size: what a commit journal record waits
for, whether it holds 4 KiB or 64 KiB (BENCHMARKS.md "MQTT again" run 12).

    python3 tests/bench/direct_write_sizes.py --dir /var/tmp [--writes 1500]
"""
import argparse
import mmap
import os
import time

SIZES = [4096, 12288, 28672, 36864, 65536]
RING_BYTES = 64 << 20


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=".", help="a directory on the disk to measure")
    ap.add_argument("--writes", type=int, default=1500, help="writes per size")
    args = ap.parse_args()
    path = os.path.join(args.dir, "direct_write_sizes.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT | os.O_DSYNC, 0o644)
    try:
        os.posix_fallocate(fd, 0, RING_BYTES)
        for size in SIZES:
            buf = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT needs
            buf.write(b"x" * size)
            lat, pos = [], 0
            for _ in range(args.writes):
                t = time.perf_counter_ns()
                os.pwritev(fd, [buf], pos)
                lat.append(time.perf_counter_ns() - t)
                pos = (pos + size) % (RING_BYTES - size)
            lat.sort()
            at = lambda q: lat[min(len(lat) - 1, int(len(lat) * q))] / 1000
            print(f"{size:6d} B: p50 {at(0.5):.0f} us  p90 {at(0.9):.0f} us  p99 {at(0.99):.0f} us")
    finally:
        os.close(fd)
        os.unlink(path)


if __name__ == "__main__":
    main()
