"""The I/O path end to end: real worker processes, ZeroMQ sockets, shared memory and files."""
from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from moed.daemon.io.fetcher import BACKOFF_S, MAX_UNWAITED, Fetcher, FetchError, ReadError, WorkerError
from moed.ipc import runtime, shm
from moed.workers.reader import CHUNK, Reader, plan

OUR_SEGMENTS = f"moed-{os.getpid()}-"  # other processes' segments are none of our business


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, bytes]:
    """Files of random bytes: path -> contents."""
    d = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    files = {}
    for i, size in enumerate([8 << 20, 3 << 20, (1 << 20) + 17]):
        p = d / f"shard-{i}.safetensors"
        p.write_bytes(rng.randbytes(size))
        files[str(p)] = p.read_bytes()
    return files


@pytest.fixture
def fetcher(data, tmp_path):
    with Fetcher(list(data), workers=2, staging_bytes=4 << 20, runtime_dir=tmp_path) as f:
        yield f


def random_ranges(data: dict[str, bytes], rng: random.Random, n: int) -> list[tuple[int, int, int]]:
    """Sizes log-uniform from 1 byte to 4 MiB, clipped to the file."""
    blobs = list(data.values())
    out = []
    for _ in range(n):
        f = rng.randrange(len(blobs))
        length = min(int(math.exp(rng.uniform(0, math.log(4 << 20)))), len(blobs[f]))
        out.append((f, rng.randrange(len(blobs[f]) - length + 1), length))
    return out


