#!/usr/bin/env python3
"""What a durable commit's shape costs on this machine's disk (issue 14, the fleet's p99).

Times `fdatasync` after three kinds of writes into a file whose blocks are already allocated
(as the store's file is after its zeros ahead): one 4 KiB page; `--pages` 4 KiB pages at random
places (the shape of a redb commit: see `--gateway-pid`); and the same bytes as one contiguous
write (the shape a commit would have if its pages went to a journal first); the pages in place
unsynced plus a journal record (the store's journal, `broker/log/src/journal.rs`), the record
written and synced with `fdatasync`, or unbuffered: one `pwrite` from an aligned buffer on a
descriptor opened `O_DIRECT | O_DSYNC` (what the store does where the file system takes it).
Each kind runs `--commits` times, twice, interleaved; prints p50/p90/p99/p99.9 in microseconds
and the CPU time (user + system) each commit took.

With `--gateway-pid PID` it instead attaches strace to that gateway's store writer thread
(`tributary-write`) for `--secs` seconds and prints how many writes, and how many separate
extents (runs of adjacent bytes), each durable commit had.

    python3 tests/bench/fsync_pages.py --dir /var/tmp
    python3 tests/bench/fsync_pages.py --gateway-pid $(pgrep -x tributary) --secs 2
"""
import argparse
import collections
import mmap
import os
import random
import re
import subprocess
import tempfile
import threading
import time

PAGE = 4096


def percentiles(lat):
    lat = sorted(lat)
    at = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))]
    return f"p50={at(.5):.0f} p90={at(.9):.0f} p99={at(.99):.0f} p99.9={at(.999):.0f} us"


