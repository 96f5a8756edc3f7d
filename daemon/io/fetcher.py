"""The supervisor's side of the I/O path: worker processes read file ranges into shared memory.

    with Fetcher(paths, workers=2) as f:
        a, b = f.read([(0, offset, length), (1, offset, length)])  # valid until the next read

read() lays the ranges out back to back (64-byte aligned) in one staging segment, splits the bytes
evenly across the workers (one Read message per worker, ranges cut at page boundaries), waits for
every ReadDone and returns views into the segment. Small reads go whole to one worker.
submit() + wait() split the two halves: up to MAX_UNWAITED submissions may be in flight at once
(the engine's own misses and its lookahead read), each in its own part of the segment (a ring);
every worker handles its Reads in order.

Liveness, as in the ZeroMQ guide's Paranoid Pirate: any message from a worker resets its clock;
a worker with a Read outstanding that stays silent for `liveness` heartbeat intervals is killed
(an idle one after twice that).
An exited worker is noticed by Popen.poll() within DEATH_CHECK_S (at once if sending to it fails);
between reads the owner calls poll() (the daemon's loop does, a few times a second even when idle),
so a worker that dies while nothing is read is reaped and replaced too, not left a zombie.
Either way the slot gets a new process and the outstanding Read is sent again, so read() still
returns correct bytes. A slot that fails MAX_RESTARTS times within one read() raises WorkerError
(naming the cause): every worker is killed, the reads in flight fail, and the fetcher is down for a
backoff (BACKOFF_S, doubling to BACKOFF_MAX_S, back to BACKOFF_S after a read succeeds); reads
submitted meanwhile raise WorkerError at once, then the next poll() or submit() respawns every slot.
`failure` says why while it cannot serve. A failed read (EOF, I/O error) raises ReadError; the
fetcher stays usable.

No MLX here: this module can run in any process. Not thread-safe: one thread calls read().
"""
from __future__ import annotations

import itertools
import logging
import os
import socket
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass, field

import zmq

from moed.ipc import shm
from moed.ipc.codec import ProtocolError, decode, encode
from moed.ipc.messages import PROTOCOL_VERSION, Configure, Read, ReadDone, Ready, Shutdown
from moed.ipc.runtime import endpoint_path, ipc_endpoint, remove_endpoint, remove_stale_endpoints, restrict_socket
from moed.workers.reader import QUEUE_DEPTH, pin_of

log = logging.getLogger(__name__)

ALIGN = 64  # start of each range in the staging segment
SPLIT_ALIGN = 4096  # a range split across workers is cut at a page boundary of its file
MIN_SPLIT = 512 << 10  # default: reads smaller than this go whole to one worker
GROW_STEP = 1 << 20
DEATH_CHECK_S = 0.05  # how often a waiting read() looks for exited workers (Popen.poll)
MAX_RESTARTS = 3  # per worker slot within one read()
MAX_UNWAITED = 2  # submissions in flight; one more drops the oldest (its wait() raises)
SHUTDOWN_GRACE = 2.0  # seconds a worker gets to exit after Shutdown before SIGKILL
BACKOFF_S = 0.5  # down this long after the workers kept failing; doubles each time, up to BACKOFF_MAX_S
BACKOFF_MAX_S = 10.0

Range = tuple[int, int, int]  # (file_idx, file_offset, length)


class FetchError(RuntimeError):
    """Base of the fetcher's errors."""


class WorkerError(FetchError):
    """Workers could not be started or kept alive; the fetcher is down for a backoff (closed if start() failed)."""


class ReadError(FetchError):
    """A worker could not read a range (the message names the file); the fetcher stays usable."""

    def __init__(self, errors: list[str]):
        super().__init__("; ".join(errors))
        self.errors = errors


@dataclass(eq=False)
class Ticket:
    """A submitted read (see Fetcher.submit)."""

    ranges: list
    offsets: list[int]  # in `buf`, the segment it was laid out in
    items: list
    t0: float
    buf: memoryview | None = None  # a view of `segment` (valid after a grow replaced it)
    segment: object = None
    span: tuple[int, int] = (0, 0)  # the staging bytes it occupies
    req_ids: set[int] = field(default_factory=set)  # its Reads still outstanding
    done: list = field(default_factory=list)  # (worker slot, ReadDone)
    dropped: bool = False
    failed: str | None = None  # why, when the workers gave up with it in flight


