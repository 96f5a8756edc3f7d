"""The daemon's client socket: a ZeroMQ ROUTER owned by one I/O thread, bridged to queues.

The engine loop never touches the socket: it takes `(client, message)` from `inbox` and hands
replies to `send`, which queues them and wakes the I/O thread through a pipe. The I/O thread
authenticates clients (Hello with the token), answers Ping and StatusQuery itself (with the status
the engine loop last published) so a busy engine still looks alive, turns malformed frames into Error
replies, and reports clients that went away so their requests get aborted: a socket that closed (the
ROUTER's monitor reports the connection's file descriptor, each message carries its own: SRCFD) or a
process that exited (the pid given in Hello; checked every CLIENT_CHECK_S).

Input and output interleave: one turn of the loop reads at most READ_BATCH messages, then sends
what is queued, so a client flooding the socket delays others' tokens by one batch, not by its flood.

Sockets that can fill up are bounded and say so. The ROUTER sends with ROUTER_MANDATORY, so a
client whose pipe is full (SNDHWM) is told, not silently skipped: what it has not taken yet waits
in its own queue, tried again every RETRY_S. A Token that finds that queue full (CLIENT_QUEUE) is
not sent: its request is aborted, and its stream ends with Error("too_slow") when the client reads
again, after the tokens it did get, never with a hole in the middle. Other clients are unaffected.
Replies and stream ends still queue up to twice CLIENT_QUEUE; past that the client is dropped as if
it had exited (its requests aborted).

What one client may send is bounded (ClientBounds): its name, its request ids (echoed in every
Token), its stop strings, how many requests it has in flight and how many messages a second it
sends (a token bucket). Past a bound the message is refused here, on the I/O thread, with a typed
Error naming the bound, so it never reaches the engine; with names and ids bounded, the status
(which lists them) has a bounded size too.
"""

from __future__ import annotations

import hmac
import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

from moed.ipc.codec import ProtocolError, decode, encode
from moed.ipc.messages import (Abort, DaemonStatus, Error, Finished, Generate, Hello, Ping, Pong, Status,
                               StatusQuery, StopDaemon, Token, Welcome)
from moed.ipc.runtime import process_alive, restrict_socket
from moed.ipc.streams import CutStreams

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 8 << 20
CLIENT_CHECK_S = 0.5  # how often the pids of connected clients are checked
SNDHWM = 1000  # messages the socket holds for one client before it reports the client full
SNDBUF = 0  # kernel send buffer of a client's connection, bytes (0: the OS default)
CLIENT_QUEUE = 1024  # messages held for one client whose socket is full (see the module docstring)
RETRY_S = 0.01  # how often a client with queued messages is tried again
READ_BATCH = 64  # messages read per turn of the I/O loop before what is queued is sent


@dataclass(frozen=True)
class ClientBounds:
    """What one client may send; past a bound its message gets a typed Error and goes no further."""

    name_chars: int = 128  # Hello.client (shown by `moed ps`, in the status): else bad_request
    req_id_chars: int = 256  # Generate.req_id (echoed in every Token): else bad_request
    stop_strings: int = 16  # Generate.stop entries (OpenAI allows 4): else bad_request
    stop_chars: int = 256  # characters of one stop string: else bad_request
    in_flight: int = 32  # requests running or queued per client (--max-client-requests): else rejected
    rate: float = 500.0  # messages a second one client may send, sustained: else rate_limited
    burst: int = 1000  # ... and at once

    def refusal(self, g: Generate, in_flight: set[str]) -> Error | None:
        """Why this client's Generate is refused (None: it goes to the engine)."""
        rid = g.req_id
        if len(rid) > self.req_id_chars:
            return Error(rid, "bad_request", f"req_id: at most {self.req_id_chars} characters")  # echoed once
        stop = g.stop if isinstance(g.stop, list) else []
        if len(stop) > self.stop_strings:
            return Error(rid, "bad_request", f"stop: {len(stop)} strings; at most {self.stop_strings}")
        if any(isinstance(x, str) and len(x) > self.stop_chars for x in stop):
            return Error(rid, "bad_request", f"stop: a string of more than {self.stop_chars} characters")
        if rid in in_flight:
            return Error(rid, "bad_request", f"request id {rid!r} is in use")
        if len(in_flight) >= self.in_flight:
            return Error(rid, "rejected", f"this client has {len(in_flight)} requests in flight, the most one "
                                          f"client may have (--max-client-requests)")
        return None


class Bucket:
    """A token bucket: `take()` is False once a client sent more than `burst` beyond `rate` a second."""

    __slots__ = ("rate", "burst", "level", "at")

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst, self.level, self.at = rate, burst, float(burst), time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.level = min(self.burst, self.level + (now - self.at) * self.rate)
        self.at = now
        if self.level < 1:
            return False
        self.level -= 1
        return True


@dataclass(frozen=True)
class Disconnected:
    """A client's socket went away (not a wire message)."""