def machine(args):
    file_bytes = 64 << 20
    with tempfile.NamedTemporaryFile(dir=args.dir, prefix="fsync-pages-") as f:
        fd = f.fileno()
        for off in range(0, file_bytes, 1 << 20):
            os.pwrite(fd, b"\0" * (1 << 20), off)
        os.fsync(fd)
        page = os.urandom(PAGE)
        run = os.urandom(PAGE * args.pages)
        slots = min(file_bytes // PAGE, args.span_pages)

        def one(i):
            os.pwrite(fd, page, 0)

        def scattered(i):
            os.pwrite(fd, page, 0)
            for p in random.sample(range(1, slots), args.pages - 1):
                os.pwrite(fd, page, p * PAGE)

        def contiguous(i):
            os.pwrite(fd, run, (i % (file_bytes // len(run))) * len(run))

        jf = tempfile.NamedTemporaryFile(dir=args.dir, prefix="fsync-journal-")
        jfd = jf.fileno()
        journal_bytes = 16 << 20
        for off in range(0, journal_bytes, 1 << 20):
            os.pwrite(jfd, b"\0" * (1 << 20), off)
        os.fsync(jfd)
        record = PAGE * (args.pages + 1)
        checkpoint = {"want": 0, "done": 0, "lat": []}
        cv = threading.Condition()

        def checkpointer():
            while True:
                with cv:
                    while checkpoint["want"] == checkpoint["done"]:
                        cv.wait()
                    want = checkpoint["want"]
                if want < 0:
                    return
                t = time.perf_counter()
                os.fdatasync(fd)
                with cv:
                    checkpoint["lat"].append((time.perf_counter() - t) * 1e6)
                    checkpoint["done"] = want
                    cv.notify_all()

        threading.Thread(target=checkpointer, daemon=True).start()
        per_lap = journal_bytes // record

        def in_place(i):
            # The pages in place, unsynced; returns the record's slot in the journal. The
            # database file is synced in the background every half journal, and waited for
            # before a half is reused.
            os.pwrite(fd, page, 0)
            for p in random.sample(range(1, slots), args.pages - 1):
                os.pwrite(fd, page, p * PAGE)
            slot = i % per_lap
            if slot % (per_lap // 2) == 0:
                with cv:
                    while checkpoint["done"] != checkpoint["want"]:
                        cv.wait()
                    checkpoint["want"] += 1
                    cv.notify_all()
            return slot

        def journaled(i):
            # The same bytes (plus a record header page) appended to the journal, which the
            # caller syncs.
            os.pwrite(jfd, run + page, in_place(i) * record)
            return jfd

        # The journal's records unbuffered: O_DIRECT wants an aligned buffer (an anonymous map
        # is page-aligned), and O_DSYNC makes the write durable when it returns.
        dfd = os.open(jf.name, os.O_WRONLY | os.O_DIRECT | os.O_DSYNC)
        aligned = mmap.mmap(-1, record)
        aligned.write(run + page)

        def unbuffered(i):
            os.pwrite(dfd, aligned, in_place(i) * record)
            return -1

        kinds = [
            ("1 page", one),
            (f"{args.pages} pages at random places", scattered),
            (f"{args.pages} pages in one write ({args.pages * 4} KiB)", contiguous),
            (f"{args.pages} pages in place + journal", journaled),
        ]
        unbuffered_kind = (f"{args.pages} pages in place + journal, O_DIRECT|O_DSYNC", unbuffered)
        for round_ in (1, 2):
            for name, write in kinds + [unbuffered_kind]:
                lat = []
                cpu = os.times()
                for i in range(args.commits):
                    t = time.perf_counter()
                    sync = write(i) or fd
                    if sync >= 0:
                        os.fdatasync(sync)
                    lat.append((time.perf_counter() - t) * 1e6)
                after = os.times()
                cpu_us = (after.user + after.system - cpu.user - cpu.system) / args.commits * 1e6
                how = "(no fdatasync)" if write is unbuffered else "+ fdatasync"
                print(f"round {round_}: {name:34s} {how}: {percentiles(lat)}, CPU {cpu_us:.0f} us")
                if write in (journaled, unbuffered) and checkpoint["lat"]:
                    print(f"         background database syncs: {len(checkpoint['lat'])}, {percentiles(checkpoint['lat'])}")
                    checkpoint["lat"].clear()


def gateway(args):
    pid = args.gateway_pid
    tids = [t for t in os.listdir(f"/proc/{pid}/task")
            if open(f"/proc/{pid}/task/{t}/comm").read().strip() == "tributary-write"]
    if not tids:
        raise SystemExit(f"no tributary-write thread in process {pid}")
    with tempfile.NamedTemporaryFile(mode="r", prefix="strace-") as out:
        subprocess.run(["timeout", str(args.secs), "strace", "-q", "-e", "trace=pwrite64,fdatasync,fsync",
                        "-p", tids[0], "-o", out.name], check=False)
        groups, cur = [], []
        for line in open(out.name):
            m = re.match(r"pwrite64\(\d+, .*, (\d+), (\d+)\)", line)
            if m:
                cur.append((int(m.group(2)), int(m.group(1))))
            elif line.startswith(("fdatasync", "fsync")):
                groups.append(cur)
                cur = []
    if not groups:
        raise SystemExit("no durable commit seen: is the gateway under load?")
    writes, extents = [], []
    for g in groups:
        g.sort()
        n, end = 0, -1
        for off, length in g:
            if off != end:
                n += 1
            end = off + length
        writes.append(len(g))
        extents.append(n)
    print(f"{len(groups)} durable commits in {args.secs} s: {sum(writes) / len(groups):.1f} writes and "
          f"{sum(extents) / len(groups):.1f} separate extents each")
    print("extents per commit:", dict(sorted(collections.Counter(extents).items())))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/var/tmp", help="where the 64 MiB test file goes (the data disk)")
    ap.add_argument("--pages", type=int, default=9, help="pages per commit (the gateway's fleet: about 9 extents)")
    ap.add_argument("--commits", type=int, default=3000)
    ap.add_argument("--span-pages", type=int, default=16384,
                    help="pages of the file the scattered writes land in (redb reuses freed pages: small)")
    ap.add_argument("--gateway-pid", type=int, help="count a running gateway's writes per commit instead")
    ap.add_argument("--secs", type=int, default=2)
    args = ap.parse_args()
    if args.gateway_pid:
        gateway(args)
    else:
        machine(args)


if __name__ == "__main__":
    main()