def check(data: dict[str, bytes], ranges, views) -> None:
    blobs = list(data.values())
    assert len(views) == len(ranges)
    for (f, off, n), v in zip(ranges, views):
        assert len(v) == n and bytes(v) == blobs[f][off:off + n], (f, off, n)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def worker_children() -> list[psutil.Process]:
    """Our live moed worker processes (the resource tracker is a child too)."""
    out = []
    for p in psutil.Process().children():
        try:
            if "moed.workers.loop" in p.cmdline() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def wait_for(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


# --- reading ------------------------------------------------------------------------------------


def test_hundreds_of_random_ranges(fetcher, data):
    rng = random.Random(42)
    total_ranges = 0
    for _ in range(25):
        ranges = random_ranges(data, rng, rng.randrange(1, 25))
        check(data, ranges, fetcher.read(ranges))
        total_ranges += len(ranges)
    assert total_ranges >= 250
    s = fetcher.stats
    assert s.read_calls == 25 and s.reads == total_ranges and s.read_seconds > 0
    assert s.bytes_read == sum(s.bytes_by_worker) and all(b > 0 for b in s.bytes_by_worker)
    assert fetcher.staging_bytes > 4 << 20  # grew
    assert s.respawns == 0


def test_views_are_aligned_and_in_order(fetcher, data):
    ranges = [(1, 3, 5), (0, 0, 0), (2, 100, 1), (0, 7, 129)]
    views = fetcher.read(ranges)
    check(data, ranges, views)
    assert fetcher.read([]) == []


def test_batch_is_split_evenly_across_workers(fetcher, data):
    before = list(fetcher.stats.bytes_by_worker)
    ranges = [(0, i << 20, 1 << 20) for i in range(8)]
    check(data, ranges, fetcher.read(ranges))
    got = [a - b for a, b in zip(fetcher.stats.bytes_by_worker, before)]
    assert sum(got) == 8 << 20 and abs(got[0] - got[1]) <= 8192, got
    one_range = [(0, 12345, 6 << 20)]  # a single big range is cut at a page boundary
    before = list(fetcher.stats.bytes_by_worker)
    check(data, one_range, fetcher.read(one_range))
    got = [a - b for a, b in zip(fetcher.stats.bytes_by_worker, before)]
    assert min(got) > 2 << 20, got


def test_staging_growth_replaces_the_segment(data, tmp_path):
    with Fetcher(list(data), workers=2, staging_bytes=1 << 20, runtime_dir=tmp_path) as f:
        before = set(shm.segments(OUR_SEGMENTS) or [])
        ranges = [(0, 1, 5 << 20), (1, 0, 3 << 20)]
        check(data, ranges, f.read(ranges))
        assert f.staging_bytes >= 8 << 20
        after = set(shm.segments(OUR_SEGMENTS) or [])
        if shm.segments() is not None:  # Linux: the old one is unlinked, one new one exists
            assert len(after - before) == 1 and len(before - after) == 1
        check(data, ranges[:1], f.read(ranges[:1]))


def test_two_submissions_in_flight_keep_their_bytes(fetcher, data):
    """The engine's own misses and its lookahead read: both in flight, each lands in its own
    bytes, whichever worker answers first; waited in either order."""
    rng = random.Random(7)
    for _ in range(10):
        a = random_ranges(data, rng, 5)
        b = random_ranges(data, rng, 5)
        ta, tb = fetcher.submit(a), fetcher.submit(b)
        if rng.random() < 0.5:
            check(data, b, fetcher.wait(tb))
            check(data, a, fetcher.wait(ta))
        else:
            va = fetcher.wait(ta)
            check(data, b, fetcher.wait(tb))
            check(data, a, va)  # b did not overwrite a


def test_growth_with_a_read_in_flight_keeps_its_views(fetcher, data):
    small = [(1, 100, 1 << 20)]
    big = [(0, 0, 8 << 20), (1, 0, 3 << 20)]  # more than the 4 MiB segment: it grows
    ts = fetcher.submit(small)
    tb = fetcher.submit(big)
    check(data, big, fetcher.wait(tb))
    check(data, small, fetcher.wait(ts))  # laid out in the old segment, still mapped
    assert fetcher.staging_bytes >= 11 << 20


def test_one_submission_too_many_drops_the_oldest(fetcher, data):
    rng = random.Random(3)
    batches = [random_ranges(data, rng, 3) for _ in range(MAX_UNWAITED + 1)]
    tickets = [fetcher.submit(b) for b in batches]
    with pytest.raises(FetchError, match="dropped"):
        fetcher.wait(tickets[0])
    for b, t in zip(batches[1:], tickets[1:]):
        check(data, b, fetcher.wait(t))
    with pytest.raises(FetchError, match="already waited"):
        fetcher.wait(tickets[-1])
    check(data, batches[0], fetcher.read(batches[0]))  # still serving


def test_bad_ranges_raise_value_error(fetcher):
    for bad in [(3, 0, 1), (-1, 0, 1), (0, -1, 1), (0, 0, -1)]:
        with pytest.raises(ValueError):
            fetcher.read([bad])


# --- processes and cleanup ----------------------------------------------------------------------


def test_workers_are_child_processes(fetcher):
    assert len(fetcher.pids) == 2 and os.getpid() not in fetcher.pids
    for pid in fetcher.pids:
        p = psutil.Process(pid)
        assert p.ppid() == os.getpid()
        assert "moed.workers.loop" in p.cmdline()
        assert "mlx" not in {m.split(".")[0] for m in _imported_modules(pid)}


def _imported_modules(pid: int) -> list[str]:
    """Shared objects a process mapped; an MLX import would map libmlx."""
    try:
        return [Path(m.path).name for m in psutil.Process(pid).memory_maps()]
    except (psutil.AccessDenied, AttributeError):  # macOS may refuse
        return []


def test_close_leaves_nothing_behind(data, tmp_path):
    before = shm.segments(OUR_SEGMENTS)
    f = Fetcher(list(data), workers=2, runtime_dir=tmp_path).start()
    pids, sock = f.pids, runtime.endpoint_path(f.endpoint)
    assert sock.exists() and all(alive(p) for p in pids)
    views = f.read([(0, 0, 100)])  # a view outlives close(): must not break it
    t = time.monotonic()
    f.close()
    assert time.monotonic() - t < 1.5  # workers exit on Shutdown, no SIGKILL grace period
    f.close()  # idempotent
    assert not any(alive(p) for p in pids)
    assert not sock.exists()
    assert shm.segments(OUR_SEGMENTS) == before  # None where segments cannot be listed
    with pytest.raises(WorkerError):
        f.read([(0, 0, 1)])
    del views


def test_start_failure_is_clear_and_cleans_up(data, tmp_path):
    before = shm.segments(OUR_SEGMENTS)
    f = Fetcher(list(data), workers=2, runtime_dir=tmp_path, start_timeout=0.0)
    with pytest.raises(WorkerError, match="not ready|failed"):
        f.start()
    assert not worker_children()  # every worker it spawned is gone
    assert not list(tmp_path.glob("*.sock"))
    assert shm.segments(OUR_SEGMENTS) == before


def test_workers_exit_when_supervisor_is_killed(data, tmp_path):
    script = ("import os, signal, sys; from moed.daemon.io.fetcher import Fetcher; "
              "f = Fetcher(sys.argv[2:], workers=2, runtime_dir=sys.argv[1]).start(); "
              "f.read([(0, 0, 1000)]); print(os.getpid(), *f.pids, flush=True); "
              "os.kill(os.getpid(), signal.SIGKILL)")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path), *data], timeout=30,
                         capture_output=True, text=True)
    supervisor, *pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2 and out.returncode == -signal.SIGKILL
    assert wait_for(lambda: not any(alive(p) for p in pids), 3.0)  # never orphaned
    if shm.segments() is not None:  # the supervisor's resource tracker unlinks its segment
        assert wait_for(lambda: not shm.segments(f"moed-{supervisor}-"), 5.0)
    Fetcher([], workers=1, runtime_dir=tmp_path).start().close()  # sweeps the dead one's socket
    assert not list(tmp_path.glob("*.sock"))


