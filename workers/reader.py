"""Read byte ranges of files into a buffer with preadv, one open descriptor per file.

Items adjacent in a file are coalesced into one preadv with several destination buffers; each
syscall moves at most CHUNK bytes so the caller can heartbeat between them. Up to `depth` runs are
in flight at once (threads: preadv releases the GIL), so one worker keeps the device's queue busy.
With `direct`, files bypass the page cache (O_DIRECT on Linux, F_NOCACHE on macOS): each run is
read as its block-aligned envelope into a page-aligned bounce buffer and copied out (O_DIRECT needs
aligned addresses, offsets and lengths); a file system that refuses O_DIRECT falls back to buffered.
Failures never raise: read() returns the bytes read and an error string naming the file and offset.

Pins: the daemon takes each file's identity (device, inode, size, mtime, ctime) when it loads and
every worker checks it, at open and before each read of the file, so a file replaced (a respawned
worker would open the new one) or rewritten in place (same inode, new ctime) under a running daemon
fails the reads that need it with an error naming it, never mixes new experts with the loaded weights.
A write racing a read between the check and the read is not caught (the pack's checksums are).
"""
from __future__ import annotations

import errno
import mmap
import os
import sys
import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, Iterable

Item = tuple[int, int, int, int]  # (file_idx, file_offset, length, buf_offset)

CHUNK = 16 << 20  # most bytes per syscall
QUEUE_DEPTH = 4  # reads in flight per worker (bench/results/med-queue-depth.json)
PROGRESS_S = 0.1  # how often a long read reports progress
DIRECT_ALIGN = 4096  # O_DIRECT alignment of offsets, lengths and buffers
try:
    IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024)
except (AttributeError, ValueError, OSError):
    IOV_MAX = 16


Pin = list[int]  # (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)


def pin_of(path_or_fd) -> Pin:
    """A file's identity: any write, replacement or truncation changes it."""
    st = os.stat(path_or_fd)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class FileChanged(OSError):
    pass


@dataclass(slots=True)
class Run:
    """One syscall's worth: consecutive file bytes scattered to buffer pieces."""
    file_idx: int
    offset: int
    nbytes: int = 0
    pieces: list[tuple[int, int]] = field(default_factory=list)  # (buf_offset, length)

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


def plan(items: Iterable[Item]) -> list[Run]:
    """Sort items by file position and coalesce adjacent ones into runs of <= CHUNK bytes."""
    runs: list[Run] = []
    cur: Run | None = None
    for file_idx, offset, length, dst in sorted(items):
        while length > 0:
            if (cur is None or cur.file_idx != file_idx or cur.end != offset
                    or cur.nbytes >= CHUNK or len(cur.pieces) >= IOV_MAX):
                cur = Run(file_idx, offset)
                runs.append(cur)
            take = min(length, CHUNK - cur.nbytes)
            cur.pieces.append((dst, take))
            cur.nbytes += take
            offset, dst, length = offset + take, dst + take, length - take
    return runs


class Job:
    """A read in progress (Reader.start): bytes done so far and the runs still on the threads."""

    def __init__(self, done: int, futures: dict, error: str | None = None):
        self.futures = futures  # Future -> Run
        self._done = done
        self._error = error

    def done(self) -> bool:
        return all(f.done() for f in self.futures)

    def result(self) -> tuple[int, str | None]:
        """(bytes read, None) or (bytes read, the first error); only once done()."""
        done, error = self._done, self._error
        for f, run in self.futures.items():
            if (e := f.result()) is None:
                done += run.nbytes
            elif error is None:
                error = e
        return done, error


class ShortRead(Exception):
    """EOF before the requested range ended."""