@dataclass
class FetchStats:
    bytes_read: int = 0
    reads: int = 0  # ranges
    read_calls: int = 0
    read_seconds: float = 0.0  # wall time inside read()
    respawns: int = 0
    bytes_by_worker: list[int] = field(default_factory=list)  # per slot


@dataclass(eq=False)
class _Worker:
    slot: int
    proc: subprocess.Popen
    lifeline: socket.socket  # our end; the worker exits when it reads EOF on its end
    started: float
    identity: bytes | None = None  # ZeroMQ routing id, known once Ready arrives
    last_seen: float = 0.0
    pending: list[Read] = field(default_factory=list)  # sent, not answered, oldest first
    sent_at: float = 0.0
    restarts: int = 0  # within the current read() (see MAX_RESTARTS)
    respawns: int = 0  # of this slot over the fetcher's life


@dataclass(eq=False)
class _Resources:
    """What close() releases; apart from Fetcher so a finalizer can own it."""
    ctx: zmq.Context
    router: zmq.Socket
    endpoint: str
    workers: list[_Worker] = field(default_factory=list)
    segments: list = field(default_factory=list)  # SharedMemory we created

    def release(self) -> None:
        for w in self.workers:  # ask politely (a worker not yet Ready exits on the lifeline)...
            if w.identity is not None:
                try:
                    self.router.send_multipart([w.identity, *encode(Shutdown())], zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
            w.lifeline.close()
        deadline = time.monotonic() + SHUTDOWN_GRACE
        for w in self.workers:  # ...then insist
            _reap(w, max(0.0, deadline - time.monotonic()))
        self.router.close(linger=0)
        self.ctx.term()
        for seg in self.segments:
            shm.unlink(seg)
            shm.close(seg)
        self.segments.clear()
        remove_endpoint(self.endpoint)


def _reap(w: _Worker, grace: float) -> None:
    """Wait up to `grace` seconds for the process, then SIGKILL it by pid."""
    try:
        w.proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        w.proc.kill()
        w.proc.wait()


class Fetcher:
    """Reads file ranges through worker processes into a shared-memory staging segment.

    Args:
        files: paths; a range's file_idx indexes this list.
        workers: number of worker processes.
        staging_bytes: initial staging segment size; grows when one read() needs more.
        runtime_dir: where the ROUTER's socket file goes (default: ipc.runtime.runtime_dir()).
        heartbeat_s: workers' heartbeat interval.
        liveness: silent heartbeat intervals before a busy worker is declared dead.
        start_timeout: seconds for the workers to report Ready.
        min_split_bytes: reads smaller than this are not split across workers.
        queue_depth: reads each worker keeps in flight.
        direct: bypass the page cache (O_DIRECT / F_NOCACHE).
    """

    def __init__(self, files: list[str], workers: int = 2, staging_bytes: int = 64 << 20,
                 runtime_dir: str | os.PathLike | None = None, *, heartbeat_s: float = 0.5,
                 liveness: int = 4, start_timeout: float = 20.0,
                 min_split_bytes: int = MIN_SPLIT, queue_depth: int = QUEUE_DEPTH, direct: bool = False):
        if workers < 1 or staging_bytes < 1:
            raise ValueError("need at least one worker and one byte of staging")
        self.files = [os.path.abspath(os.fspath(f)) for f in files]
        try:
            self.pins = [pin_of(f) for f in self.files]  # what the workers check each file against
        except OSError as e:
            raise ReadError([f"{e.filename}: {e.strerror}"]) from e
        self.n_workers = workers
        self.runtime_dir = runtime_dir
        self.heartbeat_s = heartbeat_s
        self.liveness = liveness
        self.start_timeout = start_timeout
        self.min_split_bytes = min_split_bytes
        self.queue_depth = queue_depth
        self.direct = direct
        self.stats = FetchStats(bytes_by_worker=[0] * workers)
        self._size = _round_up(staging_bytes, GROW_STEP)
        self._res: _Resources | None = None
        self._finalizer: weakref.finalize | None = None
        self._closed = False
        self._req_ids = itertools.count(1)
        self._by_identity: dict[bytes, _Worker] = {}
        self._tickets: list[Ticket] = []  # submitted, not yet waited, oldest first
        self._owner: dict[int, Ticket] = {}  # req_id -> ticket, for Reads in flight
        self._next_check = 0.0  # monotonic time of the next exited-worker check
        self._failure: str | None = None  # why the workers last gave up; cleared once all are Ready again
        self._down = False  # workers killed after giving up; respawned at _retry_at
        self._retry_at = 0.0
        self._backoff = BACKOFF_S

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> "Fetcher":
        """Bind the ROUTER, create the staging segment, spawn the workers, wait for Ready."""
        if self._res is not None or self._closed:
            raise FetchError("a Fetcher starts once")
        ctx = zmq.Context(1)
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a vanished worker raises
        router.setsockopt(zmq.RCVTIMEO, int(DEATH_CHECK_S * 1000))  # fixed: setting it is slow
        endpoint = ipc_endpoint(directory=self.runtime_dir)
        remove_stale_endpoints(endpoint_path(endpoint).parent)  # left by killed supervisors
        router.bind(endpoint)
        restrict_socket(endpoint)
        self._res = _Resources(ctx, router, endpoint)
        self._finalizer = weakref.finalize(self, self._res.release)
        try:
            self._segment = shm.create(self._size)
            self._res.segments.append(self._segment)
            self._buf = self._segment.buf
            for slot in range(self.n_workers):
                self._res.workers.append(self._spawn(slot))
            self._await_ready()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Shutdown the workers (SIGKILL after SHUTDOWN_GRACE), unlink shared memory, remove the
        socket file. Idempotent; also runs at interpreter exit or when the Fetcher is collected."""
        self._closed = True
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> "Fetcher":
        return self if self._res is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def worker_states(self) -> list[dict]:
        """Per worker: pid, alive, queued bytes (its outstanding Read), restarts (times its slot was
        respawned over the fetcher's life), for status."""
        return [{"pid": w.proc.pid, "alive": w.proc.poll() is None, "ready": w.identity is not None,
                 "queued_bytes": sum(it[2] for r in w.pending for it in r.items),
                 "restarts": w.respawns} for w in list(self._workers)]

    def poll(self) -> None:
        """Between reads: handle what the workers sent (Ready, heartbeats) and replace exited or
        silent workers, reaping the dead. Never blocks; call it from the thread that reads (the
        daemon's loop calls it a few times a second). A slot that keeps dying (MAX_RESTARTS times
        since the last read) raises WorkerError and takes the fetcher down for a backoff; the first
        poll() after it respawns the workers."""
        if self._closed or self._res is None:
            return
        try:
            if self._down:
                if time.monotonic() >= self._retry_at:
                    self._heal()
                return
            self._pump(block=False)
            self._check_liveness()
        except WorkerError as e:
            self._give_up(e)
            raise

    @property
    def failure(self) -> str | None:
        """Why the fetcher cannot serve now (workers kept failing: down for a backoff, or respawned
        and not all Ready yet); None when it can."""
        if self._closed:
            return "fetcher is closed"
        if self._failure is None:
            return None
        if self._down:
            wait = max(0.0, self._retry_at - time.monotonic())
            return f"I/O workers failing ({self._failure}); restarting them in {wait:.1f}s"
        return f"I/O workers restarting after: {self._failure}"

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    @property
    def staging_bytes(self) -> int:
        return self._size

    @property
    def endpoint(self) -> str | None:
        """The ROUTER's `ipc://` endpoint (its socket file is removed by close())."""
        return self._res.endpoint if self._res is not None else None

    @property
    def endpoints(self) -> list[str]:
        """Every endpoint this fetcher bound (one ROUTER today)."""
        return [self._res.endpoint] if self._res is not None else []

    # --- reading ----------------------------------------------------------------------------

    def read(self, ranges: list[Range]) -> list[memoryview]:
        """Read (file_idx, offset, length) ranges; returns views into the staging segment in the
        same order, valid until the next read() or submit(). Raises ReadError, WorkerError."""
        return self.wait(self.submit(ranges))

    def submit(self, ranges: list[Range]) -> "Ticket":
        """Start reading `ranges` and return at once; `wait(ticket)` gives the views. Another
        submission may follow before this one is waited (see MAX_UNWAITED)."""
        t0 = time.perf_counter()
        self._check_open()
        offsets, total = self._layout(ranges)
        try:
            for w in self._workers:
                w.restarts = 0
            if len(self._tickets) >= MAX_UNWAITED:
                self._drop(self._tickets[0])
            base = self._place(total)
            if base is None:  # no room beside the reads in flight: finish them, then grow
                for t in self._tickets:
                    self._collect(t)
                self._grow(total)
                base = 0
            offsets = [base + o for o in offsets]
            items = [(f, off, n, dst) for (f, off, n), dst in zip(ranges, offsets) if n > 0]
            ticket = Ticket(ranges, offsets, items, t0, self._buf[:], self._segment, (base, base + total))
            self._tickets.append(ticket)
            if items:
                self._send_plan(ticket, self._assign(items, total))
        except WorkerError as e:
            self._give_up(e)
            raise
        return ticket

    def wait(self, ticket: "Ticket") -> list[memoryview]:
        """Block until a submitted read is in the staging segment; its views, in order, valid
        until a later submission reuses their bytes (not before the next submit())."""
        if ticket.failed:
            raise WorkerError(ticket.failed)
        if ticket.dropped or ticket not in self._tickets:
            raise FetchError("this read was dropped or already waited for")
        try:
            self._collect(ticket)
        except WorkerError as e:
            self._give_up(e)
            raise
        finally:
            if ticket in self._tickets:
                self._tickets.remove(ticket)
        done, ranges = ticket.done, ticket.ranges
        nbytes = sum(d.nbytes for _, d in done)
        self.stats.read_calls += 1
        self.stats.reads += len(ranges)
        self.stats.bytes_read += nbytes
        for slot, d in done:
            self.stats.bytes_by_worker[slot] += d.nbytes
        errors = [d.error for _, d in done if d.error]
        self.stats.read_seconds += time.perf_counter() - ticket.t0
        if errors:
            raise ReadError(errors)
        if nbytes != (expected := sum(i[2] for i in ticket.items)):
            raise ReadError([f"workers read {nbytes} bytes, expected {expected}"])
        self._backoff = BACKOFF_S  # the workers serve again
        buf = ticket.buf
        return [buf[dst:dst + n] for (_, _, n), dst in zip(ranges, ticket.offsets)]

    def _place(self, total: int) -> int | None:
        """Where `total` staging bytes fit beside the unwaited submissions: after the newest,
        else at the start; None if neither is free."""
        spans = [t.span for t in self._tickets if t.segment is self._segment]
        for base in ([spans[-1][1]] if spans else []) + [0]:
            end = base + total
            if end <= self._size and all(end <= a or base >= b for a, b in spans):
                return base
        return None

    def _drop(self, ticket: Ticket) -> None:
        """Let an unwaited submission land and forget it (its wait() raises)."""
        self._collect(ticket)
        ticket.dropped = True
        self._tickets.remove(ticket)

    def _layout(self, ranges: list[Range]) -> tuple[list[int], int]:
        """Staging offsets (ALIGN-aligned, back to back) and the bytes they span."""
        offsets, pos, nfiles = [], 0, len(self.files)
        for f, off, n in ranges:
            if not (0 <= f < nfiles and off >= 0 and n >= 0):
                raise ValueError(f"bad range {(f, off, n)} ({nfiles} files)")
            offsets.append(pos)
            pos += (n + ALIGN - 1) // ALIGN * ALIGN
        return offsets, pos

    def _assign(self, items: list, total: int) -> list[list]:
        """Split items into one list per worker, balanced by bytes; big ranges are cut at a page
        boundary of their file. Small reads go whole to worker 0: one message, and a worker that
        stays warm answers sooner than alternating ones."""
        n = len(self._workers)
        plan: list[list] = [[] for _ in range(n)]
        if n == 1 or total < self.min_split_bytes:
            plan[0] = items
            return plan
        target = -(-total // n)
        slot, room = 0, target
        for f, off, length, dst in sorted(items):
            while length > 0:
                take = length
                if slot < n - 1 and length > room:
                    take = (off + room) // SPLIT_ALIGN * SPLIT_ALIGN - off
                    if take <= 0:  # no page boundary fits: next worker
                        slot, room = slot + 1, target
                        continue
                    if length - take < SPLIT_ALIGN:  # leave no crumbs
                        take = length
                plan[slot].append((f, off, take, dst))
                off, dst, length, room = off + take, dst + take, length - take, room - take
                if room <= 0 and slot < n - 1:
                    slot, room = slot + 1, target
        return plan

    def _send_plan(self, ticket: Ticket, plan: list[list]) -> None:
        """Send one Read per worker with work."""
        now = time.monotonic()
        for w, items in zip(list(self._workers), plan):
            if items:
                read = Read(next(self._req_ids), items)
                ticket.req_ids.add(read.req_id)
                self._owner[read.req_id] = ticket
                if not w.pending:  # silence counts from its oldest unanswered Read
                    w.sent_at = now
                w.pending.append(read)
                if w.identity is not None:
                    self._send(w, read)

    def _collect(self, ticket: Ticket) -> None:
        """Pump until every Read of `ticket` is answered."""
        while ticket.req_ids:
            self._pump()
            self._check_liveness()

    def _grow(self, total: int) -> None:
        """Move to a bigger segment: create, Configure the workers, unlink the old one."""
        old = self._segment
        self._size = _round_up(max(total, 2 * self._size), GROW_STEP)
        self._segment = shm.create(self._size)
        self._res.segments.append(self._segment)
        self._buf = self._segment.buf
        for w in list(self._workers):
            if w.identity is not None:
                self._send(w, self._configure())
        self._res.segments.remove(old)
        shm.unlink(old)
        shm.close(old)  # deferred if the caller still holds views into it

    # --- workers ----------------------------------------------------------------------------

    @property
    def _workers(self) -> list[_Worker]:
        return self._res.workers if self._res is not None else []

    def _check_open(self) -> None:
        if self._closed or self._res is None:
            raise WorkerError("fetcher is closed" if self._closed else "fetcher not started")
        if self._down:
            if time.monotonic() < self._retry_at:
                raise WorkerError(self.failure)
            try:
                self._heal()
            except WorkerError as e:
                self._give_up(e)
                raise

    def _give_up(self, e: WorkerError) -> None:
        """Workers that keep failing: kill them all (a stopped one too), fail every read in flight
        (their wait() raises) and stay down for the backoff. Nothing of a killed worker is reused:
        a worker still writing an old Read could otherwise land in a new read's staging bytes."""
        if self._closed or self._res is None:
            return
        now = time.monotonic()
        self._failure = str(e)
        self._down, self._retry_at = True, now + self._backoff
        log.error("moed fetcher: %s; restarting the workers in %.1fs", e, self._backoff)
        self._backoff = min(2 * self._backoff, BACKOFF_MAX_S)
        for t in self._tickets:
            t.dropped, t.failed = True, self._failure
            t.req_ids.clear()
        self._tickets.clear()
        self._owner.clear()
        for w in self._workers:
            if w.proc.poll() is None:
                w.proc.kill()
            w.proc.wait()  # SIGKILL ends even a SIGSTOPped process: bounded
            w.lifeline.close()
            w.pending.clear()
            self._by_identity.pop(w.identity, None)

    def _heal(self) -> None:
        """After the backoff: a new process in every slot (its restarts count from 0). The failure
        stays reported until they are all Ready (_on_ready)."""
        self._down = False
        for w in list(self._workers):
            try:
                new = self._spawn(w.slot)
            except OSError as e:
                raise WorkerError(f"could not start worker {w.slot}: {e}") from e
            new.respawns = w.respawns + 1
            self._res.workers[w.slot] = new
            self.stats.respawns += 1

    def _configure(self) -> Configure:
        return Configure(self.files, self._segment.name, self._size, queue_depth=self.queue_depth, direct=self.direct,
                         pins=self.pins)

    def _spawn(self, slot: int) -> _Worker:
        ours, theirs = socket.socketpair()
        cmd = [sys.executable, "-m", "moed.workers.loop", "--endpoint", self._res.endpoint,
               "--id", str(slot), "--heartbeat", str(self.heartbeat_s),
               "--lifeline", str(theirs.fileno()), "--parent-pid", str(os.getpid())]
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, pass_fds=(theirs.fileno(),))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return _Worker(slot, proc, ours, started=time.monotonic())

    def _restart(self, w: _Worker, why: str) -> None:
        """Replace a dead or silent worker; its outstanding Read goes to the new process."""
        if w.restarts >= MAX_RESTARTS:
            raise WorkerError(f"worker {w.slot} failed {w.restarts + 1} times; last: {why}")
        log.warning("moed fetcher: restarting worker %d (pid %d): %s", w.slot, w.proc.pid, why)
        if w.proc.poll() is None:
            w.proc.kill()
        w.proc.wait()
        w.lifeline.close()
        self._by_identity.pop(w.identity, None)
        new = self._spawn(w.slot)
        new.pending, new.restarts, new.respawns = list(w.pending), w.restarts + 1, w.respawns + 1
        self._res.workers[w.slot] = new
        self.stats.respawns += 1

    def _await_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while not all(w.identity for w in self._workers):
            if time.monotonic() > deadline:
                late = [w.slot for w in self._workers if w.identity is None]
                raise WorkerError(f"workers {late} not ready after {self.start_timeout:g}s")
            self._pump()
            self._check_liveness()

    def _pump(self, block: bool = True) -> None:
        """Wait up to DEATH_CHECK_S for traffic (not at all unless `block`) and handle everything
        that arrived. A blocking recv wakes faster than a poll + recv; exited workers are found by
        _check_liveness."""
        router = self._res.router
        try:
            frames = router.recv_multipart(0 if block else zmq.NOBLOCK)
        except zmq.Again:
            return
        while True:
            identity, *body = frames
            try:
                self._dispatch(identity, decode(body))
            except ProtocolError as e:
                log.warning("moed fetcher: dropped message from %r: %s", identity, e)
            if not router.get(zmq.EVENTS) & zmq.POLLIN:
                return
            frames = router.recv_multipart(zmq.NOBLOCK)

    def _dispatch(self, identity: bytes, msg) -> None:
        now = time.monotonic()
        if isinstance(msg, Ready):
            self._on_ready(identity, msg, now)
            return
        w = self._by_identity.get(identity)
        if w is None:  # from a worker we already replaced
            return
        w.last_seen = now
        if isinstance(msg, ReadDone) and w.pending and msg.req_id == w.pending[0].req_id:
            w.pending.pop(0)
            ticket = self._owner.pop(msg.req_id)
            ticket.req_ids.discard(msg.req_id)
            ticket.done.append((w.slot, msg))

    def _on_ready(self, identity: bytes, msg: Ready, now: float) -> None:
        if not 0 <= msg.worker_id < len(self._workers):
            return
        w = self._workers[msg.worker_id]
        if msg.pid != w.proc.pid or w.identity is not None:
            return  # stale: an earlier process of this slot
        if msg.version != PROTOCOL_VERSION:
            raise WorkerError(f"worker speaks protocol {msg.version}, we {PROTOCOL_VERSION}")
        w.identity, w.last_seen = identity, now
        self._by_identity[identity] = w
        if self._failure is not None and all(x.identity is not None for x in self._workers):
            log.warning("moed fetcher: the I/O workers are back")
            self._failure = None
        self._send(w, self._configure())
        if w.pending:
            w.sent_at = now
            for read in w.pending:
                self._send(w, read)

    def _send(self, w: _Worker, msg) -> None:
        try:
            self._res.router.send_multipart([w.identity, *encode(msg)])
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            self._restart(w, "unreachable")

    def _check_liveness(self) -> None:
        """Restart exited workers, workers never Ready, and busy workers gone silent."""
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + DEATH_CHECK_S
        limit = self.liveness * self.heartbeat_s
        for w in list(self._workers):
            if w.proc.poll() is not None:
                self._restart(w, f"exited with code {w.proc.returncode}")
            elif w.identity is None and now - w.started > self.start_timeout:
                self._restart(w, f"not ready after {self.start_timeout:g}s")
            elif (w.identity is not None and w.pending
                  and now - max(w.last_seen, w.sent_at) > limit):
                self._restart(w, f"silent for {limit:g}s")
            elif w.identity is not None and not w.pending and now - w.last_seen > 2 * limit:
                # idle workers heartbeat too: one that stopped (SIGSTOP, hung) is replaced before it gets work
                self._restart(w, f"silent for {2 * limit:g}s while idle")


def _round_up(n: int, step: int) -> int:
    return max(step, (n + step - 1) // step * step)
