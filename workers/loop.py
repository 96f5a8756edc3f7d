"""The I/O worker process.

    python -m moed.workers.loop --endpoint ipc://... --id N [--lifeline FD] [--heartbeat S]

A DEALER connects to the supervisor's ROUTER and sends Ready, then loops: poll the socket and a
wake-up pipe (with a heartbeat-long timeout), handle Configure / Read / Shutdown, answer each Read
with one ReadDone, in order. A Read is started at once (what the page cache holds is copied
inline, the rest goes to the reader's threads), so the next Read's disk reads join the queue
while the previous one finishes: the device sees a steady queue, not one batch per request. A
Heartbeat goes out whenever nothing was sent for a heartbeat interval, unless a read has made no
progress for that long, so the supervisor's liveness count tracks read progress, not just a live
process.

The worker never outlives its supervisor: a thread blocks on the lifeline socket, whose other end
only the supervisor holds, and exits the process when it reads EOF, which the kernel delivers the
instant the supervisor dies, however busy its main thread is. A changed parent pid is the backup.
Imports moed.ipc, zmq, msgpack and the stdlib only (no MLX), so it starts fast and stays small.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import wait
from typing import Callable

import zmq

from moed.ipc import shm
from moed.ipc.codec import ProtocolError, decode, encode
from moed.ipc.messages import Configure, Heartbeat, Read, ReadDone, Ready, Shutdown
from moed.workers.reader import Job, Reader


class IOService:
    """The worker's state, without sockets: Configure and Read in, ReadDone out."""

    def __init__(self) -> None:
        self.reader: Reader | None = None
        self.segment = None  # SharedMemory
        self.buf: memoryview | None = None
        self.error: str | None = None  # configuration problem, reported on every Read

    def configure(self, msg: Configure) -> None:
        self._detach()
        if (self.reader is None or self.reader.paths != msg.files or self.reader.depth != msg.queue_depth
                or self.reader.direct != msg.direct or self.reader.pins != [list(p) for p in msg.pins]):
            if self.reader is not None:
                self.reader.close()
            self.reader = Reader(msg.files, msg.queue_depth, msg.direct, msg.pins)
        self.error = None
        try:
            self.segment = shm.attach(msg.shm_name)
        except OSError as e:
            self.error = f"cannot attach shared memory {msg.shm_name}: {e}"
            return
        self.buf = self.segment.buf[:msg.shm_size]
        if len(self.buf) < msg.shm_size:
            self.error = (f"shared memory {msg.shm_name} is {len(self.buf)} bytes, "
                          f"not {msg.shm_size}")

    def start(self, msg: Read, progress: Callable[[], None] | None = None,
              on_done: Callable[[], None] | None = None) -> Job:
        if self.error is not None or self.buf is None or self.reader is None:
            return Job(0, {}, self.error or "worker not configured")
        return self.reader.start(self.buf, msg.items, progress, on_done)

    def close(self) -> None:
        self._detach()
        if self.reader is not None:
            self.reader.close()

    def _detach(self) -> None:
        if self.buf is not None:
            self.buf.release()
            self.buf = None
        if self.segment is not None:
            shm.close(self.segment)
            self.segment = None