class Reader:
    """Reads items of a fixed list of files; descriptors are opened on first use and kept."""

    def __init__(self, paths: list[str], depth: int = QUEUE_DEPTH, direct: bool = False,
                 pins: list[Pin] | None = None):
        self.paths = list(paths)
        self.pins = [list(p) for p in pins] if pins else []  # empty: not pinned
        self.depth = depth
        self.direct = direct
        self._fds: dict[int, int] = {}
        self._aligned: set[int] = set()  # file indexes opened with O_DIRECT
        self._bounce = threading.local()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def read(self, buf: memoryview, items: list[Item],
             progress: Callable[[], None] | None = None) -> tuple[int, str | None]:
        """Fill buf[buf_offset:buf_offset+length] from each item's file range.

        Returns (bytes read, None) or (bytes read before the failure, error message).
        `progress` is called after every syscall.
        """
        job = self.start(buf, items, progress)
        while not job.done():
            wait(job.futures, timeout=PROGRESS_S, return_when=FIRST_COMPLETED)
            if progress is not None:
                progress()  # from this thread only: it may use the worker's socket
        return job.result()

    def start(self, buf: memoryview, items: list[Item],
              progress: Callable[[], None] | None = None, on_done: Callable[[], None] | None = None) -> "Job":
        """Start filling `buf` from the items' ranges and return at once: what the page cache
        holds is copied before returning, the rest is read by up to `depth` threads, which call
        `on_done` (from their thread) as each run completes. `progress` runs in this thread."""
        if (error := self._check(buf, items) or self._check_pins({i[0] for i in items})) is not None:
            return Job(0, {}, error)
        runs = plan(items)
        done = 0
        if NOWAIT and not self.direct:  # what the page cache holds is copied here, no thread hop
            runs, done = self._read_cached(buf, runs, progress)
        if self.depth <= 1 or len(runs) <= 1:
            for run in runs:
                if (error := self._try_run(buf, run)) is not None:
                    return Job(done, {}, error)
                done += run.nbytes
                if progress is not None:
                    progress()
            return Job(done, {})
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.depth, thread_name_prefix="pread")
        futures = {self._pool.submit(self._try_run, buf, run): run for run in runs}
        if on_done is not None:
            for f in futures:
                f.add_done_callback(lambda _: on_done())
        return Job(done, futures)

    def _read_cached(self, buf: memoryview, runs: list[Run],
                     progress: Callable[[], None] | None) -> tuple[list[Run], int]:
        """Read what the page cache holds without blocking (RWF_NOWAIT); returns the runs, or
        the rests of runs, that need the disk, and the bytes done."""
        left, done = [], 0
        for run in runs:
            got = 0
            try:
                fd = self._fd(run.file_idx)
                views = [buf[d:d + n] for d, n in run.pieces]
                while views and (n := os.preadv(fd, views, run.offset + got, NOWAIT)) > 0:
                    got += n
                    views = _advance(views, n)
            except OSError:  # EAGAIN: not cached; a real error is reported by the blocking read
                pass
            done += got
            if got < run.nbytes:
                left.append(_rest(run, got))
            if progress is not None:
                progress()
        return left, done

    def _try_run(self, buf: memoryview, run: Run) -> str | None:
        try:
            self._read_run(buf, run)
        except ShortRead as e:
            return str(e)
        except OSError as e:
            return (f"{self.paths[run.file_idx]}: {e.strerror or e} while reading "
                    f"{run.nbytes} bytes at offset {run.offset}")
        return None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _check(self, buf: memoryview, items: list[Item]) -> str | None:
        for file_idx, offset, length, dst in items:
            if not 0 <= file_idx < len(self.paths):
                return f"file index {file_idx} out of range ({len(self.paths)} files)"
            if offset < 0 or length < 0 or dst < 0 or dst + length > len(buf):
                return (f"{self.paths[file_idx]}: bad item offset={offset} length={length} "
                        f"buf_offset={dst} (buffer is {len(buf)} bytes)")
        return None

    def _check_pins(self, file_idxs: set[int]) -> str | None:
        """None, or an error naming the first file that changed since the daemon pinned it."""
        if not self.pins:
            return None
        try:
            for i in sorted(file_idxs):
                self._verify(i, self._fd(i))
        except OSError as e:
            return str(e) if isinstance(e, FileChanged) else f"{self.paths[i]}: {e.strerror or e}"
        return None

    def _verify(self, file_idx: int, fd: int) -> None:
        now, was = pin_of(fd), self.pins[file_idx]
        if now != was:
            what = ("replaced (another inode)" if now[:2] != was[:2] else
                    f"resized ({was[2]} -> {now[2]} bytes)" if now[2] != was[2] else "rewritten (its times changed)")
            raise FileChanged(f"{self.paths[file_idx]}: {what} since the daemon loaded it; its experts would "
                              f"not match the loaded weights (restart the daemon: moed stop; moed start)")

    def _fd(self, file_idx: int) -> int:
        with self._lock:
            fd = self._fds.get(file_idx)
            if fd is None:
                fd = self._fds[file_idx] = self._open(file_idx)
            return fd

    def _open(self, file_idx: int) -> int:
        fd, aligned = open_file(self.paths[file_idx], self.direct)
        if self.pins:
            try:
                self._verify(file_idx, fd)
            except OSError:
                os.close(fd)
                raise
        if aligned:
            self._aligned.add(file_idx)
        return fd

    def _read_run(self, buf: memoryview, run: Run) -> None:
        fd = self._fd(run.file_idx)
        if run.file_idx in self._aligned:
            return self._read_run_direct(fd, buf, run)
        views = [buf[d:d + n] for d, n in run.pieces]
        offset = run.offset
        while views:
            got = _preadv(fd, views, offset)
            if got == 0:
                size = os.fstat(fd).st_size
                raise ShortRead(f"{self.paths[run.file_idx]}: unexpected end of file at offset "
                                f"{offset} (file is {size} bytes; wanted bytes up to {run.end})")
            offset += got
            views = _advance(views, got)


    def _read_run_direct(self, fd: int, buf: memoryview, run: Run) -> None:
        start, size = envelope(run.offset, run.nbytes)
        bounce = getattr(self._bounce, "map", None)
        if bounce is None or len(bounce) < size:
            bounce = self._bounce.map = mmap.mmap(-1, max(size, 1 << 20))  # page-aligned
        view = memoryview(bounce)
        got, need = 0, run.end - start
        while got < need:
            n = _preadv(fd, [view[got:size]], start + got)
            if n == 0:
                raise ShortRead(f"{self.paths[run.file_idx]}: unexpected end of file at offset {start + got} "
                                f"(file is {os.fstat(fd).st_size} bytes; wanted bytes up to {run.end})")
            got += n
        at = run.offset - start
        for dst, n in run.pieces:
            buf[dst:dst + n] = view[at:at + n]
            at += n
        view.release()