class Frontend:
    """ROUTER socket <-> queues.

    Args:
        endpoint: where to bind, e.g. ipc://.../daemon.sock.
        token: the secret a client must present in Hello.
        model: name sent in Welcome.
        status: returns the latest published DaemonStatus (called from the I/O thread, so it must
            only read what the engine loop stored; the snapshot is sent as it is).
        on_stop: called (from the I/O thread) on StopDaemon, so a stop reaches a loop that is not
            draining the inbox yet (a load); None puts StopDaemon on the inbox like any request.
        bounds: what one client may send (ClientBounds).
    """

    def __init__(self, endpoint: str, token: str, model: str, status: Callable[[], DaemonStatus],
                 on_stop: Callable[[], None] | None = None, bounds: ClientBounds = ClientBounds()):
        self.endpoint, self._token, self.model, self._status = endpoint, token, model, status
        self._on_stop, self.bounds = on_stop, bounds
        self._in_flight: dict[bytes, set[str]] = {}  # client -> its requests the engine has not ended
        # (client identity, message | Disconnected). A SimpleQueue: its put is reentrant, so the
        # supervisor's signal handler may use it to wake the loop that is blocked in its get.
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.clients: dict[bytes, str] = {}  # authenticated identity -> client name
        self._pids: dict[bytes, int] = {}  # authenticated identity -> client pid
        self._out: queue.SimpleQueue = queue.SimpleQueue()  # from send(), for the I/O thread
        self.client_queue = CLIENT_QUEUE
        self._queued: dict[bytes, deque] = {}  # client -> encoded messages its full socket did not take
        self._lost: dict[bytes, CutStreams] = {}  # client -> its requests aborted for want of room
        self._buckets: dict[bytes, Bucket] = {}  # peer -> its message rate
        self._fd: dict[bytes, int] = {}  # peer -> the descriptor of its connection (SRCFD)
        self._peers: dict[int, set[bytes]] = {}  # descriptor -> peers seen on it
        self._closed: set[int] = set()  # descriptors disconnected and not accepted again since
        self._closing: dict[int, set[bytes]] = {}  # closed descriptor -> peers to forget once input is read
        self._wake_r, self._wake_w = os.pipe()
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 500)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a full or vanished client raises, not drops
        self._sock.setsockopt(zmq.SNDHWM, SNDHWM)
        if SNDBUF > 0:
            self._sock.setsockopt(zmq.SNDBUF, SNDBUF)
        self._sock.bind(endpoint)
        restrict_socket(endpoint)
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self._thread = threading.Thread(target=self._run, name="moed-frontend", daemon=True)

    def start(self) -> "Frontend":
        self._thread.start()
        return self

    def send(self, client: bytes, msg) -> None:
        """Queue a message to a client (thread-safe; never blocks on the socket)."""
        self._out.put((client, msg))
        os.write(self._wake_w, b"x")

    def close(self) -> None:
        """Flush what is queued, stop the thread, close the socket."""
        self._stop.set()
        os.write(self._wake_w, b"x")
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._sock.disable_monitor()
        self._monitor.close(0)
        self._sock.close()
        self._ctx.term()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # ------------------------------------------------------------------ I/O thread

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        checked, more = time.monotonic(), False
        while True:
            wait = 0 if more else RETRY_S if self._queued else CLIENT_CHECK_S
            events = dict(poller.poll(int(wait * 1000)))
            if time.monotonic() - checked > CLIENT_CHECK_S:
                self._check_clients()
                checked = time.monotonic()
            if self._wake_r in events:
                os.read(self._wake_r, 4096)
            self._retry()
            self._flush()
            if self._stop.is_set():
                self._retry()
                return
            more = self._read()

    def _read(self) -> bool:
        """Read up to READ_BATCH messages; True if more are waiting."""
        for _ in range(READ_BATCH):
            self._on_monitor()  # first: a descriptor's DISCONNECTED (then ACCEPTED) precedes its messages
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                for peers in self._closing.values():  # their last messages are read: forget them
                    for peer in peers:
                        self._forget(peer)
                self._closing.clear()
                return False
            self._on_frames(frames)
        return True

    def _on_monitor(self) -> None:
        """Note the connections that closed; their peers are forgotten once the socket's input is read.

        libzmq queues a connection's messages before it emits its DISCONNECTED, emits that before the
        descriptor is closed (so before it can be reused) and a new connection's ACCEPTED before its
        first byte is read, all from its one I/O thread. So events drained before each read are never
        behind the message read, and a message from a descriptor closed and not accepted since is one
        its connection sent before closing (a StopDaemon then close, say): still handled.
        """
        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            fd = int(event["value"])
            if event["event"] == zmq.EVENT_ACCEPTED:
                self._closed.discard(fd)
            else:
                self._closed.add(fd)
                self._closing.setdefault(fd, set()).update(self._peers.pop(fd, ()))

    def _flush(self) -> None:
        while True:
            try:
                client, msg = self._out.get_nowait()
            except queue.Empty:
                return
            if isinstance(msg, (Finished, Error)) and (mine := self._in_flight.get(client)) is not None:
                mine.discard(msg.req_id)  # the engine ended it
            self._emit(client, msg)

    def _emit(self, client: bytes, msg) -> None:
        """Send to a client now, or queue it behind what the client has not taken yet."""
        if (cut := self._lost.get(client)) is not None:
            msg = cut.settle(msg)
            if not cut:
                del self._lost[client]
            if msg is None:
                return
        q = self._queued.get(client)
        if q is None:
            if self._send(client, encode(msg)) or client not in self.clients:
                return  # sent, gone, or not authenticated (only authenticated clients get a queue)
            q = self._queued[client] = deque()
        self._enqueue(client, q, msg)

    def _enqueue(self, client: bytes, q: deque, msg) -> None:
        if isinstance(msg, Token) and len(q) >= self.client_queue:
            if client not in self._lost:
                self._lost[client] = CutStreams(f"{self.client_queue} messages")
            self._lost[client].cut(msg.req_id)
            self.inbox.put((client, Abort(msg.req_id)))  # the engine stops it; its Finished comes back
            return
        if len(q) >= 2 * self.client_queue:  # not even replies fit: it sends without ever reading
            log.warning("moed frontend: dropping client %s: %d messages queued, none taken",
                        self.clients.get(client, client.hex()), len(q))
            self._forget(client)
            return
        q.append(encode(msg))

    def _retry(self) -> None:
        """Send what clients' full sockets did not take, oldest first, until full again."""
        for client, q in list(self._queued.items()):
            while q and self._send(client, q[0]):
                if q:  # (emptied if the client turned out to be gone)
                    q.popleft()
            if not q:
                self._queued.pop(client, None)

    def _send(self, client: bytes, frames: list) -> bool:
        """True once the socket took the message, or the client is gone; False if its pipe is full."""
        try:
            self._sock.send_multipart([client, *frames], flags=zmq.NOBLOCK)
        except zmq.Again:
            return False
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                log.warning("moed frontend: cannot send to %s: %s", client.hex(), e)
            self._forget(client)  # its socket went away: abort its requests now
        return True

    def _forget(self, client: bytes) -> None:
        """A client that exited, vanished or was dropped: its requests are aborted."""
        if (q := self._queued.pop(client, None)) is not None:
            q.clear()
        self._lost.pop(client, None)
        self._pids.pop(client, None)
        self._in_flight.pop(client, None)
        self._buckets.pop(client, None)
        if (fd := self._fd.pop(client, None)) is not None and (peers := self._peers.get(fd)) is not None:
            peers.discard(client)
            if not peers:
                del self._peers[fd]
        if self.clients.pop(client, None) is not None:
            self.inbox.put((client, Disconnected()))

    def _check_clients(self) -> None:
        for client, pid in list(self._pids.items()):
            if not process_alive(pid):
                self._forget(client)

    def _on_frames(self, frames: list[zmq.Frame]) -> None:
        client, fd = frames[0].bytes, frames[0].get(zmq.SRCFD)
        if fd in self._closed:  # sent just before its connection closed: handled, then forgotten
            self._closing.setdefault(fd, set()).add(client)
        elif self._fd.get(client) != fd:
            self._fd[client] = fd
            self._peers.setdefault(fd, set()).add(client)
        try:
            msg = decode([f.bytes for f in frames[1:]])
        except ProtocolError as e:
            self._emit(client, Error(None, "protocol", str(e)))
            return
        bucket = self._buckets.get(client) or self._buckets.setdefault(client, Bucket(self.bounds.rate,
                                                                                      self.bounds.burst))
        if not bucket.take() and not isinstance(msg, Abort):
            self._emit(client, Error(getattr(msg, "req_id", None), "rate_limited",
                                     f"more than {self.bounds.burst} messages at once or {self.bounds.rate:g} "
                                     f"a second from this client"))
            return
        if isinstance(msg, Hello):
            if not hmac.compare_digest(msg.token.encode(), self._token.encode()):
                self._emit(client, Error(None, "unauthorized", "bad token: read it from the connection file"))
            elif len(msg.client) > self.bounds.name_chars:
                self._emit(client, Error(None, "bad_request", f"Hello.client: the client's name is {len(msg.client)} "
                                                              f"characters; at most {self.bounds.name_chars}"))
            else:
                self.clients[client] = f"{msg.client}:{msg.pid}"
                self._pids[client] = msg.pid
                self._emit(client, Welcome(self.model, os.getpid()))
        elif client not in self.clients:
            self._emit(client, Error(getattr(msg, "req_id", None), "unauthorized", "send Hello with the token first"))
        elif isinstance(msg, Ping):
            self._emit(client, Pong(msg.seq))
        elif isinstance(msg, StatusQuery):
            self._emit(client, Status(self._status(), msg.req_id))
        elif isinstance(msg, StopDaemon) and self._on_stop is not None:
            self._on_stop()
        elif isinstance(msg, Abort) and msg.req_id not in self._in_flight.get(client, ()):
            pass  # not running (ended, or never was): nothing to stop, and an Abort flood never reaches the engine
        elif isinstance(msg, Generate):
            mine = self._in_flight.setdefault(client, set())
            if (refused := self.bounds.refusal(msg, mine)) is not None:
                self._emit(client, refused)
            else:
                mine.add(msg.req_id)
                self.inbox.put((client, msg))
        else:
            self.inbox.put((client, msg))
