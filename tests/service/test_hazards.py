"""Hazards found by reading, each fixed and held here by a test that failed before the fix:
signal-safe shutdown, per-call status answers, a bounded per-client outbound queue, tracebacks of
failed steps in the log, lockstep failures raised, and I/O workers that die while the daemon is idle."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import httpx
import psutil
import pytest
import zmq
from daemon_util import CLI, env_for, status, wait_until
from daemon_util import http_daemon as start_http_daemon

from moed.client.client import AsyncClient, Client, RequestRejected
from moed.daemon.dist.lockstep import LockstepCore, RankFailed, follow
from moed.daemon.dist.ranks import RankLink
from moed.daemon.engine.core import EngineCore
from moed.daemon.engine.loader import load_paged
from moed.daemon.io.fetcher import Fetcher
from moed.ipc.codec import decode, encode
from moed.ipc.connection import daemon_files, read_connection
from moed.ipc.messages import Abort, Error, Finished, Generate, Hello, RankPlan, Token, Welcome

PROMPT = "Once upon a time, in a land of small memories and large models,"


def plain(snap) -> dict:
    """A status snapshot as plain data (what `moed ps --json` prints)."""
    return snap if isinstance(snap, dict) else dataclasses.asdict(snap)


def state_of(snap) -> str:
    return plain(snap)["state"]


def foreground_daemon(model, runtime, *, script: str | None = None) -> subprocess.Popen:
    """`moed daemon` in the foreground (its own session), or `script` run with the same argv."""
    argv = [sys.executable, "-c", script, "daemon", "--model", str(model)] if script else \
        [*CLI, "daemon", "--model", str(model)]
    return subprocess.Popen(argv, env=env_for(runtime), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def wait_ready(proc: subprocess.Popen, runtime) -> None:
    wait_until(lambda: proc.poll() is not None or (runtime / "daemon.json").exists(), timeout=60)
    assert proc.poll() is None, proc.stdout.read()
    with Client(str(runtime)) as c:
        wait_until(lambda: state_of(c.status()) == "ready", timeout=60)


def exit_code(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


@pytest.fixture(scope="module")
def http_daemon(tiny_models, tmp_path_factory):
    """A daemon on tiny qwen3_moe with HTTP (`moed start`), stopped and checked after."""
    with start_http_daemon(tiny_models["qwen3_moe"], tmp_path_factory.mktemp("rt"), 0.5) as d:
        yield d


# --- 1. signals only set a flag and wake the loop -------------------------------------------------

# Runs the real daemon; SIGUSR1 turns on a tracer that delivers a real SIGTERM/SIGINT at lines of
# queue.py and threading.py (where a Python-level lock is held) and of the handler itself: a
# handler that takes such a lock (queue.Queue.put, Event.set) deadlocks there.
TRACED = textwrap.dedent("""
    import signal, sys
    fired = [0]
    def local(frame, event, arg):
        if event == "line" and fired[0] < 40:
            fired[0] += 1
            signal.raise_signal(signal.SIGTERM if fired[0] % 2 else signal.SIGINT)
        return local
    def hook(frame, event, arg):
        f = frame.f_code.co_filename
        if f.endswith(("/queue.py", "/threading.py")) or frame.f_code.co_name in ("stop", "_on_signal", "<lambda>"):
            return local
        return None
    signal.signal(signal.SIGUSR1, lambda *_: sys.settrace(hook))
    from moed.client.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_signals_inside_locked_code_stop_the_daemon(tiny_models, tmp_path):
    runtime = tmp_path / "rt"
    proc = foreground_daemon(tiny_models["qwen3_moe"], runtime, script=TRACED)
    try:
        wait_ready(proc, runtime)
        os.kill(proc.pid, signal.SIGUSR1)  # signals now land inside the loop's lock-holding code
        rc = exit_code(proc, 3)
        if rc is None:  # the loop touched no such code: a plain signal must stop it as well
            os.kill(proc.pid, signal.SIGTERM)
            rc = exit_code(proc, 15)
        assert rc == 0, f"daemon did not stop cleanly (rc {rc}):\n{proc.stdout.read() if rc is not None else ''}"
        assert "[moed] stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_hammered_with_sigterm_and_sigint_stops_promptly_with_0(tiny_models, tmp_path):
    runtime = tmp_path / "rt"
    proc = foreground_daemon(tiny_models["qwen3_moe"], runtime)
    try:
        wait_ready(proc, runtime)
        t0 = time.monotonic()
        n = 0
        while time.monotonic() - t0 < 1.0 and proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM if n % 2 else signal.SIGINT)
            n += 1
        rc = exit_code(proc, 15)
        out = proc.stdout.read() if rc is not None else ""
        assert rc == 0, f"rc {rc} after {n} signals:\n{out[-3000:]}"
        assert time.monotonic() - t0 < 16 and "[moed] stopped" in out and "Traceback" not in out
        assert not (runtime / "daemon.json").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- 2. status calls each get their own answer ---------------------------------------------------


