"""The I/O path measured alone against the raw disk, in the same run (part of `moed bench`).

A routing trace is replayed through the engine's slot tables (LRU, per layer) to get the byte
ranges a cache of that size misses, visit by visit. Then, each from a cold page cache:
- raw: the same ranges read with `os.pread` from a pool of threads (the device's parallel limit);
- path: the same ranges, visit by visit, through the Fetcher and its worker processes into shared
  memory (what the engine pays per layer, without compute or the copy into slots); one visit in
  flight (a layer waits for its misses), or two (with lookahead the engine reads the next layer's
  experts behind the current layer's).
Both buffered (re-reads come from the page cache) and direct (O_DIRECT / F_NOCACHE: every byte
from the disk, the regime of a model much larger than RAM).
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil

from moed.daemon.engine.index import ExpertLayer
from moed.daemon.engine.slots import LayerSlots
from moed.daemon.io.fetcher import Fetcher
from moed.workers.reader import DIRECT_ALIGN, envelope, open_file

RAW_THREADS = 8


def drop_page_cache() -> str:
    """Empty the OS page cache; returns how (or why not)."""
    if sys.platform.startswith("linux"):
        try:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            return "drop_caches"
        except OSError as e:
            return f"not dropped ({e.strerror})"
    if sys.platform == "darwin":
        r = subprocess.run(["purge"], capture_output=True)
        return "purge" if r.returncode == 0 else "not dropped (purge needs root)"
    return "not dropped"


def miss_ranges(trace: dict, layers: list[ExpertLayer], fraction: float, top_k: int) -> list[list]:
    """Per visit, the (file, offset, length) ranges an LRU cache of `fraction` would read."""
    slots = [LayerSlots(max(top_k, round(fraction * layer.num_experts)), layer.num_experts) for layer in layers]
    visits = []
    for layer, experts in trace["steps"]:
        _, filled = slots[layer].assign(np.asarray(experts))
        if filled:
            visits.append([r for e, _ in filled for r in layers[layer].ranges(e)])
    return visits


def coalesce(ranges: list) -> list:
    """Adjacent (file, offset, length) ranges merged: the fewest reads that layout allows."""
    out: list = []
    for f, off, n in sorted(ranges):
        if out and out[-1][0] == f and out[-1][1] + out[-1][2] == off:
            out[-1] = (f, out[-1][1], out[-1][2] + n)
        else:
            out.append((f, off, n))
    return out


def raw_read(files: list[str], ranges: list, threads: int = RAW_THREADS, direct: bool = False) -> float:
    """Seconds to read `ranges` with parallel preads; `direct` bypasses the page cache as the
    workers do (O_DIRECT with block-aligned envelopes on Linux, F_NOCACHE on macOS)."""
    opened = [open_file(f, direct) for f in files]  # (fd, must reads be block-aligned)
    size = max(n for _, _, n in ranges) + 2 * DIRECT_ALIGN
    bufs = [mmap.mmap(-1, size) for _ in range(threads)]  # page-aligned, as O_DIRECT needs

    def read(i_r):
        i, (f, off, n) = i_r
        fd, aligned = opened[f]
        if aligned:
            off, n = envelope(off, n)
        view = memoryview(bufs[i % threads])[:n]
        got = 0
        while got < n and (k := os.preadv(fd, [view[got:]], off + got)) > 0:
            got += k
        view.release()

    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(read, enumerate(ranges)))
        return time.perf_counter() - t0
    finally:
        for fd, _ in opened:
            os.close(fd)


def path_read(files: list[str], visits: list[list], workers: int, queue_depth: int | None = None,
              direct: bool = False, in_flight: int = 1) -> float:
    """Seconds to read the visits' ranges through the Fetcher, `in_flight` visits at a time."""
    return path_read_cpu(files, visits, workers, queue_depth, direct, in_flight)[0]


def path_read_cpu(files: list[str], visits: list[list], workers: int, queue_depth: int | None = None,
                  direct: bool = False, in_flight: int = 1) -> tuple[float, float]:
    """path_read's seconds, and the CPU seconds its worker processes spent."""
    staging = max(sum(n for _, _, n in v) for v in visits) * 2
    depth = {} if queue_depth is None else {"queue_depth": queue_depth}
    with Fetcher(files, workers=workers, staging_bytes=staging, direct=direct, **depth) as f:
        procs = [psutil.Process(p) for p in f.pids]
        cpu0 = sum(sum(p.cpu_times()[:2]) for p in procs)
        t0 = time.perf_counter()
        tickets: deque = deque()
        for v in visits:
            if len(tickets) == in_flight:
                f.wait(tickets.popleft())
            tickets.append(f.submit(v))
        while tickets:
            f.wait(tickets.popleft())
        wall = time.perf_counter() - t0
        return wall, sum(sum(p.cpu_times()[:2]) for p in procs) - cpu0
