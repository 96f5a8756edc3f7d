"""The daemon's client socket in process: a real Frontend (ROUTER, monitor, I/O thread) and real
DEALER sockets. Clients whose socket closes while their process lives are forgotten and their
requests aborted; what a connection sent just before closing is still handled; input and output
interleave under a flood; one client's message rate is bounded with a typed rejection."""

from __future__ import annotations

import os
import queue
import threading
import time

import pytest
import zmq

from moed.daemon.service import frontend as fe
from moed.ipc.codec import decode, encode
from moed.ipc.messages import Abort, Error, Generate, Hello, Ping, Pong, StopDaemon, Welcome

from tests.daemon_util import wait_until


@pytest.fixture
def front(tmp_path):
    stops = threading.Event()
    f = fe.Frontend(f"ipc://{tmp_path}/fe.sock", "tok", "m", lambda: None, on_stop=stops.set).start()
    f.stops = stops
    yield f
    f.close()


def dealer(front, hello: bool = True, linger: int = 0) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, linger)
    s.connect(front.endpoint)
    if hello:
        s.send_multipart(encode(Hello("tok", "t", os.getpid())))
        assert isinstance(decode(s.recv_multipart()), Welcome)
    return s


def inbox(front, timeout: float = 5):
    try:
        return front.inbox.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError("nothing reached the engine") from None


def gone(front) -> bool:
    """Nothing of any peer is left in the frontend's tables."""
    return not (front.clients or front._pids or front._in_flight or front._buckets or front._fd
                or front._peers or front._closing)


def test_a_client_whose_socket_closes_has_its_requests_aborted_and_is_forgotten(front):
    """Its process lives on (this one): only the socket says it is gone."""
    s = dealer(front)
    (client,) = front.clients
    s.send_multipart(encode(Generate("r1", prompt="hi", max_tokens=100)))
    assert inbox(front) == (client, Generate("r1", prompt="hi", max_tokens=100))
    s.close(0)
    who, msg = inbox(front, timeout=2)
    assert who == client and isinstance(msg, fe.Disconnected)  # the engine aborts its requests
    wait_until(lambda: gone(front), timeout=2)


def test_500_hello_and_close_leave_no_client_behind(front):
    """The finding: 501 clients never forgotten. Half read their Welcome, half close at once."""
    for i in range(500):
        if i % 2:
            s = dealer(front)
        else:
            s = dealer(front, hello=False, linger=1000)  # delivered, then closed before any reply
            s.send_multipart(encode(Hello("tok", "t", os.getpid())))
        s.close()
    wait_until(lambda: gone(front), timeout=5)


def test_a_stop_sent_right_before_close_is_handled(front):
    """A message read after its connection's DISCONNECTED event is still its client's (moed stop)."""
    for _ in range(20):
        front.stops.clear()
        s = dealer(front, linger=1000)
        s.send_multipart(encode(StopDaemon()))
        s.close()
        assert front.stops.wait(2)
    wait_until(lambda: gone(front), timeout=2)


def test_an_abort_of_nothing_running_never_reaches_the_engine(front):
    s = dealer(front)
    try:
        (client,) = front.clients
        for i in range(100):
            s.send_multipart(encode(Abort(f"x{i}")))
        s.send_multipart(encode(Generate("r", prompt="hi", max_tokens=4)))
        s.send_multipart(encode(Abort("r")))
        assert inbox(front)[1].req_id == "r"
        assert inbox(front) == (client, Abort("r"))  # only the Abort of a running request
    finally:
        s.close(0)


def test_the_message_rate_of_one_client_is_bounded_and_every_message_answered(front):
    b = front.bounds
    s = dealer(front)
    try:
        n = b.burst + 500
        for i in range(n):
            s.send_multipart(encode(Ping(i)))
        got = []
        while len(got) < n and s.poll(2000):
            got.append(decode(s.recv_multipart()))
        pongs = [m for m in got if isinstance(m, Pong)]
        limited = [m for m in got if isinstance(m, Error)]
        assert len(got) == n and len(pongs) + len(limited) == n  # each one answered
        assert b.burst <= len(pongs) < n and limited and {e.code for e in limited} == {"rate_limited"}
        assert "a second" in limited[0].message
        other = dealer(front)  # another client has a bucket of its own
        other.send_multipart(encode(Ping(7)))
        assert decode(other.recv_multipart()) == Pong(7)
        other.close(0)
    finally:
        s.close(0)


def test_a_flood_of_input_does_not_hold_back_another_clients_output(front, monkeypatch):
    """The finding: a ping flood stalled another stream 4.5 s (all input was read before any send).
    The flooder is exempt from the rate bound here, so every one of its messages costs a reply."""
    monkeypatch.setattr(front, "bounds", fe.ClientBounds(rate=1e9, burst=10 ** 9))
    flooder, reader = dealer(front), dealer(front)
    flooder.setsockopt(zmq.SNDHWM, 0)
    stop = threading.Event()

    def flood():
        i = 0
        while not stop.is_set():
            flooder.send_multipart(encode(Ping(i)))
            i += 1
            if i % 5000 == 0:  # it reads its pongs now and then, so it is never dropped as too slow
                while flooder.poll(0):
                    flooder.recv_multipart()

    t = threading.Thread(target=flood)
    t.start()
    try:
        time.sleep(0.3)
        worst = 0.0
        for i in range(50):
            t0 = time.monotonic()
            for c in front.clients:
                front.send(c, Pong(1000 + i))
            while True:  # the reader's own pong (the flooder drains its own)
                assert reader.poll(5000), "no reply within 5 s"
                if decode(reader.recv_multipart()) == Pong(1000 + i):
                    break
            worst = max(worst, time.monotonic() - t0)
            time.sleep(0.02)
    finally:
        stop.set()
        t.join()
        flooder.close(0)
        reader.close(0)
    assert worst < 1.0, f"another client waited {worst:.2f} s for its message"