def open_file(path: str, direct: bool) -> tuple[int, bool]:
    """A read-only descriptor, and whether its reads must be block-aligned. `direct` bypasses the
    page cache: O_DIRECT (aligned) where the file system has it, F_NOCACHE on macOS."""
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT), True
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: this file system has no O_DIRECT (tmpfs)
                raise
    fd = os.open(path, os.O_RDONLY)
    if direct and sys.platform == "darwin":
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_NOCACHE", 48), 1)  # no alignment needed on macOS
    return fd, False


def envelope(offset: int, nbytes: int) -> tuple[int, int]:
    """The DIRECT_ALIGN-aligned (offset, length) covering [offset, offset + nbytes)."""
    start = offset - offset % DIRECT_ALIGN
    return start, -(-(offset + nbytes - start) // DIRECT_ALIGN) * DIRECT_ALIGN


def _rest(run: Run, got: int) -> Run:
    """The part of `run` after its first `got` bytes."""
    rest = Run(run.file_idx, run.offset + got, run.nbytes - got)
    for dst, n in run.pieces:
        if got >= n:
            got -= n
            continue
        rest.pieces.append((dst + got, n - got))
        got = 0
    return rest


def _advance(views: list[memoryview], got: int) -> list[memoryview]:
    """Drop the first `got` bytes from a list of buffers (after a possibly short read)."""
    i = 0
    while i < len(views) and got >= len(views[i]):
        got -= len(views[i])
        i += 1
    views = views[i:]
    if got:
        views[0] = views[0][got:]
    return views


NOWAIT = getattr(os, "RWF_NOWAIT", 0)  # Linux: a read that fails with EAGAIN instead of waiting for the disk

if hasattr(os, "preadv"):
    _preadv = os.preadv
else:  # macOS < 11: seek + readv (each worker owns its descriptors, so this is race-free)
    def _preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        os.lseek(fd, offset, os.SEEK_SET)
        return os.readv(fd, buffers)
