"""The client library: attach to the running daemon, stream generations, ask for status.

    from moed.client import Client
    with Client() as c:
        for ev in c.generate("Hello", max_tokens=32):
            print(ev.text, end="")

Imports only `moed.ipc` (no MLX). A Client is one DEALER socket: use it from one thread; open
one per thread or use AsyncClient. A dead daemon raises DaemonDied within ~2 s, never a hang.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import time
import uuid
from collections import defaultdict, deque
from typing import AsyncIterator, Iterator

import zmq
import zmq.asyncio

from moed.ipc.codec import ProtocolError, decode, encode
from moed.ipc.connection import daemon_files, read_connection
from moed.ipc.messages import (PROTOCOL_VERSION, Abort, DaemonStatus, Error, Finished, Generate, Hello, Ping, Pong,
                               Status, StatusQuery, StopDaemon, Token, Welcome)
from moed.ipc.runtime import process_alive
from moed.ipc.streams import CutStreams

POLL_S = 0.2  # how often a waiting client checks the daemon is alive
PING_AFTER_S = 0.5  # silence before the client pings
DEAD_AFTER_S = 2.0  # silence (no answer to pings) after which the daemon is declared dead
STREAM_QUEUE = 4096  # AsyncClient: a stream's events held for a consumer that does not read (AsyncClient._route)


class MoedError(Exception):
    """Base of moed's client errors."""


class DaemonNotRunning(MoedError):
    """No daemon to attach to."""


class DaemonDied(MoedError):
    """The daemon went away while this client was waiting on it."""


class ProtocolMismatch(MoedError):
    """The running daemon speaks another version of the protocol (moed was upgraded under it)."""


class RequestRejected(MoedError):
    """The daemon refused or failed a request; `code` says why (rejected, bad_request, ...)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.reason = code, message


def _connection(runtime_dir) -> dict:
    files = daemon_files(runtime_dir)
    info = read_connection(files)
    if info is None:
        raise DaemonNotRunning(f"no moed daemon is running (no live {files.connection}); start one with `moed start`")
    return info


def _request(req_id, prompt, messages, max_tokens, temperature, top_p, seed, stop, options: dict) -> Generate:
    """A Generate; `options` are its other fields by name (top_k, logprobs, grammar, tools, ...)."""
    unknown = set(options) - {f.name for f in dataclasses.fields(Generate)}
    if unknown:
        raise TypeError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
    return Generate(req_id or uuid.uuid4().hex[:12], prompt=prompt, messages=messages, max_tokens=max_tokens,
                    temperature=float(temperature), top_p=float(top_p), seed=seed, stop=stop, **options)


def _raise_error(msg: Error):
    raise RequestRejected(msg.code, msg.message)


def _check_welcome(reply: Welcome) -> None:
    """A daemon of another protocol version would send messages this client cannot read: say so now."""
    if reply.version != PROTOCOL_VERSION:
        raise ProtocolMismatch(f"the running moed daemon (pid {reply.daemon_pid}) speaks protocol {reply.version}, "
                               f"this client {PROTOCOL_VERSION}: restart it (moed stop; moed start ...)")


def _ends_stream(msg) -> bool:
    """True for a stream's Finished; raises for its Error (or a DaemonDied passed along)."""
    if isinstance(msg, BaseException):
        raise msg
    if isinstance(msg, Error):
        _raise_error(msg)
    return isinstance(msg, Finished)


class _Liveness:
    """Paranoid-Pirate style: any message resets it; silence sends pings, then declares death."""

    def __init__(self, pid: int):
        self.pid = pid
        self.last_heard = time.monotonic()
        self.seq = itertools.count()

    def heard(self) -> None:
        self.last_heard = time.monotonic()

    def check(self) -> bool:
        """Raise DaemonDied if dead; True if a ping should be sent now."""
        silent = time.monotonic() - self.last_heard
        if not process_alive(self.pid) or silent > DEAD_AFTER_S:
            raise DaemonDied(f"the moed daemon (pid {self.pid}) died")
        return silent > PING_AFTER_S


