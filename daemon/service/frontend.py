"""The daemon's client socket: a ZeroMQ ROUTER owned by one I/O thread, bridged to queues.

The engine loop never touches the socket: it takes `(client, message)` from `inbox` and hands
replies to `send`, which queues them and wakes the I/O thread through a pipe. The I/O thread
authenticates clients (Hello with the token), answers Ping and StatusQuery itself so a busy engine
still looks alive, turns malformed frames into Error replies, and reports clients whose process
has exited (the pid they gave in Hello; the socket is local) so their requests get aborted.
"""

from __future__ import annotations

import hmac
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import zmq

from moed.ipc.codec import ProtocolError, decode, encode
from moed.ipc.messages import Error, Hello, Ping, Pong, Status, StatusQuery, Welcome
from moed.ipc.runtime import process_alive, restrict_socket

MAX_MESSAGE_BYTES = 8 << 20
CLIENT_CHECK_S = 0.5  # how often the pids of connected clients are checked



@dataclass(frozen=True)
class Disconnected:
    """A client's socket went away (not a wire message)."""


class Frontend:
    """ROUTER socket <-> queues.

    Args:
        endpoint: where to bind, e.g. ipc://.../daemon.sock.
        token: the secret a client must present in Hello.
        model: name sent in Welcome.
        status: returns the latest status snapshot (called from the I/O thread).
    """

    def __init__(self, endpoint: str, token: str, model: str, status: Callable[[], dict]):
        self.endpoint, self._token, self.model, self._status = endpoint, token, model, status
        self.inbox: queue.Queue = queue.Queue()  # (client identity, message | Disconnected)
        self.clients: dict[bytes, str] = {}  # authenticated identity -> client name
        self._pids: dict[bytes, int] = {}  # authenticated identity -> client pid
        self._out: queue.Queue = queue.Queue()
        self._wake_r, self._wake_w = os.pipe()
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 500)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self._sock.bind(endpoint)
        restrict_socket(endpoint)
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
        self._sock.close()
        self._ctx.term()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # ------------------------------------------------------------------ I/O thread

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        checked = time.monotonic()
        while True:
            events = dict(poller.poll(int(CLIENT_CHECK_S * 1000)))
            if time.monotonic() - checked > CLIENT_CHECK_S:
                self._check_clients()
                checked = time.monotonic()
            if self._wake_r in events:
                os.read(self._wake_r, 4096)
            self._flush()
            if self._stop.is_set():
                return
            if self._sock in events:
                while self._sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    self._on_frames(self._sock.recv_multipart())

    def _flush(self) -> None:
        while True:
            try:
                client, msg = self._out.get_nowait()
            except queue.Empty:
                return
            self._emit(client, msg)

    def _emit(self, client: bytes, msg) -> None:
        try:
            self._sock.send_multipart([client, *encode(msg)], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the client is gone or not reading; its requests are aborted on disconnect

    def _check_clients(self) -> None:
        for client, pid in list(self._pids.items()):
            if not process_alive(pid):
                del self._pids[client]
                self.clients.pop(client, None)
                self.inbox.put((client, Disconnected()))

    def _on_frames(self, frames: list[bytes]) -> None:
        client, body = frames[0], frames[1:]
        try:
            msg = decode(body)
        except ProtocolError as e:
            self._emit(client, Error(None, "protocol", str(e)))
            return
        if isinstance(msg, Hello):
            if hmac.compare_digest(msg.token.encode(), self._token.encode()):
                self.clients[client] = f"{msg.client}:{msg.pid}"
                self._pids[client] = msg.pid
                self._emit(client, Welcome(self.model, os.getpid()))
            else:
                self._emit(client, Error(None, "unauthorized", "bad token: read it from the connection file"))
        elif client not in self.clients:
            self._emit(client, Error(getattr(msg, "req_id", None), "unauthorized", "send Hello with the token first"))
        elif isinstance(msg, Ping):
            self._emit(client, Pong(msg.seq))
        elif isinstance(msg, StatusQuery):
            self._emit(client, Status(self._status()))
        else:
            self.inbox.put((client, msg))
