"""Per-client bounds (issue 17), each a test that failed before its fix: a client's name, its request
ids, its stop strings and its requests in flight are bounded (daemon/service/frontend.ClientBounds),
each past its bound refused with a typed error naming it while every other client is served, and the
status, which lists names and ids, stays small."""

from __future__ import annotations

import json
import time

import pytest
from daemon_util import http_daemon, moed, wait_until

from moed.client.client import Client, RequestRejected
from moed.daemon.service.frontend import ClientBounds
from moed.ipc.messages import Finished, Token

PROMPT = "Once upon a time, in a land of small memories and large models,"
IN_FLIGHT = 4
BOUNDS = ClientBounds()


@pytest.fixture(scope="module")
def daemon(tiny_models, tmp_path_factory):
    runtime = tmp_path_factory.mktemp("rt")
    with http_daemon(tiny_models["qwen3_moe"], runtime, 0.5, "--max-client-requests", str(IN_FLIGHT)) as d:
        d["rt"] = str(runtime)
        with Client(d["rt"]) as c:
            d["ref"] = c.complete(PROMPT, max_tokens=8)[1]
        yield d


def served(d) -> None:
    """Another client gets the undisturbed tokens."""
    with Client(d["rt"], name="bystander") as c:
        assert c.complete(PROMPT, max_tokens=8)[1] == d["ref"]


def rejected(gen) -> RequestRejected:
    with pytest.raises(RequestRejected) as e:
        list(gen)
    return e.value


def test_a_huge_client_name_is_refused_and_the_status_stays_small(daemon):
    with pytest.raises(RequestRejected) as e:  # was: let in, and its requests swelled the status past 8 MB
        Client(daemon["rt"], name="n" * (5 << 20))
    assert e.value.code == "bad_request" and "Hello.client" in e.value.reason
    # the largest name and ids allowed, every request slot of one client taken: the status stays small
    with Client(daemon["rt"], name="n" * BOUNDS.name_chars) as c:
        gens = [c.generate(PROMPT, max_tokens=400, req_id=f"{i}" + "r" * (BOUNDS.req_id_chars - 1))
                for i in range(IN_FLIGHT)]
        assert all(isinstance(next(g), Token) for g in gens)
        out = wait_until(lambda: (o := moed(daemon["env"], "ps", "--json", timeout=30).stdout)
                         and len(json.loads(o)["requests"]) == IN_FLIGHT and o, timeout=10)  # (published every 0.5 s)
        assert len(out) < 64 << 10
        for g in gens:
            g.close()
    served(daemon)


def test_request_id_and_stop_strings_are_bounded(daemon):
    with Client(daemon["rt"]) as c:
        e = rejected(c.generate(PROMPT, max_tokens=4, req_id="r" * (1 << 20)))
        assert e.code == "bad_request" and "req_id" in e.reason
        e = rejected(c.generate(PROMPT, max_tokens=4, stop=["zq"] * 500_000))
        assert e.code == "bad_request" and "stop: 500000 strings" in e.reason
        e = rejected(c.generate(PROMPT, max_tokens=4, stop=["z" * (BOUNDS.stop_chars + 1)]))
        assert e.code == "bad_request" and "stop" in e.reason
        ok = list(c.generate(PROMPT, max_tokens=4, stop=["zq"] * BOUNDS.stop_strings))  # at the bound: served
        assert isinstance(ok[-1], Finished) and ok[-1].completion_tokens == 4
    served(daemon)


def test_requests_in_flight_per_client_are_bounded(daemon):
    with Client(daemon["rt"], name="greedy") as c:
        gens = [c.generate(PROMPT, max_tokens=400) for _ in range(IN_FLIGHT)]
        assert all(isinstance(next(g), Token) for g in gens)
        e = rejected(c.generate(PROMPT, max_tokens=4))  # was: queued behind them, up to --max-queue
        assert e.code == "rejected" and "--max-client-requests" in e.reason
        served(daemon)  # another client is not held to this one's bound
        for g in gens[1:]:
            g.close()  # aborted: their ends free this client's slots
        for _ in range(100):  # (the aborts' ends reach the frontend a moment later)
            try:
                ids = c.complete(PROMPT, max_tokens=8)[1]
                break
            except RequestRejected as e:
                assert e.code == "rejected"
                time.sleep(0.05)
        assert ids == daemon["ref"]
        gens[0].close()
    assert moed(daemon["env"], "ps", "--json").returncode == 0


def test_ten_thousand_requests_sent_without_reading_are_each_answered(daemon):
    """The finding: 10,000 requests sent without reading, 8,009 never answered (neither a result nor
    a rejection). A client that reads only once it has sent them all gets one terminal message per
    request: its tokens and Finished, or a typed rejection (`rejected` past --max-client-requests,
    `rate_limited` past the message rate); and the daemon serves others meanwhile."""
    import os

    import zmq

    from moed.ipc.codec import decode, encode
    from moed.ipc.connection import daemon_files, read_connection
    from moed.ipc.messages import Error, Generate, Hello, Welcome

    info = read_connection(daemon_files(daemon["rt"]))
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVHWM, 0)  # the answers wait here, however many
    s.connect(info["endpoint"])
    try:
        s.send_multipart(encode(Hello(info["token"], "unread", os.getpid())))
        assert isinstance(decode(s.recv_multipart()), Welcome)
        n = 10_000
        for i in range(n):
            s.send_multipart(encode(Generate(f"q{i}", prompt=PROMPT, max_tokens=1)))
        served(daemon)
        ends: dict[str, object] = {}
        while len(ends) < n and s.poll(10_000):
            m = decode(s.recv_multipart())
            if isinstance(m, (Finished, Error)):
                assert m.req_id not in ends, m
                ends[m.req_id] = m
        assert len(ends) == n, f"{n - len(ends)} requests never answered"
        codes = {m.code for m in ends.values() if isinstance(m, Error)}
        assert codes <= {"rejected", "rate_limited"} and any(isinstance(m, Finished) for m in ends.values())
    finally:
        s.close(0)
