"""Keep-alive: an idle daemon releases its model, says "sleeping", and loads it again on the next request."""

import time

from moed.client.client import Client
from daemon_util import env_for, moed, status, wait_until


def test_idle_daemon_sleeps_and_the_next_request_reloads(tiny_models, tmp_path, monkeypatch):
    runtime = tmp_path / "rt"
    env = env_for(runtime)
    monkeypatch.setenv("MOED_RUNTIME_DIR", str(runtime))
    moed(env, "start", "--model", str(tiny_models["qwen3_moe"]), "--cache-fraction", "0.25", "--keep-alive", "1s")
    try:
        with Client() as c:
            first = c.complete("The paged expert cache", max_tokens=8)[1]
            workers = [w["pid"] for w in status(env)["workers"]]
            snap = wait_until(lambda: (s := status(env))["state"] == "sleeping" and s, timeout=30)
            assert snap["cache"] is None and snap["workers"] == []  # model, cache and workers released
            again = c.complete("The paged expert cache", max_tokens=8)[1]
            assert again == first and status(env)["state"] == "ready"
            assert not set(workers) & {w["pid"] for w in status(env)["workers"]}  # new workers
            # a request's own keep_alive_s overrides the daemon's
            c.complete("hi", max_tokens=2, keep_alive_s=3600.0)
            time.sleep(2.5)
            assert status(env)["state"] == "ready"
    finally:
        moed(env, "stop")