def test_concurrent_health_and_metrics_all_answer(http_daemon):
    """3 x 50 at once over kept-alive connections while the engine decodes (so the status queries
    overlap): each gets its own answer."""
    stop = threading.Event()

    def decode_meanwhile():
        with Client(str(http_daemon["runtime"])) as c:
            while not stop.is_set():
                c.complete(PROMPT, max_tokens=32)

    async def main():
        replies = []
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_daemon['port']}", timeout=10) as h:
            for _ in range(3):
                replies += await asyncio.gather(*[h.get("/health" if i % 2 else "/metrics") for i in range(50)])
        return replies

    busy = threading.Thread(target=decode_meanwhile)
    busy.start()
    try:
        time.sleep(0.3)
        replies = asyncio.run(main())
    finally:
        stop.set()
        busy.join()
    assert [r.status_code for r in replies] == [200] * 150
    for i, r in enumerate(replies):
        if i % 2:
            assert r.json()["status"] == "ready"
        else:
            assert "moed_up 1" in r.text


def test_concurrent_async_status_calls_all_return(http_daemon):
    async def main():
        c = await AsyncClient(str(http_daemon["runtime"])).connect()
        try:
            snaps = await asyncio.wait_for(asyncio.gather(*[c.status() for _ in range(40)]), 20)
            # and alongside a generation on the same connection
            gen = [ev async for ev in c.generate(PROMPT, max_tokens=8)]
            return snaps, gen
        finally:
            await c.close()

    snaps, gen = asyncio.run(main())
    assert len(snaps) == 40 and all(state_of(s) == "ready" for s in snaps)
    assert isinstance(gen[-1], Finished) and gen[-1].completion_tokens == 8


def test_an_async_stream_nobody_reads_is_aborted_and_ends_too_slow(http_daemon, monkeypatch):
    """The AsyncClient takes every message off its socket, so the daemon never sees a consumer that
    stops reading (an HTTP client that hangs without closing): the client bounds each stream itself,
    aborts the request and ends the stream with the reason, after the tokens it kept, in order."""
    from moed.client import client as client_module

    monkeypatch.setattr(client_module, "STREAM_QUEUE", 8)

    async def main():
        c = await AsyncClient(str(http_daemon["runtime"])).connect()
        try:
            aborted = plain(await c.status())["totals"]["aborted"]
            unread = c.generate(PROMPT, max_tokens=5000, req_id="unread")
            first = await unread.__anext__()
            other = [ev async for ev in c.generate(PROMPT, max_tokens=48)]  # the same connection, served
            deadline = time.monotonic() + 60
            while True:  # the daemon is told: the request is aborted, not run to its 5000 tokens
                snap = plain(await c.status())
                if snap["totals"]["aborted"] > aborted and not [r for r in snap["requests"]
                                                                 if r["id"].endswith(":unread")]:
                    break
                assert time.monotonic() < deadline, snap["requests"]
                await asyncio.sleep(0.1)
            kept = []
            with pytest.raises(RequestRejected) as end:
                async for ev in unread:
                    kept.append(ev)
            return first, kept, other, end.value
        finally:
            await c.close()

    first, kept, other, end = asyncio.run(main())
    assert isinstance(other[-1], Finished) and other[-1].completion_tokens == 48
    assert end.code == "too_slow" and "aborted" in end.reason, end
    assert all(isinstance(t, Token) for t in kept) and len(kept) == 8  # what the queue held, then the reason
    assert [t.index for t in [first, *kept]] == list(range(9))


def test_http_api_makes_one_native_connection_per_event_loop(http_daemon):
    from moed.daemon.service.http import Api

    api = Api(http_daemon["runtime"], None)

    async def main():
        clients = await asyncio.wait_for(asyncio.gather(*[api.native() for _ in range(20)]), 20)
        try:
            snaps = await asyncio.wait_for(asyncio.gather(*[c.status() for c in clients]), 20)
        finally:
            for c in set(clients):
                await c.close()
        return clients, snaps

    first, snaps = asyncio.run(main())  # the first requests come together: still one connection
    second, _ = asyncio.run(main())  # another event loop: a connection of its own
    assert len({id(c) for c in first}) == 1 and len({id(c) for c in second}) == 1
    assert first[0] is not second[0] and all(state_of(s) == "ready" for s in snaps)


# --- 3. a client that stops reading: bounded queue, its stream ends with a reason ----------------