# --- failures -----------------------------------------------------------------------------------


def test_sigkill_between_reads(fetcher, data):
    victim = fetcher.pids[0]
    os.kill(victim, signal.SIGKILL)
    ranges = [(0, 0, 4 << 20), (1, 5, 2 << 20), (2, 0, 300)]
    check(data, ranges, fetcher.read(ranges))
    assert victim not in fetcher.pids and all(alive(p) for p in fetcher.pids)
    assert fetcher.stats.respawns == 1
    check(data, ranges, fetcher.read(ranges))


def test_sigkill_during_read(fetcher, data):
    victim = fetcher.pids[1]
    os.kill(victim, signal.SIGSTOP)  # it holds its Read, unanswered, until killed
    killer = threading.Timer(0.2, os.kill, (victim, signal.SIGKILL))
    killer.start()
    ranges = [(0, 0, 8 << 20), (1, 0, 3 << 20)]
    t = time.monotonic()
    check(data, ranges, fetcher.read(ranges))
    assert time.monotonic() - t >= 0.2  # the read really waited on the victim
    killer.join()
    assert victim not in fetcher.pids and fetcher.stats.respawns == 1


def test_silent_worker_is_replaced(data, tmp_path):
    with Fetcher(list(data), workers=2, runtime_dir=tmp_path, heartbeat_s=0.1, liveness=3) as f:
        victim = f.pids[0]
        os.kill(victim, signal.SIGSTOP)  # alive but silent
        ranges = [(0, 0, 4 << 20), (1, 0, 3 << 20)]
        check(data, ranges, f.read(ranges))
        assert victim not in f.pids and f.stats.respawns == 1
        assert wait_for(lambda: not alive(victim), 2.0)


def test_a_file_changed_since_the_fetcher_pinned_it_is_refused_by_name(data, tmp_path):
    """Truncated (or rewritten, or replaced) after the fetcher took its identity: its reads fail naming
    it, every time (never the new bytes beside the old ones); the other files still read."""
    paths = list(data)
    short = tmp_path / "short.bin"
    short.write_bytes(data[paths[1]])
    with Fetcher([paths[0], str(short)], workers=2, runtime_dir=tmp_path) as f:
        os.truncate(short, 1000)
        with pytest.raises(ReadError, match="short.bin") as e:
            f.read([(0, 0, 1 << 20), (1, 500, 1 << 20)])
        assert "resized (3145728 -> 1000 bytes) since the daemon loaded it" in str(e.value)
        with pytest.raises(ReadError, match="short.bin"):
            f.read([(1, 0, 1000)])  # in range of the new size: still not the file it pinned
        views = f.read([(0, 10, 1 << 20)])
        assert bytes(views[0]) == data[paths[0]][10:10 + (1 << 20)]
    unpinned = tmp_path / "unpinned.bin"
    unpinned.write_bytes(data[paths[1]])
    f = Fetcher([str(unpinned)], workers=1, runtime_dir=tmp_path)
    f.pins = []  # workers without pins report the short read itself
    with f:
        os.truncate(unpinned, 1000)
        with pytest.raises(ReadError, match="end of file"):
            f.read([(0, 500, 1 << 20)])
        short.unlink()  # a vanished file names itself too, on first open
    with pytest.raises(ReadError, match="short.bin: No such file"):
        Fetcher([str(short)], workers=1, runtime_dir=tmp_path)