class WorkerLoop:
    """Receive, dispatch on message type, answer finished reads in order, heartbeat; returns the
    reason it stopped."""

    def __init__(self, sock: zmq.Socket, worker_id: int, heartbeat_s: float,
                 lifeline: int | None = None, parent_pid: int | None = None):
        self.sock = sock
        self.worker_id = worker_id
        self.heartbeat_s = heartbeat_s
        self.lifeline = lifeline
        self.parent_pid = parent_pid
        self.service = IOService()
        self.last_sent = 0.0
        self.last_progress = 0.0
        self.jobs: deque[tuple[int, Job]] = deque()  # started reads, oldest first
        self._wake_r, self._wake_w = os.pipe()  # the reader's threads say "a run finished"
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    def run(self) -> str:
        if self.lifeline is not None:
            threading.Thread(target=_exit_on_eof, args=(self.lifeline,), daemon=True).start()
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        timeout = max(1, int(self.heartbeat_s * 1000))
        self.send(Ready(self.worker_id, os.getpid()))
        try:
            while True:
                events = dict(poller.poll(timeout))
                if self._wake_r in events:
                    _drain(self._wake_r)
                while self.sock in events:
                    try:
                        frames = self.sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if self._handle(frames):
                        return "shutdown"
                self.answer_finished()
                if self.parent_pid is not None and os.getppid() != self.parent_pid:
                    return "parent died"
                self.heartbeat_if_due()
        finally:
            self.service.close()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def send(self, msg, flags: int = 0) -> None:
        self.sock.send_multipart(encode(msg), flags=flags, copy=True)
        self.last_sent = time.monotonic()

    def heartbeat_if_due(self) -> None:
        now = time.monotonic()
        if now - self.last_sent < self.heartbeat_s:
            return
        if self.jobs and now - self.last_progress >= self.heartbeat_s:
            return  # a read is stuck: let the supervisor's liveness count run out
        try:  # never block on a supervisor that is not reading: drop the beat instead
            self.send(Heartbeat(), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def progress(self) -> None:
        self.last_progress = time.monotonic()
        self.heartbeat_if_due()

    def answer_finished(self) -> None:
        """ReadDone for each finished read at the head of the queue (answers keep request order)."""
        while self.jobs and self.jobs[0][1].done():
            req_id, job = self.jobs.popleft()
            nbytes, error = job.result()
            self.last_progress = time.monotonic()
            self.send(ReadDone(req_id, nbytes, error))

    def _run_done(self) -> None:
        """From a reader thread: a run finished; wake the loop (a full pipe is awake already)."""
        self.last_progress = time.monotonic()
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    def _handle(self, frames: list[bytes]) -> bool:
        """Handle one message; True on Shutdown."""
        try:
            msg = decode(frames)
        except ProtocolError as e:
            print(f"moed worker {self.worker_id}: dropped message: {e}", file=sys.stderr)
            return False
        if isinstance(msg, Read):
            self.last_progress = time.monotonic()
            self.jobs.append((msg.req_id, self.service.start(msg, self.progress, self._run_done)))
        elif isinstance(msg, Configure):
            for _, job in self.jobs:  # reads still writing into the old segment finish first
                wait(job.futures)
            self.answer_finished()
            self.service.configure(msg)
        elif isinstance(msg, Shutdown):
            return True
        # Heartbeats from the supervisor need no answer.
        return False


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _exit_on_eof(fd: int) -> None:
    """Lifeline thread: block until the supervisor's end closes, then exit at once."""
    while True:
        try:
            if os.read(fd, 1) == b"":
                break
        except InterruptedError:
            continue
        except OSError:
            break
    os._exit(3)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="moed.workers.loop", description=__doc__.split("\n")[0])
    p.add_argument("--endpoint", required=True, help="the supervisor's ROUTER endpoint")
    p.add_argument("--id", type=int, required=True, help="worker slot number")
    p.add_argument("--heartbeat", type=float, default=0.5, help="heartbeat interval, seconds")
    p.add_argument("--lifeline", type=int, help="fd that reads EOF when the supervisor dies")
    p.add_argument("--parent-pid", type=int, help="exit when the parent pid is no longer this")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    ctx = zmq.Context(1)
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, f"{args.id}:{os.getpid()}".encode())
    sock.connect(args.endpoint)
    reason = WorkerLoop(sock, args.id, args.heartbeat, args.lifeline, args.parent_pid).run()
    sock.close(linger=500 if reason == "shutdown" else 0)
    ctx.term()
    return 0 if reason == "shutdown" else 3


if __name__ == "__main__":
    sys.exit(main())