SMALL_QUEUES = textwrap.dedent("""
    import sys
    from moed.daemon.service import frontend
    frontend.SNDHWM, frontend.SNDBUF, frontend.CLIENT_QUEUE = 8, 4096, 16
    from moed.client.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_client_that_stops_reading_gets_a_terminal_error_others_unaffected(tiny_models, tmp_path):
    model = tiny_models["qwen3_moe"]
    runtime = tmp_path / "rt"
    proc = foreground_daemon(model, runtime, script=SMALL_QUEUES)
    slow = zmq.Context.instance().socket(zmq.DEALER)
    try:
        wait_ready(proc, runtime)
        with Client(str(runtime)) as c:
            ref = c.complete(PROMPT, max_tokens=48)[1]
        info = read_connection(daemon_files(runtime))
        slow.setsockopt(zmq.LINGER, 0)
        slow.setsockopt(zmq.RCVHWM, 1)
        slow.setsockopt(zmq.RCVBUF, 4096)
        slow.connect(info["endpoint"])
        slow.send_multipart(encode(Hello(info["token"], "slow", os.getpid())))
        assert isinstance(decode(slow.recv_multipart()), Welcome)
        slow.send_multipart(encode(Generate("slow", prompt=PROMPT, max_tokens=20000)))

        with Client(str(runtime)) as other:  # meanwhile another client gets every token
            def slow_request_gone():  # aborted by the daemon, not run to its 20000 tokens
                snap = plain(other.status())
                return snap["totals"]["aborted"] >= 1 and not [r for r in snap["requests"] if r["id"].endswith(":slow")]

            assert other.complete(PROMPT, max_tokens=48)[1] == ref
            wait_until(slow_request_gone, timeout=90, every=0.2)
            assert other.complete(PROMPT, max_tokens=48)[1] == ref

        events = []  # now it reads: the tokens it was sent, in order, then the reason
        while slow.poll(5000):
            events.append(decode(slow.recv_multipart()))
            if isinstance(events[-1], (Finished, Error)):
                break
        tokens, end = events[:-1], events[-1] if events else None
        assert isinstance(end, Error) and end.code == "too_slow" and end.req_id == "slow", end
        assert all(isinstance(t, Token) for t in tokens) and [t.index for t in tokens] == list(range(len(tokens)))
        assert 0 < len(tokens) < 20000 and [t.token for t in tokens[:48]] == ref[:len(tokens)]
        assert not slow.poll(300)  # nothing after the end
    finally:
        slow.close(0)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            if exit_code(proc, 30) is None:
                proc.kill()
                proc.wait()


def test_frontend_bounds_a_client_queue_and_ends_its_stream_with_a_reason(tmp_path, monkeypatch):
    """In-process: a real Frontend and a DEALER that stops reading, then reads, then reads again."""
    from moed.daemon.service import frontend as fe

    monkeypatch.setattr(fe, "SNDHWM", 8)
    monkeypatch.setattr(fe, "SNDBUF", 4096)
    front = fe.Frontend(f"ipc://{tmp_path}/fe.sock", "tok", "m", lambda: None).start()
    front.client_queue = 16
    sock = zmq.Context.instance().socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 1)
        sock.setsockopt(zmq.RCVBUF, 4096)
        sock.connect(front.endpoint)
        sock.send_multipart(encode(Hello("tok", "slow", os.getpid())))
        assert isinstance(decode(sock.recv_multipart()), Welcome)
        (client,) = front.clients
        for i in range(5000):  # the engine streams; the client does not read
            front.send(client, Token("a", "x", 7, i))
        who, msg = front.inbox.get(timeout=5)  # the frontend asks the engine to stop it, by name
        assert who == client and msg == Abort("a")

        def read_all(wait_ms=300):
            got = []
            while sock.poll(wait_ms):
                got.append(decode(sock.recv_multipart()))
            return got

        got = read_all()  # it reads again: what was sent, in order, no hole...
        assert got and [t.index for t in got] == list(range(len(got))) and len(got) < 5000
        front.send(client, Token("a", "x", 7, 4999))  # ...and no later token of that stream
        front.send(client, Finished("a", "abort", 3, 5000, 0.0, 0.0))  # the engine's answer to the Abort
        front.send(client, Token("b", "y", 8, 0))  # another request of the same client is unaffected
        rest = read_all()
        assert [type(m) for m in rest] == [Error, Token], rest
        assert rest[0].req_id == "a" and rest[0].code == "too_slow" and "aborted" in rest[0].message
        assert rest[1] == Token("b", "y", 8, 0)
    finally:
        sock.close(0)
        front.close()


# --- 4, 5. a failed step: the traceback in the log, lockstep raises --------------------------------


@pytest.fixture(scope="module")
def broken(tiny_models, tmp_path_factory):
    """A paged tiny qwen3_moe with an empty cache whose biggest shard is then truncated."""
    model = tmp_path_factory.mktemp("broken") / "model"
    shutil.copytree(tiny_models["qwen3_moe"], model)
    with load_paged(model, cache_fraction=0.3, warm=False) as pm:
        victim = max(model.glob("model-*.safetensors"), key=lambda p: p.stat().st_size)
        os.truncate(victim, victim.stat().st_size // 3)
        yield pm


def new_core(pm) -> EngineCore:
    return EngineCore(pm.model, pm.tokenizer, max_batch=2, max_queue=4, context=256)


def test_failed_step_sends_short_error_and_logs_traceback(broken, caplog):
    core = new_core(broken)
    core.add(Generate("r", prompt=PROMPT, max_tokens=8))
    with caplog.at_level(logging.ERROR):
        events = core.step()
    assert [type(e) for e in events] == [Error] and events[0].code == "internal"
    assert "Traceback" not in events[0].message  # users get the short typed error
    assert "Traceback (most recent call last)" in caplog.text  # operators get the cause
    assert "fetcher.py" in caplog.text and "ReadError" in caplog.text
    assert not core.has_work()


class Rank1Link:
    """The rank-link interface as rank 1 of a group sees it: rank 0's plans, in order."""

    rank, size = 1, 2

    def __init__(self, plans: list[RankPlan]):
        self.plans = list(plans)

    def broadcast(self, msg=None) -> RankPlan:
        return decode(encode(self.plans.pop(0)))

    def gather(self, msg) -> list:
        return [msg, msg]


def test_lockstep_step_failure_is_raised_with_its_cause(broken):
    import mlx.core as mx

    core = LockstepCore(new_core(broken), RankLink(mx.distributed.init()), broken)  # a group of one
    core.add(Generate("r", prompt=PROMPT, max_tokens=8))
    with pytest.raises(RankFailed) as e:
        core.step()
    assert [ev.req_id for ev in e.value.events] == ["r"] and e.value.events[0].code == "internal"
    cause = e.value.__cause__  # the failure is raised from the step, not inferred from a counter
    assert cause is not None and "ReadError" in repr(cause.__cause__)


def test_follower_step_failure_is_raised_with_its_cause(broken):
    g = Generate("r", prompt=PROMPT, max_tokens=8)
    add = ["add", [getattr(g, f) for f in g.__dataclass_fields__], "test"]
    link = Rank1Link([RankPlan([add], step=True), RankPlan([], stop=True)])
    with pytest.raises(RankFailed) as e:
        follow(new_core(broken), link, broken)
    assert "rank 1" in str(e.value) and broken.model is not None
    assert e.value.__cause__ is not None and "ReadError" in repr(e.value.__cause__.__cause__)
    assert "safetensors" in str(e.value)  # the reason travels, not just "a step failed"


# --- 6. an I/O worker that dies while the daemon is idle -----------------------------------------


def test_fetcher_poll_replaces_idle_dead_worker_and_counts_it(tmp_path):
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(1 << 20))
    with Fetcher([str(data)], workers=2, runtime_dir=tmp_path) as f:
        victim = f.pids[0]
        os.kill(victim, signal.SIGKILL)

        def replaced():
            f.poll()
            s = f.worker_states()[0]
            return s["pid"] != victim and s["alive"] and s["ready"]

        wait_until(replaced, timeout=2)
        assert not psutil.pid_exists(victim)  # reaped, not a zombie
        assert bytes(f.read([(0, 100, 5000)])[0]) == data.read_bytes()[100:5100]
        assert [s["restarts"] for s in f.worker_states()] == [1, 0]  # still 1 after the read
        assert f.stats.respawns == 1


def test_idle_daemon_replaces_a_killed_worker_within_2s(http_daemon):
    c = Client(str(http_daemon["runtime"]))
    try:
        before = plain(c.status())
        victim = before["workers"][0]["pid"]
        assert before["workers"][0]["restarts"] == 0
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()

        def replaced():
            w = plain(c.status())["workers"][0]
            return w if w["pid"] != victim and w["alive"] and w["ready"] else None

        w = wait_until(replaced, timeout=3, every=0.05)
        assert time.monotonic() - t0 < 2.0  # noticed, replaced and connected while idle
        assert not psutil.pid_exists(victim)  # reaped, not left a zombie
        assert w["restarts"] == 1 and plain(c.status())["io"]["respawns"] == before["io"]["respawns"] + 1
        _, ids, fin = c.complete(PROMPT, max_tokens=12)
        assert fin.completion_tokens == 12 and len(ids) == 12
        assert plain(c.status())["workers"][0]["restarts"] == 1  # a read since does not reset the count
        assert status(http_daemon["env"])["workers"][0]["restarts"] == 1  # as `moed ps --json` shows it
    finally:
        c.close()