def test_hung_worker_is_given_up_on(tmp_path):
    """Opening a FIFO with no writer blocks forever: the worker goes silent, is replaced
    MAX_RESTARTS times, then read() raises WorkerError: the workers are killed, reads fail at once
    during the backoff (`failure` says why), then the slot is respawned and serves again."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    f = Fetcher([str(fifo)], workers=1, runtime_dir=tmp_path, heartbeat_s=0.05, liveness=2)
    f.start()
    with pytest.raises(WorkerError, match="silent"):
        f.read([(0, 0, 10)])
    assert not worker_children() and "silent" in f.failure
    t = time.monotonic()
    with pytest.raises(WorkerError, match="failing"):
        f.read([(0, 0, 10)])
    assert time.monotonic() - t < 0.2  # no wait during the backoff
    time.sleep(BACKOFF_S)
    deadline = time.monotonic() + 20
    while f.failure is not None and time.monotonic() < deadline:  # respawned, then Ready
        f.poll()
        time.sleep(0.02)
    assert f.failure is None and len(worker_children()) == 1
    f.close()
    assert not worker_children() and not list(tmp_path.glob("*.sock"))
    with pytest.raises(WorkerError, match="closed"):
        f.read([(0, 0, 10)])


# --- the reader, in process ---------------------------------------------------------------------


def test_plan_coalesces_adjacent_items():
    items = [(0, 100, 50, 0), (0, 150, 70, 64), (1, 0, 10, 192), (0, 0, 10, 256)]
    runs = plan(items)
    assert [(r.file_idx, r.offset, r.pieces) for r in runs] == [
        (0, 0, [(256, 10)]), (0, 100, [(0, 50), (64, 70)]), (1, 0, [(192, 10)])]
    big = plan([(0, 0, CHUNK * 2 + 5, 0)])
    assert [r.nbytes for r in big] == [CHUNK, CHUNK, 5]


def test_reader_scatters_into_buffer(data):
    path, blob = next(iter(data.items()))
    buf = memoryview(bytearray(1 << 16))
    r = Reader([path])
    n, err = r.read(buf, [(0, 10, 100, 0), (0, 110, 50, 128), (0, 5, 3, 1000)])
    assert err is None and n == 153
    assert bytes(buf[:100]) + bytes(buf[128:178]) == blob[10:160]
    assert bytes(buf[1000:1003]) == blob[5:8]
    n, err = r.read(buf, [(0, len(blob) - 4, 8, 0)])
    assert n < 8 and path in err and "end of file" in err
    n, err = r.read(buf, [(0, 0, 10, len(buf) - 5)])
    assert err and "buffer" in err
    r.close()


@pytest.mark.parametrize("depth", [1, 4])
def test_direct_reads_are_byte_exact(data, tmp_path, depth):
    """O_DIRECT (aligned envelopes through a bounce buffer) returns the same bytes, odd offsets and
    lengths and the unaligned end of a file included; several reads in flight per worker."""
    from moed.workers.reader import Reader

    paths = list(data)
    reader = Reader(paths, depth=depth, direct=True)
    rng = random.Random(5)
    ranges = random_ranges(data, rng, 40) + [(2, (1 << 20) + 17 - 5, 5)]
    buf = bytearray(sum(n for _, _, n in ranges))
    items, at = [], 0
    for f, off, n in ranges:
        items.append((f, off, n, at))
        at += n
    assert reader.read(memoryview(buf), items) == (len(buf), None)
    if hasattr(os, "O_DIRECT") and sys.platform.startswith("linux"):
        assert reader._aligned  # the files really were opened with O_DIRECT (ext4 here)
    at = 0
    blobs = list(data.values())
    for f, off, n in ranges:
        assert bytes(buf[at:at + n]) == blobs[f][off:off + n]
        at += n
    reader.close()
    with Fetcher(paths, workers=2, staging_bytes=4 << 20, runtime_dir=tmp_path, direct=True, queue_depth=depth) as f:
        check(data, ranges, f.read(ranges))
