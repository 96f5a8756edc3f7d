"""Self-healing or honest (issue 17): I/O workers that keep dying put the daemon in "degraded" (status,
/health 503, `moed ps`) and it heals after a backoff; a worker that never answers fails or is replaced in
bounded time."""

import os
import signal
import threading
import time

import httpx
import psutil
import pytest
from daemon_util import http_daemon, moed, status, wait_until

from moed.client.client import Client, RequestRejected
from moed.daemon.io.fetcher import BACKOFF_S, Fetcher, WorkerError

PROMPT = "Once upon a time, in a land of small memories and large models,"


def test_fetcher_backs_off_doubling_then_serves_again(tmp_path):
    """In process: a slot SIGKILLed as soon as it exists gives up (the cause named), fails reads at once
    while down, backs off 0.5 s then 1 s; once the killing stops it respawns and reads the right bytes."""
    path = tmp_path / "a.bin"
    payload = os.urandom(1 << 16)
    path.write_bytes(payload)
    stop = threading.Event()

    def killer(f):
        while not stop.is_set():
            for pid in f.pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)

    with Fetcher([str(path)], workers=1, runtime_dir=tmp_path) as f:
        assert bytes(f.read([(0, 0, 100)])[0]) == payload[:100] and f.failure is None
        t = threading.Thread(target=killer, args=(f,))
        t.start()
        try:
            with pytest.raises(WorkerError, match="worker 0 failed 4 times; last: exited"):
                f.read([(0, 0, 100)])
            waits = [float(f.failure.rsplit(" in ", 1)[1].rstrip("s"))]
            t0 = time.monotonic()
            with pytest.raises(WorkerError, match="I/O workers failing"):
                f.read([(0, 0, 100)])
            assert time.monotonic() - t0 < 0.2
            time.sleep(BACKOFF_S)
            with pytest.raises(WorkerError, match="failed 4 times"):  # respawned, killed again: longer backoff
                f.read([(0, 0, 100)])
            waits.append(float(f.failure.rsplit(" in ", 1)[1].rstrip("s")))
        finally:
            stop.set()
            t.join()
        assert BACKOFF_S - 0.15 <= waits[0] <= BACKOFF_S and 2 * BACKOFF_S - 0.15 <= waits[1] <= 2 * BACKOFF_S, waits
        time.sleep(2 * BACKOFF_S)
        assert bytes(f.read([(0, 100, 1000)])[0]) == payload[100:1100]
        assert f.failure is None and psutil.pid_exists(f.pids[0])


@pytest.fixture
def daemon(tiny_models, tmp_path):
    """tiny qwen3_moe with 30 % of its experts cached (every request reads), HTTP on; stopped and checked after."""
    with http_daemon(tiny_models["qwen3_moe"], tmp_path / "rt", 0.3, "--no-warm") as d:
        yield d


def worker_pids(daemon_pid: int) -> list[int]:
    pids = []
    for p in psutil.Process(daemon_pid).children():
        try:
            if "moed.workers.loop" in " ".join(p.cmdline()):
                pids.append(p.pid)
        except psutil.Error:
            pass
    return pids


def health(d) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{d['port']}/health", timeout=10)


def test_workers_that_keep_dying_degrade_then_heal(daemon):
    """SIGKILL every worker as soon as it exists: requests fail with the cause, status is degraded with a
    reason, /health 503, `moed ps` says so; stop killing: ready again within the backoff, requests served."""
    env, stop = daemon["env"], threading.Event()
    kills = []

    def killer():
        while not stop.is_set():
            for pid in worker_pids(daemon["pid"]):
                try:
                    os.kill(pid, signal.SIGKILL)
                    kills.append(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.02)

    t = threading.Thread(target=killer)
    t.start()
    errors = []
    try:
        with Client(str(daemon["runtime"])) as c:
            deadline = time.monotonic() + 60
            while not errors and time.monotonic() < deadline:
                try:
                    c.complete(PROMPT, max_tokens=8)
                except RequestRejected as e:
                    errors.append(e)
        snap = wait_until(lambda: (s := status(env))["state"] == "degraded" and s, timeout=30)
        r = health(daemon)
        ps = moed(env, "ps").stdout
    finally:
        stop.set()
        t.join()
    assert errors, "no request failed while every worker was being killed"
    assert "worker" in errors[0].reason and "fail" in errors[0].reason, errors[0].reason  # the cause, typed
    assert "I/O workers" in snap["progress"]["phase"], snap["progress"]
    assert r.status_code == 503 and r.json()["status"] == "degraded" and "I/O workers" in r.json()["reason"]
    assert "degraded" in ps and "I/O workers" in ps
    assert len(kills) >= 4
    # healed: the backoff (at most BACKOFF_MAX_S) passes, the workers come back, requests are served
    wait_until(lambda: status(env)["state"] == "ready", timeout=40, every=0.2)
    with Client(str(daemon["runtime"])) as c:
        _, ids, _ = c.complete(PROMPT, max_tokens=8)
    assert len(ids) >= 1
    assert health(daemon).status_code == 200
    snap = status(env)
    assert snap["state"] == "ready" and all(w["alive"] and w["ready"] for w in snap["workers"])


def test_stopped_workers_never_hang_a_request(daemon):
    """SIGSTOP every worker: a request is served by respawned workers (or fails) within a bounded time."""
    env = daemon["env"]
    stopped = worker_pids(daemon["pid"])
    assert stopped
    result = {}

    def ask():
        try:
            with Client(str(daemon["runtime"])) as c:
                result["ids"] = c.complete(PROMPT, max_tokens=8)[1]
        except Exception as e:  # noqa: BLE001 - a typed failure is acceptable, a hang is not
            result["error"] = e

    try:
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        t = threading.Thread(target=ask, daemon=True)
        t.start()
        t.join(timeout=30)
        took = time.monotonic() - t0
        assert not t.is_alive(), "a request hung on stopped workers"
        # every stopped worker is replaced (SIGKILLed by the fetcher), the idle one too, not left stopped
        wait_until(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                                   for p in stopped), timeout=15)
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert "ids" in result or isinstance(result.get("error"), RequestRejected), result
    if "ids" in result:
        assert len(result["ids"]) >= 1
    snap = wait_until(lambda: (s := status(env))["state"] == "ready" and s, timeout=30)
    assert all(w["alive"] for w in snap["workers"]) and not set(stopped) & {w["pid"] for w in snap["workers"]}
    assert took < 15  # liveness 2 s + a respawn, with room for a loaded machine
