"""Helpers to run real daemons in tests: private runtime dirs, CLI subprocesses, leak checks."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from moed.ipc import shm

CLI = [sys.executable, "-m", "moed.client.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(runtime: Path, home: Path | None = None) -> dict:
    env = dict(os.environ, MOED_RUNTIME_DIR=str(runtime), PYTHONUNBUFFERED="1")
    if home is not None:
        env["MOED_HOME"] = str(home)
    return env


def moed(env: dict, *args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"moed {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def status(env: dict) -> dict:
    return json.loads(moed(env, "ps", "--json").stdout)


def shm_of(pid: int) -> list[str]:
    return [n for n in (shm.segments() or []) if n.startswith(f"moed-{pid}-")]


def assert_nothing_left(runtime: Path, pids: list[int], daemon_pid: int, timeout: float = 10) -> None:
    """No process, socket, connection/pid file or shared-memory segment of that daemon remains."""
    procs = [psutil.Process(p) for p in pids if psutil.pid_exists(p)]
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"still running: {alive}"
    left = [p.name for p in runtime.iterdir() if p.suffix in (".sock", ".json", ".pid")]
    assert not left, f"left in {runtime}: {left}"
    assert not shm_of(daemon_pid), shm_of(daemon_pid)


def wait_until(pred, timeout: float = 30, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise TimeoutError("condition not met")


@contextlib.contextmanager
def http_daemon(model: Path, runtime: Path, cache_fraction: float, *extra: str):
    """`moed start` on `model` with the HTTP API on a free loopback port (and `extra` start flags); yields
    {env, runtime, port, pid, model}; stops it after and checks that nothing of it is left."""
    env = env_for(runtime)
    port = free_port()
    moed(env, "start", "--model", str(model), "--cache-fraction", str(cache_fraction), "--http", f"127.0.0.1:{port}",
         *extra)
    try:
        snap = status(env)
        yield {"env": env, "runtime": runtime, "port": port, "pid": snap["pid"], "model": snap["model"]}
    finally:
        try:
            snap = status(env)
        finally:
            moed(env, "stop")
        assert_nothing_left(runtime, [snap["pid"]] + [w["pid"] for w in snap["workers"]], snap["pid"])