class Client:
    """A synchronous client of the running daemon.

    Args:
        runtime_dir: where the daemon's connection file is (default: the per-user runtime dir).
        name: shown by `moed ps` next to this client's requests.
    """

    def __init__(self, runtime_dir: str | None = None, name: str = "python"):
        info = _connection(runtime_dir)
        self.info = info
        self._live = _Liveness(int(info["pid"]))
        self._sock = zmq.Context.instance().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._linger = 0  # ms close() waits for unsent messages
        self._call_ids = itertools.count()
        self._sock.connect(info["endpoint"])
        self._mail: dict[str | None, deque] = defaultdict(deque)
        self._send(Hello(info["token"], name, os.getpid()))
        reply = self._next(lambda m: isinstance(m, (Welcome, Error)) and getattr(m, "req_id", None) is None)
        if isinstance(reply, Error):
            self.close()
            _raise_error(reply)
        if reply.version != PROTOCOL_VERSION:
            self.close()
            _check_welcome(reply)
        self.model = reply.model

    # ------------------------------------------------------------------ plumbing

    def _send(self, msg) -> None:
        self._sock.send_multipart(encode(msg), copy=False)

    def _next(self, want, timeout: float | None = None):
        """The next message satisfying `want`, keeping others for later readers."""
        for key, box in self._mail.items():
            for i, m in enumerate(box):
                if want(m):
                    del box[i]
                    return m
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._sock.poll(int(POLL_S * 1000)):
                try:
                    msg = decode(self._sock.recv_multipart())
                except ProtocolError:
                    continue
                self._live.heard()
                if isinstance(msg, Pong):
                    continue
                if want(msg):
                    return msg
                self._mail[getattr(msg, "req_id", None)].append(msg)
            else:
                if self._live.check():
                    self._send(Ping(next(self._live.seq)))
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("no answer from the moed daemon")

    # ------------------------------------------------------------------ API

    def generate(self, prompt: str | None = None, *, messages: list[dict] | None = None, max_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 0.0, seed: int | None = None,
                 stop: list[str] | None = None, req_id: str | None = None, **options) -> Iterator[Token | Finished]:
        """Stream a completion: Token events, then one Finished. Closing the iterator aborts it.
        `options`: any other Generate field (top_k, logprobs, grammar, tools, cache_prompt, ...)."""
        req = _request(req_id, prompt, messages, max_tokens, temperature, top_p, seed, stop, options)
        self._send(req)
        done = False
        try:
            while not done:
                msg = self._next(lambda m: getattr(m, "req_id", None) == req.req_id)
                done = _ends_stream(msg)
                yield msg
        finally:
            if not done:  # closed early, or failed: make sure the daemon stops it
                self._send(Abort(req.req_id))

    def chat(self, messages: list[dict], **kw) -> Iterator[Token | Finished]:
        """Like generate, with the model's chat template applied to `messages`."""
        return self.generate(messages=messages, **kw)

    def complete(self, prompt: str | None = None, **kw) -> tuple[str, list[int], Finished]:
        """Run a generation to the end: (text, token ids, Finished)."""
        text, ids, fin = "", [], None
        for ev in self.generate(prompt, **kw):
            if isinstance(ev, Token):
                text += ev.text
                ids.append(ev.token)
            else:
                fin = ev
        return text, ids, fin

    def status(self) -> DaemonStatus:
        """The daemon's status snapshot; raises RequestRejected if it refused the query (rate_limited)."""
        call = f"status-{next(self._call_ids)}"
        self._send(StatusQuery(call))
        reply = self._next(lambda m: isinstance(m, (Status, Error)) and m.req_id == call)
        if isinstance(reply, Error):
            _raise_error(reply)
        return reply.snapshot

    def abort(self, req_id: str) -> None:
        self._send(Abort(req_id))

    def stop_daemon(self) -> None:
        """Ask the daemon to shut down (streams end with reason "shutdown")."""
        self._send(StopDaemon())
        self._linger = 1000  # a close right after must not drop it unsent

    def close(self) -> None:
        self._sock.close(self._linger)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncClient:
    """The asyncio variant of Client (same protocol, same errors).

    One connection, used by one event loop (its socket belongs to the loop that connected it);
    any number of coroutines of that loop may generate and ask for status at once: every call has
    its own id and its own queue or future, filled by one reader task.
    """

    def __init__(self, runtime_dir: str | None = None, name: str = "python-async"):
        self.info = _connection(runtime_dir)
        self._name = name
        self._live = _Liveness(int(self.info["pid"]))
        self._ctx = zmq.asyncio.Context.instance()
        self._sock = None
        self._queues: dict[str, asyncio.Queue] = {}  # generate's req_id -> its events
        self._cut = CutStreams(f"{STREAM_QUEUE} events")  # streams aborted: their consumer did not read
        self._welcome: asyncio.Future | None = None
        self._calls: dict[str, asyncio.Future] = {}  # status query id -> its answer
        self._call_ids = itertools.count()
        self._reader: asyncio.Task | None = None
        self._died: DaemonDied | None = None  # set by the reader when the daemon went away
        self.model = None

    async def connect(self) -> "AsyncClient":
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self.info["endpoint"])
        welcome = self._welcome = asyncio.get_running_loop().create_future()
        await self._send(Hello(self.info["token"], self._name, os.getpid()))
        self._reader = asyncio.create_task(self._read())
        reply = await welcome
        if isinstance(reply, Error):
            await self.close()
            _raise_error(reply)
        if reply.version != PROTOCOL_VERSION:
            await self.close()
            _check_welcome(reply)
        self.model = reply.model
        return self

    async def _send(self, msg) -> None:
        await self._sock.send_multipart(encode(msg))

    async def _read(self) -> None:
        """Route incoming messages to per-request queues; declare death on silence."""
        try:
            while True:
                if await self._sock.poll(int(POLL_S * 1000)):
                    try:
                        msg = decode(await self._sock.recv_multipart())
                    except ProtocolError:
                        continue
                    self._live.heard()
                    if (abort := self._route(msg)) is not None:
                        await self._send(abort)
                elif self._live.check():
                    await self._send(Ping(next(self._live.seq)))
        except DaemonDied as e:
            self._died = e
            for q in self._queues.values():
                q.put_nowait(e)
            for fut in [self._welcome, *self._calls.values()]:
                if fut is not None and not fut.done():
                    fut.set_exception(e)

    def _route(self, msg) -> Abort | None:
        """One incoming message to the call waiting for it (a late answer to a cancelled call is dropped).

        The reader takes every message off the socket, so the daemon never sees a consumer that stops
        reading (an HTTP client that hangs without closing): its stream is bounded here as the frontend
        bounds a socket (ipc/streams.py): a Token that finds its queue at STREAM_QUEUE cuts the stream,
        and the request's Abort is returned for the reader to send.
        """
        rid = getattr(msg, "req_id", None)
        if rid is None:
            if isinstance(msg, (Welcome, Error)) and self._welcome and not self._welcome.done():
                self._welcome.set_result(msg)
        elif isinstance(msg, Status) or rid not in self._queues:
            fut = self._calls.pop(rid, None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        else:
            q = self._queues[rid]
            if isinstance(msg, Token) and rid not in self._cut and q.qsize() >= STREAM_QUEUE:
                self._cut.cut(rid)
                return Abort(rid)
            if (msg := self._cut.settle(msg)) is not None:
                q.put_nowait(msg)
        return None

    async def generate(self, prompt: str | None = None, *, messages: list[dict] | None = None,
                       max_tokens: int = 256, temperature: float = 0.0, top_p: float = 0.0,
                       seed: int | None = None, stop: list[str] | None = None,
                       req_id: str | None = None, **options) -> AsyncIterator[Token | Finished]:
        req = _request(req_id, prompt, messages, max_tokens, temperature, top_p, seed, stop, options)
        if self._died:
            raise self._died
        q = self._queues[req.req_id] = asyncio.Queue()
        await self._send(req)
        done = False
        try:
            while not done:
                msg = await q.get()
                done = _ends_stream(msg)
                yield msg
        finally:
            self._queues.pop(req.req_id, None)
            self._cut.forget(req.req_id)
            if not done:
                await self._send(Abort(req.req_id))

    async def status(self) -> DaemonStatus:
        """The daemon's status snapshot; concurrent calls each get their own answer."""
        if self._died:
            raise self._died
        call = f"status-{next(self._call_ids)}"
        fut = self._calls[call] = asyncio.get_running_loop().create_future()
        try:
            await self._send(StatusQuery(call))
            reply = await fut
        finally:
            self._calls.pop(call, None)
        if isinstance(reply, Error):
            _raise_error(reply)
        return reply.snapshot

    async def close(self) -> None:
        if self._reader:
            self._reader.cancel()
        if self._sock is not None:
            self._sock.close(0)
